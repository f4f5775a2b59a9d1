"""yarn_rope: exact YaRN context-window extension for Hugging Face transformers models.

Reference: Peng, Quesnelle, Fan, Shippole, "YaRN: Efficient Context Window Extension of Large
Language Models", ICLR 2024 (arXiv:2309.00071).

Importing this package has no side effects: nothing is patched, no device is queried, no
logging is configured.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import eval
from .config import RopeScaling
from .frequencies import (
    METHODS,
    default_inv_freq,
    dynamic_factor,
    dynamic_ntk_inv_freq,
    inv_freq,
    linear_inv_freq,
    ntk_by_parts_inv_freq,
    ntk_inv_freq,
    rotary_dim,
    yarn_attention_factor,
    yarn_inv_freq,
    yarn_mscale,
)
from .loading import LoadPlan, from_pretrained, plan_load
from .patch import PatchInfo, UnsupportedModelError, patch, patch_info, patched, unpatch, unpatched
from .rotary import RotaryEmbedding

try:
    __version__ = version("yarn-rope")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = [
    "METHODS",
    "LoadPlan",
    "PatchInfo",
    "RopeScaling",
    "RotaryEmbedding",
    "UnsupportedModelError",
    "__version__",
    "default_inv_freq",
    "dynamic_factor",
    "dynamic_ntk_inv_freq",
    "eval",
    "from_pretrained",
    "inv_freq",
    "linear_inv_freq",
    "ntk_by_parts_inv_freq",
    "ntk_inv_freq",
    "patch",
    "patch_info",
    "patched",
    "plan_load",
    "rotary_dim",
    "unpatch",
    "unpatched",
    "yarn_attention_factor",
    "yarn_inv_freq",
    "yarn_mscale",
]
