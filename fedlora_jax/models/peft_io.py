"""Adapters in PEFT's file layout: ``adapter_model.safetensors`` + ``adapter_config.json``.

A wrapped layer at NNX path ``p`` is stored as ``base_model.model.<p joined by dots>.lora_A.weight``
``(r, d_in)`` and ``lora_B.weight`` ``(d_out, r)`` (torch layout, our ``A``/``B`` transposed); a
``modules_to_save`` parameter under its Hugging Face name (:func:`fedlora_jax.models.hf_weights.hf_name`).
This works because the NNX models mirror ``transformers``' module names, so
``peft.PeftModel.from_pretrained(hf_model, directory)`` loads what :func:`save_adapter` writes, and
:func:`load_adapter` (or ``load_pretrained(model_dir, adapter=directory)``, which also reads the
settings with :func:`read_adapter_config`) loads what PEFT writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from fedlora_jax.lora import HeadParam, LoRAConfig, LoRALinear, lora_layers, matches, path_str
from fedlora_jax.models.hf_weights import hf_name, open_safetensors, read_safetensors

PREFIX = "base_model.model."
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_TASKS = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}
# PEFT options that change the adapter's math, with the value that leaves it plain LoRA.
PLAIN = {"use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
         "bias": "none", "lora_bias": False, "target_parameters": None, "exclude_modules": None,
         "layer_replication": None, "trainable_token_indices": None, "use_qalora": False,
         "alora_invocation_tokens": None}


def _transpose(w: jax.Array) -> jax.Array:
    return w.T


def _dotted(path: str) -> str:
    return path.replace("/", ".")


def _head_params(model: nnx.Module) -> list[tuple[tuple, HeadParam]]:
    return [(path, var) for path, var in nnx.iter_graph(model) if isinstance(var, HeadParam)]


def _conv1d(model: nnx.Module) -> tuple[str, ...]:
    return getattr(type(model), "CONV1D", ())


def adapter_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """PEFT-named float32 tensors of every LoRA layer (sketch mask folded into A) and head."""
    tensors = {}
    for path, layer in lora_layers(model):
        a = layer.lora_a[...] * layer.sketch[...]
        tensors[f"{PREFIX}{_dotted(path)}.lora_A.weight"] = np.asarray(_transpose(a), np.float32)
        tensors[f"{PREFIX}{_dotted(path)}.lora_B.weight"] = np.asarray(_transpose(layer.lora_b[...]),
                                                                      np.float32)
    for path, var in _head_params(model):
        name, transform = hf_name(path, _conv1d(model))  # involutions: NNX -> torch too
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
        "modules_to_save": _saved_modules(model, lora.saved_modules) or None,
        "bias": "none", "init_lora_weights": True, "inference_mode": True,
        "fan_in_fan_out": any(p.rsplit("/", 1)[-1] in _conv1d(model) for p, _ in layers),
        "base_model_name_or_path": base_model_name_or_path,
    }
    (directory / CONFIG).write_text(json.dumps(config, indent=2))
    return directory


def read_adapter_config(directory: str | Path) -> tuple[LoRAConfig, str | None]:
    """The :class:`LoRAConfig` of a PEFT LoRA adapter directory and its task (``classification``,
    ``causal_lm`` or ``None``, from ``task_type``). Checks, before anything is loaded, that both
    files exist and read, and that the settings are plain LoRA (rsLoRA included)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"Adapter directory {directory} does not exist; pass the directory "
                                f"that holds {CONFIG} and {WEIGHTS} (PeftModel.save_pretrained "
                                "writes both).")
    for file in (WEIGHTS, CONFIG):
        if not (directory / file).exists():
            hint = (" Found adapter_model.bin: re-save it with save_pretrained(dir, "
                    "safe_serialization=True)." if (directory / "adapter_model.bin").exists() else "")
            raise FileNotFoundError(f"No {file} in {directory}; save the adapter with "
                                    f"peft's save_pretrained or fedlora_jax save_adapter.{hint}")
    file = directory / CONFIG
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e}).") from e
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type={config['peft_type']!r}; only LoRA adapters load.")
    for field in ("r", "lora_alpha", "target_modules"):
        if config.get(field) is None:
            raise ValueError(f"{file} has no {field!r}; it is not a complete LoRA adapter config.")
    unsupported = {k: config[k] for k, plain in PLAIN.items() if config.get(k) and config[k] != plain}
    if unsupported:
        raise ValueError(f"{file} sets {unsupported}, which fedlora_jax does not support: plain LoRA "
                         "or rsLoRA adapters only.")
    open_safetensors(directory / WEIGHTS)  # a truncated file fails here, before the model loads
    targets = config["target_modules"]  # module names, or one regex, over dot-joined paths
    targets = ((targets.replace(r"\.", "/"),) if isinstance(targets, str) else
               tuple(t.replace(".", "/") for t in targets))
    lora = LoRAConfig(rank=config["r"], alpha=float(config["lora_alpha"]),
                      rslora=bool(config.get("use_rslora", False)), targets=targets,
                      modules_to_save=tuple(m.replace(".", "/")
                                            for m in config.get("modules_to_save") or ()),
                      dropout=float(config.get("lora_dropout") or 0.0))
    tasks = {peft: ours for ours, peft in PEFT_TASKS.items()}
    return lora, tasks.get(config.get("task_type"))


