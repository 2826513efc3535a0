"""The LLaMA family of causal decoders: LLaMA (2/3), Mistral, Qwen2, Qwen3.

Pre-RMSNorm blocks with rotary positions, grouped-query attention and a SwiGLU MLP; the families
differ only in config flags (q/k/v and o biases, Qwen3's per-head q/k RMSNorm, sliding windows, tied
embeddings). Module names mirror ``transformers``' (``model/layers/0/self_attn/q_proj``, ...).
Positions count the unmasked tokens (:func:`~fedlora_jax.models.layers.positions_from_mask`), so
right- and left-padded batches both give each row its unpadded logits.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import chex
import jax
from flax import nnx

from fedlora_jax.models.layers import (RopeConfig, activation, apply_rope, attend, attention_mask_bts,
                                       positions_from_mask)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Decoder hyper-parameters. ``sliding_windows`` has one entry per layer (``None``: full)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_windows: tuple[int | None, ...] = ()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}.")
        if self.sliding_windows and len(self.sliding_windows) != self.num_layers:
            raise ValueError(f"sliding_windows has {len(self.sliding_windows)} entries for "
                             f"{self.num_layers} layers.")
        activation(self.hidden_act)

    @classmethod
    def from_hf(cls, hf, num_labels: int | None = None) -> LlamaConfig:
        del num_labels  # causal LM only
        family = hf.model_type
        rope = getattr(hf, "rope_parameters", None) or {
            "rope_theta": getattr(hf, "rope_theta", 10000.0), **(getattr(hf, "rope_scaling", None) or {})}
        window = getattr(hf, "sliding_window", None)
        layer_types = getattr(hf, "layer_types", None) or (
            ["sliding_attention" if window else "full_attention"] * hf.num_hidden_layers)
        attention_bias = getattr(hf, "attention_bias", False)
        return cls(
            vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            rms_norm_eps=hf.rms_norm_eps, rope=RopeConfig.from_hf(rope), hidden_act=hf.hidden_act,
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            qkv_bias=family == "qwen2" or attention_bias,
            o_bias=family != "qwen2" and attention_bias,
            mlp_bias=getattr(hf, "mlp_bias", False), qk_norm=family == "qwen3",
            sliding_windows=tuple(window if kind == "sliding_attention" else None
                                  for kind in layer_types))


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h = cfg.hidden_size, cfg.head_dim
        self.q_proj = nnx.Linear(d, cfg.num_heads * h, use_bias=cfg.qkv_bias, rngs=rngs)
        self.k_proj = nnx.Linear(d, cfg.num_kv_heads * h, use_bias=cfg.qkv_bias, rngs=rngs)
        self.v_proj = nnx.Linear(d, cfg.num_kv_heads * h, use_bias=cfg.qkv_bias, rngs=rngs)
        self.o_proj = nnx.Linear(cfg.num_heads * h, d, use_bias=cfg.o_bias, rngs=rngs)
        norm = lambda: nnx.RMSNorm(h, epsilon=cfg.rms_norm_eps, rngs=rngs) if cfg.qk_norm else None
        self.q_norm, self.k_norm = norm(), norm()

    def __call__(self, x_btd: jax.Array, mask_b1ts: jax.Array, positions_bt: jax.Array) -> jax.Array:
        b, t, _ = x_btd.shape
        cfg = self.cfg
        q = self.q_proj(x_btd).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x_btd).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x_btd).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = cfg.rope.inv_freq(cfg.head_dim)
        q, k = apply_rope(q, positions_bt, inv_freq), apply_rope(k, positions_bt, inv_freq)
        return self.o_proj(attend(q, k, v, mask_b1ts))


class LlamaMLP(nnx.Module):
    """SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nnx.Linear(d, f, use_bias=bias, rngs=rngs)
        self.up_proj = nnx.Linear(d, f, use_bias=bias, rngs=rngs)
        self.down_proj = nnx.Linear(f, d, use_bias=bias, rngs=rngs)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x_btd)) * self.up_proj(x_btd))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.self_attn = LlamaAttention(cfg, rngs=rngs)
        self.mlp = LlamaMLP(cfg, rngs=rngs)
        self.input_layernorm = nnx.RMSNorm(cfg.hidden_size, epsilon=cfg.rms_norm_eps, rngs=rngs)
        self.post_attention_layernorm = nnx.RMSNorm(cfg.hidden_size, epsilon=cfg.rms_norm_eps, rngs=rngs)

    def __call__(self, x_btd: jax.Array, mask_b1ts: jax.Array, positions_bt: jax.Array) -> jax.Array:
        x_btd = x_btd + self.self_attn(self.input_layernorm(x_btd), mask_b1ts, positions_bt)
        return x_btd + self.mlp(self.post_attention_layernorm(x_btd))


class LlamaModel(nnx.Module):
    """The decoder stack: ``(input_ids, attention_mask) -> final-normed hidden state (B, T, D)``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.layers = nnx.List([LlamaDecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = nnx.RMSNorm(cfg.hidden_size, epsilon=cfg.rms_norm_eps, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        chex.assert_rank([input_ids, attention_mask], 2)
        chex.assert_equal_shape([input_ids, attention_mask])
        positions = positions_from_mask(attention_mask)
        windows = self.cfg.sliding_windows or (None,) * self.cfg.num_layers
        masks = {w: attention_mask_bts(attention_mask, causal=True, sliding_window=w)
                 for w in set(windows)}
        x = self.embed_tokens(input_ids)
        for layer, window in zip(self.layers, windows):
            x = layer(x, masks[window], positions)
        return self.norm(x)


class LlamaForCausalLM(nnx.Module):
    """Decoder with an LM head (``lm_head``, or the transposed embedding when tied) -> (B, T, V)."""

    BASE: ClassVar[str] = "model"
    HEADS: ClassVar[tuple[str, ...]] = ("lm_head",)

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = LlamaModel(cfg, rngs=rngs)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, rngs=rngs))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        hidden = self.model(input_ids, attention_mask)
        logits = (self.model.embed_tokens.attend(hidden) if self.lm_head is None
                  else self.lm_head(hidden))
        chex.assert_shape(logits, (*input_ids.shape, self.cfg.vocab_size))
        return logits
