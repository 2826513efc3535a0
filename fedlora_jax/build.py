"""Builds a run from its config: data, model with LoRA, the simulated network and workload, the
engine with its clock, and what the strategy may know (its context); scores held-out data."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedlora_jax import strategies, wireless
from fedlora_jax import config as config_lib
from fedlora_jax.aggregation import AdapterSizes, Costs, adapter_sizes
from fedlora_jax.client import split_model
from fedlora_jax.data import partition as partition_lib
from fedlora_jax.data.pool import ClientPool
from fedlora_jax.engine import FederatedEngine
from fedlora_jax.lora import apply_lora, set_compute_dtype
from fedlora_jax.tasks import get_loss

PARAM_BITS = 32.0  # bits per adapter parameter sent, up or down (fp32)


@dataclasses.dataclass
class Setup:
    engine: FederatedEngine
    heldout: dict[str, np.ndarray]
    label_names: tuple[str, ...]
    description: str
    heldout_owners: np.ndarray | None  # (H,) client per held-out example (built-in data only)
    profile: wireless.SystemProfile  # the simulated network, shared by the clock and the solver
    workload: wireless.WorkloadModel


def _model_path(cfg: config_lib.RunConfig) -> str | None:
    """The Hugging Face directory to load (None for the built-in tiny model)."""
    from fedlora_jax.data.builtin import minilm_path

    return {"tiny": None, "minilm": minilm_path()}.get(cfg.model.source, cfg.model.source)


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    """A directory's tokenizer, loaded once per process: the runs of a sweep or a pack share it
    (tokenizing only reads it)."""
    from fedlora_jax.models.hf import load_tokenizer

    return load_tokenizer(path)


def _tokenizer_and_task(cfg: config_lib.RunConfig):
    """The tokenizer (the tiny model borrows MiniLM's) and the task of the model's family:
    ``classification`` for encoders, ``causal_lm`` for decoders."""
    from fedlora_jax.data.builtin import minilm_path
    from fedlora_jax.models.hf import default_task

    path = _model_path(cfg)
    task = "classification" if path is None else default_task(path)
    return _tokenizer(str(path or minilm_path())), task


def _model(cfg: config_lib.RunConfig, task: str, num_labels: int, vocab_size: int):
    """Loads the checkpoint (a fresh head sized for the data's labels) or builds the tiny model."""
    from fedlora_jax.models.hf import load_pretrained
    from fedlora_jax.models.tiny import TinyConfig, TinyTransformer

    path = _model_path(cfg)
    if path is None:
        model = TinyTransformer(TinyConfig(vocab_size=vocab_size, max_len=cfg.data.max_length,
                                           num_labels=num_labels),
                                rngs=nnx.Rngs(cfg.federation.seed))
        return model, "tiny transformer (random init)"
    dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32
    model, _, info = load_pretrained(path, task=task, dtype=dtype, seed=cfg.federation.seed,
                                     num_labels=num_labels if task == "classification" else None)
    return model, f"{info.model_type} ({task}) from {path}"


def _load_data(cfg: config_lib.RunConfig, tokenizer, task: str):
    """-> (train examples, client index arrays, held-out examples, label names, held-out owners:
    the client per held-out example where the data says, else None).

    Causal LM reads instruction data (LLM-Adapters JSON); its Dirichlet split is over the gold
    answers (the task's "labels"), and the loss covers the response tokens only."""
    data, seed = cfg.data, cfg.federation.seed
    if task == "causal_lm":
        if data.source in ("builtin", "synthetic"):
            raise ValueError("A causal LM trains on instruction data: give --data FILE in the "
                             "LLM-Adapters JSON format (instruction, input, output, answer).")
        from fedlora_jax.data.loaders import load_instructions
        from fedlora_jax.data.tokenize import tokenize_instructions
        loaded = load_instructions(data.source)
        examples = tokenize_instructions(loaded, tokenizer, data.max_length)
        labels, codes = np.unique(np.asarray(loaded.answers, object).astype(str),
                                  return_inverse=True)
        return _hold_out(cfg, examples, codes.astype(np.int32), tuple(labels))
    if data.source == "builtin":
        from fedlora_jax.data.builtin import builtin_text_classification
        text = builtin_text_classification(
            tokenizer, num_clients=data.num_clients, max_length=data.max_length, seed=seed,
            heldout_fraction=data.heldout_fraction, passage_chars=data.passage_chars)
        clients, owners = text.client_indices, text.heldout_owners
        if data.partition != "natural":
            clients, owners = _split(cfg, text.train["labels"]), None
        return text.train, clients, text.heldout, tuple(text.label_names), owners
    if data.source == "synthetic":
        from fedlora_jax.data.synthetic import synthetic_classification
        examples = synthetic_classification(seed, data.synthetic_per_client * data.num_clients,
                                            data.max_length, tokenizer.vocab_size, 4)
        labels = tuple(f"class_{i}" for i in range(4))
    else:
        from fedlora_jax.data.loaders import load_classification
        from fedlora_jax.data.tokenize import tokenize_classification
        loaded = load_classification(data.source, text_columns=data.text_columns or None,
                                     label_column=data.label_column,
                                     label_names=data.label_names or None)
        examples = tokenize_classification(loaded, tokenizer, data.max_length)
        labels = tuple(loaded.label_names)
    return _hold_out(cfg, examples, examples["labels"], labels)


def _hold_out(cfg: config_lib.RunConfig, examples: dict, labels: np.ndarray, names: tuple):
    """A random held-out fraction, then the client split of the rest by ``labels``."""
    rng = np.random.default_rng(cfg.federation.seed)
    held = rng.random(labels.shape[0]) < cfg.data.heldout_fraction
    heldout = {k: v[held] for k, v in examples.items()}
    train = {k: v[~held] for k, v in examples.items()}
    return train, _split(cfg, labels[~held]), heldout, names, None


def evaluation_split(data: config_lib.DataConfig, seed: int, heldout: dict, owners):
    """The held-out examples (and owners) the run scores: a seeded ``data.validation_fraction``
    of them is the validation split (tuning only), the rest the test split, disjoint by
    construction; ``data.evaluate_on`` picks one."""
    if not data.validation_fraction:
        return heldout, owners
    size = len(next(iter(heldout.values())))
    validation = np.random.default_rng([seed, 1]).permutation(size) < round(
        data.validation_fraction * size)
    keep = validation if data.evaluate_on == "validation" else ~validation
    if not keep.any():
        raise ValueError(f"data.validation_fraction={data.validation_fraction} leaves the "
                         f"{data.evaluate_on} split of {size} held-out examples empty; move it "
                         "toward 0.5 or raise data.heldout_fraction.")
    return {k: v[keep] for k, v in heldout.items()}, None if owners is None else owners[keep]


def _split(cfg: config_lib.RunConfig, labels: np.ndarray) -> list[np.ndarray]:
    d = cfg.data
    if d.partition == "dirichlet":
        return partition_lib.dirichlet(labels, d.num_clients, d.alpha, seed=cfg.federation.seed)
    return partition_lib.iid(labels.shape[0], d.num_clients, seed=cfg.federation.seed)


def build(cfg: config_lib.RunConfig) -> Setup:
    """Loads (or creates) the model and the data, applies LoRA and builds the engine."""
    tokenizer, task = _tokenizer_and_task(cfg)
    train, clients, heldout, labels, owners = _load_data(cfg, tokenizer, task)
    heldout, owners = evaluation_split(cfg.data, cfg.federation.seed, heldout, owners)
    model, description = _model(cfg, task, len(labels), tokenizer.vocab_size)
    apply_lora(model, cfg.lora, rngs=nnx.Rngs(cfg.federation.seed + 1))
    if cfg.model.compute_dtype != "float32":
        set_compute_dtype(model, cfg.model.compute_dtype)
    strategy = strategies.strategy_of(cfg)
    strategy.adapt_model(model)
    pool = ClientPool.from_partition(train, clients)
    parts = split_model(model)
    sizes = adapter_sizes(parts.trainable)
    costs = strategy.costs(sizes, cfg.lora.rank)
    profile = make_profile(cfg, pool.num_clients)
    workload = make_workload(cfg, parts, costs, sizes)
    engine = FederatedEngine(parts, pool, get_loss(task),
                             client=cfg.client, client_optimizer=cfg.client_optimizer,
                             server_optimizer=cfg.server_optimizer, federation=cfg.federation,
                             clock=make_clock(cfg, profile, workload, costs),
                             rule=strategy.rule(cfg.lora, cfg.federation), costs=costs)
    return Setup(engine, heldout, labels, description, owners, profile, workload)


def make_profile(cfg: config_lib.RunConfig, num_clients: int) -> wireless.SystemProfile:
    """The clients' compute speeds, transmit powers and channel gains, drawn from the run's seed."""
    return wireless.generate_profile(jax.random.key(cfg.federation.seed + 2), num_clients,
                                     cfg.system)


def make_workload(cfg: config_lib.RunConfig, parts, costs: Costs, sizes: AdapterSizes
                  ) -> wireless.WorkloadModel:
    """Per-client work of a round for this model, shared by the clock and the strategies' solver.

    FLOPs count the base's non-embedding parameters (embedding lookups cost no matmul) and the
    trained LoRA factors; the payload is what the method's costs say a full-rank client uploads
    (FedSA-LoRA: ``A`` only), scaled by each client's ``k/r`` in the time model.
    """
    base_params = sum(v[...].size for path, v in nnx.to_flat_state(parts.base)
                      if not any("embed" in str(p) for p in path))
    workload = wireless.workload_from_counts(
        base_params, sizes.lora, cfg.client.batch_size * cfg.data.max_length,
        cfg.client.local_steps, bits=PARAM_BITS)
    return dataclasses.replace(
        workload, payload_bits_full_rank=PARAM_BITS * costs.upload_lora)


def make_clock(cfg: config_lib.RunConfig, profile: wireless.SystemProfile,
               workload: wireless.WorkloadModel, costs: Costs):
    """The simulated wall-clock of a round: ``(mask, k) -> times`` (seconds), :func:`round_clock`
    with this run's profile and settings."""
    return functools.partial(round_clock, profile, system=cfg.system, workload=workload,
                             costs=costs, rank=cfg.lora.rank,
                             adaptive=cfg.bandwidth_allocation == "adaptive")


@functools.partial(jax.jit, static_argnames=("system", "workload", "costs", "rank", "adaptive"))
def round_clock(profile: wireless.SystemProfile, mask, k, *, system: wireless.SystemConfig,
                workload: wireless.WorkloadModel, costs: Costs, rank: int, adaptive: bool):
    """``total`` = :func:`wireless.round_cost` of the clients' compute and upload
    (:func:`wireless.round_time`, bandwidth allocated adaptively or equally; 0 for an empty
    round) and the server's side: the broadcast (:meth:`Costs.download`) and the aggregation
    work (:attr:`Costs.server_flops`), charged to empty rounds too, as the solver charges them.
    The profile is an argument, so runs of the same settings (a seed sweep) share one program."""
    times = wireless.round_time(profile, system, workload, mask, k / rank, adaptive=adaptive)
    download_bits = PARAM_BITS * costs.download(mask, k)
    phases = wireless.server_phases(system, download_bits, costs.server_flops)
    total = wireless.round_cost(times["total"], phases["download"] + phases["server"])
    return {**times, **phases, "total": total}


def allocation_record(setup: Setup, plan: strategies.Plan, system: wireless.SystemConfig
                      ) -> dict[str, list[float]]:
    """Per-client ``q``, ``rho = k/r`` of ``plan`` and the clients' resources (compute speed,
    ``p h / N0``), for :func:`metrics.plot_allocation`."""
    profile = setup.profile
    snr = profile.power_w * profile.gain / system.noise_w_per_hz
    return {"q": np.asarray(plan.q).tolist(), "rho": (plan.k / setup.engine.rank).tolist(),
            "flops_per_s": np.asarray(profile.flops_per_s).tolist(),
            "snr_hz": np.asarray(snr).tolist()}


def strategy_context(cfg: config_lib.RunConfig, setup: Setup) -> strategies.Context:
    """What the run's strategy may know: sizes, data weights, network, workload and the per-round
    server-side time (broadcast of the full-rank adapter and aggregation work)."""
    engine = setup.engine
    n, costs = engine.num_clients, engine.costs
    download = costs.download(np.ones(n, bool), np.full(n, engine.rank))
    overhead = wireless.server_phases(cfg.system, PARAM_BITS * float(download), costs.server_flops)
    return strategies.Context(
        rank=engine.rank, q_default=min(1.0, cfg.federation.participants / n),
        sketch_ratio=cfg.federation.sketch_ratio, weights=np.asarray(engine.pool.weights),
        profile=setup.profile, system=cfg.system, workload=setup.workload,
        round_overhead_s=float(sum(overhead.values())),
        client_optimizer=cfg.client_optimizer.name)


def evaluate(setup: Setup, state) -> dict[str, float]:
    """``eval_loss``/``eval_accuracy`` of the global model on the held-out data and, for a
    personalized rule where the data names owners, ``eval_personal_*``: each held-out example
    scored by its owner's model."""
    row = prefixed(setup.engine.evaluate(state, setup.heldout), "eval_")
    engine = setup.engine
    if engine.personalized and setup.heldout_owners is not None:
        personal = engine.evaluate_personal(state, setup.heldout, setup.heldout_owners)
        row.update(prefixed(personal, "eval_personal_"))
    return row


def prefixed(metrics: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in metrics.items()}
