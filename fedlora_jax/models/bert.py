"""BERT and RoBERTa encoders (post-LN, absolute positions) with sequence-classification heads.

The module tree mirrors ``transformers``' (``bert/encoder/layer/0/attention/self/query``, ...), so a
Hugging Face tensor name is the NNX path joined by dots (see :mod:`fedlora_jax.models.hf`) and PEFT
target names (``query``, ``value``, ``dense``, ``classifier``) carry over unchanged. Dropout is off:
the base is frozen and shared by all clients, and calls need no RNG.

Every model takes ``(input_ids, attention_mask, token_type_ids=None)``: segment ids tell the two
texts of a pair apart (BERT; ``None`` means all segment 0). RoBERTa has one segment
(``type_vocab_size=1``) and refuses non-zero ids.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from fedlora_jax.models.layers import activation, attend, attention_mask_bts, check_segments


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Encoder hyper-parameters; ``roberta_positions`` counts positions from ``pad_token_id + 1``."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    roberta_positions: bool = False
    num_labels: int = 2
    pooling: str = "cls"  # "cls": HF's pooler on [CLS]; "mean": masked mean (sentence-transformers)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}.")
        activation(self.hidden_act)
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}.")

    @classmethod
    def from_hf(cls, hf, num_labels: int | None = None) -> BertConfig:
        kind = getattr(hf, "position_embedding_type", None) or "absolute"
        if kind != "absolute":
            raise ValueError(f"position_embedding_type={kind!r} is not supported (only 'absolute').")
        return cls(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
                   num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
                   intermediate_size=hf.intermediate_size,
                   max_position_embeddings=hf.max_position_embeddings,
                   type_vocab_size=hf.type_vocab_size, layer_norm_eps=hf.layer_norm_eps,
                   hidden_act=hf.hidden_act, pad_token_id=hf.pad_token_id or 0,
                   roberta_positions=hf.model_type in ("roberta", "xlm-roberta"),
                   num_labels=num_labels or hf.num_labels)


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, rngs=rngs)
        self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, rngs=rngs)
        self.LayerNorm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array | None = None) -> jax.Array:
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        chex.assert_equal_shape([input_ids, token_type_ids])
        check_segments(token_type_ids, self.cfg.type_vocab_size)
        if self.cfg.roberta_positions:  # HF create_position_ids_from_input_ids
            not_pad = (input_ids != self.cfg.pad_token_id).astype(jnp.int32)
            positions = jnp.cumsum(not_pad, axis=1) * not_pad + self.cfg.pad_token_id
        else:
            positions = jnp.arange(input_ids.shape[1])[None]
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids))
        return self.LayerNorm(x)



class BertSelfAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.query = nnx.Linear(d, d, rngs=rngs)
        self.key = nnx.Linear(d, d, rngs=rngs)
        self.value = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x_btd: jax.Array, mask_b1ts: jax.Array) -> jax.Array:
        b, t, d = x_btd.shape
        heads = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
        return attend(heads(self.query(x_btd)), heads(self.key(x_btd)), heads(self.value(x_btd)),
                      mask_b1ts)


class BertResidualOutput(nnx.Module):
    """``LayerNorm(dense(h) + residual)``: HF's ``BertSelfOutput`` and ``BertOutput``."""

    def __init__(self, d_in: int, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.dense = nnx.Linear(d_in, cfg.hidden_size, rngs=rngs)
        self.LayerNorm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, h: jax.Array, residual_btd: jax.Array) -> jax.Array:
        return self.LayerNorm(self.dense(h) + residual_btd)


class BertAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.self = BertSelfAttention(cfg, rngs=rngs)
        self.output = BertResidualOutput(cfg.hidden_size, cfg, rngs=rngs)

    def __call__(self, x_btd: jax.Array, mask_b1ts: jax.Array) -> jax.Array:
        return self.output(self.self(x_btd, mask_b1ts), x_btd)


class BertIntermediate(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.dense = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, rngs=rngs)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        return self.act(self.dense(x_btd))


