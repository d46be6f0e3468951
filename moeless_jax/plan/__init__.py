"""Planning replica tables on the host (numpy, with numba for two hot loops when installed; importing this
package does not import jax, and only the ``balanced`` split of the metrics does, lazily).

- :mod:`~moeless_jax.plan.scaler`: replicas per expert (MoEless Alg. 1, and a fixed-budget min-max variant).
- :mod:`~moeless_jax.plan.placer`: replicas onto slots (MoEless Alg. 2) and the move plan from the last table.
- :mod:`~moeless_jax.plan.eplb`: a numpy port of DeepSeek's EPLB.
- :mod:`~moeless_jax.plan.policies`: static EP, EPLB, MoEless, Oracle, token drop and fixed replication
  behind one interface.
- :mod:`~moeless_jax.plan.metrics`: how a table splits load over devices, and balancedness.
- :mod:`~moeless_jax.plan.on_device`: the scaler and placer as jittable JAX, for planning inside a step
  (imported from its module, not from here, since it needs jax).
"""

from moeless_jax.plan.budget import limit_moves
from moeless_jax.plan.config import (
    EPLBConfig,
    MoElessConfig,
    ReplicateConfig,
    SlotLayout,
    TokenDropConfig,
    TopologyConfig,
)
from moeless_jax.plan.eplb import balanced_packing, rebalance_experts, replicate_experts
from moeless_jax.plan.loads import check_loads, read_loads
from moeless_jax.plan.metrics import (
    SPLITS,
    balancedness,
    device_loads,
    replica_cv,
    slot_loads,
    tokens_per_device,
)
from moeless_jax.plan.placer import Placement, place, place_replicas, placement_of
from moeless_jax.plan.policies import (
    EPLB,
    POLICIES,
    Decision,
    MoEless,
    Oracle,
    Outcome,
    Policy,
    ReplicateAll,
    StaticEP,
    TokenDrop,
    make_policy,
)
from moeless_jax.plan.scaler import scale_min_max, scale_to_cv
from moeless_jax.plan.tables import align_slots, repair_anti_affinity, static_slot_to_expert
from moeless_jax.plan.topology import Topology

__all__ = [
    "EPLB",
    "POLICIES",
    "SPLITS",
    "Decision",
    "EPLBConfig",
    "MoEless",
    "MoElessConfig",
    "Oracle",
    "Outcome",
    "Placement",
    "Policy",
    "ReplicateAll",
    "ReplicateConfig",
    "SlotLayout",
    "StaticEP",
    "TokenDrop",
    "TokenDropConfig",
    "Topology",
    "TopologyConfig",
    "align_slots",
    "balanced_packing",
    "balancedness",
    "check_loads",
    "device_loads",
    "limit_moves",
    "make_policy",
    "place",
    "place_replicas",
    "placement_of",
    "read_loads",
    "rebalance_experts",
    "repair_anti_affinity",
    "replica_cv",
    "replicate_experts",
    "scale_min_max",
    "scale_to_cv",
    "slot_loads",
    "static_slot_to_expert",
    "tokens_per_device",
]
