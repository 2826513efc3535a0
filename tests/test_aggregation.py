"""The aggregation rules of HetLoRA, FlexLoRA, FLoRA and FedSA-LoRA: each rule's defining property
against an independent reference (clients trained alone in a Python loop, numpy linear algebra),
one compile per run, the costs each rule declares, and exact resume of their state."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedlora_jax import aggregation, strategies
from fedlora_jax.client import ClientConfig, client_update, split_model
from fedlora_jax.config import load_config
from fedlora_jax.data.pool import sample_batches
from fedlora_jax.engine import ClientReport, FederatedEngine, FederationConfig, RoundResult
from fedlora_jax.lora import LoRAConfig, lora_layers
from fedlora_jax.optim import OptimizerConfig, make_optimizer
from fedlora_jax.strategies import fedsa, flora, hetlora
from fedlora_jax.strategies.fedsa import FedSALoRA
from fedlora_jax.strategies.flexlora import FlexLoRA
from fedlora_jax.strategies.flora import FLoRA
from fedlora_jax.strategies.hetlora import HetLoRA, Pruning, component_sq_norms, pruning_signal
from fedlora_jax.tasks import classification_loss
from fedlora_jax.train import train
from tests import compile_cache
from tests.conftest import tiny_lora_model

OPT = OptimizerConfig("adamw", 1e-2)
R = 4


@pytest.fixture(scope="module", autouse=True)
def _cache():
    compile_cache.enable()


def _parts(seed=0):
    """The tiny model with a non-zero B, so every factor trains and products are non-zero."""
    parts = split_model(tiny_lora_model(rank=R, seed=seed))
    trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(seed), x.shape),
                             parts.trainable)
    return dataclasses.replace(parts, trainable=trainable)


def _engine(pool, method, parts=None, loss=classification_loss, rule=None, **fed):
    """An engine running ``method``'s rule (or ``rule``) and costs (``method=None``: FSLoRA's)."""
    fed = {"chunk_size": 4, "sampling": "full", **fed}
    parts = parts or _parts()
    method = method or strategies.FSLoRA()
    federation = FederationConfig(**fed)
    return FederatedEngine(parts, pool, loss, client=ClientConfig(2, 4),
                           client_optimizer=OPT, federation=federation,
                           rule=rule or method.rule(LoRAConfig(rank=R), federation),
                           costs=method.costs(aggregation.adapter_sizes(parts.trainable), R))


def _as_np(tree):
    return jax.tree.map(np.asarray, tree)


def _factors(tree) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {layer: (np.asarray(a), np.asarray(b))
            for layer, (a, b) in aggregation.lora_factors(tree).items()}


def _train_alone(eng, key, n, start, mask):
    """Client ``n`` trained on its own in the round of state key ``key``, from ``start``, with the
    rank mask ``mask`` (r,) on every layer: its final trainables, as a per-client loop computes them."""
    _, _, k_train = jax.random.split(key, 3)
    _, k_data, _ = jax.random.split(jax.random.fold_in(k_train, n), 3)
    sketch = jax.tree.map(lambda s: jnp.asarray(mask, s.dtype), eng.parts.sketch)
    batches = sample_batches(eng.pool, jnp.int32(n), k_data, 2, 4)
    delta, _ = client_update(eng.parts.graphdef, eng.parts.base, start, sketch, batches,
                             loss_fn=classification_loss, optimizer=make_optimizer(OPT))
    return _as_np(jax.tree.map(jnp.add, start, delta))


def _one_round(eng, seed, k):
    """``(state before, state after, result)`` of one round; the round donates the state's
    buffers, so the returned initial state holds host copies of its trainables."""
    state = eng.init(seed=seed)
    before = _as_np(state.trainable)
    new_state, result = eng.run_round(state, k=k)
    return state.replace(trainable=before), new_state, result


def _prefix(k):
    return (np.arange(R) < k).astype(np.float32)


def _ranks(num_clients):
    return (np.arange(num_clients) % 2 + 1).astype(np.int32)  # 1 or 2 of 4: the top two unheld


# ----------------------------------------------------------------------------- HetLoRA

def test_hetlora_zero_pads_and_averages_with_norm_weights(pool):
    eng = _engine(pool, HetLoRA())
    k = _ranks(eng.num_clients)
    state, new_state, result = _one_round(eng, 1, k)
    assert result.participants.size == eng.num_clients
    global_ = state.trainable

    padded, weights = [], []
    for n in range(eng.num_clients):
        final = _train_alone(eng, state.key, n, state.trainable, _prefix(k[n]))
        pad = aggregation.map_factors(final, lambda layer, a, b, k=k[n]: (
            np.where(np.arange(R) < k, a, 0.0), np.where(np.arange(R)[:, None] < k, b, 0.0)))
        norm = np.sqrt(sum(np.sum((a @ b) ** 2) for a, b in _factors(pad).values()))
        padded.append(pad)
        weights.append(float(pool.weights[n]) * norm)
    weights = np.asarray(weights) / np.sum(weights)
    expected = jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights, xs)), *padded)
    chex.assert_trees_all_close(new_state.trainable, expected, atol=2e-6, rtol=2e-5)
    for layer, (a, b) in _factors(new_state.trainable).items():
        # nobody holds components 2 and 3: the zero padding pulled them to exactly zero
        np.testing.assert_array_equal(a[:, 2:], 0.0)
        np.testing.assert_array_equal(b[2:], 0.0)
        assert np.abs(_factors(global_)[layer][0][:, 2:]).max() > 0  # they were not zero before


def test_hetlora_self_pruning_drops_weak_last_components():
    strategy = HetLoRA(prune_below=0.5, min_rank=1)
    plan = strategies.Plan(np.full(5, 0.5, np.float32), np.array([4, 3, 1, 2, 4], np.int32))
    clients = ClientReport(update_sq_norm=np.ones(4), head_sq_norm=np.zeros(4),
                           rule=Pruning(np.array([0.1, 0.9, 0.0, 0.49])))
    result = RoundResult(participants=np.array([0, 1, 2, 4]), clients=clients, applied_sq_norm=1.0,
                         train_loss=0.0, train_accuracy=0.0, uplink_params=0.0, times={})
    revised = strategy.revise(plan, result)
    # client 0 and 4 prune one component; 1 is strong; 2 is at min_rank; 3 did not take part
    np.testing.assert_array_equal(revised.k, [3, 3, 1, 2, 3])
    np.testing.assert_array_equal(plan.k, [4, 3, 1, 2, 4])  # the old plan is not mutated
    assert HetLoRA(prune_below=0.0).revise(plan, result) is plan


def test_hetlora_reports_the_last_kept_components_share():
    parts = _parts()
    rng = np.random.default_rng(0)
    tree = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), parts.trainable)
    comp = sum(np.sum(a * a, 0) * np.sum(b * b, 1) for a, b in _factors(tree).values())
    np.testing.assert_allclose(component_sq_norms(tree), comp, rtol=1e-5)
    sketch = aggregation.prefix_sketch(jnp.int32(3), parts.sketch)
    share = hetlora.rule().message(tree, jax.tree.map(jnp.zeros_like, tree), sketch).report
    np.testing.assert_allclose(share.last_component_share, comp[2] / comp[:3].mean(), rtol=1e-5)
    np.testing.assert_array_equal(pruning_signal(tree, sketch), share)


# ----------------------------------------------------------------------------- FlexLoRA

def test_truncated_svd_is_the_best_rank_k_approximation():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(12, 9)).astype(np.float32)
    s = np.linalg.svd(w, compute_uv=False)
    a, b = truncated_svd_factors = aggregation.truncated_svd_factors(jnp.asarray(w), 5)
    for k in (1, 3, 5):  # the first k components of the rank-5 factors: the best rank-k
        error = np.linalg.norm(w - np.asarray(a[:, :k] @ b[:k]))
        np.testing.assert_allclose(error, np.sqrt(np.sum(s[k:] ** 2)), rtol=1e-4)  # Eckart-Young
        for trial in range(20):  # and no other rank-k matrix does better
            x, y = rng.normal(size=(12, k)), rng.normal(size=(k, 9))
            x = w @ np.linalg.pinv(y) if trial % 2 else x  # half of them least-squares fitted
            assert np.linalg.norm(w - x @ y) >= error - 1e-4
    assert truncated_svd_factors[0].shape == (12, 5)


def test_flexlora_redistributes_the_svd_of_the_mean_product(pool):
    eng = _engine(pool, FlexLoRA())
    k = _ranks(eng.num_clients)
    state, new_state, _ = _one_round(eng, 2, k)
    weights = np.asarray(pool.weights) / np.sum(pool.weights)
    products = {}
    for n in range(eng.num_clients):
        final = _train_alone(eng, state.key, n, state.trainable, _prefix(k[n]))
        for layer, (a, b) in _factors(final).items():
            p = (a * _prefix(k[n])) @ (b * _prefix(k[n])[:, None])  # the client's rank-k_n product
            products[layer] = products.get(layer, 0.0) + weights[n] * p
    for layer, (a, b) in _factors(new_state.trainable).items():
        u, s, vt = np.linalg.svd(products[layer])
        best = (u[:, :R] * s[:R]) @ vt[:R]
        np.testing.assert_allclose(a @ b, best, atol=1e-5, rtol=1e-4)
        assert np.linalg.matrix_rank(products[layer], tol=1e-6) > R  # the truncation mattered
        np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1), rtol=1e-4)


# ----------------------------------------------------------------------------- FLoRA

def test_flora_stacked_product_equals_the_weighted_sum_of_client_products():
    rng = np.random.default_rng(1)
    c, d_in, r, d_out = 5, 7, 3, 6
    w = rng.random(c).astype(np.float32)
    a = rng.normal(size=(c, d_in, r)).astype(np.float32)
    b = rng.normal(size=(c, r, d_out)).astype(np.float32)
    a_stack, b_stack = aggregation.stack_factors(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b))
    assert a_stack.shape == (d_in, c * r) and b_stack.shape == (c * r, d_out)
    expected = sum(w[i] * a[i] @ b[i] for i in range(c))
    np.testing.assert_allclose(a_stack @ b_stack, expected, rtol=1e-5, atol=1e-5)
    # unlike averaging the factors, which adds cross terms
    assert not np.allclose(np.einsum("c,cir->ir", w, a) @ np.einsum("c,cro->ro", w, b), expected)


def test_flora_merges_the_stack_into_the_base_and_restarts_clients_fresh(pool):
    model = tiny_lora_model(rank=R)
    scaling = lora_layers(model)[0][1].scaling
    rule = flora.rule(scaling=scaling)
    parts = split_model(model)
    eng = _engine(pool, FLoRA(), parts=parts, rule=rule)
    k = _ranks(eng.num_clients)
    state, new_state, _ = _one_round(eng, 3, k)
    weights = np.asarray(pool.weights) / np.sum(pool.weights)
    _, _, k_train = jax.random.split(state.key, 3)
    merged = {}
    for n in range(eng.num_clients):
        k_sketch = jax.random.split(jax.random.fold_in(k_train, n), 3)[0]
        start, _ = rule.start(state.trainable, {}, parts.sketch, jnp.int32(k[n]), k_sketch)
        for layer, (a, b) in _factors(start).items():  # a fresh adapter: B = 0, A new
            np.testing.assert_array_equal(b, 0.0)
            assert not np.allclose(a, _factors(state.trainable)[layer][0])
        final = _train_alone(eng, state.key, n, start, _prefix(k[n]))
        for layer, (a, b) in _factors(final).items():
            p = (a * _prefix(k[n])) @ (b * _prefix(k[n])[:, None])
            merged[layer] = merged.get(layer, 0.0) + scaling * weights[n] * p
    for layer, m in new_state.agg.server["merged"].items():
        np.testing.assert_allclose(m, merged[layer], atol=1e-6, rtol=1e-4)
    # the LoRA factors of the global model do not move; the base the clients run on does
    for layer, (a, b) in _factors(new_state.trainable).items():
        np.testing.assert_array_equal(a, _factors(state.trainable)[layer][0])
        np.testing.assert_array_equal(b, _factors(state.trainable)[layer][1])
    kernels = lambda base: {"/".join(map(str, path[:-2])): np.asarray(v[...])
                            for path, v in nnx.to_flat_state(base) if path[-2:] == ("base", "kernel")}
    before, after = kernels(parts.base), kernels(rule.base(parts.base, new_state.agg.server))
    for layer, m in merged.items():
        np.testing.assert_allclose(after[layer], before[layer] + m, atol=1e-6)
    heldout = _heldout(pool)  # the evaluation runs on the merged base
    assert eng.evaluate(new_state, heldout)["loss"] != eng.evaluate(eng.init(seed=3), heldout)["loss"]


def _heldout(pool):
    return {name: np.asarray(x)[:16] for name, x in pool.examples.items()}


# ----------------------------------------------------------------------------- FedSA-LoRA

def test_fedsa_shares_a_and_keeps_each_clients_b(pool):
    eng = _engine(pool, FedSALoRA())
    state = eng.init(seed=4)
    a0 = _factors(state.trainable)
    state = state.replace(trainable=_as_np(state.trainable))
    s1, r1 = eng.run_round(jax.device_put(state))
    # every client's B starts at the initial global B
    finals = [_train_alone(eng, state.key, n, state.trainable, np.ones(R))
              for n in range(eng.num_clients)]
    w = np.asarray(pool.weights)  # full participation: q = 1
    for layer, rows in s1.agg.clients.items():
        for n in range(eng.num_clients):  # each client keeps its own B ...
            np.testing.assert_allclose(rows[n], _factors(finals[n])[layer][1], atol=1e-6)
        a1 = a0[layer][0] + sum(w[n] * (_factors(finals[n])[layer][0] - a0[layer][0])
                                for n in range(eng.num_clients))
        np.testing.assert_allclose(_factors(s1.trainable)[layer][0], a1, atol=1e-6, rtol=1e-5)
        np.testing.assert_array_equal(_factors(s1.trainable)[layer][1], a0[layer][1])  # B not shared
    # ... and starts the next round from it (with the new global A)
    s1_trainable, s1_rows = _as_np(s1.trainable), _as_np(s1.agg.clients)
    s2, _ = eng.run_round(s1)
    s1 = s1.replace(trainable=s1_trainable, agg=s1.agg.replace(clients=s1_rows))
    n = 5
    start = aggregation.map_factors(_as_np(s1.trainable),
                                    lambda l, a, b: (a, np.asarray(s1.agg.clients[l][n])))
    final = _train_alone(eng, s1.key, n, start, np.ones(R))
    for layer, rows in s2.agg.clients.items():
        np.testing.assert_allclose(rows[n], _factors(final)[layer][1], atol=1e-6)
    # the upload is A (and the head) only
    sizes = eng.adapter_sizes
    assert r1.uplink_params == pytest.approx(eng.num_clients * (sizes.lora_a + sizes.head))


def test_fedsa_refuses_per_client_state_that_does_not_fit(pool):
    with pytest.raises(ValueError, match="per-client state of .* GiB .* use fewer clients"):
        aggregation.check_client_state_memory(fedsa.rule(), _parts().trainable, 10 ** 9)


# ----------------------------------------------------------------------------- all rules

@pytest.mark.parametrize("rule", [hetlora.rule(), FlexLoRA().rule(LoRAConfig(), FederationConfig()),
                                  flora.rule(scaling=2.0), fedsa.rule()],
                         ids=["hetlora", "flexlora", "flora", "fedsa"])
def test_one_compile_across_participant_counts(pool, rule):
    traces = []

    def loss(model, batch):
        traces.append(1)
        return classification_loss(model, batch)

    eng = _engine(pool, None, loss=loss, rule=rule, sampling="independent")
    state = eng.init()
    k = _ranks(eng.num_clients)
    counts = set()
    for i, q in enumerate([0.5, 1.0, 1e-6, 0.2]):
        state, result = eng.run_round(state, np.full(eng.num_clients, q, np.float32), k)
        counts.add(result.participants.size)
        chex.assert_tree_shape_prefix(result.clients, result.participants.shape)  # empty too
        if i == 0:
            compiled = len(traces)
    assert len(counts) >= 3 and 0 in counts
    assert len(traces) == compiled
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.trainable))


def test_each_rule_declares_its_costs():
    sizes = aggregation.AdapterSizes(lora_a=600, lora_b=400, head=10, layers=((30, 20),) * 2)
    mask, k = jnp.array([True, True, False, True]), jnp.array([2, 4, 4, 1])
    base = strategies.FSLoRA().costs(sizes, 4)
    assert float(base.download(mask, k)) == 1010
    np.testing.assert_allclose(base.upload(k), [510, 1010, 1010, 260])
    # FLoRA broadcasts the stacked adapters of the participants: (2 + 4 + 1) / 4 full adapters
    assert float(FLoRA().costs(sizes, 4).download(mask, k)) == pytest.approx(7 / 4 * 1000 + 10)
    assert FedSALoRA().costs(sizes, 4).upload_lora == 600
    assert FlexLoRA().costs(sizes, 4).server_flops == 2 * aggregation.svd_flops(30, 20) > 0
    assert base.server_flops == 0


def test_the_clock_charges_download_and_server_time(tmp_path):
    """FLoRA's round is longer than FSLoRA's at the same ranks by its stacked download."""
    rows = {}
    for name in ("fslora", "flora", "flexlora"):
        cfg = load_config(preset="tiny", overrides=[
            f"strategy={name}", "federation.rounds=1", f"output_dir={tmp_path / name}",
            "data.num_clients=8"])
        rows[name] = train(cfg, progress="none", log=lambda line: None)[-1]
    assert rows["fslora"]["round_server_s"] == 0 < rows["flexlora"]["round_server_s"]
    assert rows["flora"]["round_download_s"] > rows["fslora"]["round_download_s"] > 0
    for row in rows.values():
        assert row["round_total_s"] == pytest.approx(
            row["round_download_s"] + row["round_compute_s"] + row["round_upload_s"]
            + row["round_server_s"], rel=1e-5)


@pytest.mark.parametrize("name", ["fedsa", "flora", "hetlora"])
def test_stateful_rules_resume_exactly(tmp_path, name):
    def cfg(out, rounds):
        return load_config(preset="tiny", overrides=[
            f"strategy={name}", f"federation.rounds={rounds}", f"output_dir={out}",
            "data.num_clients=8", "eval_every=2", "checkpoint_every=0"])

    quiet = dict(progress="none", log=lambda line: None)
    straight = train(cfg(tmp_path / "a", 4), **quiet)
    train(cfg(tmp_path / "b", 2), **quiet)
    resumed = train(cfg(tmp_path / "b", 4), resume=True, **quiet)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]
    assert drop(resumed) == drop(straight)


def test_rounds_report_the_heads_part_of_each_update(pool):
    eng = _engine(pool, None)
    _, result = eng.run_round(eng.init())
    head = result.clients.head_sq_norm
    assert head.shape == result.clients.update_sq_norm.shape
    assert (head > 0).all() and (head < result.clients.update_sq_norm).all()
    headless = split_model(tiny_lora_model(rank=R, modules_to_save=()))
    _, result = _engine(pool, None, parts=headless).run_round(_engine(pool, None, parts=headless).init())
    np.testing.assert_array_equal(result.clients.head_sq_norm, 0.0)


def test_fedsa_personal_evaluation_scores_each_example_with_its_owners_b(pool):
    eng = _engine(pool, FedSALoRA())
    state, _ = eng.run_round(eng.init(seed=6))
    heldout = _heldout(pool)
    owners = np.arange(16) % 3
    personal = eng.evaluate_personal(state, heldout, owners)
    correct = loss = 0.0
    for n in range(3):  # reference: a state where every client holds B_n, so the mean B is B_n
        rows = {layer: jnp.broadcast_to(r[n], r.shape) for layer, r in state.agg.clients.items()}
        alone = state.replace(agg=state.agg.replace(clients=rows))
        m = eng.evaluate(alone, {k: v[owners == n] for k, v in heldout.items()})
        correct += m["accuracy"] * np.sum(owners == n)
        loss += m["loss"] * np.sum(owners == n)
    assert personal["accuracy"] == pytest.approx(correct / 16)
    assert personal["loss"] == pytest.approx(loss / 16, rel=1e-5)
    assert personal["loss"] != pytest.approx(eng.evaluate(state, heldout)["loss"], rel=1e-6)
    with pytest.raises(ValueError, match="one client per example"):
        eng.evaluate_personal(state, heldout, owners[:3])
