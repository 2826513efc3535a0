"""How client updates become the next global adapter: a method's :class:`Rule` and :class:`Costs`.

A :class:`Rule` is a few traced pure functions the engine calls inside the compiled chunk step; they
answer the questions the engine asks of every client and every round (``docs/method.md``,
"Aggregation rules"):

1. what the client starts from (``start``: its adapter and rank mask);
2. what it sends (``message``: a :class:`Message` with a weight factor the engine multiplies by
   ``a_n I_n / q_n``, and a per-client report for the method's planner);
3. how a chunk's messages are summed (``reduce``, then ``psum`` over devices);
4. what the server makes of the round's sums (``finish``: the update of the global trainables,
   applied by the server optimizer, and the rule's own server state);
5. what the client keeps (``keep``: per-client rows, e.g. FedSA-LoRA's local ``B``).

A method also declares what a round costs beyond local training (:class:`Costs`: parameters up and
down, server FLOPs), so the wall-clock model charges each method fairly. :func:`sketched` is FSLoRA's
rule (the paper's): random rank sketches scaled ``r / k``, deltas summed with ``a_n I_n / q_n``; the
other rules replace some of its functions (``rule._replace(...)``) and live beside their planners in
:mod:`fedlora_jax.strategies`. The helpers below (LoRA factors by layer, prefix masks, zero-padding,
stacking, truncated SVD) are their shared primitives.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from fedlora_jax.lora import HeadParam, LoRAA, LoRAB, by_layer, layer_key
from fedlora_jax.sketch import draw_sketch, restrict_to_sketch

Factors = dict[str, tuple[jax.Array, jax.Array]]  # layer path -> (A: d_in x r, B: r x d_out)


@struct.dataclass
class RuleState:
    """A rule's state in :class:`~fedlora_jax.engine.ServerState`: ``server`` (replicated, e.g.
    FLoRA's merged products) and ``clients`` (leaves with a leading client axis ``N``)."""

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


