"""The method registry: everything yarn_rope knows about each rope scaling method, in one place.

One :class:`MethodSpec` per method says what the method is: its table function, the settings it
takes (declared once in :data:`SETTINGS`, with defaults and validation), whether its table
depends on the sequence length (and on what exactly), how transformers spells it and which
releases compute it like the reference, and how configs in the wild spell it. Everything else
asks the registry: :func:`inv_freq` dispatch, :class:`~yarn_rope.config.RopeScaling`'s
validation, ``to_hf`` / ``from_hf``, the CLI's choices, the loader and the evaluation's "is this
dynamic" question.

Modelled on transformers' ``ROPE_INIT_FUNCTIONS`` (``rope_type -> pure function``), but typed,
with the settings declared instead of read ad hoc from a config object, and with the facts
that function table leaves implicit (aliases, dynamic behaviour, release differences).

Adding a method: write its pure table function in :mod:`yarn_rope.frequencies`, declare any new
setting in :data:`SETTINGS` (and as a field of ``RopeScaling``), and register a
:class:`MethodSpec` here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch

from . import frequencies as F

__all__ = [
    "CONTEXT_SETTINGS",
    "DYNAMIC_METHODS",
    "METHODS",
    "PREFIX",
    "SETTINGS",
    "MethodSpec",
    "Setting",
    "TransformersSpelling",
    "check_method",
    "default_settings",
    "get",
    "inv_freq",
    "lookup_rope_type",
    "register",
    "registered",
]

Settings = Mapping[str, Any]
"""Normalised values of every setting in :data:`SETTINGS` (what ``RopeScaling`` holds)."""

#: ``rope_type`` prefix for settings vanilla transformers cannot compute; it refuses them (KeyError)
#: instead of silently computing something else, and ``RopeScaling.from_hf`` reads them back.
PREFIX = "yarn_rope."


# ------------------------------------------------------------------------------------------------
# Settings: declared once, validated the same way wherever they come from
# ------------------------------------------------------------------------------------------------


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    def checked(name: str, value: Any) -> Any:
        return None if value is None else check(name, value)

    return checked


def _length(name: str, value: Any) -> int:
    number = F._integer(name, value)
    if number > F.MAX_POSITIONS:
        raise ValueError(
            f"{name}={value!r} is beyond what float64 positions represent exactly ({F.MAX_POSITIONS}); "
            "pass a real context length"
        )
    return number


def _non_negative(name: str, value: Any) -> float:
    number = F._number(name, value)
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return number


def _factor_list(name: str, value: Any) -> tuple[float, ...]:
    return F._check_factor_list(name, value)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting of a scaling method.

    Attributes:
        name: the field name (``RopeScaling`` attribute, ``to_hf`` key).
        default: the value when not given.
        check: ``check(name, value) -> normalised value``; raises TypeError/ValueError naming
            the field and the value.
        doc: one line for tables and help.
    """

    name: str
    default: Any
    check: Callable[[str, Any], Any]
    doc: str


SETTINGS: dict[str, Setting] = {
    setting.name: setting
    for setting in (
        Setting(
            "factor",
            None,
            _optional(F._number),  # its bound (>= 1) is checked with the method's name
            "scale factor s >= 1: extended context / original context",
        ),
        Setting(
            "original_max_position_embeddings",
            None,
            _optional(_length),
            "the context length the model was pretrained with (L)",
        ),
        Setting(
            "max_position_embeddings",
            None,
            _optional(_length),
            "the extended context the scaled model serves (the target)",
        ),
        Setting(
            "beta_fast",
            F.DEFAULT_BETA_FAST,
            F._positive,
            "YaRN: pairs turning this often over L are unchanged",
        ),
        Setting(
            "beta_slow",
            F.DEFAULT_BETA_SLOW,
            F._positive,
            "YaRN: pairs turning this rarely over L are interpolated",
        ),
        Setting(
            "extrapolation_factor", 1.0, _non_negative, "multiplies the extrapolation weight (1 in the paper)"
        ),
        Setting("truncate", True, F._flag, "YaRN: floor/ceil the ramp bounds (True in the authors' code)"),
        Setting(
            "attention_factor",
            None,
            _optional(F._positive),
            "transformers' key: replaces the computed attention scaling",
        ),
        Setting(
            "attn_factor", 1.0, F._positive, "the authors' / vLLM's key: multiplies YaRN's attention scaling"
        ),
        Setting("mscale", None, _optional(F._number), "DeepSeek: numerator multiplier of the log slope"),
        Setting(
            "mscale_all_dim", None, _optional(F._number), "DeepSeek: denominator multiplier of the log slope"
        ),
        Setting(
            "mscale_coefficient",
            F.DEFAULT_MSCALE_COEFFICIENT,
            _non_negative,
            "YaRN: slope of coefficient * ln(s) + 1 (0.1 paper, 0.07 authors' Mistral code)",
        ),
        Setting("finetuned", False, F._flag, "dynamic YaRN: the model was fine-tuned with YaRN at factor"),
        Setting(
            "low_freq_factor",
            None,
            _optional(F._positive),
            "llama3: wavelengths beyond L / this are interpolated",
        ),
        Setting(
            "high_freq_factor",
            None,
            _optional(F._positive),
            "llama3: wavelengths below L / this are unchanged",
        ),
        Setting("short_factor", None, _optional(_factor_list), "longrope: per-pair factors up to L"),
        Setting("long_factor", None, _optional(_factor_list), "longrope: per-pair factors beyond L"),
    )
}

