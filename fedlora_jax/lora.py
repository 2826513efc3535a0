"""LoRA adapters on Flax NNX linear layers, with PEFT's scaling and a per-layer sketch mask.

A wrapped layer computes ``y = x W0 + c * ((x A) * s) B`` (docs/architecture.md, "Modules and where
each formula lives") where ``W0`` is the frozen base kernel, ``A: d_in x r`` (random init),
``B: r x d_out`` (zero init), ``c`` the LoRA scaling (``alpha / r``, or ``alpha / sqrt(r)`` for
rsLoRA) and ``s`` the client's rank mask (:class:`SketchMask`, all ones for the global model).
Because ``s`` multiplies the rank axis, autodiff gives exactly zero gradient to the rank components
a client does not hold.

Variables are typed so that ``nnx.split`` and ``nnx.filter_state`` separate what the federation
treats differently, whatever the modules are named: :class:`LoRAA`, :class:`LoRAB` and
:class:`HeadParam` are trained (:data:`TRAINABLE`), :class:`SketchMask` is per client, everything else
is the frozen base shared by all clients, in which :class:`BaseKernel` marks the kernels that carry
an adapter. A variable's layer is the module path of the :class:`LoRALinear` holding it
(:func:`layer_key`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class SketchMask(nnx.Variable):
    """Rank mask ``s`` of one LoRA layer: ``r/k`` on the client's kept components, 0 elsewhere."""


class HeadParam(nnx.Param):
    """A fully trained parameter (PEFT's ``modules_to_save``), e.g. a fresh classification head."""


class LoRAA(nnx.LoRAParam):
    """The down-projection ``A`` (d_in x r) of a LoRA layer."""


class LoRAB(nnx.LoRAParam):
    """The up-projection ``B`` (r x d_out) of a LoRA layer."""


class BaseKernel(nnx.Param):
    """The frozen kernel ``W0`` (d_in x d_out) of a linear layer wrapped by :class:`LoRALinear`."""


