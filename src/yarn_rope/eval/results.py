"""One result format for every evaluation: flat, versioned JSON records.

Perplexity, passkey retrieval, the RULER-style tasks and lm-evaluation-harness scores all come out
as :class:`EvalRecord` lists (each result dataclass has ``records(model=...)``). A record holds one
number and everything needed to put it in a table next to numbers from other runs::

    {"suite": "ruler", "task": "niah_single", "metric": "accuracy", "value": 0.5,
     "stderr": 0.5, "samples": 2, "length": 8192, "depth": null,
     "model": "SmolLM2-135M-Instruct", "method": "yarn", "label": "yarn x2",
     "settings": {...RopeScaling.to_dict()...} or null for the unpatched model,
     "details": {...}, "yarn_rope": "0.1.0", "transformers": "5.23.0"}

A results file is a JSON list of such objects. :func:`write_records` writes it atomically (a
temporary file in the same folder, then ``os.replace``), :func:`load_records` reads and validates
one; :mod:`yarn_rope.eval.report` turns several files into one Markdown table and plots.

The files are strict JSON (no ``NaN`` or ``Infinity`` literals, which strict parsers reject): a
non-finite ``value``, or a non-finite number anywhere in ``details``, is written as the string
``"nan"``, ``"inf"`` or ``"-inf"`` and read back as that float; a non-finite ``stderr`` is
written as ``null`` (no estimate).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .._files import from_strict_json, strict_json, write_json

__all__ = [
    "SUITES",
    "EvalRecord",
    "label_for",
    "load_records",
    "mean_stderr",
    "write_records",
]

SUITES = ("perplexity", "passkey", "ruler", "harness")


def _installed_version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:  # a source tree that was not installed
        return "0+unknown"


def _transformers_version() -> str:
    return _installed_version("transformers")


def _yarn_rope_version() -> str:
    return _installed_version("yarn-rope")


def label_for(settings: dict[str, Any] | None) -> str:
    """The column name of a method in tables and plots: ``"plain RoPE"``, ``"yarn x2"``, ...

    Args:
        settings: ``RopeScaling.to_dict()`` of the patch, or ``None`` for the unpatched model.
    """
    if settings is None or settings.get("method") in (None, "none"):
        return "plain RoPE"
    method = str(settings["method"])
    factor = settings.get("factor")
    from ..methods import lookup_rope_type

    spec = lookup_rope_type(method)
    follows = spec.factor_follows_length if spec is not None else None
    if follows is not None and follows(settings):  # the stated factor is not the one in force
        return method
    return method if factor is None else f"{method} x{float(factor):g}"


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean, ``sqrt(sample variance / n)`` (ddof 1), as lm-eval reports it.

    Returns ``None`` for fewer than two values.
    """
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return math.sqrt(variance / n)


