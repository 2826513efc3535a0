"""How client updates become the next global adapter: the engine's aggregation hook.

An :class:`Aggregator` answers, inside the compiled chunk step, five questions the engine asks of
every client and every round (``docs/method.md``, "Aggregation rules"):

1. what the client starts from (:meth:`~Aggregator.start`: its adapter and rank mask);
2. what it sends (:meth:`~Aggregator.message`, with a weight factor; the engine multiplies it
   by ``a_n I_n / q_n``);
3. how a chunk's messages are summed (:meth:`~Aggregator.reduce`, then ``psum`` over devices);
4. what the server makes of the round's sums (:meth:`~Aggregator.finish`: the update of the global
   trainables, applied by the server optimizer, and the aggregator's own server state);
5. what the client keeps (:meth:`~Aggregator.keep`: per-client rows, e.g. FedSA-LoRA's local ``B``).

It also declares what a round costs beyond local training (:meth:`~Aggregator.upload_params`,
:meth:`~Aggregator.download_params`, :meth:`~Aggregator.server_flops`), so the wall-clock model
charges each method fairly. The base class is FSLoRA's rule (the paper's): random rank sketches
scaled ``r / k``, deltas summed with ``a_n I_n / q_n``. The helpers below (LoRA factors by layer,
prefix masks, zero-padding, stacking, truncated SVD) are the shared primitives of the other rules,
which live beside their strategies in :mod:`fedlora_jax.strategies`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx, struct

from fedlora_jax.lora import HeadParam, LoRAA, LoRAB, by_layer, layer_key
from fedlora_jax.sketch import draw_sketch, restrict_to_sketch

Factors = dict[str, tuple[jax.Array, jax.Array]]  # layer path -> (A: d_in x r, B: r x d_out)


@struct.dataclass
class AggregatorState:
    """An aggregator's state in :class:`~fedlora_jax.engine.ServerState`: ``server`` (replicated,
    e.g. FLoRA's merged products) and ``clients`` (leaves with a leading client axis ``N``)."""

    server: dict
    clients: dict


@dataclasses.dataclass(frozen=True)
class AdapterSizes:
    """Parameter counts of the trainables, for payload and server-cost accounting."""

    lora_a: int
    lora_b: int
    head: int
    layers: tuple[tuple[int, int], ...]  # (d_in, d_out) of every LoRA layer

    @property
    def lora(self) -> int:
        return self.lora_a + self.lora_b


# ------------------------------------------------------------------------- LoRA factors by layer
# Found by variable type (LoRAA, LoRAB, HeadParam), keyed by layer (fedlora_jax.lora.layer_key).

def lora_factors(tree) -> Factors:
    """``{layer: (A, B)}`` of a trainable-shaped tree (leading axes, e.g. clients, are kept);
    layers whose ``A`` is not trainable (FFA-LoRA) are left out."""
    a, b = by_layer(tree, LoRAA), by_layer(tree, LoRAB)
    return {layer: (a[layer], b[layer]) for layer in a if layer in b}


def map_factors(tree, fn, head_fn=lambda x: x):
    """``tree`` with each layer's ``(A, B)`` replaced by ``fn(layer, A, B)`` and every other leaf
    (heads) by ``head_fn(leaf)``."""
    new = {layer: fn(layer, a, b) for layer, (a, b) in lora_factors(tree).items()}

    def replace(path, var):
        if isinstance(var, (LoRAA, LoRAB)):
            a, b = new[layer_key(path, var)]
            return var.replace(b if isinstance(var, LoRAB) else a)
        return var.replace(head_fn(var.get_value()))

    return nnx.map_state(replace, tree)


def head_sq_norm(tree) -> jax.Array:
    """``|heads|^2``: the squared norm of the fully trained leaves (:class:`HeadParam`, never
    sketched)."""
    heads = jax.tree.leaves(nnx.filter_state(tree, HeadParam))
    return sum((jnp.sum(leaf ** 2) for leaf in heads), jnp.float32(0.0))


def adapter_sizes(trainable: nnx.State) -> AdapterSizes:
    size = lambda kind: sum(x.size for x in jax.tree.leaves(nnx.filter_state(trainable, kind)))
    return AdapterSizes(lora_a=size(LoRAA), lora_b=size(LoRAB), head=size(HeadParam),
                        layers=tuple((a.shape[0], b.shape[1])
                                     for a, b in lora_factors(trainable).values()))


# ----------------------------------------------------------------------------- shared primitives

def prefix_sketch(k: jax.Array, template: nnx.State) -> nnx.State:
    """Rank masks keeping the first ``k`` components at value 1: truncation to rank ``k``
    (HetLoRA, FlexLoRA, FLoRA), not a rescaled random sketch."""
    return jax.tree.map(lambda s: (jnp.arange(s.shape[-1]) < k).astype(s.dtype), template)


