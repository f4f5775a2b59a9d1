"""yarn_rope: exact YaRN context-window extension for Hugging Face transformers models.

Reference: Peng, Quesnelle, Fan, Shippole, "YaRN: Efficient Context Window Extension of Large
Language Models", ICLR 2024 (arXiv:2309.00071).

Importing this package has no side effects: nothing is patched, no device is queried, no
logging is configured.
"""

from __future__ import annotations

import warnings
from importlib.metadata import PackageNotFoundError, version

from . import eval as eval  # yarn_rope.eval (kept out of __all__: it would shadow the builtin)
from . import frequencies, methods
from .cache import UnsupportedCacheError
from .config import RopeScaling
from .export import Approximation, ExportResult, export
from .frequencies import (
    default_inv_freq,
    dynamic_factor,
    dynamic_ntk_inv_freq,
    linear_inv_freq,
    llama3_inv_freq,
    longrope_inv_freq,
    ntk_by_parts_inv_freq,
    ntk_inv_freq,
    rotary_dim,
    yarn_attention_scaling,
    yarn_inv_freq,
    yarn_mscale,
)
from .loading import LoadPlan, from_pretrained, plan_load
from .methods import METHODS, MethodSpec, inv_freq
from .patch import PatchInfo, UnsupportedModelError, patch, patch_info, patched, unpatch, unpatched
from .rotary import RotaryEmbedding
from .verify import VerifyResult, verify

try:
    __version__ = version("yarn-rope")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = [
    "METHODS",
    "Approximation",
    "ExportResult",
    "LoadPlan",
    "MethodSpec",
    "PatchInfo",
    "RopeScaling",
    "RotaryEmbedding",
    "UnsupportedCacheError",
    "UnsupportedModelError",
    "VerifyResult",
    "__version__",
    "default_inv_freq",
    "dynamic_factor",
    "dynamic_ntk_inv_freq",
    "export",
    "from_pretrained",
    "inv_freq",
    "linear_inv_freq",
    "llama3_inv_freq",
    "longrope_inv_freq",
    "ntk_by_parts_inv_freq",
    "ntk_inv_freq",
    "patch",
    "patch_info",
    "patched",
    "plan_load",
    "rotary_dim",
    "unpatch",
    "unpatched",
    "verify",
    "yarn_attention_scaling",
    "yarn_inv_freq",
    "yarn_mscale",
]


_MOVED_FROM_FREQUENCIES = {"inv_freq", "METHODS", "DYNAMIC_METHODS", "check_method"}


def _renamed(old: str, new: str) -> str:
    return f"{old} is now {new}; the old name will be removed in the next release"


def __getattr__(name: str) -> object:
    """Deprecated names, kept for one release."""
    if name == "yarn_attention_factor":
        warnings.warn(
            _renamed(
                "yarn_rope.yarn_attention_factor",
                "yarn_attention_scaling (one name for the number that multiplies cos and sin)",
            ),
            DeprecationWarning,
            stacklevel=2,
        )
        return yarn_attention_scaling
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _frequencies_getattr(name: str) -> object:
    """Deprecated names of :mod:`yarn_rope.frequencies`, kept for one release.

    They moved to the registry; serving them from here (the package, imported before any of its
    modules) keeps the math module free of any import of :mod:`yarn_rope.methods`.
    """
    if name in _MOVED_FROM_FREQUENCIES:
        warnings.warn(
            _renamed(f"yarn_rope.frequencies.{name}", f"yarn_rope.methods.{name} (the method registry)"),
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(methods, name)
    if name == "yarn_attention_factor":
        warnings.warn(
            _renamed("yarn_rope.frequencies.yarn_attention_factor", "yarn_attention_scaling"),
            DeprecationWarning,
            stacklevel=2,
        )
        return yarn_attention_scaling
    raise AttributeError(f"module {frequencies.__name__!r} has no attribute {name!r}")


# PEP 562: a module's __getattr__ is looked up in its namespace when an attribute is missing.
setattr(frequencies, "__getattr__", _frequencies_getattr)  # noqa: B010
