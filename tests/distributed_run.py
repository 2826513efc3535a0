"""One process of a multi-process federation on this machine; writes its results to a file.

:mod:`tests.test_distributed` starts several of these, each with its own host-platform CPU devices,
joined by ``jax.distributed.initialize`` (a local coordinator, gloo CPU collectives): the client
mesh spans every process's devices, as on a multi-host cluster.
``python -m tests.distributed_run OUT.npz --coordinator localhost:PORT --processes 2 --process-id 0
--local-devices 2``. :func:`federate` is also the single-process reference.
"""

from __future__ import annotations

import argparse
import os
import sys

ROUNDS = 2


def federate(devices: int | None) -> dict:
    """A short tiny federation (adaptive sketches, AdamW clients, Adam server) over ``devices``
    devices (``None``: every process's); returns its parameters and per-round records."""
    import jax
    import numpy as np

    from fedlora_jax.client import ClientConfig
    from fedlora_jax.engine import FederatedEngine, FederationConfig
    from fedlora_jax.optim import OptimizerConfig
    from fedlora_jax.tasks import classification_loss
    from tests.conftest import random_pool
    from tests.test_engine import _perturbed_parts

    eng = FederatedEngine(_perturbed_parts(seed=2), random_pool(num_clients=20, seed=4),
                          classification_loss, client=ClientConfig(2, 4),
                          client_optimizer=OptimizerConfig("adamw", 1e-2),
                          server_optimizer=OptimizerConfig("adam", 1e-2),
                          federation=FederationConfig(participants=9.0, chunk_size=8,
                                                      sketch_ratio=0.5, devices=devices))
    state, out = eng.init(seed=5), {}
    k = np.arange(eng.num_clients) % eng.rank + 1  # mixed sketch sizes
    for r in range(ROUNDS):
        state, result = eng.run_round(state, k=k)
        out[f"round{r}_participants"] = result.participants
        out[f"round{r}_sq_norms"] = result.clients.update_sq_norm
        out[f"round{r}_loss"] = np.float64(result.train_loss)
    for i, leaf in enumerate(jax.tree.leaves(state.trainable)):
        out[f"param{i}"] = np.asarray(leaf)  # replicated: every process holds all of it
    out["mesh_devices"] = np.int64(eng.mesh.devices.size)
    out["mesh_processes"] = np.int64(len({d.process_index for d in eng.mesh.devices.flat}))
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--coordinator", required=True, help="host:port of process 0")
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--local-devices", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.local_devices}")
    import jax
    import numpy as np

    jax.distributed.initialize(args.coordinator, num_processes=args.processes,
                               process_id=args.process_id, initialization_timeout=60)
    assert jax.process_count() == args.processes, jax.process_count()
    assert jax.local_device_count() == args.local_devices, jax.local_devices()
    np.savez(args.out, **federate(devices=None))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
