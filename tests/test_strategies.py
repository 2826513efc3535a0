"""Strategies: registry and bad input, each strategy's defining choice of (q, k), the adaptive
strategy's schedule, estimates and solve, and one real run through ``train``."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedlora_jax import solver, strategies, theory, wireless
from fedlora_jax.config import load_config
from fedlora_jax.strategies.base import tier_ranks

N, R = 12, 8


def _context(q_default=0.25, sketch_ratio=0.5, seed=0):
    system = wireless.SystemConfig()
    profile = wireless.generate_profile(jax.random.key(seed), N, system)
    workload = wireless.workload_from_counts(2e7, 7e4, 256, 2)
    weights = np.random.default_rng(seed).dirichlet(np.ones(N)).astype(np.float32)
    return strategies.Context(rank=R, q_default=q_default, sketch_ratio=sketch_ratio,
                              weights=weights, profile=profile, system=system, workload=workload)


def _estimates(ctx, g2_scale=1.0, signal=0.05):
    g2 = g2_scale * (1.0 + np.arange(N, dtype=np.float32))
    state = theory.GradNormState(mean=jnp.asarray(g2), count=jnp.full(N, 3, jnp.int32))
    return strategies.Estimates(state, signal=signal, reports=3)


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown strategy 'fedavgg'.*Valid strategies: .*adaptive"):
        strategies.get_strategy("fedavgg")
    with pytest.raises(ValueError, match="Valid strategies"):
        load_config(None, ["strategy=nope"])


@pytest.mark.parametrize("name, override, reason", [
    ("fedit", "federation.sketch_ratio=0.25", "FedIT trains and uploads the full rank"),
    ("full", "federation.sketch_ratio=0.25", "full rank"),
    ("fslora", "federation.sketch_ratio=0.25", "compute tier"),
    ("luo", "federation.sketch_ratio=0.25", "does not sketch"),
    ("fedit", "federation.sampling=full", "samples clients 'uniform'"),
    ("adaptive_equal_bw", "bandwidth_allocation=adaptive", None),  # the default: allowed
    ("luo", "bandwidth_allocation=equal", "allocates bandwidth 'adaptive'"),
    ("hetlora", "federation.sketch_ratio=0.25", "compute tier"),
    ("flexlora", "federation.sampling=full", "samples clients 'uniform'"),
    ("flora", "server_optimizer.learning_rate=0.25", "merges the stacked product into the base"),
    ("fedsa", "federation.sketch_ratio=0.25", "FedSA-LoRA trains the full rank"),
])
def test_settings_that_contradict_a_strategy_are_rejected_with_a_reason(name, override, reason):
    if reason is None:
        assert load_config(None, [f"strategy={name}", override]).strategy == name
        return
    with pytest.raises(ValueError, match=f"contradicts strategy '{name}'.*{reason}"):
        load_config(None, [f"strategy={name}", override])


def test_configure_applies_the_pinned_settings():
    cfg = strategies.configure(load_config(None, ["strategy=fedit"]))
    assert (cfg.federation.sampling, cfg.federation.sketch_ratio) == ("uniform", 1.0)
    cfg = strategies.configure(load_config(None, ["strategy=adaptive_equal_bw"]))
    assert (cfg.federation.sampling, cfg.bandwidth_allocation) == ("independent", "equal")
    assert strategies.configure(load_config(None, ["strategy=full"])).federation.sampling == "full"


def test_baseline_plans():
    ctx, est = _context(), _estimates(_context())
    fedit = strategies.get_strategy("fedit").plan(1, ctx, est)
    np.testing.assert_allclose(fedit.q, 0.25)
    np.testing.assert_array_equal(fedit.k, R)
    full = strategies.get_strategy("full").plan(1, ctx, est)
    np.testing.assert_array_equal(full.q, 1.0)
    np.testing.assert_array_equal(full.k, R)
    fixed = strategies.get_strategy("fixed").plan(1, ctx, est)
    np.testing.assert_array_equal(fixed.k, R // 2)  # federation.sketch_ratio = 0.5
    for name in ("fedit", "full", "fixed", "fslora"):
        s = strategies.get_strategy(name)
        assert s.due(1) and not any(s.due(r) for r in range(2, 30))


def test_fslora_tiers_give_the_slowest_clients_the_smallest_ratio():
    speeds = np.array([5.0, 1.0, 3.0, 9.0, 2.0, 7.0])
    k = tier_ranks(speeds, (1 / 8, 1 / 4, 1 / 2), 8)
    np.testing.assert_array_equal(k, [2, 1, 2, 4, 1, 4])
    ctx = _context()
    plan = strategies.get_strategy("fslora").plan(1, ctx, _estimates(ctx))
    np.testing.assert_allclose(plan.q, ctx.q_default)
    order = np.argsort(np.asarray(ctx.profile.flops_per_s))
    assert (np.diff(plan.k[order]) >= 0).all() and set(plan.k) == {1, 2, 4}


def test_adaptive_schedule_pilot_then_every_k_rounds():
    s = strategies.Adaptive(pilot_rounds=2, resolve_every=3)
    assert [r for r in range(1, 13) if s.due(r)] == [1, 3, 6, 9, 12]
    ctx = _context()
    pilot = s.plan(1, ctx, _estimates(ctx))
    np.testing.assert_allclose(pilot.q, ctx.q_default)
    np.testing.assert_array_equal(pilot.k, R)
    with pytest.raises(ValueError, match="exclude each other"):
        strategies.Adaptive(sampling_only=True, sketch_only=True)


@jax.jit
def _objective_terms(problem, q, rho):
    return solver.objective_terms(problem, q, rho, solver.SolverConfig(rank=R))


def _objective(problem, plan):
    """``J`` of ``plan`` on ``problem``, jitted (op by op, the surrogate's loops cost seconds a call)."""
    terms = _objective_terms(problem, jnp.asarray(plan.q), jnp.asarray(plan.k / R, jnp.float32))
    return float(terms["objective"])


def _with_optimizer(ctx, name):
    """``ctx`` with the run's client optimizer, which the strategies read as ``ctx.client_optimizer``."""
    return dataclasses.replace(ctx, client_optimizer=name)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_adaptive_plans_beat_the_uniform_baseline_on_the_model(optimizer):
    """After the pilot, each variant's plan is feasible and its predicted wall-clock
    ``(alpha V + beta) E[T]`` (under the client optimizer's update law) is no worse than uniform
    full-rank sampling's."""
    ctx = _with_optimizer(_context(), optimizer)
    est = _estimates(ctx)
    problem = solver.make_problem(ctx.profile, ctx.system, ctx.workload, est.g2, ctx.weights,
                                  1.0 / est.signal, 1.0, law=theory.update_law(optimizer),
                                  overhead_s=ctx.round_overhead_s)
    objective = functools.partial(_objective, problem)
    uniform = objective(ctx.uniform())
    for name in ("adaptive", "luo", "adaptive_sketch_only"):
        plan = strategies.get_strategy(name).plan(5, ctx, est)
        assert plan.q.shape == plan.k.shape == (N,)
        assert ((plan.q > 0) & (plan.q <= 1)).all() and ((plan.k >= 1) & (plan.k <= R)).all()
        assert objective(plan) <= uniform * (1 + 1e-5), name
        if name == "luo":
            np.testing.assert_array_equal(plan.k, R)
        if name == "adaptive_sketch_only":
            np.testing.assert_allclose(plan.q, ctx.q_default)


def test_adaptive_calibrated_plans_with_its_own_rounds_model():
    """``noise_scale`` multiplies ``alpha = 1/|g|^2`` (so a weight of 1/2 plans as the signal
    doubled: exact in floats) and ``progress_power`` replaces the law's; ``adaptive_calibrated``'s
    plan is no worse than uniform sampling on its calibrated model and differs from ``adaptive``'s."""
    ctx = _with_optimizer(_context(), "adamw")
    est = _estimates(ctx)
    half = strategies.Adaptive(noise_scale=0.5).plan(5, ctx, est)
    doubled = strategies.Adaptive().plan(5, ctx, dataclasses.replace(est, signal=2 * est.signal))
    np.testing.assert_array_equal(half.q, doubled.q)
    np.testing.assert_array_equal(half.k, doubled.k)
    calibrated = strategies.get_strategy("adaptive_calibrated")
    assert (calibrated.noise_scale, calibrated.progress_power) == (
        theory.CALIBRATED_NOISE_SCALE, theory.CALIBRATED_PROGRESS_POWER)
    law = dataclasses.replace(theory.ADAM_LAW, progress_power=theory.CALIBRATED_PROGRESS_POWER)
    assert calibrated.law("adamw") == law and strategies.Adaptive().law("adamw") == theory.ADAM_LAW
    problem = solver.make_problem(ctx.profile, ctx.system, ctx.workload, est.g2, ctx.weights,
                                  theory.CALIBRATED_NOISE_SCALE / est.signal, 1.0, law=law,
                                  overhead_s=ctx.round_overhead_s)
    objective = functools.partial(_objective, problem)
    plan, paper = calibrated.plan(5, ctx, est), strategies.get_strategy("adaptive").plan(5, ctx, est)
    assert objective(plan) <= objective(ctx.uniform()) * (1 + 1e-5)
    assert objective(plan) < objective(paper)  # the options reach the solver
    with pytest.raises(ValueError, match="strategy_options.noise_scale must be a positive number"):
        strategies.Adaptive(noise_scale=0.0)
    with pytest.raises(ValueError, match="strategy_options.progress_power must be a finite number"):
        strategies.Adaptive(progress_power=float("inf"))


def test_observe_estimates_g2_and_signal():
    ctx = _context()
    plan = ctx.uniform(k=4)
    participants = np.array([1, 5])
    sq = np.array([2.0, 6.0], np.float32)
    est = strategies.observe(strategies.init_estimates(N), ctx, plan, participants, sq, 10.0)
    g2 = est.g2
    np.testing.assert_allclose(g2[participants], 0.5 * sq)  # deflated by rho = 4/8
    np.testing.assert_allclose(np.delete(g2, participants), 0.5 * sq.mean())  # unseen: the mean
    v = float(theory.variance_term(jnp.asarray(plan.q), jnp.full(N, 0.5), jnp.asarray(g2),
                                   jnp.asarray(ctx.weights)))
    assert est.signal == pytest.approx(max(10.0 - v, 1.0), rel=1e-5) and est.reports == 1
    empty = strategies.observe(est, ctx, plan, np.zeros(0, np.int64), np.zeros(0), 0.0)
    assert empty.signal == est.signal and empty.reports == 1


def test_observe_with_adam_clients_inflates_norms_and_unshrinks_the_signal():
    """Adam-type clients: ``|delta_S|^2 ~ rho G^2``, so ``G^2 = |delta|^2 / rho``; the applied update's
    mean is ``s = sum a rho`` of the unsketched one, so the signal is ``(|D|^2 - V_adam) / s^2``."""
    ctx = _with_optimizer(_context(), "adamw")
    plan = ctx.uniform(k=2)  # rho = 1/4
    participants = np.array([1, 5])
    sq = np.array([2.0, 6.0], np.float32)
    est = strategies.observe(strategies.init_estimates(N), ctx, plan, participants, sq, 10.0)
    np.testing.assert_allclose(est.g2[participants], 4.0 * sq)
    rho = np.full(N, 0.25)
    a = ctx.weights.astype(np.float64)
    v = np.sum(a * a * est.g2 * (rho / plan.q - rho ** 2))
    s = np.sum(a * rho)
    assert est.signal == pytest.approx(max(10.0 - v, 1.0) / s ** 2, rel=1e-4)


def test_train_follows_the_strategy(tmp_path):
    """A real run: FSLoRA's ranks and uniform sampling reach the engine (uplink and participants)."""
    from fedlora_jax.train import train

    cfg = load_config(None, ["strategy=fslora", "federation.rounds=2",
                             f"output_dir={tmp_path}"], preset="tiny")
    rows = train(cfg, progress="none", log=lambda *_: None)
    assert [r["participants"] for r in rows[1:]] == [4, 4]  # uniform: exactly K
    ratios = (1 / 8, 1 / 4, 1 / 2)
    assert rows[1]["mean_rank"] == pytest.approx(np.mean(tier_ranks(np.arange(16.0), ratios, 4)))
    assert dataclasses.asdict(cfg)["strategy"] == "fslora"


def test_ffa_never_changes_a_and_sends_only_b():
    from fedlora_jax.build import build

    cfg = strategies.configure(load_config(None, ["strategy=ffa"], preset="tiny"))
    setup = build(cfg)
    engine = setup.engine
    kinds = lambda tree: {str(path[-1]) for path, _ in nnx.to_flat_state(tree)}
    assert "lora_a" not in kinds(engine.parts.trainable) and "lora_b" in kinds(engine.parts.trainable)
    frozen_a = {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(engine.parts.base)
                if path[-1] == "lora_a"}
    assert frozen_a
    state = engine.init()
    b0 = jax.device_get(state.trainable)
    state, result = engine.run_round(state, np.ones(engine.num_clients, np.float32),
                                     np.full(engine.num_clients, engine.rank))
    moved = sum(np.sum((np.asarray(x) - y) ** 2)
                for x, y in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(b0)))
    assert moved > 0  # B and the head moved
    assert result.applied_sq_norm == pytest.approx(moved, rel=1e-5)
    for path, v in nnx.to_flat_state(engine.parts.base):
        if path in frozen_a:
            np.testing.assert_array_equal(np.asarray(v[...]), frozen_a[path])
    sizes = engine.adapter_sizes
    assert sizes.lora_a == 0
    assert result.uplink_params == pytest.approx(engine.num_clients * (sizes.lora_b + sizes.head))
    b_only = sum(np.asarray(v[...]).size for path, v in nnx.to_flat_state(engine.parts.trainable)
                 if path[-1] == "lora_b")
    assert setup.workload.payload_bits_full_rank == 32 * b_only


