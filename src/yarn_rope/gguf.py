"""GGUF files (llama.cpp's format): read their metadata, and copy them with new metadata.

transformers drops YaRN metadata when it opens a GGUF file (it rebuilds rope scaling from GGUF
only for gpt-oss), so yarn_rope reads ``{arch}.rope.scaling.*`` itself; what the keys mean is
the registry's llama.cpp spelling (:func:`yarn_rope.methods.from_gguf_metadata`).
:func:`write_copy` writes a copy of a file with metadata keys set or removed and every tensor
copied byte for byte (never re-quantized), atomically. Needs the ``gguf`` package
(``pip install 'yarn-rope[gguf]'``), imported only when a file is read or written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib.util
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ._files import atomic_path
from ._progress import progress_bar
from .methods import ROPE_FREQS_TENSOR

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

__all__ = ["GGUF_EXTRA", "GGUFCopy", "GGUFMetadata", "read_metadata", "write_copy"]

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
        rope_freqs: the ``rope_freqs.weight`` tensor's values (the frequency factors llama.cpp
            divides each pair's angle by: Llama 3.1's scaling, as convert_hf_to_gguf.py writes
            it), ``None`` when the file has none.
    """

    path: Path
    fields: dict[str, Any]
    tensor_elements: int
    tensor_count: int
    rope_freqs: tuple[float, ...] | None = None

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
        rope_freqs = _rope_freqs(path, tensors)
    except (IndexError, ValueError, KeyError, OverflowError, EOFError, MemoryError) as error:
        raise ValueError(
            f"{path} is a truncated or corrupt GGUF file ({type(error).__name__}: {error}); download it again"
        ) from None
    return GGUFMetadata(
        path=path, fields=fields, tensor_elements=elements, tensor_count=len(tensors), rope_freqs=rope_freqs
    )


def _rope_freqs(path: Path, tensors: list[Any]) -> tuple[float, ...] | None:
    """The values of the ``rope_freqs.weight`` tensor (float32 or float16), if the file has one."""
    from gguf import GGMLQuantizationType

    for tensor in tensors:
        if tensor.name != ROPE_FREQS_TENSOR:
            continue
        if tensor.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            raise ValueError(
                f"{path}: tensor {ROPE_FREQS_TENSOR} is {tensor.tensor_type.name}, not F32 or F16 as "
                "convert_hf_to_gguf.py writes it"
            )
        return tuple(float(value) for value in tensor.data.reshape(-1))
    return None


@dataclasses.dataclass(frozen=True)
class GGUFCopy:
    """What :func:`write_copy` wrote.

    Attributes:
        source: the file copied.
        path: the copy.
        tensor_count: tensors copied (byte for byte).
        tensor_bytes: their data bytes.
        changed: metadata keys set -> new value.
        removed: metadata keys left out.
    """

    source: Path
    path: Path
    tensor_count: int
    tensor_bytes: int
    changed: dict[str, Any]
    removed: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "path": str(self.path),
            "tensor_count": self.tensor_count,
            "tensor_bytes": self.tensor_bytes,
            "changed": dict(self.changed),
            "removed": list(self.removed),
        }


def _value_type(gguf: Any, key: str, value: Any) -> Any:
    """The GGUF type of a new key from its Python value (the type llama.cpp's writer uses for it)."""
    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    if isinstance(value, int):
        return gguf.GGUFValueType.UINT32
    if isinstance(value, float):
        return gguf.GGUFValueType.FLOAT32
    if isinstance(value, str):
        return gguf.GGUFValueType.STRING
    raise TypeError(f"GGUF key {key}: value {value!r} must be a bool, int, float or str")


def _same_file(first: Path, second: Path) -> bool:
    if second.exists():
        return os.path.samefile(first, second)
    return first.resolve() == second.resolve()


def _check_copy(source: Path, destination: Path, fields: Mapping[str, Any], removed: tuple[str, ...]) -> None:
    """Clear errors before any byte is written (see :func:`write_copy`'s Raises)."""
    read_metadata(source)  # clear errors for a missing, foreign or truncated file
    if _same_file(source, destination):
        raise ValueError(f"refusing to overwrite the input {source}: pass another output path (--out)")
    if destination.is_dir():
        raise ValueError(
            f"output {destination} is a folder; pass a file name such as {destination / source.name}"
        )
    if not destination.parent.is_dir():
        raise FileNotFoundError(f"no folder {destination.parent} for the output {destination}")
    if "general.architecture" in fields or "general.architecture" in removed:
        raise ValueError("general.architecture cannot be changed in a copy: it names every other key")


