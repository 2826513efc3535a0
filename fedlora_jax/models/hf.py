"""Loads a local Hugging Face model directory (config.json, safetensors, tokenizer) into NNX models.

The NNX module trees mirror ``transformers``' module names, so each parameter's Hugging Face tensor
name follows from its NNX path by a few regex rules (:data:`fedlora_jax.models.hf_weights.RULES`), each with the transform that
turns the torch tensor into ours (``nn.Linear`` stores ``(d_out, d_in)``, ``nnx.Linear`` the
transpose; GPT-2's ``Conv1D`` already stores ``(d_in, d_out)``, see :func:`hf_name`). Loading
walks the parameters of an abstract model (``nnx.eval_shape``), so every one is accounted for:
found, randomly initialised (a missing head, reported in :class:`LoadInfo`), or an error. The same
naming serves :mod:`fedlora_jax.models.peft_io`, and ``load_pretrained(dir,
adapter=adapter_dir)`` adds a PEFT adapter in the same call.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import transformers
from flax import nnx

from fedlora_jax.lora import LoRAConfig, apply_lora
from fedlora_jax.models.bert import BertConfig, BertForSequenceClassification, RobertaForSequenceClassification
from fedlora_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from fedlora_jax.models import peft_io
from fedlora_jax.models.hf_weights import WeightFiles, hf_name
from fedlora_jax.models.llama import LlamaConfig, LlamaForCausalLM

@dataclasses.dataclass(frozen=True)
class Architecture:
    """How to build our model for one ``model_type``: its config and a model class per task."""

    config: Callable[..., Any]
    models: Mapping[str, type[nnx.Module]]


_DECODER = Architecture(LlamaConfig.from_hf, {"causal_lm": LlamaForCausalLM})
_ROBERTA = Architecture(BertConfig.from_hf, {"classification": RobertaForSequenceClassification})
ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture(BertConfig.from_hf, {"classification": BertForSequenceClassification}),
    "gpt2": Architecture(GPT2Config.from_hf, {"causal_lm": GPT2LMHeadModel}),
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
}


@dataclasses.dataclass(frozen=True)
class LoadInfo:
    """What :func:`load_pretrained` did: ``initialized`` lists HF tensor names that were missing
    from the checkpoint and randomly initialised (heads only); ``unexpected`` the unused tensors;
    ``lora`` the adapter's settings when an adapter was loaded."""

    model_type: str
    task: str
    config: Any
    hf_config: transformers.PretrainedConfig
    files: tuple[str, ...]
    initialized: tuple[str, ...]
    unexpected: tuple[str, ...]
    lora: LoRAConfig | None = None


def _read_model_type(directory: Path) -> str:
    if not directory.is_dir():
        raise FileNotFoundError(f"Model directory {directory} does not exist; pass a local Hugging Face "
                                "model directory (config.json + *.safetensors + tokenizer files).")
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"No config.json in {directory}; save the model with "
                                "`model.save_pretrained(dir)` or copy its config.json there.")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON ({e}).") from e
    if model_type not in ARCHITECTURES:
        raise ValueError(f"Unsupported model_type {model_type!r} in {config_file}; "
                         f"supported: {sorted(ARCHITECTURES)}.")
    return model_type


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")


def default_task(path: str | Path) -> str:
    """The task a checkpoint's family serves by default: ``classification`` (encoders) or
    ``causal_lm`` (decoders); checks the directory and its ``model_type`` on the way."""
    return next(iter(ARCHITECTURES[_read_model_type(Path(path))].models))


def load_tokenizer(path: str | Path):
    """The directory's tokenizer through ``transformers``, or a clear error if it has none."""
    directory = Path(path)
    if not any((directory / f).exists() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{directory} has no tokenizer files ({', '.join(_TOKENIZER_FILES)});"
                                " save the tokenizer beside the weights: tokenizer.save_pretrained(DIR).")
    return transformers.AutoTokenizer.from_pretrained(directory)


def _init_missing(shape: tuple[int, ...], leaf: str, std: float, key: jax.Array) -> jax.Array:
    """HF's ``_init_weights`` for a fresh head: N(0, initializer_range) weights, zero bias, unit scale."""
    if leaf == "bias":
        return jnp.zeros(shape)
    if leaf == "scale":
        return jnp.ones(shape)
    return std * jax.random.normal(key, shape)


