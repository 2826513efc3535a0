"""The federated round as array programs (architecture.md, "One round, as data").

``key -> sampling mask (N) -> participant ids -> fixed-size chunks (C) -> sketch masks (C x r)
-> local training (vmap over C) -> weighted sum of deltas (a_n I_n / q_n) -> server optimizer``.

Shapes are static per run (chunk size, local steps, batch, sequence length), so a round never
recompiles whatever its number of participants; a round with no participant is legal (the server
applies a zero pseudo-gradient). Every client's randomness is ``fold_in(round_key, client_id)``, so
results do not depend on how participants are packed into chunks.

The client axis of a chunk is sharded over a one-axis device :class:`~jax.sharding.Mesh` (axis
``clients``) with :func:`jax.shard_map`; base weights, global trainables and the client pool are
replicated, and the chunk's weighted sum of deltas is reduced across devices with ``psum``. One
device is the mesh of size one, so the same program serves one device, many, and many hosts
(``jax.distributed.initialize()`` before building the engine; ``docs/benchmarks.md``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from fedlora_jax import sampling
from fedlora_jax.aggregation import (Aggregator, AggregatorState, adapter_sizes,
                                     check_client_state_memory, head_sq_norm)
from fedlora_jax.client import ClientConfig, LossFn, ModelParts, train_clients
from fedlora_jax.data.pool import ClientPool, iterate_batches, sample_batches
from fedlora_jax.optim import OptimizerConfig, make_optimizer


@dataclasses.dataclass(frozen=True)
class FederationConfig:
    """How clients take part.

    Attributes:
      rounds: number of communication rounds.
      participants: expected participants per round; the default ``q_n = participants / N``.
      sampling: ``independent`` (Bernoulli ``q_n``, the paper), ``uniform`` (exactly K of N) or
        ``full``.
      chunk_size: clients trained together by one compiled, vmapped call (padding fills the last);
        rounded up to a multiple of the number of devices, and never below it.
      block_size: if set, a chunk runs as a compiled loop over blocks of this many vmapped clients
        (helps CPU caches; leave unset on accelerators).
      sketch_ratio: default ``rho = k / r`` for every client (1 disables sketching).
      shared_sketch: one sketch draw for all layers of a client (else one per layer).
      seed: seeds the run's PRNG key.
      devices: devices the client axis is sharded over (``None``: all of ``jax.devices()``, which
        spans every host of a multi-host job).
    """

    rounds: int = 20
    participants: float = 10.0
    sampling: str = "independent"
    chunk_size: int = 8
    block_size: int | None = None
    sketch_ratio: float = 1.0
    shared_sketch: bool = True
    seed: int = 0
    devices: int | None = None

    def __post_init__(self):
        if self.sampling not in sampling.SCHEMES:
            raise ValueError(f"Unknown sampling {self.sampling!r}; valid: {sorted(sampling.SCHEMES)}.")
        if not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(f"federation.rounds must be a non-negative integer, got {self.rounds!r}.")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"federation.chunk_size must be a positive integer, got {self.chunk_size!r}.")
        if self.block_size is not None and (not isinstance(self.block_size, int)
                                            or self.block_size < 1):
            raise ValueError(f"federation.block_size must be a positive integer or unset, "
                             f"got {self.block_size!r}.")
        if not self.participants > 0:
            raise ValueError(f"federation.participants must be > 0, got {self.participants!r}.")
        if not 0 < self.sketch_ratio <= 1:
            raise ValueError(f"federation.sketch_ratio must be in (0, 1], got {self.sketch_ratio!r}.")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 31:
            raise ValueError(f"federation.seed must be an integer in [0, 2**31) (it seeds a 32-bit "
                             f"PRNG key inside the compiled init), got {self.seed!r}.")
        if self.devices is not None and (not isinstance(self.devices, int) or self.devices < 1):
            raise ValueError(f"federation.devices must be a positive integer or unset (all "
                             f"devices), got {self.devices!r}.")


@struct.dataclass
class ServerState:
    """Everything that changes across rounds: the run's checkpoint."""

    trainable: nnx.State  # global adapter and heads
    opt_state: optax.OptState
    round: jax.Array  # int32
    key: jax.Array
    clock: jax.Array  # simulated wall-clock seconds
    agg: AggregatorState  # the aggregation rule's own state (empty for FSLoRA's)


