"""One progress convention for every long loop in yarn_rope.

Every function that runs for more than a few seconds takes ``progress: bool | None = None`` and
opens its bar with :func:`progress_bar`:

* ``None`` (the default): a bar on standard error when it is a terminal, nothing otherwise
  (logs, CI, pipes stay clean);
* ``True``: always a bar, terminal or not (``--progress`` on the command line);
* ``False``: never (``--no-progress``).

Bars count real units of work (tokens, layers, trials, steps, bytes) so that they move during
long passes and show a rate and an ETA, never a single ``0/1 pass`` that jumps at the end.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["progress_bar"]


def progress_bar(
    total: float | None,
    *,
    desc: str,
    unit: str = "it",
    enabled: bool | None = None,
    unit_scale: bool = False,
) -> Any:
    """A tqdm bar that follows the convention above; use it as a context manager.

    Args:
        total: units of work in all (``None`` if unknown).
        desc: what is being done, e.g. ``"perplexity"``.
        unit: the unit counted (``"token"``, ``"layer"``, ``"trial"``, ``"step"``, ``"B"``).
        enabled: ``None`` (on a terminal only), ``True`` (always) or ``False`` (never).
        unit_scale: print large counts with SI prefixes (tokens, bytes).

    Returns:
        a ``tqdm`` instance (disabled bars accept the same calls and print nothing).
    """
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"progress must be True, False or None (on a terminal only), got {enabled!r}")
    from tqdm.auto import tqdm

    # tqdm's disable=None turns the bar off when its stream is not a terminal.
    disable = None if enabled is None else not enabled
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        disable=disable,
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
    )
