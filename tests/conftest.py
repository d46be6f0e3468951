"""Test set-up: 8 host CPU devices and a persistent compilation cache, fixed before jax is imported."""

import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "jax"
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

settings.register_profile(
    "ci", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile("ci")

NUM_DEVICES = 8


def pytest_configure(config):
    got = jax.device_count()
    if got != NUM_DEVICES:
        raise pytest.UsageError(
            f"tests need {NUM_DEVICES} host devices, jax sees {got}: is XLA_FLAGS overridden?"
        )


@pytest.fixture(scope="session")
def devices():
    assert jax.device_count() == NUM_DEVICES
    return jax.devices()
