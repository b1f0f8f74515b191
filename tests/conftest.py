"""Test setup: 8 virtual CPU devices, set before any test imports a JAX backend."""

import os

# Must happen before the backend starts: tests never change the device count mid-run.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
