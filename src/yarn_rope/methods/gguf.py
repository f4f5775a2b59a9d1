"""llama.cpp's GGUF keys: what ``{arch}.rope.scaling.*`` means, read as yarn_rope's settings.

Checked against the llama.cpp that llama-cpp-python 0.3.36 vendors (ggml-org/llama.cpp@0c1e57098):
src/llama-model.cpp (load_hparams: the keys every architecture reads), src/models/*.cpp (the keys
only some read), src/llama-context.cpp (the YaRN attention factor), ggml/src/ggml-cpu/ops.cpp
(rope_yarn) and convert_hf_to_gguf.py / conversion/*.py (what converters write).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .. import frequencies as F
from . import get, validate
from .settings import CONTEXT_SETTINGS, PREFIX, SETTINGS, Settings
from .spec import LLAMACPP_RELEASE, ServeModel

__all__ = [
    "GGUF_SCALING_KEYS",
    "GGUF_SETTINGS_KEY",
    "LLAMACPP_ARCH_KEYS",
    "LLAMACPP_CONVERTED_ARCHS",
    "LLAMACPP_FLAGS",
    "LLAMACPP_NO_ROPE_ARCHS",
    "LLAMACPP_RELEASE",
    "LLAMACPP_SCALING_TYPES",
    "ROPE_FREQS_TENSOR",
    "converted_log_multiplier",
    "from_gguf_metadata",
    "llama3_from_rope_freqs",
    "llamacpp_architecture",
    "llamacpp_attention_base",
    "llamacpp_log_mscales",
    "lossless_dict",
    "rope_freqs_difference",
]

logger = logging.getLogger(__name__)

#: GGUF metadata keys under ``{arch}.rope.scaling.`` that yarn_rope reads as settings.
#: ``attn_factor`` (llama.cpp's ``hparams.rope_attn_factor``) multiplies the cos/sin scale whatever
#: the method; ``yarn_ext_factor`` is the extrapolation weight's multiplier (1 in the paper; a file
#: with it equal to the factor is a converter bug). ``yarn_attn_factor`` and ``yarn_log_multiplier``
#: are handled apart (:func:`from_gguf_metadata`).
GGUF_SCALING_KEYS: dict[str, str] = {
    "factor": "factor",
    "original_context_length": "original_max_position_embeddings",
    "finetuned": "finetuned",
    "attn_factor": "attn_factor",
    "yarn_beta_fast": "beta_fast",
    "yarn_beta_slow": "beta_slow",
    "yarn_ext_factor": "extrapolation_factor",
}

#: Keys llama.cpp reads only for some architectures (``load_arch_hparams`` in src/models/<arch>.cpp);
#: every other architecture uses llama.cpp's defaults (betas 32/1, extrapolation 1 under YaRN), so
#: a file's values reach those only as command-line flags.
LLAMACPP_ARCH_KEYS: dict[str, frozenset[str]] = {
    "yarn_beta_fast": frozenset({"grok", "mistral3"}),
    "yarn_beta_slow": frozenset({"grok", "mistral3"}),
    "yarn_ext_factor": frozenset({"grok"}),
    "yarn_attn_factor": frozenset({"grok"}),
    "yarn_log_multiplier": frozenset({"deepseek2", "deepseek32", "mistral4", "mistral3"}),
}
# Loaders that divide yarn_log_multiplier by 0.1: their converter writes 0.1 * mscale_all_dim
# (llama.cpp [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX], PR #17945).
_LOG_MULTIPLIER_IN_TENTHS = frozenset({"deepseek2", "deepseek32", "mistral4"})

#: The GGUF architecture convert_hf_to_gguf.py gives a checkpoint, by ``config.architectures``, for
#: the architectures whose rope keys llama.cpp reads its own way (``llama``: Llama and Mistral; the
#: ones that read ``yarn_log_multiplier``, :data:`LLAMACPP_ARCH_KEYS`). conversion/llama.py,
#: deepseek.py, mistral3.py.
LLAMACPP_CONVERTED_ARCHS: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "DeepseekV2ForCausalLM": "deepseek2",
    "DeepseekV3ForCausalLM": "deepseek2",
    "KimiVLForConditionalGeneration": "deepseek2",
    "DeepseekV32ForCausalLM": "deepseek32",
    "Ministral3ForCausalLM": "mistral3",
}
# The same by model_type, for configs that do not list their architectures.
_CONVERTED_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "deepseek_v2": "deepseek2",
    "deepseek_v3": "deepseek2",
    "deepseek_v32": "deepseek32",
    "ministral3": "mistral3",
}

#: The tensor llama.cpp divides each pair's rotation angle by (``freq_factors`` of ggml's rope):
#: convert_hf_to_gguf.py writes Llama 3.1's scaling there, never as ``rope.scaling.*`` keys.
ROPE_FREQS_TENSOR = "rope_freqs.weight"

#: llama.cpp architectures without rotary position embeddings (learned or absolute positions,
#: ALiBi, relative bias, recurrent): a rope scaling written into them would be read by nothing.
LLAMACPP_NO_ROPE_ARCHS: frozenset[str] = frozenset(
    {"gpt2", "bert", "bloom", "mpt", "starcoder", "jina-bert-v2", "jais", "t5", "t5encoder"}
    | {"mamba", "mamba2", "rwkv6", "rwkv7", "rwkv6qwen2"}
)

#: GGUF key where yarn_rope keeps its exact settings beside llama.cpp's (float32) keys, as JSON: a
#: rope dict ``{"rope_type": "yarn_rope.<method>", ...}`` that reads back to the same settings.
GGUF_SETTINGS_KEY = "yarn_rope.rope_scaling"

#: llama.cpp command-line flag and ``llama_cpp.Llama`` keyword of each key under ``{arch}.rope.``
#: (common/arg.cpp; llama-cpp-python 0.3.36 ``Llama.__init__``). ``scaling.attn_factor`` has no
#: flag: ``--yarn-attn-factor`` is overwritten whenever YaRN is on (src/llama-context.cpp), so it
#: is passed as ``--override-kv`` / ``kv_overrides``.
LLAMACPP_FLAGS: dict[str, tuple[str, str]] = {
    "scaling.type": ("--rope-scaling", "rope_scaling_type"),
    "scaling.factor": ("--rope-scale", "rope_freq_scale"),
    "scaling.original_context_length": ("--yarn-orig-ctx", "yarn_orig_ctx"),
    "scaling.yarn_ext_factor": ("--yarn-ext-factor", "yarn_ext_factor"),
    "scaling.yarn_beta_fast": ("--yarn-beta-fast", "yarn_beta_fast"),
    "scaling.yarn_beta_slow": ("--yarn-beta-slow", "yarn_beta_slow"),
    "freq_base": ("--rope-freq-base", "rope_freq_base"),
}
#: ``llama_cpp.LLAMA_ROPE_SCALING_TYPE_*`` values (include/llama.h).
LLAMACPP_SCALING_TYPES: dict[str, int] = {"none": 0, "linear": 1, "yarn": 2}


def llamacpp_log_mscales(arch: str | None, multiplier: float | None) -> tuple[float, float] | None:
    """``(mscale, mscale_all_dim)`` llama.cpp derives from ``yarn_log_multiplier``; ``None`` where unread.

    DeepSeek's ``mscale_all_dim`` (not a slope of YaRN's temperature): deepseek2-style loaders read
    ``0.1 * mscale_all_dim`` and divide it back; ``mistral3`` reads it as is. ``llama_context``
    then scales cos/sin by ``get_mscale(s, mscale) / get_mscale(s, mscale_all_dim)`` with
    ``mscale = mscale_all_dim`` for deepseek2 and 1 elsewhere (src/llama-context.cpp).
    """
    if arch not in LLAMACPP_ARCH_KEYS["yarn_log_multiplier"] or not multiplier:
        return None
    all_dim = float(multiplier) / 0.1 if arch in _LOG_MULTIPLIER_IN_TENTHS else float(multiplier)
    return (all_dim if arch == "deepseek2" else 1.0), all_dim


def llamacpp_architecture(config: Mapping[str, Any]) -> str | None:
    """The GGUF architecture convert_hf_to_gguf.py gives a checkpoint with this ``config.json``,
    where it matters to the rope keys (:data:`LLAMACPP_CONVERTED_ARCHS`); else ``None``."""
    names = config.get("architectures") or ()
    for name in names if isinstance(names, (list, tuple)) else ():
        if name in LLAMACPP_CONVERTED_ARCHS:
            return LLAMACPP_CONVERTED_ARCHS[name]
    model_type = config.get("model_type")
    return _CONVERTED_MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None


def converted_log_multiplier(arch: str | None, rope: Mapping[str, Any] | None) -> float | None:
    """The ``rope.scaling.yarn_log_multiplier`` convert_hf_to_gguf.py writes from a rope dict:
    ``0.1 * mscale_all_dim`` for the deepseek2-style loaders, ``mscale_all_dim`` for mistral3."""
    if arch not in LLAMACPP_ARCH_KEYS["yarn_log_multiplier"] or not rope:
        return None
    all_dim = rope.get("mscale_all_dim")
    if all_dim is None:
        return None
    return 0.1 * float(all_dim) if arch in _LOG_MULTIPLIER_IN_TENTHS else float(all_dim)


def llamacpp_attention_base(factor: float, arch: str | None, multiplier: float | None) -> float:
    """What llama.cpp multiplies cos/sin by under YaRN when the GGUF ``attn_factor`` is 1.

    ``0.1 ln(s) + 1`` (ggml's ``rope_yarn`` multiplies ``1 + 0.1 ln(1/freq_scale)``, which
    ``llama_context`` cancels and replaces by ``get_mscale``), or the DeepSeek ratio where the
    architecture reads ``yarn_log_multiplier``.
    """
    pair = llamacpp_log_mscales(arch, multiplier)
    if pair is None:
        return F.yarn_mscale(factor)
    return F.yarn_mscale(factor, pair[0]) / F.yarn_mscale(factor, pair[1])


def lossless_dict(method: str, settings: Settings) -> dict[str, Any]:
    """``{"rope_type": "yarn_rope.<method>", ...}`` with every non-default setting: reads back exactly."""
    spec = get(method)
    out: dict[str, Any] = {"rope_type": PREFIX + spec.name}
    for name, setting in SETTINGS.items():
        value = settings.get(name, setting.default)
        if value is None or (name not in CONTEXT_SETTINGS and value == setting.default):
            continue
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def llama3_from_rope_freqs(rope_freqs: Sequence[float], base: float) -> dict[str, Any] | None:
    """Llama 3.1's settings whose table is plain RoPE divided by ``rope_freqs``, else ``None``.

    convert_hf_to_gguf.py writes, per pair of wavelength ``w``: 1 below ``L / high_freq_factor``,
    ``factor`` beyond ``L / low_freq_factor``, ``1 / ((1 - t) / factor + t)`` between, with
    ``t = (L / w - low) / (high - low)``; llama.cpp divides each pair's angle by it (ggml's rope,
    ``theta / freq_factor``). The table depends on ``L / low`` and ``L / high`` only, so
    ``low_freq_factor`` is read as 1 (as in every Llama 3.x). The factors on the ramp (two at
    least) give the rest; the settings found must give ``rope_freqs`` back to float32 rounding.

    Args:
        rope_freqs: the tensor, one factor per rotated pair (``[rotary_dim // 2]``).
        base: the file's ``rope.freq_base``.
    """
    factors = torch.tensor([float(value) for value in rope_freqs], dtype=torch.float64)
    dim = 2 * len(factors)
    factor = float(factors.max()) if len(factors) else 1.0
    if factor <= 1.0 or not torch.isfinite(factors).all() or float(factors.min()) < 1.0 - 1e-6:
        return None
    plain = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    wavelength = 2 * math.pi / plain.double()
    ramp = (factors > 1.0 + 1e-6) & (factors < factor * (1.0 - 1e-6))
    if int(ramp.sum()) < 2:
        return None
    # t = a / w + b on the ramp, with a = L / (high - low) and b = -low / (high - low).
    t = (1.0 / factors[ramp] - 1.0 / factor) / (1.0 - 1.0 / factor)
    x = 1.0 / wavelength[ramp]
    design = torch.stack([x, torch.ones_like(x)], dim=1)
    a, b = (float(v) for v in torch.linalg.lstsq(design, t.unsqueeze(1)).solution.squeeze(1))
    if b >= 0.0 or a <= 0.0:
        return None
    span = -1.0 / b
    found = {
        "factor": factor,
        "original_max_position_embeddings": round(a * span),
        "low_freq_factor": 1.0,
        "high_freq_factor": round(1.0 + span, 6),
    }
    return found if rope_freqs_difference(rope_freqs, base, found) <= ROPE_FREQS_TOLERANCE else None


#: Largest relative difference between a ``rope_freqs`` tensor and a llama3 table's ratio to plain
#: RoPE for the two to be the same (float32 rounding of the converter's and yarn_rope's tables).
ROPE_FREQS_TOLERANCE = 1e-5


def rope_freqs_difference(rope_freqs: Sequence[float], base: float, settings: Mapping[str, Any]) -> float:
    """Largest relative difference between ``rope_freqs`` and what convert_hf_to_gguf.py writes for
    the llama3 ``settings`` (factor, original_max_position_embeddings, low/high_freq_factor): the
    plain table's ratio to the llama3 one, per pair."""
    factors = torch.tensor([float(value) for value in rope_freqs], dtype=torch.float64)
    dim = 2 * len(factors)
    names = ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor")
    table = F.llama3_inv_freq(dim, base=base, **{name: settings[name] for name in names}).double()
    ratio = F.default_inv_freq(dim, base=base).double() / table
    return float(((ratio - factors).abs() / factors).max())


def _frequency_factor_scaling(
    metadata: Mapping[str, Any], arch: str, scaling: dict[str, Any] | None, rope_freqs: Sequence[float]
) -> dict[str, Any]:
    """The llama3 rope dict a file's ``rope_freqs`` tensor stands for (:func:`llama3_from_rope_freqs`)."""
    if scaling is not None:
        raise ValueError(
            f"GGUF {arch}: a {ROPE_FREQS_TENSOR} tensor and {arch}.rope.scaling.type={scaling['type']!r}: "
            f"llama.cpp {LLAMACPP_RELEASE} applies both (it divides each pair's angle by the tensor, then "
            "scales it), which no method of yarn_rope computes"
        )
    base = float(metadata.get(f"{arch}.rope.freq_base", 10000.0))  # llama.cpp's default base
    found = llama3_from_rope_freqs(rope_freqs, base)
    if found is None:
        raise ValueError(
            f"GGUF {arch}: its {ROPE_FREQS_TENSOR} tensor ({len(rope_freqs)} factors, largest "
            f"{max(rope_freqs, default=1.0):g}) is not Llama 3.1's table for base {base:g} (what "
            "convert_hf_to_gguf.py writes from rope_scaling llama3): yarn_rope cannot tell which scaling "
            "llama.cpp computes from it"
        )
    return {"rope_type": "llama3", **found}


def from_gguf_metadata(
    metadata: Mapping[str, Any], *, rope_freqs: Sequence[float] | None = None
) -> dict[str, Any]:
    """A ``config.json``-like dict of the rope settings in GGUF metadata, as llama.cpp reads them.

    * ``yarn_log_multiplier`` is DeepSeek's ``mscale_all_dim`` (not YaRN's temperature slope),
      read only by the architectures that read it (:func:`llamacpp_log_mscales`); elsewhere it
      is ignored with a warning, as llama.cpp ignores it.
    * ``yarn_attn_factor`` is ignored with a warning: llama.cpp overwrites it whenever YaRN is on
      (src/llama-context.cpp), and converters write transformers' ``attention_factor`` (a
      *replacement*) or the authors' ``attn_factor`` (a *multiplier*) there alike.
    * a :data:`GGUF_SETTINGS_KEY` written by :func:`yarn_rope.export` gives the exact settings,
      when it agrees with llama.cpp's own keys (else it is ignored with a warning).
    * a ``rope_freqs`` tensor (Llama 3.1 converted by convert_hf_to_gguf.py, which writes no
      scaling key) is read as the ``llama3`` settings it stands for
      (:func:`llama3_from_rope_freqs`).

    Args:
        metadata: GGUF key -> value (``general.architecture``, ``{arch}.context_length``,
            ``{arch}.rope.freq_base``, ``{arch}.rope.scaling.*``).
        rope_freqs: the file's :data:`ROPE_FREQS_TENSOR`, if it has one.

    Raises:
        ValueError: no architecture; a ``rope_freqs`` tensor that is not Llama 3.1's table, or
            one beside a scaling type (llama.cpp would apply both).

    Returns:
        ``{"max_position_embeddings", "rope_theta", "rope_scaling"}`` (``rope_scaling`` is
        ``None`` when the file declares no scaling, or ``rope.scaling.type`` is ``"none"``).
    """
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"GGUF metadata without a general.architecture string (got {arch!r})")
    prefix = f"{arch}.rope.scaling."
    rope_type = metadata.get(prefix + "type")
    scaling: dict[str, Any] | None = None
    if rope_type not in (None, "none"):
        scaling = {"type": rope_type}
        for key, ours in GGUF_SCALING_KEYS.items():
            found = metadata.get(prefix + key)
            if found is not None:
                scaling[ours] = found
        if scaling.get("attn_factor") == 1.0:
            del scaling["attn_factor"]  # llama.cpp writes 1.0 for "not set"
        ignored = metadata.get(prefix + "yarn_attn_factor")
        if ignored is not None and ignored != 1.0 and rope_type == "yarn":
            logger.warning(
                "GGUF %s: ignoring %syarn_attn_factor=%s: llama.cpp %s overwrites it whenever YaRN is on, "
                "and converters write transformers' attention_factor (which replaces the attention "
                "scaling) or the authors' attn_factor (which multiplies it) there alike; pass "
                "attention_factor= or attn_factor= if the model needs one",
                arch,
                prefix,
                ignored,
                LLAMACPP_RELEASE,
            )
        multiplier = metadata.get(prefix + "yarn_log_multiplier")
        pair = llamacpp_log_mscales(arch, multiplier)
        if pair is not None:
            scaling["mscale"], scaling["mscale_all_dim"] = pair
        elif multiplier:
            logger.warning(
                "GGUF %s: ignoring %syarn_log_multiplier=%s, as llama.cpp does for this architecture (it "
                "is DeepSeek's mscale_all_dim, read only by %s)",
                arch,
                prefix,
                multiplier,
                ", ".join(sorted(LLAMACPP_ARCH_KEYS["yarn_log_multiplier"])),
            )
    if rope_freqs is not None:
        scaling = _frequency_factor_scaling(metadata, arch, scaling, rope_freqs)
    stored = _stored_settings(metadata, arch, scaling, rope_freqs)
    out: dict[str, Any] = {"rope_scaling": stored if stored is not None else scaling}
    context = metadata.get(f"{arch}.context_length")
    if context is not None:
        out["max_position_embeddings"] = context
    theta = metadata.get(f"{arch}.rope.freq_base")
    if theta is not None:
        out["rope_theta"] = theta
    return out


def _stored_settings(
    metadata: Mapping[str, Any], arch: str, read: dict[str, Any] | None, rope_freqs: Sequence[float] | None
) -> dict[str, Any] | None:
    """The exact settings of :data:`GGUF_SETTINGS_KEY` if they agree with llama.cpp's keys."""
    text = metadata.get(GGUF_SETTINGS_KEY)
    if text is None:
        return None
    try:
        stored = json.loads(str(text))
        method = str(stored["rope_type"]).removeprefix(PREFIX)
        values = validate(method, {k: v for k, v in stored.items() if k != "rope_type"})
        spelled = get(method).engines["llama.cpp"]
        if spelled.write is None or spelled.loses(values) is not None:
            raise ValueError(f"llama.cpp cannot compute method {method!r}")
        model = ServeModel(
            rope_theta=metadata.get(f"{arch}.rope.freq_base"),
            architecture=arch,
            log_multiplier=metadata.get(f"{arch}.rope.scaling.yarn_log_multiplier"),
            rope_freqs=None if rope_freqs is None else tuple(rope_freqs),
            from_gguf=True,
        )
        keys = spelled.write(values, model).rope
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        logger.warning("GGUF %s: ignoring %s (%s); reading llama.cpp's keys", arch, GGUF_SETTINGS_KEY, error)
        return None
    rope_prefix = f"{arch}.rope."
    defaults = {"scaling.attn_factor": 1.0, "scaling.yarn_ext_factor": 1.0}
    defaults |= {"scaling.yarn_beta_fast": F.DEFAULT_BETA_FAST, "scaling.yarn_beta_slow": F.DEFAULT_BETA_SLOW}
    for key, value in keys.items():
        found = metadata.get(rope_prefix + key, defaults.get(key))
        if key == "scaling.type" and value == "none" and found is None:
            continue
        agrees = (
            found == value
            if isinstance(value, str) or found is None
            else math.isclose(float(found), float(value), rel_tol=1e-6)
        )
        if not agrees:
            logger.warning(
                "GGUF %s: %s says %s=%r but the file holds %r (edited by another tool?); reading "
                "llama.cpp's keys",
                arch,
                GGUF_SETTINGS_KEY,
                rope_prefix + key,
                value,
                found,
            )
            return None
    if read is None and method != "none":
        logger.warning(
            "GGUF %s: %s names %r but the file declares no scaling; reading llama.cpp's keys",
            arch,
            GGUF_SETTINGS_KEY,
            method,
        )
        return None
    return dict(stored)


# ------------------------------------------------------------------------------------------------
# Serving engines: how vLLM, SGLang and llama.cpp spell each method (yarn_rope.export)
# ------------------------------------------------------------------------------------------------
#
# Each spelling was checked against the source of the release named in ENGINES. An engine that
# computes something else for a setting is never handed it silently: ``loses`` says what would be
# lost, and ``closest`` offers the static settings the engine computes exactly, for
# ``allow_approximation`` (the export measures how far each is and picks the nearest).
