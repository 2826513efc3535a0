"""One simulated federated fine-tuning run: built from a RunConfig (:mod:`fedlora_jax.build`), then
looped over rounds. The run's state is one pytree (:class:`RunState`), checkpointed as it is;
:func:`run_step` is one round; evaluation, per-round JSONL metrics, progress reporting and orbax
checkpoints (resumable) are hooks around it (:func:`_loop`)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
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
from fedlora_jax.build import (Setup, allocation_record, build, evaluate, prefixed,
                               strategy_context)
from fedlora_jax.engine import (PackedEngine, RoundResult, RunFloatingPointError, ServerState,
                                rule_signature)

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


class NotPackable(ValueError):
    """The runs given to :func:`train_packed` cannot share one compiled program; nothing was
    written."""


# Settings that may differ between the runs of one pack: what a run draws from its seed, its
# learning rates, what its strategy plans on the host (q and k), its network, its held-out
# split and its folder.
PER_RUN_SETTINGS = ("output_dir", "strategy", "strategy_options", "federation.seed",
                    "federation.participants", "federation.sketch_ratio",
                    "client_optimizer.learning_rate", "server_optimizer.learning_rate", "system",
                    "bandwidth_allocation", "data.evaluate_on", "data.validation_fraction",
                    "data.heldout_fraction")


def pack_key(cfg: config_lib.RunConfig) -> str:
    """Runs with equal keys may share one compiled program (:func:`train_packed`): their
    configs agree but for :data:`PER_RUN_SETTINGS`, and their strategies have the same rule
    (:func:`fedlora_jax.engine.rule_signature`) and change the model alike (FFA-LoRA freezes
    ``A``)."""
    strategy = strategies.strategy_of(cfg)
    cfg = strategies.configure(cfg, strategy)
    shared = config_lib.to_dict(cfg)
    for path in PER_RUN_SETTINGS:
        *parents, leaf = path.split(".")
        node = functools.reduce(lambda d, key: d.get(key, {}), parents, shared)
        node.pop(leaf, None)
    rule = rule_signature(strategy.rule(cfg.lora, cfg.federation))
    return json.dumps(shared, sort_keys=True) + repr((rule, type(strategy).adapt_model))


def train_packed(cfgs: list[config_lib.RunConfig], *, progress: str = "none", log=print,
                 resume: bool = False, overwrite: bool = False) -> list[list[dict]]:
    """Runs ``cfgs`` as one packed program (:class:`fedlora_jax.engine.PackedEngine`): every
    run's folder gets what :func:`train` writes for that run alone (config, config history,
    labels, ``metrics.jsonl``, checkpoints, allocation), rows equal to its run alone's up to
    float round-off; returns each run's metrics rows.

    The runs need one :func:`pack_key` and folders of their own. Every folder is checked as
    :func:`train` checks it before anything is built; :class:`NotPackable` (nothing written)
    when the built runs cannot share one program after all. Each run holds its own folder's
    lock and checkpoints, so a run can later be resumed alone (``fedlora-jax run --resume``); a
    packed resume continues every run from its newest good checkpoint, which must be of one
    round for all. Progress shows the mean over the runs. A diverging run stops the pack,
    naming its folder; every other folder keeps its rows and checkpoints up to the last
    completed round."""
    chosen = [strategies.strategy_of(cfg) for cfg in cfgs]
    cfgs = [strategies.configure(cfg, s) for cfg, s in zip(cfgs, chosen)]
    outs = [Path(cfg.output_dir) for cfg in cfgs]
    if len({out.resolve() for out in outs}) < len(outs):
        raise ValueError("Two runs of a pack have the same output_dir: give each its own.")
    if len({pack_key(cfg) for cfg in cfgs}) > 1:
        raise NotPackable("The runs differ in more than seeds, learning rates, plans and "
                          "network: group them by train.pack_key first.")
    for out in outs:
        rundir.check_free(out, resume=resume, overwrite=overwrite)
    saved = [config_lib.to_dict(cfg) for cfg in cfgs]
    changed = [rundir.check_resume(out, d) if resume else {} for out, d in zip(outs, saved)]
    setups = [build(cfg) for cfg in cfgs]
    try:
        packed = PackedEngine([setup.engine for setup in setups])
    except ValueError as e:
        raise NotPackable(str(e)) from None
    ctxs = [strategy_context(cfg, setup) for cfg, setup in zip(cfgs, setups)]
    log(f"packed {len(cfgs)} runs: model {setups[0].description}; clients "
        f"{packed.engines[0].num_clients}")
    with contextlib.ExitStack() as stack:
        for out in outs:
            stack.enter_context(rundir.lock(out))
        for out in outs:
            rundir.check_contents(out, resume=resume, overwrite=overwrite)
            if overwrite:
                rundir.clear(out)
        checkpoints = [stack.enter_context(checkpoint.Checkpointer(out / rundir.CHECKPOINT_DIR))
                       for out in outs]
        server = packed.init([cfg.federation.seed for cfg in cfgs])
        scores = None if resume else packed.evaluate(server, [s.heldout for s in setups])
        starts = [_start(setup, RunState(packed.run_state(server, i),
                                         strategies.init_estimates(ctx.num_clients),
                                         ctx.uniform()),
                         checkpoints[i], saved[i], changed[i], resume=resume, log=log,
                         scores=None if scores is None else prefixed(scores[i], "eval_"))
                  for i, (setup, ctx) in enumerate(zip(setups, ctxs))]
        states, histories, elapsed = (list(x) for x in zip(*starts))
        if len({int(state.server.round) for state in states}) > 1:
            raise ValueError("The runs' newest good checkpoints are of different rounds ("
                             + ", ".join(f"{o}: {int(s.server.round)}" for o, s in
                                         zip(outs, states))
                             + "): resume them one by one (fedlora-jax run --resume).")
        runs = [Run(setup, strategy, ctx, DIVERGED_FACTOR * max(1.0, history[0]["eval_loss"]),
                    log) for setup, strategy, ctx, history in zip(setups, chosen, ctxs, histories)]
        states = _packed_loop(packed, runs, states, histories, checkpoints, cfgs,
                              elapsed=elapsed, progress=progress)
        for out, setup, state, cfg in zip(outs, setups, states, cfgs):
            (out / metrics_lib.ALLOCATION_FILE).write_text(
                json.dumps(allocation_record(setup, state.plan, cfg.system)))
    for out, history in zip(outs, histories):
        log(f"{out}: {summary(history)}")
    return histories


MAX_PACK = 16  # runs per pack at most: a chunk trains runs x chunk_size clients at once


def train_all(cfgs: list[config_lib.RunConfig], *, pack: bool = True, log=print
              ) -> list[list[dict]]:
    """Trains every config afresh (replacing what its folder holds) and returns each one's
    metrics rows, in order. With ``pack``, the configs of one :func:`pack_key` train as packs
    of up to :data:`MAX_PACK` (:func:`train_packed`); a pack that cannot share a program after
    all (:class:`NotPackable`), a lone config and ``pack=False`` train one by one
    (:func:`train`). ``log`` gets one line per pack or run."""
    groups: dict = {}
    for i, cfg in enumerate(cfgs):
        groups.setdefault(pack_key(cfg) if pack else i, []).append(i)
    quiet = lambda *_: None
    results: list = [None] * len(cfgs)
    for members in groups.values():
        for start in range(0, len(members), MAX_PACK):
            part = members[start:start + MAX_PACK]
            if len(part) > 1:
                log(f"{len(part)} runs packed into one program: "
                    + ", ".join(cfgs[i].output_dir for i in part))
                try:
                    for i, rows in zip(part, train_packed([cfgs[i] for i in part], log=quiet,
                                                          overwrite=True)):
                        results[i] = rows
                    continue
                except NotPackable as e:
                    log(f"not packed ({e}): one by one")
            for i in part:
                log(cfgs[i].output_dir)
                results[i] = train(cfgs[i], progress="none", log=quiet, overwrite=True)
    return results


def _packed_loop(packed: PackedEngine, runs: list[Run], states: list[RunState],
                 histories: list[list[dict]], checkpoints: list[checkpoint.Checkpointer],
                 cfgs: list[config_lib.RunConfig], *, elapsed: list[float], progress: str
                 ) -> list[RunState]:
    """:func:`_loop` for a pack: each round plans every run on the host, trains all of them in
    :meth:`PackedEngine.run_round`, evaluates them together when due, appends each run's row
    to its own ``metrics.jsonl`` (all rows of a round, or none) and saves each run's own
    :class:`RunState`, as :func:`_loop` does for one run."""
    rounds, every, log = cfgs[0].federation.rounds, cfgs[0].checkpoint_every, runs[0].log
    configs = [config_lib.to_dict(cfg) for cfg in cfgs]
    heldouts = [run.setup.heldout for run in runs]
    first = int(states[0].server.round)
    if first == rounds:
        log(f"the runs are complete at round {rounds}: nothing to run (extend them with --rounds)")
    server = packed.stack([state.server for state in states])
    clock_start = time.perf_counter()

    def save(server: ServerState, states: list[RunState]) -> None:
        saved_round = np.asarray(server.round)
        for i, state in enumerate(states):
            checkpoints[i].save(int(saved_round[i]),
                                state._replace(server=packed.run_state(server, i)),
                                config=configs[i],
                                elapsed_s=elapsed[i] + time.perf_counter() - clock_start)

    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(Path(cfg.output_dir) / metrics_lib.METRICS_FILE, "a"))
                 for cfg in cfgs]
        report = stack.enter_context(progress_reporter(progress, rounds, first))
        stop = stack.enter_context(_stop_requests(log))
        try:
            for r in range(first + 1, rounds + 1):
                plans = [plan_round(run, state, r) for run, state in zip(runs, states)]
                try:
                    new, results = packed.run_round(server, [(p.q, p.k) for p in plans])
                except RunFloatingPointError as e:
                    raise Diverged(f"{cfgs[e.run].output_dir}: training diverged in round {r}: "
                                   f"{e}. {_restart_hint(checkpoints[e.run])}") from None
                clocks = np.asarray(new.clock)
                stepped = []
                for i, run in enumerate(runs):
                    try:
                        stepped.append(observe_round(run, states[i], plans[i], results[i], r,
                                                     float(clocks[i])))
                    except Diverged as e:
                        raise Diverged(f"{cfgs[i].output_dir}: {e} "
                                       f"{_restart_hint(checkpoints[i])}") from None
                scores = (packed.evaluate(new, heldouts)
                          if r % cfgs[0].eval_every == 0 or r == rounds else None)
                for i, (_, row) in enumerate(stepped):
                    row["elapsed_s"] = elapsed[i] + time.perf_counter() - clock_start
                    if scores is not None:
                        row.update(prefixed(scores[i], "eval_"))
                    files[i].write(json.dumps(row) + "\n")
                    files[i].flush()
                    histories[i].append(row)
                server, states = new, [state for state, _ in stepped]  # committed
                report(_mean_row([row for _, row in stepped]))
                halt = stop[:1]
                if (every and r % every == 0) or r == rounds or halt:
                    save(server, states)
                if halt:
                    raise Interrupted(halt[0], r)
        except KeyboardInterrupt:
            if checkpoint.is_alive(server):  # else the interrupted round consumed its buffers
                save(server, states)
            log("interrupted: resume each run from its latest checkpoint with 'fedlora-jax run "
                "--resume --output-dir DIR' (DIR: " + ", ".join(c.output_dir for c in cfgs) + ")")
            raise
    return [state._replace(server=packed.run_state(server, i)) for i, state in enumerate(states)]


def _mean_row(rows: list[dict]) -> dict:
    """The mean over the runs of each numeric column every row has (progress of a pack)."""
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]
            if all(isinstance(row.get(key), (int, float)) for row in rows)}


def run_step(run: Run, state: RunState) -> tuple[RunState, dict]:
    """One round: the strategy plans if due, the engine trains and aggregates, and the round's
    update norms refine the estimates. -> (the next state, the round's metrics row).

    Raises :class:`Diverged` when the clients' updates or their mean training loss are not
    finite, or the loss exceeds ``run.bound``."""
    r = int(state.server.round) + 1
    plan = plan_round(run, state, r)
    try:
        server, result = run.setup.engine.run_round(state.server, plan.q, plan.k)
    except FloatingPointError as e:
        raise Diverged(f"Training diverged in round {r}: {e}.") from None
    return observe_round(run, state._replace(server=server), plan, result, r,
                         float(server.clock))


def plan_round(run: Run, state: RunState, r: int) -> strategies.Plan:
    """The plan of round ``r``: the strategy's new one if it is due, else the current one."""
    return _plan(run.strategy, r, run.ctx, state.estimates, run.log) if run.strategy.due(r) \
        else state.plan


def observe_round(run: Run, state: RunState, plan: strategies.Plan, result: RoundResult,
                  r: int, clock: float) -> tuple[RunState, dict]:
    """Round ``r``'s result folded into the run (``state.server`` as it is; ``clock``: the
    simulated clock after the round): checks the loss against ``run.bound``
    (:class:`Diverged`), refines the estimates, lets the strategy revise its plan;
    -> (the next state, the round's metrics row)."""
    if result.participants.size and not result.train_loss <= run.bound:
        raise Diverged(f"Training diverged in round {r}: train loss {result.train_loss:.4g} "
                       f"(bound {run.bound:.4g}).")
    estimates = strategies.observe(state.estimates, run.ctx, plan, result.participants,
                                   result.clients.update_sq_norm, result.applied_sq_norm,
                                   head_sq_norms=result.clients.head_sq_norm)
    row = {"round": r, "participants": int(result.participants.size),
           "train_loss": result.train_loss, "train_accuracy": result.train_accuracy,
           "uplink_params": result.uplink_params, "sim_clock_s": clock,
           **{f"round_{name}_s": t for name, t in result.times.items()},
           "expected_participants": float(plan.q.sum()), "mean_rank": float(plan.k.mean()),
           "est_signal": estimates.signal, "est_g2_mean": float(estimates.g2.mean())}
    return RunState(state.server, estimates, run.strategy.revise(plan, result)), row


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
           changed: dict, *, resume: bool, log, scores: dict | None = None
           ) -> tuple[RunState, list[dict], float]:
    """-> ``(state, metrics rows, elapsed seconds)`` to run from: the newest good checkpoint
    (restored into the structure of ``fresh``; ``metrics.jsonl`` truncated to its round), or
    ``fresh``, evaluated (``scores``: its held-out scores, when the caller has them already).
    Records the config the run continues or starts with."""
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
    scores = evaluate(setup, fresh.server) if scores is None else scores
    history = [{"round": 0, "sim_clock_s": 0.0, **scores}]
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
