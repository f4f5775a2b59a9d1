"""The settings of every method: declared once, validated the same way wherever they come from.

Each :class:`Setting` names a ``RopeScaling`` field, its default, its check and one line of help;
the CLI's flags and ``RopeScaling``'s fields are read from :data:`SETTINGS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from .. import frequencies as F

Settings = Mapping[str, Any]
"""Normalised values of every setting in :data:`SETTINGS` (what ``RopeScaling`` holds)."""

#: ``rope_type`` prefix for settings vanilla transformers cannot compute; it refuses them (KeyError)
#: instead of silently computing something else, and ``RopeScaling.from_hf`` reads them back.
PREFIX = "yarn_rope."


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
