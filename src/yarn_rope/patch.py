"""Put exact YaRN (or any method) into an already-built transformers model, reversibly.

:func:`patch` swaps the model's rotary module(s) for :class:`~yarn_rope.rotary.RotaryEmbedding`
(same call contract: ``(x, position_ids) -> (cos, sin)``), never the attention code, so eager,
SDPA and flash-attention paths keep working and transformers' ``@dynamic_rope_update`` cannot
rewrite our tables. The originals are recorded once; :func:`unpatch` puts the very same module
objects and config values back, so the model computes bit-for-bit what it computed before.

Rotary layouts are found generically, not from a list of architectures:

* one module per model (transformers 5.x ``model.model.rotary_emb``), plus one per attention
  layer in 4.x releases (``self_attn.rotary_emb``): every module holding an ``inv_freq`` buffer
  whose ``config`` is the model's text config;
* one module with per-layer-type buffers ``{layer_type}_inv_freq`` and
  ``forward(x, position_ids, layer_type)`` (Gemma3, Olmo3, ...): the full-attention types are
  scaled by default, the others keep their own module;
* partial rotary (GPT-NeoX, Phi): the rotary dimension is read from the module's own table;
* text models nested in vision-language models: only rotary modules of the text config.

Multimodal RoPE (``mrope_section``) and models without RoPE raise
:class:`UnsupportedModelError`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .cache import KeyCacheSync
from .config import RopeScaling
from .frequencies import default_inv_freq
from .rotary import ANGLE_MODES, AngleMode, RotaryEmbedding

__all__ = [
    "LayerTypeRotaryEmbedding",
    "PatchInfo",
    "UnsupportedModelError",
    "cache_sync",
    "patch",
    "patch_info",
    "patched",
    "unpatch",
    "unpatched",
]

logger = logging.getLogger(__name__)

_STATE_ATTR = "_yarn_rope_patch"
_FULL_ATTENTION = "full_attention"
# Keys of a rope dict that describe the model, not its scaling: kept when the scaling changes.
_KEEP_KEYS = ("rope_theta", "partial_rotary_factor")


class UnsupportedModelError(ValueError):
    """The model has no rotary layout that yarn_rope can scale (or one it refuses to touch)."""


@dataclasses.dataclass(frozen=True)
class PatchInfo:
    """What :func:`patch` did to a model.

    Attributes:
        scaling: the settings in force.
        angles: the angle mode of the inserted modules.
        modules: dotted paths of the replaced rotary modules.
        layer_types: per-layer-type models: the scaled layer types; ``None`` otherwise.
    """

    scaling: RopeScaling
    angles: str
    modules: tuple[str, ...]
    layer_types: tuple[str, ...] | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "scaling": self.scaling.to_dict(),
            "angles": self.angles,
            "modules": list(self.modules),
            "layer_types": None if self.layer_types is None else list(self.layer_types),
        }


@dataclasses.dataclass
class _Plan:
    """Everything a patch changes, computed before the model is touched."""

    info: PatchInfo
    swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]]  # parent, attribute, original, new
    config_values: list[tuple[Any, str, Any]]  # config, attribute, new value
    cache_hook: tuple[nn.Module, KeyCacheSync] | None = None  # dynamic methods: (decoder, hook)


@dataclasses.dataclass
class _Record:
    """Stored on the patched model: the plan, and the original values it replaced."""

    plan: _Plan
    request: tuple[Any, ...]  # what the caller asked for, to make a repeated call a no-op
    originals: list[tuple[nn.Module, str, nn.Module]]  # (parent, attribute, original module)
    config_values: list[tuple[Any, str, bool, Any]]  # (config, attribute, existed, original value)
    hook_handle: Any = None  # the registered KeyCacheSync, removed by unpatch


class LayerTypeRotaryEmbedding(nn.Module):
    """Rotary module for models with one rope table per layer type (Gemma3, Olmo3, ...).

    ``forward(x, position_ids, layer_type)`` returns the scaled table for the layer types in
    ``scaled`` and delegates the others to the model's original module, untouched.

    Args:
        original: the model's own per-layer-type rotary module.
        scaled: layer type -> our rotary module.
    """

    def __init__(self, original: nn.Module, scaled: dict[str, RotaryEmbedding]) -> None:
        super().__init__()
        self.original = original
        self.scaled = nn.ModuleDict(scaled)

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_type is not None and layer_type in self.scaled:
            module = self.scaled[layer_type]
            assert isinstance(module, RotaryEmbedding)
            return module.forward(x, position_ids)
        cos, sin = self.original(x, position_ids, layer_type)
        return cos, sin


@dataclasses.dataclass
class _Site:
    """One rotary module of the model."""

    path: str
    parent: nn.Module
    attribute: str
    module: nn.Module
    config: Any
    layer_types: tuple[str, ...] | None  # per-layer-type layout: all types it holds


# ------------------------------------------------------------------------------------------------
# Finding the rotary modules
# ------------------------------------------------------------------------------------------------


def _model_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no .config; yarn_rope patches transformers models"
        )
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        with contextlib.suppress(Exception):
            return getter(decoder=True)
    return config


def _per_type_buffers(module: nn.Module) -> tuple[str, ...]:
    names = [
        name[: -len("_inv_freq")]
        for name in module._buffers
        if name.endswith("_inv_freq") and not name.endswith("original_inv_freq") and name != "inv_freq"
    ]
    return tuple(sorted(names))


def _is_ours(module: nn.Module) -> bool:
    return isinstance(module, (RotaryEmbedding, LayerTypeRotaryEmbedding))


def _find_sites(model: nn.Module, text_config: Any) -> list[_Site]:
    sites: list[_Site] = []
    skipped: list[str] = []
    ours: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(prefix + ".") for prefix in ours):
            continue
        if _is_ours(module):
            ours.append(path)
            continue
        per_type = _per_type_buffers(module)
        if "inv_freq" not in module._buffers and not per_type:
            continue
        config = getattr(module, "config", None)
        if config is not None and config is not text_config:
            skipped.append(path)  # e.g. a vision tower's rotary module
            continue
        if config is None and any(part in path for part in ("vision", "visual", "image", "audio")):
            skipped.append(path)
            continue
        parent_path, _, attribute = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else None
        if parent is None:
            raise UnsupportedModelError("the model itself is a rotary module; patch the model that holds it")
        sites.append(_Site(path, parent, attribute, module, config or text_config, per_type or None))
    if not sites:
        found = f" (rotary modules of other configs were left alone: {', '.join(skipped)})" if skipped else ""
        raise UnsupportedModelError(
            f"{type(model).__name__} has no rotary module yarn_rope can scale{found}. Supported: modules "
            "holding an `inv_freq` buffer (Llama, Mistral, Qwen2/3, Phi, GPT-NeoX, ... on transformers "
            "4.45+ and 5.x) or per-layer-type `{layer_type}_inv_freq` buffers (Gemma3, Olmo3, ...)"
        )
    return sites


# ------------------------------------------------------------------------------------------------
# Reading the rotary layout and the declared scaling
# ------------------------------------------------------------------------------------------------


def _rope_dict(config: Any, layer_type: str | None) -> dict[str, Any] | None:
    raw = getattr(config, "rope_parameters", None) if hasattr(config, "rope_parameters") else None
    if raw is None:
        raw = getattr(config, "rope_scaling", None)
    if raw is None:
        return None
    if layer_type is not None and isinstance(raw.get(layer_type), dict):
        picked: dict[str, Any] = raw[layer_type]
        return picked
    return dict(raw)


def _check_not_multimodal(config: Any, layer_types: Sequence[str | None]) -> None:
    for layer_type in layer_types:
        rope = _rope_dict(config, layer_type) or {}
        if "mrope_section" in rope or rope.get("rope_type") in ("mrope", "3d", "default_3d"):
            raise UnsupportedModelError(
                f"{type(config).__name__} uses multimodal RoPE (mrope_section={rope.get('mrope_section')}); "
                "its sections rotate with separate position streams and are out of scope for yarn_rope"
            )


def _base(config: Any, module: nn.Module, layer_type: str | None) -> float:
    rope = _rope_dict(config, layer_type) or {}
    for value in (
        rope.get("rope_theta"),
        getattr(config, "rope_theta", None),
        getattr(config, "rotary_emb_base", None),
        getattr(module, "base", None),
    ):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    raise UnsupportedModelError(
        f"could not find the RoPE base (rope_theta) of {type(config).__name__} for layer type {layer_type}"
    )


def _declared(config: Any, layer_type: str | None) -> tuple[RopeScaling | None, str | None]:
    """(the scaling the config declares, or None if yarn_rope cannot read it; its rope type)."""
    rope = _rope_dict(config, layer_type)
    declared_type = None if rope is None else (rope.get("rope_type") or rope.get("type") or "default")
    try:
        if rope is None:
            return RopeScaling(method="none"), None
        context = {
            "rope_parameters": rope,
            "max_position_embeddings": getattr(config, "max_position_embeddings", None),
            "original_max_position_embeddings": getattr(config, "original_max_position_embeddings", None),
        }
        return RopeScaling.from_hf(context), declared_type
    except (ValueError, TypeError):
        return None, declared_type


def _table(module: nn.Module, layer_type: str | None) -> torch.Tensor:
    name = "inv_freq" if layer_type is None else f"{layer_type}_inv_freq"
    original_name = "original_inv_freq" if layer_type is None else f"{layer_type}_original_inv_freq"
    table = getattr(module, original_name, None)
    if not isinstance(table, torch.Tensor):
        table = getattr(module, name)
    assert isinstance(table, torch.Tensor)
    return table


# ------------------------------------------------------------------------------------------------
# Resolving the settings
# ------------------------------------------------------------------------------------------------


def _resolve(
    scaling: RopeScaling | None,
    fields: dict[str, Any],
    declared: RopeScaling | None,
    declared_type: str | None,
    config: Any,
    replace: bool,
) -> RopeScaling:
    if scaling is not None and not isinstance(scaling, RopeScaling):
        raise TypeError(
            "scaling must be a yarn_rope.RopeScaling (or None with keyword fields), got "
            f"{type(scaling).__name__}"
        )
    if scaling is not None:
        return scaling.replace(**fields) if fields else scaling
    declared_method = None if declared is None else declared.method
    if declared is None and not replace:
        raise ValueError(
            f"the model already uses rope_type {declared_type!r}, which yarn_rope does not compute; "
            "pass replace=True to replace it with the settings you give"
        )
    if not fields:
        if declared is None or declared_method == "none":
            raise ValueError(
                "patch() needs settings: factor=... or max_position_embeddings=... (the target context), "
                "or a RopeScaling; the model declares no scaling to apply"
            )
        return declared
    method = fields.get("method", "yarn")
    if declared is not None and declared_method not in ("none", method) and not replace:
        raise ValueError(
            f"the model already uses {declared_method!r} scaling (factor={declared.factor}); patching it "
            f"with {method!r} would replace it. Pass replace=True to do that explicitly"
        )
    if declared is not None and declared_method == method:
        # Same method: keep what the model declares (original length, betas, ...) unless overridden.
        changes = dict(fields)
        if "factor" in changes and "max_position_embeddings" not in changes:
            changes["max_position_embeddings"] = None
        if "max_position_embeddings" in changes and "factor" not in changes:
            changes["factor"] = None
        return declared.replace(**changes)
    fields = dict(fields)
    fields.setdefault("method", method)
    if "original_max_position_embeddings" not in fields and method not in ("none", "linear", "ntk"):
        original = None
        if declared is not None and declared.original_max_position_embeddings is not None:
            original = declared.original_max_position_embeddings
        elif declared is None:
            rope = _rope_dict(config, None) or {}
            original = rope.get("original_max_position_embeddings")
        if original is None:
            # Phi-3 states the pretrained length at the config's top level (transformers prefers it).
            original = getattr(config, "original_max_position_embeddings", None)
        if original is None:
            original = getattr(config, "max_position_embeddings", None)
            if original is None:
                raise ValueError(
                    "pass original_max_position_embeddings=...: the model's config states no context length"
                )
            logger.warning(
                "yarn_rope.patch: taking max_position_embeddings=%s as the original (pretrained) context "
                "length. If the model was trained at a shorter length (Mistral-7B-v0.1 declares 32768 but "
                "was trained at 8192), pass original_max_position_embeddings=",
                original,
            )
        fields["original_max_position_embeddings"] = original
    return RopeScaling(**fields)


def _with_target(scaling: RopeScaling) -> RopeScaling:
    """``scaling`` with the target context it implies, as the saved config will state it."""
    target = _new_max_positions(scaling)
    if scaling.max_position_embeddings is not None or target is None or scaling.method == "dynamic-ntk":
        return scaling
    original = scaling.original_max_position_embeddings
    if scaling.factor is not None and original and target != scaling.factor * original:
        return scaling  # a fractional target: keep the factor as the only statement
    return scaling.replace(max_position_embeddings=target)


def _new_max_positions(scaling: RopeScaling) -> int | None:
    """What ``config.max_position_embeddings`` should say once ``scaling`` is in force."""
    original = scaling.original_max_position_embeddings
    if scaling.method == "dynamic-ntk":
        return original  # transformers' "dynamic" grows past config.max_position_embeddings
    if scaling.method == "dynamic-yarn":
        return scaling.threshold()
    if scaling.max_position_embeddings is not None:
        return scaling.max_position_embeddings
    if original is not None and scaling.factor is not None:
        return round(scaling.factor * original)
    return None


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------


def patch_info(model: nn.Module) -> PatchInfo | None:
    """What :func:`patch` did to ``model``, or ``None`` if it is not patched."""
    record: _Record | None = getattr(model, _STATE_ATTR, None)
    return None if record is None else record.plan.info


def cache_sync(model: nn.Module) -> KeyCacheSync | None:
    """The :class:`~yarn_rope.cache.KeyCacheSync` hook that :func:`patch` registered for a dynamic
    method (its ``rerotations`` counts how often a KV cache was brought to a new table), or
    ``None`` for an unpatched model or a static method."""
    record: _Record | None = getattr(model, _STATE_ATTR, None)
    if record is None or record.plan.cache_hook is None:
        return None
    return record.plan.cache_hook[1]


def patch(
    model: nn.Module,
    scaling: RopeScaling | None = None,
    *,
    angles: AngleMode = "precise",
    layer_types: str | Sequence[str] | None = None,
    replace: bool = False,
    schedule: str | float = "auto",
    **fields: Any,
) -> nn.Module:
    """Scale the rotary embeddings of a live transformers model, in place.

    The model is modified in place and returned. Its rotary module(s) are replaced by
    :class:`~yarn_rope.rotary.RotaryEmbedding` with the requested table, and ``model.config``
    is updated so that ``save_pretrained`` records the scaling (see
    :meth:`RopeScaling.to_hf`). Patching again with the same settings does nothing; with new
    settings it replaces the old ones (never stacks). A patch that fails leaves the model as it
    was.

    Args:
        model: a transformers ``PreTrainedModel`` (or a wrapper such as a PEFT model).
        scaling: the settings; or give them as keyword ``fields`` (``factor=8.0``,
            ``max_position_embeddings=32768`` as a target context, ``method="dynamic-yarn"``,
            ``original_max_position_embeddings=4096``, ...). Fields override ``scaling``.
            Omitted fields come from the scaling the model declares when it uses the same
            method; the original length defaults to what the model declares, else to
            ``config.max_position_embeddings`` (with a warning: it is only a guess). With
            neither, the model's own declared scaling is applied exactly.
        angles: ``"precise"`` (default) or ``"fp32"`` (bit-equal to transformers' tables).
        layer_types: per-layer-type models: which layer types to scale: ``None`` for the
            full-attention layers (sliding-window layers never see long distances), ``"all"``, or
            a list. An error on models with one table for all layers.
        replace: allow replacing a different scaling the model already uses (linear, llama3,
            longrope, ...). Without it that is an error.
        schedule: dynamic methods: when the table may change as the sequence grows.
            ``"exact"``: the reference rule (at every length that calls for another factor);
            a number ``g > 1``: at lengths ``threshold * g^k`` only; ``"auto"`` (default):
            ``"exact"`` for float32 models, ``sqrt(2)`` for float16/bfloat16 ones, whose KV cache
            rounds once per re-rotation. Keys already in the KV cache are re-rotated to each new
            table (see :mod:`yarn_rope.cache`).

    Returns:
        ``model``.

    Raises:
        UnsupportedModelError: no scalable rotary module, multimodal RoPE, or a layout that
            cannot be read.
        ValueError, TypeError: bad settings, or a declared scaling that would be replaced
            without ``replace=True``.
    """
    if angles not in ANGLE_MODES:
        raise ValueError(f"angles must be one of {ANGLE_MODES}, got {angles!r}")
    if not isinstance(replace, bool):
        raise TypeError(f"replace must be True or False, got {replace!r}")
    if schedule not in ("auto", "exact"):
        _growth(schedule, model)  # a bad value is an error whatever the method
    request = (scaling, tuple(sorted(fields.items())), angles, _freeze(layer_types), replace, schedule)
    record: _Record | None = getattr(model, _STATE_ATTR, None)
    if record is not None and record.request == request:
        return model

    # The plan is made against the original modules and config, before anything changes; if it
    # fails, the previous patch (if any) is put back as it was.
    if record is not None:
        unpatch(model)
    try:
        _apply_plan(model, _plan(model, scaling, fields, angles, layer_types, replace, schedule), request)
    except BaseException:
        if record is not None:
            _apply_plan(model, record.plan, record.request)
        raise
    return model


def _freeze(layer_types: str | Sequence[str] | None) -> Any:
    return layer_types if layer_types is None or isinstance(layer_types, str) else tuple(layer_types)


def _plan(
    model: nn.Module,
    scaling: RopeScaling | None,
    fields: dict[str, Any],
    angles: AngleMode,
    layer_types: str | Sequence[str] | None,
    replace: bool,
    schedule: str | float = "auto",
) -> _Plan:
    text_config = _model_config(model)
    sites = _find_sites(model, text_config)
    if layer_types is not None and all(site.layer_types is None for site in sites):
        raise ValueError(
            f"layer_types={layer_types!r}: {type(model).__name__} has one rotary table for all layers; "
            "layer_types applies to models with per-layer-type tables (Gemma3, ...)"
        )
    swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []
    config_values: list[tuple[Any, str, Any]] = []
    resolved: RopeScaling | None = None
    scaled_types: tuple[str, ...] | None = None
    configs_done: list[Any] = []
    resolutions: dict[tuple[int, str | None], tuple[RopeScaling | None, RopeScaling]] = {}

    for site in sites:
        config = site.config
        if site.layer_types is None:
            wanted: list[str | None] = [None]
        else:
            wanted = list(_select_layer_types(site.layer_types, layer_types))
            scaled_types = tuple(t for t in wanted if t is not None)
        _check_not_multimodal(config, wanted)
        key = (id(config), wanted[0])
        if key not in resolutions:  # per-layer 4.x modules share one config: resolve (and warn) once
            declared, declared_type = _declared(config, wanted[0])
            wanted_scaling = _resolve(scaling, fields, declared, declared_type, config, replace)
            resolutions[key] = (declared, _with_target(wanted_scaling))
        declared, site_scaling = resolutions[key]
        if resolved is not None and site_scaling != resolved:
            raise UnsupportedModelError(
                f"the rotary modules of this model resolve to different settings ({resolved} and "
                f"{site_scaling}); pass a full RopeScaling"
            )
        resolved = site_scaling

        new_modules: dict[str, RotaryEmbedding] = {}
        for layer_type in wanted:
            table = _table(site.module, layer_type)
            dim = 2 * table.shape[-1]
            base = _base(config, site.module, layer_type)
            if declared is not None and declared.method == "none" and not table.is_meta:
                # Rounded to the table's own dtype: a model cast to bf16 holds a bf16 table.
                expected = default_inv_freq(dim, base=base).to(table.dtype).float()
                if not torch.allclose(table.detach().float().cpu(), expected, rtol=1e-5, atol=0):
                    raise UnsupportedModelError(
                        f"{site.path}: its table is not plain RoPE with dim={dim}, base={base}; yarn_rope "
                        "cannot read this rotary layout"
                    )
            new_modules[layer_type or ""] = RotaryEmbedding(
                dim,
                base=base,
                scaling=site_scaling,
                angles=angles,
                growth=_growth(schedule, model) if site_scaling.is_dynamic else None,
                device=table.device,
            )
        if site.layer_types is None:
            new: nn.Module = new_modules[""]
            # Keep the replaced module in the tree (as a child of ours), so that model-wide casts
            # and moves made while patched reach it and unpatch() returns it in the state they made.
            new.original = site.module
        else:
            new = LayerTypeRotaryEmbedding(site.module, new_modules)
        _copy_device_hook(site.module, new)
        swaps.append((site.parent, site.attribute, site.module, new))

        if not any(config is done for done in configs_done):
            configs_done.append(config)
            changes = _config_changes(config, site_scaling, wanted)
            _warn_if_config_refuses(config, changes)
            config_values.extend(changes)

    assert resolved is not None
    cache_hook = _cache_hook(sites, swaps, text_config, scaled_types) if resolved.is_dynamic else None
    info = PatchInfo(
        scaling=resolved, angles=angles, modules=tuple(s.path for s in sites), layer_types=scaled_types
    )
    return _Plan(info=info, swaps=swaps, config_values=config_values, cache_hook=cache_hook)


def _growth(schedule: str | float, model: nn.Module) -> float | None:
    """The growth ratio of a dynamic table for ``schedule`` (see :func:`patch`)."""
    if schedule == "exact":
        return None
    if schedule == "auto":
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return math.sqrt(2.0) if dtype in (torch.float16, torch.bfloat16) else None
    if isinstance(schedule, bool) or not isinstance(schedule, (int, float)) or not 1 < schedule < math.inf:
        raise ValueError(f"schedule must be 'auto', 'exact' or a growth ratio > 1, got {schedule!r}")
    return float(schedule)


def _cache_hook(
    sites: list[_Site],
    swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]],
    config: Any,
    scaled_types: tuple[str, ...] | None,
) -> tuple[nn.Module, KeyCacheSync]:
    """(decoder, hook) that keeps a KV cache at the current dynamic table."""
    rotaries: list[RotaryEmbedding] = []
    for _, _, _, new in swaps:
        rotaries.extend(m for m in new.modules() if isinstance(m, RotaryEmbedding))
    decoders = [
        (site.path.count("."), site.parent)
        for site in sites
        if "past_key_values" in inspect.signature(site.parent.forward).parameters
    ]
    if not decoders:
        raise UnsupportedModelError(
            "dynamic scaling needs the decoder that holds the KV cache; none of the rotary modules' "
            f"parents ({', '.join(type(site.parent).__name__ for site in sites)}) takes past_key_values"
        )
    decoder = min(decoders, key=lambda item: item[0])[1]
    layers = None
    if scaled_types is not None:
        kinds = getattr(config, "layer_types", None) or []
        layers = [index for index, kind in enumerate(kinds) if kind in scaled_types]
    return decoder, KeyCacheSync(rotaries, layers)


def _select_layer_types(
    available: tuple[str, ...], layer_types: str | Sequence[str] | None
) -> tuple[str, ...]:
    if layer_types is None:
        layer_types = _FULL_ATTENTION
    if layer_types == "all":
        return available
    requested = (layer_types,) if isinstance(layer_types, str) else tuple(layer_types)
    missing = [t for t in requested if t not in available]
    if missing or not requested:
        raise ValueError(
            f"layer_types={layer_types!r}: this model's rotary module holds layer types "
            f"{', '.join(available)}; pass some of them or 'all'"
        )
    return requested


def _copy_device_hook(original: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the accelerate hook ``original`` had (device_map dispatch)."""
    hook = getattr(original, "_hf_hook", None)
    if hook is None:
        return
    from accelerate.hooks import add_hook_to_module

    add_hook_to_module(new, copy.copy(hook))


def _config_changes(
    config: Any, scaling: RopeScaling, layer_types: list[str | None]
) -> list[tuple[Any, str, Any]]:
    changes: list[tuple[Any, str, Any]] = []
    hf = scaling.to_hf()
    if hasattr(config, "rope_parameters"):  # transformers 5
        old = getattr(config, "rope_parameters", None) or {}
        if layer_types != [None]:
            new: dict[str, Any] = dict(old)
            for layer_type in layer_types:
                assert layer_type is not None
                new[layer_type] = _merge(old.get(layer_type) or {}, hf)
        else:
            new = _merge(old, hf)
        changes.append((config, "rope_parameters", new))
    else:  # transformers 4.x
        changes.append((config, "rope_scaling", None if scaling.method == "none" else hf))
    max_positions = _new_max_positions(scaling)
    if max_positions is not None and hasattr(config, "max_position_embeddings"):
        changes.append((config, "max_position_embeddings", max_positions))
    if scaling.original_max_position_embeddings is not None and hasattr(
        config, "original_max_position_embeddings"
    ):
        # Phi-3 keeps the pretrained length at the top level, and transformers prefers it there.
        changes.append((config, "original_max_position_embeddings", scaling.original_max_position_embeddings))
    return changes


def _warn_if_config_refuses(config: Any, changes: list[tuple[Any, str, Any]]) -> None:
    """Warn when the config class will refuse to save the new rope dict (Phi-3 takes only longrope)."""
    validate = getattr(config, "validate_rope", None)
    if not callable(validate):
        return
    candidate = copy.copy(config)
    for _, attribute, value in changes:
        object.__setattr__(candidate, attribute, copy.deepcopy(value))
    try:
        candidate.validate_rope()
    except Exception as error:  # whatever the config class raises, saving would raise it too
        logger.warning(
            "yarn_rope.patch: %s cannot record this scaling (%s). The patched model runs, but "
            "save_pretrained will refuse to save it: save the unpatched model and patch it after loading.",
            type(config).__name__,
            str(error).splitlines()[-1].strip(),
        )


def _merge(old: dict[str, Any], hf: dict[str, Any]) -> dict[str, Any]:
    kept = {key: old[key] for key in _KEEP_KEYS if key in old}
    return kept | hf


def _apply_plan(model: nn.Module, plan: _Plan, request: tuple[Any, ...]) -> None:
    """Make the changes of ``plan``, all or none, and record the originals on ``model``."""
    done_swaps: list[tuple[nn.Module, str, nn.Module]] = []
    done_config: list[tuple[Any, str, bool, Any]] = []
    try:
        for parent, attribute, original, new in plan.swaps:
            setattr(parent, attribute, new)
            done_swaps.append((parent, attribute, original))
        for config, attribute, value in plan.config_values:
            existed = attribute in vars(config)
            done_config.append((config, attribute, existed, vars(config).get(attribute)))
            _set_config(config, attribute, value)
        handle = None
        if plan.cache_hook is not None:
            decoder, hook = plan.cache_hook
            handle = decoder.register_forward_pre_hook(hook, with_kwargs=True)
    except BaseException:
        _restore(done_swaps, done_config)
        raise
    record = _Record(plan=plan, request=request, originals=done_swaps, config_values=done_config)
    record.hook_handle = handle
    setattr(model, _STATE_ATTR, record)


def _set_config(config: Any, attribute: str, value: Any) -> None:
    # object.__setattr__ bypasses transformers' deprecated `rope_scaling` setter on 5.x configs.
    object.__setattr__(config, attribute, value)


def _restore(
    swaps: list[tuple[nn.Module, str, nn.Module]], config_values: list[tuple[Any, str, bool, Any]]
) -> None:
    for config, attribute, existed, value in reversed(config_values):
        if existed:
            _set_config(config, attribute, value)
        else:
            with contextlib.suppress(AttributeError):
                object.__delattr__(config, attribute)
    for parent, attribute, original in reversed(swaps):
        setattr(parent, attribute, original)


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: the original rotary modules and config values, bit for bit.

    The model is modified in place and returned; every marker yarn_rope left is removed. A model
    that is not patched is returned unchanged.
    """
    record: _Record | None = getattr(model, _STATE_ATTR, None)
    if record is None:
        return model
    if record.hook_handle is not None:
        record.hook_handle.remove()
    _restore(record.originals, record.config_values)
    delattr(model, _STATE_ATTR)
    return model


@contextlib.contextmanager
def unpatched(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: the model as it was before :func:`patch`; its patch is back on exit."""
    previous: _Record | None = getattr(model, _STATE_ATTR, None)
    unpatch(model)
    try:
        yield model
    finally:
        if previous is not None:
            unpatch(model)
            _apply_plan(model, previous.plan, previous.request)


@contextlib.contextmanager
def patched(
    model: nn.Module,
    scaling: RopeScaling | None = None,
    **kwargs: Any,
) -> Iterator[nn.Module]:
    """Context manager: :func:`patch` on entry, restore the previous state on exit (always).

    Takes the arguments of :func:`patch`. On exit the model is unpatched, or re-patched with the
    settings it had before entering.
    """
    previous: _Record | None = getattr(model, _STATE_ATTR, None)
    patch(model, scaling, **kwargs)
    try:
        yield model
    finally:
        unpatch(model)
        if previous is not None:
            _apply_plan(model, previous.plan, previous.request)