@dataclasses.dataclass(frozen=True)
class RoundResult:
    """Host-side record of one round."""

    participants: np.ndarray  # (P,) client ids
    update_sq_norms: np.ndarray  # (P,) ||delta_n||^2, for the G_n estimators
    reports: dict[str, np.ndarray]  # (P,) per client: head_sq_norm (the unsketched heads' part of
    # update_sq_norms) and the aggregator's scalars (Aggregator.report)
    train_loss: float
    train_accuracy: float
    uplink_params: float
    times: dict[str, float]  # simulated round time: total, and compute/upload of the bottleneck


def validate_ranks(k, num_clients: int, rank: int) -> np.ndarray:
    """Checks the per-client kept ranks ``k_n`` on the host; returns int32."""
    k = np.asarray(k)
    if k.shape != (num_clients,):
        raise ValueError(f"Sketch sizes k have shape {k.shape}; expected ({num_clients},).")
    if not np.issubdtype(k.dtype, np.integer):
        if not np.isfinite(k).all() or (k != np.round(k)).any():
            raise ValueError("Sketch sizes k must be integers (k_n = rho_n * r rounded to the grid).")
    bad = np.flatnonzero((k < 1) | (k > rank))
    if bad.size:
        raise ValueError(f"Sketch size k must lie in [1, r={rank}]; client {bad[0]} has "
                         f"k={k[bad[0]]} (ratio must be in [1/r, 1]).")
    return k.astype(np.int32)


def ratio_to_rank(ratio, rank: int) -> np.ndarray:
    """``k = round(rho * r)``, at least 1."""
    return np.clip(np.round(np.asarray(ratio, np.float64) * rank), 1, rank).astype(np.int32)


CLIENTS = "clients"  # the mesh axis of the client dimension


def client_mesh(devices: int | None = None) -> Mesh:
    """A one-axis mesh ``clients`` over the first ``devices`` devices (``None``: all of them)."""
    available = jax.device_count()
    count = available if devices is None else devices
    if count > available:
        raise ValueError(f"federation.devices={count} but only {available} "
                         f"{jax.default_backend()} device(s) are visible; on a CPU set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before "
                         "importing jax.")
    return jax.make_mesh((count,), (CLIENTS,), (jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:count])


def check_mesh(mesh: Mesh, devices: int | None, chunk_size: int) -> int:
    """Validates a client mesh against the config; returns the chunk size padded to a multiple of
    the mesh's device count. A chunk below a device count the config asks for is an error; with
    ``devices`` unset it is padded up to the mesh, so the visible devices never break a config."""
    if mesh.axis_names != (CLIENTS,):
        raise ValueError(f"The mesh has axes {mesh.axis_names}; the engine shards clients over a "
                         f"one-axis mesh named {CLIENTS!r}: jax.make_mesh((n,), ({CLIENTS!r},)).")
    size = mesh.devices.size
    if devices is not None and devices != size:
        raise ValueError(f"The mesh has {size} device(s) but federation.devices={devices}; "
                         "pass a matching mesh or leave federation.devices unset.")
    if devices is not None and chunk_size < size:
        raise ValueError(f"federation.chunk_size={chunk_size} is below the {size} devices of the "
                         f"mesh: every device needs at least one client per chunk; use a multiple "
                         f"of {size} or fewer devices.")
    return -(-chunk_size // size) * size


def _chunk_step(graphdef, rngs, loss_fn, optimizer, steps, batch_size, block_size,
                aggregator: Aggregator, base, trainable, template, pool: ClientPool, acc,
                agg_server, agg_clients, ids, valid, q, k, key):
    """Trains this device's clients of a chunk and adds their weighted messages to the round's
    sums (``psum`` over the ``clients`` axis); updates the participants' per-client rows.
    Runs inside :func:`jax.shard_map`. ``acc`` is ``(sum of weighted messages, sum of weights)``."""
    chex.assert_equal_shape([ids, valid])
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i), 3))(ids)
    rows = jax.tree.map(lambda x: x[ids], agg_clients)
    trainable = jax.lax.pcast(trainable, CLIENTS, to="varying")  # each device trains its own copy
    starts, sketches = jax.vmap(aggregator.start, in_axes=(None, 0, None, 0, 0))(
        trainable, rows, template, k[ids], keys[:, 0])
    batches = jax.vmap(lambda i, kk: sample_batches(pool, i, kk, steps, batch_size))(ids, keys[:, 1])
    deltas, metrics = train_clients(graphdef, aggregator.client_base(base, agg_server), starts,
                                    sketches, batches, loss_fn=loss_fn, optimizer=optimizer,
                                    rngs=rngs, keys=keys[:, 2], block_size=block_size,
                                    trainable_axis=0)
    messages, factors = jax.vmap(aggregator.message)(starts, deltas, sketches)
    weights = jnp.where(valid, pool.weights[ids] / q[ids] * factors, 0.0)
    total, weight_sum = acc
    acc = (jax.tree.map(lambda s, m: s + jax.lax.psum(m, CLIENTS), total,
                        aggregator.reduce(weights, messages)),
           weight_sum + jax.lax.psum(weights.sum(), CLIENTS))
    gather = lambda x: jax.lax.all_gather(x, CLIENTS, tiled=True, to="invarying")
    if jax.tree.leaves(agg_clients):  # per-client state: write back the participants' rows
        new_rows = jax.vmap(aggregator.keep)(starts, deltas, rows)
        slots = gather(jnp.where(valid, ids, jax.tree.leaves(agg_clients)[0].shape[0]))
        agg_clients = jax.tree.map(lambda x, r: x.at[slots].set(gather(r), mode="drop"),
                                   agg_clients, new_rows)
    reports = {"sq_norm": sum(jnp.sum(d.reshape(d.shape[0], -1) ** 2, 1)
                              for d in jax.tree.leaves(deltas)),
               "head_sq_norm": jax.vmap(head_sq_norm)(deltas),
               **jax.vmap(aggregator.report)(starts, deltas, sketches)}
    metrics = jax.tree.map(lambda m: jax.lax.psum(jnp.where(valid, m, 0).sum(), CLIENTS), metrics)
    return acc, agg_clients, jax.tree.map(gather, reports), metrics


