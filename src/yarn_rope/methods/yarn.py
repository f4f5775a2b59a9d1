"""YaRN (Peng et al., ICLR 2024): static ``yarn`` and ``dynamic-yarn``.

The ramp between extrapolated pairs (unchanged, high frequencies) and interpolated ones (divided
by the factor, low frequencies), and the attention scaling ``0.1 ln s + 1``.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import torch

from .. import frequencies as F
from . import register
from . import spec as S
from .gguf import llamacpp_attention_base
from .settings import _YARN_ATTENTION, _YARN_RAMP, Settings


def yarn_attention_scaling(s: Settings, factor: float) -> float:
    """YaRN's attention scaling at ``factor`` with the attention knobs of ``s``."""
    return F.yarn_attention_scaling(
        factor,
        attention_factor=s["attention_factor"],
        attn_factor=s["attn_factor"],
        mscale=s["mscale"],
        mscale_all_dim=s["mscale_all_dim"],
        mscale_coefficient=s["mscale_coefficient"],
    )


def _yarn_at(dim: int, base: float, s: Settings, factor: float, device: Any) -> torch.Tensor:
    return F.yarn_inv_freq(
        dim,
        base=base,
        factor=factor,
        original_max_position_embeddings=s["original_max_position_embeddings"],
        beta_fast=s["beta_fast"],
        beta_slow=s["beta_slow"],
        extrapolation_factor=s["extrapolation_factor"],
        truncate=s["truncate"],
        device=device,
    )


def _yarn_table(
    dim: int, base: float, s: Settings, seq_len: int | None, device: Any
) -> tuple[torch.Tensor, float]:
    factor = F._check_factor(s["factor"], method="yarn")
    return _yarn_at(dim, base, s, factor, device), yarn_attention_scaling(s, factor)


def _check_yarn(values: dict[str, Any]) -> None:
    F._check_betas(values["beta_fast"], values["beta_slow"])
    factor = values["factor"]
    # Checks the attention knobs together (e.g. attention_factor with attn_factor).
    yarn_attention_scaling(values, factor if factor is not None else 1.0)


def _dynamic_yarn_threshold(s: Settings) -> int | None:
    """The longest sequence the initial table serves.

    Fine-tuned: the fine-tuned context (``max_position_embeddings``, else ``factor * L``), within
    which the fine-tuned factor holds. Not fine-tuned: ``L`` itself, so that the factor is
    ``max(1, seq_len / L)`` as in the paper (section 3.3), whatever target context is stated.
    """
    original: int = s["original_max_position_embeddings"]
    if not s["finetuned"]:
        return original
    if s["max_position_embeddings"] is not None:
        target: int = s["max_position_embeddings"]
        return target
    return F.scaled_context(s["factor"], original)


def _dynamic_yarn_factor(s: Settings, seq_len: int) -> float:
    return F.dynamic_factor(
        seq_len,
        original_max_position_embeddings=s["original_max_position_embeddings"],
        max_position_embeddings=_dynamic_yarn_threshold(s),
        factor=s["factor"],
        finetuned=s["finetuned"],
    )


def _dynamic_yarn_table(
    dim: int, base: float, s: Settings, seq_len: int | None, device: Any
) -> tuple[torch.Tensor, float]:
    threshold = _dynamic_yarn_threshold(s)
    assert threshold is not None
    factor = _dynamic_yarn_factor(s, threshold if seq_len is None else seq_len)
    # Below its threshold the authors' dynamic module is plain RoPE, attention scaling included.
    attention = 1.0 if factor == 1.0 else yarn_attention_scaling(s, factor)
    return _yarn_at(dim, base, s, factor, device), attention


def _check_dynamic_yarn(values: dict[str, Any]) -> None:
    _check_yarn(values)
    if values["finetuned"] and values["factor"] is None and values["max_position_embeddings"] is None:
        raise ValueError(
            "dynamic-yarn with finetuned=True needs the fine-tuned factor or max_position_embeddings "
            "(factor = max_position_embeddings / original)"
        )


