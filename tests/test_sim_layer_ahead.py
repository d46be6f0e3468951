"""The copy-cost and step-charging model of layer-ahead replication, on cases worked out by hand."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moeless_jax.errors import InputError
from moeless_jax.sim.layer_ahead import (
    CopyCounts,
    between_steps_ms,
    copy_counts,
    copy_ms,
    exposed_ahead_ms,
    layer_ahead_ms,
    move_ms,
)

# 1 GB experts; local copies at 2 TB/s read+write -> 2 GB moved -> 1 ms each; links at 100 GB/s -> 10 ms per
# expert, plus 50 us once per device that sends or receives.
LINKS = dict(expert_bytes=1e9, local_tbps=2.0, link_gbps=100.0, link_latency_us=50.0)


def test_local_and_remote_copies_by_hand():
    # Two devices x two slots. Device 0 swaps its experts 0 and 1 between its slots (both local copies);
    # device 1's slot 3 takes expert 0, which only device 0 holds (one remote copy 0 -> 1).
    previous = np.array([0, 1, 2, 3])
    new = np.array([1, 0, 2, 0])
    counts = copy_counts(previous, new, num_devices=2, slots_per_device=2)
    assert counts.local.tolist() == [2, 0]
    assert counts.received.tolist() == [0, 1]
    assert counts.sent.tolist() == [1, 0]
    assert counts.copies == 3
    # Device 0: 2 local x 1 ms + (0.05 + 1 x 10) ms sending = 12.05; device 1: 10.05 receiving. Max: 12.05.
    assert move_ms(previous, new, num_devices=2, slots_per_device=2, **LINKS) == pytest.approx(12.05)


def test_remote_copies_are_spread_over_the_holders():
    # Expert 0 is on devices 0 and 1; devices 2 and 3 each take a copy. The first copy (slot 4, device 2)
    # comes from device 0 (both have sent nothing: the lower one), the second (slot 6, device 3) from
    # device 1, which has sent less. Every device then moves one expert over its link: 0.05 + 10 ms.
    previous = np.array([0, 1, 0, 2, 3, 4, 5, 6])
    new = np.array([0, 1, 0, 2, 0, 4, 0, 6])
    counts = copy_counts(previous, new, num_devices=4, slots_per_device=2)
    assert counts.sent.tolist() == [1, 1, 0, 0]
    assert counts.received.tolist() == [0, 0, 1, 1]
    assert counts.local.tolist() == [0, 0, 0, 0]
    assert move_ms(previous, new, num_devices=4, slots_per_device=2, **LINKS) == pytest.approx(10.05)


def test_a_device_pays_the_larger_of_its_incoming_and_outgoing_copies():
    # Device 0 sends two experts (to devices 1 and 2) and receives one (expert 3 from device 1), so its link
    # carries max(1, 2) = 2 experts: 0.05 + 20 ms; devices 1 and 2 need 0.05 + 10 ms.
    counts = CopyCounts(local=np.array([0, 0, 0]), received=np.array([1, 1, 1]), sent=np.array([2, 1, 0]))
    assert copy_ms(counts, **LINKS) == pytest.approx(20.05)


def test_unchanged_and_cleared_slots_cost_nothing():
    previous = np.array([0, 1, 2, 0])
    assert move_ms(previous, previous, num_devices=2, slots_per_device=2, **LINKS) == 0.0
    cleared = np.array([0, 1, 2, -1])  # slot 3 drops its replica of expert 0: no copy
    counts = copy_counts(previous, cleared, num_devices=2, slots_per_device=2)
    assert counts.copies == 0
    assert move_ms(previous, cleared, num_devices=2, slots_per_device=2, **LINKS) == 0.0


def test_a_copy_needs_a_source_and_tables_need_the_layout():
    with pytest.raises(InputError, match="no slot of previous holds"):
        copy_counts(np.array([0, 1, 2, 3]), np.array([0, 1, 2, 4]), num_devices=2, slots_per_device=2)
    with pytest.raises(InputError, match="previous: has shape"):
        copy_counts(np.array([0, 1, 2]), np.array([0, 1, 2, 3]), num_devices=2, slots_per_device=2)
    with pytest.raises(InputError, match="link_gbps"):
        copy_ms(CopyCounts(np.zeros(2), np.zeros(2), np.zeros(2)), **(LINKS | {"link_gbps": 0.0}))


def test_layer_ahead_exposes_only_what_the_previous_layer_does_not_hide():
    layer = np.array([1.0, 2.0, 0.5])
    move = np.array([0.3, 1.5, 2.5])
    overhead = np.array([0.1, 0.1, 0.1])
    # Layer 0's copy shows in full (0.3); layer 1's 1.5 runs under layer 0's 1.0 -> 0.5 shows; layer 2's 2.5
    # under layer 1's 2.0 -> 0.5 shows. Layer 2's own 0.5 ms hides nothing (there is no layer 3).
    assert exposed_ahead_ms(layer, move) == pytest.approx([0.3, 0.5, 0.5])
    # 3.5 (layers) + 1.3 (exposed) + 0.3 (overhead) = 5.1
    assert layer_ahead_ms(layer, move, overhead) == pytest.approx(5.1)
    # Between steps every copy shows: 3.5 + 0.3 + 1.5 + 2.5 = 7.8
    assert between_steps_ms(layer, move) == pytest.approx(7.8)


def test_step_charging_works_on_several_steps_at_once():
    layer = np.array([[1.0, 2.0, 0.5], [1.0, 1.0, 1.0]])
    move = np.array([[0.3, 1.5, 2.5], [0.0, 0.5, 0.0]])
    overhead = np.zeros((2, 3))
    # Step 2: layers 3.0, layer 1's 0.5 hides under layer 0's 1.0 -> 3.0.
    assert layer_ahead_ms(layer, move, overhead) == pytest.approx([4.8, 3.0])
    assert between_steps_ms(layer, move) == pytest.approx([7.8, 3.5])
    with pytest.raises(InputError, match="overhead_ms has shape"):
        layer_ahead_ms(layer, move, np.zeros(3))
    with pytest.raises(InputError, match="move_ms has shape"):
        between_steps_ms(layer, move[:, :2])


@st.composite
def table_pairs(draw):
    """A servable-looking previous table over D devices x S slots and a new one that only takes experts the
    previous table holds (so every copy has a source)."""
    num_devices = draw(st.integers(1, 5))
    slots = draw(st.integers(1, 4))
    num_experts = draw(st.integers(1, num_devices * slots))
    fill = draw(st.lists(st.integers(-1, num_experts - 1), min_size=num_devices * slots,
                         max_size=num_devices * slots))
    previous = np.array(fill)
    previous[:num_experts] = np.arange(num_experts)  # every expert has a replica
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    held = np.unique(previous[previous >= 0])
    new = np.where(rng.random(previous.size) < 0.5, previous, rng.choice(np.append(held, -1), previous.size))
    return previous, new, num_devices, slots


@given(table_pairs())
def test_counts_and_times_agree_with_a_direct_count(pair):
    previous, new, num_devices, slots = pair
    counts = copy_counts(previous, new, num_devices=num_devices, slots_per_device=slots)
    device = np.arange(previous.size) // slots
    copied = (new != previous) & (new >= 0)
    # Reference: a copy is local exactly when its device held the expert before.
    local = np.array([any(previous[device == device[p]] == new[p]) for p in range(new.size)]) & copied
    assert counts.copies == int(copied.sum())
    assert counts.local.tolist() == np.bincount(device[local], minlength=num_devices).tolist()
    assert counts.received.tolist() == np.bincount(device[copied & ~local], minlength=num_devices).tolist()
    assert counts.sent.sum() == counts.received.sum()
    got = move_ms(previous, new, num_devices=num_devices, slots_per_device=slots, **LINKS)
    # Bounds: at least the busiest receiver's own time, at most every copy made by one device over one link.
    receiver = counts.local * 1.0 + np.where(counts.received > 0, 0.05 + 10.0 * counts.received, 0.0)
    assert got >= receiver.max() - 1e-9
    assert got <= counts.local.sum() * 1.0 + (0.05 + 10.0 * counts.received.sum()) + 1e-9
