"""Checkpoints of a run with orbax: the engine's :class:`~fedlora_jax.engine.ServerState` (global
trainables, server optimizer state, round, PRNG key, simulated clock), the host-side state of the
run's strategy (a pytree of arrays: its estimates and current plan), the elapsed host time and
the config the run had at that round.

One checkpoint per saved round, under ``OUTPUT_DIR/checkpoints/<round>``. orbax writes each into a
temporary directory and renames it when complete, so a save that dies midway leaves the previous
checkpoint as the latest one. Then the SHA-256 of every file of the checkpoint goes to
``<round>/sha256.json``: a checkpoint damaged afterwards (a truncated file, flipped bits) fails
that check before orbax reads it, and :meth:`Checkpointer.restore_latest_good` falls back to the
newest one that verifies and restores. The round is also the metrics offset: on resume,
``metrics.jsonl`` keeps its rows up to that round (:func:`fedlora_jax.metrics.truncate`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from fedlora_jax.engine import ServerState


def _to_saved(state: ServerState) -> ServerState:
    """Typed PRNG keys are not arrays orbax can write: store their raw ``uint32`` data."""
    return state.replace(key=jax.random.key_data(state.key))


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


def is_alive(state: ServerState) -> bool:
    """False when a donated buffer of ``state`` was consumed (an interrupted round)."""
    return not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))


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

    def save(self, state: ServerState, host, *, elapsed_s: float, config: dict | None = None
             ) -> int:
        """Writes ``state``, the ``host`` pytree, the elapsed wall time and the run's ``config``
        as the checkpoint of ``state``'s round (once: a round already saved is kept)."""
        step = int(state.round)
        if step not in self._manager.all_steps():
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_saved(state)), host=ocp.args.StandardSave(host),
                meta=ocp.args.JsonSave({"round": step, "elapsed_s": elapsed_s, "config": config})))
            folder = self._step_dir(step)
            (folder / HASHES).write_text(json.dumps(file_hashes(folder)))
        return step

    def _step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def restore(self, template: ServerState, host_template, step: int | None = None
                ) -> tuple[ServerState, object, dict]:
        """Verifies round ``step`` (default: the latest) against its file hashes and restores it
        into the structure, shapes and dtypes of the templates (``engine.init()`` and a fresh host
        pytree); returns ``(state, host, meta)``."""
        step = self.latest_round() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self._manager.directory}; start the run "
                                    "without --resume.")
        verify(self._step_dir(step))
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, (_to_saved(template), host_template))
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract[0]), host=ocp.args.StandardRestore(abstract[1]),
            meta=ocp.args.JsonRestore()))
        key = jax.random.wrap_key_data(restored.state.key, impl=jax.random.key_impl(template.key))
        return restored.state.replace(key=key), restored.host, dict(restored.meta)

    def restore_latest_good(self, template: ServerState, host_template, log=print
                            ) -> tuple[ServerState, object, dict]:
        """:meth:`restore` of the newest checkpoint that restores and verifies. Each newer one
        that fails is reported through ``log`` (round and reason) and moved aside to
        ``damaged-<round>-<time>``, so that the run saves that round again."""
        with _quiet_orbax():
            steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"No checkpoint in {self._manager.directory}; start the run "
                                    "without --resume.")
        failures = []
        for step in steps:
            try:
                with _quiet_orbax():
                    restored = self.restore(template, host_template, step)
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
