"""LongRoPE (Ding et al. 2024; Phi-3/3.5/4-mini): per-pair searched factors, short up to the
original length and long beyond it."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

from .. import frequencies as F
from . import register
from . import spec as S
from .settings import Settings


def longrope_factor(s: Settings) -> float:
    """LongRoPE's scale factor: ``factor`` when stated, else ``max / original`` (Phi-3 states none)."""
    if s["factor"] is not None:
        factor: float = s["factor"]
        return factor
    original, target = s["original_max_position_embeddings"], s["max_position_embeddings"]
    return 1.0 if target is None else target / original


def _longrope_key(s: Settings, seq_len: int) -> Hashable:
    return "long" if seq_len > s["original_max_position_embeddings"] else "short"


def _longrope_table(
    dim: int, base: float, s: Settings, seq_len: int | None, device: Any
) -> tuple[torch.Tensor, float]:
    original = s["original_max_position_embeddings"]
    long = seq_len is not None and seq_len > original
    table = F.longrope_inv_freq(
        dim, base=base, rescale_factors=s["long_factor" if long else "short_factor"], device=device
    )
    attention = F.longrope_attention_scaling(
        longrope_factor(s), original, attention_factor=s["attention_factor"]
    )
    return table, attention


def _check_longrope(values: dict[str, Any]) -> None:
    short, long = values["short_factor"], values["long_factor"]
    if short is not None and long is not None and len(short) != len(long):
        raise ValueError(
            f"short_factor has {len(short)} numbers and long_factor {len(long)}; LongRoPE needs one of "
            "each per rotary pair"
        )


def _longrope_attention(s: Settings, factor: float | None) -> float:
    return F.longrope_attention_scaling(
        longrope_factor(s), s["original_max_position_embeddings"], attention_factor=s["attention_factor"]
    )


# Writers of transformers' own keys -------------------------------------------------------------


def _write_longrope(s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {
        "rope_type": "longrope",
        "short_factor": list(s["short_factor"]),
        "long_factor": list(s["long_factor"]),
        "original_max_position_embeddings": s["original_max_position_embeddings"],
    }
    for name in ("factor", "attention_factor"):
        if s[name] is not None:
            out[name] = s[name]
    return out


def _rope_list(engine: str) -> Callable[[Settings, S.ServeModel], S.EngineSettings]:
    def write(s: Settings, model: S.ServeModel) -> S.EngineSettings:
        attention = _longrope_attention(s, None)
        rope = {
            "rope_type": "longrope",
            "short_factor": list(s["short_factor"]),
            "long_factor": list(s["long_factor"]),
            "original_max_position_embeddings": s["original_max_position_embeddings"],
            "short_mscale": attention,
            "long_mscale": attention,
        }
        note = (
            f"short_mscale = long_mscale = {attention:.9g}: {S.ENGINES[engine].title} would otherwise derive "
            "them from max_position_embeddings / original_max_position_embeddings"
        )
        return S.EngineSettings(rope, notes=(note,))

    return write


def _longrope_loses(engine: str) -> Callable[[Settings], str | None]:
    def loses(s: Settings) -> str | None:
        if tuple(s["short_factor"]) == tuple(s["long_factor"]):
            return None
        if engine == "vllm":
            how = (
                "with one list of factors for every sequence (the long ones whenever max_model_len passes "
                "original_max_position_embeddings), so sequences within the original context would get the "
                "long factors"
            )
        else:
            how = (
                "switching a whole batch to the long factors once any position passes "
                "original_max_position_embeddings, with the keys cached before still rotated by the short "
                "ones"
            )
        return (
            f"{S.ENGINES[engine].title} {S.ENGINES[engine].release} serves LongRoPE {how}; transformers and "
            "yarn_rope switch per sequence length"
        )

    return loses


def _longrope_closest(s: Settings, context: int | None) -> tuple[tuple[str, dict[str, Any]], ...]:
    original = s["original_max_position_embeddings"]
    chosen = s["short_factor"] if context is not None and context <= original else s["long_factor"]
    fields = {
        name: s[name]
        for name in (
            "factor",
            "original_max_position_embeddings",
            "max_position_embeddings",
            "attention_factor",
        )
        if s[name] is not None
    }
    return (("longrope", {**fields, "short_factor": chosen, "long_factor": chosen}),)


def _llamacpp_longrope_loses(s: Settings) -> str | None:
    return (
        "llama.cpp applies LongRoPE through rope_long / rope_short tensors that convert_hf_to_gguf.py "
        "writes, chosen by the context size, not the sequence; no flag or metadata key spells the per-pair "
        "factors"
    )


register(
    S.MethodSpec(
        name="longrope",
        summary="per-pair searched factors, short up to the original length and long beyond it",
        reference="Ding et al. 2024, LongRoPE; Phi-3/3.5/4-mini",
        table=_longrope_table,
        settings=("short_factor", "long_factor", "attention_factor"),
        required=("original_max_position_embeddings", "short_factor", "long_factor"),
        factor_from_lengths=False,
        dynamic=True,
        threshold=lambda s: s["original_max_position_embeddings"],
        table_key=_longrope_key,
        aliases=("su",),
        check=_check_longrope,
        states_target=False,
        attention=_longrope_attention,
        transformers=S.TransformersSpelling(
            "longrope",
            exact="5.x (checked 5.23.0)",
            write=_write_longrope,
            differs="4.x takes the attention scaling's factor as max / original whenever the config "
            "states original_max_position_embeddings at its top level (Phi-3 always does), even when "
            "rope_scaling states another factor",
        ),
        engines={
            "vllm": S.EngineSpelling(_rope_list("vllm"), _longrope_loses("vllm"), _longrope_closest),
            "sglang": S.EngineSpelling(_rope_list("sglang"), _longrope_loses("sglang"), _longrope_closest),
            "llama.cpp": S.EngineSpelling(None, _llamacpp_longrope_loses),
        },
    )
)
