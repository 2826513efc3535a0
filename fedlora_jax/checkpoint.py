"""Checkpoints of a run with orbax: the run's state (one pytree: for a training run
:class:`fedlora_jax.train.RunState`, the engine's server state with the strategy's estimates and
plan), the elapsed host time and the config the run had at that round.

One checkpoint per saved round, under ``OUTPUT_DIR/checkpoints/<round>``, holding the items
``state`` (the pytree; typed PRNG keys as their raw ``uint32`` data, Python and numpy scalars as
arrays) and ``meta``. A restore fills the structure of a template state and gives every leaf its
template's kind back (typed key, Python scalar, numpy or jax array), so a resumed run carries
exactly what a fresh one does. orbax writes each checkpoint into a temporary directory and renames
it when complete, so a save that dies midway leaves the previous checkpoint as the latest one.
Then the SHA-256 of every file of the checkpoint goes to ``<round>/sha256.json``: a checkpoint
damaged afterwards (a truncated file, flipped bits) fails that check before orbax reads it, and
:meth:`Checkpointer.restore_latest_good` falls back to the newest one that verifies and restores.
The round is also the metrics offset: on resume, ``metrics.jsonl`` keeps its rows up to that round
(:func:`fedlora_jax.metrics.truncate`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

# Earlier versions saved the strategy's state as a second item beside ``state``; its layout differs.
OLD_ITEM = "host"


def _is_key(leaf) -> bool:
    return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _to_saved(state):
    """Leaves orbax can write: typed PRNG keys as their raw data, host scalars as numpy arrays."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else
                        x if isinstance(x, jax.Array) else np.asarray(x), state)


def _like(template, restored):
    """A restored leaf as the kind of its template leaf."""
    if _is_key(template):
        return jax.random.wrap_key_data(restored, impl=jax.random.key_impl(template))
    if isinstance(template, (bool, int, float)):
        return type(template)(restored)
    return np.asarray(restored) if isinstance(template, np.ndarray) else restored


HASHES = "sha256.json"


def file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (but the hash list), by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != HASHES}


def verify(folder: Path) -> None:
    """Raises :class:`CheckpointError` naming the first file of checkpoint ``folder`` that is
    missing or differs from the hash saved with it (nothing is checked without a hash list)."""
    listed = folder / HASHES
    if not listed.is_file():
        return
    try:
        saved = json.loads(listed.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"its hash list {HASHES} is damaged") from None
    now = file_hashes(folder)
    for name, digest in saved.items():
        if now.get(name) != digest:
            raise CheckpointError(f"{name} is missing" if name not in now else
                                  f"{name} differs from its SHA-256 saved with the checkpoint")


def check_layout(directory: Path) -> None:
    """Refuses in one line (:class:`CheckpointError`) the checkpoints in ``directory`` that an
    earlier version wrote in another layout (a second item, ``host``); it reads no array."""
    old = sorted((int(p.parent.name) for p in Path(directory).glob(f"*/{OLD_ITEM}")
                  if p.parent.name.isdigit()), reverse=True)
    if old:
        raise CheckpointError(f"The checkpoint of round {old[0]} in {directory} was written by "
                              "an earlier fedlora-jax, whose layout this version does not read: "
                              "finish that run with the earlier version, or start it again with "
                              "--overwrite.")


def is_alive(state) -> bool:
    """False when a donated device buffer of ``state`` was consumed (an interrupted round)."""
    return not any(isinstance(leaf, jax.Array) and leaf.is_deleted()
                   for leaf in jax.tree.leaves(state))


class CheckpointError(ValueError):
    """No checkpoint of the run restores and verifies."""


class Checkpointer:
    """Saves and restores run states in ``directory``, keeping the last ``max_to_keep``."""

    def __init__(self, directory: str | Path, max_to_keep: int = 2):
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        with _quiet_orbax():  # a damaged checkpoint's metadata is reported on restore
            self._manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    @property
    def directory(self) -> Path:
        return Path(self._manager.directory)

    def latest_round(self) -> int | None:
        """The round of the newest complete checkpoint (``None`` if there is none)."""
        return self._manager.latest_step()

    def save(self, round: int, state, *, elapsed_s: float, config: dict | None = None) -> int:
        """Writes the run's ``state`` pytree, the elapsed wall time and the run's ``config`` as the
        checkpoint of ``round`` (once: a round already saved is kept); returns ``round``."""
        if round not in self._manager.all_steps():
            self._manager.save(round, args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_saved(state)),
                meta=ocp.args.JsonSave({"round": round, "elapsed_s": elapsed_s, "config": config})))
            folder = self._step_dir(round)
            (folder / HASHES).write_text(json.dumps(file_hashes(folder)))
        return round

    def _step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def restore(self, template, step: int | None = None) -> tuple[object, dict]:
        """Verifies round ``step`` (default: the latest) against its file hashes and restores it
        into the structure, shapes and dtypes of ``template`` (a fresh state of the run); returns
        ``(state, meta)``."""
        step = self.latest_round() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self._manager.directory}; start the run "
                                    "without --resume.")
        verify(self._step_dir(step))
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saved(template))
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return jax.tree.map(_like, template, restored.state), dict(restored.meta)

    def restore_latest_good(self, template, log=print) -> tuple[object, dict]:
        """:meth:`restore` of the newest checkpoint that restores and verifies. Each newer one
        that fails is reported through ``log`` (round and reason) and moved aside to
        ``damaged-<round>-<time>``, so that the run saves that round again. Checkpoints of an
        earlier version (another layout, not damage) are refused and left as they are."""
        with _quiet_orbax():
            steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"No checkpoint in {self._manager.directory}; start the run "
                                    "without --resume.")
        check_layout(self.directory)
        failures = []
        for step in steps:
            try:
                with _quiet_orbax():
                    restored = self.restore(template, step)
            except Exception as e:  # noqa: BLE001 - any failure to read a checkpoint is damage
                reason = _first_line(e)
                failures.append(f"round {step}: {reason}")
                log(f"checkpoint of round {step} is damaged ({reason}); "
                    + ("falling back to an older one" if step != steps[-1] else "none left"))
                continue
            damaged = steps[:steps.index(step)]
            for bad in damaged:  # kept for inspection, out of orbax's way: the round saves again
                self._step_dir(bad).rename(self.directory / f"damaged-{bad}-{time.time_ns()}")
            if damaged:
                self._manager.reload()
            return restored
        raise CheckpointError(f"No checkpoint in {self._manager.directory} restores ("
                              + "; ".join(failures) + "): start the run again without --resume "
                              "(--overwrite).")

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _first_line(error: Exception, limit: int = 160) -> str:
    text = (str(error).strip().splitlines() or [""])[0] or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


@contextlib.contextmanager
def _quiet_orbax():
    """Silences orbax's and absl's error logs while a possibly damaged checkpoint is read: the
    failure is reported in one line by the caller."""
    loggers = [logging.getLogger(name) for name in ("absl", "orbax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
