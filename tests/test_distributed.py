"""Two processes joined by ``jax.distributed`` (a local coordinator, gloo CPU collectives, 2 host
devices each) run one federation over their 4-device mesh: the same result as one process on one
device. The processes are ``tests/distributed_run.py``; a hang fails at the timeout."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.distributed_run import federate

ROOT = Path(__file__).resolve().parents[1]
PROCESSES, LOCAL_DEVICES, TIMEOUT_S = 2, 2, 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    """Every process's results, by process id."""
    out = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    coordinator = f"localhost:{_free_port()}"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "tests.distributed_run", str(out / f"{i}.npz"), "--coordinator",
         coordinator, "--processes", str(PROCESSES), "--process-id", str(i), "--local-devices",
         str(LOCAL_DEVICES)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for i in range(PROCESSES)]
    try:
        logs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:  # one that failed leaves the other waiting in a collective
            p.kill()
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i} failed:\n{log[-4000:]}"
    return [dict(np.load(out / f"{i}.npz")) for i in range(PROCESSES)]


def test_two_processes_equal_one(distributed):
    """Same participants, norms, losses and parameters as one device, to float32 round-off (the
    psum adds the 4 devices' partial sums in another order); the processes agree exactly."""
    reference = federate(devices=1)
    for result in distributed:
        assert int(result["mesh_devices"]) == PROCESSES * LOCAL_DEVICES
        assert int(result["mesh_processes"]) == PROCESSES
        assert set(result) == set(reference) and int(reference["mesh_devices"]) == 1
        for name in sorted(reference):
            if name.endswith("participants"):
                np.testing.assert_array_equal(result[name], reference[name])
                assert reference[name].size > 8  # two chunks of 8 clients, the second padded
            elif not name.startswith("mesh"):
                np.testing.assert_allclose(result[name], reference[name], atol=1e-6, rtol=1e-5,
                                           err_msg=name)
    first, *others = distributed
    for other in others:
        for name in first:
            np.testing.assert_array_equal(other[name], first[name], err_msg=name)
