"""Evaluation: perplexity, passkey retrieval, RULER-style tasks, lm-evaluation-harness, reports.

``perplexity`` and ``passkey`` follow the YaRN paper's evaluation (section 4.3); ``ruler`` runs
RULER-style synthetic long-context tasks (Hsieh et al. 2024); ``harness`` scores short-context
benchmarks through lm-evaluation-harness (the model cards' second table). Results are dataclasses
with ``to_dict()`` and ``records()``: every evaluation writes the same :class:`EvalRecord` s,
which :func:`render_markdown` turns into one report. The offline defaults (SmolLM2-135M-Instruct
and standard-library sources) live in :mod:`yarn_rope.eval.data`.
"""

from __future__ import annotations

from .compare import MethodResult, compare_perplexity
from .data import DEFAULT_MODEL_NAME, default_corpus, default_model_file, load_default_model
from .harness import HarnessResult, compare_harness, harness
from .passkey import PasskeyResult, PasskeyTrial, passkey
from .perplexity import DocumentNLL, LengthResult, PerplexityResult, perplexity, token_nll
from .report import render_markdown
from .results import EvalRecord, load_records, write_records
from .ruler import RulerResult, RulerTrial, ruler

__all__ = [
    "DEFAULT_MODEL_NAME",
    "DocumentNLL",
    "EvalRecord",
    "HarnessResult",
    "LengthResult",
    "MethodResult",
    "PasskeyResult",
    "PasskeyTrial",
    "PerplexityResult",
    "RulerResult",
    "RulerTrial",
    "compare_harness",
    "compare_perplexity",
    "default_corpus",
    "default_model_file",
    "harness",
    "load_default_model",
    "load_records",
    "passkey",
    "perplexity",
    "render_markdown",
    "ruler",
    "token_nll",
    "write_records",
]
