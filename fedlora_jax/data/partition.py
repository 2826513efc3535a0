"""Partitioners: split example ids ``0..M-1`` among ``N`` clients, one id array per client.

Each partitioner computes an owner per example (an array of client ids). IID shards are equal up
to one example; the skewed partitioners then lift any client below ``min_size`` by moving random
examples away from the largest clients, so the skew they draw is perturbed as little as possible. All randomness comes from a numpy seed or
``np.random.Generator``; the same seed gives the same partition. Client weights ``a_n``
(proportional to size) are computed by :meth:`ClientPool.from_partition`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

Seed = int | np.random.Generator
KINDS = ("iid", "dirichlet", "group")


@dataclasses.dataclass(frozen=True)
class PartitionConfig:
    """How to split a data set among clients (see :func:`partition`)."""

    kind: str = "iid"  # "iid" | "dirichlet" (over labels) | "group" (natural owner, e.g. topic)
    num_clients: int = 10
    alpha: float = 0.5  # Dirichlet concentration; small = skewed, large = close to IID
    min_size: int = 1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Unknown partition kind {self.kind!r}; valid kinds: {list(KINDS)}.")
        if self.num_clients < 1 or self.min_size < 1:
            raise ValueError("num_clients and min_size must be at least 1, got "
                             f"num_clients={self.num_clients}, min_size={self.min_size}.")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}.")


def partition(config: PartitionConfig, *, num_examples: int, labels=None, groups=None,
              seed: Seed = 0) -> list[np.ndarray]:
    """Dispatches on ``config.kind``; ``labels`` feed "dirichlet", ``groups`` feed "group"."""
    if config.kind == "iid":
        return iid(num_examples, config.num_clients, seed=seed, min_size=config.min_size)
    needed = {"dirichlet": ("labels", labels), "group": ("groups", groups)}[config.kind]
    if needed[1] is None:
        raise ValueError(f"Partition kind {config.kind!r} needs per-example {needed[0]}.")
    if len(needed[1]) != num_examples:
        raise ValueError(f"{needed[0]} has {len(needed[1])} entries for {num_examples} examples.")
    if config.kind == "dirichlet":
        return dirichlet(labels, config.num_clients, config.alpha, seed=seed,
                         min_size=config.min_size)
    return by_group(groups, config.num_clients, seed=seed, min_size=config.min_size)


def iid(num_examples: int, num_clients: int, *, seed: Seed = 0,
        min_size: int = 1) -> list[np.ndarray]:
    """Uniformly random, near-equal shards."""
    _check_feasible(num_examples, num_clients, min_size)
    rng = np.random.default_rng(seed)
    owner = np.empty(num_examples, np.int64)
    owner[rng.permutation(num_examples)] = np.arange(num_examples) % num_clients
    return _indices_from_owner(owner, num_clients)


def dirichlet(labels, num_clients: int, alpha: float, *, seed: Seed = 0,
              min_size: int = 1) -> list[np.ndarray]:
    """Label-skewed split (Hsu et al., 2019): each class is divided among clients in proportions
    drawn from ``Dir(alpha * 1_N)``. ``labels`` may be classes, tasks or any integer group key."""
    labels = _int_keys(labels, "labels")
    _check_feasible(len(labels), num_clients, min_size)
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}.")
    rng = np.random.default_rng(seed)
    owner = np.empty(len(labels), np.int64)
    for c in np.unique(labels):
        ids = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.cumsum(rng.dirichlet(np.full(num_clients, alpha)))[:-1] * len(ids)
        owner[ids] = np.searchsorted(cuts, np.arange(len(ids)), side="right")
    return _indices_from_owner(_lift_small_clients(owner, num_clients, min_size, rng), num_clients)


def by_group(groups, num_clients: int, *, seed: Seed = 0, min_size: int = 1) -> list[np.ndarray]:
    """Natural-owner split: examples of one group (topic, author, device, ...) stay together.

    With as many clients as groups each client owns one group. With fewer clients, whole groups
    are dealt largest-first to the currently smallest client (random tie order), so clients hold
    disjoint groups and similar amounts of data. With more clients than groups, each group is
    split into contiguous random shards, the number of shards proportional to its size.
    """
    groups = _int_keys(groups, "groups")
    _check_feasible(len(groups), num_clients, min_size)
    rng = np.random.default_rng(seed)
    keys, group_of = np.unique(groups, return_inverse=True)
    members = _indices_from_owner(group_of, len(keys))
    sizes = np.array([len(m) for m in members])
    owner = np.empty(len(groups), np.int64)
    if num_clients <= len(keys):
        load = np.zeros(num_clients, np.int64)
        order = rng.permutation(len(keys))
        for g in order[np.argsort(-sizes[order], kind="stable")]:
            n = int(np.argmin(load))
            owner[members[g]] = n
            load[n] += sizes[g]
    else:
        shards = _largest_remainder(sizes, num_clients)
        first = np.concatenate([[0], np.cumsum(shards)[:-1]])
        for g, ids in enumerate(members):
            ids = rng.permutation(ids)
            owner[ids] = first[g] + np.arange(len(ids)) * shards[g] // len(ids)
    return _indices_from_owner(_lift_small_clients(owner, num_clients, min_size, rng), num_clients)


def _largest_remainder(sizes: np.ndarray, total: int) -> np.ndarray:
    """Integer shares of ``total`` proportional to ``sizes``, each at least 1 and at most its size."""
    share = np.maximum(np.floor(sizes * total / sizes.sum()).astype(np.int64), 1)
    share = np.minimum(share, sizes)
    while share.sum() != total:
        gap = sizes * total / sizes.sum() - share
        if share.sum() < total:
            gap[share >= sizes] = -np.inf
            share[np.argmax(gap)] += 1
        else:
            gap[share <= 1] = np.inf
            share[np.argmin(gap)] -= 1
    return share


def _lift_small_clients(owner: np.ndarray, num_clients: int, min_size: int,
                        rng: np.random.Generator) -> np.ndarray:
    """Moves random examples from the largest clients to clients below ``min_size``.

    Donors are lowered toward a common level (water filling) that never goes below ``min_size``,
    which is always possible once ``M >= N * min_size``.
    """
    sizes = np.bincount(owner, minlength=num_clients)
    need = np.maximum(min_size - sizes, 0)
    total = int(need.sum())
    if total == 0:
        return owner
    freed = lambda level: int(np.maximum(sizes - level, 0).sum())
    level, above = min_size, int(sizes.max())  # freed(level) >= total > freed(above)
    while above - level > 1:
        mid = (level + above) // 2
        level, above = (mid, above) if freed(mid) >= total else (level, mid)
    give = np.maximum(sizes - level - 1, 0)
    at_level = np.flatnonzero(sizes > level)
    give[rng.permutation(at_level)[: total - give.sum()]] += 1
    shuffled = rng.permutation(len(owner))
    by_client = shuffled[np.argsort(owner[shuffled], kind="stable")]
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    moved = np.concatenate([by_client[s: s + g] for s, g in zip(start, give) if g])
    owner = owner.copy()
    owner[moved] = rng.permutation(np.repeat(np.arange(num_clients), need))
    return owner


def _indices_from_owner(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
    order = np.argsort(owner, kind="stable")
    return np.split(order, np.cumsum(np.bincount(owner, minlength=num_clients))[:-1])


def _int_keys(values, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer array, got shape {arr.shape} and dtype "
                         f"{arr.dtype}.")
    return arr


def _check_feasible(num_examples: int, num_clients: int, min_size: int) -> None:
    if num_clients < 1 or min_size < 1:
        raise ValueError(f"num_clients and min_size must be at least 1, got num_clients="
                         f"{num_clients}, min_size={min_size}.")
    if num_examples < num_clients * min_size:
        raise ValueError(f"Cannot give {num_clients} clients at least {min_size} examples each from "
                         f"{num_examples} examples; use fewer clients or a smaller min_size.")