def _initial_state(optimizer, aggregator: Aggregator, trainable, weights, seed) -> ServerState:
    """Round 0: the global trainables, a fresh server optimizer and the aggregator's state."""
    return ServerState(trainable=trainable, opt_state=optimizer.init(trainable),
                       round=jnp.zeros((), jnp.int32), key=jax.random.key(seed),
                       clock=jnp.zeros((), jnp.float32),
                       agg=aggregator.init_state(trainable, weights))


def _server_step(optimizer, aggregator: Aggregator, state: ServerState, acc, round_time
                 ) -> ServerState:
    """The aggregator turns the round's sums into an update ``u`` of the global trainables (and its
    own server state); the server optimizer applies the pseudo-gradient ``-u``."""
    update, server = aggregator.finish(state.trainable, state.agg.server, *acc)
    updates, opt_state = optimizer.update(jax.tree.map(jnp.negative, update), state.opt_state,
                                          state.trainable)
    return state.replace(trainable=optax.apply_updates(state.trainable, updates),
                         opt_state=opt_state, round=state.round + 1,
                         clock=state.clock + round_time, agg=state.agg.replace(server=server))


class FederatedEngine:
    """Runs rounds of federated sketched LoRA over a :class:`ClientPool`.

    Compiled functions are built once here; ``run_round`` only packs participant ids on the host.
    ``clock(mask (N,), k (N,)) -> {"total": seconds, ...}`` advances the simulated wall-clock
    (see :func:`fedlora_jax.wireless.round_time`; the clock stands still when omitted).
    ``mesh``: a one-axis ``clients`` mesh to shard each chunk over (default: ``federation.devices``
    devices); ``chunk_size`` is the chunk size after padding to a multiple of its devices.
    """

    def __init__(self, parts: ModelParts, pool: ClientPool, loss_fn: LossFn, *,
                 client: ClientConfig = ClientConfig(),
                 client_optimizer: OptimizerConfig = OptimizerConfig(),
                 server_optimizer: OptimizerConfig = OptimizerConfig("sgd", 1.0),
                 federation: FederationConfig = FederationConfig(),
                 clock: Callable[[jax.Array, jax.Array], dict[str, jax.Array]] | None = None,
                 mesh: Mesh | None = None, aggregator: Aggregator | None = None):
        self.mesh = client_mesh(federation.devices) if mesh is None else mesh
        self.chunk_size = check_mesh(self.mesh, federation.devices, federation.chunk_size)
        self.aggregator = (Aggregator(shared_sketch=federation.shared_sketch) if aggregator is None
                           else aggregator)
        check_client_state_memory(self.aggregator, parts.trainable, pool.num_clients)
        self._replicated = jax.NamedSharding(self.mesh, jax.P())
        parts = dataclasses.replace(parts, **{name: jax.device_put(getattr(parts, name),
                                                                   self._replicated)
                                              for name in ("base", "trainable", "sketch")})
        pool = jax.device_put(pool, self._replicated)
        self.parts, self.pool, self.cfg, self.client_cfg = parts, pool, federation, client
        self.rank = int(jax.tree.leaves(parts.sketch)[0].shape[-1])
        self.adapter_sizes = adapter_sizes(parts.trainable)
        self._server_opt = make_optimizer(server_optimizer)
        self._sample = jax.jit(sampling.SCHEMES[federation.sampling])
        chunk_step = functools.partial(
            _chunk_step, parts.graphdef, parts.rngs, loss_fn, make_optimizer(client_optimizer),
            client.local_steps, client.batch_size, federation.block_size, self.aggregator)
        rep, sharded = jax.P(), jax.P(CLIENTS)
        specs = (rep, rep, rep, rep, rep, rep, rep, sharded, sharded, rep, rep, rep)
        self._chunk = jax.jit(
            jax.shard_map(chunk_step, mesh=self.mesh, in_specs=specs,
                          out_specs=(rep, rep, rep, rep)),
            in_shardings=tuple(jax.NamedSharding(self.mesh, spec) for spec in specs),
            donate_argnums=(4, 6))
        self._init = jax.jit(functools.partial(_initial_state, self._server_opt, self.aggregator),
                             out_shardings=self._replicated)  # fresh buffers: the state's are donated
        self._server = jax.jit(functools.partial(_server_step, self._server_opt, self.aggregator),
                               donate_argnames=("state",))
        self._clock = clock
        self._global_model = jax.jit(self.aggregator.global_model)
        self._client_model = jax.jit(self.aggregator.client_model)
        self._eval = jax.jit(lambda trainable, base, server, batch: loss_fn(
            nnx.merge(parts.eval_graphdef, trainable, parts.sketch, parts.rngs,
                      self.aggregator.client_base(base, server)), batch)[1])

    @property
    def num_clients(self) -> int:
        return self.pool.num_clients

    def default_q(self) -> np.ndarray:
        return np.full(self.num_clients, min(1.0, self.cfg.participants / self.num_clients),
                       np.float32)

    def default_k(self) -> np.ndarray:
        return ratio_to_rank(np.full(self.num_clients, self.cfg.sketch_ratio), self.rank)

    def init(self, seed: int | None = None) -> ServerState:
        """The first round's state, replicated over the mesh as every round leaves it (no retrace);
        built by a compiled function, which is how every process of a multi-host job gets it."""
        return self._init(self.parts.trainable, self.pool.weights,
                          self.cfg.seed if seed is None else seed)

    def compiled_chunk(self, state: ServerState) -> jax.stages.Compiled:
        """The compiled chunk step of this run (its ``memory_analysis()`` is a chunk's memory)."""
        ids = np.zeros(self.chunk_size, np.int32)
        q, k = jax.device_put((self.default_q(), self.default_k()), self._replicated)
        return self._chunk.lower(self.parts.base, state.trainable, self.parts.sketch, self.pool,
                                 self._zero_sums(state), state.agg.server, state.agg.clients, ids,
                                 ids > 0, q, k, state.key).compile()

    def _zero_sums(self, state: ServerState):
        return jax.device_put((self.aggregator.zeros(state.trainable), jnp.float32(0.0)),
                              self._replicated)

    def pack(self, participants: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pads participant ids to whole chunks: ``(num_chunks, C)`` ids and validity mask."""
        c = self.chunk_size
        num_chunks = -(-participants.size // c)
        ids = np.zeros(num_chunks * c, np.int32)
        ids[:participants.size] = participants
        valid = np.arange(num_chunks * c) < participants.size
        return ids.reshape(num_chunks, c), valid.reshape(num_chunks, c)

    def run_round(self, state: ServerState, q=None, k=None) -> tuple[ServerState, RoundResult]:
        """One round with per-client sampling probabilities ``q`` and kept ranks ``k``."""
        q = sampling.validate_probabilities(self.default_q() if q is None else q, self.num_clients)
        k = validate_ranks(self.default_k() if k is None else k, self.num_clients, self.rank)
        q_incl = sampling.inclusion_probabilities(self.cfg.sampling, q).astype(np.float32)
        key, k_sample, k_train = jax.random.split(state.key, 3)
        mask = self._sample(k_sample, jnp.asarray(q))
        participants = np.flatnonzero(np.asarray(mask)).astype(np.int32)
        ids, valid = self.pack(participants)
        acc, clients = self._zero_sums(state), state.agg.clients
        q_dev, k_dev = jax.device_put((q_incl, k), self._replicated)
        reports, totals = [], {}
        by_client = jax.NamedSharding(self.mesh, jax.P(CLIENTS))  # may span other processes
        for chunk in zip(ids, valid):
            acc, clients, chunk_reports, metrics = self._chunk(
                self.parts.base, state.trainable, self.parts.sketch, self.pool, acc,
                state.agg.server, clients, *jax.device_put(chunk, by_client), q_dev, k_dev, k_train)
            reports.append(chunk_reports)  # stays on device: no host sync between chunks
            totals = jax.tree.map(jnp.add, totals, metrics) if totals else metrics
        times = ({"total": jnp.float32(0.0)} if self._clock is None else self._clock(mask, k_dev))
        state = state.replace(key=key, agg=state.agg.replace(clients=clients))
        state = self._server(state, acc, times["total"])
        reports = ({name: np.concatenate([np.asarray(r[name]) for r in reports])[valid.ravel()]
                    for name in reports[0]} if reports else
                   {"sq_norm": np.zeros(0, np.float32), "head_sq_norm": np.zeros(0, np.float32)})
        sq = reports.pop("sq_norm")
        if not np.isfinite(sq).all():
            raise FloatingPointError(
                f"Client updates became NaN/inf in round {int(state.round)}: lower the client "
                "learning rate, add client_optimizer.clip_norm, or use a smaller server learning rate.")
        count = float(totals["count"]) if totals else 0.0
        uplink = self.aggregator.upload_params(k[participants], self.rank, self.adapter_sizes)
        return state, RoundResult(
            participants=participants, update_sq_norms=sq, reports=reports,
            train_loss=float(totals["loss_sum"]) / count if count else float("nan"),
            train_accuracy=float(totals["correct"]) / count if count else float("nan"),
            uplink_params=float(np.sum(uplink)),
            times={name: float(t) for name, t in times.items()})

    def evaluate(self, state: ServerState, examples: dict, batch_size: int = 64) -> dict[str, float]:
        """Loss and accuracy of the global model (un-sketched) on held-out examples."""
        trainable = self._global_model(state.trainable, state.agg)
        return _rates(self._score(trainable, state, examples, batch_size))

    def evaluate_personal(self, state: ServerState, examples: dict, owners: np.ndarray,
                          batch_size: int = 8) -> dict[str, float]:
        """Loss and accuracy with every held-out example scored by its owner's model
        (:meth:`Aggregator.client_model`: personalized rules such as FedSA-LoRA)."""
        owners = np.asarray(owners)
        if owners.shape != (next(iter(examples.values())).shape[0],):
            raise ValueError(f"owners has shape {owners.shape}: give one client per example.")
        totals = None
        for n in np.unique(owners):
            trainable = self._client_model(state.trainable, state.agg, jnp.int32(n))
            subset = {k: np.asarray(v)[owners == n] for k, v in examples.items()}
            m = self._score(trainable, state, subset, batch_size)
            totals = m if totals is None else jax.tree.map(jnp.add, totals, m)
        return _rates(totals)

    def _score(self, trainable: nnx.State, state: ServerState, examples: dict, batch_size: int):
        totals = None
        for batch in iterate_batches(examples, batch_size):
            m = self._eval(trainable, self.parts.base, state.agg.server, batch)
            totals = m if totals is None else jax.tree.map(jnp.add, totals, m)
        return totals


def _rates(totals: dict) -> dict[str, float]:
    count = float(totals["count"])
    return {"loss": float(totals["loss_sum"]) / count, "accuracy": float(totals["correct"]) / count}
