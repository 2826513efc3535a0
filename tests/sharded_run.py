"""Runs the same federation on 1 and on N host-platform devices; writes the results to a file.

``XLA_FLAGS`` must be set before jax is imported, so :mod:`tests.test_sharding` runs this module
in a subprocess: ``python -m tests.sharded_run OUT.npz --devices 8``.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    import jax
    import numpy as np

    from fedlora_jax.client import ClientConfig
    from fedlora_jax.engine import FederatedEngine, FederationConfig
    from fedlora_jax.optim import OptimizerConfig
    from tests.conftest import random_pool
    from tests.test_engine import _counting_loss, _perturbed_parts

    assert jax.device_count() == args.devices, jax.devices()
    pool, parts = random_pool(num_clients=20, seed=4), _perturbed_parts(seed=2)
    results, errors = {}, {}
    for chunk in (8, 12):  # one divides the device count, one is padded to 16
        for devices in (1, args.devices):
            loss, traces = _counting_loss()
            eng = FederatedEngine(parts, pool, loss, client=ClientConfig(2, 4),
                                  client_optimizer=OptimizerConfig("adamw", 1e-2),
                                  server_optimizer=OptimizerConfig("adam", 1e-2),
                                  federation=FederationConfig(participants=9.0, chunk_size=chunk,
                                                              sketch_ratio=0.5, devices=devices))
            state = eng.init(seed=5)
            tag = f"chunk{chunk}_dev{devices}"
            for r in range(args.rounds):
                state, result = eng.run_round(state)
                results[f"{tag}_round{r}_participants"] = result.participants
                results[f"{tag}_round{r}_sq_norms"] = result.clients.update_sq_norm
                results[f"{tag}_round{r}_loss"] = np.float64(result.train_loss)
            for i, leaf in enumerate(jax.tree.leaves(state.trainable)):
                results[f"{tag}_param{i}"] = np.asarray(leaf)
            results[f"{tag}_traces"] = np.int64(len(traces))
            results[f"{tag}_chunk_size"] = np.int64(eng.chunk_size)
    # the aggregation rules with client state (FedSA), stacking into the base (FLoRA) and a
    # normalized, norm-weighted average (HetLoRA): chunk 12, padded to 16 on 8 devices
    from fedlora_jax.strategies import fedsa, flora, hetlora
    rules = {"fedsa": fedsa.rule(), "flora": flora.rule(scaling=2.0), "hetlora": hetlora.rule()}
    k = np.arange(pool.num_clients) % 4 + 1
    for name, rule in rules.items():
        for devices in (1, args.devices):
            eng = FederatedEngine(parts, pool, _counting_loss()[0], client=ClientConfig(2, 4),
                                  client_optimizer=OptimizerConfig("adamw", 1e-2),
                                  federation=FederationConfig(participants=9.0, chunk_size=12,
                                                              devices=devices),
                                  rule=rule)
            state = eng.init(seed=5)
            for _ in range(args.rounds):
                state, _ = eng.run_round(state, k=k)
            for i, leaf in enumerate(jax.tree.leaves((state.trainable, state.agg))):
                results[f"{name}_dev{devices}_state{i}"] = np.asarray(leaf)
    bad = {"small_chunk": dict(federation=FederationConfig(chunk_size=3, devices=args.devices)),
           "mesh_mismatch": dict(federation=FederationConfig(devices=4),
                                 mesh=jax.make_mesh((2,), ("clients",), devices=jax.devices()[:2]))}
    for name, kwargs in bad.items():
        try:
            FederatedEngine(parts, pool, _counting_loss()[0], **kwargs)
            errors[name] = ""
        except ValueError as e:
            errors[name] = str(e)
    np.savez(args.out, **results, **{f"error_{k}": np.array(v) for k, v in errors.items()})


if __name__ == "__main__":
    main(sys.argv[1:])