def test_fedit_with_full_participation_is_fedavg():
    """FedIT at ``K = N`` samples every client with inclusion probability 1 at full rank, so its
    round is plain FedAvg (``sum_n a_n delta_n``): the same as the ``full`` sampling scheme's."""
    from fedlora_jax.client import ClientConfig, split_model
    from fedlora_jax.engine import FederatedEngine, FederationConfig
    from fedlora_jax.tasks import classification_loss
    from tests.conftest import random_pool, tiny_lora_model

    pool, parts = random_pool(num_clients=6), split_model(tiny_lora_model(rank=4))
    fedit = strategies.get_strategy("fedit")
    ctx = dataclasses.replace(_context(q_default=1.0), weights=np.asarray(pool.weights))
    plan = fedit.plan(1, ctx, strategies.init_estimates(6))
    results = []
    for scheme in (fedit.sampling, "full"):
        engine = FederatedEngine(parts, pool, classification_loss, client=ClientConfig(2, 4),
                                 federation=FederationConfig(sampling=scheme, participants=6.0,
                                                             chunk_size=4))
        state, result = engine.run_round(engine.init(0), plan.q[:6], np.full(6, 4))
        results.append((jax.device_get(state.trainable), result.participants))
    (fedit_tree, fedit_ids), (fedavg_tree, fedavg_ids) = results
    np.testing.assert_array_equal(fedit_ids, np.arange(6))
    np.testing.assert_array_equal(fedavg_ids, np.arange(6))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
                 fedit_tree, fedavg_tree)
