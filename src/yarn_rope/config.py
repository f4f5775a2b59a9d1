"""Rope scaling settings: one validated, frozen description, and the one reader of rope settings.

:class:`RopeScaling` says *how* the rotary frequencies of a model are scaled (method, factor,
lengths, each method's knobs). It does not hold model properties (head dimension,
``rope_theta``, partial rotary): those come from the model. What each method takes and how it
is validated, spelled and written back lives in the registry (:mod:`yarn_rope.methods`).

:func:`read_rope` is the one reader of what a configuration declares about its rotary embedding,
whatever the source: a transformers 5 config (``rope_parameters``, incl. one dict per layer
type), a 4.x config (``rope_scaling`` and a top-level ``rope_theta``), a ``config.json`` dict in
either dialect (or both at once), a bare scaling dict (transformers', NousResearch's, ours), or
GGUF metadata (``{arch}.rope.*``). The patch, the loader and the evaluation all read through it.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from . import _compat
from . import frequencies as F
from . import methods as M

__all__ = ["PREFIX", "RopeDeclaration", "RopeScaling", "original_length_fallback", "read_rope"]

logger = logging.getLogger(__name__)

PREFIX = M.PREFIX

# Keys of a rope dict that describe the model's rotary layout, not its scaling.
MODEL_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")
_MULTIMODAL_TYPES = ("mrope", "3d", "default_3d")
# Set while RopeScaling.replace() copies settings whose lengths it already warned about.
_QUIET_LENGTHS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "yarn_rope_quiet_lengths", default=False
)


def _warn(message: str, *args: Any) -> None:
    logger.warning(message, *args)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """How a model's rotary frequencies are scaled. Frozen, keyword-only, validated on creation.

    Which settings a method takes, their defaults and checks are declared in
    :data:`yarn_rope.methods.SETTINGS`; a setting a method does not read is an error, not
    silently ignored.

    Attributes:
        method: one of :data:`yarn_rope.METHODS`.
        factor: scale factor ``s >= 1`` (extended / original length). If omitted it is derived
            as ``max_position_embeddings / original_max_position_embeddings``. Dynamic YaRN:
            the fine-tuned factor (only with ``finetuned``). LongRoPE: the factor of its
            attention scaling (default ``max / original``). ``none``: always 1.
        original_max_position_embeddings: pretrained context length ``L``; YaRN's ramp is built
            from it. Dynamic NTK: the length beyond which the base grows.
        max_position_embeddings: the extended context length the scaled model serves (the
            "target"); optional. For YaRN, when it disagrees with ``factor * L`` a warning is
            logged once and ``factor`` wins, as in transformers 5 (Qwen2.5 documents factor 4 with
            ``L = max_position_embeddings = 32768`` on purpose). Dynamic YaRN fine-tuned: the
            length up to which the fine-tuned factor holds; not fine-tuned: only the target (the
            factor is ``max(1, seq_len / L)``, the paper's rule).
        beta_fast, beta_slow: YaRN ramp bounds in rotations over ``L`` (32 and 1 in the paper;
            128 and 2 in the authors' Mistral code).
        extrapolation_factor: multiplies the extrapolation weight (1 in the paper).
        truncate: floor/ceil the YaRN ramp bounds (True in the authors' code).
        attention_factor: transformers' key that *replaces* the computed attention scaling
            (YaRN, LongRoPE).
        attn_factor: the authors'/vLLM's multiplier of YaRN's attention scaling.
        mscale, mscale_all_dim: DeepSeek's ratio form of YaRN's attention scaling.
        mscale_coefficient: slope of ``coefficient * ln(s) + 1`` (0.1 paper, 0.07 authors'
            Mistral code).
        finetuned: dynamic YaRN only: the model was fine-tuned with YaRN at ``factor``.
        low_freq_factor, high_freq_factor: llama3: wavelengths beyond ``L / low_freq_factor``
            are interpolated, below ``L / high_freq_factor`` unchanged.
        short_factor, long_factor: longrope: one factor per rotary pair, used up to ``L`` and
            beyond it.

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
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        given = {name: getattr(self, name) for name in M.SETTINGS}
        values = M.validate(self.method, given)
        for name, value in values.items():
            object.__setattr__(self, name, value)
        spec = self.spec
        factor, original, target = (
            self.factor,
            self.original_max_position_embeddings,
            self.max_position_embeddings,
        )
        # A dynamic method's factor follows the sequence: its lengths agree only once fine-tuned.
        consistent = spec.consistent_lengths and (not spec.dynamic or self.finetuned)
        if consistent and factor and original and target and not _QUIET_LENGTHS.get():
            implied = target / original
            if not math.isclose(implied, factor, rel_tol=1e-9):
                _warn(
                    "RopeScaling: factor=%s disagrees with max_position_embeddings / "
                    "original_max_position_embeddings = %s / %s = %s; using factor=%s "
                    "(as transformers 5 does)",
                    factor,
                    target,
                    original,
                    implied,
                    factor,
                )

    # ----------------------------------------------------------------------------------------
    # What the registry says about these settings
    # ----------------------------------------------------------------------------------------

    @property
    def spec(self) -> M.MethodSpec:
        """The registry entry of :attr:`method`."""
        return M.get(self.method)

    def settings(self) -> dict[str, Any]:
        """Every setting's value (the mapping the registry's functions take)."""
        return {name: getattr(self, name) for name in M.SETTINGS}

    @property
    def is_dynamic(self) -> bool:
        """Whether the table depends on the current sequence length."""
        return self.spec.dynamic

    def attention_scaling(self, factor: float | None = None) -> float:
        """The number that multiplies cos and sin with these settings.

        Args:
            factor: YaRN methods: the scale factor to evaluate at (default :attr:`factor`; a
                dynamic table's current factor). Ignored by other methods.

        Returns:
            a float > 0: YaRN's ``0.1 ln(s) + 1`` (with its knobs), LongRoPE's
            ``sqrt(1 + ln(s) / ln(L))``, 1.0 for methods without one.
        """
        return M.attention_scaling(self.spec, self.settings(), factor)

    def attention_scale(self, factor: float) -> float:
        """Deprecated name of :meth:`attention_scaling` (removed in the next release)."""
        import warnings

        warnings.warn(
            "RopeScaling.attention_scale() is now attention_scaling() (one name for the number that "
            "multiplies cos and sin); the old name will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.attention_scaling(factor)

    def threshold(self) -> int | None:
        """Dynamic methods: the longest sequence served by the initial table; ``None`` if static."""
        spec = self.spec
        return None if spec.threshold is None else spec.threshold(self.settings())

    def table_key(self, seq_len: int) -> Any:
        """Dynamic methods: what the table at ``seq_len`` depends on (equal keys, equal tables)."""
        spec = self.spec
        return None if spec.table_key is None else spec.table_key(self.settings(), seq_len)

    def dynamic_factor(self, seq_len: int) -> float:
        """Dynamic YaRN's scale factor at ``seq_len`` (see :func:`yarn_rope.dynamic_factor`)."""
        if not self.spec.factor_is_key:
            applies = ", ".join(repr(spec.name) for spec in M.registered() if spec.factor_is_key)
            raise ValueError(f"dynamic_factor applies to method {applies}, not {self.method!r}")
        return float(self.table_key(seq_len))

    def context_length(self) -> int | None:
        """What ``config.max_position_embeddings`` states once this scaling is in force."""
        return M.context_length(self.spec, self.settings())

    def with_target(self, context: int | None = None, *, serving: bool = False) -> RopeScaling:
        """These settings stating the context they serve, as a saved config (or GGUF copy) will.

        ``max_position_embeddings`` becomes ``context`` (default: :meth:`context_length`) unless
        it is already stated, the method states no target (``spec.length_is_original``: transformers'
        ``dynamic`` reads ``max_position_embeddings`` as the original length), or ``factor *
        original`` is known and differs from ``context`` (the factor then stays the only statement).

        Args:
            context: the context length served; ``None``: what the settings imply.
            serving: the two callers' rules, which differ on purpose. ``False`` (a patch: the
                model computes these very settings) states every method's target, and only a
                ``factor * original`` that is exactly ``context``. ``True`` (an export: an engine
                serves one static table) leaves dynamic methods and ``spec.states_target=False``
                ones (``llama3`` and ``longrope`` state lengths of their own) as they are, and
                takes ``round(factor * original)`` as agreeing (the length an engine allows).

        Returns:
            a new :class:`RopeScaling` (or ``self`` when nothing changes).
        """
        spec = self.spec
        target = self.context_length() if context is None else context
        if target is None or self.max_position_embeddings is not None or spec.length_is_original:
            return self
        if serving and (spec.dynamic or not spec.states_target):
            return self
        factor, original = self.factor, self.original_max_position_embeddings
        if factor is not None and original:
            implied = F.scaled_context(factor, original) if serving else factor * original
            if target != implied:
                return self  # a target that is not factor * original: the factor stays the only statement
        return self.replace(max_position_embeddings=target)

    def params(self) -> dict[str, Any]:
        """These settings as keyword arguments of :func:`yarn_rope.inv_freq` (``None`` left out)."""
        values = self.settings()
        return {name: values[name] for name in sorted(self.spec.accepted) if values[name] is not None}

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
            ``(inv_freq [dim // 2] float32, attention_scaling)``.
        """
        spec = self.spec
        if spec.dynamic:
            seq_len = self.threshold() if seq_len is None else F._integer("seq_len", seq_len)
        else:
            seq_len = None
        return M.compute(spec, F._check_dim(dim), F._check_base(base), self.settings(), seq_len, device)

    # ----------------------------------------------------------------------------------------
    # Dictionaries
    # ----------------------------------------------------------------------------------------

    def replace(self, **changes: Any) -> RopeScaling:
        """A copy with ``changes`` applied (and validated).

        A warning about these settings' lengths is not repeated when the lengths do not change.
        """
        lengths = ("factor", "original_max_position_embeddings", "max_position_embeddings")
        token = _QUIET_LENGTHS.set(not any(name in changes for name in lengths))
        try:
            return dataclasses.replace(self, **changes)
        finally:
            _QUIET_LENGTHS.reset(token)

    def to_dict(self) -> dict[str, Any]:
        """All fields, JSON-serialisable."""
        out = dataclasses.asdict(self)
        for name in ("short_factor", "long_factor"):
            if out[name] is not None:
                out[name] = list(out[name])
        return out

    def vanilla_compatible(self) -> bool:
        """Whether vanilla transformers computes exactly this table from :meth:`to_hf`."""
        return self.spec.vanilla_compatible(self.settings())

    def to_hf(self) -> dict[str, Any]:
        """The ``rope_parameters`` (transformers 5) / ``rope_scaling`` (4.x) dict of these settings.

        Settings vanilla transformers computes are written with its own keys (the registry's
        ``transformers`` spelling of the method), so that it rebuilds the same table; YaRN's
        ``attn_factor`` and ``mscale_coefficient``, which it does not know, are folded into
        ``attention_factor``. Dynamic NTK reads its threshold from
        ``config.max_position_embeddings``, which must then equal
        ``original_max_position_embeddings``. Everything else (``ntk``, ``ntk-by-parts``,
        ``dynamic-yarn``, YaRN with ``extrapolation_factor != 1``) gets ``rope_type``
        ``"yarn_rope.<method>"`` with every non-default setting: vanilla transformers refuses it
        (KeyError on the unknown type) instead of silently computing something else, and
        :meth:`from_hf` reads it back exactly. ``rope_theta`` is the model's, not written here.
        """
        return M.to_hf(self.spec, self.settings())

    @classmethod
    def from_hf(cls, config: Any, *, layer_type: str | None = None) -> RopeScaling:
        """Read the scaling a config declares, in any dialect found in the wild.

        Args:
            config: a transformers config object (5.x ``rope_parameters`` or 4.x
                ``rope_scaling``), a ``config.json`` dict, or a bare scaling dict:
                transformers' (``rope_type`` or ``type``), NousResearch's
                (``{"type": "yarn" | "dynamic-yarn", "factor", "original_max_position_embeddings",
                "finetuned"}``), or ours (:meth:`to_hf`). See :func:`read_rope`.
            layer_type: for configs with one rope dict per layer type (Gemma3, ...), which one
                to read; default ``"full_attention"``.

        Returns:
            the settings; ``method="none"`` when the config declares no scaling.

        Raises:
            ValueError: a scaling yarn_rope does not compute (multimodal ``mrope_section``,
                ...), missing required keys, bad values.
            TypeError: ``config`` is neither a config nor a dict, or holds a non-dict scaling.
        """
        return read_rope(config, layer_type=layer_type).scaling()


# ------------------------------------------------------------------------------------------------
# The one reader
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RopeDeclaration:
    """What a configuration declares about its rotary embedding, read once.

    Attributes:
        source: where the scaling dict came from: ``"rope_parameters"``, ``"rope_scaling"``,
            ``"gguf"``, ``"dict"`` (a bare scaling dict) or ``"none"``.
        rope: the flat rope dict in force (of the chosen layer type), as declared; ``None``
            when the config declares none.
        layer_type: the layer type read, for configs with one dict per layer type.
        layer_types: the layer types that have a dict of their own (``None``: one dict for all).
        max_position_embeddings: the config's context length.
        original_max_position_embeddings: a top-level pretrained length (Phi-3 states it there,
            and transformers prefers it over the rope dict's).
        rope_theta: the RoPE base, wherever the config states it.
        partial_rotary_factor: the rotated fraction of a head, wherever stated (4.x
            ``rotary_pct`` too).
    """

    source: str
    rope: Mapping[str, Any] | None
    layer_type: str | None = None
    layer_types: tuple[str, ...] | None = None
    max_position_embeddings: int | None = None
    original_max_position_embeddings: int | None = None
    rope_theta: float | None = None
    partial_rotary_factor: float | None = None

    @property
    def rope_type(self) -> str | None:
        """The declared type spelling (``"default"`` for a dict without one); ``None`` if none."""
        if self.rope is None:
            return None
        declared = self.rope.get("rope_type") or self.rope.get("type") or "default"
        if not isinstance(declared, str):
            raise TypeError(f"rope_type must be a string, got {declared!r}")
        return declared

    @property
    def multimodal(self) -> bool:
        """Whether it is multimodal RoPE (``mrope_section``), which yarn_rope does not scale."""
        return self.rope is not None and (
            "mrope_section" in self.rope or self.rope.get("rope_type") in _MULTIMODAL_TYPES
        )

    def spec(self) -> M.MethodSpec | None:
        """The registry entry of the declared type (``none`` when nothing is declared)."""
        rope_type = self.rope_type
        return M.get("none") if rope_type is None else M.lookup_rope_type(rope_type)

    def is_dynamic(self) -> bool:
        """Whether the declared table depends on the sequence length (unknown types: by name)."""
        spec = self.spec()
        if spec is not None:
            return spec.dynamic
        return "dynamic" in (self.rope_type or "")

    def scaling(self) -> RopeScaling:
        """The declared scaling as validated settings (see :meth:`RopeScaling.from_hf`)."""
        return _parse(self)


def read_rope(config: Any, *, layer_type: str | None = None) -> RopeDeclaration:
    """What ``config`` declares about its rotary embedding.

    Precedence, as transformers reads it on every supported release: a config dict holding both
    a legacy ``rope_scaling`` and ``rope_parameters`` (a checkpoint re-saved across releases) is
    read from ``rope_scaling`` when it is a non-empty dict (transformers 5 takes the
    ``rope_scaling`` keyword over ``rope_parameters``; 4.x reads only ``rope_scaling``), with the
    base taken from either. A config object is read from what its release uses:
    ``rope_parameters`` on transformers 5, ``rope_scaling`` (and ``rope_theta``) on 4.x.

    Args:
        config: a transformers config object, a ``config.json`` dict, a bare scaling dict, or
            GGUF metadata (a dict of ``{arch}.rope.*`` / ``general.architecture`` keys).
        layer_type: per-layer-type configs: which layer type (default ``"full_attention"``).

    Raises:
        TypeError: ``config`` is not a config or a dict, or its scaling entry is not a dict.
        ValueError: per-layer-type dicts without the requested layer type.
    """
    if isinstance(config, Mapping):
        if "general.architecture" in config:
            return read_rope(M.from_gguf_metadata(config), layer_type=layer_type)
        if _is_bare_scaling(config):
            return _declaration("dict", config, {}, layer_type)
        return _declaration_of_dict(config, layer_type)
    if _compat.is_transformers_config(config):
        return _declaration_of_object(config, layer_type)
    raise TypeError(
        "expected a transformers config, a config.json dict or a rope scaling dict, got "
        f"{type(config).__name__}"
    )


_CONFIG_KEYS = ("rope_parameters", "rope_scaling", "max_position_embeddings", "model_type", "rope_theta")


def _is_bare_scaling(config: Mapping[str, Any]) -> bool:
    """A bare scaling dict names its type, or holds no config-level key."""
    if "rope_type" in config or "type" in config:
        return True
    return not any(key in config for key in _CONFIG_KEYS)


def _scaling_entry(value: Any, key: str) -> Mapping[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{key} must be a dict such as {{'rope_type': 'yarn', 'factor': 4.0, "
            f"'original_max_position_embeddings': 4096}}, got {value!r}"
        )
    return value


def _declaration_of_dict(raw: Mapping[str, Any], layer_type: str | None) -> RopeDeclaration:
    legacy = _scaling_entry(raw.get("rope_scaling"), "rope_scaling")
    current = _scaling_entry(raw.get("rope_parameters"), "rope_parameters")
    if legacy:
        # transformers 5 replaces rope_parameters by a non-empty rope_scaling wholesale (its base
        # then comes from the top-level rope_theta, not from rope_parameters); 4.x never reads
        # rope_parameters at all.
        source, rope = "rope_scaling", dict(legacy)
        if current and dict(current) != dict(legacy):
            _warn(
                "the config holds both rope_scaling %s and rope_parameters %s; reading rope_scaling, as "
                "transformers does (5.x takes it over rope_parameters, 4.x reads only it)",
                dict(legacy),
                dict(current),
            )
    elif current is not None:
        source, rope = "rope_parameters", dict(current)
    else:
        source, rope = "none", None
    return _declaration(source, rope, raw, layer_type)


def _declaration_of_object(config: Any, layer_type: str | None) -> RopeDeclaration:
    source, rope = _compat.config_rope_dict(config)
    context = {
        key: getattr(config, key, None)
        for key in (
            "max_position_embeddings",
            "original_max_position_embeddings",
            "layer_types",
            "rope_theta",
            "rotary_emb_base",
            "partial_rotary_factor",
            "rotary_pct",
        )
    }
    return _declaration(source, _scaling_entry(rope, source), context, layer_type)


def _nested(rope: Mapping[str, Any]) -> bool:
    return any(isinstance(value, Mapping) for value in rope.values())


def _declaration(
    source: str, rope: Mapping[str, Any] | None, context: Mapping[str, Any], layer_type: str | None
) -> RopeDeclaration:
    nested_types: tuple[str, ...] | None = None
    picked = rope
    if rope is not None and _nested(rope):
        nested_types = tuple(key for key, value in rope.items() if isinstance(value, Mapping))
        wanted = layer_type or "full_attention"
        if wanted not in nested_types:
            raise ValueError(
                f"the config holds one rope dict per layer type ({', '.join(nested_types)}) and none for "
                f"{wanted!r}; pass layer_type= one of them"
            )
        picked = rope[wanted]
        layer_type = wanted
    elif layer_type is not None and rope is not None:
        raise ValueError(f"layer_type={layer_type!r} given, but the config has one rope dict for all layers")
    theta = _first_number(
        None if picked is None else picked.get("rope_theta"),
        context.get("rope_theta"),
        context.get("rotary_emb_base"),
    )
    partial = _first_number(
        None if picked is None else picked.get("partial_rotary_factor"),
        context.get("partial_rotary_factor"),
        context.get("rotary_pct"),
    )
    return RopeDeclaration(
        source=source,
        rope=picked,
        layer_type=layer_type,
        layer_types=nested_types if nested_types is not None else None,
        max_position_embeddings=_length_or_none(context.get("max_position_embeddings")),
        original_max_position_embeddings=_length_or_none(context.get("original_max_position_embeddings")),
        rope_theta=theta,
        partial_rotary_factor=partial,
    )


def _first_number(*values: Any) -> float | None:
    for value in values:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _length_or_none(value: Any) -> int | None:
    if value is None:
        return None
    return M.SETTINGS["max_position_embeddings"].check("max_position_embeddings", value)  # type: ignore[no-any-return]


def original_length_fallback(max_position_embeddings: int | None, *, what: str) -> int:
    """The original length when a config states none: its ``max_position_embeddings``, with a warning.

    transformers does the same (``standardize_rope_params``), but it is only a guess: a model
    trained at a shorter length than it declares (Mistral-7B-v0.1 declares 32768, trained at
    8192) needs the real value.

    Raises:
        ValueError: the config states no length at all.
    """
    if max_position_embeddings is None:
        raise ValueError(
            f"{what} needs original_max_position_embeddings (the pretrained context length); the config "
            "states neither it nor max_position_embeddings: pass original_max_position_embeddings="
        )
    _warn(
        "%s states no original_max_position_embeddings; taking the config's max_position_embeddings=%s as "
        "the original (pretrained) context length, as transformers does. If the model was trained at a "
        "shorter length (Mistral-7B-v0.1 declares 32768 but was trained at 8192), pass "
        "original_max_position_embeddings=",
        what,
        max_position_embeddings,
    )
    return max_position_embeddings


def _parse(declaration: RopeDeclaration) -> RopeScaling:
    rope = declaration.rope
    if rope is None:
        return RopeScaling(method="none")
    if declaration.multimodal:
        raise ValueError(
            f"multimodal RoPE (mrope_section={rope.get('mrope_section')}) is out of scope for yarn_rope: its "
            "sections rotate with separate position streams"
        )
    declared = declaration.rope_type
    assert declared is not None
    spec = M.lookup_rope_type(declared)
    if spec is None:
        known = ", ".join(sorted(M.spellings()))
        if declared in M.UNSUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_type {declared!r} is a scaling yarn_rope does not compute; yarn_rope reads {known}"
            )
        raise ValueError(f"unknown rope_type {declared!r}; yarn_rope reads {known}")

    if spec.name == "none":
        factor = rope.get("factor")
        if factor is not None and factor != 1:
            _warn(
                "rope type %r ignores factor=%s: the model computes plain RoPE (as vanilla transformers "
                "does). If it was trained with scaling, state the rope_type (e.g. 'yarn')",
                declared,
                factor,
            )
        return RopeScaling(method="none")
    kwargs = _declared_settings(rope, spec, declared)
    return RopeScaling(method=spec.name, **_with_context(spec, kwargs, declaration, declared))


def _declared_settings(rope: Mapping[str, Any], spec: M.MethodSpec, declared: str) -> dict[str, Any]:
    """The settings a rope dict states for ``spec``, read as transformers reads them."""
    kwargs: dict[str, Any] = {}
    unknown = []
    for key, value in rope.items():
        if key in MODEL_KEYS:
            continue
        if key in spec.accepted:
            kwargs[key] = value
        else:  # as transformers does: a key its rope type does not read is ignored, with a warning
            unknown.append(key)
    if unknown:
        _warn("RopeScaling.from_hf: ignoring keys %s of rope type %r", sorted(unknown), declared)
    # transformers treats these keys' None (and a beta of 0) as "use the default".
    for name in ("beta_fast", "beta_slow"):
        if name in kwargs and kwargs[name] in (None, 0):
            del kwargs[name]
    for name in ("attention_factor", "mscale", "mscale_all_dim", "factor"):
        if name in kwargs and kwargs[name] is None:
            del kwargs[name]
    return kwargs


def _with_context(
    spec: M.MethodSpec, kwargs: dict[str, Any], declaration: RopeDeclaration, declared: str
) -> dict[str, Any]:
    """The scaling dict's settings completed from the config's lengths, as transformers does."""
    max_positions = declaration.max_position_embeddings
    if spec.length_is_original:
        # transformers' "dynamic" grows past config.max_position_embeddings, the trained length.
        if kwargs.get("original_max_position_embeddings") is None:
            if max_positions is None:
                raise ValueError(
                    "dynamic NTK scaling needs the trained context length: original_max_position_embeddings, "
                    "or the config's max_position_embeddings"
                )
            kwargs["original_max_position_embeddings"] = max_positions
        kwargs.pop("max_position_embeddings", None)
        return kwargs
    if declaration.original_max_position_embeddings is not None:
        # Phi-3 keeps the pretrained length at the config's top level; transformers prefers it.
        kwargs["original_max_position_embeddings"] = declaration.original_max_position_embeddings
    needs_original = "original_max_position_embeddings" in spec.required
    if needs_original and kwargs.get("original_max_position_embeddings") is None:
        kwargs["original_max_position_embeddings"] = original_length_fallback(
            max_positions, what=f"rope type {declared!r}"
        )
    if kwargs.get("max_position_embeddings") is None and max_positions is not None:
        kwargs["max_position_embeddings"] = max_positions
    if (
        "factor" in spec.required
        and kwargs.get("factor") is None
        and kwargs.get("max_position_embeddings") is None
    ):
        raise ValueError(f"rope type {declared!r} needs factor; the config states none")
    return kwargs
