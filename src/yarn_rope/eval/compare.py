"""Run one evaluation under several scaling methods of the same model, and plot the result."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
from collections.abc import Sequence
from typing import Any

from .. import methods as M
from .._files import save_figure
from .._progress import progress_bar
from ..config import RopeScaling
from ..patch import patched, unpatched
from .perplexity import PerplexityResult, perplexity
from .results import EvalRecord

__all__ = ["MethodResult", "applied", "compare_perplexity", "plot_perplexity", "scaling_for"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MethodResult:
    """One method's perplexity by length; ``label`` names it in tables and plots."""

    method: str
    label: str
    result: PerplexityResult

    def records(self, *, model: str = "") -> list[EvalRecord]:
        """One :class:`~yarn_rope.eval.results.EvalRecord` per length, under this method and label."""
        return self.result.records(model=model, method=self.method, label=self.label)


def scaling_for(
    method: str, *, factor: float, original_max_position_embeddings: int, finetuned: bool = False
) -> RopeScaling:
    """The settings a comparison uses for ``method`` at ``factor`` over the original length.

    What each method needs comes from the registry: the original length where the method
    requires it, the factor where it is the method's scale (dynamic YaRN: only when
    ``finetuned``), and the method's typical values for its other settings (Llama 3.1's
    frequency bounds for ``llama3``). LongRoPE cannot be applied at a factor (its per-pair
    factors come from a search): it is refused.
    """
    spec = M.get(method)
    if spec.name == "none":
        return RopeScaling(method="none")
    missing = [name for name in spec.required if name not in M.CONTEXT_SETTINGS and name not in spec.defaults]
    if missing:
        raise ValueError(
            f"method {method!r} cannot be applied at a factor: it needs {', '.join(missing)} from a model's "
            "config; compare it by loading such a model instead"
        )
    fields: dict[str, Any] = {"method": spec.name, **spec.defaults}
    if "original_max_position_embeddings" in spec.required:
        fields["original_max_position_embeddings"] = original_max_position_embeddings
    if spec.factor_from_lengths:
        fields["factor"] = factor
    elif finetuned and "finetuned" in spec.settings:
        fields.update(factor=factor, finetuned=True)
    return RopeScaling(**fields)


def applied(
    model: Any, scaling: RopeScaling, *, angles: str = "precise"
) -> contextlib.AbstractContextManager[Any]:
    """A context in which ``model`` runs under ``scaling``: nothing to do for plain RoPE, else
    :func:`~yarn_rope.patched` with ``replace=True`` (so a model that declares another scaling is
    moved to this one, and put back on exit)."""
    if scaling.method == "none":
        return contextlib.nullcontext(model)
    return patched(model, scaling, angles=angles, replace=True)


def _label(scaling: RopeScaling) -> str:
    if scaling.method == "none":
        return "plain RoPE"
    if scaling.factor is None:
        return scaling.method
    return f"{scaling.method} x{scaling.factor:g}"


def compare_perplexity(
    model: Any,
    documents: Any,
    *,
    methods: Sequence[str],
    factor: float,
    original_max_position_embeddings: int,
    lengths: Sequence[int],
    stride: int | None = None,
    tokenizer: Any | None = None,
    angles: str = "precise",
    progress: bool | None = None,
) -> list[MethodResult]:
    """:func:`~yarn_rope.eval.perplexity` of ``model`` under each method, the model restored after each.

    ``none`` is the model's own rotary embedding without any yarn_rope patch; the others are
    applied with :func:`yarn_rope.patched` at ``factor`` over ``original_max_position_embeddings``.
    A patch the caller had applied is in force again afterwards. ``progress`` (``None``: on a
    terminal only) shows a bar of methods above perplexity's bar in tokens.
    """
    if not methods:
        raise ValueError("methods must name at least one method")
    results = []
    with (
        unpatched(model),  # a patch the caller applied is put back afterwards
        progress_bar(len(methods), desc="methods", unit="method", enabled=progress) as bar,
    ):
        for method in methods:
            scaling = scaling_for(
                method, factor=factor, original_max_position_embeddings=original_max_position_embeddings
            )
            bar.set_postfix_str(_label(scaling))
            logger.info("perplexity under %s", _label(scaling))
            with applied(model, scaling, angles=angles):
                result = perplexity(
                    model, documents, lengths=lengths, stride=stride, tokenizer=tokenizer, progress=progress
                )
            results.append(MethodResult(method=method, label=_label(scaling), result=result))
            bar.update(1)
    return results


def plot_perplexity(
    results: Sequence[MethodResult],
    path: str | os.PathLike[str],
    *,
    trained_length: int | None = None,
    title: str = "",
) -> None:
    """Perplexity against context length, one line per method (PNG, SVG or PDF by extension).

    Raises:
        ImportError: matplotlib is missing (``pip install 'yarn-rope[plot]'``).
    """
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("plotting needs matplotlib: pip install 'yarn-rope[plot]'")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2), dpi=120)
    try:
        for entry in results:
            xs = [r.length for r in entry.result.lengths]
            ys = [r.perplexity for r in entry.result.lengths]
            axis.plot(xs, ys, marker="o", label=entry.label)
        axis.set_ylim(bottom=0)
        if trained_length is not None:
            axis.axvline(trained_length, color="grey", linestyle="--", linewidth=1)
            axis.text(
                trained_length,
                0.02,
                " trained context",
                transform=axis.get_xaxis_transform(),
                fontsize=8,
                color="grey",
                va="bottom",
            )
        axis.set_xlabel("context length (tokens)")
        axis.set_ylabel("perplexity")
        axis.grid(True, alpha=0.3)
        axis.legend()
        if title:
            axis.set_title(title)
        figure.tight_layout()
        save_figure(figure, path)  # never a half-written plot
    finally:
        plt.close(figure)
