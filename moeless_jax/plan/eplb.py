"""A numpy port of DeepSeek's expert-parallelism load balancer (EPLB, github.com/deepseek-ai/EPLB).

EPLB replicates experts to minimise the maximum load per replica (a fixed number of physical slots), then
packs replicas onto GPUs so every GPU holds the same number and GPU loads are as even as a greedy packing
gets. The hierarchical policy first packs expert groups onto nodes (so most traffic stays in a node), then
replicates inside each node, then packs each node's replicas onto its GPUs. The global policy is the same with
one group and one node. Loads are summed over a history window by the caller.

Ties are broken as the reference does: sorts are stable and descending (equal loads keep expert order), an
argmax takes the first maximum and the emptiest pack with the lowest index wins. Loads are float64 here (the
reference casts to float32); both round the same rational to the same value, so plans only differ when two
distinct load ratios agree to float32 precision.

Physical slot ``p`` lives on GPU ``p // (num_replicas / num_gpus)``, as in our replica tables. EPLB can give
an expert more replicas than GPUs and put two replicas of one expert on a GPU; our tables forbid both, so
``cap_per_gpu`` (off by default, as in the reference) caps the replication, and the EPLB policy
(:class:`moeless_jax.plan.policies.EPLB`) swaps duplicates apart.
"""

from __future__ import annotations

import numpy as np

from moeless_jax.errors import InputError


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Put ``n`` weighted items into ``num_packs`` packs of exactly ``n / num_packs`` items each.

    Items go heaviest first into the lightest pack that still has room. weight: ``[X, n]``.
    Returns ``(pack_index [X, n], rank_in_pack [X, n])`` int64.
    """
    num_rows, num_items = weight.shape
    if num_items % num_packs:
        raise InputError(f"{num_items} items do not split evenly into {num_packs} packs")
    per_pack = num_items // num_packs
    if per_pack == 1:
        return np.broadcast_to(np.arange(num_items), weight.shape).copy(), np.zeros(weight.shape, np.int64)
    order = np.argsort(-weight, axis=-1, kind="stable")
    pack_index = np.empty(weight.shape, np.int64)
    rank_in_pack = np.empty(weight.shape, np.int64)
    for row in range(num_rows):
        pack_weight = np.zeros(num_packs)  # a full pack is set to +inf so argmin skips it
        filled = [0] * num_packs
        row_weight = weight[row].tolist()
        for item in order[row].tolist():
            pack = int(pack_weight.argmin())
            pack_index[row, item] = pack
            rank_in_pack[row, item] = filled[pack]
            filled[pack] += 1
            pack_weight[pack] = np.inf if filled[pack] == per_pack else pack_weight[pack] + row_weight[item]
    return pack_index, rank_in_pack


def replicate_experts(
    weight: np.ndarray, num_physical: int, max_per_expert: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Add ``num_physical - num_logical`` replicas, each to the expert with the highest load per replica.

    weight: ``[X, num_logical]``. ``max_per_expert`` (not in the reference, which has no cap) skips experts
    that already have that many replicas, so a replica table with one replica per GPU can hold the result.
    Returns ``phy2log [X, num_physical]`` (logical expert of each physical one; the first ``num_logical`` are
    the experts themselves), ``rank [X, num_physical]`` (replica index within its expert) and
    ``logcnt [X, num_logical]`` (replicas per expert).
    """
    num_rows, num_logical = weight.shape
    if num_physical < num_logical:
        raise InputError(f"{num_physical} physical slots cannot hold {num_logical} experts once each")
    phy2log = np.broadcast_to(np.arange(num_physical), (num_rows, num_physical)).copy()
    rank = np.zeros((num_rows, num_physical), np.int64)
    logcnt = np.ones((num_rows, num_logical), np.int64)
    rows = np.arange(num_rows)
    if max_per_expert is not None and num_physical > num_logical * max_per_expert:
        raise InputError(
            f"{num_physical} slots need more than {max_per_expert} replicas of some of the "
            f"{num_logical} experts"
        )
    for slot in range(num_logical, num_physical):
        per_replica = weight / logcnt
        if max_per_expert is not None:
            per_replica = np.where(logcnt < max_per_expert, per_replica, -np.inf)
        expert = np.argmax(per_replica, axis=-1)
        phy2log[:, slot] = expert
        rank[:, slot] = logcnt[rows, expert]
        logcnt[rows, expert] += 1
    return phy2log, rank, logcnt


