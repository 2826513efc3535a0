"""Shared small fixtures: a tiny LoRA model and a synthetic client pool."""

from __future__ import annotations

import gc

import jax
import numpy as np
import pytest
from flax import nnx

from fedlora_jax.client import split_model
from fedlora_jax.data.pool import ClientPool
from fedlora_jax.lora import LoRAConfig, apply_lora
from fedlora_jax.models.tiny import TinyConfig, TinyTransformer
from tests import compile_cache


@pytest.fixture(scope="module", autouse=True)
def _fresh_jax_per_module():
    """Each test module starts with the persistent compile cache off (modules that want it call
    :func:`compile_cache.enable`) and with no compiled programs held over from earlier modules.
    Every live CPU executable keeps a few memory maps; a whole suite in one process held ~30k of
    them and late compiles crashed (segfault, JAX 0.10.2) near the kernel's 65530-map limit."""
    yield
    compile_cache.disable()
    jax.clear_caches()
    gc.collect()


def tiny_lora_model(rank: int = 4, seed: int = 0, task: str = "classification",
                    modules_to_save=("classifier",), dropout: float = 0.0, **kw):
    cfg = TinyConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=2, d_ff=32, max_len=16,
                     num_labels=3, task=task, **kw)
    model = TinyTransformer(cfg, rngs=nnx.Rngs(seed))
    if task == "causal_lm":
        modules_to_save = ()
    apply_lora(model, LoRAConfig(rank=rank, alpha=2.0 * rank, targets=("query", "value"),
                                 modules_to_save=modules_to_save, dropout=dropout),
               rngs=nnx.Rngs(seed + 1))
    return model


def random_pool(num_clients: int = 12, per_client: int = 6, seq_len: int = 8, vocab: int = 64,
                num_labels: int = 3, seed: int = 0) -> ClientPool:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 2 * per_client, num_clients)  # ragged clients
    m = int(sizes.sum())
    ids = rng.integers(1, vocab, (m, seq_len)).astype(np.int32)
    mask = np.ones((m, seq_len), np.int32)
    mask[:, seq_len - 2:] = rng.integers(0, 2, (m, 2))  # some padding
    ex = {"input_ids": ids, "attention_mask": mask,
          "labels": (ids[:, 0] % num_labels).astype(np.int32)}
    order = rng.permutation(m)
    return ClientPool.from_partition(ex, np.split(order, np.cumsum(sizes)[:-1]))


@pytest.fixture
def model():
    return tiny_lora_model()


@pytest.fixture
def parts(model):
    return split_model(model)


@pytest.fixture
def pool():
    return random_pool()
