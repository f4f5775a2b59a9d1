"""Short-context quality through EleutherAI's lm-evaluation-harness, base model vs extended.

Every YaRN model card has a table of short-context benchmarks next to the long-context one,
showing what the extension cost: ARC-Challenge 25-shot, HellaSwag 10-shot, MMLU 5-shot and
TruthfulQA (mc2) 0-shot, the settings of the authors' ``eval-harness.sh`` (jquesnelle/yarn). This
module runs those tasks, or any task lm-eval knows (including local ones from an
``include_path`` folder of task YAML files), on the model object as it is, patched by yarn_rope
or not: the model is handed to lm-eval's ``HFLM(pretrained=model, tokenizer=tokenizer)`` and
scored with ``lm_eval.simple_evaluate``; the harness's own metrics and standard errors are
reported unchanged.

Reported metric per task (``PRIMARY_METRIC``): ``acc_norm`` for ARC-Challenge and HellaSwag,
``acc`` for MMLU and TruthfulQA mc2 (the Open LLM Leaderboard's choice, which the YaRN model
cards follow); for other tasks ``acc_norm`` when the harness reports it, else ``acc``, else its
first metric. Every other metric is kept too.

Datasets come from the Hugging Face Hub the first time (then from its local cache). When neither
is available, :func:`load_tasks` raises :class:`HarnessDataUnavailable` naming the task, before
any model is needed. The harness needs the ``lm-eval`` package: ``pip install 'yarn-rope[harness]'``.

Global random state is left alone (lm-eval would otherwise reseed Python, NumPy and torch); the
few-shot examples come from lm-eval's own seeded sampler (``fewshot_seed``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .. import _compat
from .results import EvalRecord, label_for

__all__ = [
    "AUTHORS_FEWSHOT",
    "DEFAULT_TASKS",
    "PRIMARY_METRIC",
    "HarnessDataUnavailable",
    "HarnessResult",
    "HarnessTasks",
    "TaskScore",
    "compare_harness",
    "harness",
    "load_tasks",
]

logger = logging.getLogger(__name__)

# The authors' eval-harness.sh (jquesnelle/yarn): few-shot count per task.
AUTHORS_FEWSHOT: dict[str, int] = {"arc_challenge": 25, "hellaswag": 10, "truthfulqa_mc2": 0, "mmlu": 5}
DEFAULT_TASKS = ("arc_challenge", "mmlu", "truthfulqa_mc2", "hellaswag")
PRIMARY_METRIC: dict[str, str] = {
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "mmlu": "acc",
    "truthfulqa_mc2": "acc",
}
_INSTALL = "pip install 'yarn-rope[harness]'"


class HarnessDataUnavailable(ConnectionError):
    """A task's dataset is neither reachable on the Hub nor in the local cache."""


def _require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ImportError(f"the harness evaluation needs lm-evaluation-harness: {_INSTALL}")


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm-eval")
    except PackageNotFoundError:
        return "unknown"


@dataclasses.dataclass(frozen=True)
class HarnessTasks:
    """Tasks loaded by :func:`load_tasks`, datasets included, ready to be scored repeatedly.

    Attributes:
        names: the requested task or group names, in order.
        num_fewshot: few-shot examples per name.
        objects: lm-eval's ``Task`` or ``Group`` object per name.
        leaves: per name, the names of the leaf tasks it runs (a group has many).
        task_manager: the lm-eval ``TaskManager`` that built them.
    """

    names: tuple[str, ...]
    num_fewshot: dict[str, int]
    objects: dict[str, Any]
    leaves: dict[str, tuple[str, ...]]
    task_manager: Any


def _check_fewshot(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where} must be a whole number >= 0, got {value!r}")
    return value


