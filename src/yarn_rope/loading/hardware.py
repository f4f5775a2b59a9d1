"""Hardware policy: which dtype and attention kernel a model loads with, and why."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

__all__ = ["FLASH_EXTRA", "choose_attention", "choose_dtype", "uses_cuda"]

FLASH_EXTRA = "pip install 'yarn-rope[flash]'"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: attn_implementation values that mean flash-attention (transformers' spellings).
FLASH_KERNELS = ("flash_attention_2",)


def uses_cuda(device_map: Any) -> bool:
    """Whether the weights will live on a GPU under ``device_map``."""
    if device_map is None or not torch.cuda.is_available():
        return False  # transformers loads to the CPU without a device_map
    if isinstance(device_map, str) and device_map.startswith(("auto", "balanced", "sequential")):
        return True
    places = device_map.values() if isinstance(device_map, dict) else [device_map]
    return any(str(place) not in ("cpu", "disk", "meta") for place in places)


def choose_dtype(dtype: str | torch.dtype = "auto", *, cuda: bool | None = None) -> torch.dtype:
    """``"auto"``: bfloat16 on a GPU that supports it, else float16 on GPU, float32 on CPU.

    Raises:
        ValueError: an unknown dtype name.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise ValueError(
                f"dtype must be 'auto', one of {', '.join(_DTYPES)} or a torch.dtype, got {dtype!r}"
            )
        return _DTYPES[dtype]
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def choose_attention(
    requested: str = "auto", *, dtype: torch.dtype, cuda: bool | None = None, allow_flash: bool = True
) -> tuple[str, str]:
    """The attention kernel to load with, and why.

    ``"auto"``: ``flash_attention_2`` when CUDA and ``flash_attn`` are present and the dtype is
    fp16/bf16 (and ``allow_flash``); otherwise ``sdpa`` (PyTorch's own fused kernels, flash ones
    on CUDA); ``eager`` only where PyTorch has no SDPA. An explicit request is honoured, or
    refused with the way to get it.

    Raises:
        ImportError: ``flash_attention_2`` requested without ``flash_attn`` installed.
        ValueError: ``flash_attention_2`` without CUDA or with float32 weights; unknown names.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    has_flash = importlib.util.find_spec("flash_attn") is not None
    half = dtype in (torch.float16, torch.bfloat16)
    if requested == "auto":
        if cuda and has_flash and half and allow_flash:
            return "flash_attention_2", "CUDA, flash_attn installed and half-precision weights"
        missing = [
            why
            for ok, why in (
                (allow_flash, "use_flash_attention_2=False"),
                (cuda, "no CUDA"),
                (has_flash, "no flash_attn"),
                (half, "float32"),
            )
            if not ok
        ]
        if hasattr(torch.nn.functional, "scaled_dot_product_attention"):
            return "sdpa", f"PyTorch SDPA ({', '.join(missing)} rules out flash_attention_2)"
        return "eager", "this PyTorch has no scaled_dot_product_attention"
    if not isinstance(requested, str) or not requested:
        raise ValueError(
            f"attn_implementation must be 'auto' or a transformers kernel name, got {requested!r}"
        )
    if requested in FLASH_KERNELS:
        if not allow_flash:
            raise ValueError(
                f"attn_implementation={requested!r} contradicts use_flash_attention_2=False; give one of them"
            )
        if not has_flash:
            raise ImportError(f"attn_implementation={requested!r} needs flash-attn: {FLASH_EXTRA}")
        if not cuda:
            raise ValueError(
                f"attn_implementation={requested!r} needs a CUDA GPU (and device_map=, e.g. 'auto'); use "
                "'sdpa' on this machine"
            )
        if not half:
            raise ValueError(f"{requested} runs in float16/bfloat16; pass dtype='bfloat16' or 'auto'")
    return requested, "requested"
