"""The loss plot of a fine-tuning run: training loss by step, and perplexity at each evaluation."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import Any

from .._files import save_figure

__all__ = ["plot_loss"]


def plot_loss(
    log: Sequence[Any],
    path: str | os.PathLike[str],
    *,
    evals: Sequence[Any] = (),
    title: str = "",
) -> None:
    """Write a PNG/SVG/PDF (by extension) of the loss by step; perplexity by step on a second panel.

    Args:
        log: step records with ``step`` and ``loss`` (:class:`~yarn_rope.finetune.StepRecord`).
        path: the image file; written whole or not at all (temporary file, then rename).
        evals: evaluation records with ``step`` and ``perplexity`` (``{length: value}``).
        title: the figure title.

    Raises:
        ImportError: matplotlib is missing (``pip install 'yarn-rope[plot]'``).
    """
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("plotting needs matplotlib: pip install 'yarn-rope[plot]'")
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    panels = 2 if evals else 1
    figure = Figure(figsize=(6.5 * panels, 4.0), dpi=120)
    loss_axis = figure.add_subplot(1, panels, 1)
    loss_axis.plot([r.step for r in log], [r.loss for r in log], linewidth=1.2)
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("training loss (nats / token)")
    loss_axis.grid(True, alpha=0.3)
    if evals:
        axis = figure.add_subplot(1, panels, 2)
        lengths = sorted({length for record in evals for length in record.perplexity})
        for length in lengths:
            points = [(r.step, r.perplexity[length]) for r in evals if length in r.perplexity]
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{length} tokens")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("held-out perplexity")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path)
