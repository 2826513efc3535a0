"""Checkpoints of a run with orbax: the engine's :class:`~fedlora_jax.engine.ServerState` (global
trainables, server optimizer state, round, PRNG key, simulated clock), the host-side state of the
run's strategy (a pytree of arrays: its estimates and current plan) and the elapsed host time.

One checkpoint per saved round, under ``OUTPUT_DIR/checkpoints/<round>``. orbax writes each into a
temporary directory and renames it when complete, so a save that dies midway leaves the previous
checkpoint as the latest one. The round is also the metrics offset: on resume, ``metrics.jsonl``
keeps its rows up to that round (:func:`fedlora_jax.metrics.truncate`).
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from fedlora_jax.engine import ServerState


def _to_saved(state: ServerState) -> ServerState:
    """Typed PRNG keys are not arrays orbax can write: store their raw ``uint32`` data."""
    return state.replace(key=jax.random.key_data(state.key))


def is_alive(state: ServerState) -> bool:
    """False when a donated buffer of ``state`` was consumed (an interrupted round)."""
    return not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))


class Checkpointer:
    """Saves and restores run states in ``directory``, keeping the last ``max_to_keep``."""

    def __init__(self, directory: str | Path, max_to_keep: int = 2):
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def latest_round(self) -> int | None:
        """The round of the newest complete checkpoint (``None`` if there is none)."""
        return self._manager.latest_step()

    def save(self, state: ServerState, host, *, elapsed_s: float) -> int:
        """Writes ``state``, the ``host`` pytree and the elapsed wall time as the checkpoint of
        ``state``'s round (once: a round already saved is kept)."""
        step = int(state.round)
        if step not in self._manager.all_steps():
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_saved(state)),
                host=ocp.args.StandardSave(host),
                meta=ocp.args.JsonSave({"round": step, "elapsed_s": elapsed_s})))
        return step

    def restore(self, template: ServerState, host_template, step: int | None = None
                ) -> tuple[ServerState, object, dict]:
        """Restores round ``step`` (default: the latest) into the structure, shapes and dtypes of
        the templates (``engine.init()`` and a fresh host pytree); returns
        ``(state, host, {"round", "elapsed_s"})``."""
        step = self.latest_round() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self._manager.directory}; start the run "
                                    "without --resume.")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, (_to_saved(template), host_template))
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract[0]), host=ocp.args.StandardRestore(abstract[1]),
            meta=ocp.args.JsonRestore()))
        key = jax.random.wrap_key_data(restored.state.key, impl=jax.random.key_impl(template.key))
        return restored.state.replace(key=key), restored.host, dict(restored.meta)

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
