"""Packed runs: R runs as one compiled program equal the same runs done one by one; one compile
whatever each run's participants; what does not pack is refused."""

import chex
import jax
import numpy as np
import pytest

from fedlora_jax.client import ClientConfig, split_model
from fedlora_jax.data.pool import ClientPool
from fedlora_jax.engine import FederatedEngine, FederationConfig, PackedEngine
from fedlora_jax.optim import OptimizerConfig
from fedlora_jax.strategies import hetlora
from fedlora_jax.tasks import classification_loss
from tests import compile_cache
from tests.conftest import random_pool, tiny_lora_model
from tests.test_engine import _counting_loss

SEEDS, RATES = (0, 1, 2, 3), (0.1, 0.3)


def _pool(seed: int, size: int, num_clients: int = 12, seq_len: int = 8) -> ClientPool:
    """``size`` random examples split raggedly among the clients, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 64, (size, seq_len)).astype(np.int32)
    ex = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids[:, 0] % 3}
    cuts = np.sort(rng.choice(np.arange(1, size), num_clients - 1, replace=False))
    return ClientPool.from_partition(ex, np.split(rng.permutation(size), cuts))


def _engine(seed, lr, server_lr=1.0, loss=classification_loss, parts=None, **fed):
    """A run of its own: the seed draws its base model, adapter and data (pools of different
    sizes for the two rates, so a pack pads them; the runs alone of one rate compile the same
    program, which the compile cache then serves); the server steps with momentum, so its state
    and rate matter too. (Adam, on clients or server, turns the round-off of near-zero gradients
    into visible differences, as it does between two chunk sizes of one run alone.)"""
    parts = parts or split_model(tiny_lora_model(rank=4, seed=seed))
    fed = {"chunk_size": 4, "participants": 5.0, "seed": seed, **fed}
    pool = _pool(seed, 60 + 10 * RATES.index(lr))
    return FederatedEngine(parts, pool, loss, client=ClientConfig(2, 4),
                           client_optimizer=OptimizerConfig("sgd", lr, weight_decay=0.01),
                           server_optimizer=OptimizerConfig("momentum", server_lr),
                           federation=FederationConfig(**fed))


def _plans(engines, round):
    """FedIT's plan (full rank) for the even runs, FSLoRA's (half rank) for the odd ones; ``q``
    changes every round, so the runs' participant counts differ."""
    n = engines[0].num_clients
    q = lambda r: np.clip(np.linspace(0.1, 0.9, n) + 0.1 * ((r + round) % 3), 0.05, 1.0)
    return [(q(r).astype(np.float32), np.full(n, 4 if r % 2 == 0 else 2))
            for r in range(len(engines))]


def _max_relative_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))
                     / max(float(np.max(np.abs(np.asarray(y)))), 1e-30))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_packed_runs_equal_the_runs_one_by_one():
    """4 seeds x 2 client learning rates (server rates differ too), FedIT's and FSLoRA's plans,
    2 rounds; every run's state, results and held-out scores match its run alone."""
    compile_cache.enable()
    specs = [(seed, lr, 0.5 + seed / 4) for seed in SEEDS for lr in RATES]
    engines = [_engine(*spec) for spec in specs]
    packed = PackedEngine(engines)
    state = packed.init([seed for seed, _, _ in specs])
    alone = [e.init() for e in engines]
    heldout = [e.pool.examples for e in engines]  # pools of different sizes: padded batches
    for round in range(2):
        plans = _plans(engines, round)
        state, results = packed.run_round(state, plans)
        for r, (engine, (q, k)) in enumerate(zip(engines, plans)):
            alone[r], expected = engine.run_round(alone[r], q, k)
            got = results[r]
            np.testing.assert_array_equal(got.participants, expected.participants)
            np.testing.assert_allclose(got.clients.update_sq_norm,
                                       expected.clients.update_sq_norm, rtol=1e-5)
            assert got.train_loss == pytest.approx(expected.train_loss, rel=1e-5)
            assert got.applied_sq_norm == pytest.approx(expected.applied_sq_norm, rel=1e-4)
            assert got.times == pytest.approx(expected.times, rel=1e-6)
            assert got.uplink_params == expected.uplink_params
    counts = {r.participants.size for r in results}
    assert len(counts) > 1  # the runs trained different numbers of clients in the same calls
    for r, engine in enumerate(engines):
        own = packed.run_state(state, r)
        chex.assert_trees_all_close(own.trainable, alone[r].trainable, atol=1e-6, rtol=1e-5)
        chex.assert_trees_all_close(own.opt_state, alone[r].opt_state, atol=1e-6, rtol=1e-5)
        assert int(own.round) == 2 and float(own.clock) == pytest.approx(float(alone[r].clock))
        np.testing.assert_array_equal(jax.random.key_data(own.key),
                                      jax.random.key_data(alone[r].key))
    scores = packed.evaluate(state, heldout, batch_size=16)
    for r, engine in enumerate(engines):
        assert scores[r] == pytest.approx(engine.evaluate(alone[r], heldout[r], 16), rel=1e-5)
    # the runs do differ from one another (a pack that ran one run R times would pass the above)
    assert _max_relative_diff(packed.run_state(state, 0).trainable,
                              packed.run_state(state, 1).trainable) > 1e-3
    print("max relative difference, packed vs alone:", max(
        _max_relative_diff(packed.run_state(state, r).trainable, alone[r].trainable)
        for r in range(len(engines))))


