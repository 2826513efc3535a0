"""GPT-2: a pre-LN causal decoder with learned absolute positions and a tied LM head.

The module tree mirrors ``transformers``' (``transformer/h/0/attn/c_attn``, ...). GPT-2 stores its
linear layers as ``Conv1D``, whose weight is ``(d_in, d_out)``: already the layout of an
``nnx.Linear`` kernel, so these layers (:attr:`GPT2LMHeadModel.CONV1D`) load untransposed. ``c_attn``
projects to queries, keys and values at once; LoRA on it (PEFT's usual GPT-2 target, with
``c_proj``) adapts all three. Positions count the unmasked tokens, so left padding is handled.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from fedlora_jax.models.layers import activation, attend, attention_mask_bts, positions_from_mask


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Decoder hyper-parameters; ``layer_scaled_attention`` divides the scores of layer ``i`` by
    ``i + 1`` (``scale_attn_by_inverse_layer_idx``)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 1024
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu_new"
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True
    layer_scaled_attention: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}.")
        activation(self.hidden_act)

    @classmethod
    def from_hf(cls, hf, num_labels: int | None = None) -> GPT2Config:
        del num_labels  # causal LM only
        if getattr(hf, "add_cross_attention", False):
            raise ValueError("GPT-2 with add_cross_attention=True (an encoder-decoder) is not supported.")
        return cls(vocab_size=hf.vocab_size, hidden_size=hf.n_embd, num_layers=hf.n_layer,
                   num_heads=hf.n_head, intermediate_size=hf.n_inner or 4 * hf.n_embd,
                   max_position_embeddings=hf.n_positions, layer_norm_eps=hf.layer_norm_epsilon,
                   hidden_act=hf.activation_function,
                   tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
                   scale_attn_weights=hf.scale_attn_weights,
                   layer_scaled_attention=hf.scale_attn_by_inverse_layer_idx)


class GPT2Attention(nnx.Module):
    def __init__(self, cfg: GPT2Config, layer: int, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        scale = (d // cfg.num_heads) ** -0.5 if cfg.scale_attn_weights else 1.0
        self.scale = scale / (layer + 1) if cfg.layer_scaled_attention else scale
        self.c_attn = nnx.Linear(d, 3 * d, rngs=rngs)
        self.c_proj = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x_btd: jax.Array, mask_b1ts: jax.Array) -> jax.Array:
        b, t, d = x_btd.shape
        q, k, v = (y.reshape(b, t, self.num_heads, d // self.num_heads)
                   for y in jnp.split(self.c_attn(x_btd), 3, axis=-1))
        return self.c_proj(attend(q, k, v, mask_b1ts, scale=self.scale))


class GPT2MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.c_fc = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, rngs=rngs)
        self.c_proj = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, rngs=rngs)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        return self.c_proj(self.act(self.c_fc(x_btd)))


class GPT2Block(nnx.Module):
    def __init__(self, cfg: GPT2Config, layer: int, *, rngs: nnx.Rngs):
        norm = lambda: nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.ln_1 = norm()
        self.attn = GPT2Attention(cfg, layer, rngs=rngs)
        self.ln_2 = norm()
        self.mlp = GPT2MLP(cfg, rngs=rngs)

    def __call__(self, x_btd: jax.Array, mask_b1ts: jax.Array) -> jax.Array:
        x_btd = x_btd + self.attn(self.ln_1(x_btd), mask_b1ts)
        return x_btd + self.mlp(self.ln_2(x_btd))


class GPT2Model(nnx.Module):
    """The decoder stack: ``(input_ids, attention_mask) -> final-normed hidden state (B, T, D)``."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.wte = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.wpe = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, rngs=rngs)
        self.h = nnx.List([GPT2Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.ln_f = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        chex.assert_rank([input_ids, attention_mask], 2)
        chex.assert_equal_shape([input_ids, attention_mask])
        mask = attention_mask_bts(attention_mask, causal=True)
        x = self.wte(input_ids) + self.wpe(positions_from_mask(attention_mask))
        for block in self.h:
            x = block(x, mask)
        return self.ln_f(x)


class GPT2LMHeadModel(nnx.Module):
    """GPT-2 with its LM head (the transposed token embedding when tied) -> logits (B, T, V)."""

    BASE: ClassVar[str] = "transformer"
    HEADS: ClassVar[tuple[str, ...]] = ("lm_head",)
    CONV1D: ClassVar[tuple[str, ...]] = ("c_attn", "c_proj", "c_fc")

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.transformer = GPT2Model(cfg, rngs=rngs)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, rngs=rngs))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        hidden = self.transformer(input_ids, attention_mask)
        logits = (self.transformer.wte.attend(hidden) if self.lm_head is None
                  else self.lm_head(hidden))
        chex.assert_shape(logits, (*input_ids.shape, self.cfg.vocab_size))
        return logits
