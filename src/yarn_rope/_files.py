"""Output files written whole or not at all, with the permissions ``open()`` would give them.

Every file the library writes for a user (result records, reports, GGUF copies, training logs,
plots) goes through :func:`atomic_path`: the content is written to a temporary file in the
target's folder and moved into place with ``os.replace``, so an interrupted run never leaves a
half-written file, and a failed one leaves the target as it was. ``tempfile.mkstemp`` creates
its file private (mode 0600); :func:`atomic_path` gives it ``0o666`` less the umask instead, as
``open()`` would, so a GGUF copy or a report stays readable by the server or colleague it is for.

JSON goes through :func:`write_json`, the one JSON writer: strict JSON only (RFC 8259 has no
``NaN`` or ``Infinity``, and Python's ``json`` module would write both). A non-finite float
anywhere in the data is written as the string ``"nan"``, ``"inf"`` or ``"-inf"`` (what
``str(float)`` gives and ``float()`` reads back); :func:`from_strict_json` turns those strings
back into floats.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process's umask (read by setting it and putting it back, the only portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; when the block ends normally it becomes ``target``.

    Write the content to the yielded path (by name: it exists, empty). On success it replaces
    ``target`` atomically, with mode ``0o666 & ~umask``; if the block raises, the temporary file
    is removed and ``target`` is untouched.

    Raises:
        OSError: the folder is missing or not writable (before the block runs).
    """
    destination = Path(target)
    descriptor, name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    temporary = Path(name)
    try:
        try:
            os.fchmod(descriptor, 0o666 & ~_umask())
        finally:
            os.close(descriptor)
        yield temporary
        os.replace(temporary, destination)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def save_figure(figure: Any, target: str | os.PathLike[str]) -> None:
    """``figure.savefig`` to ``target`` whole or not at all, in the format its suffix names."""
    suffix = os.path.splitext(os.fspath(target))[1].lstrip(".").lower()
    with atomic_path(target) as temporary:
        figure.savefig(temporary, format=suffix or None)


def write_text(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` whole or not at all (:func:`atomic_path`)."""
    with atomic_path(target) as temporary:
        temporary.write_text(text, encoding="utf-8")


NON_FINITE = ("nan", "inf", "-inf")


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (in dicts, lists and tuples too) as ``"nan"``,
    ``"inf"`` or ``"-inf"``; everything else unchanged."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def from_strict_json(value: Any) -> Any:
    """The inverse of :func:`strict_json`: the strings ``"nan"``, ``"inf"`` and ``"-inf"`` become floats."""
    if isinstance(value, str):
        return float(value) if value in NON_FINITE else value
    if isinstance(value, dict):
        return {key: from_strict_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_strict_json(item) for item in value]
    return value


def write_json(target: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as strict JSON (indented, :func:`strict_json`) to ``target``, whole or not at all.

    Raises:
        TypeError: a value JSON cannot hold (nothing is written).
        ValueError: a non-finite number :func:`strict_json` did not reach (nothing is written).
        OSError: the folder is missing or not writable.
    """
    text = json.dumps(strict_json(data), indent=1, allow_nan=False)
    write_text(target, text + "\n")
