"""Client data as one example pool plus a per-client index (CSR layout), sampled inside jit.

All examples live in padded arrays ``examples[name]: (M, ...)``; client ``n`` owns the example ids
``order[offsets[n] : offsets[n] + sizes[n]]``. A million registered clients cost two int32 arrays,
not a copy of their data, and a client's minibatches are gathered by index inside the compiled
round (no Python per client).
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class ClientPool:
    examples: dict[str, jax.Array]  # name -> (M, ...)
    order: jax.Array  # (M_assigned,) int32 example ids grouped by client
    offsets: jax.Array  # (N,) int32
    sizes: jax.Array  # (N,) int32, every size >= 1
    weights: jax.Array  # (N,) float32 data weights a_n, summing to 1

    @property
    def num_clients(self) -> int:
        return int(self.sizes.shape[0])

    @property
    def num_examples(self) -> int:
        return int(next(iter(self.examples.values())).shape[0])

    @classmethod
    def from_partition(cls, examples: dict[str, np.ndarray],
                       client_indices: Sequence[np.ndarray]) -> "ClientPool":
        """Builds a pool from example arrays and one array of example ids per client."""
        if not client_indices:
            raise ValueError("The partition has no clients.")
        m = {k: np.asarray(v).shape[0] for k, v in examples.items()}
        if len(set(m.values())) != 1:
            raise ValueError(f"Example arrays disagree on the number of examples: {m}.")
        num = next(iter(m.values()))
        sizes = np.array([len(ix) for ix in client_indices], np.int64)
        if (sizes == 0).any():
            empty = np.flatnonzero(sizes == 0)[:10].tolist()
            raise ValueError(f"Clients {empty} have no examples; use fewer clients or a partition "
                             "with a minimum client size.")
        order = np.concatenate([np.asarray(ix, np.int64) for ix in client_indices])
        if order.min() < 0 or order.max() >= num:
            raise ValueError(f"Client example ids must lie in [0, {num}).")
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        return cls(examples={k: jnp.asarray(v) for k, v in examples.items()},
                   order=jnp.asarray(order, jnp.int32), offsets=jnp.asarray(offsets, jnp.int32),
                   sizes=jnp.asarray(sizes, jnp.int32),
                   weights=jnp.asarray(sizes / sizes.sum(), jnp.float32))

    def with_weights(self, weights) -> "ClientPool":
        w = np.asarray(weights, np.float64)
        if w.shape != (self.num_clients,):
            raise ValueError(f"weights have shape {w.shape}; expected ({self.num_clients},), one "
                             "per client.")
        if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError("weights must be finite, non-negative and not all zero.")
        return self.replace(weights=jnp.asarray(w / w.sum(), jnp.float32))


def sample_batches(pool: ClientPool, client: jax.Array, key: jax.Array, steps: int,
                   batch_size: int) -> dict[str, jax.Array]:
    """``steps`` minibatches of ``batch_size`` examples drawn uniformly (with replacement) from one
    client's data: arrays of shape ``(steps, batch_size, ...)``. Traceable; vmap over clients."""
    chex.assert_rank(client, 0)
    u = jax.random.randint(key, (steps, batch_size), 0, pool.sizes[client])
    ids = pool.order[pool.offsets[client] + u]
    return {k: v[ids] for k, v in pool.examples.items()}


def iterate_batches(examples: dict[str, np.ndarray], batch_size: int):
    """Fixed-size evaluation batches over all examples; the last one padded, with ``example_mask``."""
    n = next(iter(examples.values())).shape[0]
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        valid = idx < n
        idx = np.where(valid, idx, 0)
        batch = {k: np.asarray(v)[idx] for k, v in examples.items()}
        batch["example_mask"] = valid.astype(np.float32)
        yield batch
