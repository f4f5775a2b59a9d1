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
import dataclasses
import inspect
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from . import _compat
from . import frequencies as F
from . import methods as M
from .cache import KeyCacheSync
from .config import RopeDeclaration, RopeScaling, original_length_fallback, read_rope
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
    values: list[tuple[Any, str, Any]]  # (config or module, attribute, new value): data only
    cache_hook: tuple[nn.Module, KeyCacheSync] | None = None  # dynamic methods: (decoder, hook)


@dataclasses.dataclass
class _Record:
    """Stored on the patched model: the plan, and the original values it replaced."""

    plan: _Plan
    request: tuple[Any, ...]  # what the caller asked for, to make a repeated call a no-op
    originals: list[tuple[nn.Module, str, nn.Module]]  # (parent, attribute, original module)
    values: list[tuple[Any, str, bool, Any]]  # (object, attribute, existed, original value)
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
    return _compat.text_config(config)


def _is_ours(module: nn.Module) -> bool:
    return isinstance(module, (RotaryEmbedding, LayerTypeRotaryEmbedding))


def _find_sites(model: nn.Module, text_config: Any) -> list[_Site]:
    """Every rotary module of the text model, wherever it sits (the model itself may be a backbone)."""
    sites: list[_Site] = []
    skipped: list[str] = []
    ours: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(prefix + ".") for prefix in ours):
            continue
        if _is_ours(module):
            ours.append(path)
            continue
        plain, per_type = _compat.rotary_buffer_names(module)
        if not plain and not per_type:
            continue
        config = getattr(module, "config", None)
        if config is not None and config is not text_config:
            skipped.append(path)  # e.g. a vision tower's rotary module
            continue
        if config is None and any(part in path for part in ("vision", "visual", "image", "audio")):
            skipped.append(path)
            continue
        if not path:
            raise UnsupportedModelError(
                f"{type(model).__name__} is itself a rotary module; patch the model that holds it"
            )
        parent_path, _, attribute = path.rpartition(".")
        parent = model.get_submodule(parent_path)  # "" is the model itself (a bare backbone)
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


@dataclasses.dataclass(frozen=True)
class _Declared:
    """What one rotary site's config declares (read once per config and layer type)."""

    declaration: RopeDeclaration
    scaling: RopeScaling | None  # None: a type yarn_rope cannot read (kept unless replace=True)
    error: str | None = None

    @property
    def method(self) -> str | None:
        return None if self.scaling is None else self.scaling.method


def _declared(config: Any, layer_type: str | None) -> _Declared:
    declaration = read_rope(config, layer_type=layer_type)
    if declaration.multimodal:
        raise UnsupportedModelError(
            f"{type(config).__name__} uses multimodal RoPE (mrope_section="
            f"{declaration.rope.get('mrope_section') if declaration.rope else None}); its sections rotate "
            "with separate position streams and are out of scope for yarn_rope"
        )
    try:
        return _Declared(declaration, declaration.scaling())
    except (ValueError, TypeError) as error:
        return _Declared(declaration, None, str(error))


