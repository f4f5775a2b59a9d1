"""NTK-aware scaling and its relatives: ``ntk`` (a new base), ``ntk-by-parts`` (the authors' two
ramps) and ``dynamic-ntk`` (the base grown with the sequence length)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

from .. import frequencies as F
from . import register
from . import spec as S
from .settings import Settings


def _dynamic_ntk_threshold(s: Settings) -> int | None:
    original: int | None = s["original_max_position_embeddings"]
    return original


def _dynamic_ntk_key(s: Settings, seq_len: int) -> Hashable:
    threshold = _dynamic_ntk_threshold(s)
    assert threshold is not None
    return float(max(seq_len, threshold))


def _dynamic_ntk_table(
    dim: int, base: float, s: Settings, seq_len: int | None, device: Any
) -> tuple[torch.Tensor, float]:
    original = s["original_max_position_embeddings"]
    table = F.dynamic_ntk_inv_freq(
        dim,
        base=base,
        factor=s["factor"],
        original_max_position_embeddings=original,
        seq_len=original if seq_len is None else seq_len,
        device=device,
    )
    return table, 1.0


def _ntk_theta(factor: float, model: S.ServeModel) -> float:
    if model.rotary_dim is None or model.rope_theta is None:
        raise ValueError(
            "NTK-aware scaling is served as plain RoPE with the base rope_theta * factor^(d / (d - 2)), "
            "which needs the model's rotary dimension d and rope_theta: pass rotary_dim= and rope_theta="
        )
    return F._ntk_base(model.rotary_dim, model.rope_theta, factor)


def _ntk(engine: str) -> Callable[[Settings, S.ServeModel], S.EngineSettings]:
    def write(s: Settings, model: S.ServeModel) -> S.EngineSettings:
        theta = _ntk_theta(s["factor"], model)
        note = (
            f"NTK-aware scaling is plain RoPE with base {model.rope_theta:g} * "
            f"{s['factor']:g}^({model.rotary_dim}/{model.rotary_dim - 2 if model.rotary_dim else 0}) = "
            f"{theta:.9g}"
        )
        if engine == "llama.cpp":
            return S.EngineSettings(
                {"scaling.type": "none", "freq_base": theta}, rope_theta=theta, notes=(note,)
            )
        own = " (vLLM's own 'ntk' type computes another formula)" if engine == "vllm" else ""
        return S.EngineSettings({"rope_type": "default"}, rope_theta=theta, notes=(note + own,))

    return write


_NO_DYNAMIC_NTK = (
    "no serving engine grows the NTK base with the sequence (vLLM's and SGLang's 'dynamic' build one table "
    "at the longest context; llama.cpp has none): it would serve one static base for every length"
)
_NO_NTK_BY_PARTS = (
    "no serving engine computes the authors' two-ramp NTK-by-parts (NTK-aware pairs blended into "
    "interpolated ones, then unchanged ones blended back)"
)


def _dynamic_ntk_closest(s: Settings, context: int | None) -> tuple[tuple[str, dict[str, Any]], ...]:
    original = s["original_max_position_embeddings"]
    if context is None:
        raise ValueError(
            "a static approximation of dynamic NTK needs the context length it serves: pass context_length= "
            "(--context-length)"
        )
    # dynamic_ntk_inv_freq at seq_len = context: base * ((s * context / L) - (s - 1))^(d / (d - 2)).
    grown = s["factor"] * max(context, original) / original - (s["factor"] - 1)
    return (("ntk", {"factor": max(1.0, grown)}),)


def _ntk_by_parts_closest(s: Settings, context: int | None) -> tuple[tuple[str, dict[str, Any]], ...]:
    fields = {
        "factor": s["factor"],
        "original_max_position_embeddings": s["original_max_position_embeddings"],
        "attention_factor": 1.0,  # NTK-by-parts has no attention scaling
    }
    # The unchanged pairs end at 16 rotations and the interpolated ones start below 2 or 0.75.
    return tuple(
        ("yarn", {**fields, "beta_fast": fast, "beta_slow": slow})
        for fast, slow in ((16.0, 2.0), (16.0, 1.0), (32.0, 1.0))
    )


register(
    S.MethodSpec(
        name="ntk",
        summary="NTK-aware base change base * factor^(dim/(dim-2))",
        reference="bloc97 (2023)",
        table=S._static(F.ntk_inv_freq, "factor"),
        required=("factor",),
        call_aliases={"alpha": "factor"},
        engines={
            "vllm": S.EngineSpelling(_ntk("vllm"), S._exact),
            "sglang": S.EngineSpelling(_ntk("sglang"), S._exact),
            "llama.cpp": S.EngineSpelling(_ntk("llama.cpp"), S._exact),
        },
    )
)
register(
    S.MethodSpec(
        name="ntk-by-parts",
        summary="the authors' original two-ramp NTK-by-parts (LlamaPartNTKScaledRotaryEmbedding)",
        reference="jquesnelle/yarn, scaled_rope/ (commit 995db5b)",
        table=S._static(
            F.ntk_by_parts_inv_freq, "factor", "original_max_position_embeddings", "extrapolation_factor"
        ),
        settings=("extrapolation_factor",),
        required=("factor", "original_max_position_embeddings"),
        engines=S.refuse(_NO_NTK_BY_PARTS, _ntk_by_parts_closest),
    )
)
register(
    S.MethodSpec(
        name="dynamic-ntk",
        summary="NTK base grown with the sequence length beyond the original context",
        reference="emozilla (2023)",
        table=_dynamic_ntk_table,
        required=("factor", "original_max_position_embeddings"),
        dynamic=True,
        threshold=_dynamic_ntk_threshold,
        table_key=_dynamic_ntk_key,
        # transformers' "dynamic" grows past config.max_position_embeddings: it must be the original.
        context=_dynamic_ntk_threshold,
        length_is_original=True,
        aliases=("dynamic",),
        call_aliases={"alpha": "factor", "max_position_embeddings": "original_max_position_embeddings"},
        transformers=S.TransformersSpelling(
            "dynamic",
            exact=S._ALL_RELEASES + "; its threshold is config.max_position_embeddings",
            write=S._write_factor("dynamic"),
        ),
        engines=S.refuse(_NO_DYNAMIC_NTK, _dynamic_ntk_closest),
    )
)