def test_one_compile_for_the_pack_whatever_the_participants():
    """A shared base (one pretrained model for every run): rounds with different participant
    counts per run, empty runs and rounds with no participant at all trace the model once."""
    loss, traces = _counting_loss()
    parts = split_model(tiny_lora_model(rank=4, seed=0))
    engines = [_engine(seed, lr, loss=loss, parts=parts) for seed in (0, 1) for lr in RATES]
    packed = PackedEngine(engines)
    assert packed.base is not None and jax.tree.leaves(packed.base)[0].ndim == 2  # not stacked
    state = packed.init([0, 1, 2, 3])
    n = engines[0].num_clients
    counts = []
    for round, qs in enumerate([(0.5, 0.9, 0.2, 1.0), (1e-6, 1.0, 1e-6, 0.3),
                                (1e-6,) * 4, (1.0, 0.05, 0.6, 0.4)]):
        plans = [(np.full(n, q, np.float32), None) for q in qs]
        state, results = packed.run_round(state, plans)
        counts.append(tuple(r.participants.size for r in results))
        if round == 0:
            compiled = len(traces)
    assert compiled > 0 and len(traces) == compiled
    assert (0, 0, 0, 0) in counts and len(set(counts)) == len(counts)
    assert int(packed.run_state(state, 2).round) == 4


def test_what_does_not_pack_is_refused():
    parts = split_model(tiny_lora_model(rank=4, seed=0))
    with pytest.raises(ValueError, match="Run 1 differs from run 0 in the aggregation rule"):
        PackedEngine([_engine(0, 0.1, parts=parts),
                      FederatedEngine(parts, random_pool(seed=1), classification_loss,
                                      rule=hetlora.rule())])
    with pytest.raises(ValueError, match="Run 1 differs from run 0 in the chunk size and mesh"):
        PackedEngine([_engine(0, 0.1, parts=parts), _engine(1, 0.1, parts=parts,
                                                            chunk_size=16)])
    with pytest.raises(ValueError, match="in the optimizers .but their learning rates."):
        PackedEngine([_engine(0, 0.1, parts=parts),
                      FederatedEngine(parts, random_pool(seed=1), classification_loss,
                                      client=ClientConfig(2, 4),
                                      client_optimizer=OptimizerConfig("adamw", 0.1),
                                      server_optimizer=OptimizerConfig("momentum", 1.0),
                                      federation=FederationConfig(chunk_size=4))])


# ------------------------------------------------------------------------------ packed training

RUNS = ((3, "fedit", 0.05), (4, "fslora", 0.1))


def _configs(root, runs=RUNS, rounds=2):
    from fedlora_jax.config import load_config

    return [load_config(overrides=[f"federation.rounds={rounds}", "eval_every=1",
                                   "checkpoint_every=1", f"strategy={strategy}",
                                   f"federation.seed={seed}",
                                   f"client_optimizer.learning_rate={lr}",
                                   f"output_dir={root / f'{strategy}_s{seed}_lr{lr}'}"],
                        preset="tiny")
            for seed, strategy, lr in runs]


def _without_time(rows):
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]