def _yarn_is_vanilla(s: Settings) -> bool:
    return bool(s["extrapolation_factor"] == 1.0)


def _yarn_attention(s: Settings, factor: float | None) -> float:
    if factor is None:
        factor = s["factor"] if s["factor"] is not None else 1.0
    return yarn_attention_scaling(s, factor)


def _write_yarn(s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {
        "rope_type": "yarn",
        "factor": s["factor"],
        "original_max_position_embeddings": s["original_max_position_embeddings"],
        "beta_fast": s["beta_fast"],
        "beta_slow": s["beta_slow"],
    }
    if not s["truncate"]:
        out["truncate"] = False
    if s["attn_factor"] != 1.0 or s["mscale_coefficient"] != F.DEFAULT_MSCALE_COEFFICIENT:
        # transformers knows neither key: fold them into the value that replaces its computation.
        out["attention_factor"] = yarn_attention_scaling(s, s["factor"])
    else:
        for name in ("attention_factor", "mscale", "mscale_all_dim"):
            if s[name] is not None:
                out[name] = s[name]
    return out


# Engine spellings -----------------------------------------------------------------------------


def _attention_formula(s: Settings, factor: float) -> str:
    """YaRN's attention scaling with these settings, as a formula with its value."""
    value = yarn_attention_scaling(s, factor)
    if s["attention_factor"] is not None:
        return f"attention_factor {value:.9g}"
    if s["mscale"] and s["mscale_all_dim"]:
        text = f"mscale ratio {s['mscale']:g}/{s['mscale_all_dim']:g}"
    else:
        text = f"{s['mscale_coefficient']:g} ln s + 1"
    if s["attn_factor"] != 1.0:
        text = f"{s['attn_factor']:g} x ({text})"
    return f"{text} = {value:.9g}"


def _yarn_rope_keys(s: Settings) -> dict[str, Any]:
    return {
        "rope_type": "yarn",
        "factor": s["factor"],
        "original_max_position_embeddings": s["original_max_position_embeddings"],
        "beta_fast": s["beta_fast"],
        "beta_slow": s["beta_slow"],
    }


#: vLLM model classes whose model file (model_executor/models/deepseek_v2.py, 0.32.0 and 0.33.0) turns
#: any rope type but "default" into deepseek_yarn, or deepseek_llama_scaling when
#: ``attention_factor == 1.0``. Not DeepseekForCausalLM (V1, model_type "deepseek"): its attention
#: (DeepseekAttention) keeps the type, so vLLM's generic YaRN class serves it.
_VLLM_DEEPSEEK = frozenset({"DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"})


def _vllm_deepseek_yarn(s: Settings, model: S.ServeModel) -> S.EngineSettings:
    """YaRN for vLLM's DeepSeek models: ``DeepseekScalingRotaryEmbedding`` reads beta_fast, beta_slow,
    mscale (default 1) and mscale_all_dim (default 0) only, and multiplies cos/sin by
    ``get_mscale(s, mscale) / get_mscale(s, mscale_all_dim)`` (deepseek_scaling_rope.py); the model
    multiplies its softmax scale by ``get_mscale(s, mscale_all_dim) ** 2``. So the attention scaling
    is spelled through ``mscale`` alone, ``mscale_all_dim`` left as the model states it, and
    ``attention_factor`` never written."""
    factor = s["factor"]
    if not s["truncate"]:
        raise ValueError(
            "truncate=False: vLLM's DeepSeek rope (deepseek_scaling_rope.py) always floors and ceils the "
            "ramp bounds, so the fractional bounds would be rounded"
        )
    rope = _yarn_rope_keys(s)
    all_dim = s["mscale_all_dim"]
    if all_dim is not None:
        rope["mscale_all_dim"] = all_dim
    denominator = F.yarn_mscale(factor, all_dim or 0.0)
    stated = s["mscale"] if s["mscale"] is not None else 1.0
    target = yarn_attention_scaling(s, factor)
    notes = [
        "vLLM's deepseek_v2.py serves rope_type yarn as deepseek_yarn, which reads no attention_factor (and "
        "attention_factor = 1.0 would switch it to deepseek_llama_scaling, without the softmax temperature)"
    ]
    if math.isclose(F.yarn_mscale(factor, stated) / denominator, target, rel_tol=1e-15, abs_tol=0.0):
        if s["mscale"] is not None:
            rope["mscale"] = s["mscale"]
        return S.EngineSettings(rope, notes=tuple(notes))
    if factor <= 1.0:
        raise ValueError(
            f"vLLM's DeepSeek rope multiplies cos/sin by 1 at factor {factor:g} (get_mscale is 1 for "
            f"s <= 1), so the attention scaling {_attention_formula(s, factor)} cannot be spelled"
        )
    rope["mscale"] = (target * denominator - 1.0) / (0.1 * math.log(factor))
    notes.append(
        f"mscale = {rope['mscale']:.9g}, so that get_mscale(s, mscale) / get_mscale(s, mscale_all_dim) gives "
        f"{_attention_formula(s, factor)}; mscale_all_dim, which also sets the softmax scale, is left as "
        "stated"
    )
    return S.EngineSettings(rope, notes=tuple(notes))


def _vllm_yarn(s: Settings, model: S.ServeModel) -> S.EngineSettings:
    if _VLLM_DEEPSEEK.intersection(model.architectures):
        return _vllm_deepseek_yarn(s, model)
    factor = s["factor"]
    rope = _yarn_rope_keys(s)
    if not s["truncate"]:
        rope["truncate"] = False
    for name in ("mscale", "mscale_all_dim"):
        if s[name] is not None:
            rope[name] = s[name]  # DeepSeek models also read mscale_all_dim for their softmax scale
    target = yarn_attention_scaling(s, factor)
    # yarn_scaling_rope.py: attention_factor if given, elif `mscale and mscale_all_dim` the ratio,
    # else 0.1 ln s + 1.
    if s["mscale"] and s["mscale_all_dim"]:
        own = F.yarn_mscale(factor, s["mscale"]) / F.yarn_mscale(factor, s["mscale_all_dim"])
    else:
        own = F.yarn_mscale(factor)
    notes: list[str] = []
    if target != own:
        rope["attention_factor"] = target
        notes.append(
            f"attention_factor = {_attention_formula(s, factor)} replaces vLLM's own {own:.9g}; vLLM "
            "releases that ignore attention_factor (before vLLM #46280 / #48351) read attn_factor instead: "
            f"attn_factor = {target / F.yarn_mscale(factor):.9g}, which multiplies 0.1 ln s + 1"
        )
    return S.EngineSettings(rope, notes=tuple(notes))


def _vllm_yarn_loses(s: Settings) -> str | None:
    if s["extrapolation_factor"] != 1.0:
        return (
            f"extrapolation_factor={s['extrapolation_factor']:g}: vLLM 0.33.0's YaRN has no such setting (it "
            "always extrapolates fully), so the ramp pairs would be computed with 1"
        )
    return None


def _sglang_yarn(s: Settings, model: S.ServeModel) -> S.EngineSettings:
    factor = s["factor"]
    rope = _yarn_rope_keys(s)
    rope["extrapolation_factor"] = s["extrapolation_factor"]
    rope["truncate"] = s["truncate"]
    for name in ("mscale", "mscale_all_dim"):
        if s[name] is not None:
            rope[name] = s[name]
    target = yarn_attention_scaling(s, factor)
    # yarn.py: the ratio when mscale and mscale_all_dim are both not None, else 0.1 ln s + 1; then
    # times attn_factor. It never reads attention_factor.
    if s["mscale"] is not None and s["mscale_all_dim"] is not None:
        own = F.yarn_mscale(factor, s["mscale"]) / F.yarn_mscale(factor, s["mscale_all_dim"])
    else:
        own = F.yarn_mscale(factor)
    rope["attn_factor"] = target / own
    notes: tuple[str, ...] = ()
    if target != own:
        notes = (
            f"attn_factor = {target / own:.9g} multiplies SGLang's own {own:.9g} to give "
            f"{_attention_formula(s, factor)} (SGLang 0.5.23 does not read attention_factor)",
        )
    return S.EngineSettings(rope, notes=notes)


def _llamacpp_yarn(s: Settings, model: S.ServeModel) -> S.EngineSettings:
    factor = s["factor"]
    keys: dict[str, Any] = {
        "scaling.type": "yarn",
        "scaling.factor": factor,
        "scaling.original_context_length": s["original_max_position_embeddings"],
        "scaling.yarn_beta_fast": s["beta_fast"],
        "scaling.yarn_beta_slow": s["beta_slow"],
        "scaling.yarn_ext_factor": s["extrapolation_factor"],
    }
    target = yarn_attention_scaling(s, factor)
    own = llamacpp_attention_base(factor, model.architecture, model.log_multiplier)
    keys["scaling.attn_factor"] = target / own
    notes: tuple[str, ...] = ()
    if target != own:
        notes = (
            f"attn_factor = {target / own:.9g} multiplies llama.cpp's own {own:.9g} to give "
            f"{_attention_formula(s, factor)}; it is the GGUF key {{arch}}.rope.scaling.attn_factor "
            "(--override-kv): --yarn-attn-factor is overwritten whenever YaRN is on (src/llama-context.cpp)",
        )
    return S.EngineSettings(keys, notes=notes)


def _llamacpp_yarn_loses(s: Settings) -> str | None:
    if not s["truncate"]:
        return (
            "truncate=False: ggml always floors and ceils the ramp bounds (ggml_rope_yarn_corr_dims), so "
            "the fractional bounds would be rounded"
        )
    return None


_NO_DYNAMIC_YARN = (
    "no serving engine computes dynamic YaRN: it would serve one static table for every length, so "
    "sequences within the original context would not get plain RoPE and the factor would not follow the "
    "sequence length"
)


def vllm_installed() -> bool:
    """Whether vLLM is importable here, and so yarn_rope's plugin with it (the entry point is ours)."""
    return importlib.util.find_spec("vllm") is not None


def _vllm_plugin_missing(s: Settings) -> str | None:
    if vllm_installed():
        return None
    return (
        "vLLM serves dynamic YaRN per request only through yarn_rope's plugin (yarn_rope.vllm), and vLLM is "
        "not installed here: install yarn-rope[vllm] (pip install 'yarn-rope[vllm]') where vLLM runs and "
        "export there; vLLM alone would serve one static table for every length"
    )


def _vllm_dynamic_yarn(s: Settings, model: S.ServeModel) -> S.EngineSettings:
    from . import get, to_hf

    rope = to_hf(get("dynamic-yarn"), s)
    return S.EngineSettings(
        rope,
        notes=(
            "served per request by yarn_rope's vLLM plugin (yarn_rope.vllm, loaded by vLLM from the "
            "yarn-rope[vllm] install, vLLM 0.32.x): each request gets the dynamic-YaRN table of its own "
            'length on a grid of sqrt(2) steps (additional_config={"yarn_rope": {"schedule": g}} sets '
            "another), plain RoPE within the original context",
        ),
    )


def _serve_factor(s: Settings, context: int | None) -> float:
    original: int = s["original_max_position_embeddings"]
    if s["finetuned"] and s["factor"] is not None:
        factor: float = s["factor"]
        return factor
    target = context if context is not None else _dynamic_yarn_threshold(s) if s["finetuned"] else None
    if target is None:
        target = s["max_position_embeddings"]
    if target is None:
        raise ValueError(
            "a static approximation of dynamic scaling needs the context length it serves: pass "
            "context_length= (--context-length), or a factor (the context is then factor * original)"
        )
    return max(1.0, float(target) / original)


def _dynamic_yarn_closest(s: Settings, context: int | None) -> tuple[tuple[str, dict[str, Any]], ...]:
    fields = {name: s[name] for name in (*_YARN_RAMP, *_YARN_ATTENTION) if s[name] is not None}
    factor = _serve_factor(s, context)
    fields.update(factor=factor, original_max_position_embeddings=s["original_max_position_embeddings"])
    candidates = [("yarn", dict(fields))]
    if fields.get("extrapolation_factor", 1.0) != 1.0:
        candidates.append(("yarn", {**fields, "extrapolation_factor": 1.0}))
    return tuple(candidates)


def _yarn_static_closest(s: Settings, context: int | None) -> tuple[tuple[str, dict[str, Any]], ...]:
    fields = {name: s[name] for name in (*_YARN_RAMP, *_YARN_ATTENTION) if s[name] is not None}
    fields.update(
        factor=s["factor"],
        original_max_position_embeddings=s["original_max_position_embeddings"],
        extrapolation_factor=1.0,
        truncate=True,
    )
    if s["max_position_embeddings"] is not None:
        fields["max_position_embeddings"] = s["max_position_embeddings"]
    return (("yarn", fields),)


register(
    S.MethodSpec(
        name="yarn",
        summary="ramp between extrapolated and interpolated pairs, attention scaling 0.1 ln s + 1",
        reference="Peng et al., ICLR 2024, section 3.2, and the authors' code",
        table=_yarn_table,
        settings=(*_YARN_RAMP, *_YARN_ATTENTION, "finetuned"),
        required=("factor", "original_max_position_embeddings"),
        consistent_lengths=True,
        check=_check_yarn,
        attention=_yarn_attention,
        transformers=S.TransformersSpelling(
            "yarn",
            exact="4.57+ (checked 4.57.6, 5.23.0)",
            write=_write_yarn,
            differs="4.51-4.56 take factor as max / original; 4.45-4.50 build the ramp from "
            "max_position_embeddings instead of the original length",
            vanilla=_yarn_is_vanilla,
        ),
        engines={
            "vllm": S.EngineSpelling(_vllm_yarn, _vllm_yarn_loses, _yarn_static_closest),
            "sglang": S.EngineSpelling(_sglang_yarn, S._exact),
            "llama.cpp": S.EngineSpelling(_llamacpp_yarn, _llamacpp_yarn_loses, _yarn_static_closest),
        },
    )
)
register(
    S.MethodSpec(
        name="dynamic-yarn",
        summary="YaRN with s = max(1, seq_len / original) (or the fine-tuned factor within its context)",
        reference="Peng et al., ICLR 2024, section 3.3",
        table=_dynamic_yarn_table,
        settings=(*_YARN_RAMP, *_YARN_ATTENTION, "finetuned"),
        required=("original_max_position_embeddings",),
        factor_from_lengths=False,
        consistent_lengths=True,
        dynamic=True,
        threshold=_dynamic_yarn_threshold,
        table_key=_dynamic_yarn_factor,
        context=lambda s: s["max_position_embeddings"] or _dynamic_yarn_threshold(s),
        check=_check_dynamic_yarn,
        factor_is_key=True,
        factor_follows_length=lambda s: not s.get("finetuned"),
        attention=_yarn_attention,
        engines={
            **S.refuse(_NO_DYNAMIC_YARN, _dynamic_yarn_closest),
            "vllm": S.EngineSpelling(_vllm_dynamic_yarn, _vllm_plugin_missing, _dynamic_yarn_closest),
        },
    )
)