def _mean_pooled(directory: Path) -> bool:
    """Whether a sentence-transformers checkpoint declares mean pooling (``1_Pooling/config.json``)."""
    file = directory / "1_Pooling" / "config.json"
    return file.is_file() and bool(json.loads(file.read_text()).get("pooling_mode_mean_tokens"))


def load_pretrained(path: str | Path, *, task: str | None = None, num_labels: int | None = None,
                    dtype: jnp.dtype = jnp.float32, seed: int = 0,
                    adapter: str | Path | None = None):
    """Loads a local HF model directory -> ``(model, tokenizer, info)``.

    ``task`` picks the head (``classification`` for encoders, ``causal_lm`` for decoders; defaults to
    the adapter's ``task_type``, else the family's only one); ``num_labels`` overrides the config's.
    Weights are cast to ``dtype``. Checkpoints of the bare backbone (``encoder.layer...``) and of
    the task model (``bert.encoder.layer...``) both load; missing head tensors are initialised with
    ``seed``. The tokenizer is ``None`` when the directory has no tokenizer files.

    ``adapter``: a PEFT LoRA adapter directory. Its ``adapter_config.json`` (rank, alpha, rsLoRA,
    targets, modules_to_save, dropout) wraps the model (:func:`fedlora_jax.lora.apply_lora`), its
    weights are loaded (:func:`fedlora_jax.models.peft_io.load_adapter`) and the model is returned
    in eval mode (LoRA dropout off); ``info.lora`` holds the settings.
    """
    directory = Path(path)
    model_type = _read_model_type(directory)
    arch = ARCHITECTURES[model_type]
    lora, adapter_task = peft_io.read_adapter_config(adapter) if adapter is not None else (None, None)
    if task and adapter_task and task != adapter_task:
        raise ValueError(f"task={task!r} but the adapter in {adapter} was trained for "
                         f"{adapter_task!r} (task_type in {peft_io.CONFIG}).")
    task = task or adapter_task or next(iter(arch.models))
    if task not in arch.models:
        raise ValueError(f"Task {task!r} is not available for model_type {model_type!r}; "
                         f"available: {sorted(arch.models)}.")
    hf_config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    config = arch.config(hf_config, num_labels=num_labels)
    if _mean_pooled(directory) and hasattr(config, "pooling"):
        config = dataclasses.replace(config, pooling="mean")
    model_cls = arch.models[task]
    conv1d = getattr(model_cls, "CONV1D", ())
    abstract = nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    ckpt = WeightFiles(directory)
    base = model_cls.BASE + "."
    prefixed = any(name.startswith(base) for name in ckpt.location)
    std = getattr(hf_config, "initializer_range", 0.02)
    key = jax.random.key(seed)
    used, initialized, leaves = set(), [], []
    for path, var in nnx.to_flat_state(state):
        name, transform = hf_name(path, conv1d)
        stored = name if prefixed or not name.startswith(base) else name[len(base):]
        if stored in ckpt:
            value = transform(ckpt[stored])
            used.add(stored)
            if value.shape != var.shape:
                raise ValueError(f"Tensor {stored!r} has shape {value.shape} after conversion, expected "
                                 f"{var.shape} from {directory / 'config.json'}; the config and weights "
                                 "do not belong together.")
        elif any(name.startswith(head + ".") for head in model_cls.HEADS):
            key, sub = jax.random.split(key)
            value = _init_missing(var.shape, path[-1], std, sub)
            initialized.append(name)
        else:
            raise ValueError(f"Tensor {stored!r} is missing from the checkpoint in {directory}; it is "
                             f"not a {model_type} {task} checkpoint or the files are incomplete.")
        leaves.append((path, var.replace(jnp.asarray(value, dtype))))
    model = nnx.merge(graphdef, nnx.from_flat_state(leaves))
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Embed):  # its compute dtype was fixed to the abstract float32
            module.dtype = dtype

    has_tokenizer = any((directory / f).exists() for f in _TOKENIZER_FILES)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory) if has_tokenizer else None
    if lora is not None:
        apply_lora(model, lora, rngs=nnx.Rngs(seed))
        peft_io.load_adapter(model, adapter)
        model.eval()
    info = LoadInfo(model_type=model_type, task=task, config=config, hf_config=hf_config,
                    files=tuple(sorted({str(f) for f in ckpt.location.values()})),
                    initialized=tuple(initialized),
                    unexpected=tuple(sorted(set(ckpt.location) - used)), lora=lora)
    return model, tokenizer, info