def _fewshot_counts(names: list[str], num_fewshot: int | Mapping[str, int] | None) -> dict[str, int]:
    """The few-shot count chosen per name (absent: the task's own default, see :func:`load_tasks`)."""
    shots: dict[str, int] = {}
    for name in names:
        if isinstance(num_fewshot, Mapping):
            chosen = num_fewshot.get(name, AUTHORS_FEWSHOT.get(name))
        else:
            chosen = num_fewshot if num_fewshot is not None else AUTHORS_FEWSHOT.get(name)
        if chosen is not None:
            shots[name] = _check_fewshot(chosen, f"num_fewshot for {name}")
    if isinstance(num_fewshot, Mapping):
        extra = sorted(set(num_fewshot) - set(names))
        if extra:
            raise ValueError(f"num_fewshot names task(s) {extra} that are not among the tasks {names}")
    return shots


def _include_folders(
    include_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
) -> list[str]:
    if include_path is None:
        return []
    paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    for path in paths:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"include_path {os.fspath(path)} is not a folder of task YAML files")
    return [os.fspath(path) for path in paths]


def _check_known(names: list[str], known: set[str]) -> None:
    unknown = [name for name in names if name not in known]
    if unknown:
        import difflib

        hints = [difflib.get_close_matches(name, known, n=3) for name in unknown]
        said = "; ".join(
            f"{name!r}" + (f" (did you mean {', '.join(hint)}?)" if hint else "")
            for name, hint in zip(unknown, hints, strict=True)
        )
        raise ValueError(f"lm-eval knows no task {said}; local tasks need include_path= (--include-path)")


def _hub_reachable(timeout: float = 1.5) -> bool:
    """Whether a TCP connection to the Hugging Face Hub's host opens within ``timeout`` seconds.

    One short try, so that an offline machine is recognised at once instead of after the Hub
    client's retries (about 50 s of warnings for lm-eval's default tasks).
    """
    import socket
    from urllib.parse import urlsplit

    endpoint = urlsplit(_compat.hub_endpoint())
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_access() -> Iterator[bool]:
    """Offline mode for the block when the Hub cannot be reached; yields whether it is offline."""
    if _compat.hub_offline_mode():
        yield True
    elif _hub_reachable():
        yield False
    else:
        logger.info(
            "the Hugging Face Hub (%s) is unreachable: datasets come from the local cache only",
            _compat.hub_endpoint(),
        )
        with _compat.hub_offline():
            yield True


def _load_one(manager: Any, name: str, count: int | None) -> tuple[Any, dict[str, Any], int]:
    """``(task or group, its leaf tasks, few-shot count)`` of one name, the datasets loaded."""
    try:
        loaded = manager.load([name])
    except ConnectionError as error:
        lines = str(error).strip().splitlines()
        reason = lines[0] if lines else type(error).__name__
        raise HarnessDataUnavailable(
            f"the dataset of task {name} is not in the local cache and the Hugging Face Hub "
            f"({_compat.hub_endpoint()}) is unreachable ({reason}); run once with network access, "
            "or evaluate a local task (include_path= / --include-path)"
        ) from None
    if name in loaded["groups"]:
        found = loaded["groups"][name]
    elif name in loaded["tasks"]:
        found = loaded["tasks"][name]
    else:
        raise ValueError(
            f"{name} is a tag of several lm-eval tasks ({', '.join(loaded['tasks'])}): name those tasks"
        )
    for task in loaded["tasks"].values():
        if count is None:  # the task's own default, 0 where it has none (as lm-eval does)
            own = task.get_config("num_fewshot")
            count = 0 if own is None else int(own)
        task.set_config(key="num_fewshot", value=count)
    return found, loaded["tasks"], 0 if count is None else count


