"""A small built-in transformer (random init) for tests, sweeps and benchmarks.

Pre-LN blocks with linear layers named like BERT's (``query``, ``key``, ``value``, ``output``,
``intermediate``, ``ffn_output``) so the same LoRA target patterns apply to it and to the real
backbones. ``TinyConfig.task`` picks the head: ``classification`` (mean-pooled, ``classifier``) or
``causal_lm`` (causal attention, ``lm_head``). Both follow the model interface of :mod:`fedlora_jax.models`:
``model(input_ids, attention_mask, token_type_ids=None) -> logits``; segment ids (text pairs) add a
learned segment embedding, as BERT's do.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from fedlora_jax.models.layers import attend, check_segments


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    vocab_size: int = 512
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int = 128
    max_len: int = 128
    num_labels: int = 4
    type_vocab_size: int = 2
    task: str = "classification"  # or "causal_lm"

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}.")
        if self.task not in ("classification", "causal_lm"):
            raise ValueError(f"TinyConfig.task must be 'classification' or 'causal_lm', got {self.task!r}.")


class SelfAttention(nnx.Module):
    def __init__(self, cfg: TinyConfig, *, rngs: nnx.Rngs):
        d = cfg.d_model
        self.num_heads = cfg.num_heads
        self.query = nnx.Linear(d, d, rngs=rngs)
        self.key = nnx.Linear(d, d, rngs=rngs)
        self.value = nnx.Linear(d, d, rngs=rngs)
        self.output = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x_btd: jax.Array, mask_bqk: jax.Array) -> jax.Array:
        b, t, d = x_btd.shape
        split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
        q, k, v = split(self.query(x_btd)), split(self.key(x_btd)), split(self.value(x_btd))
        return self.output(attend(q, k, v, mask_bqk[:, None]))


class Block(nnx.Module):
    def __init__(self, cfg: TinyConfig, *, rngs: nnx.Rngs):
        self.attn_norm = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.attention = SelfAttention(cfg, rngs=rngs)
        self.ffn_norm = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.intermediate = nnx.Linear(cfg.d_model, cfg.d_ff, rngs=rngs)
        self.ffn_output = nnx.Linear(cfg.d_ff, cfg.d_model, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attention(self.attn_norm(x), mask)
        return x + self.ffn_output(jax.nn.gelu(self.intermediate(self.ffn_norm(x))))


class TinyTransformer(nnx.Module):
    """Encoder classifier or causal decoder, chosen by ``cfg.task``."""

    def __init__(self, cfg: TinyConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
        self.pos_embed = nnx.Embed(cfg.max_len, cfg.d_model, rngs=rngs)
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        if cfg.task == "classification":
            self.classifier = nnx.Linear(cfg.d_model, cfg.num_labels, rngs=rngs)
        else:
            self.lm_head = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, rngs=rngs)
        # drawn last, so the other parameters do not depend on whether segments exist
        self.segment_embed = nnx.Embed(cfg.type_vocab_size, cfg.d_model, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 token_type_ids: jax.Array | None = None) -> jax.Array:
        b, t = input_ids.shape
        valid = attention_mask.astype(bool)
        mask = valid[:, None, :] & valid[:, :, None]
        if self.cfg.task == "causal_lm":
            mask = mask & jnp.tril(jnp.ones((t, t), bool))[None]
        mask = mask | jnp.eye(t, dtype=bool)[None]  # padded rows attend to themselves: no NaN
        x = self.embed(input_ids) + self.pos_embed(jnp.arange(t))[None]
        if token_type_ids is not None:
            check_segments(token_type_ids, self.cfg.type_vocab_size)
            x = x + self.segment_embed(token_type_ids)
        for layer in self.layers:
            x = layer(x, mask)
        x = self.final_norm(x)
        if self.cfg.task == "causal_lm":
            return self.lm_head(x)
        w = valid.astype(x.dtype)[..., None]
        pooled = (x * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
        return self.classifier(pooled)
