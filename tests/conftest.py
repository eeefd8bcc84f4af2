"""Test-wide settings.

- XLA compiles with most optimizations off: compile time dominates these tiny-shape tests on CPU,
  and every comparison has a tolerance. (Benchmarks run outside pytest, fully optimized.)
- Hypothesis: deterministic runs without per-example deadlines (the first example of a test
  includes JIT compilation).
"""

import jax
from hypothesis import HealthCheck, settings

jax.config.update("jax_disable_most_optimizations", True)

settings.register_profile(
    "jaxdpo",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("jaxdpo")
