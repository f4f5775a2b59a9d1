"""The method registry: everything yarn_rope knows about each rope scaling method, in one place.

One :class:`MethodSpec` per method says what the method is: its table function, the settings it
takes (declared once in :data:`SETTINGS`, with defaults and validation), whether its table
depends on the sequence length (and on what exactly), how transformers and each serving engine
spell it, and how configs in the wild spell it. Everything else asks the registry:
:func:`inv_freq` dispatch, :class:`~yarn_rope.config.RopeScaling`'s validation, ``to_hf`` /
``from_hf``, the CLI's choices, the loader, the export and the evaluation's "is this dynamic"
question.

Modelled on transformers' ``ROPE_INIT_FUNCTIONS`` (``rope_type -> pure function``), but typed,
with the settings declared instead of read ad hoc from a config object, and with the facts
that function table leaves implicit (aliases, dynamic behaviour, release differences).

The package: ``settings.py`` (:data:`SETTINGS`), ``spec.py`` (:class:`MethodSpec`, the
spellings, :data:`ENGINES`), one file per family (``plain``, ``linear``, ``ntk``, ``yarn``,
``llama3``, ``longrope``: table adapter, checks, transformers and engine spellings, registered
together) and ``gguf.py`` (llama.cpp's keys). Adding a method: its pure table function in
:mod:`yarn_rope.frequencies`, a family file that calls :func:`register`, and its import below
(docs/contributing/adding-a-method.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .. import frequencies as F
from .settings import CONTEXT_SETTINGS, PREFIX, SETTINGS, Setting, Settings, default_settings
from .spec import (
    ENGINES,
    EngineRelease,
    EngineSettings,
    EngineSpelling,
    MethodSpec,
    ServeModel,
    TableFunction,
    TransformersSpelling,
)

__all__ = [
    "CONTEXT_SETTINGS",
    "DYNAMIC_METHODS",
    "ENGINES",
    "GGUF_SCALING_KEYS",
    "GGUF_SETTINGS_KEY",
    "LLAMACPP_ARCH_KEYS",
    "LLAMACPP_CONVERTED_ARCHS",
    "LLAMACPP_FLAGS",
    "LLAMACPP_NO_ROPE_ARCHS",
    "LLAMACPP_RELEASE",
    "LLAMACPP_SCALING_TYPES",
    "METHODS",
    "PREFIX",
    "ROPE_FREQS_TENSOR",
    "SETTINGS",
    "EngineRelease",
    "EngineSettings",
    "EngineSpelling",
    "MethodSpec",
    "ServeModel",
    "Setting",
    "TableFunction",
    "TransformersSpelling",
    "attention_scaling",
    "check_method",
    "compute",
    "context_length",
    "converted_log_multiplier",
    "default_settings",
    "from_gguf_metadata",
    "get",
    "inv_freq",
    "llama3_from_rope_freqs",
    "llamacpp_architecture",
    "llamacpp_attention_base",
    "llamacpp_log_mscales",
    "longrope_factor",
    "lookup_rope_type",
    "lossless_dict",
    "register",
    "registered",
    "rope_freqs_difference",
    "spellings",
    "to_hf",
    "validate",
    "yarn_attention_scaling",
]

_REGISTRY: dict[str, MethodSpec] = {}
_BY_SPELLING: dict[str, str] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry.

    Its name and aliases must be new, its settings declared in :data:`SETTINGS`, and it must
    answer every engine of :data:`ENGINES`: a spelling, or a stated refusal (``loses``), so that
    an export never meets a method its engine has no row for.

    Raises:
        ValueError: naming the method and what is missing or taken.
    """
    spellings = (spec.name, *spec.aliases)
    taken = [s for s in spellings if s in _BY_SPELLING]
    if taken:
        raise ValueError(f"method spelling(s) {taken} already registered")
    unknown = set(spec.settings) - set(SETTINGS)
    if unknown:
        raise ValueError(
            f"method {spec.name!r} names undeclared settings {sorted(unknown)}; add them to SETTINGS"
        )
    unanswered = [engine for engine in ENGINES if engine not in spec.engines]
    if unanswered:
        raise ValueError(
            f"method {spec.name!r} gives no spelling for engine(s) {', '.join(unanswered)}: give each an "
            "EngineSpelling (write and loses), or a refusal (spec.refuse(what))"
        )
    unknown_engines = sorted(set(spec.engines) - set(ENGINES))
    if unknown_engines:
        raise ValueError(
            f"method {spec.name!r} spells unknown engine(s) {', '.join(unknown_engines)}; engines: "
            f"{', '.join(ENGINES)}"
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
# The methods, one family file each (they register themselves, in this order), and llama.cpp's keys
# ------------------------------------------------------------------------------------------------

# isort: off
from . import plain  # noqa: E402, F401  (imported in registration order)
from . import linear  # noqa: E402, F401
from . import ntk  # noqa: E402, F401
from . import yarn  # noqa: E402, F401
from . import llama3  # noqa: E402, F401
from . import longrope  # noqa: E402, F401

# isort: on
from .gguf import (  # noqa: E402
    GGUF_SCALING_KEYS,
    GGUF_SETTINGS_KEY,
    LLAMACPP_ARCH_KEYS,
    LLAMACPP_CONVERTED_ARCHS,
    LLAMACPP_FLAGS,
    LLAMACPP_NO_ROPE_ARCHS,
    LLAMACPP_RELEASE,
    LLAMACPP_SCALING_TYPES,
    ROPE_FREQS_TENSOR,
    converted_log_multiplier,
    from_gguf_metadata,
    llama3_from_rope_freqs,
    llamacpp_architecture,
    llamacpp_attention_base,
    llamacpp_log_mscales,
    lossless_dict,
    rope_freqs_difference,
)
from .longrope import longrope_factor  # noqa: E402
from .yarn import yarn_attention_scaling  # noqa: E402

#: Method names, in registration order.
METHODS: tuple[str, ...] = tuple(_REGISTRY)
#: Methods whose table depends on the current sequence length.
DYNAMIC_METHODS: frozenset[str] = frozenset(spec.name for spec in registered() if spec.dynamic)
