"""A model-card report from result records: one Markdown table per suite, and plots.

Records (:class:`~yarn_rope.eval.results.EvalRecord`) from any number of runs are put side by
side: rows are what was measured (task, length), columns are the model states (the unpatched
model first, then each method in the order first seen; the model's name is added when several
models appear). A cell is the value, with ``± stderr`` where the record has one; accuracies are
shown in percent (as the YaRN model cards do), perplexities with two decimals. The
lm-evaluation-harness table shows each task's primary metric (``acc_norm`` for ARC-Challenge and
HellaSwag, ``acc`` for MMLU and TruthfulQA) with its few-shot count, laid out like the model
card's short-context table. When two records fill the same cell, the first one read is kept and
the report says how many were set aside.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

from .results import SUITES, EvalRecord

__all__ = [
    "Column",
    "columns",
    "markdown_table",
    "plot_depth_heatmap",
    "plot_harness",
    "plot_records",
    "render_markdown",
]

_TITLES = {
    "perplexity": "Perplexity by context length",
    "passkey": "Passkey retrieval accuracy (%)",
    "ruler": "RULER-style tasks: accuracy (%)",
    "harness": "Short-context benchmarks (lm-evaluation-harness, %)",
}
_PERCENT_METRICS = {"accuracy", "acc", "acc_norm", "exact_match", "mc1", "mc2"}


@dataclasses.dataclass(frozen=True)
class Column:
    """One model state: a model under one method (with its settings)."""

    model: str
    method: str
    label: str
    settings_key: str

    def header(self, several_models: bool) -> str:
        return f"{self.label} ({self.model})" if several_models and self.model else self.label


def _settings_key(record: EvalRecord) -> str:
    if record.settings is None:
        return ""
    return repr(sorted(record.settings.items()))


def _column(record: EvalRecord) -> Column:
    return Column(record.model, record.method, record.label, _settings_key(record))


def columns(records: Iterable[EvalRecord]) -> list[Column]:
    """The distinct model states, each model's unpatched state first, else in the order first seen."""
    seen: list[Column] = []
    for record in records:
        column = _column(record)
        if column not in seen:
            seen.append(column)
    models = list(dict.fromkeys(column.model for column in seen))
    return sorted(seen, key=lambda c: (models.index(c.model), c.method != "none", seen.index(c)))


def _is_percent(metric: str) -> bool:
    return metric.split(" (")[0] in _PERCENT_METRICS


def _cell(record: EvalRecord | None) -> str:
    if record is None:
        return ""
    if not math.isfinite(record.value):
        return str(record.value)
    if _is_percent(record.metric):
        text = f"{100 * record.value:.1f}"
        if record.stderr is not None:
            text += f" ± {100 * record.stderr:.1f}"
        return text
    text = f"{record.value:.2f}" if abs(record.value) >= 0.01 or record.value == 0 else f"{record.value:.3g}"
    if record.stderr is not None:
        text += f" ± {record.stderr:.2f}"
    return text


def _primary_only(records: list[EvalRecord]) -> list[EvalRecord]:
    """Harness records: each task's primary metric where the records mark one."""
    marked = {r.task for r in records if r.details.get("primary") is True}
    return [r for r in records if r.task not in marked or r.details.get("primary") is True]


