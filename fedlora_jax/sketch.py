"""Per-client sketch masks (docs/architecture.md, "Modules and where each formula lives"); the
payload they imply is accounted in :mod:`fedlora_jax.aggregation` (``Costs.upload``).

Client ``n`` keeps ``k_n`` of the ``r`` rank components of every adapted layer, chosen uniformly
without replacement; its mask is ``s = (r / k_n) 1_I`` so that ``E[diag(s)] = I``. ``B`` and ``A`` of
a layer share the mask (it multiplies the rank axis between them). Draws are per layer or one draw
shared by all layers. ``k_n`` is traced, so clients with different ``k_n`` share one vmapped batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fedlora_jax.lora import LoRAA, LoRAB, SketchMask, by_layer, layer_key


def rank_mask(key: jax.Array, k: jax.Array, rank: int, dtype=jnp.float32) -> jax.Array:
    """``(rank,)`` mask with value ``rank / k`` on a uniformly random ``k``-subset, 0 elsewhere."""
    keep = jax.random.permutation(key, rank) < k
    return jnp.where(keep, rank / k, 0.0).astype(dtype)


def draw_sketch(key: jax.Array, k: jax.Array, template: nnx.State, *,
                shared_across_layers: bool) -> nnx.State:
    """One client's masks, one per LoRA layer of ``template`` (the model's SketchMask state)."""
    leaves, treedef = jax.tree.flatten(template)
    rank = leaves[0].shape[-1]
    keys = [key] * len(leaves) if shared_across_layers else list(jax.random.split(key, len(leaves)))
    return jax.tree.unflatten(treedef, [rank_mask(kk, k, rank, leaf.dtype)
                                        for kk, leaf in zip(keys, leaves)])


def full_sketch(template: nnx.State) -> nnx.State:
    """The all-ones sketch (``k = r``): the un-sketched global model."""
    return jax.tree.map(jnp.ones_like, template)


def restrict_to_sketch(tree: nnx.State, sketch: nnx.State) -> nnx.State:
    """Zeroes the entries of a trainable-shaped tree outside the sketch's support.

    ``A`` (d_in, r) keeps the columns, ``B`` (r, d_out) the rows of the kept components; other
    trainable leaves (heads) are kept whole. Used on optimizer updates so that weight decay or
    momentum never moves a component the client did not hold, and by HetLoRA/FlexLoRA/FLoRA to
    zero-pad a rank-``k`` adapter to the global rank.
    """
    held = {layer: mask > 0 for layer, mask in by_layer(sketch, SketchMask).items()}

    def restrict(path, var):
        if isinstance(var, LoRAA):
            return var.replace(jnp.where(held[layer_key(path, var)][None, :], var.get_value(), 0))
        if isinstance(var, LoRAB):
            return var.replace(jnp.where(held[layer_key(path, var)][:, None], var.get_value(), 0))
        return var

    return nnx.map_state(restrict, tree)
