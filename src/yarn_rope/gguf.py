"""GGUF files (llama.cpp's format): read their metadata, with clear errors for broken files.

transformers drops YaRN metadata when it opens a GGUF file (it rebuilds rope scaling from GGUF
only for gpt-oss), so yarn_rope reads ``{arch}.rope.scaling.*`` itself; what the keys mean is
the registry's llama.cpp spelling (:func:`yarn_rope.methods.from_gguf_metadata`). Needs the
``gguf`` package (``pip install 'yarn-rope[gguf]'``), imported only when a file is read.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

__all__ = ["GGUF_EXTRA", "GGUFMetadata", "read_metadata"]

GGUF_EXTRA = "pip install 'yarn-rope[gguf]'"
_MAGIC = b"GGUF"


@dataclasses.dataclass(frozen=True)
class GGUFMetadata:
    """What yarn_rope reads of a GGUF file.

    Attributes:
        path: the file.
        fields: every metadata key -> its value (strings, numbers, lists).
        tensor_elements: elements of all tensors (to size the weights in another dtype).
        tensor_count: number of tensors.
    """

    path: Path
    fields: dict[str, Any]
    tensor_elements: int
    tensor_count: int

    @property
    def architecture(self) -> str:
        arch = self.fields.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise ValueError(f"{self.path}: GGUF file without a general.architecture string")
        return arch


def require_gguf() -> None:
    """Raise an ImportError that names the extra when the ``gguf`` package is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading a GGUF file needs the gguf package: {GGUF_EXTRA}")


def read_metadata(path: str | os.PathLike[str]) -> GGUFMetadata:
    """The metadata and tensor sizes of a GGUF file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a GGUF file (wrong magic bytes, e.g. a git-lfs pointer), or a truncated
            or corrupt one; the message names the file.
        ImportError: the ``gguf`` package is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    with open(path, "rb") as handle:
        head = handle.read(64)
    if not head.startswith(_MAGIC):
        hint = (
            " (a git-lfs pointer: run `git lfs pull`)" if head.startswith(b"version https://git-lfs") else ""
        )
        raise ValueError(f"{path} is not a GGUF file: it does not start with the GGUF magic bytes{hint}")
    require_gguf()
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        fields = {name: field.contents() for name, field in reader.fields.items()}
        tensors = list(reader.tensors)
        elements = sum(int(tensor.n_elements) for tensor in tensors)
    except (IndexError, ValueError, KeyError, OverflowError, EOFError, MemoryError) as error:
        raise ValueError(
            f"{path} is a truncated or corrupt GGUF file ({type(error).__name__}: {error}); download it again"
        ) from None
    return GGUFMetadata(path=path, fields=fields, tensor_elements=elements, tensor_count=len(tensors))