def _table(
    suite: str, records: list[EvalRecord], cols: list[Column], several_models: bool
) -> tuple[str, int]:
    """The Markdown table of one suite, and how many duplicate records it set aside."""
    rows: dict[tuple[str, str, int | None], dict[Column, EvalRecord]] = {}
    duplicates = 0
    for record in records:
        row = rows.setdefault((record.task, record.metric, record.length), {})
        column = _column(record)
        if column in row:
            duplicates += 1
            continue
        row[column] = record
    used = [c for c in cols if any(c in row for row in rows.values())]
    order = list(dict.fromkeys(record.task for record in records))
    keys = sorted(rows, key=lambda k: (order.index(k[0]), k[1], -1 if k[2] is None else k[2]))
    several_tasks = len(order) > 1
    several_metrics = len({k[1] for k in keys}) > 1
    heads: list[str] = []
    if suite == "harness":
        heads.append("task")
    else:
        if suite != "passkey" and (several_tasks or suite == "ruler"):
            heads.append("task")
        if several_metrics:
            heads.append("metric")
        heads.append("tokens")
    header = heads + [c.header(several_models) for c in used]
    align = ["---"] * (len(heads) - 1) + ["---:" if heads[-1] == "tokens" else "---"] + ["---:"] * len(used)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]

    def emit(name: str, metric: str, length: int | None, cells: dict[Column, EvalRecord]) -> None:
        first: list[str] = []
        if suite == "harness":
            sample = next(iter(cells.values()))
            shots = sample.details.get("num_fewshot")
            about = ", ".join(part for part in (f"{shots}-shot" if shots is not None else "", metric) if part)
            first.append(f"{name} ({about})")
        else:
            if "task" in heads:
                first.append(name)
            if several_metrics:
                first.append(metric)
            first.append("" if length is None else f"{length:,}")
        lines.append("| " + " | ".join(first + [_cell(cells.get(c)) for c in used]) + " |")

    for task, metric, length in keys:
        emit(task, metric, length, rows[(task, metric, length)])
    if suite == "ruler":
        for length in sorted({k[2] for k in keys if k[2] is not None}):
            at_length = {k: row for k, row in rows.items() if k[2] == length}
            if len({k[0] for k in at_length}) < 2:
                continue
            means: dict[Column, EvalRecord] = {}
            for column in used:  # a mean over every task at this length, or none
                if all(column in row for row in at_length.values()):
                    cells = [row[column] for row in at_length.values()]
                    value = sum(cell.value for cell in cells) / len(cells)
                    means[column] = dataclasses.replace(cells[0], task="mean", value=value, stderr=None)
            emit(f"mean of {len(at_length)} tasks", "accuracy", length, means)
    return "\n".join(lines), duplicates


def markdown_table(records: Sequence[EvalRecord], suite: str) -> str:
    """The Markdown table of one suite's records (rows: task and length; columns: model states).

    Raises:
        ValueError: no record of ``suite`` (per-depth records do not count).
    """
    chosen = [r for r in records if r.suite == suite and r.depth is None]
    if not chosen:
        raise ValueError(f"no {suite} records to tabulate")
    if suite == "harness":
        chosen = _primary_only(chosen)
    cols = columns(chosen)
    return _table(suite, chosen, cols, len({c.model for c in cols}) > 1)[0]


def _settings_shown(settings: dict[str, Any]) -> dict[str, Any]:
    """The factor, the original length and every setting that differs from its method's default."""
    from ..config import RopeScaling

    main = ("factor", "original_max_position_embeddings")
    try:
        default = RopeScaling(
            method=settings["method"], **{k: settings[k] for k in main if settings.get(k) is not None}
        ).to_dict()
    except (KeyError, TypeError, ValueError):  # settings from another yarn_rope release: show them all
        default = {}
    return {
        k: v
        for k, v in settings.items()
        if k != "method" and v is not None and (k in main or k not in default or default[k] != v)
    }