def load_tasks(
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    *,
    num_fewshot: int | Mapping[str, int] | None = None,
    include_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
) -> HarnessTasks:
    """Find the tasks in lm-eval's registry (plus ``include_path``) and load their datasets.

    When the Hugging Face Hub cannot be reached (one connection attempt of at most 1.5 s), the
    datasets are read from the local cache only, as with ``HF_HUB_OFFLINE=1``: no retries, and a
    dataset missing from the cache is reported at once.

    Args:
        tasks: task or group names (``"arc_challenge"``, ``"mmlu"``, or a local task's name).
        num_fewshot: one count for every task, a ``{task: count}`` mapping that overrides some,
            or ``None``: :data:`AUTHORS_FEWSHOT` for the four model-card tasks, the task's own
            default (else 0) for others.
        include_path: folder(s) of task YAML files, e.g. a local task on a JSON dataset
            (``dataset_path: json``, ``dataset_kwargs: {data_files: ...}``).

    Returns:
        :class:`HarnessTasks`.

    Raises:
        ImportError: lm-eval is missing (``pip install 'yarn-rope[harness]'``).
        ValueError: an unknown task name, a repeated one, or a bad few-shot count.
        FileNotFoundError: an ``include_path`` folder does not exist.
        HarnessDataUnavailable: a dataset is neither on a reachable Hub nor in the local cache.
    """
    _require_lm_eval()
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"tasks must name at least one lm-eval task, got {tasks!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"tasks must not repeat, got {names!r}")
    shots = _fewshot_counts(names, num_fewshot)
    folders = _include_folders(include_path)

    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=folders or None)
    _check_known(names, set(manager.all_tasks))
    objects: dict[str, Any] = {}
    leaves: dict[str, tuple[str, ...]] = {}
    with _hub_access():
        for name in names:
            objects[name], leaf_tasks, shots[name] = _load_one(manager, name, shots.get(name))
            leaves[name] = tuple(leaf_tasks)
    return HarnessTasks(
        names=tuple(names), num_fewshot=shots, objects=objects, leaves=leaves, task_manager=manager
    )


@dataclasses.dataclass(frozen=True)
class TaskScore:
    """One metric of one task, as the harness reported it.

    Attributes:
        task: the task or group name.
        metric: the metric (``"acc"``, ``"acc_norm"``; ``"name (filter)"`` for filtered ones).
        value: the harness's value (fractions 0..1 for accuracies).
        stderr: the harness's standard error, ``None`` where it gave none.
        num_fewshot: few-shot examples in each prompt.
        samples: examples scored (summed over a group's tasks).
        primary: whether this is the metric the model-card table shows for the task.
    """

    task: str
    metric: str
    value: float
    stderr: float | None
    num_fewshot: int
    samples: int | None
    primary: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class HarnessResult:
    """The harness's scores of one model state (unpatched or one scaling method).

    Attributes:
        scores: every metric of every task.
        method: ``"none"`` for the unpatched model, else the scaling method.
        label: the column name (``"plain RoPE"``, ``"yarn x2"``).
        scaling: ``RopeScaling.to_dict()`` of the patch in force, ``None`` when unpatched.
        limit: lm-eval's ``limit`` (examples per task), ``None`` for all.
        lm_eval: the lm-eval version that scored it.
    """

    scores: tuple[TaskScore, ...]
    method: str = "none"
    label: str = "plain RoPE"
    scaling: dict[str, Any] | None = None
    limit: int | float | None = None
    lm_eval: str = ""

    def score(self, task: str, metric: str | None = None) -> TaskScore:
        """The score of ``task`` for ``metric`` (default: its primary metric).

        Raises:
            KeyError: no such task or metric.
        """
        for entry in self.scores:
            if entry.task == task and (entry.metric == metric if metric else entry.primary):
                return entry
        raise KeyError(f"no score for task {task!r}, metric {metric or 'primary'!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "label": self.label,
            "scaling": self.scaling,
            "limit": self.limit,
            "lm_eval": self.lm_eval,
            "scores": [entry.to_dict() for entry in self.scores],
        }

    def records(self, *, model: str = "") -> list[EvalRecord]:
        """One :class:`~yarn_rope.eval.results.EvalRecord` per task and metric (suite
        ``"harness"``, no length); ``details`` holds the few-shot count, ``primary``, ``limit``
        and the lm-eval version."""
        return [
            EvalRecord(
                suite="harness",
                task=entry.task,
                metric=entry.metric,
                value=entry.value,
                model=model,
                method=self.method,
                label=self.label,
                settings=self.scaling,
                stderr=entry.stderr,
                samples=entry.samples,
                details={
                    "num_fewshot": entry.num_fewshot,
                    "primary": entry.primary,
                    "limit": self.limit,
                    "lm_eval": self.lm_eval,
                },
            )
            for entry in self.scores
        ]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _scores(output: dict[str, Any], loaded: HarnessTasks) -> tuple[TaskScore, ...]:
    """The harness's ``results`` dict turned into :class:`TaskScore` s, requested names only."""
    scores: list[TaskScore] = []
    configs = output.get("configs", {})
    counts = output.get("n-samples", {})
    for name in loaded.names:
        reported = output["results"].get(name, {})
        metrics: list[tuple[str, float, float | None]] = []
        for key, raw in reported.items():
            if "," not in key or key.split(",")[0].endswith("_stderr"):
                continue
            metric, kind = key.split(",", 1)
            value = _number(raw)
            if value is None:
                continue
            stderr = _number(reported.get(f"{metric}_stderr,{kind}"))
            metrics.append((metric if kind == "none" else f"{metric} ({kind})", value, stderr))
        if not metrics:
            raise ValueError(f"lm-eval reported no metric for task {name}: {sorted(reported)}")
        found = [metric for metric, _, _ in metrics]
        primary = PRIMARY_METRIC.get(name)
        if primary not in found:
            primary = next((m for m in ("acc_norm", "acc") if m in found), found[0])
        leaf_counts = [counts.get(leaf, {}).get("effective") for leaf in loaded.leaves[name]]
        samples = (
            sum(int(c) for c in leaf_counts if c is not None)
            if any(c is not None for c in leaf_counts)
            else None
        )
        shots = {configs.get(leaf, {}).get("num_fewshot") for leaf in loaded.leaves[name]}
        shots.discard(None)
        num_fewshot = int(shots.pop()) if len(shots) == 1 else loaded.num_fewshot[name]
        scores.extend(
            TaskScore(name, metric, value, stderr, num_fewshot, samples, metric == primary)
            for metric, value, stderr in metrics
        )
    return tuple(scores)