@dataclasses.dataclass(frozen=True)
class EvalRecord:
    """One measured number with what it was measured on.

    Attributes:
        suite: ``"perplexity"``, ``"passkey"``, ``"ruler"`` or ``"harness"``.
        task: what was measured within the suite (``"niah_single"``, ``"arc_challenge"``; for
            perplexity the mode, ``"truncate"`` or ``"sliding"``; ``"passkey"`` for passkey).
        metric: ``"perplexity"``, ``"accuracy"``, ``"acc"``, ``"acc_norm"``, ...
        value: the number (accuracies as fractions 0..1).
        model: the model's name as the caller gave it.
        method: the scaling method (``"none"`` for the unpatched model).
        label: the method's column name (see :func:`label_for`).
        settings: ``RopeScaling.to_dict()`` of the patch in force, ``None`` when unpatched.
        length: context or prompt length in tokens, ``None`` for short-context benchmarks.
        depth: for per-depth RULER records, where the needle sat (0 start .. 1 end); else ``None``.
        stderr: standard error of ``value`` where there is one (the harness's own; the standard
            error of the mean over trials for passkey and RULER), else ``None``.
        samples: how many trials, examples or scored tokens ``value`` averages over.
        details: anything else worth keeping (nll, stride, few-shot count, ...); JSON values.
        yarn_rope: version of yarn_rope that measured it.
        transformers: version of transformers that ran the model.
    """

    suite: str
    task: str
    metric: str
    value: float
    model: str = ""
    method: str = "none"
    label: str = "plain RoPE"
    settings: dict[str, Any] | None = None
    length: int | None = None
    depth: float | None = None
    stderr: float | None = None
    samples: int | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    yarn_rope: str = dataclasses.field(default_factory=_yarn_rope_version)
    transformers: str = dataclasses.field(default_factory=_transformers_version)

    def __post_init__(self) -> None:
        for name in ("suite", "task", "metric", "model", "method", "label", "yarn_rope", "transformers"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"EvalRecord.{name} must be a string, got {getattr(self, name)!r}")
        for name in ("suite", "task", "metric"):
            if not getattr(self, name):
                raise ValueError(f"EvalRecord.{name} must not be empty")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
            raise TypeError(f"EvalRecord.value must be a number, got {self.value!r}")
        for name in ("length", "samples"):
            field = getattr(self, name)
            if field is not None and (isinstance(field, bool) or not isinstance(field, int) or field < 0):
                raise ValueError(f"EvalRecord.{name} must be a whole number >= 0 or None, got {field!r}")
        for name in ("depth", "stderr"):
            field = getattr(self, name)
            if field is not None and (isinstance(field, bool) or not isinstance(field, (int, float))):
                raise TypeError(f"EvalRecord.{name} must be a number or None, got {field!r}")
        if self.depth is not None and not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"EvalRecord.depth must lie in [0, 1], got {self.depth!r}")
        if self.settings is not None and not isinstance(self.settings, dict):
            raise TypeError(f"EvalRecord.settings must be a dict or None, got {self.settings!r}")
        if not isinstance(self.details, dict):
            raise TypeError(f"EvalRecord.details must be a dict, got {self.details!r}")

    @property
    def key(self) -> tuple[str, str, str, int | None, float | None]:
        """``(suite, task, metric, length, depth)``: what a table row is made of."""
        return (self.suite, self.task, self.metric, self.length, self.depth)

    def to_dict(self) -> dict[str, Any]:
        """Every field, as strict JSON values: a non-finite ``stderr`` as ``None``, other non-finite
        numbers (``value``, inside ``details``) as ``"nan"``, ``"inf"`` or ``"-inf"``."""
        out = dataclasses.asdict(self)
        if out["stderr"] is not None and not math.isfinite(out["stderr"]):
            out["stderr"] = None
        return dict(strict_json(out))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalRecord:
        """The record :meth:`to_dict` wrote.

        Raises:
            ValueError, TypeError: a missing or malformed field (the message names it).
        """
        if not isinstance(data, dict):
            raise TypeError(f"a record must be a JSON object, got {type(data).__name__}")
        names = {field.name for field in dataclasses.fields(cls)}
        missing = [name for name in ("suite", "task", "metric", "value") if name not in data]
        if missing:
            raise ValueError(f"record lacks the field(s) {', '.join(missing)}")
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"record has unknown field(s) {', '.join(unknown)}")
        values = dict(data)
        if isinstance(values["value"], str):  # "nan" / "inf" written by to_dict
            try:
                values["value"] = float(values["value"])
            except ValueError:
                raise TypeError(f"EvalRecord.value must be a number, got {data['value']!r}") from None
        if isinstance(values.get("details"), dict):
            values["details"] = from_strict_json(values["details"])
        return cls(**values)


def write_records(records: Iterable[EvalRecord], path: str | os.PathLike[str]) -> None:
    """Write ``records`` as a strict JSON list to ``path``, atomically (never a half-written file).

    Raises:
        TypeError: an item is not an :class:`EvalRecord`, or ``details`` holds a value JSON cannot.
        OSError: the folder is missing or not writable.
    """
    items = list(records)
    for index, record in enumerate(items):
        if not isinstance(record, EvalRecord):
            raise TypeError(f"item {index} is {type(record).__name__}, not an EvalRecord")
    write_json(path, [record.to_dict() for record in items])


def load_records(path: str | os.PathLike[str]) -> list[EvalRecord]:
    """The records of one results file written by :func:`write_records` (or ``--json``).

    Raises:
        FileNotFoundError: ``path`` cannot be read.
        ValueError: not UTF-8 text, not JSON, JSON nested too deeply to be a results file, not a
            list, or a malformed record (the message names the file, and the record's index).
    """
    target = os.fspath(path)
    try:
        with open(target, "rb") as stream:
            raw = stream.read()
    except OSError as error:
        raise FileNotFoundError(f"cannot read results file {target}: {error.strerror}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{target} is not a results file: byte {error.start} is not UTF-8 text ({error.reason}); "
            "results files are the JSON written by --json"
        ) from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{target} is not JSON ({error.msg} at line {error.lineno})") from None
    except RecursionError:
        raise ValueError(
            f"{target} is not a results file: its JSON is nested too deeply to read (a results file "
            "is a flat list of records)"
        ) from None
    if not isinstance(data, list):
        raise ValueError(f"{target} holds a JSON {type(data).__name__}, not a list of records")
    records = []
    for index, item in enumerate(data):
        try:
            records.append(EvalRecord.from_dict(item))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{target}, record {index}: {error}") from None
        except RecursionError:
            raise ValueError(f"{target}, record {index}: nested too deeply to be a record") from None
    return records