#: Settings every method but ``none`` accepts: the factor and the two context lengths.
CONTEXT_SETTINGS: tuple[str, ...] = ("factor", "original_max_position_embeddings", "max_position_embeddings")

_YARN_RAMP = ("beta_fast", "beta_slow", "extrapolation_factor", "truncate")
_YARN_ATTENTION = ("attention_factor", "attn_factor", "mscale", "mscale_all_dim", "mscale_coefficient")


def default_settings() -> dict[str, Any]:
    """Every setting at its default."""
    return {name: setting.default for name, setting in SETTINGS.items()}


# ------------------------------------------------------------------------------------------------
# The spec
# ------------------------------------------------------------------------------------------------


TableFunction = Callable[
    [int, float, Settings, "int | None", "torch.device | str | None"], "tuple[torch.Tensor, float]"
]
"""``(dim, base, settings, seq_len, device) -> (inv_freq [dim // 2] float32, attention_scaling)``."""


@dataclasses.dataclass(frozen=True)
class TransformersSpelling:
    """How transformers names a method and which releases compute it like the reference.

    Attributes:
        rope_type: its ``rope_type`` (``rope_parameters`` in 5.x, ``rope_scaling`` in 4.x).
        exact: releases checked to compute the reference table from :meth:`RopeScaling.to_hf`.
        differs: known deviations of other supported releases (yarn_rope's patch gives the
            reference numbers on all of them).
        write: ``settings -> rope dict`` in transformers' own keys.
        vanilla: whether vanilla transformers computes exactly these settings (e.g. YaRN with
            ``extrapolation_factor != 1`` it does not); default: always.
    """

    rope_type: str
    exact: str
    write: Callable[[Settings], dict[str, Any]]
    differs: str = ""
    vanilla: Callable[[Settings], bool] | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """Everything about one scaling method.

    Attributes:
        name: yarn_rope's name (``RopeScaling.method``, ``--method``).
        summary: one line for tables and help.
        reference: who proposed it, where.
        table: the table function (see :class:`TableFunction`).
        settings: the method-specific settings it reads, beyond :data:`CONTEXT_SETTINGS`.
        required: settings that must be known (after ``factor`` is derived from the lengths).
        factor_from_lengths: whether a missing ``factor`` is ``max / original``.
        consistent_lengths: whether ``max_position_embeddings`` should equal ``factor * original``
            (a warning when it does not; Llama 3.1 and Phi-3 state independent lengths on purpose).
        dynamic: whether the table depends on the current sequence length.
        threshold: dynamic methods: the longest sequence the initial table serves.
        table_key: dynamic methods: ``(settings, seq_len) -> key``; equal keys mean equal tables.
        aliases: other spellings of the method in configs (``rope_type`` / ``type`` values).
        call_aliases: other keyword names :func:`inv_freq` accepts (``alpha`` for ``factor``).
        transformers: how transformers spells it; ``None`` if it has no equal.
        check: cross-setting validation, ``check(values)``; raises ValueError.
        defaults: typical values of the method's own settings, used when it is applied at a
            factor (comparisons, the CLI): Llama 3.1's frequency bounds for ``llama3``.
        attention: ``(settings, factor or None) -> attention scaling``; ``None``: always 1.
        context: ``settings -> config.max_position_embeddings`` once in force; ``None``: the
            stated target, else ``factor * original``.
        engines: how each serving engine spells the method (``"vllm"``, ``"sglang"``,
            ``"llama.cpp"`` -> :class:`EngineSpelling`), used by :mod:`yarn_rope.export`.
    """

    name: str
    summary: str
    reference: str
    table: TableFunction
    settings: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    factor_from_lengths: bool = True
    consistent_lengths: bool = False
    dynamic: bool = False
    threshold: Callable[[Settings], int | None] | None = None
    table_key: Callable[[Settings, int], Hashable] | None = None
    aliases: tuple[str, ...] = ()
    call_aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    transformers: TransformersSpelling | None = None
    check: Callable[[dict[str, Any]], None] | None = None
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    attention: Callable[[Settings, float | None], float] | None = None
    context: Callable[[Settings], int | None] | None = None
    engines: Mapping[str, EngineSpelling] = dataclasses.field(default_factory=dict)

    @property
    def accepted(self) -> frozenset[str]:
        """Every setting this method reads."""
        context = () if self.name == "none" else CONTEXT_SETTINGS
        return frozenset((*context, *self.settings))

    @property
    def uses_attention_scaling(self) -> bool:
        """Whether the method multiplies cos and sin by a factor other than 1."""
        return "attention_factor" in self.settings

    def vanilla_compatible(self, settings: Settings) -> bool:
        """Whether vanilla transformers computes exactly this table from ``to_hf``."""
        spelling = self.transformers
        return spelling is not None and (spelling.vanilla is None or spelling.vanilla(settings))


