"""Rope scaling settings: one validated, frozen description, read from and written to HF configs.

``RopeScaling`` says *how* the rotary frequencies of a model are scaled (method, factor, lengths,
YaRN's ramp and attention-factor knobs). It does not hold model properties (head dimension,
``rope_theta``, partial rotary): those come from the model. It reads every dialect found in the
wild (:meth:`RopeScaling.from_hf`) and writes what vanilla transformers reads back
(:meth:`RopeScaling.to_hf`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from . import frequencies as F

__all__ = ["HF_ROPE_TYPES", "PREFIX", "RopeScaling"]

logger = logging.getLogger(__name__)

#: Our method name -> the ``rope_type`` transformers uses for the same computation.
HF_ROPE_TYPES: dict[str, str] = {
    "none": "default",
    "linear": "linear",
    "dynamic-ntk": "dynamic",
    "yarn": "yarn",
}
#: ``rope_type`` prefix for settings vanilla transformers cannot compute; it refuses them (KeyError)
#: instead of silently computing something else, and :meth:`RopeScaling.from_hf` reads them back.
PREFIX = "yarn_rope."

# Spellings of the method in configs found in the wild -> our method name.
_ALIASES: dict[str, str] = {
    "default": "none",
    "none": "none",
    "linear": "linear",
    "dynamic": "dynamic-ntk",
    "dynamic-ntk": "dynamic-ntk",
    "ntk": "ntk",
    "ntk-by-parts": "ntk-by-parts",
    "yarn": "yarn",
    "dynamic-yarn": "dynamic-yarn",
}
# rope types that exist in transformers but compute something other than our methods.
_OTHER_HF_TYPES = ("llama3", "longrope", "su", "proportional", "mrope", "3d", "axial", "default_3d")
# Keys that describe the model's rotary layout, not its scaling: read elsewhere, not here.
_MODEL_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
_CONFIG_KEYS = ("rope_parameters", "rope_scaling", "max_position_embeddings")
_FACTOR_METHODS = ("linear", "ntk", "ntk-by-parts", "dynamic-ntk", "yarn")
_YARN_ONLY = F.YARN_SETTINGS
_ALWAYS_WRITTEN = ("factor", "original_max_position_embeddings", "max_position_embeddings")
_NEEDS_ORIGINAL = ("ntk-by-parts", "dynamic-ntk", "yarn", "dynamic-yarn")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """How a model's rotary frequencies are scaled. Frozen, keyword-only, validated on creation.

    Attributes:
        method: one of ``none``, ``linear``, ``ntk``, ``ntk-by-parts``, ``dynamic-ntk``, ``yarn``,
            ``dynamic-yarn``.
        factor: scale factor ``s >= 1`` (extended / original length). If omitted it is derived
            as ``max_position_embeddings / original_max_position_embeddings``. Dynamic YaRN:
            the fine-tuned factor (only with ``finetuned``). ``none``: always 1.
        original_max_position_embeddings: pretrained context length ``L``; YaRN's ramp is built
            from it. Dynamic NTK: the length beyond which the base grows.
        max_position_embeddings: the extended context length the scaled model serves (the
            "target"); optional. When it disagrees with ``factor * L`` a warning is logged and
            ``factor`` wins, as in transformers 5 (Qwen2.5 documents factor 4 with
            ``L = max_position_embeddings = 32768`` on purpose). Dynamic YaRN: the length up to
            which the fine-tuned factor holds.
        beta_fast, beta_slow: YaRN ramp bounds in rotations over ``L`` (32 and 1 in the paper;
            128 and 2 in the authors' Mistral code).
        extrapolation_factor: multiplies YaRN's extrapolation weight (1 in the paper).
        truncate: floor/ceil the ramp bounds (True in the paper).
        attention_factor: transformers' override that *replaces* YaRN's attention factor.
        attn_factor: the authors'/vLLM's multiplier of YaRN's attention factor.
        mscale, mscale_all_dim: DeepSeek's ratio form of the attention factor.
        mscale_coefficient: slope of ``coefficient * ln(s) + 1`` (0.1 paper, 0.07 authors'
            Mistral code).
        finetuned: dynamic YaRN only: the model was fine-tuned with YaRN at ``factor``.

    Raises:
        ValueError, TypeError: on creation, for any bad value, naming the field, the value and
            the fix.
    """

    method: str = "yarn"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int | None = None
    beta_fast: float = F.DEFAULT_BETA_FAST
    beta_slow: float = F.DEFAULT_BETA_SLOW
    extrapolation_factor: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None
    attn_factor: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    mscale_coefficient: float = F.DEFAULT_MSCALE_COEFFICIENT
    finetuned: bool = False

    def __post_init__(self) -> None:
        method = F.check_method(self.method)
        set_ = self._set

        original = self.original_max_position_embeddings
        if original is not None:
            original = F._integer("original_max_position_embeddings", original)
            set_("original_max_position_embeddings", original)
        target = self.max_position_embeddings
        if target is not None:
            target = F._integer("max_position_embeddings", target)
            set_("max_position_embeddings", target)
        if method in _NEEDS_ORIGINAL and original is None:
            raise ValueError(
                f"method {method!r} needs original_max_position_embeddings (the context length the "
                "model was pretrained with), e.g. RopeScaling(method='yarn', factor=8.0, "
                "original_max_position_embeddings=4096)"
            )
        if original is not None and target is not None and target < original and method != "none":
            raise ValueError(
                f"max_position_embeddings={target} (the extended context) is shorter than "
                f"original_max_position_embeddings={original}; the target context must be at least "
                "the original one"
            )

        factor = self.factor
        if method == "none":
            if factor is not None and F._number("factor", factor) != 1.0:
                raise ValueError(f"method 'none' is plain RoPE and takes no factor, got factor={factor!r}")
            factor = 1.0
        elif factor is None and method != "dynamic-yarn":
            if original is None or target is None:
                raise ValueError(
                    f"method {method!r} needs factor, or max_position_embeddings (the target context) "
                    "with original_max_position_embeddings so that factor = target / original"
                )
            factor = target / original
        if factor is not None:
            factor = F._check_factor(factor, method=method)
        set_("factor", factor)
        uses_factor = method == "yarn" or (method == "dynamic-yarn" and self.finetuned)
        if uses_factor and factor is not None and original and target:
            implied = target / original
            if not math.isclose(implied, factor, rel_tol=1e-9):
                logger.warning(
                    "RopeScaling: factor=%s disagrees with max_position_embeddings / "
                    "original_max_position_embeddings = %s / %s = %s; using factor=%s (as "
                    "transformers 5 does)",
                    factor,
                    target,
                    original,
                    implied,
                    factor,
                )
        if method == "dynamic-yarn" and self.finetuned and factor is None and target is None:
            raise ValueError(
                "dynamic-yarn with finetuned=True needs the fine-tuned factor or "
                "max_position_embeddings (factor = max_position_embeddings / original)"
            )

        fast, slow = F._check_betas(self.beta_fast, self.beta_slow)
        set_("beta_fast", fast)
        set_("beta_slow", slow)
        extrapolation = F._number("extrapolation_factor", self.extrapolation_factor)
        if extrapolation < 0:
            raise ValueError(f"extrapolation_factor must be >= 0, got {self.extrapolation_factor!r}")
        set_("extrapolation_factor", extrapolation)
        set_("truncate", F._flag("truncate", self.truncate))
        set_("finetuned", F._flag("finetuned", self.finetuned))
        set_("attn_factor", F._positive("attn_factor", self.attn_factor))
        if self.attention_factor is not None:
            set_("attention_factor", F._positive("attention_factor", self.attention_factor))
        for name in ("mscale", "mscale_all_dim"):
            if getattr(self, name) is not None:
                set_(name, F._number(name, getattr(self, name)))
        coefficient = F._number("mscale_coefficient", self.mscale_coefficient)
        if coefficient < 0:
            raise ValueError(f"mscale_coefficient must be >= 0, got {self.mscale_coefficient!r}")
        set_("mscale_coefficient", coefficient)
        if method in ("yarn", "dynamic-yarn"):
            # Checks the attention-factor knobs together (e.g. attention_factor with attn_factor).
            self.attention_scale(self.factor if self.factor is not None else 1.0)
        else:
            defaults = RopeScaling.__dataclass_fields__
            ignored = [
                name
                for name in _YARN_ONLY
                if getattr(self, name) != defaults[name].default
                and not (name == "extrapolation_factor" and method == "ntk-by-parts")
            ]
            if ignored:
                raise ValueError(
                    f"{', '.join(f'{n}={getattr(self, n)!r}' for n in ignored)} only apply to the YaRN "
                    f"methods and would have no effect on method {method!r}; drop them or use method='yarn'"
                )

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)

    # ----------------------------------------------------------------------------------------
    # Tables
    # ----------------------------------------------------------------------------------------

    @property
    def is_dynamic(self) -> bool:
        """Whether the table depends on the current sequence length."""
        return self.method in F.DYNAMIC_METHODS

    def attention_scale(self, factor: float) -> float:
        """YaRN's attention factor at scale ``factor`` with these settings (1.0 for other methods)."""
        if self.method not in ("yarn", "dynamic-yarn"):
            return 1.0
        return F.yarn_attention_factor(
            factor,
            attention_factor=self.attention_factor,
            attn_factor=self.attn_factor,
            mscale=self.mscale,
            mscale_all_dim=self.mscale_all_dim,
            mscale_coefficient=self.mscale_coefficient,
        )

    def threshold(self) -> int | None:
        """Dynamic methods: the longest sequence served by the initial table; ``None`` if static."""
        if self.method == "dynamic-ntk":
            return self.original_max_position_embeddings
        if self.method == "dynamic-yarn":
            assert self.original_max_position_embeddings is not None  # checked in __post_init__
            if self.max_position_embeddings is not None:
                return self.max_position_embeddings
            if self.finetuned and self.factor is not None:
                return round(self.factor * self.original_max_position_embeddings)
            return self.original_max_position_embeddings
        return None

    def dynamic_factor(self, seq_len: int) -> float:
        """Dynamic YaRN's scale factor at ``seq_len`` (see :func:`yarn_rope.dynamic_factor`)."""
        if self.method != "dynamic-yarn":
            raise ValueError(f"dynamic_factor applies to method 'dynamic-yarn', not {self.method!r}")
        assert self.original_max_position_embeddings is not None
        return F.dynamic_factor(
            seq_len,
            original_max_position_embeddings=self.original_max_position_embeddings,
            max_position_embeddings=self.threshold(),
            factor=self.factor,
            finetuned=self.finetuned,
        )

    def params(self) -> dict[str, Any]:
        """Settings of this method as keyword arguments of :func:`yarn_rope.inv_freq`."""
        m = self.method
        if m == "none":
            return {}
        if m in ("linear", "ntk"):
            return {"factor": self.factor}
        if m == "ntk-by-parts":
            return {
                "factor": self.factor,
                "original_max_position_embeddings": self.original_max_position_embeddings,
                "extrapolation_factor": self.extrapolation_factor,
            }
        if m == "dynamic-ntk":
            return {
                "factor": self.factor,
                "original_max_position_embeddings": self.original_max_position_embeddings,
            }
        params: dict[str, Any] = {
            "factor": self.factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
            "extrapolation_factor": self.extrapolation_factor,
            "truncate": self.truncate,
            "attention_factor": self.attention_factor,
            "attn_factor": self.attn_factor,
            "mscale": self.mscale,
            "mscale_all_dim": self.mscale_all_dim,
            "mscale_coefficient": self.mscale_coefficient,
        }
        if m == "dynamic-yarn":
            params.update(max_position_embeddings=self.threshold(), finetuned=self.finetuned)
        return params

    def inv_freq(
        self,
        dim: int,
        *,
        base: float,
        seq_len: int | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, float]:
        """Table of these settings for a rotary dimension ``dim`` and base ``base``.

        Args:
            dim: rotary dimension (even).
            base: RoPE base (``rope_theta``).
            seq_len: dynamic methods: current sequence length (default: the threshold, i.e. the
                initial table). Ignored by static methods.
            device: where to build it.

        Returns:
            ``(inv_freq [dim // 2] float32, attention_factor)``.
        """
        params = self.params()
        if self.is_dynamic:
            params["seq_len"] = seq_len if seq_len is not None else self.threshold()
        return F.inv_freq(self.method, dim, base=base, device=device, **params)

    # ----------------------------------------------------------------------------------------
    # Dictionaries
    # ----------------------------------------------------------------------------------------

    def replace(self, **changes: Any) -> RopeScaling:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """All fields, JSON-serialisable."""
        return dataclasses.asdict(self)

    def vanilla_compatible(self) -> bool:
        """Whether vanilla transformers computes exactly this table from :meth:`to_hf`."""
        return self.method in HF_ROPE_TYPES and not (
            self.method == "yarn" and self.extrapolation_factor != 1.0
        )

    def to_hf(self) -> dict[str, Any]:
        """The ``rope_parameters`` (transformers 5) / ``rope_scaling`` (4.x) dict of these settings.

        Settings vanilla transformers computes (``none``, ``linear``, ``dynamic-ntk`` as
        ``"dynamic"``, ``yarn``) are written with its own keys, so that it rebuilds the same table;
        YaRN's ``attn_factor`` and ``mscale_coefficient``, which it does not know, are folded
        into ``attention_factor``. Dynamic NTK reads its threshold from
        ``config.max_position_embeddings``, which must then equal
        ``original_max_position_embeddings``. Everything else (``ntk``, ``ntk-by-parts``,
        ``dynamic-yarn``, YaRN with ``extrapolation_factor != 1``) gets ``rope_type``
        ``"yarn_rope.<method>"`` with every non-default setting: vanilla transformers refuses it
        (KeyError on the unknown type) instead of silently computing something else, and
        :meth:`from_hf` reads it back exactly. ``rope_theta`` is the model's, not written here.
        """
        if not self.vanilla_compatible():
            out: dict[str, Any] = {"rope_type": PREFIX + self.method}
            defaults = RopeScaling(method="none")
            for field in dataclasses.fields(self):
                value = getattr(self, field.name)
                if field.name == "method" or value is None:
                    continue
                if field.name in _ALWAYS_WRITTEN or value != getattr(defaults, field.name):
                    out[field.name] = value
            return out
        rope_type = HF_ROPE_TYPES[self.method]
        if self.method == "none":
            return {"rope_type": rope_type}
        if self.method in ("linear", "dynamic-ntk"):
            return {"rope_type": rope_type, "factor": self.factor}
        out = {
            "rope_type": rope_type,
            "factor": self.factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
        }
        if not self.truncate:
            out["truncate"] = False
        if self.attn_factor != 1.0 or self.mscale_coefficient != F.DEFAULT_MSCALE_COEFFICIENT:
            assert self.factor is not None
            out["attention_factor"] = self.attention_scale(self.factor)
        else:
            for name in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(self, name) is not None:
                    out[name] = getattr(self, name)
        return out

    @classmethod
    def from_hf(cls, config: Any, *, layer_type: str | None = None) -> RopeScaling:
        """Read the scaling a config declares, in any dialect found in the wild.

        Args:
            config: a transformers config object (5.x ``rope_parameters`` or 4.x
                ``rope_scaling``), a ``config.json`` dict, or a bare scaling dict:
                transformers' (``rope_type`` or ``type``), NousResearch's
                (``{"type": "yarn" | "dynamic-yarn", "factor", "original_max_position_embeddings",
                "finetuned"}``), or ours (:meth:`to_hf`).
            layer_type: for configs with one rope dict per layer type (Gemma3, ...), which one
                to read; default ``"full_attention"``.

        Returns:
            the settings; ``method="none"`` when the config declares no scaling.

        Raises:
            ValueError: a scaling yarn_rope does not compute (llama3, longrope, multimodal
                ``mrope_section``), missing required keys, bad values.
            TypeError: ``config`` is neither a config nor a dict.
        """
        scaling, context = _split_config(config)
        if scaling is None:
            return cls(method="none")
        scaling = _pick_layer_type(scaling, context, layer_type)
        return _parse(cls, scaling, context)


def _split_config(config: Any) -> tuple[Mapping[str, Any] | None, dict[str, Any]]:
    """(scaling dict or None, config-level values) from a config object or dict."""
    if isinstance(config, Mapping):
        # A bare scaling dict names its type (and may carry max_position_embeddings, see to_hf).
        is_config = "rope_type" not in config and "type" not in config
        if not (is_config and any(key in config for key in _CONFIG_KEYS)):
            return config, {}
        get = config.get
    elif hasattr(config, "to_dict") and (
        hasattr(config, "rope_parameters")
        or hasattr(config, "rope_scaling")
        or hasattr(config, "max_position_embeddings")
    ):

        def get(key: str, default: Any = None) -> Any:
            return getattr(config, key, default)

    else:
        raise TypeError(
            f"RopeScaling.from_hf expects a transformers config or a dict, got {type(config).__name__}"
        )
    scaling = get("rope_parameters", None) or get("rope_scaling", None)
    context = {
        "max_position_embeddings": get("max_position_embeddings", None),
        # Phi-3 keeps the pretrained length at the config's top level; transformers prefers it.
        "original_max_position_embeddings": get("original_max_position_embeddings", None),
        "layer_types": get("layer_types", None),
    }
    return scaling, context


def _pick_layer_type(
    scaling: Mapping[str, Any], context: dict[str, Any], layer_type: str | None
) -> Mapping[str, Any]:
    nested = [key for key, value in scaling.items() if isinstance(value, Mapping)]
    if not nested:
        if layer_type is not None:
            raise ValueError(
                f"layer_type={layer_type!r} given, but the config has one rope dict for all layers"
            )
        return scaling
    wanted = layer_type or "full_attention"
    if wanted not in scaling or not isinstance(scaling[wanted], Mapping):
        raise ValueError(
            f"the config holds one rope dict per layer type ({', '.join(nested)}) and none for "
            f"{wanted!r}; pass layer_type= one of them"
        )
    picked: Mapping[str, Any] = scaling[wanted]
    return picked


def _parse(cls: type[RopeScaling], scaling: Mapping[str, Any], context: dict[str, Any]) -> RopeScaling:
    if not isinstance(scaling, Mapping):
        raise TypeError(f"rope scaling must be a dict, got {scaling!r}")
    if "mrope_section" in scaling:
        raise ValueError(
            "multimodal RoPE (mrope_section) is out of scope for yarn_rope: its sections rotate "
            "with separate position streams"
        )
    declared = scaling.get("rope_type") or scaling.get("type") or "default"
    if not isinstance(declared, str):
        raise TypeError(f"rope_type must be a string, got {declared!r}")
    if declared.startswith(PREFIX):
        method = F.check_method(declared[len(PREFIX) :])
    elif declared in _ALIASES:
        method = _ALIASES[declared]
    elif declared in _OTHER_HF_TYPES:
        raise ValueError(
            f"rope_type {declared!r} is a scaling yarn_rope does not compute; yarn_rope reads "
            f"{', '.join(sorted(_ALIASES))}. Replace it explicitly, e.g. RopeScaling(method='yarn', ...)"
        )
    else:
        raise ValueError(f"unknown rope_type {declared!r}; yarn_rope reads {', '.join(sorted(_ALIASES))}")

    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {"method": method}
    unknown = []
    for key, value in scaling.items():
        if key in _MODEL_KEYS:
            continue
        if key in fields and key != "method":
            kwargs[key] = value
        else:
            unknown.append(key)
    if unknown:
        logger.warning("RopeScaling.from_hf: ignoring keys %s of rope type %r", sorted(unknown), declared)
    if method == "none":
        return cls(method="none")
    # transformers treats beta_fast/beta_slow of None (or 0) as "use the default".
    for name in ("beta_fast", "beta_slow"):
        if name in kwargs and kwargs[name] in (None, 0):
            del kwargs[name]
    for name in ("attention_factor", "mscale", "mscale_all_dim", "factor"):
        if kwargs.get(name, 0) is None:
            del kwargs[name]

    max_positions = context.get("max_position_embeddings")
    if method == "dynamic-ntk":
        # transformers' "dynamic" grows past config.max_position_embeddings, the trained length.
        if kwargs.get("original_max_position_embeddings") is None:
            if max_positions is None:
                raise ValueError(
                    "dynamic NTK scaling needs the trained context length: "
                    "original_max_position_embeddings, or the config's max_position_embeddings"
                )
            kwargs["original_max_position_embeddings"] = max_positions
        kwargs.pop("max_position_embeddings", None)
        return cls(**kwargs)

    top_level_original = context.get("original_max_position_embeddings")
    if top_level_original is not None:
        kwargs["original_max_position_embeddings"] = top_level_original
    if method in _NEEDS_ORIGINAL and kwargs.get("original_max_position_embeddings") is None:
        if max_positions is None:
            raise ValueError(
                f"rope type {declared!r} needs original_max_position_embeddings (the pretrained "
                "context length); the config states neither it nor max_position_embeddings"
            )
        logger.warning(
            "rope type %r states no original_max_position_embeddings; taking the config's "
            "max_position_embeddings=%s as the original length (as transformers does)",
            declared,
            max_positions,
        )
        kwargs["original_max_position_embeddings"] = max_positions
    if kwargs.get("max_position_embeddings") is None and max_positions is not None:
        kwargs["max_position_embeddings"] = max_positions
    if (
        method in _FACTOR_METHODS
        and kwargs.get("factor") is None
        and kwargs.get("max_position_embeddings") is None
    ):
        raise ValueError(f"rope type {declared!r} needs factor; the config states none")
    return cls(**kwargs)
