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
    round-0 held-out loss; ``run`` is the run's index in its pack (0 alone)."""

    def __init__(self, message: str, run: int = 0):
        super().__init__(message)
        self.run = run


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
    (:func:`_loop`, which drives the run as a pack of one).
    """
    (folder,) = _checked_folders([cfg], resume=resume, overwrite=overwrite)
    setup = build(folder.cfg)
    log(f"model: {setup.description}; clients: {setup.engine.num_clients}; "
        f"held-out examples: {len(setup.heldout['input_ids'])}")
    log(f"classes: {_label_map(setup.label_names)}")
    (history,), (run,), (state,) = _train_group([folder], Packed.alone(setup), progress=progress,
                                                log=log, resume=resume, overwrite=overwrite)
    log(summary(history))
    log(plan_report.summary(run.ctx, state.plan, history,
                            plan_report.last_planned(run.strategy, folder.cfg.federation.rounds)))
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
    if len({pack_key(cfg) for cfg in cfgs}) > 1:
        raise NotPackable("The runs differ in more than seeds, learning rates, plans and "
                          "network: group them by train.pack_key first.")
    folders = _checked_folders(cfgs, resume=resume, overwrite=overwrite)
    setups = [build(folder.cfg) for folder in folders]
    histories, *_ = _train_group(folders, _packed(setups), progress=progress, log=log,
                                 resume=resume, overwrite=overwrite)
    return histories


MAX_PACK = 16  # runs per pack at most: a chunk trains runs x chunk_size clients at once


def train_all(cfgs: list[config_lib.RunConfig], *, pack: bool = True, log=print
              ) -> list[list[dict]]:
    """Trains every config afresh (replacing what its folder holds) and returns each one's
    metrics rows, in order. With ``pack``, the configs of one :func:`pack_key` train as packs
    of up to :data:`MAX_PACK` (:func:`train_packed`); a pack whose built runs cannot share a
    program after all (:class:`NotPackable`: a personalized rule) trains one by one from the
    runs already built; a lone config and ``pack=False`` train one by one (:func:`train`).
    ``log`` gets one line per pack or run."""
    groups: dict = {}
    for i, cfg in enumerate(cfgs):
        groups.setdefault(pack_key(cfg) if pack else i, []).append(i)
    quiet = lambda *_: None
    results: list = [None] * len(cfgs)
    for members in groups.values():
        for start in range(0, len(members), MAX_PACK):
            part = members[start:start + MAX_PACK]
            if len(part) == 1:
                log(cfgs[part[0]].output_dir)
                results[part[0]] = train(cfgs[part[0]], progress="none", log=quiet,
                                         overwrite=True)
                continue
            log(f"{len(part)} runs packed into one program: "
                + ", ".join(cfgs[i].output_dir for i in part))
            folders = _checked_folders([cfgs[i] for i in part], resume=False, overwrite=True)
            setups = [build(folder.cfg) for folder in folders]
            try:
                drivers = [(folders, _packed(setups))]
            except NotPackable as e:
                log(f"not packed ({e}): one by one")
                drivers = [([folder], Packed.alone(setup))
                           for folder, setup in zip(folders, setups)]
            histories = [history for group, driver in drivers for history in _train_group(
                group, driver, progress="none", log=quiet, resume=False, overwrite=True)[0]]
            for i, rows in zip(part, histories):
                results[i] = rows
    return results


# ---------------------------------------------------------------- runs as packs (one loop for all)

@dataclasses.dataclass(frozen=True)
class Folder:
    """A run's configuration (its strategy applied) and folder, checked before anything is
    built: the saved config and, for a resume, the settings it changes."""

    cfg: config_lib.RunConfig
    strategy: strategies.Strategy
    saved: dict
    changed: dict

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)


def _checked_folders(cfgs: list[config_lib.RunConfig], *, resume: bool, overwrite: bool
                     ) -> list[Folder]:
    """Every run's :class:`Folder`, each folder checked (:mod:`fedlora_jax.rundir`); nothing is
    written."""
    chosen = [strategies.strategy_of(cfg) for cfg in cfgs]
    cfgs = [strategies.configure(cfg, s) for cfg, s in zip(cfgs, chosen)]
    outs = [Path(cfg.output_dir) for cfg in cfgs]
    if len({out.resolve() for out in outs}) < len(outs):
        raise ValueError("Two runs of a pack have the same output_dir: give each its own.")
    for out in outs:
        rundir.check_free(out, resume=resume, overwrite=overwrite)
    saved = [config_lib.to_dict(cfg) for cfg in cfgs]
    return [Folder(cfg, strategy, d, rundir.check_resume(out, d) if resume else {})
            for cfg, strategy, out, d in zip(cfgs, chosen, outs, saved)]


@dataclasses.dataclass(frozen=True)
class Packed:
    """Built runs as :func:`_loop` drives them: their
    :class:`~fedlora_jax.engine.PackedEngine` (which runs the rounds and stacks the states) and
    their setups (held-out data). A run alone is its engine's pack of one (:meth:`alone`)."""

    engine: PackedEngine
    setups: list[Setup]

    @classmethod
    def alone(cls, setup: Setup) -> Packed:
        """One run, driven by its engine's pack of one (its own state, no run axis)."""
        return cls(setup.engine.pack_of_one, [setup])

    def evaluate(self, state: ServerState) -> list[dict[str, float]]:
        """Every run's held-out row entries: a run alone's by :func:`fedlora_jax.build.evaluate`
        (with a personalized rule's per-client scores), a pack's in the same compiled calls."""
        if not self.engine.stacked:
            return [evaluate(self.setups[0], state)]
        scores = self.engine.evaluate(state, [setup.heldout for setup in self.setups])
        return [prefixed(s, "eval_") for s in scores]



