"""One simulated federated fine-tuning run: built from a RunConfig (:mod:`fedlora_jax.build`), then
looped over rounds. The run's state is one pytree (:class:`RunState`), checkpointed as it is;
:func:`run_step` is one round; evaluation, per-round JSONL metrics, progress reporting and orbax
checkpoints (resumable) are hooks around it (:func:`_loop`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from fedlora_jax import checkpoint, plan_report, rundir, strategies
from fedlora_jax import config as config_lib
from fedlora_jax import metrics as metrics_lib
from fedlora_jax.build import Setup, allocation_record, build, evaluate, strategy_context
from fedlora_jax.engine import ServerState

PROGRESS_MODES = ("bar", "jsonl", "none")


@contextlib.contextmanager
def progress_reporter(mode: str, total: int, initial: int):
    """Yields ``report(row)``, called once per round: a tqdm bar (rounds, simulated clock,
    participants, loss, accuracy, ETA), a JSON line on stdout, or nothing."""
    if mode == "bar":
        last_eval = {}  # held-out accuracy stays shown between evaluations
        with tqdm(total=total, initial=initial, unit="round", desc="federated") as bar:
            def report(row: dict) -> None:
                last_eval.update({k: row[k] for k in ("eval_accuracy",) if k in row})
                bar.set_postfix(_postfix(row | last_eval), refresh=False)
                bar.update()
            yield report
    elif mode == "jsonl":
        yield lambda row: print(json.dumps({"event": "round", "total_rounds": total, **row}),
                                flush=True)
    elif mode == "none":
        yield lambda row: None
    else:
        raise ValueError(f"progress must be one of {PROGRESS_MODES}, got {mode!r}.")


def _postfix(row: dict) -> dict[str, str]:
    names = {"sim_clock_s": "sim_s", "participants": "P", "train_loss": "loss",
             "train_accuracy": "acc", "eval_accuracy": "eval_acc"}
    return {short: f"{row[key]:.4g}" for key, short in names.items()
            if key in row and np.isfinite(row[key])}


class Interrupted(Exception):
    """The run stopped on SIGINT or SIGTERM at a round boundary, after saving that round."""

    def __init__(self, signum: int, checkpoint_round: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after round {checkpoint_round}")
        self.signum, self.checkpoint_round = signum, checkpoint_round


class Diverged(ValueError):
    """The training loss became non-finite or exceeded :data:`DIVERGED_FACTOR` times the
    round-0 held-out loss."""


# A round whose mean training loss is non-finite or above this many times the round-0 held-out
# loss (at least 1) stops the run as diverged: a classifier starts near ln(classes), and a loss
# 100 times that means the updates have blown up, not that training is slow.
DIVERGED_FACTOR = 100.0


class RunState(NamedTuple):
    """Everything a run carries from one round to the next; checkpointed as one pytree."""

    server: ServerState  # the engine's state: global adapter, optimizer state, round, key, clock
    estimates: strategies.Estimates  # what the strategy learned of the clients so far
    plan: strategies.Plan  # the clients' q and k for the next round (until the strategy re-plans)


@dataclasses.dataclass(frozen=True)
class Run:
    """What stays fixed through a run: the built run, the strategy and what it may know, the
    loss above which the run diverged, and where planning messages go."""

    setup: Setup
    strategy: strategies.Strategy
    ctx: strategies.Context
    bound: float
    log: Callable[[str], None] = print


def train(cfg: config_lib.RunConfig, *, progress: str = "bar", log=print,
          resume: bool = False, overwrite: bool = False) -> list[dict]:
    """Runs ``cfg``; writes ``config.json``, ``config_history.jsonl``, ``labels.json``,
    ``allocation.json``, ``metrics.jsonl`` and ``checkpoints/`` to ``cfg.output_dir`` and returns
    the metrics rows.

    The folder is checked (:mod:`fedlora_jax.rundir`: not held by another run; an existing run
    there only with ``resume`` or ``overwrite``; a resume only with settings the run may change),
    then the data and model are built, and only then is the folder locked and written.
    ``resume=True`` restores the newest checkpoint that verifies, truncates ``metrics.jsonl`` to
    its round and continues exactly as an uninterrupted run would. The rounds are
    :func:`run_step`, with evaluation, metrics, progress and checkpoints around it
    (:func:`_loop`).
    """
    strategy = strategies.strategy_of(cfg)
    cfg = strategies.configure(cfg, strategy)
    out = Path(cfg.output_dir)
    rundir.check_free(out, resume=resume, overwrite=overwrite)
    saved = config_lib.to_dict(cfg)
    changed = rundir.check_resume(out, saved) if resume else {}
    setup = build(cfg)
    log(f"model: {setup.description}; clients: {setup.engine.num_clients}; "
        f"held-out examples: {len(setup.heldout['input_ids'])}")
    log(f"classes: {_label_map(setup.label_names)}")
    ctx = strategy_context(cfg, setup)
    with rundir.lock(out):
        rundir.check_contents(out, resume=resume, overwrite=overwrite)  # as it is now, locked
        if overwrite:
            rundir.clear(out)
        with checkpoint.Checkpointer(out / rundir.CHECKPOINT_DIR) as checkpoints:
            fresh = RunState(setup.engine.init(), strategies.init_estimates(ctx.num_clients),
                             ctx.uniform())
            state, history, elapsed = _start(setup, fresh, checkpoints, saved, changed,
                                             resume=resume, log=log)
            run = Run(setup, strategy, ctx, DIVERGED_FACTOR * max(1.0, history[0]["eval_loss"]),
                      log)
            state = _loop(run, state, history, checkpoints, cfg, elapsed=elapsed,
                          progress=progress)
        (out / metrics_lib.ALLOCATION_FILE).write_text(
            json.dumps(allocation_record(setup, state.plan, cfg.system)))
    log(summary(history))
    log(plan_report.summary(ctx, state.plan, history,
                            plan_report.last_planned(strategy, cfg.federation.rounds)))
    return history


def run_step(run: Run, state: RunState) -> tuple[RunState, dict]:
    """One round: the strategy plans if due, the engine trains and aggregates, and the round's
    update norms refine the estimates. -> (the next state, the round's metrics row).

    Raises :class:`Diverged` when the clients' updates or their mean training loss are not
    finite, or the loss exceeds ``run.bound``."""
    strategy, engine = run.strategy, run.setup.engine
    r = int(state.server.round) + 1
    plan = _plan(strategy, r, run.ctx, state.estimates, run.log) if strategy.due(r) else state.plan
    try:
        server, result = engine.run_round(state.server, plan.q, plan.k)
    except FloatingPointError as e:
        raise Diverged(f"Training diverged in round {r}: {e}.") from None
    if result.participants.size and not result.train_loss <= run.bound:
        raise Diverged(f"Training diverged in round {r}: train loss {result.train_loss:.4g} "
                       f"(bound {run.bound:.4g}).")
    estimates = strategies.observe(state.estimates, run.ctx, plan, result.participants,
                                   result.clients.update_sq_norm, result.applied_sq_norm,
                                   head_sq_norms=result.clients.head_sq_norm)
    row = {"round": r, "participants": int(result.participants.size),
           "train_loss": result.train_loss, "train_accuracy": result.train_accuracy,
           "uplink_params": result.uplink_params, "sim_clock_s": float(server.clock),
           **{f"round_{name}_s": t for name, t in result.times.items()},
           "expected_participants": float(plan.q.sum()), "mean_rank": float(plan.k.mean()),
           "est_signal": estimates.signal, "est_g2_mean": float(estimates.g2.mean())}
    return RunState(server, estimates, strategy.revise(plan, result)), row


def _loop(run: Run, state: RunState, history: list[dict], checkpoints: checkpoint.Checkpointer,
          cfg: config_lib.RunConfig, *, elapsed: float, progress: str) -> RunState:
    """:func:`run_step` until ``cfg.federation.rounds``; after each round its row gets the
    elapsed time and, every ``cfg.eval_every`` rounds and at the end, the held-out scores; it is
    appended to ``metrics.jsonl`` and ``history`` (the round is then committed) and reported,
    and the state is saved every ``cfg.checkpoint_every`` rounds and after the last.

    SIGINT or SIGTERM stops the run at the next round boundary, saves that round and raises
    :class:`Interrupted` (a second SIGINT stops at once: ``KeyboardInterrupt``, saving the last
    committed round). A diverging loss raises :class:`Diverged`, naming the last good
    checkpoint."""
    rounds, every, log = cfg.federation.rounds, cfg.checkpoint_every, run.log
    config, out = config_lib.to_dict(cfg), Path(cfg.output_dir)
    if int(state.server.round) == rounds:
        log(f"the run is complete at round {rounds}: nothing to run (extend it with --rounds)")
    clock_start = time.perf_counter() - elapsed

    def save(state: RunState) -> None:
        checkpoints.save(int(state.server.round), state, config=config,
                         elapsed_s=time.perf_counter() - clock_start)

    with (open(out / metrics_lib.METRICS_FILE, "a") as f,
          progress_reporter(progress, rounds, int(state.server.round)) as report,
          _stop_requests(log) as stop):
        try:
            for r in range(int(state.server.round) + 1, rounds + 1):
                try:
                    new, row = run_step(run, state)
                except Diverged as e:
                    raise Diverged(f"{e} {_restart_hint(checkpoints)}") from None
                row["elapsed_s"] = time.perf_counter() - clock_start
                if r % cfg.eval_every == 0 or r == rounds:
                    row.update(evaluate(run.setup, new.server))
                f.write(json.dumps(row) + "\n")
                f.flush()
                history.append(row)
                state = new  # committed: its row is in metrics.jsonl
                report(row)
                halt = stop[:1]  # a signal from here on stops after the next round
                if (every and r % every == 0) or r == rounds or halt:
                    save(state)
                if halt:
                    raise Interrupted(halt[0], r)
        except KeyboardInterrupt:
            if checkpoint.is_alive(state):  # else the interrupted round consumed its buffers
                save(state)
            log(f"interrupted: resume from the checkpoint of round {checkpoints.latest_round()} "
                f"with 'fedlora-jax run --resume --output-dir {out}'")
            raise
    return state


def _start(setup: Setup, fresh: RunState, checkpoints: checkpoint.Checkpointer, config: dict,
           changed: dict, *, resume: bool, log) -> tuple[RunState, list[dict], float]:
    """-> ``(state, metrics rows, elapsed seconds)`` to run from: the newest good checkpoint
    (restored into the structure of ``fresh``; ``metrics.jsonl`` truncated to its round), or
    ``fresh``, evaluated. Records the config the run continues or starts with."""
    out = Path(config["output_dir"])
    metrics_path = out / metrics_lib.METRICS_FILE
    if resume:
        state, meta = checkpoints.restore_latest_good(fresh, log=log)
        saved_round = int(state.server.round)
        history = metrics_lib.truncate(metrics_path, saved_round)
        rundir.record_config(out, config, saved_round + 1, changed)
        log(f"resumed from the checkpoint of round {saved_round}"
            + (f"; changed: {_listed(changed)}" if changed else ""))
        return state, history, meta["elapsed_s"]
    rundir.record_config(out, config, 1, {})
    (out / rundir.LABELS_FILE).write_text(json.dumps(list(setup.label_names)))
    history = [{"round": 0, "sim_clock_s": 0.0, **evaluate(setup, fresh.server)}]
    metrics_path.write_text(json.dumps(history[0]) + "\n")
    return fresh, history, 0.0


def _plan(strategy: strategies.Strategy, r: int, ctx: strategies.Context,
          est: strategies.Estimates, log) -> strategies.Plan:
    """The strategy's plan for round ``r``; a re-plan after round 1 (a solve, for ``adaptive``)
    is announced and summarized, as it may take seconds."""
    if r == 1:
        return strategy.plan(r, ctx, est)
    log(f"round {r}: {strategy.name} is planning every client's q and rank...")
    start = time.perf_counter()
    plan = strategy.plan(r, ctx, est)
    log(f"round {r}: planned in {time.perf_counter() - start:.1f} s: {plan.q.sum():.1f} expected "
        f"participants, mean rank {plan.k.mean():.2f} of {ctx.rank}")
    return plan


def _restart_hint(checkpoints: checkpoint.Checkpointer) -> str:
    """How to go on after a divergence: from the last good checkpoint, with a lower rate."""
    last = checkpoints.latest_round()
    where = (f"The last good checkpoint is round {last} in {checkpoints.directory}: resume "
             f"from it with --resume and a lower --set client_optimizer.learning_rate=..."
             if last is not None else "No checkpoint was saved yet: start again with "
             "--overwrite and a lower --set client_optimizer.learning_rate=...")
    return f"{where} (or set client_optimizer.clip_norm)."


@contextlib.contextmanager
def _stop_requests(log):
    """Yields a list that receives the signal number of a SIGINT or SIGTERM: the loop finishes
    its round, saves and stops. A second SIGINT interrupts at once (``KeyboardInterrupt``).
    Outside the main thread (where handlers cannot be set) the list stays empty."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        del frame
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)
        log(f"{signal.Signals(signum).name} received: stopping after this round and saving it "
            "(Ctrl-C again stops at once)")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _label_map(names: tuple[str, ...], limit: int = 12) -> str:
    shown = ", ".join(f"{i}={name}" for i, name in enumerate(names[:limit]))
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _listed(changed: dict[str, tuple]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())


def summary(history: list[dict]) -> str:
    first, last = history[0], history[-1]
    rounds = [h for h in history if "participants" in h]
    participants = np.array([h["participants"] for h in rounds]) if rounds else np.zeros(1)
    uplink = sum(h["uplink_params"] for h in rounds)
    return "\n".join([
        "summary",
        f"  rounds                 {len(rounds)}",
        f"  held-out loss          {first['eval_loss']:.4f} -> {last['eval_loss']:.4f}",
        f"  held-out accuracy      {first['eval_accuracy']:.4f} -> {last['eval_accuracy']:.4f}",
        f"  participants / round   mean {participants.mean():.1f}, min {participants.min()}, "
        f"max {participants.max()}",
        f"  uplink volume          {uplink / 1e6:.2f} M parameters ({uplink * 4 / 2**20:.1f} MiB fp32)",
        f"  simulated wall-clock   {last.get('sim_clock_s', 0.0):.4g} s (download + compute + "
        "upload + server)" if rounds else "",
        f"  wall time              {last.get('elapsed_s', 0.0):.1f} s"])
