"""Adapters in PEFT's file layout: ``adapter_model.safetensors`` + ``adapter_config.json``.

A wrapped layer at NNX path ``p`` is stored as ``base_model.model.<p joined by dots>.lora_A.weight``
``(r, d_in)`` and ``lora_B.weight`` ``(d_out, r)`` (torch layout, our ``A``/``B`` transposed); a
``modules_to_save`` parameter under its Hugging Face name (:func:`fedlora_jax.models.hf.hf_name`).
This works because the NNX models mirror ``transformers``' module names, so
``peft.PeftModel.from_pretrained(hf_model, directory)`` loads what :func:`save_adapter` writes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.flax import load_file
from safetensors.numpy import save_file

from fedlora_jax.lora import HeadParam, LoRAConfig, lora_layers, matches, path_str
from fedlora_jax.models.hf import hf_name

PREFIX = "base_model.model."
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_TASKS = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}


def _transpose(w: jax.Array) -> jax.Array:
    return w.T


def _dotted(path: str) -> str:
    return path.replace("/", ".")


def _head_params(model: nnx.Module) -> list[tuple[tuple, HeadParam]]:
    return [(path, var) for path, var in nnx.iter_graph(model) if isinstance(var, HeadParam)]


def adapter_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """PEFT-named float32 tensors of every LoRA layer (sketch mask folded into A) and head."""
    tensors = {}
    for path, layer in lora_layers(model):
        a = layer.lora_a[...] * layer.sketch[...]
        tensors[f"{PREFIX}{_dotted(path)}.lora_A.weight"] = np.asarray(_transpose(a), np.float32)
        tensors[f"{PREFIX}{_dotted(path)}.lora_B.weight"] = np.asarray(_transpose(layer.lora_b[...]),
                                                                      np.float32)
    for path, var in _head_params(model):
        name, transform = hf_name(path)  # the transforms are involutions: NNX -> torch too
        tensors[PREFIX + name] = np.asarray(transform(var[...]), np.float32)
    return tensors


def _saved_modules(model: nnx.Module, patterns: tuple[str, ...]) -> list[str]:
    """HF paths of the outermost modules matched by ``modules_to_save`` patterns."""
    paths = [path_str(p) for p, _ in nnx.iter_modules(model) if p]
    hit = [p for p in paths if any(matches(t, p) for t in patterns)]
    return sorted(_dotted(p) for p in hit if not any(p.startswith(q + "/") for q in hit))


def save_adapter(model: nnx.Module, directory: str | Path, lora: LoRAConfig, *,
                 task: str | None = None, base_model_name_or_path: str | None = None) -> Path:
    """Writes the adapter of ``model`` (wrapped by ``apply_lora(model, lora)``) for PEFT."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("The model has no LoRA layers; call apply_lora before save_adapter.")
    if any(layer.rank != lora.rank for _, layer in layers):
        raise ValueError(f"LoRA layer ranks {sorted({l.rank for _, l in layers})} differ from "
                         f"lora.rank={lora.rank}; pass the LoRAConfig used by apply_lora.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), str(directory / WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": PEFT_TASKS.get(task), "r": lora.rank,
        "lora_alpha": lora.alpha, "use_rslora": lora.rslora, "lora_dropout": lora.dropout,
        "target_modules": sorted(_dotted(p) for p, _ in layers),
        "modules_to_save": _saved_modules(model, lora.modules_to_save) or None,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
    }
    (directory / CONFIG).write_text(json.dumps(config, indent=2))
    return directory


def load_adapter(model: nnx.Module, directory: str | Path) -> nnx.Module:
    """Sets the LoRA and head weights of ``model`` (already wrapped) from a PEFT adapter, in place.

    The adapter's rank and scaling must equal the wrapped layers'; every wrapped layer and head
    must be in the file and every tensor of the file must be used. Sketch masks are left as they are.
    """
    directory = Path(directory)
    for file in (WEIGHTS, CONFIG):
        if not (directory / file).exists():
            raise FileNotFoundError(f"No {file} in {directory}; save the adapter with "
                                    "peft's save_pretrained or fedlora_jax save_adapter.")
    config = json.loads((directory / CONFIG).read_text())
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    tensors = dict(load_file(str(directory / WEIGHTS)))
    unused = set(tensors)

    def take(name: str, like: nnx.Variable, transform=_transpose) -> jax.Array:
        """The tensor ``name`` converted to NNX layout and cast like ``like``."""
        if name not in tensors:
            raise ValueError(f"Adapter {directory / WEIGHTS} has no tensor {name!r}; it was trained "
                             "for other target modules.")
        value = transform(tensors[name])
        if value.shape != like.shape:
            raise ValueError(f"Adapter tensor {name!r} has shape {tensors[name].shape}, which "
                             f"converts to {value.shape}; expected {like.shape}.")
        unused.discard(name)
        return value.astype(like.dtype)

    for path, layer in lora_layers(model):
        if layer.rank != r or not math.isclose(layer.scaling, scaling):
            raise ValueError(f"Adapter r={r}, scaling={scaling:g} does not match layer {path} "
                             f"(r={layer.rank}, scaling={layer.scaling:g}).")
        base = f"{PREFIX}{_dotted(path)}"
        layer.lora_a[...] = take(f"{base}.lora_A.weight", layer.lora_a)
        layer.lora_b[...] = take(f"{base}.lora_B.weight", layer.lora_b)
    for path, var in _head_params(model):
        name, transform = hf_name(path)
        var[...] = take(PREFIX + name, var, transform)
    if unused:
        raise ValueError(f"Adapter tensors not used by the model: {sorted(unused)[:8]}; the adapter "
                         "targets modules the model does not wrap.")
    return model
