"""Building the model: the native transformers class with plain RoPE, then the exact table by patch."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .. import _compat
from ..config import RopeScaling, read_rope
from ..patch import patch
from ..rotary import AngleMode
from .checkpoint import check_weights
from .hardware import choose_dtype
from .plan import HUB_KEYS, LoadPlan, plan_load

__all__ = ["from_pretrained"]

logger = logging.getLogger(__name__)

_UNSET = object()


def _legacy_keywords(kwargs: dict[str, Any], dtype: Any, attn_implementation: str) -> tuple[Any, str, bool]:
    """Fold the model card era's keywords into ours: ``(dtype, attn_implementation, allow_flash)``.

    * ``torch_dtype=`` is ``dtype=`` (given both, they must agree);
    * ``use_flash_attention_2=True`` is ``attn_implementation="flash_attention_2"`` (an explicit
      request: refused with the way to get it where flash-attention cannot run, never a silent
      fallback); ``False`` means any kernel but flash-attention;
    * ``trust_remote_code`` is ignored with a warning: checkpoint code never runs.
    """
    if kwargs.pop("trust_remote_code", False):
        logger.warning(
            "trust_remote_code=True is ignored: yarn_rope loads the native transformers class and never "
            "executes code from the checkpoint"
        )
    legacy_dtype = kwargs.pop("torch_dtype", _UNSET)
    if legacy_dtype is not _UNSET:
        if dtype != "auto" and choose_dtype(dtype) != choose_dtype(legacy_dtype):
            raise ValueError(
                f"dtype={dtype!r} and torch_dtype={legacy_dtype!r} disagree; torch_dtype is the old name of "
                "dtype: give one of them"
            )
        dtype = legacy_dtype
    flash = kwargs.pop("use_flash_attention_2", None)
    if flash is None:
        return dtype, attn_implementation, True
    if not isinstance(flash, bool):
        raise TypeError(f"use_flash_attention_2 must be True or False, got {flash!r}")
    if flash:
        if attn_implementation not in ("auto", "flash_attention_2"):
            raise ValueError(
                f"use_flash_attention_2=True asks for flash_attention_2 but attn_implementation="
                f"{attn_implementation!r}; give one of them"
            )
        return dtype, "flash_attention_2", True
    return dtype, attn_implementation, False


def _neutral_rope(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with plain RoPE, so the native class builds whatever the checkpoint declared.

    Both dialects are neutralised (a config may hold ``rope_scaling`` and ``rope_parameters`` at
    once); the base and partial-rotary fraction the reader found are kept where the installed
    transformers reads them: 5.x in ``rope_parameters`` or at the top level (which it converts),
    4.x only at the top level (it never reads ``rope_parameters``, so a checkpoint saved by
    transformers 5 would otherwise get 4.x's default base; checked 4.45.2, 4.57.6, 5.23.0).
    """
    cleaned = {key: value for key, value in raw.items() if key != "auto_map"}
    declaration = read_rope(raw)
    if declaration.rope is None or declaration.layer_types is not None:
        return cleaned  # nothing declared, or one dict per layer type: the patch scales those layers
    kept: dict[str, Any] = {}
    if declaration.rope_theta is not None:
        kept["rope_theta"] = declaration.rope_theta
    for key in ("partial_rotary_factor",):
        if key in declaration.rope:
            kept[key] = declaration.rope[key]
    before_v5 = _compat.transformers_major() < 5
    if before_v5:
        cleaned.pop("rope_parameters", None)
    elif "rope_parameters" in raw:
        cleaned["rope_parameters"] = {"rope_type": "default"} | kept
    if "rope_scaling" in raw or before_v5:
        cleaned["rope_scaling"] = None
        cleaned.update(kept)
    return cleaned


def from_pretrained(
    name_or_path: str | os.PathLike[str],
    *,
    attn_implementation: str = "auto",
    dtype: str | torch.dtype = "auto",
    device_map: Any = None,
    scaling: RopeScaling | None = None,
    angles: AngleMode = "precise",
    **from_pretrained_kwargs: Any,
) -> Any:
    """Load a causal LM with its rope scaling applied exactly, never executing checkpoint code.

    Takes the model card's own call unchanged: ``torch_dtype=`` (the old name of ``dtype=``),
    ``use_flash_attention_2=True`` (flash-attention 2, refused with the way to get it where it
    cannot run), ``trust_remote_code=True`` (ignored with a warning) and the keywords transformers
    still honours pass through.

    Args:
        name_or_path: a local folder, a Hub name (when a Hub is reachable), or a folder with a
            GGUF file (pass ``gguf_file=``).
        attn_implementation: ``"auto"`` (flash-attention 2 on CUDA with ``flash_attn`` and
            half precision, else SDPA, else eager) or a transformers kernel name.
        dtype: ``"auto"`` (bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU),
            ``"float32"``, ``"float16"``, ``"bfloat16"`` or a ``torch.dtype``.
        device_map: passed to transformers/accelerate (``"auto"`` spreads a 70B model over the
            GPUs; ``max_memory=`` passes through too). Weights are loaded once, straight into
            place. Without one the weights load to the CPU, and ``"auto"`` choices are the CPU's.
        scaling: settings that replace what the checkpoint declares.
        angles: angle mode of the inserted rotary modules (see :mod:`yarn_rope.rotary`).
        **from_pretrained_kwargs: passed to transformers' ``from_pretrained`` unchanged
            (``gguf_file``, ``revision``, ``quantization_config``, ``max_memory``, ...).

    Returns:
        the model (a native transformers ``PreTrainedModel``), patched when it declares scaling.

    Raises:
        FileNotFoundError, ValueError, ImportError: see :func:`~yarn_rope.plan_load` and
            :func:`~yarn_rope.loading.choose_attention`; raised before any weight is loaded.
    """
    kwargs = dict(from_pretrained_kwargs)
    dtype, attn_implementation, allow_flash = _legacy_keywords(kwargs, dtype, attn_implementation)
    gguf_file = kwargs.get("gguf_file")
    plan = plan_load(
        name_or_path,
        attn_implementation=attn_implementation,
        dtype=dtype,
        device_map=device_map,
        gguf_file=gguf_file,
        scaling=scaling,
        allow_flash=allow_flash,
        **{key: kwargs[key] for key in HUB_KEYS if key in kwargs},
    )
    _log_plan(plan)
    folder = Path(os.fspath(name_or_path))
    if gguf_file is None and folder.is_dir():
        check_weights(folder / kwargs["subfolder"] if kwargs.get("subfolder") else folder)
    from transformers import AutoConfig, AutoModelForCausalLM

    if gguf_file is None:
        cleaned = _neutral_rope(plan.config)
        model_type = cleaned.pop("model_type")
        kwargs["config"] = AutoConfig.for_model(model_type, **cleaned)
    kwargs[_compat.dtype_keyword()] = getattr(torch, plan.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        attn_implementation=plan.attn_implementation,
        device_map=device_map,
        trust_remote_code=False,
        **kwargs,
    )
    # output_loading_info=True makes transformers return (model, info).
    loaded = model[0] if isinstance(model, tuple) else model
    if plan.scaling.method != "none":
        patch(loaded, plan.scaling, angles=angles, replace=True)
    return model


def _log_plan(plan: LoadPlan) -> None:
    logger.info(
        "yarn_rope.from_pretrained: %s (%s), scaling %s, attention %s (%s), dtype %s",
        plan.source,
        plan.model_type,
        plan.scaling.method,
        plan.attn_implementation,
        plan.attn_reason,
        plan.dtype,
    )