@contextlib.contextmanager
def _quiet_lm_eval(enabled: bool) -> Any:
    """lm-eval's INFO/WARNING chatter lowered to ERROR while it runs (library code configures no
    handlers; this only raises the threshold of lm-eval's own logger and restores it)."""
    target = logging.getLogger("lm_eval")
    level = target.level
    if enabled:
        target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)


def _model_class(bars: bool) -> Any:
    """lm-eval's ``HFLM``; without ``bars``, a subclass whose scoring calls show no bars."""
    from lm_eval.models.huggingface import HFLM

    if bars:
        return HFLM

    class QuietHFLM(HFLM):  # type: ignore[misc]
        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return super().loglikelihood(requests, disable_tqdm=True)  # type: ignore[no-any-return]

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            return super().loglikelihood_rolling(requests, disable_tqdm=True)  # type: ignore[no-any-return]

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            return super().generate_until(requests, disable_tqdm=True)  # type: ignore[no-any-return]

    return QuietHFLM


def harness(
    model: Any,
    tokenizer: Any,
    *,
    tasks: str | Sequence[str] | HarnessTasks = DEFAULT_TASKS,
    num_fewshot: int | Mapping[str, int] | None = None,
    limit: int | float | None = None,
    include_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    batch_size: int = 1,
    method: str | None = None,
    label: str | None = None,
    quiet: bool = True,
    progress: bool | None = None,
) -> HarnessResult:
    """Score ``model`` as it is (patched or not) on lm-evaluation-harness tasks.

    Args:
        model: a transformers causal LM.
        tokenizer: its tokenizer.
        tasks: task names (see :func:`load_tasks`) or tasks already loaded by it.
        num_fewshot: few-shot counts (see :func:`load_tasks`); only with task names.
        limit: examples per task (lm-eval's ``limit``; below 1 a fraction), ``None`` for all.
        include_path: folder(s) of local task YAML files; only with task names.
        batch_size: lm-eval's batch size.
        method: the method's name in the result (default: the patch in force, else ``"none"``).
        label: its column name (default: :func:`~yarn_rope.eval.results.label_for`).
        quiet: lower lm-eval's logging to errors while it runs.
        progress: lm-eval's own progress bars (``None``: only when standard error is a terminal,
            as every bar of this library; ``False``: none, building the prompts included).

    Returns:
        :class:`HarnessResult`.

    Raises:
        ImportError: lm-eval is missing.
        ValueError: bad tasks, few-shot counts, limit or batch size.
        HarnessDataUnavailable: a dataset cannot be obtained (see :func:`load_tasks`).
    """
    _require_lm_eval()
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise ValueError(
            f"limit must be a positive number of examples (or a fraction below 1), got {limit!r}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive whole number, got {batch_size!r}")
    if isinstance(tasks, HarnessTasks):
        if num_fewshot is not None or include_path is not None:
            raise ValueError(
                "num_fewshot and include_path belong to load_tasks() when tasks are already loaded"
            )
        loaded = tasks
    else:
        loaded = load_tasks(tasks, num_fewshot=num_fewshot, include_path=include_path)
    import lm_eval

    from ..patch import patch_info

    info = patch_info(model)
    settings = None if info is None else info.scaling.to_dict()
    bars = sys.stderr.isatty() if progress is None else bool(progress)
    with _quiet_lm_eval(quiet), _compat.lm_eval_output(bars):
        wrapped = _model_class(bars)(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = lm_eval.simple_evaluate(
            model=wrapped,
            tasks=[loaded.objects[name] for name in loaded.names],
            task_manager=loaded.task_manager,
            limit=limit,
            log_samples=False,
            random_seed=None,
            numpy_random_seed=None,
            torch_random_seed=None,
        )
    if output is None:  # only a non-zero rank of a distributed run gets None
        raise RuntimeError("lm-eval returned no results (a non-zero rank of a distributed run)")
    return HarnessResult(
        scores=_scores(output, loaded),
        method=method or (str(settings["method"]) if settings else "none"),
        label=label or label_for(settings),
        scaling=settings,
        limit=limit,
        lm_eval=_lm_eval_version(),
    )


def compare_harness(
    model: Any,
    tokenizer: Any,
    *,
    methods: Sequence[str],
    factor: float,
    original_max_position_embeddings: int,
    tasks: str | Sequence[str] | HarnessTasks = DEFAULT_TASKS,
    num_fewshot: int | Mapping[str, int] | None = None,
    limit: int | float | None = None,
    include_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    batch_size: int = 1,
    quiet: bool = True,
    progress: bool | None = None,
) -> list[HarnessResult]:
    """:func:`harness` on the unpatched model, then under each method: the model card's table.

    The unpatched model always comes first (``"none"`` in ``methods`` is not repeated); the
    others are applied with :func:`yarn_rope.patched` at ``factor`` over
    ``original_max_position_embeddings`` (see :func:`yarn_rope.eval.compare.scaling_for`). Datasets
    are loaded once. A patch the caller had applied is in force again afterwards.

    Returns:
        One :class:`HarnessResult` per column, the unpatched model first.
    """
    from ..patch import unpatched
    from .compare import applied, scaling_for

    if isinstance(tasks, HarnessTasks):
        if num_fewshot is not None or include_path is not None:
            raise ValueError(
                "num_fewshot and include_path belong to load_tasks() when tasks are already loaded"
            )
        loaded = tasks
    else:
        loaded = load_tasks(tasks, num_fewshot=num_fewshot, include_path=include_path)
    columns = ["none", *(method for method in methods if method != "none")]
    results = []
    with unpatched(model):
        for method in columns:
            scaling = scaling_for(
                method, factor=factor, original_max_position_embeddings=original_max_position_embeddings
            )
            logger.info("harness under %s", method)
            with applied(model, scaling):
                results.append(
                    harness(
                        model,
                        tokenizer,
                        tasks=loaded,
                        limit=limit,
                        batch_size=batch_size,
                        method=method,
                        quiet=quiet,
                        progress=progress,
                    )
                )
    return results