_REGISTRY: dict[str, MethodSpec] = {}
_BY_SPELLING: dict[str, str] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry (its name and aliases must be new)."""
    spellings = (spec.name, *spec.aliases)
    taken = [s for s in spellings if s in _BY_SPELLING]
    if taken:
        raise ValueError(f"method spelling(s) {taken} already registered")
    unknown = set(spec.settings) - set(SETTINGS)
    if unknown:
        raise ValueError(
            f"method {spec.name!r} names undeclared settings {sorted(unknown)}; add them to SETTINGS"
        )
    _REGISTRY[spec.name] = spec
    for spelling in spellings:
        _BY_SPELLING[spelling] = spec.name
    return spec


def registered() -> tuple[MethodSpec, ...]:
    """Every registered method, in registration order."""
    return tuple(_REGISTRY.values())


def check_method(method: object) -> str:
    """``method`` if it names a registered method, else a ValueError/TypeError listing them."""
    names = ", ".join(_REGISTRY)
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, one of {names}; got {method!r}")
    if method not in _REGISTRY:
        hint = ""
        normalised = method.strip().lower().replace("_", "-")
        if normalised in _REGISTRY:
            hint = f" (did you mean {normalised!r}?)"
        raise ValueError(f"unknown method {method!r}{hint}; known methods: {names}")
    return method


def get(method: object) -> MethodSpec:
    """The spec of ``method`` (a yarn_rope method name)."""
    return _REGISTRY[check_method(method)]


def lookup_rope_type(rope_type: str) -> MethodSpec | None:
    """The method a config's ``rope_type`` / ``type`` value names, or ``None`` if unknown.

    Reads transformers' spellings (``default``, ``dynamic``, ...), the authors' (``yarn``,
    ``dynamic-yarn``), Phi-3's legacy ``su``, and ours (``yarn_rope.<method>``).
    """
    if rope_type.startswith(PREFIX):
        return _REGISTRY.get(rope_type[len(PREFIX) :])
    found = _BY_SPELLING.get(rope_type)
    return None if found is None else _REGISTRY[found]


#: rope types transformers knows that compute something yarn_rope does not (out of scope).
UNSUPPORTED_ROPE_TYPES: tuple[str, ...] = ("proportional", "mrope", "3d", "axial", "default_3d", "ntk_alpha")


# ------------------------------------------------------------------------------------------------
# Table functions (adapters from settings to the pure functions)
# ------------------------------------------------------------------------------------------------


def _static(function: Callable[..., torch.Tensor], *names: str) -> TableFunction:
    """The table function of a static method without attention scaling: ``function(dim, base=...,
    device=..., <names from the settings>)``, attention scaling 1."""

    def table(
        dim: int, base: float, s: Settings, seq_len: int | None, device: torch.device | str | None
    ) -> tuple[torch.Tensor, float]:
        return function(dim, base=base, device=device, **{name: s[name] for name in names}), 1.0

    return table


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


def _check_llama3(values: dict[str, Any]) -> None:
    low, high = values["low_freq_factor"], values["high_freq_factor"]
    if low is not None and high is not None and high <= low:
        raise ValueError(
            f"high_freq_factor must be > low_freq_factor, got high_freq_factor={high!r}, "
            f"low_freq_factor={low!r}; Llama 3.1 uses low_freq_factor=1, high_freq_factor=4"
        )


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


def _yarn_is_vanilla(s: Settings) -> bool:
    return bool(s["extrapolation_factor"] == 1.0)


def _yarn_attention(s: Settings, factor: float | None) -> float:
    if factor is None:
        factor = s["factor"] if s["factor"] is not None else 1.0
    return yarn_attention_scaling(s, factor)


def _longrope_attention(s: Settings, factor: float | None) -> float:
    return F.longrope_attention_scaling(
        longrope_factor(s), s["original_max_position_embeddings"], attention_factor=s["attention_factor"]
    )


# Writers of transformers' own keys -------------------------------------------------------------


def _write_plain(s: Settings) -> dict[str, Any]:
    return {"rope_type": "default"}


def _write_factor(rope_type: str) -> Callable[[Settings], dict[str, Any]]:
    def write(s: Settings) -> dict[str, Any]:
        return {"rope_type": rope_type, "factor": s["factor"]}

    return write


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


def _write_llama3(s: Settings) -> dict[str, Any]:
    return {
        "rope_type": "llama3",
        "factor": s["factor"],
        "original_max_position_embeddings": s["original_max_position_embeddings"],
        "low_freq_factor": s["low_freq_factor"],
        "high_freq_factor": s["high_freq_factor"],
    }


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


_ALL_RELEASES = "4.45+ (checked 4.45.2, 4.57.6, 5.23.0)"


# ------------------------------------------------------------------------------------------------
# The methods
# ------------------------------------------------------------------------------------------------

register(
    MethodSpec(
        name="none",
        summary="plain RoPE",
        reference="Su et al., RoFormer (2021)",
        table=_static(F.default_inv_freq),
        aliases=("default",),
        transformers=TransformersSpelling("default", exact=_ALL_RELEASES, write=_write_plain),
    )
)
register(
    MethodSpec(
        name="linear",
        summary="every frequency divided by factor (position interpolation)",
        reference="Chen et al. 2023; kaiokendev",
        table=_static(F.linear_inv_freq, "factor"),
        required=("factor",),
        transformers=TransformersSpelling("linear", exact=_ALL_RELEASES, write=_write_factor("linear")),
    )
)
register(
    MethodSpec(
        name="ntk",
        summary="NTK-aware base change base * factor^(dim/(dim-2))",
        reference="bloc97 (2023)",
        table=_static(F.ntk_inv_freq, "factor"),
        required=("factor",),
        call_aliases={"alpha": "factor"},
    )
)
register(
    MethodSpec(
        name="ntk-by-parts",
        summary="the authors' original two-ramp NTK-by-parts (LlamaPartNTKScaledRotaryEmbedding)",
        reference="jquesnelle/yarn, scaled_rope/ (commit 995db5b)",
        table=_static(
            F.ntk_by_parts_inv_freq, "factor", "original_max_position_embeddings", "extrapolation_factor"
        ),
        settings=("extrapolation_factor",),
        required=("factor", "original_max_position_embeddings"),
    )
)
register(
    MethodSpec(
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
        aliases=("dynamic",),
        call_aliases={"alpha": "factor", "max_position_embeddings": "original_max_position_embeddings"},
        transformers=TransformersSpelling(
            "dynamic",
            exact=_ALL_RELEASES + "; its threshold is config.max_position_embeddings",
            write=_write_factor("dynamic"),
        ),
    )
)
register(
    MethodSpec(
        name="yarn",
        summary="ramp between extrapolated and interpolated pairs, attention scaling 0.1 ln s + 1",
        reference="Peng et al., ICLR 2024, section 3.2, and the authors' code",
        table=_yarn_table,
        settings=(*_YARN_RAMP, *_YARN_ATTENTION, "finetuned"),
        required=("factor", "original_max_position_embeddings"),
        consistent_lengths=True,
        check=_check_yarn,
        attention=_yarn_attention,
        transformers=TransformersSpelling(
            "yarn",
            exact="4.57+ (checked 4.57.6, 5.23.0)",
            write=_write_yarn,
            differs="4.51-4.56 take factor as max / original; 4.45-4.50 build the ramp from "
            "max_position_embeddings instead of the original length",
            vanilla=_yarn_is_vanilla,
        ),
    )
)
register(
    MethodSpec(
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
        attention=_yarn_attention,
    )
)
register(
    MethodSpec(
        name="llama3",
        summary="Llama 3.1: wavelength bounds L/high_freq_factor and L/low_freq_factor, ramp in between",
        reference="Meta Llama 3.1 (2024), apply_scaling",
        table=_static(
            F.llama3_inv_freq,
            "factor",
            "original_max_position_embeddings",
            "low_freq_factor",
            "high_freq_factor",
        ),
        settings=("low_freq_factor", "high_freq_factor"),
        required=("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
        check=_check_llama3,
        defaults={"low_freq_factor": 1.0, "high_freq_factor": 4.0},
        transformers=TransformersSpelling("llama3", exact=_ALL_RELEASES, write=_write_llama3),
    )
)
register(
    MethodSpec(
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
        attention=_longrope_attention,
        transformers=TransformersSpelling(
            "longrope",
            exact="5.x (checked 5.23.0)",
            write=_write_longrope,
            differs="4.x takes the attention scaling's factor as max / original whenever the config "
            "states original_max_position_embeddings at its top level (Phi-3 always does), even when "
            "rope_scaling states another factor",
        ),
    )
)

#: Method names, in registration order.
METHODS: tuple[str, ...] = tuple(_REGISTRY)
#: Methods whose table depends on the current sequence length.
DYNAMIC_METHODS: frozenset[str] = frozenset(spec.name for spec in registered() if spec.dynamic)


def spellings() -> tuple[str, ...]:
    """Every ``rope_type`` spelling :func:`lookup_rope_type` reads (besides ``yarn_rope.<method>``)."""
    return tuple(_BY_SPELLING)


# ------------------------------------------------------------------------------------------------
# Validation, computation and writing, for every method alike
# ------------------------------------------------------------------------------------------------


def _owners(setting: str) -> str:
    names = [spec.name for spec in registered() if setting in spec.settings]
    return ", ".join(names)


def validate(method: object, given: Mapping[str, Any]) -> dict[str, Any]:
    """Checked, normalised values of every setting for ``method`` (``RopeScaling``'s validation).

    Each value is checked by its :class:`Setting`; a setting the method does not read must stay
    at its default; the lengths must be consistent; a missing ``factor`` is derived as
    ``max / original`` where the method allows it; then the method's own ``check`` runs.

    Raises:
        ValueError, TypeError: naming the setting, the value and the fix.
    """
    spec = get(method)
    values = default_settings()
    for name, value in given.items():
        if name not in SETTINGS:
            raise TypeError(f"unknown setting {name!r}; settings: {', '.join(SETTINGS)}")
        values[name] = SETTINGS[name].check(name, value)
    ignored = [
        name
        for name, value in values.items()
        if name not in CONTEXT_SETTINGS and name not in spec.accepted and value != SETTINGS[name].default
    ]
    if ignored:
        described = ", ".join(f"{name}={values[name]!r}" for name in ignored)
        owners = "; ".join(f"{name}: {_owners(name)}" for name in ignored)
        raise ValueError(
            f"{described} would have no effect on method {spec.name!r}; these settings apply to other "
            "methods "
            f"({owners}): drop them or choose one of those methods"
        )
    original, target = values["original_max_position_embeddings"], values["max_position_embeddings"]
    if original is not None and target is not None and target < original and spec.name != "none":
        raise ValueError(
            f"max_position_embeddings={target} (the extended context) is shorter than "
            f"original_max_position_embeddings={original}; the target context must be at least the "
            "original one"
        )
    if "original_max_position_embeddings" in spec.required and original is None:
        raise ValueError(
            f"method {spec.name!r} needs original_max_position_embeddings (the context length the model was "
            "pretrained with), e.g. RopeScaling(method='yarn', factor=8.0, "
            "original_max_position_embeddings=4096)"
        )
    values["factor"] = _validated_factor(spec, values, given.get("factor"))
    missing = [name for name in spec.required if values[name] is None]
    if missing:
        raise ValueError(f"method {spec.name!r} needs {', '.join(missing)}")
    if spec.check is not None:
        spec.check(values)
    return values


def _validated_factor(spec: MethodSpec, values: Settings, given: Any) -> float | None:
    factor = values["factor"]
    original, target = values["original_max_position_embeddings"], values["max_position_embeddings"]
    if spec.name == "none":
        if factor is not None and factor != 1.0:
            raise ValueError(f"method 'none' is plain RoPE and takes no factor, got factor={given!r}")
        return 1.0
    if factor is None and spec.factor_from_lengths:
        if original is None or target is None:
            raise ValueError(
                f"method {spec.name!r} needs factor, or max_position_embeddings (the target context) with "
                "original_max_position_embeddings so that factor = target / original"
            )
        factor = target / original
    if factor is None:
        return None
    factor = F._check_factor(factor, method=spec.name)
    extended = factor * (original or 1)
    if extended > F.MAX_POSITIONS:
        raise ValueError(
            f"factor={given!r} extends the context to {extended:.3g} positions, beyond what float64 "
            "positions "
            f"represent exactly ({F.MAX_POSITIONS}); pass the real extension ratio (4 to 32 is typical)"
        )
    return factor


def attention_scaling(spec: MethodSpec, settings: Settings, factor: float | None = None) -> float:
    """The number that multiplies cos and sin under ``spec`` with ``settings`` (at ``factor``)."""
    return 1.0 if spec.attention is None else spec.attention(settings, factor)


def context_length(spec: MethodSpec, settings: Settings) -> int | None:
    """What ``config.max_position_embeddings`` states once ``settings`` are in force (``None``: unchanged)."""
    if spec.name == "none":
        return None
    if spec.context is not None:
        return spec.context(settings)
    target: int | None = settings["max_position_embeddings"]
    if target is not None:
        return target
    factor, original = settings["factor"], settings["original_max_position_embeddings"]
    if factor is not None and original is not None:
        return F.scaled_context(factor, original)
    return None


def compute(
    spec: MethodSpec,
    dim: int,
    base: float,
    settings: Settings,
    seq_len: int | None,
    device: torch.device | str | None,
) -> tuple[torch.Tensor, float]:
    """``spec``'s table, checked: every inverse frequency a normal float32 number.

    Raises:
        ValueError: a table that underflows (a factor too large for this base and dimension).
    """
    table, scaling = spec.table(dim, base, settings, seq_len, device)
    if not table.is_meta:
        smallest = float(table.min())
        if not (math.isfinite(smallest) and smallest >= torch.finfo(torch.float32).tiny):
            raise ValueError(
                f"method {spec.name!r} with factor={settings['factor']!r} and base={base} gives inverse "
                f"frequencies that underflow float32 (smallest {smallest:.3g}); the factor is too large for "
                "this model: pass the real extension ratio"
            )
    return table, float(scaling)


def to_hf(spec: MethodSpec, settings: Settings) -> dict[str, Any]:
    """The rope dict of ``settings``: transformers' keys where it computes them, else ``yarn_rope.*``."""
    if spec.vanilla_compatible(settings):
        assert spec.transformers is not None
        return spec.transformers.write(settings)
    out: dict[str, Any] = {"rope_type": PREFIX + spec.name}
    for name, setting in SETTINGS.items():
        value = settings[name]
        if value is None or (name not in CONTEXT_SETTINGS and value == setting.default):
            continue
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


# ------------------------------------------------------------------------------------------------
# Any method by name
# ------------------------------------------------------------------------------------------------


def inv_freq(method: str, dim: int, *, base: float, **params: Any) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling of any method by name.

    Args:
        method: one of :data:`METHODS`.
        dim: rotary dimension (even).
        base: RoPE base (``rope_theta``).
        **params: the method's settings by their :data:`SETTINGS` names (``alpha`` is accepted
            for ``factor`` by the NTK methods, the authors' name; for ``dynamic-ntk``,
            ``max_position_embeddings`` names the threshold, as in transformers); dynamic
            methods also take ``seq_len`` (the current sequence length); ``device``.

    Returns:
        ``(inv_freq, attention_scaling)``: float32 tensor of shape ``[dim // 2]`` and the float
        that multiplies cos and sin.

    Raises:
        ValueError: unknown method, missing required setting, bad value.
        TypeError: a setting this method does not take, or a value of the wrong type.
    """
    spec = get(method)
    params = dict(params)
    device = params.pop("device", None)
    seq_len = params.pop("seq_len", None) if spec.dynamic else None
    for alias, name in spec.call_aliases.items():
        if alias not in params:
            continue
        value = params.pop(alias)
        if params.get(name) is not None and params[name] != value:
            raise ValueError(
                f"method {method!r} got {name}={params[name]!r} and {alias}={value!r}; {alias} is "
                "another name for the same setting: give one"
            )
        params[name] = value
    unknown = sorted(set(params) - spec.accepted)
    if unknown:
        allowed = ", ".join(sorted(spec.accepted)) or "no settings"
        extra = " (and seq_len)" if spec.dynamic else ""
        raise TypeError(
            f"method {method!r} takes no setting {', '.join(unknown)}; it takes: {allowed}{extra}"
        )
    values = validate(spec.name, params)
    if spec.dynamic:
        if seq_len is None:
            raise ValueError(f"method {method!r} needs seq_len (the current sequence length)")
        seq_len = F._integer("seq_len", seq_len)
    return compute(spec, F._check_dim(dim), F._check_base(base), values, seq_len, device)


# ------------------------------------------------------------------------------------------------
# llama.cpp / GGUF spelling
# ------------------------------------------------------------------------------------------------
#
# Checked against the llama.cpp that llama-cpp-python 0.3.36 vendors (ggml-org/llama.cpp@0c1e57098):
# src/llama-model.cpp (load_hparams: the keys every architecture reads), src/models/*.cpp (the keys
# only some read), src/llama-context.cpp (the YaRN attention factor), ggml/src/ggml-cpu/ops.cpp
# (rope_yarn) and convert_hf_to_gguf.py / conversion/*.py (what converters write).

logger = logging.getLogger(__name__)

LLAMACPP_RELEASE = "0c1e57098 (vendored by llama-cpp-python 0.3.36)"
"""The llama.cpp source the GGUF reading and the llama.cpp spelling were checked against."""

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


def from_gguf_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """A ``config.json``-like dict of the rope settings in GGUF metadata, as llama.cpp reads them.

    * ``yarn_log_multiplier`` is DeepSeek's ``mscale_all_dim`` (not YaRN's temperature slope),
      read only by the architectures that read it (:func:`llamacpp_log_mscales`); elsewhere it
      is ignored with a warning, as llama.cpp ignores it.
    * ``yarn_attn_factor`` is ignored with a warning: llama.cpp overwrites it whenever YaRN is on
      (src/llama-context.cpp), and converters write transformers' ``attention_factor`` (a
      *replacement*) or the authors' ``attn_factor`` (a *multiplier*) there alike.
    * a :data:`GGUF_SETTINGS_KEY` written by :func:`yarn_rope.export` gives the exact settings,
      when it agrees with llama.cpp's own keys (else it is ignored with a warning).

    Args:
        metadata: GGUF key -> value (``general.architecture``, ``{arch}.context_length``,
            ``{arch}.rope.freq_base``, ``{arch}.rope.scaling.*``).

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
    stored = _stored_settings(metadata, arch, scaling)
    out: dict[str, Any] = {"rope_scaling": stored if stored is not None else scaling}
    context = metadata.get(f"{arch}.context_length")
    if context is not None:
        out["max_position_embeddings"] = context
    theta = metadata.get(f"{arch}.rope.freq_base")
    if theta is not None:
        out["rope_theta"] = theta
    return out


