"""The federated round as array programs (docs/architecture.md, "One round, as data").

``key -> sampling mask (N) -> participant ids -> fixed-size chunks (C) -> sketch masks (C x r)
-> local training (vmap over C) -> weighted sum of deltas (a_n I_n / q_n) -> server optimizer``.

Shapes are static per run (chunk size, local steps, batch, sequence length), so a round never
recompiles whatever its number of participants; a round with no participant is legal (the server
applies a zero pseudo-gradient). Every client's randomness is ``fold_in(round_key, client_id)``, so
results do not depend on how participants are packed into chunks.

The client axis of a chunk is sharded over a one-axis device :class:`~jax.sharding.Mesh` (axis
``clients``) with :func:`jax.shard_map`; base weights, global trainables and the client pool are
replicated, and the chunk's weighted sum of deltas is reduced across devices with ``psum``. The
chunk step's arguments are named pytrees whose shardings are prefixes: :class:`Replicated` (what
every device holds), :class:`Carry` (the running :class:`Sums` and per-client rows, donated from
chunk to chunk) and :class:`Chunk` (ids and validity, sharded over ``clients``); it returns each
client's :class:`ClientReport`. One device is the mesh of size one, so the same program serves one
device, many, and many hosts (``jax.distributed.initialize()`` before building the engine;
``docs/benchmarks.md``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from fedlora_jax import sampling, solver
from fedlora_jax.aggregation import (Costs, Rule, RuleState, adapter_costs, adapter_sizes,
                                     check_client_state_memory, head_sq_norm, sketched)
from fedlora_jax.client import ClientConfig, LossFn, ModelParts, train_clients
from fedlora_jax.data.pool import ClientPool, iterate_batches, sample_batches
from fedlora_jax.optim import OptimizerConfig, make_optimizer
from fedlora_jax.tasks import summarize


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
    agg: RuleState  # the aggregation rule's own state (empty for FSLoRA's)


# ------------------------------------------------------------------------- the round's data, named

@struct.dataclass
class Replicated:
    """What every device holds while a round's chunks train (replicated over the mesh)."""

    base: nnx.State  # frozen base weights
    trainable: nnx.State  # the global adapter and heads
    template: nnx.State  # all-ones rank masks: one (r,) per LoRA layer
    pool: ClientPool
    server: dict  # the rule's server state (RuleState.server)
    q: jax.Array  # (N,) inclusion probabilities
    k: jax.Array  # (N,) int32 kept ranks
    key: jax.Array  # the round's training key; client n's is fold_in(key, n)


@struct.dataclass
class Chunk:
    """A chunk's client slots, sharded over the mesh axis ``clients``."""

    ids: jax.Array  # (C,) int32 client ids (padding slots repeat a valid id)
    valid: jax.Array  # (C,) bool: False on padding slots


@struct.dataclass
class Sums:
    """A round's running sums: of the weighted messages (shaped as :attr:`Rule.reduce`'s output)
    and of the weights ``a_n I_n / q_n`` times the messages' factors."""

    total: Any
    weight: jax.Array  # ()


@struct.dataclass
class Carry:
    """What one chunk hands the next (replicated, donated): the round's sums and the rule's
    per-client rows (:attr:`RuleState.clients`, leading axis ``N``)."""

    sums: Sums
    clients: dict


@struct.dataclass
class ClientReport:
    """What the simulator records of each client (leading axis: clients)."""

    update_sq_norm: jax.Array  # |delta_n|^2, for the G_n estimators
    head_sq_norm: jax.Array  # the part of update_sq_norm from the (never sketched) heads
    rule: Any  # the rule's own per-client report (Message.report; () for most rules)


@dataclasses.dataclass(frozen=True)
class LocalTraining:
    """How every client of a run trains, fixed when the engine is built: the model's graph and
    dropout state, the loss, the client optimizer (its rate may be replaced by a traced per-run
    rate, :func:`_chunk_step`), ``steps`` local steps of ``batch_size`` examples, and the vmapped
    block size (``None``: the whole chunk at once)."""

    graphdef: nnx.GraphDef
    rngs: nnx.State
    loss_fn: LossFn
    optimizer: OptimizerConfig
    steps: int
    batch_size: int
    block_size: int | None


@dataclasses.dataclass(frozen=True)
class RoundResult:
    """Host-side record of one round.

    Attributes:
      participants: (P,) client ids.
      clients: the participants' :class:`ClientReport` (host arrays, leading axis P).
      applied_sq_norm: ``|D|^2`` of the update the server applied to the global trainables.
      train_loss, train_accuracy: the participants' mean over their local steps.
      uplink_params: parameters all participants uploaded.
      times: simulated round time: ``total`` and its phases (:func:`fedlora_jax.wireless`).
    """

    participants: np.ndarray
    clients: ClientReport
    applied_sq_norm: float
    train_loss: float
    train_accuracy: float
    uplink_params: float
    times: dict[str, float]


