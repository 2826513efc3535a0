"""LoRA parity with PEFT: adapters exported by us load in PEFT (and back) with equal logits."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from fedlora_jax.lora import HeadParam, LoRAConfig, apply_lora, lora_layers  # noqa: E402
from fedlora_jax.models.hf import load_pretrained  # noqa: E402
from fedlora_jax.models.peft_io import load_adapter, save_adapter  # noqa: E402
from tests.hf_helpers import (DECODER, ENCODER, GPT2, assert_close_on_valid, batch,  # noqa: E402
                              save_torch, torch_logits)

CASES = {
    "bert": ("BertConfig", "BertForSequenceClassification", ENCODER,
             dict(targets=("query", "value", "attention/output/dense"), modules_to_save=("classifier",))),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification",
                {**ENCODER, "pad_token_id": 1, "max_position_embeddings": 66},
                dict(targets=("query", "key", "intermediate/dense"), modules_to_save=("classifier",))),
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", DECODER,
                  dict(targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"), modules_to_save=())),
    "gpt2_conv1d": ("GPT2Config", "GPT2LMHeadModel", GPT2, dict(targets=("c_attn", "attn/c_proj"))),
}


def _randomize_adapter(model: nnx.Module, seed: int) -> None:
    """Nonzero B (and perturbed heads) so that the adapter changes the logits."""
    key = jax.random.key(seed)
    for _, layer in lora_layers(model):
        key, sub = jax.random.split(key)
        layer.lora_b[...] = 0.2 * jax.random.normal(sub, layer.lora_b.shape)
    for path, var in nnx.iter_graph(model):
        if type(var).__name__ == "HeadParam":
            key, sub = jax.random.split(key)
            var[...] = var[...] + 0.1 * jax.random.normal(sub, var.shape)


def _assert_adapter_active(peft_model, logits, ids, mask) -> None:
    with peft_model.disable_adapter():
        base = torch_logits(peft_model, ids, mask)
    assert np.abs(logits - base).max() > 1e-3


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("case", list(CASES))
def test_exported_adapter_matches_peft(tmp_path, case, rslora):
    config_cls, model_cls, kwargs, where = CASES[case]
    torch_model = save_torch(tmp_path / "base", config_cls, model_cls, kwargs)
    model, _, info = load_pretrained(tmp_path / "base")
    lora = LoRAConfig(rank=4, alpha=8.0, rslora=rslora, **where)
    apply_lora(model, lora, rngs=nnx.Rngs(1))
    _randomize_adapter(model, seed=2)
    ids, mask = batch()
    ours = model(ids, mask)
    save_adapter(model, tmp_path / "adapter", lora, task=info.task)
    peft_model = peft.PeftModel.from_pretrained(torch_model, tmp_path / "adapter").eval()
    ref = torch_logits(peft_model, ids, mask)
    assert_close_on_valid(ours, ref, mask)
    _assert_adapter_active(peft_model, ref, ids, mask)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_peft_adapter_loads_into_ours(tmp_path, rslora):
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, target_modules=["query", "value"],
                                  modules_to_save=["classifier"])
    peft_model, base, adapter = _peft_adapter(tmp_path, "BertConfig", "BertForSequenceClassification",
                                              ENCODER, peft_config)
    model, _, _ = load_pretrained(base)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, rslora=rslora, targets=("query", "value")),
               rngs=nnx.Rngs(0))
    load_adapter(model, adapter)
    ids, mask = batch()
    ref = torch_logits(peft_model, ids, mask)
    _assert_adapter_active(peft_model, ref, ids, mask)
    assert_close_on_valid(model(ids, mask), ref, mask)


def test_adapter_mismatch_errors(tmp_path):
    save_torch(tmp_path / "base", "BertConfig", "BertForSequenceClassification", ENCODER)
    model, _, _ = load_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="matches no linear layer"):
        apply_lora(model, LoRAConfig(targets=("q_proj",)), rngs=nnx.Rngs(0))
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("query",))
    apply_lora(model, lora, rngs=nnx.Rngs(0))
    save_adapter(model, tmp_path / "adapter", lora)
    other, _, _ = load_pretrained(tmp_path / "base")
    apply_lora(other, LoRAConfig(rank=2, alpha=8.0, targets=("query",)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="does not match layer"):
        load_adapter(other, tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(other, tmp_path)


def _peft_adapter(tmp_path, config_cls: str, model_cls: str, kwargs: dict, peft_config):
    """A PEFT adapter with random ``B`` on a tiny torch model, saved beside the base: -> the
    PEFT model (the reference), base and adapter directories."""
    torch_model = save_torch(tmp_path / "base", config_cls, model_cls, kwargs)
    peft_model = peft.get_peft_model(torch_model, peft_config).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    return peft_model, tmp_path / "base", tmp_path / "adapter"


ONE_CALL = {  # PEFT's usual settings per task type: the classifier is saved, a causal LM's head not
    "bert_seq_cls": ("BertConfig", "BertForSequenceClassification", ENCODER,
                     dict(task_type="SEQ_CLS", target_modules=["query", "value"]), "classification"),
    "gpt2_causal_lm": ("GPT2Config", "GPT2LMHeadModel", GPT2,
                       dict(task_type="CAUSAL_LM", target_modules=["c_attn", "c_proj"]), "causal_lm"),
}


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("case", list(ONE_CALL))
def test_one_call_adapter_load_gives_peft_logits(tmp_path, case, rslora):
    config_cls, model_cls, kwargs, where, task = ONE_CALL[case]
    peft_model, base, adapter = _peft_adapter(
        tmp_path, config_cls, model_cls, kwargs,
        peft.LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, **where))
    model, _, info = load_pretrained(base, adapter=adapter)
    assert info.task == task and info.lora.rank == 4 and info.lora.rslora == rslora
    ids, mask = batch()
    ref = torch_logits(peft_model, ids, mask)
    _assert_adapter_active(peft_model, ref, ids, mask)
    assert_close_on_valid(model(ids, mask), ref, mask)


def test_adapter_errors_explain_the_fix(tmp_path):
    peft_model, base, adapter = _peft_adapter(
        tmp_path, "BertConfig", "BertForSequenceClassification", ENCODER,
        peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, use_rslora=True,
                        target_modules=["query", "value"]))
    model, _, _ = load_pretrained(base)
    with pytest.raises(ValueError, match=r"no LoRA layers.*wrap it first with apply_lora.*"
                                         r"load_pretrained\(model_dir, adapter=adapter_dir\)"):
        load_adapter(model, adapter)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=("query", "value")), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"trained with rsLoRA.*wrapped without it; wrap with "
                                         r"LoRAConfig\(rslora=True\)"):
        load_adapter(model, adapter)
    with pytest.raises(ValueError, match="trained for 'classification'"):
        load_pretrained(base, adapter=adapter, task="causal_lm")
    with pytest.raises(FileNotFoundError, match="Adapter directory .* does not exist"):
        load_pretrained(base, adapter=tmp_path / "nope")

    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="adapter_model.safetensors.*corrupt or truncated"):
        load_pretrained(base, adapter=adapter)

    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="sets {'use_dora': True}.*plain LoRA"):
        load_pretrained(base, adapter=adapter)


def test_default_modules_to_save_follow_the_task(tmp_path):
    """``modules_to_save=None`` trains a classifier's head and leaves a causal LM's ``lm_head``
    frozen (PEFT's SEQ_CLS / CAUSAL_LM defaults); explicit patterns must match."""
    save_torch(tmp_path / "bert", "BertConfig", "BertForSequenceClassification", ENCODER)
    save_torch(tmp_path / "gpt2", "GPT2Config", "GPT2LMHeadModel", {**GPT2, "tie_word_embeddings": False})
    heads = lambda m: sorted({str(p[0]) for p, v in nnx.iter_graph(m) if isinstance(v, HeadParam)})
    bert, _, _ = load_pretrained(tmp_path / "bert")
    assert heads(apply_lora(bert, LoRAConfig(), rngs=nnx.Rngs(0))) == ["classifier"]
    gpt2, _, _ = load_pretrained(tmp_path / "gpt2")
    assert heads(apply_lora(gpt2, LoRAConfig(targets=("c_attn",)), rngs=nnx.Rngs(0))) == []
    other, _, _ = load_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"modules_to_save \('classifier',\) match no module"):
        apply_lora(other, LoRAConfig(targets=("c_attn",), modules_to_save=("classifier",)),
                   rngs=nnx.Rngs(0))