def rebalance_experts_hierarchical(
    weight: np.ndarray,
    num_physical: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    cap_per_gpu: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups -> nodes, replicas inside nodes, replicas -> GPUs. weight: ``[L, E]``.

    ``cap_per_gpu`` (not in the reference): at most one replica of an expert per GPU of its node.
    Returns ``(phy2log [L, P], phyrank [L, P], logcnt [L, E])``.
    """
    num_layers, num_logical = weight.shape
    _check_hierarchy(num_logical, num_physical, num_groups, num_nodes, num_gpus)
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    per_gpu = num_physical // num_gpus
    per_node_logical = num_logical // num_nodes

    # 1. Pack expert groups onto nodes; "mlog" numbers experts node by node.
    tokens_per_group = weight.reshape(num_layers, num_groups, group_size).sum(-1)
    group_pack, group_rank = balanced_packing(tokens_per_group, num_nodes)
    first_mlog = (group_pack * groups_per_node + group_rank) * group_size  # [L, G]
    log2mlog = (first_mlog[:, :, None] + np.arange(group_size)).reshape(num_layers, num_logical)
    mlog2log = _inverse(log2mlog)

    # 2. Replicate inside each node: rows are (layer, node).
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, -1).reshape(-1, per_node_logical)
    cap = num_gpus // num_nodes if cap_per_gpu else None
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_physical // num_nodes, cap)

    # 3. Pack each node's replicas onto its GPUs.
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlogcnt, phy2mlog, -1)
    pack_index, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    pphy2phy = _inverse(pack_index * per_gpu + rank_in_pack)

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, -1)
    node_offset = np.arange(0, num_logical, per_node_logical)[None, :, None]
    pphy2mlog = (pphy2mlog.reshape(num_layers, num_nodes, -1) + node_offset).reshape(num_layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, -1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, -1).reshape(num_layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, -1), log2mlog, -1)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    cap_per_gpu: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's entry point: hierarchical when ``num_groups % num_nodes == 0``, else global.

    weight: ``[L, E]`` load statistics. ``cap_per_gpu`` (off in the reference): never more replicas of an
    expert than GPUs it can spread over. Returns ``phy2log [L, num_replicas]``, ``log2phy [L, E, max_count]``
    (-1 padded) and ``logcnt [L, E]``.
    """
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim != 2:
        raise InputError(f"weight must be [layers, experts], got shape {weight.shape}")
    num_layers, num_logical = weight.shape
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(
            weight, num_replicas, num_groups, num_nodes, num_gpus, cap_per_gpu
        )
    else:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(
            weight, num_replicas, 1, 1, num_gpus, cap_per_gpu
        )
    max_count = int(logcnt.max())
    log2phy = np.full((num_layers, num_logical * max_count), -1, np.int64)
    np.put_along_axis(
        log2phy, phy2log * max_count + phyrank, np.broadcast_to(np.arange(num_replicas), phy2log.shape), -1
    )
    return phy2log, log2phy.reshape(num_layers, num_logical, max_count), logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse permutation: ``inv[r, perm[r, j]] = j``."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[-1]), perm.shape), -1)
    return inv


def _check_hierarchy(
    num_logical: int, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> None:
    problems = [
        (num_logical % num_groups, f"{num_logical} experts do not split into {num_groups} groups"),
        (num_groups % num_nodes, f"{num_groups} groups do not split over {num_nodes} nodes"),
        (num_gpus % num_nodes, f"{num_gpus} GPUs do not split over {num_nodes} nodes"),
        (num_physical % num_gpus, f"{num_physical} physical slots do not split over {num_gpus} GPUs"),
        (
            num_physical < num_logical,
            f"{num_physical} physical slots cannot hold {num_logical} experts once each",
        ),
    ]
    for bad, message in problems:
        if bad:
            raise InputError(f"EPLB: {message}")