def _packed(setups: list[Setup]) -> Packed:
    """The built runs as one :class:`Packed`; :class:`NotPackable` when they cannot share one
    compiled program (:func:`fedlora_jax.engine.check_packable`)."""
    try:
        return Packed(PackedEngine([setup.engine for setup in setups]), setups)
    except ValueError as e:
        raise NotPackable(str(e)) from None


def _train_group(folders: list[Folder], driver: Packed, *, progress: str, log, resume: bool,
                 overwrite: bool) -> tuple[list[list[dict]], list[Run], list[RunState]]:
    """Trains the runs of ``driver`` (built from ``folders``): locks and writes each folder,
    starts or resumes each run (:func:`_start`), loops (:func:`_loop`) and writes each
    allocation. -> (each run's metrics rows, its :class:`Run`, its last state)."""
    setups, engine = driver.setups, driver.engine
    ctxs = [strategy_context(f.cfg, setup) for f, setup in zip(folders, setups)]
    if len(folders) > 1:
        log(f"packed {len(folders)} runs: model {setups[0].description}; clients "
            f"{setups[0].engine.num_clients}")
    with contextlib.ExitStack() as stack:
        for f in folders:
            stack.enter_context(rundir.lock(f.out))
        for f in folders:
            rundir.check_contents(f.out, resume=resume, overwrite=overwrite)  # locked
            if overwrite:
                rundir.clear(f.out)
        checkpoints = [stack.enter_context(checkpoint.Checkpointer(f.out / rundir.CHECKPOINT_DIR))
                       for f in folders]
        server = engine.init([f.cfg.federation.seed for f in folders])
        scores = None if resume else driver.evaluate(server)
        starts = [_start(setup, RunState(engine.run_state(server, i),
                                         strategies.init_estimates(ctx.num_clients),
                                         ctx.uniform()),
                         checkpoints[i], folders[i].saved, folders[i].changed, resume=resume,
                         log=log, scores=None if scores is None else scores[i])
                  for i, (setup, ctx) in enumerate(zip(setups, ctxs))]
        states, histories, elapsed = (list(x) for x in zip(*starts))
        if len({int(state.server.round) for state in states}) > 1:
            raise ValueError("The runs' newest good checkpoints are of different rounds ("
                             + ", ".join(f"{f.out}: {int(s.server.round)}" for f, s in
                                         zip(folders, states))
                             + "): resume them one by one (fedlora-jax run --resume).")
        runs = [Run(setup, f.strategy, ctx, DIVERGED_FACTOR * max(1.0, history[0]["eval_loss"]),
                    log) for setup, f, ctx, history in zip(setups, folders, ctxs, histories)]
        states = _loop(driver, runs, states, histories, checkpoints, [f.cfg for f in folders],
                       elapsed=elapsed, progress=progress)
        for f, setup, state in zip(folders, setups, states):
            (f.out / metrics_lib.ALLOCATION_FILE).write_text(
                json.dumps(allocation_record(setup, state.plan, f.cfg.system)))
    if len(folders) > 1:
        for f, history in zip(folders, histories):
            log(f"{f.out}: {summary(history)}")
    return histories, runs, states


