"""The devices a command runs on: accelerators when jax has them, else host CPU devices.

XLA must hear how many host CPU devices to create before jax initialises its backends, so commands call
:func:`local_devices` before anything else touches jax.
"""

from __future__ import annotations

import os

_FLAG = "xla_force_host_platform_device_count"


def local_devices(count: int):
    """The first ``count`` devices of jax's default backend (on a CPU machine: ``count`` host devices)."""
    if count < 1:
        raise ValueError(f"the device count must be positive, got {count}")
    if _FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{_FLAG}={count}".strip()
    import jax

    devices = jax.devices()
    if len(devices) < count:
        raise ValueError(
            f"{count} devices were asked for but jax has {len(devices)} {devices[0].platform} devices "
            f"(on CPU, jax started before XLA_FLAGS was set); run in a fresh process or set "
            f"XLA_FLAGS=--{_FLAG}={count}"
        )
    return devices[:count]