def stack_factors(weights: jax.Array, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """FLoRA's stacking of ``C`` clients' adapters ``a (C, d_in, r)``, ``b (C, r, d_out)``:
    ``A_stack = [w_1 A_1, ..., w_C A_C]`` (d_in, C r) and ``B_stack = [B_1; ...; B_C]``
    (C r, d_out), so that ``A_stack B_stack = sum_c w_c A_c B_c``."""
    c, d_in, r = a.shape
    a_stack = jnp.moveaxis(weights[:, None, None] * a, 0, 1).reshape(d_in, c * r)
    return a_stack, b.reshape(c * r, b.shape[-1])


def truncated_svd_factors(w: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """``(A, B)`` with ``A B`` the best rank-``rank`` approximation of ``w`` (Eckart-Young):
    ``A = U_r sqrt(S_r)``, ``B = sqrt(S_r) V_r^T``, components in decreasing singular value, so
    truncating to the first ``k`` gives the best rank-``k`` approximation (FlexLoRA)."""
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    root = jnp.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def product_sq_norm(a: jax.Array, b: jax.Array) -> jax.Array:
    """``|A B|_F^2 = sum((A^T A) * (B B^T))``, without forming ``A B``."""
    return jnp.sum((a.T @ a) * (b @ b.T))


def svd_flops(d_in: int, d_out: int) -> float:
    """FLOPs of a full SVD of a ``d_in x d_out`` matrix (Golub-Kahan-Reinsch, with ``U`` and ``V``:
    ``4 m^2 n + 8 m n^2 + 9 n^3`` for ``m >= n``)."""
    m, n = max(d_in, d_out), min(d_in, d_out)
    return 4.0 * m * m * n + 8.0 * m * n * n + 9.0 * n ** 3


def normalized(total, weight_sum: jax.Array):
    """``total / weight_sum`` (zeros when nobody took part)."""
    scale = jnp.where(weight_sum > 0, 1.0 / jnp.where(weight_sum > 0, weight_sum, 1.0), 0.0)
    return jax.tree.map(lambda t: t * scale, total)


# ----------------------------------------------------------------------------- the default rule

@dataclasses.dataclass(frozen=True)
class Aggregator:
    """FSLoRA's rule (the paper's, and FedIT's when ``k = r``): a random ``k``-of-``r`` sketch
    scaled ``r / k``, the delta as message, ``sum_n a_n I_n / q_n delta_n`` as the server's update.

    ``shared_sketch``: one sketch draw for all layers of a client (else one per layer).
    """

    shared_sketch: bool = True
    personalized: ClassVar[bool] = False  # clients keep their own state (FedSA-LoRA)

    def init_state(self, trainable: nnx.State, weights: jax.Array) -> AggregatorState:
        """Initial state, given the global trainables and the clients' data weights ``a`` (N,)."""
        del trainable, weights
        return AggregatorState(server={}, clients={})

    def global_model(self, trainable: nnx.State, state: AggregatorState) -> nnx.State:
        """The trainables the held-out evaluation runs on."""
        del state
        return trainable

    def client_model(self, trainable: nnx.State, state: AggregatorState, client: jax.Array
                     ) -> nnx.State:
        """The trainables client ``client`` runs on (personalized rules); default: the global."""
        del client
        return self.global_model(trainable, state)

    def client_base(self, base: nnx.State, server: dict) -> nnx.State:
        """The frozen base the clients (and evaluation) run on."""
        del server
        return base

    def start(self, trainable: nnx.State, rows: dict, template: nnx.State, k: jax.Array,
              key: jax.Array) -> tuple[nnx.State, nnx.State]:
        """One client's initial trainables and rank masks (``rows``: its per-client state)."""
        del rows
        return trainable, draw_sketch(key, k, template, shared_across_layers=self.shared_sketch)

    def message(self, start: nnx.State, delta: nnx.State, sketch: nnx.State):
        """One client's message and weight factor (multiplied by ``a_n I_n / q_n``)."""
        del start, sketch
        return delta, jnp.ones((), jnp.float32)

    def reduce(self, weights: jax.Array, messages):
        """``sum_c weights_c message_c`` over a chunk's clients (leading axis of ``messages``)."""
        return jax.tree.map(lambda m: jnp.tensordot(weights, m, axes=1), messages)

    def zeros(self, trainable: nnx.State):
        """An all-zero sum, shaped like :meth:`reduce`'s output."""
        return jax.tree.map(jnp.zeros_like, trainable)

    def report(self, start: nnx.State, delta: nnx.State, sketch: nnx.State) -> dict[str, jax.Array]:
        """Per-client scalars the strategy may read after the round (beyond ``|delta|^2``)."""
        del start, delta, sketch
        return {}

    def keep(self, start: nnx.State, delta: nnx.State, rows: dict) -> dict:
        """The client's new per-client rows."""
        del start, delta
        return rows

    def finish(self, trainable: nnx.State, server: dict, total, weight_sum: jax.Array
               ) -> tuple[nnx.State, dict]:
        """``(update of the global trainables, new server state)`` from the round's sums; the
        server optimizer applies the update (``sgd`` at learning rate 1 adds it)."""
        del trainable, weight_sum
        return total, server

    # --- what a round costs beyond local training (parameters; the clock turns them into time)
    def uploaded_lora_params(self, sizes: AdapterSizes) -> float:
        """LoRA parameters a full-rank client uploads (scaled by ``k / r`` in the time model)."""
        return float(sizes.lora)

    def upload_params(self, k: jax.Array, rank: int, sizes: AdapterSizes) -> jax.Array:
        """Parameters each client uploads: its kept share of the adapter plus the heads."""
        return k / rank * self.uploaded_lora_params(sizes) + sizes.head

    def download_params(self, mask: jax.Array, k: jax.Array, rank: int, sizes: AdapterSizes
                        ) -> jax.Array:
        """Parameters the server broadcasts before the round: the global adapter and heads."""
        del mask, k, rank
        return jnp.float32(sizes.lora + sizes.head)

    def server_flops(self, sizes: AdapterSizes) -> float:
        """Server FLOPs of one aggregation beyond the weighted sum (e.g. an SVD per layer)."""
        del sizes
        return 0.0


def lora_from(factors_tree, heads_tree):
    """A trainable-shaped tree with the LoRA factors of ``factors_tree`` and the others of
    ``heads_tree``."""
    return jax.tree.map(lambda f, h: f if isinstance(f, nnx.LoRAParam) else h,
                        factors_tree, heads_tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


@dataclasses.dataclass(frozen=True)
class TruncatingAggregator(Aggregator):
    """Clients train the first ``k_n`` components of the global adapter, unscaled (HetLoRA,
    FlexLoRA): truncation instead of FSLoRA's random, rescaled sketch."""

    def start(self, trainable, rows, template, k, key):
        del rows, key
        return trainable, prefix_sketch(k, template)


@dataclasses.dataclass(frozen=True)
class ProductAggregator(TruncatingAggregator):
    """Shared by the rules that aggregate adapter *products* ``A_n B_n`` (FlexLoRA, FLoRA):
    clients hold a rank prefix; a client's message is its zero-padded final factors and its head
    deltas; a chunk's sum is, per layer, the stacked product ``sum_c w_c A_c B_c``
    (:func:`stack_factors`) and, for the heads, the weighted sum of deltas."""

    def message(self, start, delta, sketch):
        final = restrict_to_sketch(jax.tree.map(jnp.add, start, delta), sketch)  # zero-padded
        return lora_from(final, delta), jnp.ones((), jnp.float32)

    def reduce(self, weights, messages):
        products = {}
        for layer, (a, b) in lora_factors(messages).items():
            a_stack, b_stack = stack_factors(weights, a, b)
            products[layer] = a_stack @ b_stack
        return products, super().reduce(weights, messages)

    def zeros(self, trainable):
        return ({layer: jnp.zeros((a.shape[0], b.shape[1]), a.dtype)
                 for layer, (a, b) in lora_factors(trainable).items()}, super().zeros(trainable))

    def averages(self, total, weight_sum):
        """``(mean product per layer, mean delta)`` over the round's participants (weights
        normalized to sum to one among them, as FedAvg; zeros when nobody took part)."""
        products, deltas = total
        return normalized(products, weight_sum), normalized(deltas, weight_sum)


def check_client_state_memory(aggregator: Aggregator, trainable: nnx.State, num_clients: int,
                              limit_bytes: float = 4 * 2 ** 30) -> None:
    """Refuses per-client state that would not fit (FedSA-LoRA keeps every client's ``B``)."""
    rows = jax.eval_shape(lambda: aggregator.init_state(trainable, jnp.ones(num_clients)).clients)
    size = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(rows))
    if size > limit_bytes:
        raise ValueError(f"{type(aggregator).__name__} keeps per-client state of "
                         f"{size / 2 ** 30:.1f} GiB for {num_clients} clients (limit "
                         f"{limit_bytes / 2 ** 30:.0f} GiB): use fewer clients or a smaller "
                         "rank, or a stateless strategy.")