def run_step(run: Run, state: RunState) -> tuple[RunState, dict]:
    """One round of one run: the strategy plans if due, the engine trains and aggregates, and
    the round's update norms refine the estimates (:func:`step` on a pack of one).
    -> (the next state, the round's metrics row).

    Raises :class:`Diverged` when the clients' updates or their mean training loss are not
    finite, or the loss exceeds ``run.bound``."""
    server, ((state, row),) = step(Packed.alone(run.setup), [run], [state], state.server,
                                   int(state.server.round) + 1)
    return state._replace(server=server), row


def step(driver: Packed, runs: list[Run], states: list[RunState], server: ServerState, r: int
         ) -> tuple[ServerState, list[tuple[RunState, dict]]]:
    """Round ``r`` of every run of ``driver``: each run's plan (:func:`plan_round`), one round
    of the engine from ``server`` (donated), each result folded in (:func:`observe_round`).
    -> (the engine's next state, per run (its next state, its row)); a run's state keeps its
    ``server`` as it was (:meth:`~fedlora_jax.engine.PackedEngine.run_state` gives the new).

    Raises :class:`Diverged` (its ``run``: the run's index) when a run's client updates or mean
    training loss are not finite, or the loss exceeds the run's bound."""
    plans = [plan_round(run, state, r) for run, state in zip(runs, states)]
    try:
        new, results = driver.engine.run_round(server, [(p.q, p.k) for p in plans])
    except RunFloatingPointError as e:
        raise Diverged(f"Training diverged in round {r}: {e}.", run=e.run) from None
    clocks = np.atleast_1d(np.asarray(new.clock))
    return new, [observe_round(runs[i], states[i], plans[i], results[i], r, float(clocks[i]), i)
                 for i in range(len(runs))]


def plan_round(run: Run, state: RunState, r: int) -> strategies.Plan:
    """The plan of round ``r``: the strategy's new one if it is due, else the current one."""
    return _plan(run.strategy, r, run.ctx, state.estimates, run.log) if run.strategy.due(r) \
        else state.plan


def observe_round(run: Run, state: RunState, plan: strategies.Plan, result: RoundResult,
                  r: int, clock: float, index: int = 0) -> tuple[RunState, dict]:
    """Round ``r``'s result folded into the run (``state.server`` as it is; ``clock``: the
    simulated clock after the round): checks the loss against ``run.bound``
    (:class:`Diverged`, naming the run's ``index`` in its pack), refines the estimates, lets the
    strategy revise its plan; -> (the next state, the round's metrics row)."""
    if result.participants.size and not result.train_loss <= run.bound:
        raise Diverged(f"Training diverged in round {r}: train loss {result.train_loss:.4g} "
                       f"(bound {run.bound:.4g}).", run=index)
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