TRAINABLE = nnx.Any(LoRAA, LoRAB, HeadParam)
DEFAULT_HEADS = ("classifier",)  # trained in full when present, by default (LoRAConfig)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Where and how LoRA is applied.

    Attributes:
      rank: global LoRA rank ``r`` (the paper's gamma).
      alpha: LoRA alpha; the scaling is ``alpha / rank`` (``alpha / sqrt(rank)`` with ``rslora``).
      rslora: use rank-stabilised scaling.
      targets: module-name patterns of the linear layers to adapt. A pattern matches a module path
        (``/``-joined, e.g. ``layers/0/attn/query``) when it equals the last path components or
        fully matches it as a regular expression.
      modules_to_save: module-name patterns whose parameters are trained in full (heads).
        ``None`` (the default) trains the classification head ``classifier`` when the model has
        one and nothing otherwise (a causal LM's ``lm_head`` stays frozen), as PEFT's ``SEQ_CLS``
        and ``CAUSAL_LM`` task types do; explicit patterns must each match a module.
      dropout: LoRA dropout probability on the adapter input (0 disables it).
    """

    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    targets: tuple[str, ...] = ("query", "value")
    modules_to_save: tuple[str, ...] | None = None
    dropout: float = 0.0

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}.")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}.")
        if not self.targets:
            raise ValueError("lora.targets is empty: name at least one linear layer to adapt, "
                             "e.g. targets=('query', 'value').")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def saved_modules(self) -> tuple[str, ...]:
        """The ``modules_to_save`` patterns in force (``None`` resolved to :data:`DEFAULT_HEADS`)."""
        return DEFAULT_HEADS if self.modules_to_save is None else self.modules_to_save


class LoRALinear(nnx.Module):
    """A frozen ``nnx.Linear`` (its kernel retyped :class:`BaseKernel`) plus a sketched low-rank
    update."""

    def __init__(self, base: nnx.Linear, rank: int, scaling: float, *, dropout: float = 0.0,
                 rngs: nnx.Rngs):
        d_in, d_out = base.in_features, base.out_features
        if rank > min(d_in, d_out):
            raise ValueError(f"LoRA rank {rank} exceeds the layer's dimensions ({d_in} x {d_out}); "
                             f"use rank <= {min(d_in, d_out)}.")
        dtype = base.kernel.dtype
        base.kernel = _retyped(base.kernel, BaseKernel)
        self.base = base
        # PEFT initialises A with kaiming_uniform(a=sqrt(5)): U(-1/sqrt(d_in), 1/sqrt(d_in)).
        bound = 1.0 / math.sqrt(d_in)
        self.lora_a = LoRAA(jax.random.uniform(rngs.params(), (d_in, rank), dtype, -bound, bound))
        self.lora_b = LoRAB(jnp.zeros((rank, d_out), dtype))
        self.sketch = SketchMask(jnp.ones((rank,), dtype))
        self.scaling = scaling
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    @property
    def rank(self) -> int:
        return self.lora_a.shape[-1]

    def __call__(self, x: jax.Array) -> jax.Array:
        z = x if self.dropout is None else self.dropout(x)
        a, b, mask = self.lora_a[...], self.lora_b[...], self.sketch[...]
        if self.base.dtype is not None:  # the base layer's compute dtype (set_compute_dtype)
            z, a, b, mask = (v.astype(self.base.dtype) for v in (z, a, b, mask))
        z = (z @ a) * mask
        return self.base(x) + self.scaling * (z @ b)


def set_compute_dtype(model: nnx.Module, dtype) -> None:
    """Mixed precision: every ``nnx.Linear`` of ``model`` (the heads' and the bases of its
    :class:`LoRALinear` layers, whose ``A`` and ``B`` follow) computes in ``dtype`` while its
    weights keep their own dtype, so gradients and optimizer states stay float32. Embeddings,
    norms, residual sums and the loss keep the weights' dtype."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Linear):
            module.dtype = jnp.dtype(dtype)


def _retyped(var: nnx.Variable, kind: type[nnx.Variable]) -> nnx.Variable:
    """``var``'s value and metadata as a variable of type ``kind``."""
    return kind.from_metadata(var.get_value(), var.get_metadata())


def path_str(path: Sequence) -> str:
    return "/".join(str(p) for p in path)


def layer_key(path: Sequence, var: nnx.Variable) -> str:
    """The layer of the adapter variable ``var`` at ``path`` of a state split from the model: the
    module path of its :class:`LoRALinear` (``A``, ``B`` and the mask are the layer's own
    variables, the :class:`BaseKernel` that of its ``base``)."""
    return path_str(path[:-2] if isinstance(var, BaseKernel) else path[:-1])


def by_layer(state: nnx.State, kind: type[nnx.Variable]) -> dict[str, jax.Array]:
    """``{layer: value}`` of the variables of type ``kind`` in ``state``, in the state's order
    (leading axes, e.g. clients, are kept)."""
    return {layer_key(path, var): var.get_value() for path, var in nnx.to_flat_state(state)
            if isinstance(var, kind)}


def matches(pattern: str, path: str) -> bool:
    """PEFT-like matching: suffix of whole path components, or a full regular-expression match."""
    return path == pattern or path.endswith("/" + pattern) or re.fullmatch(pattern, path) is not None


def _set_child(root: nnx.Module, path: tuple, value) -> None:
    parent = root
    for p in path[:-1]:
        parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    if isinstance(path[-1], int):
        parent[path[-1]] = value
    else:
        setattr(parent, path[-1], value)


def apply_lora(model: nnx.Module, cfg: LoRAConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Wraps the target linear layers of ``model`` in :class:`LoRALinear`, in place.

    Parameters of ``cfg.modules_to_save`` become :class:`HeadParam` (trained in full).
    Raises ``ValueError`` when a pattern matches no layer, naming the available ones.
    """
    linears = [(p, m) for p, m in nnx.iter_modules(model)
               if isinstance(m, nnx.Linear) and p]
    names = [path_str(p) for p, _ in linears]
    for pattern in cfg.targets:
        if not any(matches(pattern, n) for n in names):
            raise ValueError(f"LoRA target {pattern!r} matches no linear layer. "
                             f"Linear layers of this model: {sorted(set(names))[:24]}")
    for (path, lin), name in zip(linears, names):
        if any(matches(t, name) for t in cfg.targets):
            _set_child(model, path, LoRALinear(lin, cfg.rank, cfg.scaling,
                                               dropout=cfg.dropout, rngs=rngs))
    saved = 0
    for path, module in list(nnx.iter_modules(model)):
        # As PEFT's ModulesToSaveWrapper: a matched module is trained whole, submodules included.
        if any(matches(t, path_str(path[:i])) for t in cfg.saved_modules
               for i in range(1, len(path) + 1)):
            for attr, var in list(vars(module).items()):
                if type(var) in (nnx.Param, BaseKernel):  # frozen, an adapted kernel included
                    setattr(module, attr, _retyped(var, HeadParam))
                    saved += 1
    if cfg.modules_to_save and not saved:
        raise ValueError(f"modules_to_save {cfg.modules_to_save} match no module of the model; "
                         "set lora.modules_to_save=() if the model has no head to train.")
    return model


def lora_layers(model: nnx.Module) -> list[tuple[str, LoRALinear]]:
    return [(path_str(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)]


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every adapter into its base kernel (``W0 + c A B``) and unwraps it, in place."""
    for path, module in list(nnx.iter_modules(model)):
        if isinstance(module, LoRALinear):
            a, b, s = module.lora_a[...], module.lora_b[...], module.sketch[...]
            module.base.kernel[...] = module.base.kernel[...] + module.scaling * (a * s) @ b
            if isinstance(module.base.kernel, BaseKernel):  # the linear as before apply_lora
                module.base.kernel = _retyped(module.base.kernel, nnx.Param)
            _set_child(model, path, module.base)
    return model


def num_adapter_params(lora_state) -> int:
    return sum(x.size for x in jax.tree.leaves(lora_state))
