"""Rounds per second and peak memory from 10^2 to 10^6 registered clients at fixed participants.

Each registered-client count runs in a fresh process (so its peak resident memory is its own):
a tiny transformer, 2 short examples per client, ``--participants`` expected participants per
round (independent sampling), timed over ``--rounds`` rounds after a compiling warm-up round.
Besides the process peak it reports the compiled chunk's temporary memory (XLA's
``memory_analysis``), which must not change with the number of clients, and the bytes of the
client pool (data index + examples), which grows linearly.

    python benchmarks/client_sweep.py --quick --json client_sweep.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from common import parser as benchmark_parser, write_rows  # benchmarks/common.py

SEQ, PER_CLIENT = 16, 2


def one(num_clients: int, participants: float, rounds: int) -> dict:
    """Measures one registered-client count in this process."""
    import jax
    import numpy as np
    from flax import nnx

    from fedlora_jax.client import ClientConfig, split_model
    from fedlora_jax.data.pool import ClientPool
    from fedlora_jax.engine import FederatedEngine, FederationConfig
    from fedlora_jax.lora import LoRAConfig, apply_lora
    from fedlora_jax.models.tiny import TinyConfig, TinyTransformer
    from fedlora_jax.tasks import classification_loss

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    m = num_clients * PER_CLIENT
    examples = {"input_ids": rng.integers(1, 1000, (m, SEQ)).astype(np.int32),
                "attention_mask": np.ones((m, SEQ), np.int32),
                "labels": rng.integers(0, 4, m).astype(np.int32)}
    pool = ClientPool.from_partition(examples, np.split(np.arange(m), num_clients))
    model = TinyTransformer(TinyConfig(vocab_size=1000, max_len=SEQ), rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=16, alpha=32.0), rngs=nnx.Rngs(1))
    eng = FederatedEngine(split_model(model), pool, classification_loss,
                          client=ClientConfig(4, 8),
                          federation=FederationConfig(participants=participants, chunk_size=16))
    setup_s = time.perf_counter() - start
    state = eng.init()
    temp = eng.compiled_chunk(state).memory_analysis().temp_size_in_bytes
    state, _ = eng.run_round(state)  # compile
    jax.block_until_ready(state.trainable)
    seen = 0
    start = time.perf_counter()
    for _ in range(rounds):
        state, result = eng.run_round(state)
        seen += result.participants.size
    jax.block_until_ready(state.trainable)
    elapsed = time.perf_counter() - start
    return {"clients": num_clients, "participants": participants, "rounds": rounds,
            "mean_participants": seen / rounds, "rounds_per_s": rounds / elapsed,
            "client_steps_per_s": seen * 4 / elapsed, "setup_s": setup_s,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "chunk_temp_mib": temp / 2**20,
            "pool_mib": sum(x.nbytes for x in jax.tree.leaves(eng.pool)) / 2**20}


def main(argv=None) -> list[dict]:
    parser = benchmark_parser(__doc__, "10^2, 10^4, 10^6; about a minute")
    parser.add_argument("--participants", type=float, default=16.0)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: one count
    parser.add_argument("--rounds", type=int, help="timed rounds per count (default 5, quick 3)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)
    if args.one:
        print(json.dumps(one(args.one, args.participants, rounds)))
        return []
    counts = [10**2, 10**4, 10**6] if args.quick else [10**k for k in range(2, 7)]
    print(f"{'clients':>9} {'rounds/s':>9} {'steps/s':>8} {'peak RSS MiB':>13} "
          f"{'chunk temp MiB':>15} {'pool MiB':>9} {'setup s':>8}")
    rows = []
    for n in counts:
        proc = subprocess.run([sys.executable, __file__, "--one", str(n), "--rounds", str(rounds),
                               "--participants", str(args.participants)],
                              capture_output=True, text=True, check=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{n:>9} {row['rounds_per_s']:>9.2f} {row['client_steps_per_s']:>8.1f} "
              f"{row['peak_rss_mib']:>13.0f} {row['chunk_temp_mib']:>15.2f} "
              f"{row['pool_mib']:>9.1f} {row['setup_s']:>8.1f}", flush=True)
    return write_rows(rows, args.json)


if __name__ == "__main__":
    main()
