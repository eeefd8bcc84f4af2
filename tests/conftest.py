"""Test-wide settings: deterministic hypothesis runs without per-example deadlines (JIT
compilation makes the first example of a test slow)."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "jaxdpo",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("jaxdpo")
