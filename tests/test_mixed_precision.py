"""bfloat16 compute with float32 master weights (``model.compute_dtype``): the forward stays close
to float32, the weights, gradients and optimizer states stay float32, a run still learns, and a
bad setting is refused before anything runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedlora_jax.client import client_update, split_model
from fedlora_jax.lora import LoRAB, set_compute_dtype
from fedlora_jax.optim import OptimizerConfig, make_optimizer
from fedlora_jax.tasks import classification_loss
from tests import compile_cache
from tests.conftest import tiny_lora_model

# bf16 keeps 8 bits of mantissa (relative spacing 2^-8 = 0.4%); a forward through two layers
# accumulates a few of those: logits within 3% of the largest fp32 logit, as the bf16 storage
# path (docs/api.md).
BF16_TOL = 3e-2


def _with_adapter(model) -> nnx.Module:
    """``model`` with nonzero ``B`` (a fresh adapter's is zero), so the LoRA path counts."""
    state = nnx.state(model, LoRAB)
    keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree.map(lambda b: 0.3 * jax.random.normal(next(keys), b.shape), state))
    return model


def _batch(seed=0, size=6, seq_len=8):
    ids = np.random.default_rng(seed).integers(1, 64, (size, seq_len)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids[:, 0] % 3}


def test_bf16_forward_close_to_fp32_with_fp32_weights():
    model = _with_adapter(tiny_lora_model(rank=4))
    batch = _batch()
    full = np.asarray(model(batch["input_ids"], batch["attention_mask"]))
    set_compute_dtype(model, jnp.bfloat16)
    low = model(batch["input_ids"], batch["attention_mask"])
    assert low.dtype == jnp.bfloat16  # the head's matmul ran in bf16
    err = np.abs(np.asarray(low, np.float32) - full).max()
    assert 0 < err <= BF16_TOL * np.abs(full).max()
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.float32)}


def test_bf16_client_update_keeps_fp32_state_and_follows_fp32():
    """One client's local training (SGD with momentum: its trace is float32 state): the deltas
    are float32 and within 5% (of the largest change) of the float32 run's."""
    batches = jax.tree.map(lambda *xs: np.stack(xs), *[_batch(s) for s in range(3)])
    optimizer = make_optimizer(OptimizerConfig("momentum", 0.5))

    def delta(compute_dtype):
        model = _with_adapter(tiny_lora_model(rank=4))
        if compute_dtype is not None:
            set_compute_dtype(model, compute_dtype)
        parts = split_model(model)
        return client_update(parts.graphdef, parts.base, parts.trainable, parts.sketch, batches,
                             loss_fn=classification_loss, optimizer=optimizer)

    (full, full_metrics), (low, low_metrics) = delta(None), delta(jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(low)} == {jnp.dtype(jnp.float32)}
    for x, y in zip(jax.tree.leaves(low), jax.tree.leaves(full)):
        assert np.abs(np.asarray(x) - np.asarray(y)).max() <= 0.05 * np.abs(np.asarray(y)).max()
    assert low_metrics["loss_sum"] == pytest.approx(float(full_metrics["loss_sum"]), rel=BF16_TOL)


def test_bf16_run_learns_on_the_tiny_preset(tmp_path):
    from fedlora_jax.config import load_config
    from fedlora_jax.train import train

    compile_cache.enable()
    cfg = load_config(overrides=["model.compute_dtype=bfloat16", "federation.rounds=4",
                                 "eval_every=4", f"output_dir={tmp_path}"], preset="tiny")
    rows = train(cfg, progress="none", log=lambda *_: None)
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert rows[-1]["eval_accuracy"] > rows[0]["eval_accuracy"]


def test_bad_compute_dtype_is_refused():
    from fedlora_jax.config import load_config

    with pytest.raises(ValueError, match="model.compute_dtype.*'float32' or 'bfloat16'"):
        load_config(overrides=["model.compute_dtype=float16"], preset="tiny")
    with pytest.raises(ValueError, match="model.compute_dtype.*set model.dtype='float32'"):
        load_config(overrides=["model.compute_dtype=bfloat16", "model.dtype=bfloat16"],
                    preset="tiny")