def _base(config: Any, module: nn.Module, layer_type: str | None) -> float:
    base = read_rope(config, layer_type=layer_type).rope_theta
    if base is None:
        value = getattr(module, "base", None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            base = float(value)
    if base is None:
        raise UnsupportedModelError(
            f"could not find the RoPE base (rope_theta) of {type(config).__name__} for layer type "
            f"{layer_type}"
        )
    return base


# ------------------------------------------------------------------------------------------------
# Resolving the settings
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Request:
    """What the caller asked :func:`patch` for."""

    scaling: RopeScaling | None
    fields: dict[str, Any]
    replace: bool


def _resolve(request: _Request, declared: _Declared, config: Any) -> RopeScaling:
    """The settings a patch applies: the caller's, completed from what the model declares."""
    if request.scaling is not None:
        if not isinstance(request.scaling, RopeScaling):
            raise TypeError(
                "scaling must be a yarn_rope.RopeScaling (or None with keyword fields), got "
                f"{type(request.scaling).__name__}"
            )
        return request.scaling.replace(**request.fields) if request.fields else request.scaling
    if declared.scaling is None and not request.replace:
        raise ValueError(
            f"the model already uses rope_type {declared.declaration.rope_type!r}, which yarn_rope cannot "
            "read "
            f"({declared.error}); pass replace=True to replace it with the settings you give"
        )
    if not request.fields:
        if declared.scaling is None or declared.method == "none":
            raise ValueError(
                "patch() needs settings: factor=... or max_position_embeddings=... (the target context), "
                "or a RopeScaling; the model declares no scaling to apply"
            )
        return declared.scaling
    method = request.fields.get("method", "yarn")
    if declared.scaling is not None and declared.method not in ("none", method) and not request.replace:
        raise ValueError(
            f"the model already uses {declared.method!r} scaling (factor={declared.scaling.factor}); "
            "patching "
            f"it with {method!r} would replace it. Pass replace=True to do that explicitly"
        )
    if declared.scaling is not None and declared.method == method:
        return _same_method(declared.scaling, request.fields)
    spec = M.get(method)
    # The method's typical values (Llama 3.1's frequency bounds for llama3) unless given.
    fields = {**spec.defaults, **request.fields}
    fields.setdefault("method", method)
    if (
        "original_max_position_embeddings" not in fields
        and "original_max_position_embeddings" in spec.accepted
    ):
        fields["original_max_position_embeddings"] = _original_length(declared, config)
    return RopeScaling(**fields)


def _same_method(declared: RopeScaling, fields: dict[str, Any]) -> RopeScaling:
    """Keep what the model declares (original length, betas, ...) unless the caller overrides it."""
    changes = dict(fields)
    if "factor" in changes and "max_position_embeddings" not in changes:
        changes["max_position_embeddings"] = None
    if "max_position_embeddings" in changes and "factor" not in changes:
        changes["factor"] = None
    return declared.replace(**changes)


def _original_length(declared: _Declared, config: Any) -> int | None:
    """The model's pretrained context: declared by its scaling, at the config's top level (Phi-3),
    else its ``max_position_embeddings`` with a warning (only a guess)."""
    if declared.scaling is not None and declared.scaling.original_max_position_embeddings is not None:
        return declared.scaling.original_max_position_embeddings
    if declared.scaling is None and declared.declaration.rope is not None:
        original = declared.declaration.rope.get("original_max_position_embeddings")
        if original is not None:
            return int(original)
    declaration = declared.declaration
    if declaration.original_max_position_embeddings is not None:
        return declaration.original_max_position_embeddings
    return original_length_fallback(declaration.max_position_embeddings, what="yarn_rope.patch: the model")


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
        plan = _plan(
            model,
            _Request(scaling=scaling, fields=dict(fields), replace=replace),
            _Options(angles=angles, layer_types=layer_types, schedule=schedule),
        )
        _apply_plan(model, plan, request)
    except BaseException:
        if record is not None:
            _apply_plan(model, record.plan, record.request)
        raise
    return model


def _freeze(layer_types: str | Sequence[str] | None) -> Any:
    return layer_types if layer_types is None or isinstance(layer_types, str) else tuple(layer_types)


@dataclasses.dataclass(frozen=True)
class _Options:
    """How :func:`patch` builds the new modules."""

    angles: AngleMode
    layer_types: str | Sequence[str] | None
    schedule: str | float


def _plan(model: nn.Module, request: _Request, options: _Options) -> _Plan:
    """Everything a patch changes, computed against the untouched model."""
    text_config = _model_config(model)
    sites = _find_sites(model, text_config)
    if options.layer_types is not None and all(site.layer_types is None for site in sites):
        raise ValueError(
            f"layer_types={options.layer_types!r}: {type(model).__name__} has one rotary table for all "
            "layers; "
            "layer_types applies to models with per-layer-type tables (Gemma3, ...)"
        )
    swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []
    config_values: list[tuple[Any, str, Any]] = []
    resolved: RopeScaling | None = None
    scaled_types: tuple[str, ...] | None = None
    configs_done: list[Any] = []
    # Per-layer 4.x modules share one config: resolve (and warn) once per config and layer type.
    resolutions: dict[tuple[int, str | None], tuple[_Declared, RopeScaling]] = {}
    for site in sites:
        wanted = _site_layer_types(site, options.layer_types)
        if site.layer_types is not None:
            scaled_types = tuple(t for t in wanted if t is not None)
        key = (id(site.config), wanted[0])
        if key not in resolutions:
            declared = _declared(site.config, wanted[0])
            resolutions[key] = (declared, _resolve(request, declared, site.config).with_target())
        declared, site_scaling = resolutions[key]
        if resolved is not None and site_scaling != resolved:
            raise UnsupportedModelError(
                f"the rotary modules of this model resolve to different settings ({resolved} and "
                f"{site_scaling}); pass a full RopeScaling"
            )
        resolved = site_scaling
        new = _new_module(model, site, wanted, declared, site_scaling, options)
        swaps.append((site.parent, site.attribute, site.module, new))
        if not any(site.config is done for done in configs_done):
            configs_done.append(site.config)
            changes = _config_changes(site.config, site_scaling, wanted)
            _warn_if_config_refuses(site.config, changes)
            config_values.extend(changes)
    assert resolved is not None
    config_values.extend(_softmax_scale_changes(model, resolved))
    cache_hook = _cache_hook(sites, swaps, text_config, scaled_types) if resolved.is_dynamic else None
    info = PatchInfo(
        scaling=resolved,
        angles=options.angles,
        modules=tuple(s.path for s in sites),
        layer_types=scaled_types,
    )
    return _Plan(info=info, swaps=swaps, values=config_values, cache_hook=cache_hook)


def _softmax_scale_changes(model: nn.Module, scaling: RopeScaling) -> list[tuple[Any, str, Any]]:
    """MLA attention (DeepSeek-V2/V3 and kin) puts YaRN's ``mscale_all_dim`` into its softmax
    scale, computed once from the config when the layer is built: bring it to the new settings.

    The new value is what transformers computes for a config with these settings:
    ``qk_head_dim^-0.5 * yarn_mscale(factor, mscale_all_dim)^2`` when the rope type is not
    ``default`` and ``mscale_all_dim`` is set, else ``qk_head_dim^-0.5``.

    Raises:
        UnsupportedModelError: a dynamic method with ``mscale_all_dim`` (the softmax scale would
            have to follow the sequence length, which transformers' attention cannot).
    """
    modules = _compat.rope_dependent_softmax_scales(model)
    if not modules:
        return []
    if scaling.is_dynamic and scaling.mscale_all_dim:
        raise UnsupportedModelError(
            f"{type(model).__name__} puts mscale_all_dim into its attention softmax scale, fixed when the "
            f"layer is built; method {scaling.method!r} changes its factor with the length. Use a static "
            "method (e.g. method='yarn')"
        )
    changes: list[tuple[Any, str, Any]] = []
    for module in modules:
        value = float(module.qk_head_dim) ** -0.5
        if scaling.method != "none" and scaling.mscale_all_dim and scaling.factor is not None:
            value *= F.yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2
        if value != module.scaling:
            changes.append((module, "scaling", value))
    return changes


def _site_layer_types(site: _Site, layer_types: str | Sequence[str] | None) -> list[str | None]:
    if site.layer_types is None:
        return [None]
    return list(_select_layer_types(site.layer_types, layer_types))


def _new_module(
    model: nn.Module,
    site: _Site,
    wanted: list[str | None],
    declared: _Declared,
    scaling: RopeScaling,
    options: _Options,
) -> nn.Module:
    """Our replacement of ``site.module``, holding the original (as a child) to give back unchanged."""
    new_modules: dict[str, RotaryEmbedding] = {}
    for layer_type in wanted:
        table = _compat.original_table(site.module, layer_type)
        dim = 2 * table.shape[-1]
        base = _base(site.config, site.module, layer_type)
        if declared.method == "none" and not table.is_meta:
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
            scaling=scaling,
            angles=options.angles,
            growth=_growth(options.schedule, model) if scaling.is_dynamic else None,
            device=table.device,
        )
    if site.layer_types is None:
        new: nn.Module = new_modules[""]
        # Keep the replaced module in the tree (as a child of ours), so that model-wide casts
        # and moves made while patched reach it and unpatch() returns it in the state they made.
        new.original = site.module
    else:
        new = LayerTypeRotaryEmbedding(site.module, new_modules)
    _compat.copy_device_hook(site.module, new)
    return new


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