def _loop(driver: Packed, runs: list[Run], states: list[RunState], histories: list[list[dict]],
          checkpoints: list[checkpoint.Checkpointer], cfgs: list[config_lib.RunConfig], *,
          elapsed: list[float], progress: str) -> list[RunState]:
    """:func:`step` until ``rounds`` (the runs share it, as they share ``eval_every`` and
    ``checkpoint_every``; a single run is a pack of one). After each round every run's row gets
    its elapsed time and, every ``eval_every`` rounds and at the end, its held-out scores
    (evaluated together); it is appended to the run's ``metrics.jsonl`` and history (all rows
    of a round, or none: the round is then committed) and reported (a pack: the mean over its
    runs); each run's state is saved every ``checkpoint_every`` rounds and after the last.

    SIGINT or SIGTERM stops at the next round boundary, saves that round and raises
    :class:`Interrupted` (a second SIGINT stops at once: ``KeyboardInterrupt``, saving the last
    committed round). A diverging run raises :class:`Diverged`, naming (in a pack) its folder
    and its last good checkpoint."""
    cfg, log = cfgs[0], runs[0].log
    rounds, every = cfg.federation.rounds, cfg.checkpoint_every
    configs = [config_lib.to_dict(c) for c in cfgs]
    named = (lambda i: "") if len(runs) == 1 else (lambda i: f"{cfgs[i].output_dir}: ")
    first = int(states[0].server.round)
    if first == rounds:
        log(f"{'the run is' if len(runs) == 1 else 'the runs are'} complete at round {rounds}: "
            "nothing to run (extend with --rounds)")
    engine = driver.engine
    server = engine.stack([state.server for state in states])
    clock_start = time.perf_counter()

    def save(server: ServerState, states: list[RunState]) -> None:
        for i, state in enumerate(states):
            own = state._replace(server=engine.run_state(server, i))
            checkpoints[i].save(int(own.server.round), own, config=configs[i],
                                elapsed_s=elapsed[i] + time.perf_counter() - clock_start)

    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(Path(c.output_dir) / metrics_lib.METRICS_FILE, "a"))
                 for c in cfgs]
        report = stack.enter_context(progress_reporter(progress, rounds, first))
        stop = stack.enter_context(_stop_requests(log))
        try:
            for r in range(first + 1, rounds + 1):
                try:
                    new, stepped = step(driver, runs, states, server, r)
                except Diverged as e:
                    raise Diverged(f"{named(e.run)}{e} {_restart_hint(checkpoints[e.run])}",
                                   run=e.run) from None
                scores = driver.evaluate(new) if r % cfg.eval_every == 0 or r == rounds else None
                for i, (_, row) in enumerate(stepped):
                    row["elapsed_s"] = elapsed[i] + time.perf_counter() - clock_start
                    if scores is not None:
                        row.update(scores[i])
                    files[i].write(json.dumps(row) + "\n")
                    files[i].flush()
                    histories[i].append(row)
                server, states = new, [state for state, _ in stepped]  # committed
                report(_mean_row([row for _, row in stepped]))
                halt = stop[:1]  # a signal from here on stops after the next round
                if (every and r % every == 0) or r == rounds or halt:
                    save(server, states)
                if halt:
                    raise Interrupted(halt[0], r)
        except KeyboardInterrupt:
            if checkpoint.is_alive(server):  # else the interrupted round consumed its buffers
                save(server, states)
            for c, saved in zip(cfgs, checkpoints):
                log(f"interrupted: resume from the checkpoint of round {saved.latest_round()} "
                    f"with 'fedlora-jax run --resume --output-dir {c.output_dir}'")
            raise
    return [state._replace(server=engine.run_state(server, i)) for i, state in enumerate(states)]


def _mean_row(rows: list[dict]) -> dict:
    """A lone run's row, or the mean over the runs of each numeric column every row has
    (progress of a pack)."""
    if len(rows) == 1:
        return rows[0]
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]
            if all(isinstance(row.get(key), (int, float)) for row in rows)}


def _start(setup: Setup, fresh: RunState, checkpoints: checkpoint.Checkpointer, config: dict,
           changed: dict, *, resume: bool, log, scores: dict | None
           ) -> tuple[RunState, list[dict], float]:
    """-> ``(state, metrics rows, elapsed seconds)`` to run from: the newest good checkpoint
    (restored into the structure of ``fresh``; ``metrics.jsonl`` truncated to its round), or
    ``fresh`` with its held-out ``scores`` (row entries; ``None`` on resume). Records the config
    the run continues or starts with."""
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
