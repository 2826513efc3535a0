"""Checkpoint and resume: a stopped and resumed run equals an uninterrupted one, bitwise on CPU."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fedlora_jax import metrics
from fedlora_jax.checkpoint import HASHES, CheckpointError, Checkpointer
from fedlora_jax.config import load_config
from fedlora_jax.engine import PackedEngine
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
    run_round = PackedEngine.run_round  # a run alone: its engine's pack of one

    def interrupted(self, state, *args, **kw):
        if int(state.round) == K:
            raise KeyboardInterrupt
        return run_round(self, state, *args, **kw)

    monkeypatch.setattr(PackedEngine, "run_round", interrupted)
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
            saved.restore(template=None)


@pytest.fixture(scope="module")
def saved_every_k(tmp_path_factory):
    """A finished 2K-round run with checkpoints at rounds K and 2K, copied by each corruption."""
    out = tmp_path_factory.mktemp("every_k")
    _quiet(_cfg(out, checkpoint_every=K))
    return out


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_bits(path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data), max(1, len(data) // 7)):
        data[i] ^= 0b1010_0101
    path.write_bytes(bytes(data))


def _largest_data_file(state_dir):
    """The largest file of the OCDBT store that orbax reads (``d/``; per-process folders are
    merged into it when the save completes)."""
    return max((state_dir / "d").iterdir(), key=lambda p: p.stat().st_size)


def _unlisted(damage):
    """``damage`` to a checkpoint without its hash list (a save killed before writing it): orbax's
    own failure to read it is the evidence."""
    def damage_unlisted(ck):
        (ck / HASHES).unlink()
        damage(ck)
    return damage_unlisted


@pytest.mark.parametrize("damage", [
    lambda ck: _truncate(ck / "state" / "_METADATA"),
    lambda ck: _truncate(ck / "state" / "manifest.ocdbt"),
    lambda ck: _flip_bits(_largest_data_file(ck / "state")),
    lambda ck: _truncate(ck / "meta" / "metadata"),
    _unlisted(lambda ck: _truncate(ck / "state" / "_METADATA")),
    _unlisted(lambda ck: _truncate(ck / "state" / "manifest.ocdbt")),
], ids=["truncated-metadata", "truncated-manifest", "flipped-bits", "truncated-meta",
        "unlisted-truncated-metadata", "unlisted-truncated-manifest"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(damage, saved_every_k, tmp_path,
                                                              uninterrupted):
    run = tmp_path / "run"
    shutil.copytree(saved_every_k, run)
    damage(run / "checkpoints" / str(2 * K))
    lines = []
    train(_cfg(run, checkpoint_every=K), progress="none", log=lines.append, resume=True)
    said = "\n".join(lines)
    assert f"checkpoint of round {2 * K} is damaged (" in said, said
    assert f"resumed from the checkpoint of round {K}" in said
    assert [p.name.split("-")[1] for p in (run / "checkpoints").glob("damaged-*")] == [str(2 * K)]
    _assert_same_run(run, uninterrupted)


def test_no_checkpoint_that_verifies_is_one_clear_error(saved_every_k, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved_every_k, run)
    for step in (K, 2 * K):
        _flip_bits(_largest_data_file(run / "checkpoints" / str(step) / "state"))
    with pytest.raises(CheckpointError, match="No checkpoint in .* restores .*round 2"):
        _quiet(_cfg(run, checkpoint_every=K), resume=True)


SIGNAL_ROUNDS = 8  # the resumed run's length; the signal comes after round 1 of a 200-round run


@pytest.fixture(scope="module")
def uninterrupted_8(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight8")
    return out, _quiet(_cfg(out, **{"federation.rounds": SIGNAL_ROUNDS}))


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_run_saves_the_round_then_resume_is_exact(signum, code, tmp_path,
                                                              uninterrupted_8):
    """A scheduler's SIGTERM or a Ctrl-C during round 2 of a CLI run: the round finishes, is
    saved, an ``interrupted`` event is printed and the process exits 128 + signal; resuming (to
    fewer rounds than first asked: an allowed change) equals an uninterrupted run."""
    cfg = _cfg(tmp_path, **{"federation.rounds": 200})
    args = [f"--set={k}={v}" for k, v in (("strategy", "adaptive"), ("data.num_clients", 8),
                                          ("eval_every", K), ("checkpoint_every", 0))]
    proc = subprocess.Popen([sys.executable, "-m", "fedlora_jax.cli", "run", "--preset", "tiny",
                             "--rounds", "200", "--output-dir", str(tmp_path), "--jsonl", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if json.loads(line).get("round") == 1:
            proc.send_signal(signum)
            break
    rest, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    event = json.loads(rest.splitlines()[-1])
    assert event["event"] == "interrupted" and event["signal"] == signum.name, rest
    stopped = event["checkpoint_round"]
    assert 1 <= stopped < SIGNAL_ROUNDS, f"stopped at round {stopped}: the signal came too late"
    with Checkpointer(tmp_path / "checkpoints") as saved:
        assert saved.latest_round() == stopped
    assert metrics.read_rows(tmp_path)[-1]["round"] == stopped

    resumed = dataclasses.replace(cfg, federation=dataclasses.replace(
        cfg.federation, rounds=SIGNAL_ROUNDS))
    _quiet(resumed, resume=True)
    ref_dir, ref_rows = uninterrupted_8
    assert _without_host_time(metrics.read_rows(tmp_path)) == _without_host_time(ref_rows)
    for a, b in zip(_saved_arrays(tmp_path, SIGNAL_ROUNDS), _saved_arrays(ref_dir, SIGNAL_ROUNDS),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_checkpoint_of_the_earlier_layout_is_refused_and_kept(tmp_path):
    """Earlier versions saved the strategy's estimates and plan as a second item, ``host``,
    beside ``state``: a resume refuses them in one line and leaves them as they are."""
    folder = tmp_path / "checkpoints"
    manager = ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False))
    manager.save(3, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"x": np.zeros(2)}),
        host=ocp.args.StandardSave({"plan": np.ones(2)}), meta=ocp.args.JsonSave({"round": 3})))
    manager.close()
    before = sorted(str(p) for p in folder.rglob("*"))
    with Checkpointer(folder) as saved:
        with pytest.raises(CheckpointError, match="round 3 .*earlier fedlora-jax.*--overwrite") as e:
            saved.restore_latest_good({"x": np.zeros(2)}, log=lambda line: None)
    assert len(str(e.value).splitlines()) == 1
    assert sorted(str(p) for p in folder.rglob("*")) == before