def test_packed_training_writes_each_run_as_alone(tmp_path):
    """Two runs of the tiny preset (seeds, strategies of one rule and client rates differ): each
    run's folder holds what the run alone writes, its rows equal the run alone's, and a packed
    run resumes alone."""
    import json

    from fedlora_jax import train as train_lib

    compile_cache.enable()
    quiet = lambda *_: None
    cfgs = _configs(tmp_path / "packed")
    assert len({train_lib.pack_key(cfg) for cfg in cfgs}) == 1
    packed = train_lib.train_packed(cfgs, log=quiet)
    alone_cfgs = _configs(tmp_path / "alone")
    for cfg, alone_cfg, rows in zip(cfgs, alone_cfgs, packed):
        expected = train_lib.train(alone_cfg, progress="none", log=quiet)
        got, want = _without_time(rows), _without_time(expected)
        assert [r.keys() for r in got] == [r.keys() for r in want]
        for g, w in zip(got, want):
            assert g == pytest.approx(w, rel=1e-5, abs=1e-6), cfg.output_dir
        folder, alone_folder = tmp_path / "packed" / cfg.output_dir.split("/")[-1], \
            tmp_path / "alone" / alone_cfg.output_dir.split("/")[-1]
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            p.name for p in alone_folder.iterdir())
        assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["1", "2"]
        assert _without_time(json.loads(line) for line in
                             (folder / "metrics.jsonl").read_text().splitlines()) == got
    assert packed[0][-1]["eval_loss"] != packed[1][-1]["eval_loss"]  # the runs differ
    # a packed run's checkpoint resumes alone, as its own run's would
    extended = _configs(tmp_path / "packed", RUNS[:1], rounds=3)[0]
    resumed = train_lib.train(extended, progress="none", log=quiet, resume=True)
    assert [r["round"] for r in resumed] == [0, 1, 2, 3]
    assert _without_time(resumed[:3]) == _without_time(packed[0])


def test_packing_refuses_mixed_runs_before_writing(tmp_path):
    from fedlora_jax import train as train_lib

    cfgs = _configs(tmp_path, ((3, "fedit", 0.05), (3, "hetlora", 0.05)))
    assert train_lib.pack_key(cfgs[0]) != train_lib.pack_key(cfgs[1])
    with pytest.raises(train_lib.NotPackable, match="group them by train.pack_key"):
        train_lib.train_packed(cfgs, log=lambda *_: None)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------- commands

def _tagged_rows(path):
    import json

    return sorted((_without_time([json.loads(line)])[0] for line in path.read_text().splitlines()),
                  key=lambda r: (r["strategy"], r["seed"], r["round"]))


def test_compare_packs_both_stages(tmp_path, capsys):
    from fedlora_jax.cli import main

    compile_cache.enable()
    out = tmp_path / "cmp"
    assert main(["compare", "--preset", "tiny", "--rounds", "1", "--strategies", "fedit,fslora",
                 "--reference", "fslora", "--seeds", "3", "--tune-seeds", "7", "--lr-grid",
                 "0.05", "--output-dir", str(out)]) == 0
    assert capsys.readouterr().out.count("compare: 2 runs packed into one program") == 2
    rows = _tagged_rows(out / "metrics.jsonl")
    assert [(r["strategy"], r["round"]) for r in rows] == [("fedit", 0), ("fedit", 1),
                                                           ("fslora", 0), ("fslora", 1)]
    assert rows[0]["eval_accuracy"] == rows[2]["eval_accuracy"]  # one seed, one world
    assert 0 < rows[3]["sim_clock_s"] < rows[1]["sim_clock_s"]  # smaller sketches
    for run in ("fedit/seed3", "fslora/seed3", "tuning/fedit/lr0.05_slr1/seed7"):
        assert (out / run / "checkpoints" / "1").is_dir(), run


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ["compare", "--preset", "tiny", "--rounds", "2", "--strategies", "fedit,fslora",
     "--reference", "fslora", "--seeds", "3,4", "--tune-seeds", "7", "--lr-grid", "0.05,0.1"],
    ["sweep", "--grid", "strategy=fedit,fslora", "--grid", "participants=2,4", "--rounds", "2",
     "--set", "eval_every=1"]], ids=["compare", "sweep"])
