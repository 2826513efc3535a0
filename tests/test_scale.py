"""Memory grows with participants, not with registered clients: 10^6 clients on a laptop CPU."""

import chex
import jax
import numpy as np
import pytest

from fedlora_jax.client import ClientConfig, split_model
from fedlora_jax.data.pool import ClientPool
from fedlora_jax.engine import FederatedEngine, FederationConfig
from fedlora_jax.tasks import classification_loss
from tests.conftest import tiny_lora_model

SEQ = 8


def _pool(num_clients: int, seed: int = 0) -> ClientPool:
    """1-2 short examples per client."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 3, num_clients)
    m = int(sizes.sum())
    examples = {"input_ids": rng.integers(1, 64, (m, SEQ)).astype(np.int32),
                "attention_mask": np.ones((m, SEQ), np.int32),
                "labels": rng.integers(0, 3, m).astype(np.int32)}
    return ClientPool.from_partition(examples, np.split(np.arange(m), np.cumsum(sizes)[:-1]))


def _engine(pool: ClientPool) -> FederatedEngine:
    return FederatedEngine(split_model(tiny_lora_model()), pool, classification_loss,
                           client=ClientConfig(2, 2),
                           federation=FederationConfig(participants=16.0, chunk_size=16,
                                                       sketch_ratio=0.5))


def _per_client_bytes(eng: FederatedEngine) -> int:
    """Bytes of the chunk's inputs that scale with the registered clients: the pool's index and
    examples, and the per-client probabilities q and ranks k."""
    return sum(x.nbytes for x in jax.tree.leaves(eng.pool)) + 2 * 4 * eng.num_clients


@pytest.fixture(scope="module")
def million():
    return _pool(10**6, seed=1)


def test_chunk_memory_does_not_grow_with_registered_clients(million):
    small, big = _engine(_pool(100)), _engine(million)
    mem = {name: eng.compiled_chunk(eng.init()).memory_analysis()
           for name, eng in (("small", small), ("big", big))}
    assert mem["big"].temp_size_in_bytes == mem["small"].temp_size_in_bytes
    assert mem["big"].output_size_in_bytes == mem["small"].output_size_in_bytes
    grown = mem["big"].argument_size_in_bytes - mem["small"].argument_size_in_bytes
    assert grown == _per_client_bytes(big) - _per_client_bytes(small)
    assert mem["big"].temp_size_in_bytes < 64 * 2**20  # a chunk of 16 tiny clients


def test_two_rounds_at_a_million_clients(million):
    eng = _engine(million)
    assert eng.num_clients == 10**6
    state = eng.init()
    start = jax.tree.map(np.asarray, state.trainable)
    sizes = []
    for _ in range(2):
        state, result = eng.run_round(state)
        sizes.append(result.participants.size)
        assert np.isfinite(result.train_loss)
        assert result.clients.update_sq_norm.shape == result.participants.shape
    assert 0 < sum(sizes) < 100  # ~16 expected participants per round
    assert int(state.round) == 2
    with pytest.raises(AssertionError):  # the global adapter moved
        chex.assert_trees_all_close(jax.tree.map(np.asarray, state.trainable), start)
