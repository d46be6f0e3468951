"""Optional compilation of the planner's hot loops with numba.

:func:`njit` compiles a function with ``numba.njit(cache=True, nogil=True)`` when numba can be imported, and
returns it unchanged otherwise, so the same code runs as plain Python (slower, same results) where numba is
missing. Compiled functions take only contiguous int64 / float64 arrays, Python ints and floats, so each
compiles once (on its first call, or loaded from numba's on-disk cache next to this package). Where no cache
location is writable, the function is compiled without a cache on the first call of every process.
"""

from __future__ import annotations

from collections.abc import Callable

try:
    import numba
except ImportError:  # the package works without numba, with the loops run by the interpreter
    numba = None

#: True when the planner's loops are compiled (numba is importable and its JIT is not disabled).
COMPILED = numba is not None and not numba.config.DISABLE_JIT


def njit[F: Callable](fn: F) -> F:
    """``fn`` compiled by numba (cached on disk when possible), or ``fn`` itself without numba."""
    if numba is None:
        return fn
    try:
        return numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # no writable cache location for fn's source: compile per process instead
        return numba.njit(nogil=True)(fn)


def python_of(fn: Callable) -> Callable:
    """The plain-Python function behind ``fn`` (what runs where numba is missing)."""
    return getattr(fn, "py_func", fn)
