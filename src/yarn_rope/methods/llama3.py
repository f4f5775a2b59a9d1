"""Llama 3.1's scaling: wavelengths below L / high_freq_factor unchanged, beyond L / low_freq_factor
divided by the factor, a ramp in between."""

from __future__ import annotations

from typing import Any

from .. import frequencies as F
from . import register
from . import spec as S
from .settings import Settings


def _check_llama3(values: dict[str, Any]) -> None:
    low, high = values["low_freq_factor"], values["high_freq_factor"]
    if low is not None and high is not None and high <= low:
        raise ValueError(
            f"high_freq_factor must be > low_freq_factor, got high_freq_factor={high!r}, "
            f"low_freq_factor={low!r}; Llama 3.1 uses low_freq_factor=1, high_freq_factor=4"
        )


def _write_llama3(s: Settings) -> dict[str, Any]:
    return {
        "rope_type": "llama3",
        "factor": s["factor"],
        "original_max_position_embeddings": s["original_max_position_embeddings"],
        "low_freq_factor": s["low_freq_factor"],
        "high_freq_factor": s["high_freq_factor"],
    }


def _llama3(s: Settings, model: S.ServeModel) -> S.EngineSettings:
    return S.EngineSettings(_write_llama3(s))


def _llamacpp_llama3_loses(s: Settings) -> str | None:
    return (
        "llama.cpp applies llama3 scaling through a rope_freqs tensor that convert_hf_to_gguf.py writes "
        "into the GGUF file; no flag or metadata key spells it, and yarn_rope does not add tensors"
    )


def _llama3_closest(s: Settings, context: int | None) -> tuple[tuple[str, dict[str, Any]], ...]:
    # Llama 3.1 keeps wavelengths below L / high_freq_factor and divides those beyond L / low_freq_factor:
    # YaRN's ramp between pairs turning beta_fast = high and beta_slow = low times over L, without
    # attention scaling (its ramp is linear in the pair index, llama3's in the rotation count).
    return (
        (
            "yarn",
            {
                "factor": s["factor"],
                "original_max_position_embeddings": s["original_max_position_embeddings"],
                "beta_fast": s["high_freq_factor"],
                "beta_slow": s["low_freq_factor"],
                "attention_factor": 1.0,
            },
        ),
    )


register(
    S.MethodSpec(
        name="llama3",
        summary="Llama 3.1: wavelength bounds L/high_freq_factor and L/low_freq_factor, ramp in between",
        reference="Meta Llama 3.1 (2024), apply_scaling",
        table=S._static(
            F.llama3_inv_freq,
            "factor",
            "original_max_position_embeddings",
            "low_freq_factor",
            "high_freq_factor",
        ),
        settings=("low_freq_factor", "high_freq_factor"),
        required=("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
        check=_check_llama3,
        states_target=False,
        defaults={"low_freq_factor": 1.0, "high_freq_factor": 4.0},
        transformers=S.TransformersSpelling("llama3", exact=S._ALL_RELEASES, write=_write_llama3),
        engines={
            "vllm": S.EngineSpelling(_llama3, S._exact),
            "sglang": S.EngineSpelling(_llama3, S._exact),
            "llama.cpp": S.EngineSpelling(None, _llamacpp_llama3_loses, _llama3_closest),
        },
    )
)
