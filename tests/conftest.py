"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def _mesh(shape: dict[str, int]):
  from k15 import sharding

  return sharding.make_mesh(shape)


@pytest.fixture
def mesh_dp_fsdp_tp():
  return _mesh(dict(data=2, fsdp=2, tensor=2, context=1))


@pytest.fixture
def mesh_dp_cp():
  return _mesh(dict(data=2, fsdp=1, tensor=1, context=4))


@pytest.fixture
def rng():
  return np.random.default_rng(0)