def test_packed_commands_equal_no_pack(tmp_path, capsys, command):
    from fedlora_jax.cli import main

    compile_cache.enable()
    assert main([*command, "--output-dir", str(tmp_path / "packed")]) == 0
    assert "runs packed into one program" in capsys.readouterr().out
    assert main([*command, "--output-dir", str(tmp_path / "alone"), "--no-pack"]) == 0
    assert "packed" not in capsys.readouterr().out
    files = ("tuning.jsonl", "metrics.jsonl") if command[0] == "compare" else ()
    for name in files:
        packed, alone = (_tagged_rows(tmp_path / side / name) for side in ("packed", "alone"))
        assert len(packed) == len(alone) > 0
        for p, a in zip(packed, alone):
            assert p == pytest.approx(a, rel=1e-5, abs=1e-6)
    if command[0] == "sweep":
        import json

        rows = {side: [{k: v for k, v in r.items() if k != "wall_s"} for r in
                       json.loads((tmp_path / side / "sweep.json").read_text())]
                for side in ("packed", "alone")}
        assert len(rows["packed"]) == 4 and len({r["seed"] for r in rows["packed"]}) == 4
        for p, a in zip(rows["packed"], rows["alone"]):
            assert p == pytest.approx(a, rel=1e-5, abs=1e-6)


def test_train_all_builds_an_unpackable_group_once(tmp_path, monkeypatch):
    """FedSA-LoRA's runs share a pack key but not a program (a personalized rule): train_all
    builds each run once, finds the pack refused, and trains the built runs one by one, each as
    its run alone would."""
    from fedlora_jax import train as train_lib

    compile_cache.enable()
    quiet = lambda *_: None
    cfgs = _configs(tmp_path / "all", ((3, "fedsa", 0.05), (4, "fedsa", 0.1)), rounds=1)
    assert len({train_lib.pack_key(cfg) for cfg in cfgs}) == 1
    build, built = train_lib.build, []
    monkeypatch.setattr(train_lib, "build", lambda cfg: built.append(cfg) or build(cfg))
    lines = []
    results = train_lib.train_all(cfgs, log=lines.append)
    assert len(built) == 2 and any(line.startswith("not packed") for line in lines)
    monkeypatch.undo()
    for rows, cfg in zip(results, _configs(tmp_path / "alone", ((3, "fedsa", 0.05),
                                                                 (4, "fedsa", 0.1)), rounds=1)):
        assert _without_time(rows) == _without_time(train_lib.train(cfg, progress="none",
                                                                    log=quiet))


def test_packed_flexlora_equals_its_runs_alone(tmp_path):
    """FlexLoRA packs (its server SVD a loop of one-matrix SVDs under vmap, below): 2 seeds x 2
    client steps, 2 rounds; every run's metrics match its run alone's."""
    from fedlora_jax import train as train_lib

    compile_cache.enable()
    specs = ((3, "flexlora", 0.05), (4, "flexlora", 0.1))
    lines = []
    packed = train_lib.train_all(_configs(tmp_path / "packed", specs, rounds=2), log=lines.append)
    assert lines[0].startswith("2 runs packed into one program")
    alone = train_lib.train_all(_configs(tmp_path / "alone", specs, rounds=2), pack=False,
                                log=lambda *_: None)
    for p, a in zip(packed, alone):
        assert len(p) == len(a) == 3
        for got, expected in zip(_without_time(p), _without_time(a)):
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert _without_time(packed[0]) != _without_time(packed[1])  # the runs differ


def test_a_packed_svd_is_a_loop_of_one_matrix_svds():
    """FlexLoRA's server SVD under vmap (packed runs) equals each run's own SVD bitwise and
    lowers to one-matrix LAPACK calls: jaxlib's batched CPU SVD waits on XLA's intra-op pool from
    a thread of that pool, and two at once deadlocked a packed MiniLM round on 2 cores."""
    from fedlora_jax.aggregation import truncated_svd_factors

    w = jax.random.normal(jax.random.key(0), (3, 12, 10))
    one = jax.jit(lambda w: truncated_svd_factors(w, 4))
    packed = jax.jit(jax.vmap(lambda w: truncated_svd_factors(w, 4)))
    for r, factors in enumerate(zip(*packed(w))):
        for got, want in zip(factors, one(w[r])):
            np.testing.assert_array_equal(got, want)
    program = packed.lower(w).as_text()
    assert "lapack_sgesdd" in program and 'num_batch_dims = "0"' in program
    assert 'num_batch_dims = "1"' not in program
