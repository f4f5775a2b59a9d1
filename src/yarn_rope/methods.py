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
        engines: per-engine spellings for serving (filled by :mod:`yarn_rope.export`).
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
    engines: Mapping[str, Any] = dataclasses.field(default_factory=dict)

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

#: GGUF metadata keys under ``{arch}.rope.scaling.`` (llama.cpp's spelling, the ``gguf`` package's
#: ``Keys.Rope``) -> yarn_rope setting.
GGUF_SCALING_KEYS: dict[str, str] = {
    "factor": "factor",
    "original_context_length": "original_max_position_embeddings",
    "finetuned": "finetuned",
    "attn_factor": "attn_factor",
    "yarn_attn_factor": "attn_factor",
    "yarn_beta_fast": "beta_fast",
    "yarn_beta_slow": "beta_slow",
    "yarn_ext_factor": "extrapolation_factor",
    "yarn_log_multiplier": "mscale_coefficient",
}


def from_gguf_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """A ``config.json``-like dict of the rope settings in GGUF metadata.

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
    out: dict[str, Any] = {"rope_scaling": scaling}
    context = metadata.get(f"{arch}.context_length")
    if context is not None:
        out["max_position_embeddings"] = context
    theta = metadata.get(f"{arch}.rope.freq_base")
    if theta is not None:
        out["rope_theta"] = theta
    return out