def _write_fields(
    gguf: Any, reader: Any, writer: Any, fields: Mapping[str, Any], removed: tuple[str, ...]
) -> list[str]:
    """Every metadata key of ``reader`` into ``writer``, ``fields`` set and ``removed`` left out;
    returns the removed keys the file held."""
    pending = dict(fields)
    present: list[str] = []
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        if field.name in removed:
            present.append(field.name)
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = pending.pop(field.name) if field.name in pending else field.contents()
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    for key, value in pending.items():
        writer.add_key_value(key, value, _value_type(gguf, key, value))
    return present


@contextlib.contextmanager
def _held(temporary: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``temporary`` while the copy is written: the lock dies with the
    process, so a later run tells a killed copy's temporary from a running one's."""
    if fcntl is None:  # Windows: no flock; stale temporaries are not recognised there
        yield
        return
    with open(temporary, "rb") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield


def _remove_stale_temporaries(destination: Path) -> None:
    """Remove what a killed copy to ``destination`` left: ``.NAME.*.tmp`` in its folder (the names
    :func:`~yarn_rope._files.atomic_path` gives) that no live copy holds locked (:func:`_held`)."""
    if fcntl is None:
        return
    for stale in destination.parent.glob(f".{glob.escape(destination.name)}.*.tmp"):
        try:
            with open(stale, "rb") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                stale.unlink()
        except OSError:  # held by a running copy, or already gone
            continue
        logger.info("removed %s, left by an interrupted copy to %s", stale, destination)


def write_copy(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    fields: Mapping[str, Any],
    remove: Iterable[str] = (),
    progress: bool | None = None,
) -> GGUFCopy:
    """A copy of a GGUF file with metadata keys set or removed; tensors copied byte for byte.

    Keys already in the file keep their GGUF type; new ones get llama.cpp's types (``int`` ->
    uint32, ``float`` -> float32, ``str``, ``bool``). Tensor data, shapes, quantization types,
    the tensor order and the file's alignment are kept as they are. The copy is written to a
    temporary file in the destination's folder and moved into place with ``os.replace``, so an
    interrupted run never leaves a half-written file at ``destination``. A copy killed outright
    (``kill -9``) leaves its temporary, ``.NAME.XXXX.tmp`` beside ``destination``: the next copy to
    the same destination removes it (on systems with ``flock``; a running copy's is kept).

    Args:
        source: the GGUF file to copy.
        destination: where to write the copy (replaced if it exists; never ``source`` itself).
        fields: metadata key -> value to set.
        remove: metadata keys to leave out (absent ones are ignored).
        progress: show a progress bar over the tensor bytes (``None``: only on a terminal).

    Returns:
        :class:`GGUFCopy`.

    Raises:
        ValueError: ``destination`` is ``source`` (or the same file by another path), a folder, or
            ``general.architecture`` is among the keys; ``source`` is not a valid GGUF file.
        FileNotFoundError: ``source`` is missing, or the destination's folder.
        ImportError: the ``gguf`` package is missing.
    """
    source, destination = Path(source), Path(destination)
    removed = tuple(dict.fromkeys(remove))
    _check_copy(source, destination, fields, removed)
    import gguf

    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    _remove_stale_temporaries(destination)
    with atomic_path(destination) as temporary, _held(temporary):
        writer = gguf.GGUFWriter(str(temporary), arch=arch, endianess=reader.endianess)
        writer.data_alignment = reader.alignment
        present = _write_fields(gguf, reader, writer, fields, removed)
        total = sum(int(tensor.n_bytes) for tensor in reader.tensors)
        for tensor in reader.tensors:
            writer.add_tensor_info(
                tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with progress_bar(total, desc="copying tensors", unit="B", unit_scale=True, enabled=progress) as bar:
            for tensor in reader.tensors:
                writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
                bar.update(int(tensor.n_bytes))
        writer.close()
    return GGUFCopy(
        source=source,
        path=destination,
        tensor_count=len(reader.tensors),
        tensor_bytes=total,
        changed=dict(fields),
        removed=tuple(present),
    )
