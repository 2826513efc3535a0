"""LoRA parity with PEFT: adapters exported by us load in PEFT (and back) with equal logits."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from fedlora_jax.lora import LoRAConfig, apply_lora, lora_layers  # noqa: E402
from fedlora_jax.models.hf import load_pretrained  # noqa: E402
from fedlora_jax.models.peft_io import load_adapter, save_adapter  # noqa: E402
from tests.hf_helpers import DECODER, ENCODER, assert_close_on_valid, batch, save_torch, torch_logits  # noqa: E402

CASES = {
    "bert": ("BertConfig", "BertForSequenceClassification", ENCODER,
             dict(targets=("query", "value", "attention/output/dense"), modules_to_save=("classifier",))),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification",
                {**ENCODER, "pad_token_id": 1, "max_position_embeddings": 66},
                dict(targets=("query", "key", "intermediate/dense"), modules_to_save=("classifier",))),
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", DECODER,
                  dict(targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"), modules_to_save=())),
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
    torch_model = save_torch(tmp_path / "base", "BertConfig", "BertForSequenceClassification", ENCODER)
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, target_modules=["query", "value"],
                                  modules_to_save=["classifier"])
    peft_model = peft.get_peft_model(torch_model, peft_config).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    model, _, _ = load_pretrained(tmp_path / "base")
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, rslora=rslora, targets=("query", "value")),
               rngs=nnx.Rngs(0))
    load_adapter(model, tmp_path / "adapter")
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