def validate_ranks(k, num_clients: int, rank: int) -> np.ndarray:
    """Checks the per-client kept ranks on the host.

    Args:
      k: ``(num_clients,)`` integers (or integral floats) in ``[1, rank]``.
      num_clients, rank: ``N`` and the global LoRA rank ``r``.
    Returns:
      ``k`` as int32. Raises ``ValueError`` naming the first bad client.
    """
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


def _chunk_step(local: LocalTraining, rule: Rule, rate: jax.Array | None, shared: Replicated,
                carry: Carry, chunk: Chunk) -> tuple[Carry, ClientReport, dict]:
    """Trains this device's clients of a chunk and adds their weighted messages to the round's
    sums (``psum`` over the ``clients`` axis); writes back the participants' per-client rows.
    Runs inside :func:`jax.shard_map`; returns the new carry, the chunk's :class:`ClientReport`
    (gathered over devices, ``(C,)``) and its summed training metrics. ``rate`` replaces the
    client optimizer's learning rate (a packed run's own; ``None``: the configured one)."""
    ids, valid = chunk.ids, chunk.valid
    chex.assert_equal_shape([ids, valid])
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(shared.key, i), 3))(ids)
    rows = jax.tree.map(lambda x: x[ids], carry.clients)
    trainable = jax.lax.pcast(shared.trainable, CLIENTS, to="varying")  # each device its own copy
    starts, sketches = jax.vmap(rule.start, in_axes=(None, 0, None, 0, 0))(
        trainable, rows, shared.template, shared.k[ids], keys[:, 0])
    batches = jax.vmap(lambda i, key: sample_batches(shared.pool, i, key, local.steps,
                                                     local.batch_size))(ids, keys[:, 1])
    deltas, metrics = train_clients(local.graphdef, rule.base(shared.base, shared.server), starts,
                                    sketches, batches, loss_fn=local.loss_fn,
                                    optimizer=make_optimizer(local.optimizer, rate),
                                    rngs=local.rngs, keys=keys[:, 2],
                                    block_size=local.block_size, trainable_axis=0)
    messages = jax.vmap(rule.message)(starts, deltas, sketches)
    weights = jnp.where(valid, shared.pool.weights[ids] / shared.q[ids] * messages.factor, 0.0)
    psum = lambda x: jax.lax.psum(x, CLIENTS)
    sums = Sums(total=jax.tree.map(lambda s, m: s + psum(m), carry.sums.total,
                                   rule.reduce(weights, messages.value)),
                weight=carry.sums.weight + psum(weights.sum()))
    gather = lambda x: jax.lax.all_gather(x, CLIENTS, tiled=True, to="invarying")
    clients = carry.clients
    if jax.tree.leaves(clients):  # per-client state: write back the participants' rows
        new_rows = jax.vmap(rule.keep)(starts, deltas, rows)
        slots = gather(jnp.where(valid, ids, jax.tree.leaves(clients)[0].shape[0]))
        clients = jax.tree.map(lambda x, r: x.at[slots].set(gather(r), mode="drop"),
                               clients, new_rows)
    report = ClientReport(update_sq_norm=sum(jnp.sum(d.reshape(d.shape[0], -1) ** 2, 1)
                                             for d in jax.tree.leaves(deltas)),
                          head_sq_norm=jax.vmap(head_sq_norm)(deltas), rule=messages.report)
    metrics = jax.tree.map(lambda m: psum(jnp.where(valid, m, 0).sum()), metrics)
    return Carry(sums=sums, clients=clients), jax.tree.map(gather, report), metrics


def _one_client_shapes(rule: Rule, trainable: nnx.State, template: nnx.State, clients: dict):
    """``(shapes of rule.reduce's output, shapes of one client's report)``, by tracing one client
    through ``start``, ``message`` and ``reduce`` abstractly (nothing runs)."""
    def one_client(trainable, template, clients):
        rows = jax.tree.map(lambda x: x[0], clients)
        start, sketch = rule.start(trainable, rows, template, jnp.int32(1), jax.random.key(0))
        message = rule.message(start, start, sketch)
        values = jax.tree.map(lambda x: x[None], message.value)
        return rule.reduce(jnp.zeros(1, jnp.float32), values), message.report
    return jax.eval_shape(one_client, trainable, template, clients)


