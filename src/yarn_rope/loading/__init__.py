"""Open YaRN checkpoints faithfully with native transformers classes, never running their code.

The published YaRN checkpoints (NousResearch Yarn-Llama-2 7b/13b/70b, Yarn-Mistral-7b,
Yarn-Solar-10b) name the authors' modeling files in ``auto_map`` and tell users to pass
``trust_remote_code=True``. Those files no longer import on current transformers, and running
downloaded code is a risk in itself. Their weights use plain Llama/Mistral names, so
:func:`from_pretrained` builds the native class with plain RoPE and puts the exact table in with
:func:`yarn_rope.patch`, using the settings the checkpoint was *trained* with:

* the authors' Llama code (``modeling_llama_yarn``, ``modeling_llama_together_yarn``): betas 32/1,
  attention scaling ``0.1 ln(s) + 1``;
* the authors' Mistral code (``modeling_mistral_yarn``): betas 128/2 and ``0.07 ln(s) + 1``,
  which it never reads from the config; vanilla transformers opens these checkpoints with 32/1
  and 0.1 without a word;
* values the config states explicitly win over those defaults; an unknown modeling file gets the
  config's values and a warning.

A newcomer reads it in this order: ``hardware`` (which dtype and attention kernel, and why),
``checkpoint`` (config, shards and weight sizes, read before any weight), ``plan`` (what the
checkpoint declares and what will be done: :func:`plan_load`), ``model`` (carrying the plan
out: :func:`from_pretrained`). GGUF files are read by :mod:`yarn_rope.gguf`.
"""

from __future__ import annotations

from .hardware import FLASH_EXTRA, choose_attention, choose_dtype
from .model import from_pretrained
from .plan import CODE_FAMILIES, CodeFamily, LoadPlan, plan_load

__all__ = [
    "CODE_FAMILIES",
    "FLASH_EXTRA",
    "CodeFamily",
    "LoadPlan",
    "choose_attention",
    "choose_dtype",
    "from_pretrained",
    "plan_load",
]
