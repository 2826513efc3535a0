"""One simulated federated fine-tuning run: build model, data and engine from a RunConfig, then
loop over rounds with a progress bar, periodic evaluation and per-round JSONL metrics."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from fedlora_jax import config as config_lib
from fedlora_jax import wireless
from fedlora_jax.client import split_model
from fedlora_jax.data import partition as partition_lib
from fedlora_jax.data.pool import ClientPool
from fedlora_jax.engine import FederatedEngine
from fedlora_jax.lora import apply_lora
from fedlora_jax.tasks import get_loss


@dataclasses.dataclass
class Setup:
    engine: FederatedEngine
    heldout: dict[str, np.ndarray]
    label_names: tuple[str, ...]
    description: str


def _tokenizer_and_model(cfg: config_lib.RunConfig, num_labels: int | None):
    """Returns (tokenizer, model or None, description); the model is None when it needs the data
    (the tiny model sizes its vocabulary and head from the data)."""
    from fedlora_jax.data.builtin import minilm_path
    from fedlora_jax.models.hf import load_pretrained

    dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32
    source = cfg.model.source
    if source == "tiny":
        import transformers
        tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
        return tokenizer, None, "tiny transformer (random init)"
    path = minilm_path() if source == "minilm" else source
    model, tokenizer, info = load_pretrained(path, task="classification", num_labels=num_labels,
                                             dtype=dtype, seed=cfg.federation.seed)
    return tokenizer, model, f"{info.model_type} from {path}"


def _load_data(cfg: config_lib.RunConfig, tokenizer):
    """-> (train examples, client index arrays, held-out examples, label names)."""
    data, seed = cfg.data, cfg.federation.seed
    if data.source == "builtin":
        from fedlora_jax.data.builtin import builtin_text_classification
        train, clients, heldout, labels = builtin_text_classification(
            tokenizer, num_clients=data.num_clients, max_length=data.max_length, seed=seed,
            heldout_fraction=data.heldout_fraction)
        if data.partition != "natural":
            clients = _split(cfg, train["labels"])
        return train, clients, heldout, tuple(labels)
    if data.source == "synthetic":
        from fedlora_jax.data.synthetic import synthetic_classification
        vocab = 512 if tokenizer is None else tokenizer.vocab_size
        examples = synthetic_classification(seed, 50 * data.num_clients, data.max_length, vocab, 4)
        labels = tuple(f"class_{i}" for i in range(4))
    else:
        from fedlora_jax.data.loaders import load_classification
        from fedlora_jax.data.tokenize import tokenize_classification
        loaded = load_classification(data.source, text_columns=data.text_columns or None,
                                     label_column=data.label_column)
        examples = tokenize_classification(loaded, tokenizer, data.max_length)
        labels = tuple(loaded.label_names)
    rng = np.random.default_rng(seed)
    held = rng.random(examples["labels"].shape[0]) < data.heldout_fraction
    heldout = {k: v[held] for k, v in examples.items()}
    train = {k: v[~held] for k, v in examples.items()}
    return train, _split(cfg, train["labels"]), heldout, labels


def _split(cfg: config_lib.RunConfig, labels: np.ndarray) -> list[np.ndarray]:
    d = cfg.data
    if d.partition == "dirichlet":
        return partition_lib.dirichlet(labels, d.num_clients, d.alpha, seed=cfg.federation.seed)
    return partition_lib.iid(labels.shape[0], d.num_clients, seed=cfg.federation.seed)


def build(cfg: config_lib.RunConfig) -> Setup:
    """Loads (or creates) the model and the data, applies LoRA and builds the engine."""
    from fedlora_jax.models.tiny import TinyConfig, TinyTransformer

    num_labels = 7 if cfg.data.source == "builtin" else None
    tokenizer, model, description = _tokenizer_and_model(cfg, num_labels)
    train, clients, heldout, labels = _load_data(cfg, tokenizer)
    if model is None:
        model = TinyTransformer(TinyConfig(vocab_size=tokenizer.vocab_size, max_len=cfg.data.max_length,
                                           num_labels=len(labels)),
                                rngs=nnx.Rngs(cfg.federation.seed))
    apply_lora(model, cfg.lora, rngs=nnx.Rngs(cfg.federation.seed + 1))
    pool = ClientPool.from_partition(train, clients)
    parts = split_model(model)
    engine = FederatedEngine(parts, pool, get_loss("classification"),
                             client=cfg.client, client_optimizer=cfg.client_optimizer,
                             server_optimizer=cfg.server_optimizer, federation=cfg.federation,
                             clock=make_clock(cfg, parts, pool.num_clients))
    return Setup(engine, heldout, labels, description)


def make_clock(cfg: config_lib.RunConfig, parts, num_clients: int):
    """The simulated wall-clock of a round (:func:`wireless.round_time`) for this model and work.

    FLOPs count the base's non-embedding parameters (embedding lookups cost no matmul); the
    payload is the LoRA factors, scaled by each client's ``k/r``.
    """
    base_params = sum(v[...].size for path, v in nnx.to_flat_state(parts.base)
                      if not any("embed" in str(p) for p in path))
    lora_params = sum(v[...].size for path, v in nnx.to_flat_state(parts.trainable)
                      if path[-1] in ("lora_a", "lora_b"))
    workload = wireless.workload_from_counts(
        base_params, lora_params, cfg.client.batch_size * cfg.data.max_length, cfg.client.local_steps)
    profile = wireless.generate_profile(jax.random.key(cfg.federation.seed + 2), num_clients,
                                        cfg.system)
    rank = cfg.lora.rank
    adaptive = cfg.bandwidth_allocation == "adaptive"
    return jax.jit(lambda mask, k: wireless.round_time(profile, cfg.system, workload, mask, k / rank,
                                                       adaptive=adaptive))


def train(cfg: config_lib.RunConfig, *, progress: bool = True, log=print) -> list[dict]:
    """Runs ``cfg`` and writes ``config.json`` and ``metrics.jsonl`` to ``cfg.output_dir``."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_lib.to_dict(cfg), indent=2))
    setup = build(cfg)
    engine = setup.engine
    log(f"model: {setup.description}; clients: {engine.num_clients}; "
        f"held-out examples: {len(setup.heldout['labels'])}; classes: {len(setup.label_names)}")
    state = engine.init()
    history = [{"round": 0, **_prefixed(engine.evaluate(state, setup.heldout), "eval_")}]
    start = time.perf_counter()
    with open(out / "metrics.jsonl", "w") as f, tqdm(total=cfg.federation.rounds, disable=not progress,
                                                     unit="round", desc="federated") as bar:
        f.write(json.dumps(history[0]) + "\n")
        for r in range(1, cfg.federation.rounds + 1):
            state, result = engine.run_round(state)
            row = {"round": r, "participants": int(result.participants.size),
                   "train_loss": result.train_loss, "train_accuracy": result.train_accuracy,
                   "uplink_params": result.uplink_params, "sim_clock_s": float(state.clock),
                   **{f"round_{name}_s": t for name, t in result.times.items()},
                   "elapsed_s": time.perf_counter() - start}
            if r % cfg.eval_every == 0 or r == cfg.federation.rounds:
                row.update(_prefixed(engine.evaluate(state, setup.heldout), "eval_"))
            history.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
            bar.set_postfix({k: f"{row[k]:.3f}" for k in ("train_loss", "eval_accuracy") if k in row
                             and np.isfinite(row[k])} | {"P": row["participants"]})
            bar.update()
    log(summary(history))
    return history


def _prefixed(metrics: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in metrics.items()}


def summary(history: list[dict]) -> str:
    first, last = history[0], history[-1]
    rounds = [h for h in history if "participants" in h]
    participants = np.array([h["participants"] for h in rounds]) if rounds else np.zeros(1)
    uplink = sum(h["uplink_params"] for h in rounds)
    return "\n".join([
        "summary",
        f"  rounds                 {len(rounds)}",
        f"  held-out loss          {first['eval_loss']:.4f} -> {last['eval_loss']:.4f}",
        f"  held-out accuracy      {first['eval_accuracy']:.4f} -> {last['eval_accuracy']:.4f}",
        f"  participants / round   mean {participants.mean():.1f}, min {participants.min()}, "
        f"max {participants.max()}",
        f"  uplink volume          {uplink / 1e6:.2f} M parameters ({uplink * 4 / 2**20:.1f} MiB fp32)",
        f"  simulated wall-clock   {last.get('sim_clock_s', 0.0):.1f} s (compute + upload, "
        "adaptive bandwidth)" if rounds else "",
        f"  wall time              {last.get('elapsed_s', 0.0):.1f} s"])
