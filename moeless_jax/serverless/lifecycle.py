"""Serverless expert replicas: cold -> warming -> warm -> idle under keep-alive -> released.

Each (layer, expert) has a set of replicas. A replica starts *warming* when it is created (its weights are
copied in, taking ``warm_up_s``), is *warm* from then on, serves calls (busy), and after its last call stays
*idle* for ``keep_alive_s`` before it is *released* (its memory given back). A release happens at the moment
the keep-alive ends, whenever the pool learns of it.

A predictor that knows a layer's load ``d`` layers ahead calls :meth:`ReplicaPool.prewarm` so replicas are
warm when their tokens come. A call that wants more replicas than are warm is a *late start* for each missing
one (counted): the missing replica starts warming now, and the call either runs on the warm replicas it has
(``late_start="warm_replicas"``: their tokens go to the expert's warm replicas) or waits for the replicas it
asked for (``"wait"``). Tokens are never dropped: an expert with no warm replica at all waits for its first.

Every replica's paid time is from its creation to its release (warm-up + busy + keep-alive), what
:func:`moeless_jax.serverless.cost.serverless_dollars` prices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

from moeless_jax.config import require
from moeless_jax.errors import InputError

__all__ = ["LATE_START_POLICIES", "LifecycleConfig", "ReplicaPool", "Served"]

LATE_START_POLICIES = ("warm_replicas", "wait")


@dataclass(frozen=True)
class LifecycleConfig:
    """warm_up_s: time to copy one replica's weights in (e.g. expert bytes / measured copy rate);
    keep_alive_s: idle time before a replica is released; late_start: ``warm_replicas`` or ``wait``."""

    warm_up_s: float
    keep_alive_s: float = 60.0
    late_start: str = "warm_replicas"

    def __post_init__(self) -> None:
        for name in ("warm_up_s", "keep_alive_s"):
            value = getattr(self, name)
            require(isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
                    and value >= 0, name, f"must be a number of seconds >= 0, got {value!r}")
        require(self.late_start in LATE_START_POLICIES, "late_start",
                f"'{self.late_start}' is not one of {', '.join(LATE_START_POLICIES)}")


class Served(NamedTuple):
    """How one call was served: ``replicas`` that computed it, ``late`` replicas it wanted that were not warm,
    ``wait_s`` the call's delay before it could start."""

    replicas: int
    late: int
    wait_s: float


@dataclass
class _Replica:
    created: float
    ready: float
    idle_from: float  # end of its last call (or ready, if it never served)
    busy_s: float = 0.0

    def released_at(self, keep_alive_s: float) -> float:
        return max(self.ready, self.idle_from) + keep_alive_s


@dataclass
class ReplicaPool:
    """The serverless replicas of a model's experts. Times are seconds on one clock that never goes back.

    Counters: ``late_starts``, ``wanted`` (replicas asked for by calls), ``prewarm_hits`` (replicas a call
    found warm that a pre-warm had started). ``held_seconds()`` and ``live()`` feed the cost views.
    """

    config: LifecycleConfig
    late_starts: int = 0
    wanted: int = 0
    prewarm_hits: int = 0
    _live: dict[tuple[int, int], list[_Replica]] = field(default_factory=dict)
    _prewarmed: set[int] = field(default_factory=set)
    _closed: list[_Replica] = field(default_factory=list)
    _now: float = -math.inf

    def _advance(self, now: float) -> None:
        if not math.isfinite(now) or now < self._now:
            raise InputError(f"time {now} is before the pool's clock {self._now}; calls must come in time "
                             "order")
        self._now = now
        keep = self.config.keep_alive_s
        for key, replicas in list(self._live.items()):
            expired = [r for r in replicas if r.released_at(keep) <= now]
            self._closed.extend(expired)
            self._live[key] = [r for r in replicas if r.released_at(keep) > now]

    def _start(self, key: tuple[int, int], now: float, count: int) -> list[_Replica]:
        new = [_Replica(now, now + self.config.warm_up_s, now + self.config.warm_up_s) for _ in range(count)]
        self._live.setdefault(key, []).extend(new)
        return new

    def prewarm(self, layer: int, expert: int, count: int, now: float) -> int:
        """Make sure ``count`` replicas of (layer, expert) exist (warm or warming); returns how many
        started."""
        self._advance(now)
        have = len(self._live.get((layer, expert), []))
        started = self._start((layer, expert), now, max(0, count - have))
        self._prewarmed.update(id(r) for r in started)
        return len(started)

    def serve(self, layer: int, expert: int, count: int, now: float, busy_s: float) -> Served:
        """A call at ``now`` wants ``count >= 1`` replicas of (layer, expert) for ``busy_s`` seconds."""
        if count < 1 or busy_s < 0:
            raise InputError(f"serve needs count >= 1 and busy_s >= 0, got {count} and {busy_s}")
        self._advance(now)
        key = (layer, expert)
        replicas = sorted(self._live.get(key, []), key=lambda r: r.ready)
        warm = [r for r in replicas if r.ready <= now]
        late = max(0, count - len(warm))
        self.wanted += count
        self.late_starts += late
        pending = [r for r in replicas if r.ready > now][:late]
        pending += self._start(key, now, late - len(pending))
        chosen = warm[:count]
        self.prewarm_hits += sum(id(r) in self._prewarmed for r in chosen)
        if self.config.late_start == "wait" and late:
            chosen, wait = chosen + pending, max(r.ready for r in pending) - now
        elif not chosen:  # nothing warm: the call waits for the first replica (tokens are never dropped)
            first = min(pending, key=lambda r: r.ready)
            chosen, wait = [first], first.ready - now
        else:
            wait = 0.0
        end = now + wait + busy_s
        for replica in chosen:
            replica.busy_s += busy_s
            replica.idle_from = max(replica.idle_from, end)
        return Served(len(chosen), late, wait)

    def live(self, layer: int | None = None) -> int:
        """Replicas alive now (warming, warm or idle), of one layer or all."""
        return sum(len(r) for (lay, _), r in self._live.items() if layer is None or lay == layer)

    def close(self) -> None:
        """End of the trace: every replica still alive is released when its keep-alive ends (it is paid until
        then, as a platform would keep it)."""
        for replicas in self._live.values():
            self._closed.extend(replicas)
        self._live = {}

    def held_seconds(self) -> list[float]:
        """Per released replica: seconds paid, from creation to release (after :meth:`close`, every one)."""
        keep = self.config.keep_alive_s
        return [r.released_at(keep) - r.created for r in self._closed]

    def busy_seconds(self) -> float:
        return sum(r.busy_s for r in self._closed) + sum(r.busy_s for v in self._live.values() for r in v)
