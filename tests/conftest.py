"""Test-wide settings.

- Float32 matmuls run at full precision: on GPUs JAX would use TF32 by default, and the parity
  tests compare float32 numbers to a few dozen roundings of their scale (`tests/tolerance.py`).
- XLA compiles with most optimizations off: compile time dominates these tiny-shape tests on CPU,
  and every comparison has a tolerance. (Benchmarks run outside pytest, fully optimized.)
- Compiled programs go to a persistent cache shared by the test processes and the subprocesses
  they start (the settings travel as environment variables), so a kill-and-resume subprocess or
  the other xdist worker does not compile again what one process already compiled.
- Hypothesis: deterministic runs without per-example deadlines (the first example of a test
  includes JIT compilation).
"""

import os
import tempfile
from pathlib import Path

import jax
import jaxtyping
import pytest
from hypothesis import HealthCheck, settings

jaxtyping.install_import_hook("jaxdpo", "beartype.beartype")

SHARED_JAX_SETTINGS = {
    "jax_default_matmul_precision": "highest",  # float32 comparisons: no TF32 on GPUs (a no-op on CPUs)
    "jax_disable_most_optimizations": True,
    "jax_compilation_cache_dir": str(Path(tempfile.gettempdir()) / "jaxdpo-tests-xla-cache"),
    "jax_persistent_cache_min_compile_time_secs": 0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
}
for name, value in SHARED_JAX_SETTINGS.items():
    jax.config.update(name, value)
    os.environ[name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)

settings.register_profile(
    "jaxdpo",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("jaxdpo")


@pytest.fixture
def unchecked_shapes():
    """For tests of jaxdpo's own input errors: the shape checker would otherwise answer first."""
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", False)