def render_markdown(records: Sequence[EvalRecord], *, title: str = "Evaluation report") -> str:
    """The Markdown report of ``records``: one table per suite, then what each column ran.

    Args:
        records: records from one or several runs (per-depth RULER records are left to the heat map).
        title: the report's first heading.

    Returns:
        Markdown text ending with a newline.

    Raises:
        ValueError: no records.
    """
    if not records:
        raise ValueError("no records to report")
    rows = [record for record in records if record.depth is None]
    cols = columns(records)
    several_models = len({c.model for c in cols}) > 1
    suites = [s for s in SUITES if any(r.suite == s for r in rows)]
    suites += sorted({r.suite for r in rows} - set(SUITES))
    out = [f"# {title}", ""]
    set_aside = 0
    for suite in suites:
        chosen = [r for r in rows if r.suite == suite]
        if suite == "harness":
            chosen = _primary_only(chosen)
        table, duplicates = _table(suite, chosen, cols, several_models)
        set_aside += duplicates
        out += [f"## {_TITLES.get(suite, suite)}", "", table, ""]
    out += ["## Columns", ""]
    for column in cols:
        sample = next(r for r in records if _column(r) == column)
        settings = sample.settings
        if settings is None:
            what = "the model as loaded (no yarn_rope patch)"
        else:
            what = f"`{settings.get('method')}` " + ", ".join(
                f"{k}={v}" for k, v in _settings_shown(settings).items()
            )
        out.append(
            f"- **{column.header(several_models)}**: {sample.model or 'unnamed model'}; {what}; "
            f"yarn_rope {sample.yarn_rope}, transformers {sample.transformers}"
        )
    if set_aside:
        out += [
            "",
            f"({set_aside} record(s) for a cell already filled were set aside; the first read is shown.)",
        ]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("plotting needs matplotlib: pip install 'yarn-rope[plot]'")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: str | os.PathLike[str]) -> None:
    from .._files import save_figure

    save_figure(figure, path)  # never a half-written plot


def plot_depth_heatmap(
    records: Sequence[EvalRecord], path: str | os.PathLike[str], *, title: str = ""
) -> None:
    """Accuracy by needle depth (rows) and prompt length (columns), one panel per model state.

    Each cell is the mean over the RULER needle tasks' per-depth records (``depth`` set) at that
    depth and length. PNG, SVG or PDF by the file's extension.

    Raises:
        ValueError: no per-depth records.
        ImportError: matplotlib is missing (``pip install 'yarn-rope[plot]'``).
    """
    cells = [r for r in records if r.depth is not None]
    if not cells:
        raise ValueError("no per-depth records (RULER needle tasks) to draw a heat map from")
    plt = _pyplot()
    cols = columns(cells)
    several_models = len({c.model for c in cols}) > 1
    depths = sorted({float(r.depth) for r in cells if r.depth is not None})
    lengths = sorted({int(r.length) for r in cells if r.length is not None})
    figure, grid_axes = plt.subplots(
        1,
        len(cols),
        figsize=(1.5 + (0.9 * len(lengths) + 0.9) * len(cols), 1.9 + 0.4 * len(depths)),
        dpi=120,
        layout="constrained",
        squeeze=False,
    )
    axes = list(grid_axes[0])
    try:
        image = None
        for axis, column in zip(axes, cols, strict=True):
            grid = [[math.nan] * len(lengths) for _ in depths]
            for i, depth in enumerate(depths):
                for j, length in enumerate(lengths):
                    values = [
                        r.value
                        for r in cells
                        if _column(r) == column and r.depth == depth and r.length == length
                    ]
                    if values:
                        grid[i][j] = sum(values) / len(values)
            image = axis.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
            for i in range(len(depths)):
                for j in range(len(lengths)):
                    if not math.isnan(grid[i][j]):
                        axis.text(j, i, f"{100 * grid[i][j]:.0f}", ha="center", va="center", fontsize=7)
            axis.set_xticks(
                range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths]
            )
            axis.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
            axis.set_xlabel("prompt tokens")
            axis.set_title(column.header(several_models), fontsize=9)
        axes[0].set_ylabel("needle depth")
        if image is not None:
            figure.colorbar(image, ax=axes, shrink=0.9, label="accuracy")
        if title:
            figure.suptitle(title, fontsize=10)
        _save(figure, path)
    finally:
        plt.close(figure)