def _train_chunks(chunk_step: Callable, carry: Carry, ids: np.ndarray, valid: np.ndarray,
                  by_client: jax.sharding.Sharding) -> tuple[Carry, list[ClientReport], dict]:
    """A round's chunks (``ids``, ``valid``: leading axis the chunk) through ``chunk_step(carry,
    chunk)`` -> (the last carry, each chunk's report, the summed training metrics; ``{}`` for
    no chunk). Reports stay on the device: no host sync between chunks."""
    reports, metric_sums = [], {}
    for chunk in zip(ids, valid):
        carry, report, metrics = chunk_step(carry, jax.device_put(Chunk(*chunk), by_client))
        reports.append(report)
        metric_sums = _added(metric_sums, metrics) if metric_sums else metrics
    return carry, reports, metric_sums


def _zero_sums(shapes, lead: tuple[int, ...] = ()) -> Sums:
    """Zero :class:`Sums` of the rule's ``reduce`` output ``shapes``, with leading axes ``lead``
    (a pack's runs)."""
    zeros = lambda shape, dtype: jnp.zeros(lead + shape, dtype)
    return Sums(jax.tree.map(lambda s: zeros(s.shape, s.dtype), shapes), zeros((), jnp.float32))


def _added(*trees):
    """The trees' sum, leaf by leaf (metric totals over chunks or batches)."""
    return functools.reduce(lambda a, b: jax.tree.map(jnp.add, a, b), trees)


def _scorer(parts: ModelParts, rule: Rule, loss_fn: LossFn) -> Callable:
    """``(trainable, base, server, batch) -> metric sums`` of the model the rule evaluates on
    (dropout off: ``parts.eval_graphdef``)."""
    return lambda trainable, base, server, batch: loss_fn(
        nnx.merge(parts.eval_graphdef, trainable, parts.sketch, parts.rngs,
                  rule.base(base, server)), batch)[1]


def _initial_state(optimizer: OptimizerConfig, rule: Rule, rate: jax.Array | None, trainable,
                   weights, seed) -> ServerState:
    """Round 0: the global trainables, a fresh server optimizer (learning rate ``rate``, as in
    :func:`_server_step`) and the rule's state."""
    opt_state = make_optimizer(optimizer, rate).init(trainable)
    return ServerState(trainable=trainable, opt_state=opt_state,
                       round=jnp.zeros((), jnp.int32), key=jax.random.key(seed),
                       clock=jnp.zeros((), jnp.float32), agg=rule.init(trainable, weights))