@jax.custom_batching.custom_vmap
def svd(w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``jnp.linalg.svd(w, full_matrices=False)`` whose batched form (under :func:`jax.vmap`,
    e.g. packed runs) is a loop of one-matrix SVDs (:func:`jax.lax.map`). On CPU, jaxlib's
    batched LAPACK SVD splits its batch over XLA's intra-op thread pool and waits for it from a
    thread of that pool; when as many batched SVDs run at once as the pool has threads (a packed
    FlexLoRA round on MiniLM on 2 cores: two layers' SVDs), every thread waits and the program
    deadlocks (JAX 0.10.2; docs/benchmarks.md, "Known problem")."""
    return tuple(jnp.linalg.svd(w, full_matrices=False))


@svd.def_vmap
def _svd_vmap(axis_size: int, in_batched: list[bool], w: jax.Array):
    del axis_size
    (batched,) = in_batched
    return (jax.lax.map(svd, w) if batched else svd(w)), (batched,) * 3


def truncated_svd_factors(w: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """``(A, B)`` with ``A B`` the best rank-``rank`` approximation of ``w`` (Eckart-Young):
    ``A = U_r sqrt(S_r)``, ``B = sqrt(S_r) V_r^T``, components in decreasing singular value, so
    truncating to the first ``k`` gives the best rank-``k`` approximation (FlexLoRA)."""
    u, s, vt = svd(w)
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


def lora_from(factors_tree, heads_tree):
    """A trainable-shaped tree with the LoRA factors of ``factors_tree`` and the others of
    ``heads_tree``."""
    return jax.tree.map(lambda f, h: f if isinstance(f, nnx.LoRAParam) else h,
                        factors_tree, heads_tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ----------------------------------------------------------------------------- the rule's interface

class Message(NamedTuple):
    """What one client sends, and what the simulator records of it.

    Attributes:
      value: the message; :attr:`Rule.reduce` sums a chunk's messages.
      factor: a scalar weight factor, multiplied by ``a_n I_n / q_n``.
      report: per-client values the method's planner reads after the round (a pytree of scalars,
        e.g. HetLoRA's pruning signal; ``()`` when there are none).
    """

    value: Any
    factor: jax.Array
    report: Any = ()


class Rule(NamedTuple):
    """A federated method's aggregation rule: traced pure functions the engine calls inside the
    compiled round, listed in the order of a round (think optax's ``GradientTransformation``).

    Attributes:
      init: ``(trainable, weights (N,)) -> RuleState``: the rule's state at round 0, given the
        global trainables and the clients' data weights ``a``.
      base: ``(base, server) -> base``: the frozen base the clients and the evaluation run on.
      start: ``(trainable, rows, template, k (), key) -> (trainable, sketch)``: one client's initial
        trainables and rank masks, from the global trainables, its per-client ``rows`` of
        ``RuleState.clients``, the all-ones mask ``template``, its kept rank and its key.
      message: ``(start, delta, sketch) -> Message``: what one client sends after training.
      reduce: ``(weights (C,), values (C, ...)) -> sums``: a chunk's messages weighted and summed
        (then ``psum`` over devices); the engine derives the zero sums from its output shape.
      finish: ``(trainable, server, sums, weight_sum ()) -> (update, server)``: the update of the
        global trainables (the server optimizer applies it; ``sgd`` at rate 1 adds it) and the new
        server state, from the round's sums.
      keep: ``(start, delta, rows) -> rows``: a participant's new per-client rows.
      model: ``(trainable, state, client=None) -> trainable``: the trainables the evaluation runs
        on: the global model, or client ``client``'s own (personalized rules).
    """

    init: Callable[[nnx.State, jax.Array], RuleState]
    base: Callable[[nnx.State, dict], nnx.State]
    start: Callable[[nnx.State, dict, nnx.State, jax.Array, jax.Array],
                    tuple[nnx.State, nnx.State]]
    message: Callable[[nnx.State, nnx.State, nnx.State], Message]
    reduce: Callable[[jax.Array, Any], Any]
    finish: Callable[[nnx.State, dict, Any, jax.Array], tuple[nnx.State, dict]]
    keep: Callable[[nnx.State, nnx.State, dict], dict]
    model: Callable[..., nnx.State]


@dataclasses.dataclass(frozen=True)
class Costs:
    """What one round of a method costs beyond local training: parameters sent each way (the clock
    turns them into time at ``PARAM_BITS`` each) and the server's FLOPs.

    Attributes:
      rank: the global LoRA rank ``r``; a client of rank ``k`` sends ``k / r`` of ``upload_lora``.
      upload_lora: LoRA parameters a full-rank client uploads.
      download_lora: LoRA parameters the server broadcasts before a round (per full-rank
        participant when ``stacked_download``).
      head: parameters of the heads, sent whole both ways.
      server_flops: FLOPs of one aggregation beyond the weighted sum (e.g. an SVD per layer).
      stacked_download: the broadcast is the round's stacked adapters (FLoRA), so it grows with
        ``sum_n I_n k_n / r``.
    """

    rank: int
    upload_lora: float
    download_lora: float
    head: float
    server_flops: float = 0.0
    stacked_download: bool = False

    def upload(self, k) -> jax.Array:
        """Parameters each client of kept rank ``k`` (any shape) uploads."""
        return k / self.rank * self.upload_lora + self.head

    def download(self, mask, k) -> jax.Array:
        """Parameters broadcast before a round with participants ``mask`` (N,) of ranks ``k`` (N,)."""
        if self.stacked_download:
            return jnp.sum(jnp.where(mask, k, 0)) / self.rank * self.download_lora + self.head
        return jnp.float32(self.download_lora + self.head)


def adapter_costs(sizes: AdapterSizes, rank: int) -> Costs:
    """The costs of sending the whole adapter and heads each way, with no server work beyond the
    weighted sum (FSLoRA, FedIT, HetLoRA, ...)."""
    return Costs(rank=rank, upload_lora=float(sizes.lora), download_lora=sizes.lora,
                 head=sizes.head)


# ------------------------------------------------------------------- FSLoRA's rule, piece by piece

def stateless(trainable: nnx.State, weights: jax.Array) -> RuleState:
    """No server or per-client state."""
    del trainable, weights
    return RuleState(server={}, clients={})


def same_base(base: nnx.State, server: dict) -> nnx.State:
    """The frozen base as it is."""
    del server
    return base


def random_sketch(trainable, rows, template, k, key, *, shared: bool = True):
    """FSLoRA's start: the global trainables and a random ``k``-of-``r`` sketch scaled ``r / k``
    (``shared``: one draw for all layers, else one per layer)."""
    del rows
    return trainable, draw_sketch(key, k, template, shared_across_layers=shared)


def rank_prefix(trainable, rows, template, k, key):
    """Truncation instead of a random sketch: the first ``k`` components, unscaled (HetLoRA,
    FlexLoRA)."""
    del rows, key
    return trainable, prefix_sketch(k, template)


def delta_message(start, delta, sketch) -> Message:
    """The client's delta, at weight factor 1."""
    del start, sketch
    return Message(delta, jnp.ones((), jnp.float32))


def weighted_sum(weights: jax.Array, values):
    """``sum_c weights_c values_c`` over a chunk's clients (leading axis of ``values``)."""
    return jax.tree.map(lambda m: jnp.tensordot(weights, m, axes=1), values)


def sum_is_update(trainable, server, total, weight_sum):
    """The weighted sum of deltas is the update (``sum_n a_n I_n / q_n delta_n``)."""
    del trainable, weight_sum
    return total, server


def keep_rows(start, delta, rows) -> dict:
    """Per-client rows unchanged (stateless clients)."""
    del start, delta
    return rows


def global_model(trainable, state: RuleState, client=None) -> nnx.State:
    """Every client, and the evaluation, run on the global trainables."""
    del state, client
    return trainable


def sketched(shared_sketch: bool = True) -> Rule:
    """FSLoRA's rule (the paper's, and FedIT's when ``k = r``): a random ``k``-of-``r`` sketch
    scaled ``r / k``, the delta as message, ``sum_n a_n I_n / q_n delta_n`` as the server's update.
    ``shared_sketch``: one sketch draw for all layers of a client (else one per layer)."""
    return Rule(init=stateless, base=same_base,
                start=functools.partial(random_sketch, shared=shared_sketch),
                message=delta_message, reduce=weighted_sum, finish=sum_is_update, keep=keep_rows,
                model=global_model)


# -------------------------------------------------------- rules that aggregate adapter products

def product_message(start, delta, sketch) -> Message:
    """The client's final factors zero-padded outside its rank prefix, and its head deltas."""
    final = restrict_to_sketch(jax.tree.map(jnp.add, start, delta), sketch)
    return Message(lora_from(final, delta), jnp.ones((), jnp.float32))


def product_sum(weights: jax.Array, values):
    """``(per layer: sum_c w_c A_c B_c as the stacked product, weighted sum of the head deltas)``
    (:func:`stack_factors`)."""
    products = {}
    for layer, (a, b) in lora_factors(values).items():
        a_stack, b_stack = stack_factors(weights, a, b)
        products[layer] = a_stack @ b_stack
    return products, weighted_sum(weights, values)


def product_averages(total, weight_sum: jax.Array):
    """``(mean product per layer, mean delta)`` over the round's participants (weights
    normalized to sum to one among them, as FedAvg; zeros when nobody took part)."""
    products, deltas = total
    return normalized(products, weight_sum), normalized(deltas, weight_sum)


def products_rule(finish) -> Rule:
    """Shared by the rules that aggregate adapter *products* ``A_n B_n`` (FlexLoRA, FLoRA):
    clients hold a rank prefix and send their zero-padded final factors and head deltas; a chunk
    sums the stacked products; ``finish`` makes the update from :func:`product_averages`."""
    return sketched()._replace(start=rank_prefix, message=product_message, reduce=product_sum,
                               finish=finish)


def check_client_state_memory(rule: Rule, trainable: nnx.State, num_clients: int,
                              limit_bytes: float = 4 * 2 ** 30) -> None:
    """Refuses per-client state that would not fit (FedSA-LoRA keeps every client's ``B``)."""
    rows = jax.eval_shape(lambda: rule.init(trainable, jnp.ones(num_clients)).clients)
    size = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(rows))
    if size > limit_bytes:
        raise ValueError(f"The aggregation rule keeps per-client state of "
                         f"{size / 2 ** 30:.1f} GiB for {num_clients} clients (limit "
                         f"{limit_bytes / 2 ** 30:.0f} GiB): use fewer clients or a smaller "
                         "rank, or a stateless strategy.")
