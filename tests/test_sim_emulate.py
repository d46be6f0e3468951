"""Per-device emulation: the right work is timed per device, and the layer time is the straggler's compute
plus the modelled all-to-alls (on CPU here; the measurement itself runs on a GPU)."""

import numpy as np
import pytest

from moeless_jax.sim.emulate import DeviceEmulator, ExpertShape, emulate_layer

SHAPE = ExpertShape(d_model=32, d_ff=64, dtype="float32")


def test_emulated_layer_is_straggler_compute_plus_two_all_to_alls():
    emulator = DeviceEmulator(SHAPE, slots_per_device=2, rows_buffer=256, repeats=1)
    slot_tokens = np.array([10, 20, 100, 0, 5, 5])  # 3 devices x 2 slots
    bytes_seen = []

    def a2a(nbytes):
        bytes_seen.append(nbytes)
        return 0.5

    layer = emulate_layer(emulator, slot_tokens, kernel="capacity", all_to_all_ms=a2a, ladder=[64, 128, 256])
    assert layer.capacity == 128  # the first rung that holds the fullest slot (100 rows)
    np.testing.assert_array_equal(layer.capacities, [64, 128, 64])  # each device picks its own
    assert layer.compute_ms.shape == (3,) and (layer.compute_ms > 0).all()
    assert bytes_seen == [100 * SHAPE.bytes_per_row]  # the fullest device's rows
    assert layer.layer_ms == pytest.approx(layer.compute_ms.max() + 1.0)
    ragged = emulate_layer(emulator, slot_tokens, kernel="ragged", all_to_all_ms=a2a)
    assert ragged.capacity is None and ragged.compute_ms.shape == (3,)


def test_bad_device_work_is_refused():
    emulator = DeviceEmulator(SHAPE, slots_per_device=2, rows_buffer=64, repeats=1)
    with pytest.raises(ValueError, match="fullest slot"):
        emulator.device_ms([50, 10], kernel="capacity", capacity=32)
    with pytest.raises(ValueError, match="receive buffer"):
        emulator.device_ms([50, 50], kernel="ragged")
    with pytest.raises(ValueError, match="slot_rows"):
        emulator.device_ms([1, 2, 3], kernel="ragged")
    with pytest.raises(ValueError, match="kernel"):
        emulator.device_ms([1, 2], kernel="dense")
    with pytest.raises(ValueError, match="ladder"):
        emulate_layer(emulator, np.array([1, 2]), kernel="capacity", all_to_all_ms=lambda b: 0.0, ladder=[1])