def _server_step(optimizer: OptimizerConfig, rule: Rule, rate: jax.Array | None,
                 state: ServerState, sums: Sums, round_time) -> tuple[ServerState, jax.Array]:
    """The rule turns the round's sums into an update ``u`` of the global trainables (and its own
    server state); the server optimizer applies the pseudo-gradient ``-u`` with learning rate
    ``rate`` (a packed run's own; ``None``: the configured one). Also returns ``|D|^2``, the
    squared norm of the change it made to the global trainables."""
    update, server = rule.finish(state.trainable, state.agg.server, sums.total, sums.weight)
    updates, opt_state = make_optimizer(optimizer, rate).update(
        jax.tree.map(jnp.negative, update), state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    applied = sum(jnp.sum((new - old) ** 2) for new, old in
                  zip(jax.tree.leaves(trainable), jax.tree.leaves(state.trainable)))
    return state.replace(trainable=trainable, opt_state=opt_state, round=state.round + 1,
                         clock=state.clock + round_time,
                         agg=state.agg.replace(server=server)), applied


class FederatedEngine:
    """Runs rounds of federated sketched LoRA over a :class:`ClientPool`.

    What is per run and stays on the host lives here: checking and defaulting ``q`` and ``k``,
    chunking the participants, the clock, the costs and the round's report. The compiled round
    is the engine's pack of one (:attr:`pack_of_one`, a :class:`PackedEngine` without the run
    axis), built once here: a run alone and a pack of runs share one round's code.

    Args:
      parts: the split model (:func:`fedlora_jax.client.split_model`).
      pool: the registered clients' data.
      loss_fn: ``(model, batch) -> (loss, metrics)`` with ``loss_sum``, ``correct``, ``count``.
      client, client_optimizer: local training (steps, batch) and the clients' optimizer.
      server_optimizer: applies the rule's update as a pseudo-gradient (default: FedAvg).
      federation: sampling scheme, chunk and block sizes, default ``q`` and sketch ratio, devices.
      clock: ``(mask (N,), k (N,)) -> {"total": seconds, ...}`` advances the simulated wall-clock
        (see :func:`fedlora_jax.wireless.round_time`; it stands still when omitted).
      mesh: a one-axis ``clients`` mesh to shard each chunk over (default: ``federation.devices``
        devices); ``chunk_size`` is the chunk size after padding to a multiple of its devices.
      rule: the method's aggregation rule (default: FSLoRA's, :func:`aggregation.sketched`).
      costs: the method's costs, for ``RoundResult.uplink_params`` (default: the whole adapter).
    """

    def __init__(self, parts: ModelParts, pool: ClientPool, loss_fn: LossFn, *,
                 client: ClientConfig = ClientConfig(),
                 client_optimizer: OptimizerConfig = OptimizerConfig(),
                 server_optimizer: OptimizerConfig = OptimizerConfig("sgd", 1.0),
                 federation: FederationConfig = FederationConfig(),
                 clock: Callable[[jax.Array, jax.Array], dict[str, jax.Array]] | None = None,
                 mesh: Mesh | None = None, rule: Rule | None = None, costs: Costs | None = None):
        self.mesh = client_mesh(federation.devices) if mesh is None else mesh
        self.chunk_size = check_mesh(self.mesh, federation.devices, federation.chunk_size)
        self.rule = sketched(federation.shared_sketch) if rule is None else rule
        check_client_state_memory(self.rule, parts.trainable, pool.num_clients)
        replicated = jax.NamedSharding(self.mesh, jax.P())
        parts = dataclasses.replace(parts, **{name: jax.device_put(getattr(parts, name),
                                                                   replicated)
                                              for name in ("base", "trainable", "sketch")})
        pool = jax.device_put(pool, replicated)
        self.parts, self.pool, self.cfg, self.client_cfg = parts, pool, federation, client
        self.rank = int(jax.tree.leaves(parts.sketch)[0].shape[-1])
        self.adapter_sizes = adapter_sizes(parts.trainable)
        self.costs = adapter_costs(self.adapter_sizes, self.rank) if costs is None else costs
        rows = jax.eval_shape(lambda: self.rule.init(parts.trainable, pool.weights).clients)
        self.personalized = bool(jax.tree.leaves(rows))  # clients keep their own state
        self._sum_shapes, self._report_shapes = _one_client_shapes(
            self.rule, parts.trainable, parts.sketch, rows)
        self.client_optimizer, self.server_optimizer = client_optimizer, server_optimizer
        self.local = LocalTraining(parts.graphdef, parts.rngs, loss_fn, client_optimizer,
                                   client.local_steps, client.batch_size, federation.block_size)
        self._clock = clock
        self.pack_of_one = PackedEngine([self], stacked=False)

    @property
    def num_clients(self) -> int:
        """``N``, the registered clients."""
        return self.pool.num_clients

    def default_q(self) -> np.ndarray:
        """``(N,)`` float32: ``participants / N`` (clipped to 1) for every client."""
        return np.full(self.num_clients, min(1.0, self.cfg.participants / self.num_clients),
                       np.float32)

    def default_k(self) -> np.ndarray:
        """``(N,)`` int32: the configured sketch ratio's rank ``round(rho r)`` for every client."""
        rho = jnp.full(self.num_clients, self.cfg.sketch_ratio, jnp.float32)
        return np.asarray(solver.round_rho(rho, self.rank))

    def init(self, seed: int | None = None) -> ServerState:
        """The first round's state, replicated over the mesh as every round leaves it (no retrace);
        built by a compiled function, which is how every process of a multi-host job gets it.

        Args:
          seed: seeds the run's key (default: ``federation.seed``).
        """
        return self.pack_of_one.init([self.cfg.seed if seed is None else seed])

    def compiled_chunk(self, state: ServerState) -> jax.stages.Compiled:
        """The compiled chunk step of this run for ``state`` (its ``memory_analysis()`` is a
        chunk's memory)."""
        return self.pack_of_one.compiled_chunk(state)

    def pack(self, participants: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pads participant ids to whole chunks.

        Args:
          participants: ``(P,)`` int client ids.
        Returns:
          ``(num_chunks, C)`` int32 ids and the bool validity mask of the same shape
          (``num_chunks = ceil(P / C)``, zero for ``P = 0``).
        """
        c = self.chunk_size
        num_chunks = -(-participants.size // c)
        ids = np.zeros(num_chunks * c, np.int32)
        ids[:participants.size] = participants
        valid = np.arange(num_chunks * c) < participants.size
        return ids.reshape(num_chunks, c), valid.reshape(num_chunks, c)

    def run_round(self, state: ServerState, q=None, k=None) -> tuple[ServerState, RoundResult]:
        """One round: sample, train the participants chunk by chunk, aggregate, advance the clock
        (:meth:`PackedEngine.run_round` of the pack of one).

        Args:
          state: the run's state; its buffers are donated (use the returned state).
          q: ``(N,)`` sampling probabilities in ``(0, 1]`` (default :meth:`default_q`).
          k: ``(N,)`` integer kept ranks in ``[1, r]`` (default :meth:`default_k`).
        Returns:
          The next state and the round's :class:`RoundResult`.
        Raises:
          FloatingPointError: a client's update is not finite.
        """
        state, (result,) = self.pack_of_one.run_round(state, [(q, k)])
        return state, result

    def checked_plan(self, q=None, k=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(q, k, inclusion probabilities)`` of a round, checked on the host (defaults:
        :meth:`default_q`, :meth:`default_k`); ValueError names the first bad client."""
        q = sampling.validate_probabilities(self.default_q() if q is None else q, self.num_clients)
        k = validate_ranks(self.default_k() if k is None else k, self.num_clients, self.rank)
        return q, k, sampling.inclusion_probabilities(self.cfg.sampling, q).astype(np.float32)

    def _result(self, round: int, participants: np.ndarray, reports: list[ClientReport],
                valid: np.ndarray, applied, metric_sums: dict, k: np.ndarray, times: dict
                ) -> RoundResult:
        """The round's :class:`RoundResult` on the host from its chunks' outputs; raises
        FloatingPointError when a client's update is not finite."""
        clients = self._participants_report(reports, valid)
        if not np.isfinite(clients.update_sq_norm).all():
            raise FloatingPointError(
                f"Client updates became NaN/inf in round {round}: lower the client "
                "learning rate, add client_optimizer.clip_norm, or use a smaller server learning rate.")
        count = float(metric_sums["count"]) if metric_sums else 0.0
        return RoundResult(
            participants=participants, clients=clients, applied_sq_norm=float(applied),
            train_loss=float(metric_sums["loss_sum"]) / count if count else float("nan"),
            train_accuracy=float(metric_sums["correct"]) / count if count else float("nan"),
            uplink_params=float(np.sum(self.costs.upload(k[participants]))),
            times={name: float(t) for name, t in times.items()})

    def _participants_report(self, reports: list[ClientReport], valid: np.ndarray
                             ) -> ClientReport:
        """The chunks' reports on the host, padding slots dropped (empty rows for no chunk)."""
        if not reports:
            return ClientReport(
                update_sq_norm=np.zeros(0, np.float32), head_sq_norm=np.zeros(0, np.float32),
                rule=jax.tree.map(lambda s: np.zeros((0,) + s.shape, s.dtype),
                                  self._report_shapes))
        return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs])[valid.ravel()],
                            *reports)

    def evaluate(self, state: ServerState, examples: dict, batch_size: int = 64) -> dict[str, float]:
        """Loss and accuracy of the global model (un-sketched, :attr:`Rule.model`).

        Args:
          state: the run's state (not donated).
          examples: held-out examples, arrays with a leading example axis.
          batch_size: examples per compiled evaluation call.
        """
        (scores,) = self.pack_of_one.evaluate(state, [examples], batch_size)
        return scores

    def evaluate_personal(self, state: ServerState, examples: dict, owners: np.ndarray,
                          batch_size: int = 8) -> dict[str, float]:
        """Loss and accuracy with every held-out example scored by its owner's model
        (``Rule.model(..., client)``: personalized rules such as FedSA-LoRA).

        Args:
          state: the run's state (not donated).
          examples: held-out examples, arrays with a leading example axis ``H``.
          owners: ``(H,)`` the client each example belongs to.
          batch_size: examples per compiled evaluation call.
        """
        owners = np.asarray(owners)
        if owners.shape != (next(iter(examples.values())).shape[0],):
            raise ValueError(f"owners has shape {owners.shape}: give one client per example.")
        return summarize(_added(*(
            self.pack_of_one.totals(state, [{name: np.asarray(v)[owners == n]
                                             for name, v in examples.items()}],
                                    batch_size, client=n)
            for n in np.unique(owners))))


