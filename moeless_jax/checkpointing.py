"""Reading one item of an orbax composite checkpoint, with a one-line error for damaged files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeless_jax.errors import InputError


def restore_item(path: Path, item: str, args: Any, *, fix: str) -> Any:
    """Restore ``item`` of the composite checkpoint at ``path`` with orbax ``args``.

    A missing or damaged item raises :class:`InputError` naming the path, the item and the cause, then ``fix``
    (what the user should do, e.g. "save the model again").
    """
    import orbax.checkpoint as ocp

    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(path, ocp.args.Composite(**{item: args}))[item]
    except Exception as err:  # orbax raises many types for damaged files; name the item and the cause
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        raise InputError(f"{path}: cannot read the checkpoint's {item} (missing or damaged files: "
                         f"{type(err).__name__}: {first_line}); {fix}") from None
    if restored is None:
        raise InputError(f"{path}: the checkpoint has no {item}; {fix}")
    return restored