def _config_changes(
    config: Any, scaling: RopeScaling, layer_types: list[str | None]
) -> list[tuple[Any, str, Any]]:
    changes: list[tuple[Any, str, Any]] = []
    hf = scaling.to_hf()
    key, _ = _compat.config_rope_dict(config)
    if key == "rope_parameters":  # transformers 5
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
    max_positions = scaling.context_length()
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
    try:
        _compat.validate_config_copy(config, {attribute: value for _, attribute, value in changes})
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
        for config, attribute, value in plan.values:
            existed = attribute in vars(config)
            done_config.append((config, attribute, existed, vars(config).get(attribute)))
            _compat.set_config_attribute(config, attribute, value)
        handle = None
        if plan.cache_hook is not None:
            decoder, hook = plan.cache_hook
            handle = decoder.register_forward_pre_hook(hook, with_kwargs=True)
    except BaseException:
        _restore(done_swaps, done_config)
        raise
    record = _Record(plan=plan, request=request, originals=done_swaps, values=done_config)
    record.hook_handle = handle
    setattr(model, _STATE_ATTR, record)


def _restore(
    swaps: list[tuple[nn.Module, str, nn.Module]], config_values: list[tuple[Any, str, bool, Any]]
) -> None:
    for config, attribute, existed, value in reversed(config_values):
        if existed:
            _compat.set_config_attribute(config, attribute, value)
        else:
            _compat.delete_config_attribute(config, attribute)
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
    _restore(record.originals, record.values)
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
