"""Evaluation helpers: the default model and corpora (perplexity and passkey build on them)."""

from __future__ import annotations

from .data import DEFAULT_MODEL_NAME, default_model_file, load_default_model

__all__ = ["DEFAULT_MODEL_NAME", "default_model_file", "load_default_model"]