def _stored_settings(
    metadata: Mapping[str, Any], arch: str, read: dict[str, Any] | None
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
            architecture=arch, log_multiplier=metadata.get(f"{arch}.rope.scaling.yarn_log_multiplier")
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


@dataclasses.dataclass(frozen=True)
class EngineRelease:
    """A serving engine and the release whose source its spellings were checked against.

    Attributes:
        name: the export target (``"vllm"``, ``"sglang"``, ``"llama.cpp"``).
        title: how people write it.
        release: the release read.
        checked: the files read in it.
    """

    name: str
    title: str
    release: str
    checked: str


ENGINES: dict[str, EngineRelease] = {
    "vllm": EngineRelease(
        "vllm",
        "vLLM",
        "0.33.0",
        "vllm/model_executor/layers/rotary_embedding/__init__.py (get_rope), yarn_scaling_rope.py, "
        "phi3_long_rope_scaled_rope.py; vllm/config/model.py (hf_overrides, _get_and_verify_max_len)",
    ),
    "sglang": EngineRelease(
        "sglang",
        "SGLang",
        "0.5.23",
        "python/sglang/srt/layers/rotary_embedding/factory.py (get_rope), yarn.py; "
        "srt/configs/model_config.py (_derive_context_length); srt/utils/hf_transformers/config.py "
        "(json_model_override_args)",
    ),
    "llama.cpp": EngineRelease(
        "llama.cpp",
        "llama.cpp",
        LLAMACPP_RELEASE,
        "src/llama-context.cpp (YaRN attention factor), src/llama-model.cpp and src/models/*.cpp (GGUF "
        "keys), ggml/src/ggml-cpu/ops.cpp (rope_yarn), common/arg.cpp (flags)",
    ),
}


@dataclasses.dataclass(frozen=True)
class ServeModel:
    """What a spelling needs to know about the model besides its scaling.

    Attributes:
        rope_theta: the model's RoPE base (NTK-aware scaling is served as a new base).
        rotary_dim: the rotated dimensions per head (head dim times the partial-rotary fraction).
        architecture: GGUF ``general.architecture`` of the file llama.cpp serves.
        log_multiplier: that file's ``rope.scaling.yarn_log_multiplier`` (DeepSeek), if any.
    """

    rope_theta: float | None = None
    rotary_dim: int | None = None
    architecture: str | None = None
    log_multiplier: float | None = None


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """One engine's spelling of one scaling.

    Attributes:
        rope: vLLM / SGLang: the ``rope_parameters`` dict; llama.cpp: GGUF keys under
            ``{arch}.rope.`` (``scaling.type``, ``scaling.factor``, ``freq_base``, ...).
        rope_theta: a RoPE base that replaces the model's (NTK-aware scaling), else ``None``.
        notes: one line per setting that needed translating into the engine's terms.
    """

    rope: dict[str, Any]
    rope_theta: float | None = None
    notes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class EngineSpelling:
    """How one engine (the release in :data:`ENGINES`) spells one method.

    Attributes:
        write: ``(settings, model) -> EngineSettings``; called only when ``loses`` is ``None``.
        loses: ``settings -> what the engine would lose`` (one line), ``None`` when it computes
            exactly these settings.
        closest: ``(settings, context) -> ((method, settings), ...)``: static settings the engine
            computes exactly, nearest candidates for ``allow_approximation``; ``None``: none.
    """

    write: Callable[[Settings, ServeModel], EngineSettings] | None
    loses: Callable[[Settings], str | None]
    closest: Callable[[Settings, int | None], tuple[tuple[str, dict[str, Any]], ...]] | None = None


def _exact(s: Settings) -> str | None:
    return None


def _plain(engine: str) -> Callable[[Settings, ServeModel], EngineSettings]:
    def write(s: Settings, model: ServeModel) -> EngineSettings:
        if engine == "llama.cpp":
            return EngineSettings({"scaling.type": "none"})
        return EngineSettings({"rope_type": "default"})

    return write


def _linear(engine: str) -> Callable[[Settings, ServeModel], EngineSettings]:
    def write(s: Settings, model: ServeModel) -> EngineSettings:
        if engine == "llama.cpp":
            return EngineSettings({"scaling.type": "linear", "scaling.factor": s["factor"]})
        return EngineSettings({"rope_type": "linear", "factor": s["factor"]})

    return write


def _ntk_theta(factor: float, model: ServeModel) -> float:
    if model.rotary_dim is None or model.rope_theta is None:
        raise ValueError(
            "NTK-aware scaling is served as plain RoPE with the base rope_theta * factor^(d / (d - 2)), "
            "which needs the model's rotary dimension d and rope_theta: pass rotary_dim= and rope_theta="
        )
    return F._ntk_base(model.rotary_dim, model.rope_theta, factor)


def _ntk(engine: str) -> Callable[[Settings, ServeModel], EngineSettings]:
    def write(s: Settings, model: ServeModel) -> EngineSettings:
        theta = _ntk_theta(s["factor"], model)
        note = (
            f"NTK-aware scaling is plain RoPE with base {model.rope_theta:g} * "
            f"{s['factor']:g}^({model.rotary_dim}/{model.rotary_dim - 2 if model.rotary_dim else 0}) = "
            f"{theta:.9g}"
        )
        if engine == "llama.cpp":
            return EngineSettings(
                {"scaling.type": "none", "freq_base": theta}, rope_theta=theta, notes=(note,)
            )
        own = " (vLLM's own 'ntk' type computes another formula)" if engine == "vllm" else ""
        return EngineSettings({"rope_type": "default"}, rope_theta=theta, notes=(note + own,))

    return write


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


def _vllm_yarn(s: Settings, model: ServeModel) -> EngineSettings:
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
    return EngineSettings(rope, notes=tuple(notes))


def _vllm_yarn_loses(s: Settings) -> str | None:
    if s["extrapolation_factor"] != 1.0:
        return (
            f"extrapolation_factor={s['extrapolation_factor']:g}: vLLM 0.33.0's YaRN has no such setting (it "
            "always extrapolates fully), so the ramp pairs would be computed with 1"
        )
    return None


def _sglang_yarn(s: Settings, model: ServeModel) -> EngineSettings:
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
    return EngineSettings(rope, notes=notes)


def _llamacpp_yarn(s: Settings, model: ServeModel) -> EngineSettings:
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
    return EngineSettings(keys, notes=notes)


def _llamacpp_yarn_loses(s: Settings) -> str | None:
    if not s["truncate"]:
        return (
            "truncate=False: ggml always floors and ceils the ramp bounds (ggml_rope_yarn_corr_dims), so "
            "the fractional bounds would be rounded"
        )
    return None


def _rope_list(engine: str) -> Callable[[Settings, ServeModel], EngineSettings]:
    def write(s: Settings, model: ServeModel) -> EngineSettings:
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
            f"short_mscale = long_mscale = {attention:.9g}: {ENGINES[engine].title} would otherwise derive "
            "them from max_position_embeddings / original_max_position_embeddings"
        )
        return EngineSettings(rope, notes=(note,))

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
            f"{ENGINES[engine].title} {ENGINES[engine].release} serves LongRoPE {how}; transformers and "
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