def _scaling_mismatch(lora: LoRAConfig, path: str, layer: LoRALinear) -> str:
    """Why the adapter's scaling differs from the wrapped layer's, naming rsLoRA when it is that."""
    flipped = dataclasses.replace(lora, rslora=not lora.rslora)
    said = (f"Adapter r={lora.rank}, lora_alpha={lora.alpha:g}, use_rslora={lora.rslora} has scaling "
            f"{lora.scaling:g} but layer {path} has {layer.scaling:g}")
    if math.isclose(layer.scaling, flipped.scaling):
        return (f"{said}: the adapter was trained {'with' if lora.rslora else 'without'} rsLoRA "
                f"(alpha/sqrt(r)) and the model was wrapped {'without' if lora.rslora else 'with'} "
                f"it; wrap with LoRAConfig(rslora={lora.rslora}).")
    return f"{said}; wrap with LoRAConfig(alpha={lora.alpha:g}, rslora={lora.rslora})."


def load_adapter(model: nnx.Module, directory: str | Path) -> nnx.Module:
    """Sets the LoRA and head weights of ``model`` (already wrapped by ``apply_lora``) from a PEFT
    adapter, in place. ``load_pretrained(model_dir, adapter=directory)`` wraps and loads in one call.

    The adapter's rank and scaling must equal the wrapped layers'; every wrapped layer and head
    must be in the file and every tensor of the file must be used. Sketch masks are left as they are.
    """
    directory = Path(directory)
    lora, _ = read_adapter_config(directory)
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"The model has no LoRA layers to load {directory} into: wrap it first "
                         f"with apply_lora(model, LoRAConfig(rank={lora.rank}, ...)), or load model "
                         "and adapter in one call: load_pretrained(model_dir, adapter=adapter_dir).")
    for path, layer in layers:
        if layer.rank != lora.rank:
            raise ValueError(f"Adapter r={lora.rank} does not match layer {path} (r={layer.rank}); "
                             f"wrap with LoRAConfig(rank={lora.rank}).")
        if not math.isclose(layer.scaling, lora.scaling):
            raise ValueError(_scaling_mismatch(lora, path, layer))
    tensors = read_safetensors(directory / WEIGHTS)
    unused = set(tensors)

    def take(name: str, like: nnx.Variable, transform=_transpose) -> jax.Array:
        """The tensor ``name`` converted to NNX layout and cast like ``like``."""
        if name not in tensors:
            raise ValueError(f"Adapter {directory / WEIGHTS} has no tensor {name!r}; it was trained "
                             "for other target modules.")
        value = transform(tensors[name])
        if value.shape != like.shape:
            raise ValueError(f"Adapter tensor {name!r} has shape {tensors[name].shape}, which "
                             f"converts to {value.shape}; expected {like.shape} (a head trained "
                             "for another number of labels? pass num_labels).")
        unused.discard(name)
        return value.astype(like.dtype)

    for path, layer in layers:
        base = f"{PREFIX}{_dotted(path)}"
        layer.lora_a[...] = take(f"{base}.lora_A.weight", layer.lora_a)
        layer.lora_b[...] = take(f"{base}.lora_B.weight", layer.lora_b)
    for path, var in _head_params(model):
        name, transform = hf_name(path, _conv1d(model))
        var[...] = take(PREFIX + name, var, transform)
    if unused:
        raise ValueError(f"Adapter tensors not used by the model: {sorted(unused)[:8]}; the adapter "
                         "targets modules the model does not wrap.")
    return model
