"""The client axis sharded over devices with ``jax.shard_map``: same result as one device.

The multi-device part runs in a subprocess (``tests/sharded_run.py``) because host-platform devices
must be requested with ``XLA_FLAGS`` before jax is imported.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from fedlora_jax.engine import FederatedEngine, FederationConfig, check_mesh, client_mesh
from fedlora_jax.tasks import classification_loss
from tests.test_engine import _perturbed_parts

DEVICES = 8
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "result.npz"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "tests.sharded_run", str(out),
                           "--devices", str(DEVICES)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(out))


@pytest.mark.parametrize("chunk", [8, 12])
def test_sharded_equals_unsharded(sharded, chunk):
    """Chunk 8 divides the 8 devices; chunk 12 is padded to 16 (2 clients per device)."""
    one, many = f"chunk{chunk}_dev1", f"chunk{chunk}_dev{DEVICES}"
    assert int(sharded[f"{many}_chunk_size"]) == -(-chunk // DEVICES) * DEVICES
    params = sorted(k[len(one) + 1:] for k in sharded if k.startswith(one + "_param"))
    assert params
    for name in params:
        np.testing.assert_allclose(sharded[f"{many}_{name}"], sharded[f"{one}_{name}"],
                                   atol=1e-6, rtol=1e-5)
    for r in range(2):
        np.testing.assert_array_equal(sharded[f"{many}_round{r}_participants"],
                                      sharded[f"{one}_round{r}_participants"])
        assert sharded[f"{one}_round{r}_participants"].size > 8  # chunk 8: two, one padded
        np.testing.assert_allclose(sharded[f"{many}_round{r}_sq_norms"],
                                   sharded[f"{one}_round{r}_sq_norms"], rtol=1e-5)
        np.testing.assert_allclose(sharded[f"{many}_round{r}_loss"],
                                   sharded[f"{one}_round{r}_loss"], rtol=1e-5)
    # ... and the chunk sizes agree with each other: packing does not change the result
    for name in params:
        np.testing.assert_allclose(sharded[f"{many}_{name}"], sharded[f"chunk8_dev1_{name}"],
                                   atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rule", ["fedsa", "flora", "hetlora"])
def test_sharded_aggregation_rules_equal_unsharded(sharded, rule):
    """Per-client rows scattered from every device, stacked products and weight sums psum-ed."""
    one, many = f"{rule}_dev1_state", f"{rule}_dev{DEVICES}_state"
    leaves = sorted(k[len(one):] for k in sharded if k.startswith(one))
    assert len(leaves) > 4
    for i in leaves:
        np.testing.assert_allclose(sharded[many + i], sharded[one + i], atol=1e-6, rtol=1e-5)


def test_sharded_run_compiles_once(sharded):
    for chunk in (8, 12):
        assert int(sharded[f"chunk{chunk}_dev{DEVICES}_traces"]) == 1


def test_bad_meshes_raise_clear_errors(sharded, pool):
    assert "chunk_size=3 is below the 8 devices" in str(sharded["error_small_chunk"])
    assert "mesh has 2 device(s) but federation.devices=4" in str(sharded["error_mesh_mismatch"])
    parts, visible = _perturbed_parts(), jax.device_count()  # whatever XLA_FLAGS asked for
    with pytest.raises(ValueError, match=f"only {visible} .* device"):
        FederatedEngine(parts, pool, classification_loss,
                        federation=FederationConfig(devices=visible + 1))
    with pytest.raises(ValueError, match="named 'clients'"):
        FederatedEngine(parts, pool, classification_loss,
                        mesh=jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]))
    with pytest.raises(ValueError, match="devices must be a positive integer"):
        FederationConfig(devices=0)


def test_chunk_is_padded_to_a_multiple_of_the_devices():
    mesh = client_mesh()
    assert mesh.axis_names == ("clients",) and mesh.devices.size == jax.device_count()
    n = mesh.devices.size
    assert check_mesh(client_mesh(1), 1, 5) == 5  # one device: any chunk size
    assert check_mesh(mesh, None, 2 * n + 1) == 3 * n
    assert check_mesh(mesh, None, 1) == n  # devices unset: a small chunk is padded, not refused
