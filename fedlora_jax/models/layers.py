"""Pieces shared by the Hugging Face model families: activations, segment and position ids,
attention masks, attention, RoPE.

Shapes are named by dimension letters: ``b`` batch, ``t`` query positions, ``s`` key positions,
``n`` query heads, ``k`` key/value heads, ``h`` head dim, ``d`` model dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"Unsupported hidden_act {name!r}; supported: {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def check_segments(token_type_ids: jax.Array, type_vocab_size: int) -> None:
    """Raises if concrete segment ids fall outside ``[0, type_vocab_size)``. Inside ``jit`` the
    values are unknown and the check is skipped; the data pipeline only produces segment ids for
    tokenizers that declare them (:func:`fedlora_jax.data.tokenize.tokenize_classification`)."""
    if isinstance(token_type_ids, jax.core.Tracer):
        return
    bad = np.setdiff1d(np.asarray(token_type_ids), np.arange(type_vocab_size))
    if bad.size:
        fix = ("it has one segment (as RoBERTa): drop token_type_ids, or tokenize with the model's "
               "own tokenizer, which gives none" if type_vocab_size == 1 else
               "use segment ids from the model's own tokenizer")
        raise ValueError(f"token_type_ids hold segment(s) {bad.tolist()[:4]} but the model has "
                         f"type_vocab_size={type_vocab_size}: {fix}.")


def attention_mask_bts(attention_mask: jax.Array, *, causal: bool,
                       sliding_window: int | None = None) -> jax.Array:
    """Boolean mask (B, 1, T, S): key ``s`` is visible from query ``t``.

    Keys are masked by padding; ``causal`` adds ``s <= t`` and ``sliding_window`` adds
    ``t - s < sliding_window`` (Mistral/Qwen2 semantics). A query row that sees no key (a leading pad
    under causal masking) gets uniform weights instead of NaN, as in ``transformers``.
    """
    t = attention_mask.shape[-1]
    mask = attention_mask.astype(bool)[:, None, None, :]
    if causal:
        q_pos, k_pos = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= q_pos - k_pos < sliding_window
        mask = mask & allowed
    return mask


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids (B, T) counted over the unmasked tokens of each row, as ``transformers``'
    ``generate`` derives them: ``0..n-1`` on the tokens whatever padding precedes them, so a
    left-padded row gets the same positions as unpadded (right padding gives ``0..T-1`` on the
    valid tokens, as a forward without ``position_ids`` does). Pad positions are clipped to 0."""
    chex.assert_rank(attention_mask, 2)
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


def attend(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask_b1ts: jax.Array,
           scale: float | None = None) -> jax.Array:
    """Scaled dot-product attention with grouped-query heads (``n`` a multiple of ``k``) -> (B, T, N*H).

    ``scale`` multiplies the scores (default ``1/sqrt(h)``)."""
    b, t, n, h = q_btnh.shape
    chex.assert_equal_shape([k_bskh, v_bskh])
    out = jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask_b1ts, scale=scale)
    return out.reshape(b, t, n * h)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding frequencies: ``default``, ``linear`` or ``llama3`` scaling."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    SUPPORTED = ("default", "linear", "llama3")

    @classmethod
    def from_hf(cls, params: Mapping) -> RopeConfig:
        """From ``transformers``' ``rope_parameters`` (or legacy ``rope_scaling`` + ``rope_theta``)."""
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in cls.SUPPORTED:
            raise ValueError(f"Unsupported rope type {rope_type!r}; supported: {list(cls.SUPPORTED)}.")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported.")
        names = {f.name for f in dataclasses.fields(cls)} - {"theta", "rope_type"}
        return cls(theta=float(params.get("rope_theta", 10000.0)), rope_type=rope_type,
                   **{k: v for k, v in params.items() if k in names and v is not None})

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies (head_dim/2,), float32 as ``transformers`` computes them."""
        inv = 1.0 / (self.theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
        if self.rope_type == "linear":
            inv = inv / self.factor
        elif self.rope_type == "llama3":
            old_len = self.original_max_position_embeddings
            low_wavelen, high_wavelen = old_len / self.low_freq_factor, old_len / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (old_len / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv = np.where(medium, smoothed, scaled)
        return inv.astype(np.float32)


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates pairs ``(i, i + h/2)`` of each head (the ``rotate_half`` layout of HF checkpoints)."""
    angles = positions_bt[..., None].astype(jnp.float32) * inv_freq  # (B, T, h/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x_btnh.dtype), jnp.sin(angles).astype(x_btnh.dtype)
    x1, x2 = jnp.split(x_btnh, 2, axis=-1)
    return x_btnh * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
