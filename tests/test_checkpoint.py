"""Checkpoint and resume: a stopped and resumed run equals an uninterrupted one, bitwise on CPU."""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fedlora_jax import metrics
from fedlora_jax.checkpoint import Checkpointer
from fedlora_jax.config import load_config
from fedlora_jax.engine import FederatedEngine
from fedlora_jax.train import train
from tests import compile_cache

pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided")

K = 2  # a run of 2K rounds against K rounds, stopped, then resumed


@pytest.fixture(scope="module", autouse=True)
def _cache():
    compile_cache.enable()


def _cfg(out, **settings):
    # ``adaptive`` plans from estimates learned in the first K rounds: resuming must restore them.
    sets = {"output_dir": out, "strategy": "adaptive", "federation.rounds": 2 * K,
            "data.num_clients": 8,
            "eval_every": K, "checkpoint_every": 0, **settings}
    return load_config(preset="tiny", overrides=[f"{k}={v}" for k, v in sets.items()])


def _quiet(cfg, **kw):
    return train(cfg, progress="none", log=lambda line: None, **kw)


def _without_host_time(rows):
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]


def _saved_arrays(run_dir, step):
    """The raw arrays of a saved state (no template needed)."""
    tree = ocp.PyTreeCheckpointer().restore(run_dir / "checkpoints" / str(step) / "state")
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return out, _quiet(_cfg(out))


def _assert_same_run(run_dir, reference):
    ref_dir, ref_rows = reference
    assert _without_host_time(metrics.read_rows(run_dir)) == _without_host_time(ref_rows)
    for a, b in zip(_saved_arrays(run_dir, 2 * K), _saved_arrays(ref_dir, 2 * K), strict=True):
        np.testing.assert_array_equal(a, b)


def test_ctrl_c_saves_and_resume_is_exact(tmp_path, monkeypatch, uninterrupted):
    run_round = FederatedEngine.run_round

    def interrupted(self, state, *args, **kw):
        if int(state.round) == K:
            raise KeyboardInterrupt
        return run_round(self, state, *args, **kw)

    monkeypatch.setattr(FederatedEngine, "run_round", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _quiet(_cfg(tmp_path))
    monkeypatch.undo()
    with Checkpointer(tmp_path / "checkpoints") as saved:
        assert saved.latest_round() == K  # saved on Ctrl-C (checkpoint_every=0)
    assert [row["round"] for row in metrics.read_rows(tmp_path)] == list(range(K + 1))

    rows = _quiet(_cfg(tmp_path), resume=True)
    assert [row["round"] for row in rows] == list(range(2 * K + 1))
    _assert_same_run(tmp_path, uninterrupted)


def test_save_killed_midway_resumes_from_last_good(tmp_path, monkeypatch, uninterrupted):
    """The save of round 2K dies after writing the state and before its metadata: orbax never
    renamed its temporary directory, so round K stays the latest checkpoint."""
    json_save = ocp.handlers.JsonCheckpointHandler.async_save

    async def dies_at_the_end(self, directory, item=None, args=None):
        if args.item["round"] == 2 * K:
            raise RuntimeError("killed during save")
        return await json_save(self, directory, item, args)

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "async_save", dies_at_the_end)
    with pytest.raises(RuntimeError, match="killed during save"):
        _quiet(_cfg(tmp_path, checkpoint_every=K))
    monkeypatch.undo()
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert str(K) in leftovers and str(2 * K) not in leftovers, leftovers
    with Checkpointer(tmp_path / "checkpoints") as saved:
        assert saved.latest_round() == K

    _quiet(_cfg(tmp_path, checkpoint_every=K), resume=True)
    _assert_same_run(tmp_path, uninterrupted)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="without --resume"):
        with Checkpointer(tmp_path / "none") as saved:
            saved.restore(template=None, host_template=None)