def _llama3(s: Settings, model: ServeModel) -> EngineSettings:
    return EngineSettings(_write_llama3(s))


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


def _llamacpp_longrope_loses(s: Settings) -> str | None:
    return (
        "llama.cpp applies LongRoPE through rope_long / rope_short tensors that convert_hf_to_gguf.py "
        "writes, chosen by the context size, not the sequence; no flag or metadata key spells the per-pair "
        "factors"
    )


def _no_engine(what: str) -> Callable[[Settings], str | None]:
    def loses(s: Settings) -> str | None:
        return what

    return loses


_NO_DYNAMIC_YARN = (
    "no serving engine computes dynamic YaRN: it would serve one static table for every length, so "
    "sequences within the original context would not get plain RoPE and the factor would not follow the "
    "sequence length"
)
_NO_DYNAMIC_NTK = (
    "no serving engine grows the NTK base with the sequence (vLLM's and SGLang's 'dynamic' build one table "
    "at the longest context; llama.cpp has none): it would serve one static base for every length"
)
_NO_NTK_BY_PARTS = (
    "no serving engine computes the authors' two-ramp NTK-by-parts (NTK-aware pairs blended into "
    "interpolated ones, then unchanged ones blended back)"
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
            "context_length= (--context-length)"
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


_ENGINE_NAMES = ("vllm", "sglang", "llama.cpp")


def _engine_table() -> dict[str, dict[str, EngineSpelling]]:
    table: dict[str, dict[str, EngineSpelling]] = {}
    table["none"] = {e: EngineSpelling(_plain(e), _exact) for e in _ENGINE_NAMES}
    table["linear"] = {e: EngineSpelling(_linear(e), _exact) for e in _ENGINE_NAMES}
    table["ntk"] = {e: EngineSpelling(_ntk(e), _exact) for e in _ENGINE_NAMES}
    table["ntk-by-parts"] = {
        e: EngineSpelling(None, _no_engine(_NO_NTK_BY_PARTS), _ntk_by_parts_closest) for e in _ENGINE_NAMES
    }
    table["dynamic-ntk"] = {
        e: EngineSpelling(None, _no_engine(_NO_DYNAMIC_NTK), _dynamic_ntk_closest) for e in _ENGINE_NAMES
    }
    table["yarn"] = {
        "vllm": EngineSpelling(_vllm_yarn, _vllm_yarn_loses, _yarn_static_closest),
        "sglang": EngineSpelling(_sglang_yarn, _exact),
        "llama.cpp": EngineSpelling(_llamacpp_yarn, _llamacpp_yarn_loses, _yarn_static_closest),
    }
    table["dynamic-yarn"] = {
        e: EngineSpelling(None, _no_engine(_NO_DYNAMIC_YARN), _dynamic_yarn_closest) for e in _ENGINE_NAMES
    }
    table["llama3"] = {
        "vllm": EngineSpelling(_llama3, _exact),
        "sglang": EngineSpelling(_llama3, _exact),
        "llama.cpp": EngineSpelling(None, _llamacpp_llama3_loses, _llama3_closest),
    }
    table["longrope"] = {
        "vllm": EngineSpelling(_rope_list("vllm"), _longrope_loses("vllm"), _longrope_closest),
        "sglang": EngineSpelling(_rope_list("sglang"), _longrope_loses("sglang"), _longrope_closest),
        "llama.cpp": EngineSpelling(None, _llamacpp_longrope_loses),
    }
    return table


# The spellings join each method's registry entry (defined above them, so filled in here).
for _name, _spellings in _engine_table().items():
    _REGISTRY[_name] = dataclasses.replace(_REGISTRY[_name], engines=_spellings)
del _name, _spellings