def _plot_lines(
    records: Sequence[EvalRecord], path: str | os.PathLike[str], *, ylabel: str, percent: bool, title: str
) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.2), dpi=120)
    try:
        cols = columns(records)
        several_models = len({c.model for c in cols}) > 1
        for column in cols:
            by_length: dict[int, list[float]] = {}
            for r in records:
                if _column(r) == column and r.length is not None:
                    by_length.setdefault(r.length, []).append(r.value)
            xs = sorted(by_length)
            ys = [sum(by_length[x]) / len(by_length[x]) * (100 if percent else 1) for x in xs]
            axis.plot(xs, ys, marker="o", label=column.header(several_models))
        axis.set_xlabel("tokens")
        axis.set_ylabel(ylabel)
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        axis.legend()
        axis.set_title(title)
        figure.tight_layout()
        _save(figure, path)
    finally:
        plt.close(figure)


def plot_harness(records: Sequence[EvalRecord], path: str | os.PathLike[str]) -> None:
    """Bars per harness task (its primary metric), one per model state, with the harness's stderr.

    Raises:
        ValueError: no harness records.
        ImportError: matplotlib is missing (``pip install 'yarn-rope[plot]'``).
    """
    records = _primary_only([r for r in records if r.suite == "harness" and r.depth is None])
    if not records:
        raise ValueError("no harness records to plot")
    plt = _pyplot()
    cols = columns(records)
    several_models = len({c.model for c in cols}) > 1
    tasks = list(dict.fromkeys(r.task for r in records))
    figure, axis = plt.subplots(figsize=(max(5.0, 1.6 * len(tasks) + 2), 4.2), dpi=120)
    try:
        width = 0.8 / len(cols)
        for k, column in enumerate(cols):
            values, errors = [], []
            for task in tasks:
                found = next((r for r in records if r.task == task and _column(r) == column), None)
                values.append(math.nan if found is None else 100 * found.value)
                errors.append(0.0 if found is None or found.stderr is None else 100 * found.stderr)
            xs = [i + (k - (len(cols) - 1) / 2) * width for i in range(len(tasks))]
            axis.bar(xs, values, width, yerr=errors, capsize=3, label=column.header(several_models))
        axis.set_xticks(range(len(tasks)), tasks)
        axis.set_ylabel("score (%)")
        axis.grid(True, axis="y", alpha=0.3)
        axis.legend()
        axis.set_title("short-context benchmarks (lm-evaluation-harness)")
        figure.tight_layout()
        _save(figure, path)
    finally:
        plt.close(figure)


def plot_records(records: Sequence[EvalRecord], folder: str | os.PathLike[str]) -> list[str]:
    """Every plot the records allow, written into ``folder`` (created if needed).

    ``perplexity.png`` (perplexity against length), ``passkey.png`` (accuracy against length),
    ``ruler.png`` (mean accuracy over the RULER-style tasks against length),
    ``ruler_depth.png`` (the depth x length heat map, see :func:`plot_depth_heatmap`) and
    ``harness.png`` (bars per task with the harness's standard errors).

    Returns:
        The paths written.

    Raises:
        ImportError: matplotlib is missing (``pip install 'yarn-rope[plot]'``).
    """
    target = os.fspath(folder)
    os.makedirs(target, exist_ok=True)
    written = []
    overall = [r for r in records if r.depth is None]
    for suite, name, ylabel, percent in (
        ("perplexity", "perplexity.png", "perplexity", False),
        ("passkey", "passkey.png", "accuracy (%)", True),
        ("ruler", "ruler.png", "mean accuracy over tasks (%)", True),
    ):
        chosen = [r for r in overall if r.suite == suite]
        if chosen:
            path = os.path.join(target, name)
            _plot_lines(chosen, path, ylabel=ylabel, percent=percent, title=_TITLES[suite].split(":")[0])
            written.append(path)
    if any(r.suite == "ruler" and r.depth is not None for r in records):
        path = os.path.join(target, "ruler_depth.png")
        plot_depth_heatmap([r for r in records if r.suite == "ruler"], path, title="accuracy by needle depth")
        written.append(path)
    if any(r.suite == "harness" for r in overall):
        path = os.path.join(target, "harness.png")
        plot_harness(overall, path)
        written.append(path)
    return written
