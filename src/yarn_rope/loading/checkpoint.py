"""Reading a checkpoint folder before any weight is loaded: config, shards, weight sizes, auto_map.

Every broken file is reported by name with what to do about it, never as a bare JSON, memory or
key error: a git-lfs pointer left by a clone without git-lfs, a truncated safetensors header, a
missing shard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .. import _compat

__all__ = [
    "check_shards",
    "check_weights",
    "config_file",
    "read_json",
    "remote_modeling_entry",
    "safetensors_numel",
]

_LFS_POINTER = b"version https://git-lfs"


def _lfs_hint(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_LFS_POINTER))
    except OSError:
        return ""
    return (
        " It is a git-lfs pointer, not the file: run `git lfs pull` in the checkpoint folder."
        if (head == _LFS_POINTER)
        else ""
    )


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``.

    Raises:
        FileNotFoundError: the file cannot be read.
        ValueError: not valid JSON (line and column named), or not an object.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a UTF-8 text file.{_lfs_hint(path)}") from None
    except OSError as error:
        raise FileNotFoundError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON (line {error.lineno}, column {error.colno}): {error.msg}."
            f"{_lfs_hint(path)}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def config_file(source: str, hub: dict[str, Any]) -> Path:
    """The ``config.json`` of a local folder, or of a Hub model (when a Hub is reachable).

    Raises:
        FileNotFoundError: no such folder, no config in it, or a Hub name that cannot be fetched.
    """
    folder = Path(source)
    if hub.get("subfolder"):
        folder = folder / hub["subfolder"]
    if folder.is_dir():
        path = folder / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder} holds no config.json; is it a transformers checkpoint folder?")
        return path
    if Path(source).exists():
        raise FileNotFoundError(f"{source} is a file; pass the checkpoint folder (and gguf_file= for GGUF)")
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or (os.sep != "/" and os.sep in source):
        raise FileNotFoundError(f"no checkpoint folder at {source}")
    return Path(_compat.hub_config_file(source, hub))


def check_shards(folder: Path) -> None:
    """Every shard an index names must exist, before anything is loaded.

    Raises:
        FileNotFoundError: missing shards (named).
        ValueError: an index without a ``weight_map`` object.
    """
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = folder / index_name
        if not index_path.is_file():
            continue
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path} has no weight_map object")
        missing = sorted({name for name in weight_map.values() if not (folder / str(name)).is_file()})
        if missing:
            raise FileNotFoundError(f"{index_path} names shards that are missing: {', '.join(missing)}")


_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5", "*.gguf")


def check_weights(folder: Path) -> None:
    """A local checkpoint folder must hold weights, not only a config.

    Raises:
        FileNotFoundError: naming the folder and what a checkpoint holds.
    """
    if any(next(folder.glob(pattern), None) is not None for pattern in _WEIGHT_PATTERNS):
        return
    raise FileNotFoundError(
        f"{folder} holds config.json but no weights (model.safetensors, pytorch_model.bin or their shards); "
        "is the download complete? (a GGUF file needs gguf_file= / --gguf-file)"
    )


def _weight_files(folder: Path) -> list[Path]:
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path} has no weight_map object")
        return sorted({folder / str(name) for name in weight_map.values()})
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    return sorted(folder.glob("*.safetensors"))


def safetensors_numel(folder: Path) -> int | None:
    """Elements of the weights transformers will load: the indexed shards, else model.safetensors.

    Headers are read with the ``safetensors`` library (no tensor is loaded).

    Returns:
        the element count, or ``None`` when the folder has no safetensors files.

    Raises:
        ValueError: a file that is not a valid safetensors file (named, with a git-lfs hint).
    """
    from safetensors import safe_open

    files = _weight_files(folder)
    if not files:
        return None
    total = 0
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open objects are not mappings
                    count = 1
                    for size in handle.get_slice(name).get_shape():
                        count *= int(size)
                    total += count
        except Exception as error:  # safetensors raises its own SafetensorError and OSError kinds
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(
                f"{file} is not a valid safetensors file ({reason}).{_lfs_hint(file)}"
                " Download the checkpoint again if it is truncated."
            ) from None
    return total


def remote_modeling_entry(raw: dict[str, Any]) -> str | None:
    """The ``auto_map`` entry of the causal LM class (the modeling file that is *not* run)."""
    auto_map = raw.get("auto_map")
    if not isinstance(auto_map, dict):
        return None
    entry = auto_map.get("AutoModelForCausalLM") or next(
        (value for key, value in auto_map.items() if key.startswith("AutoModel")), None
    )
    if isinstance(entry, (list, tuple)):
        entry = entry[0]
    return entry if isinstance(entry, str) else None