class BertLayer(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.attention = BertAttention(cfg, rngs=rngs)
        self.intermediate = BertIntermediate(cfg, rngs=rngs)
        self.output = BertResidualOutput(cfg.intermediate_size, cfg, rngs=rngs)

    def __call__(self, x_btd: jax.Array, mask_b1ts: jax.Array) -> jax.Array:
        x_btd = self.attention(x_btd, mask_b1ts)
        return self.output(self.intermediate(x_btd), x_btd)


class BertEncoder(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.layer = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

    def __call__(self, x_btd: jax.Array, mask_b1ts: jax.Array) -> jax.Array:
        for layer in self.layer:
            x_btd = layer(x_btd, mask_b1ts)
        return x_btd


class BertPooler(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.dense = nnx.Linear(cfg.hidden_size, cfg.hidden_size, rngs=rngs)

    def __call__(self, hidden_btd: jax.Array) -> jax.Array:
        return jnp.tanh(self.dense(hidden_btd[:, 0]))


class BertModel(nnx.Module):
    """The encoder: ``(input_ids, attention_mask, token_type_ids) -> last hidden state (B, T, D)``."""

    def __init__(self, cfg: BertConfig, *, add_pooling_layer: bool, rngs: nnx.Rngs):
        self.embeddings = BertEmbeddings(cfg, rngs=rngs)
        self.encoder = BertEncoder(cfg, rngs=rngs)
        self.pooler = BertPooler(cfg, rngs=rngs) if add_pooling_layer else None

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 token_type_ids: jax.Array | None = None) -> jax.Array:
        chex.assert_rank([input_ids, attention_mask], 2)
        chex.assert_equal_shape([input_ids, attention_mask])
        mask = attention_mask_bts(attention_mask, causal=False)
        return self.encoder(self.embeddings(input_ids, token_type_ids), mask)


class BertForSequenceClassification(nnx.Module):
    """BERT with HF's head: ``classifier(tanh(pooler.dense(h[CLS])))`` -> logits (B, num_labels).

    With ``cfg.pooling == "mean"`` the classifier reads the masked mean of the last hidden state
    instead: the sentence embedding that sentence-transformers checkpoints (such as
    all-MiniLM-L6-v2) were trained to produce, whose [CLS] pooler was never trained.
    """

    BASE: ClassVar[str] = "bert"
    HEADS: ClassVar[tuple[str, ...]] = ("classifier", "bert.pooler")

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.bert = BertModel(cfg, add_pooling_layer=True, rngs=rngs)
        self.classifier = nnx.Linear(cfg.hidden_size, cfg.num_labels, rngs=rngs)

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Last hidden state (B, T, D) and pooled output (B, D), as HF ``BertModel`` returns them."""
        hidden = self.bert(input_ids, attention_mask, token_type_ids)
        return hidden, self.bert.pooler(hidden)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 token_type_ids: jax.Array | None = None) -> jax.Array:
        if self.cfg.pooling == "mean":
            hidden = self.bert(input_ids, attention_mask, token_type_ids)
            w = attention_mask.astype(hidden.dtype)[..., None]
            features = (hidden * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
        else:
            features = self.encode(input_ids, attention_mask, token_type_ids)[1]
        logits = self.classifier(features)
        chex.assert_shape(logits, (input_ids.shape[0], self.cfg.num_labels))
        return logits


class RobertaClassificationHead(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.dense = nnx.Linear(cfg.hidden_size, cfg.hidden_size, rngs=rngs)
        self.out_proj = nnx.Linear(cfg.hidden_size, cfg.num_labels, rngs=rngs)

    def __call__(self, hidden_btd: jax.Array) -> jax.Array:
        return self.out_proj(jnp.tanh(self.dense(hidden_btd[:, 0])))


class RobertaForSequenceClassification(nnx.Module):
    """RoBERTa (no pooler) with HF's ``RobertaClassificationHead`` on the ``<s>`` token."""

    BASE: ClassVar[str] = "roberta"
    HEADS: ClassVar[tuple[str, ...]] = ("classifier",)

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.roberta = BertModel(cfg, add_pooling_layer=False, rngs=rngs)
        self.classifier = RobertaClassificationHead(cfg, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 token_type_ids: jax.Array | None = None) -> jax.Array:
        logits = self.classifier(self.roberta(input_ids, attention_mask, token_type_ids))
        chex.assert_shape(logits, (input_ids.shape[0], self.cfg.num_labels))
        return logits
