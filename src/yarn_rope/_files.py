"""Output files written whole or not at all, with the permissions ``open()`` would give them.

Every file the library writes for a user (result records, reports, GGUF copies, training logs,
plots) goes through :func:`atomic_path`: the content is written to a temporary file in the
target's folder and moved into place with ``os.replace``, so an interrupted run never leaves a
half-written file, and a failed one leaves the target as it was. ``tempfile.mkstemp`` creates
its file private (mode 0600); :func:`atomic_path` gives it ``0o666`` less the umask instead, as
``open()`` would, so a GGUF copy or a report stays readable by the server or colleague it is for.
"""

from __future__ import annotations

import contextlib
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
