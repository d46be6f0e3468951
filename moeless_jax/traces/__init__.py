"""Trace I/O: routing traces (native, MoE-Beyond), request arrival traces, batching and expert loads."""

from moeless_jax.traces.arrivals import ArrivalTrace, read_azure_arrivals, read_mooncake_arrivals
from moeless_jax.traces.batching import expert_loads, token_budget_batches, window_batches, window_requests
from moeless_jax.traces.moe_beyond import default_cache_dir, read_moe_beyond, read_moe_beyond_file
from moeless_jax.traces.native import FORMAT_VERSION, load_trace, save_trace
from moeless_jax.traces.routing import RoutingTrace
from moeless_jax.traces.synthetic import synthetic_trace

__all__ = [
    "FORMAT_VERSION",
    "ArrivalTrace",
    "RoutingTrace",
    "default_cache_dir",
    "expert_loads",
    "load_trace",
    "read_azure_arrivals",
    "read_moe_beyond",
    "read_moe_beyond_file",
    "read_mooncake_arrivals",
    "save_trace",
    "synthetic_trace",
    "token_budget_batches",
    "window_batches",
    "window_requests",
]
