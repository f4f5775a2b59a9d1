"""Llama 3.1's scaling: wavelengths below L / high_freq_factor unchanged, beyond L / low_freq_factor
divided by the factor, a ramp in between."""

from __future__ import annotations

from typing import Any

from .. import frequencies as F
from . import register
from . import spec as S
from .gguf import ROPE_FREQS_TENSOR, ROPE_FREQS_TOLERANCE, rope_freqs_difference
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


_LLAMACPP_LLAMA3 = (
    "llama3 needs no flag: llama.cpp divides each pair's angle by the GGUF tensor rope_freqs.weight (ggml's "
    "rope: theta / freq_factor), which convert_hf_to_gguf.py writes from rope_scaling llama3 as this table's "
    "ratio to plain RoPE"
)


def _llamacpp_llama3(s: Settings, model: S.ServeModel) -> S.EngineSettings:
    """No keys: the table is in the converted file's ``rope_freqs`` tensor, checked when it is known."""
    if not model.from_gguf:
        return S.EngineSettings(
            {}, notes=(_LLAMACPP_LLAMA3 + "; a GGUF file without that tensor serves plain RoPE",)
        )
    if model.rope_freqs is None:
        raise ValueError(
            f"llama.cpp applies llama3 scaling only through a {ROPE_FREQS_TENSOR} tensor, and this GGUF "
            "file has none: it would serve plain RoPE, and no flag or metadata key spells llama3 (yarn_rope "
            "does not add tensors); convert the checkpoint with convert_hf_to_gguf.py, which writes it from "
            "rope_scaling llama3"
        )
    base = model.rope_theta if model.rope_theta is not None else 10000.0  # llama.cpp's default base
    difference = rope_freqs_difference(model.rope_freqs, base, s)
    if difference > ROPE_FREQS_TOLERANCE:
        raise ValueError(
            f"the GGUF file's {ROPE_FREQS_TENSOR} tensor is not this llama3 table (factor={s['factor']:g}, "
            f"original={s['original_max_position_embeddings']}, low_freq_factor={s['low_freq_factor']:g}, "
            f"high_freq_factor={s['high_freq_factor']:g}; largest relative difference {difference:.3g}): "
            "llama.cpp applies the file's, whatever the flags; export the file's own settings"
        )
    return S.EngineSettings({}, notes=(_LLAMACPP_LLAMA3 + "; the file's tensor matches",))


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
            "llama.cpp": S.EngineSpelling(_llamacpp_llama3, S._exact),
        },
    )
)
