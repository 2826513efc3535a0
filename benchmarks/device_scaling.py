"""Throughput of one round on 1, 2, 4 and 8 devices, and the parallel efficiency.

The same round (a fixed chunk of clients, full participation) runs with the client axis sharded
over 1, 2, 4, 8 devices (``FederationConfig.devices``). Without accelerators, JAX's CPU backend
is split into 8 host-platform devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``,
set here before jax is imported); they share the machine's cores, so on a 2-core CPU the
efficiency ``speedup / devices`` is bounded by ``cores / devices``. Real devices are used where
present (``--no-host-devices``).

    python benchmarks/device_scaling.py --quick --json device_scaling.json
"""

from __future__ import annotations

import os
import sys
import time
from common import parser as benchmark_parser, write_rows  # benchmarks/common.py

HOST_DEVICES = 8


def main(argv=None) -> list[dict]:
    parser = benchmark_parser(__doc__, "tiny model, about a minute")
    parser.add_argument("--no-host-devices", action="store_true",
                        help="use the real devices only (do not split the CPU)")
    args = parser.parse_args(argv)
    if not args.no_host_devices:
        if "jax" in sys.modules:
            raise RuntimeError("device_scaling must set XLA_FLAGS before jax is imported.")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={HOST_DEVICES}")
    import jax
    import numpy as np
    from flax import nnx

    from fedlora_jax.client import ClientConfig, split_model
    from fedlora_jax.data.pool import ClientPool
    from fedlora_jax.engine import FederatedEngine, FederationConfig
    from fedlora_jax.lora import LoRAConfig, apply_lora
    from fedlora_jax.models.tiny import TinyConfig, TinyTransformer
    from fedlora_jax.tasks import classification_loss

    chunk, steps, batch, seq, repeats = (32, 2, 8, 32, 2) if args.quick else (64, 4, 8, 64, 3)
    cfg = TinyConfig(vocab_size=1000, d_model=128, num_layers=2, num_heads=4, d_ff=512, max_len=seq)
    model = TinyTransformer(cfg, rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=16, alpha=32.0), rngs=nnx.Rngs(1))
    parts = split_model(model)
    rng = np.random.default_rng(0)
    m = chunk * 4
    pool = ClientPool.from_partition(
        {"input_ids": rng.integers(1, 1000, (m, seq)).astype(np.int32),
         "attention_mask": np.ones((m, seq), np.int32),
         "labels": rng.integers(0, 4, m).astype(np.int32)}, np.split(np.arange(m), chunk))
    counts = [d for d in (1, 2, 4, 8) if d <= jax.device_count()]
    print(f"{jax.device_count()} {jax.default_backend()} devices; chunk of {chunk} clients, "
          f"{steps} local steps of {batch} x {seq} tokens")
    print(f"{'devices':>7} {'client steps/s':>15} {'speedup':>8} {'efficiency':>10}")
    rows, base = [], None
    for d in counts:
        eng = FederatedEngine(parts, pool, classification_loss, client=ClientConfig(steps, batch),
                              federation=FederationConfig(sampling="full", chunk_size=chunk,
                                                          devices=d))
        state = eng.init()
        state, _ = eng.run_round(state)  # compile
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            state, _ = eng.run_round(state)
            jax.block_until_ready(state.trainable)
            best = min(best, time.perf_counter() - start)
        rate = chunk * steps / best
        base = base or rate
        row = {"devices": d, "backend": jax.default_backend(), "chunk": chunk,
               "client_steps_per_s": rate, "speedup": rate / base,
               "parallel_efficiency": rate / base / d}
        rows.append(row)
        print(f"{d:>7} {rate:>15.2f} {row['speedup']:>7.2f}x {row['parallel_efficiency']:>10.0%}",
              flush=True)
    return write_rows(rows, args.json, host_platform_devices=not args.no_host_devices)


if __name__ == "__main__":
    main()