# ------------------------------------------------------------------------------- packed runs

def rule_signature(rule: Rule) -> tuple:
    """What decides the program a rule traces: its functions, and for partials (``sketched()``
    built twice) the function and arguments. Rules of equal signatures pack together."""
    def of(f):
        if isinstance(f, functools.partial):
            return f.func, f.args, tuple(sorted(f.keywords.items()))
        return f
    return tuple(of(f) for f in rule)


def _padded(x: jax.Array, length: int) -> jax.Array:
    """``x`` zero-padded along its first axis to ``length`` (``x`` itself at that length)."""
    if x.shape[0] == length:
        return x
    return jnp.pad(x, [(0, length - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _padded_pools(pools: list[ClientPool]) -> list[ClientPool]:
    """Pools of the same clients' count, made one shape to stack on a run axis. Runs that hold
    out different numbers of examples have pools of different sizes: examples and the client
    index are zero-padded to the largest (no client's ``offsets``/``sizes`` reach the
    padding)."""
    examples = max(p.num_examples for p in pools)
    assigned = max(p.order.shape[0] for p in pools)
    return [p.replace(examples={k: _padded(v, examples) for k, v in p.examples.items()},
                      order=_padded(p.order, assigned)) for p in pools]


def _batches_of_runs(examples: list[dict], batch_size: int) -> list[list[dict]]:
    """Every run's evaluation batches (:func:`iterate_batches`), as many for each: a run with
    fewer gets fully masked ones (``example_mask`` 0), which add nothing."""
    per_run = [list(iterate_batches(ex, batch_size)) for ex in examples]
    count = max(len(batches) for batches in per_run)
    return [batches + [{**batches[0], "example_mask": np.zeros(batch_size, np.float32)}]
            * (count - len(batches)) for batches in per_run]


class RunFloatingPointError(FloatingPointError):
    """A run's client updates are not finite; ``run`` is its index in the pack (0 alone)."""

    def __init__(self, run: int, message: str):
        super().__init__(message)
        self.run = run


class PackedEngine:
    """A round of ``R`` independent runs of the same shapes as one compiled program
    (docs/architecture.md, "Packed runs"), and the round of one run: the round's code, written
    once.

    Each run keeps its own :class:`FederatedEngine` for what stays on the host (checking and
    defaulting ``q`` and ``k``, chunking its participants, the clock, the costs, the reports).
    Stacked (the default), the device state of all runs is one :class:`ServerState` with a
    leading run axis ``R``, and every compiled step is :func:`jax.vmap` of the one-run step over
    that axis, inside the same ``shard_map`` over the ``clients`` mesh axis: the vmap reuses the
    round's code and every :class:`Rule` unchanged (segment sums over ``(run, client)`` slots
    would have to re-express each rule's ``reduce``). Runs with fewer chunks get chunks of
    padding only, so a chunk is ``(R, C)`` slots and one compiled program serves every round
    whatever each run's number of participants. The base weights enter the vmap unbatched when
    every run has the same (a pretrained checkpoint), else stacked (the tiny model's random base
    depends on the seed); pools are stacked (:func:`_padded_pools`). Unstacked
    (``stacked=False``, one run: :attr:`FederatedEngine.pack_of_one`), the state is the run's
    own and the steps are not vmapped, so a run alone compiles the one-run program.

    What may differ between the runs: seeds (data split, initialization, network, sampling
    keys), client and server learning rates (traced per-run arguments), ``q`` and ``k``
    (strategies of the same rule), the clock. What must not: the model's and the pool's shapes,
    the rule (:func:`rule_signature`), the sampling scheme, local steps, batch and chunk sizes,
    the optimizers but for their rates, and the mesh; a personalized rule (per-client
    evaluation) does not pack.

    Args:
      engines: one engine per run, built as for a run of its own.
      stacked: ``False`` for one engine's own rounds, without the run axis.
    """

    def __init__(self, engines: list[FederatedEngine], stacked: bool = True):
        if stacked:
            check_packable(engines)
        elif len(engines) != 1:
            raise ValueError(f"An unstacked pack is one run, got {len(engines)}.")
        self.engines, self.stacked = engines, stacked
        first = engines[0]
        self.mesh, self.chunk_size, self.rule = first.mesh, first.chunk_size, first.rule
        self._replicated = jax.NamedSharding(self.mesh, jax.P())
        runs = (None,) * stacked  # the run axis of a chunk's slots, unsharded
        self._by_client = jax.NamedSharding(self.mesh, jax.P(*runs, CLIENTS))  # may span processes
        shared_base = all(_trees_equal(first.parts.base, e.parts.base) for e in engines[1:])
        put = lambda x: jax.device_put(x, self._replicated)
        self.base = put(first.parts.base if shared_base else
                        self._joined([e.parts.base for e in engines]))
        self.pool = put(self._joined(_padded_pools([e.pool for e in engines])))
        self.template = first.parts.sketch
        self._trainable = put(self._joined([e.parts.trainable for e in engines]))
        self._rates = {role: put(jnp.asarray([getattr(e, f"{role}_optimizer").learning_rate
                                              for e in engines], jnp.float32))
                       if stacked else None for role in ("client", "server")}
        lift = jax.vmap if stacked else lambda f, in_axes=0: f  # the one-run step over the runs
        base_axis = None if shared_base else 0
        axes = Replicated(base=base_axis, trainable=0, template=None, pool=0, server=0, q=0,
                          k=0, key=0)
        rep = jax.P()
        self._chunk = jax.jit(
            jax.shard_map(lift(functools.partial(_chunk_step, first.local, self.rule),
                               in_axes=(0, axes, 0, 0)),
                          mesh=self.mesh, in_specs=(rep, rep, rep, self._by_client.spec),
                          out_specs=rep),
            in_shardings=(self._replicated, self._replicated, self._replicated,
                          self._by_client),
            donate_argnums=2)  # the carry
        self._init = jax.jit(lift(functools.partial(_initial_state, first.server_optimizer,
                                                    self.rule)),
                             out_shardings=self._replicated)  # fresh buffers (donated later)
        self._server = jax.jit(lift(functools.partial(_server_step, first.server_optimizer,
                                                      self.rule)),
                               donate_argnums=1)  # the state
        self._split_key = jax.jit(lift(lambda key: tuple(jax.random.split(key, 3))))
        self._sample = jax.jit(lift(sampling.SCHEMES[first.cfg.sampling]))
        self._model = jax.jit(lift(self.rule.model))
        self._eval = jax.jit(lift(_scorer(first.parts, self.rule, first.local.loss_fn),
                                  in_axes=(0, base_axis, 0, 0)))

    @property
    def num_runs(self) -> int:
        return len(self.engines)

    def _joined(self, per_run: list, stack: Callable = jnp.stack, axis: int = 0) -> Any:
        """The runs' trees, their leaves stacked on a new run axis (``axis``; ``np.stack`` keeps
        host arrays on the host); a lone run's tree as it is."""
        if not self.stacked:
            (tree,) = per_run
            return tree
        return jax.tree.map(lambda *xs: stack(xs, axis=axis), *per_run)

    def _run(self, tree: Any, r: int) -> Any:
        """Run ``r``'s part of a tree on the run axis; a lone run's tree as it is."""
        return jax.tree.map(lambda x: x[r], tree) if self.stacked else tree

    def _runs(self, tree: Any) -> list:
        """Every run's part of a tree on the run axis."""
        return [self._run(tree, r) for r in range(self.num_runs)]

    def init(self, seeds: list[int]) -> ServerState:
        """Every run's first state (run ``r`` as ``engines[r].init(seeds[r])``), stacked."""
        return self._init(self._rates["server"], self._trainable, self.pool.weights,
                          self._joined([np.int32(seed) for seed in seeds], np.stack))

    def run_round(self, state: ServerState, plans: list[tuple]
                  ) -> tuple[ServerState, list[RoundResult]]:
        """One round of every run: sample, train the participants chunk by chunk, aggregate,
        advance the clock, all runs in the same compiled calls.

        Args:
          state: the runs' state; its buffers are donated (use the returned state).
          plans: per run, ``(q, k)`` (``None`` for the engine's default).
        Returns:
          The next state and each run's :class:`RoundResult`.
        Raises:
          RunFloatingPointError: a run's client update is not finite (the first such run).
        """
        checked = [e.checked_plan(q, k) for e, (q, k) in zip(self.engines, plans, strict=True)]
        q, k, q_incl = (self._joined(x, np.stack) for x in zip(*checked))
        key, sample_key, train_key = self._split_key(state.key)
        masks = self._sample(sample_key, jnp.asarray(q))
        participants = [np.flatnonzero(m).astype(np.int32) for m in self._runs(np.asarray(masks))]
        chunked = self._chunked(participants)
        ids, valid = (self._joined(x, np.stack, axis=1) for x in zip(*chunked))
        shared = self._replicated_of(state, q_incl, k, train_key)
        carry, reports, metric_sums = _train_chunks(
            functools.partial(self._chunk, self._rates["client"], shared),
            self._new_carry(state), ids, valid, self._by_client)
        times = [{"total": jnp.float32(0.0)} if e._clock is None else e._clock(m, k_r)
                 for e, m, k_r in zip(self.engines, self._runs(masks), self._runs(shared.k))]
        state = state.replace(key=key, agg=state.agg.replace(clients=carry.clients))
        state, applied = self._server(self._rates["server"], state, carry.sums,
                                      self._joined([t["total"] for t in times]))
        reports, metric_sums, applied, rounds = jax.device_get(
            (reports, metric_sums, applied, state.round))
        results = []
        for r, engine in enumerate(self.engines):
            try:
                results.append(engine._result(
                    int(self._run(rounds, r)), participants[r], self._run(reports, r),
                    chunked[r][1], self._run(applied, r), self._run(metric_sums, r),
                    checked[r][1], times[r]))
            except FloatingPointError as e:
                raise RunFloatingPointError(r, f"run {r}: {e}" if self.stacked else str(e)
                                            ) from None
        return state, results

    def _chunked(self, participants: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every run's participants in chunks (:meth:`FederatedEngine.pack`), the runs with
        fewer chunks padded with empty ones: per run ``(num_chunks, C)`` ids and validity."""
        packed = [e.pack(p) for e, p in zip(self.engines, participants)]
        num_chunks = max(ids.shape[0] for ids, _ in packed)
        pad = lambda x: np.concatenate([x, np.zeros((num_chunks - len(x), self.chunk_size),
                                                    x.dtype)])
        return [(pad(ids), pad(valid)) for ids, valid in packed]

    def _replicated_of(self, state: ServerState, q: np.ndarray, k: np.ndarray, key: jax.Array
                       ) -> Replicated:
        q, k = jax.device_put((q, k), self._replicated)
        return Replicated(base=self.base, trainable=state.trainable, template=self.template,
                          pool=self.pool, server=state.agg.server, q=q, k=k, key=key)

    def _new_carry(self, state: ServerState) -> Carry:
        """Zero sums and the state's per-client rows: what the round's first chunk starts from."""
        lead = (self.num_runs,) * self.stacked
        return Carry(sums=jax.device_put(_zero_sums(self.engines[0]._sum_shapes, lead),
                                         self._replicated),
                     clients=state.agg.clients)

    def compiled_chunk(self, state: ServerState) -> jax.stages.Compiled:
        """The compiled chunk step for ``state`` (its ``memory_analysis()`` is a chunk's
        memory), with every run's default plan."""
        q, k, q_incl = (self._joined(x, np.stack) for x in
                        zip(*(e.checked_plan() for e in self.engines)))
        ids = self._joined([np.zeros(self.chunk_size, np.int32)] * self.num_runs, np.stack)
        return self._chunk.lower(self._rates["client"],
                                 self._replicated_of(state, q_incl, k, state.key),
                                 self._new_carry(state), Chunk(ids, ids > 0)).compile()

    def run_state(self, state: ServerState, r: int) -> ServerState:
        """Run ``r``'s own state, as :class:`FederatedEngine` holds it (e.g. to checkpoint)."""
        return self._run(state, r)

    def stack(self, states: list[ServerState]) -> ServerState:
        """The runs' own states as one stacked state (e.g. restored checkpoints)."""
        return jax.device_put(self._joined(states), self._replicated)

    def evaluate(self, state: ServerState, examples: list[dict], batch_size: int = 64
                 ) -> list[dict[str, float]]:
        """Every run's loss and accuracy of its global model (un-sketched, :attr:`Rule.model`)
        on its own held-out ``examples[r]``, in the same compiled calls."""
        return [summarize(t) for t in self._runs(self.totals(state, examples, batch_size))]

    def totals(self, state: ServerState, examples: list[dict], batch_size: int,
               client: int | None = None) -> dict:
        """The summed metrics (host arrays on the run axis) of every run's model on its
        ``examples[r]``; with ``client`` (a run alone), of that client's model
        (``Rule.model(..., client)``)."""
        trainable = self._model(state.trainable, state.agg,
                                *(() if client is None else (jnp.int32(client),)))
        return jax.device_get(_added(*(
            self._eval(trainable, self.base, state.agg.server, self._joined(list(batch), np.stack))
            for batch in zip(*_batches_of_runs(examples, batch_size)))))


def _trees_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x is y or (x.shape == y.shape and bool(np.array_equal(x, y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def check_packable(engines: list[FederatedEngine]) -> None:
    """Raises ValueError naming the first thing that keeps ``engines`` from one compiled
    program (:class:`PackedEngine`): a different rule, sampling scheme, local training, optimizer
    (but its rate), chunking, mesh, client count or model shapes, or a personalized rule."""
    if not engines:
        raise ValueError("A pack needs at least one run.")
    first = engines[0]
    if first.personalized:
        raise ValueError("A personalized rule (per-client state and evaluation) does not pack: "
                         "run it on its own (--no-pack).")
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    rate = lambda cfg: dataclasses.replace(cfg, learning_rate=1.0)
    checks = {
        "the aggregation rule": lambda e: rule_signature(e.rule) == rule_signature(first.rule),
        "the sampling scheme": lambda e: e.cfg.sampling == first.cfg.sampling,
        "local training (steps, batch, block size, loss)": lambda e: (
            e.local.steps, e.local.batch_size, e.local.block_size, e.local.loss_fn) == (
            first.local.steps, first.local.batch_size, first.local.block_size,
            first.local.loss_fn),
        "the optimizers (but their learning rates)": lambda e: (
            rate(e.client_optimizer), rate(e.server_optimizer)) == (
            rate(first.client_optimizer), rate(first.server_optimizer)),
        "the chunk size and mesh": lambda e: (e.chunk_size, e.mesh) == (first.chunk_size,
                                                                      first.mesh),
        "the number of clients": lambda e: e.num_clients == first.num_clients,
        "the model's shapes": lambda e: (
            shapes((e.parts.base, e.parts.trainable, e.parts.sketch))
            == shapes((first.parts.base, first.parts.trainable, first.parts.sketch))
            and e.parts.graphdef == first.parts.graphdef),
        "the examples' shapes": lambda e: (
            shapes({k: v[0] for k, v in e.pool.examples.items()})
            == shapes({k: v[0] for k, v in first.pool.examples.items()})),
    }
    for r, engine in enumerate(engines[1:], 1):
        for what, same in checks.items():
            if not same(engine):
                raise ValueError(f"Run {r} differs from run 0 in {what}, so they cannot share "
                                 "one compiled program: run them apart (--no-pack).")

