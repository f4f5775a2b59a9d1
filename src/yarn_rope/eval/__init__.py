"""Evaluation: sliding-window and truncated perplexity, passkey retrieval, method comparisons.

``perplexity`` and ``passkey`` follow the YaRN paper's evaluation (section 4.3); results are
dataclasses with ``to_dict()``. The offline defaults (SmolLM2-135M-Instruct and standard-library sources)
live in :mod:`yarn_rope.eval.data`.
"""

from __future__ import annotations

from .compare import MethodResult, compare_perplexity
from .data import DEFAULT_MODEL_NAME, default_corpus, default_model_file, load_default_model
from .passkey import PasskeyResult, PasskeyTrial, passkey
from .perplexity import DocumentNLL, LengthResult, PerplexityResult, perplexity, token_nll

__all__ = [
    "DEFAULT_MODEL_NAME",
    "DocumentNLL",
    "LengthResult",
    "MethodResult",
    "PasskeyResult",
    "PasskeyTrial",
    "PerplexityResult",
    "compare_perplexity",
    "default_corpus",
    "default_model_file",
    "load_default_model",
    "passkey",
    "perplexity",
    "token_nll",
]
