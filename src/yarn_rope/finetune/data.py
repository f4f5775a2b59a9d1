"""Training data: documents from files, a dataset or token ids, packed into fixed-length sequences.

The packing is the reference's (PG19 "tokenized, BOS/EOS, chunked to 65536" in the authors'
``emozilla/pg_books-tokenized-bos-eos-chunked-65536``): every text document becomes
``[BOS] tokens [EOS]``, the documents are concatenated in order into one stream, and the stream is
cut into consecutive sequences of ``seq_len`` tokens. A sequence may span several documents and a
document several sequences; nothing is padded, so every position of every sequence is a real token
with a real label.

Position ids are ``0 .. seq_len - 1`` in every sequence, whatever documents it spans (attention
and positions run across the EOS/BOS boundary, as in the reference, which trained on such chunks
without resetting positions). Labels are the input ids themselves: transformers' causal-LM loss
shifts them, so the target of position ``t`` is the token at ``t + 1``; ``seq_len - 1`` targets per
sequence, all scored.

Pre-tokenized data (an ``input_ids`` column, a ``[n, seq_len]`` tensor or lists of ids, the
reference's ``yarn-train-tokenized-8k`` form) is taken as it is, without bookends (its maker put
in whatever special tokens it wanted): rows are concatenated and cut the same way, so rows of
exactly ``seq_len`` tokens come out unchanged.

Tokens the packing does not use are counted, never silently lost: the stream is
``sequences.flatten()``, then ``held_out`` (an optional stretch after the last sequence, kept out
of training for evaluation), then ``dropped`` tokens (the tail shorter than one sequence).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .._progress import progress_bar

__all__ = [
    "PackedData",
    "PackedSequences",
    "hub_name",
    "load_documents",
    "pack_documents",
    "prepare_data",
]

logger = logging.getLogger(__name__)

_EXTRA = "pip install 'yarn-rope[finetune]'"
# File suffix -> datasets builder; anything else is read as plain text, one document per file.
_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}


@dataclasses.dataclass(frozen=True)
class PackedData:
    """Packed training sequences and what the packing did.

    Attributes:
        sequences: ``[n, seq_len]`` int64 token ids, the stream cut in order.
        held_out: ``[e]`` int64 tokens of the stream right after the last sequence, kept out of
            training (``e`` = the ``held_out`` asked for, 0 for none).
        documents: documents read.
        tokens: tokens in the stream read (bookends included).
        dropped: tokens read but in neither ``sequences`` nor ``held_out``: the tail shorter than
            one sequence, or the rest of the last document read when ``max_sequences`` stopped
            the packing.
        complete: whether the whole source was read (``False`` when packing stopped at
            ``max_sequences``: the rest of the source was not even tokenized).
        bookends: ``(bos, eos)`` token ids put around each text document (``None`` where the
            tokenizer has none, or for pre-tokenized data).
        source: what was read, for the record.
        files: local files read (``None`` for other sources).
        skipped: hidden files and folders (``.git/``, ``.DS_Store``) in the folders read, which
            are not training text and were skipped.
    """

    sequences: torch.Tensor
    held_out: torch.Tensor
    documents: int
    tokens: int
    dropped: int
    complete: bool
    bookends: tuple[int | None, int | None]
    source: str
    files: int | None = None
    skipped: tuple[str, ...] = ()

    @property
    def seq_len(self) -> int:
        return int(self.sequences.shape[1])

    def fingerprint(self) -> str:
        """SHA-256 of the sequences' token ids (resuming checks it: same data, same trajectory)."""
        return hashlib.sha256(self.sequences.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "sequences": int(self.sequences.shape[0]),
            "seq_len": self.seq_len,
            "held_out_tokens": int(self.held_out.numel()),
            "documents": self.documents,
            "tokens": self.tokens,
            "dropped_tokens": self.dropped,
            "complete": self.complete,
            "bos_token_id": self.bookends[0],
            "eos_token_id": self.bookends[1],
            "files": self.files,
            "skipped_hidden": list(self.skipped),
            "fingerprint": self.fingerprint(),
        }


class PackedSequences(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """The training examples: ``sequences[order[i]]`` as ``input_ids``, ``labels`` (the same ids:
    the model shifts them) and ``position_ids`` (``0 .. seq_len - 1``)."""

    def __init__(self, sequences: torch.Tensor, order: Sequence[int]) -> None:
        self.sequences = sequences
        self.order = list(order)
        self.positions = torch.arange(sequences.shape[1], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.sequences[self.order[index]]
        return {"input_ids": ids, "labels": ids.clone(), "position_ids": self.positions}


def _needs_datasets() -> Any:
    if importlib.util.find_spec("datasets") is None:
        raise ImportError(f"reading training data from files or a dataset needs `datasets`: {_EXTRA}")
    import datasets

    return datasets


_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILE_SUFFIXES = (".txt", ".md", ".py", ".json", ".jsonl", ".parquet", ".csv", ".arrow")


def hub_name(source: Any) -> str | None:
    """``source`` if :func:`load_documents` would read it from the Hugging Face Hub: one name that
    is not a local path, spelled like a dataset id (``pg19``, ``owner/name``) and not like a file
    (no ``.txt``/``.jsonl``/... suffix); else ``None``."""
    if isinstance(source, (list, tuple)) and len(source) == 1:
        source = source[0]
    if not isinstance(source, str) or os.path.exists(os.path.expanduser(source)):
        return None
    if not _HUB_NAME.fullmatch(source) or source.lower().endswith(_FILE_SUFFIXES):
        return None
    return source


def _files(paths: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """The files to read (folders recursively, sorted) and the hidden entries skipped in folders
    (``.git/``: a folder's whole tree; relative to the folder given)."""
    files: list[Path] = []
    skipped: list[str] = []
    for path in paths:
        if not path.is_dir():
            files.append(path)
            continue
        found: list[Path] = []
        for folder, subfolders, names in os.walk(path):
            here = Path(folder)
            hidden = sorted(name for name in subfolders if name.startswith("."))
            subfolders[:] = [name for name in subfolders if not name.startswith(".")]
            skipped += [f"{(here / name).relative_to(path).as_posix()}/" for name in hidden]
            for name in names:
                if name.startswith("."):
                    skipped.append((here / name).relative_to(path).as_posix())
                elif (here / name).is_file():
                    found.append(here / name)
        files.extend(sorted(found))
    return files, sorted(skipped)


@dataclasses.dataclass(frozen=True)
class _Opened:
    """What :func:`load_documents` opened, and where from (for messages and the record)."""

    dataset: Any
    kind: str
    files: list[Path] | None = None
    skipped: tuple[str, ...] = ()


def load_documents(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Any,
    *,
    text_column: str = "text",
    split: str = "train",
) -> tuple[Any, str]:
    """Open the training documents with the ``datasets`` library.

    Args:
        source: a ``datasets.Dataset`` / ``IterableDataset``; a folder written by
            ``Dataset.save_to_disk``; local files or folders (``.txt`` and any other suffix: one
            document per file; ``.json``/``.jsonl``/``.parquet``/``.csv``/``.arrow``: one document
            per row; folders are read recursively, in sorted order); or a dataset name on the
            Hugging Face Hub when one is reachable.
        text_column: the column holding the text (rows with an ``input_ids`` column are taken as
            pre-tokenized instead).
        split: the split of a Hub dataset or a saved ``DatasetDict``.

    Returns:
        ``(dataset, kind)``: kind ``"text"`` (read ``text_column``) or ``"tokens"`` (read
        ``input_ids``).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: files of mixed kinds, a dataset with neither column, an unreachable Hub name.
        ImportError: ``datasets`` is not installed.
    """
    opened = _open(source, text_column=text_column, split=split)
    return opened.dataset, opened.kind


def _open(source: Any, *, text_column: str, split: str) -> _Opened:
    datasets = _needs_datasets()
    files: list[Path] | None = None
    skipped: list[str] = []
    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        dataset = source
    else:
        names = [source] if isinstance(source, (str, os.PathLike)) else list(source)
        if not names:
            raise ValueError("no training data given")
        paths = [Path(os.path.expanduser(os.fspath(name))) for name in names]
        missing = [str(path) for path in paths if not path.exists()]
        name = hub_name(names)
        if name is not None:
            dataset = _from_hub(datasets, name, split)
        elif missing:
            raise FileNotFoundError(f"training data not found: {', '.join(missing)}")
        elif len(paths) == 1 and _is_saved_dataset(paths[0]):
            dataset = datasets.load_from_disk(str(paths[0]))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise ValueError(f"{paths[0]} holds splits {list(dataset)}, not {split!r}")
                dataset = dataset[split]
        else:
            files, skipped = _files(paths)
            dataset = _from_files(datasets, files)
    columns = list(dataset.column_names or [])
    for kind, column in (("tokens", "input_ids"), ("text", text_column)):
        if column in columns:
            return _Opened(dataset, kind, files, tuple(skipped))
    raise ValueError(
        f"the training data has columns {columns}: it needs a {text_column!r} column (text) or an "
        "'input_ids' column (pre-tokenized); name the text column with text_column= / --text-column"
    )


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("dataset_dict.json", "state.json"))


def _from_files(datasets: Any, files: list[Path]) -> Any:
    if not files:
        raise ValueError("the training data folder holds no files")
    builders = {_BUILDERS.get(path.suffix.lower(), "text") for path in files}
    if len(builders) > 1:
        raise ValueError(
            f"training files of mixed kinds ({', '.join(sorted(builders))}): pass files of one kind "
            "(plain text, or JSON lines, or parquet, ...)"
        )
    builder = builders.pop()
    data_files = [str(path) for path in files]
    options = {"sample_by": "document"} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=data_files, split="train", **options)
    except datasets.exceptions.DatasetGenerationError as error:
        cause = error.__cause__ or error
        hint = " (text files must be UTF-8)" if isinstance(cause, UnicodeDecodeError) else ""
        raise ValueError(f"cannot read the training files: {type(cause).__name__}: {cause}{hint}") from error


def _from_hub(datasets: Any, name: str, split: str) -> Any:
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as error:  # network, authentication, unknown name: all say the same to the user
        raise ValueError(
            f"cannot load dataset {name!r} from the Hugging Face Hub ({type(error).__name__}: {error}); "
            "pass local text/JSONL/parquet files or a folder instead"
        ) from error


def _document_ids(
    opened: _Opened,
    tokenizer: Any | None,
    text_column: str,
    bookends: tuple[int | None, int | None],
    vocab_size: int | None,
) -> Iterator[Sequence[int] | torch.Tensor]:
    bos, eos = bookends
    for index, row in enumerate(opened.dataset):
        if opened.kind == "tokens":
            yield _checked_ids(row["input_ids"], functools.partial(_locate, opened.files, index), vocab_size)
            continue
        text = row[text_column]
        if not isinstance(text, str):
            raise TypeError(f"column {text_column!r} holds {type(text).__name__}, not text")
        assert tokenizer is not None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        yield ([bos] if bos is not None else []) + list(ids) + ([eos] if eos is not None else [])


def _checked_ids(ids: Any, where: Callable[[], str], vocab_size: int | None = None) -> torch.Tensor:
    """``ids`` as an int64 tensor, refused unless every id is a whole number in ``[0, vocab_size)``
    (JSON readers turn ``[1, 2.7]`` into floats, which a plain ``int()`` would silently truncate).

    Args:
        ids: one document's token ids (a list or a tensor).
        where: names the document in a message (called only on error): ``"FILE line N"``.
        vocab_size: the model's vocabulary (``None``: check only that ids are whole and >= 0).

    Raises:
        ValueError: naming ``where``, the position, the value and the vocabulary size.
    """
    try:
        values = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(ids)
        if values.is_floating_point() and not isinstance(ids, torch.Tensor):
            values = torch.as_tensor(ids, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"{where()}: input_ids must be a list of whole numbers (token ids): {error}"
        ) from None
    values = values.reshape(-1)
    if values.dtype == torch.bool or values.is_complex():
        raise ValueError(f"{where()}: input_ids must be whole numbers (token ids), got {values.dtype}")
    if values.is_floating_point():
        fraction = ~torch.isfinite(values) | (values != values.round())
        if bool(fraction.any()):
            position = int(fraction.nonzero()[0])
            raise ValueError(
                f"{where()}: input_ids must be whole numbers (token ids); position {position} holds "
                f"{float(values[position])!r}: tokenize the data again"
            )
    outside = values < 0 if vocab_size is None else (values < 0) | (values >= vocab_size)
    if bool(outside.any()):
        position = int(outside.nonzero()[0])
        limit = (
            f"the model's vocabulary of {vocab_size} (ids 0-{vocab_size - 1})" if vocab_size else "ids >= 0"
        )
        raise ValueError(
            f"{where()}: token id {int(values[position])} at position {position} is outside {limit}: the "
            "data were tokenized for another model, or are damaged"
        )
    return values.to(torch.long)


def _token_row(index: int) -> str:
    return f"row {index + 1} of the token ids"


def _locate(files: list[Path] | None, index: int) -> str:
    """``"FILE line N"`` (JSON lines) or ``"FILE row N"`` (parquet) of the dataset's row ``index``,
    else ``"row N of the training data"``."""
    for path in files or []:
        if path.suffix.lower() in (".jsonl", ".json"):
            with open(path, encoding="utf-8", errors="replace") as handle:
                rows = (number for number, line in enumerate(handle, 1) if line.strip())
                for number in rows:
                    if index == 0:
                        return f"{path} line {number}"
                    index -= 1
        elif path.suffix.lower() == ".parquet" and importlib.util.find_spec("pyarrow") is not None:
            import pyarrow.parquet  # type: ignore[import-untyped]

            count = int(pyarrow.parquet.read_metadata(path).num_rows)
            if index < count:
                return f"{path} row {index + 1}"
            index -= count
        else:
            break
    return f"row {index + 1} of the training data"


def pack_documents(
    documents: Iterable[Sequence[int] | torch.Tensor],
    *,
    seq_len: int,
    max_sequences: int | None = None,
    held_out: int = 0,
    bookends: tuple[int | None, int | None] = (None, None),
    source: str = "token ids",
) -> PackedData:
    """Concatenate ``documents`` (token ids, bookends already in place) and cut sequences.

    Args:
        documents: token ids of each document, in order.
        seq_len: tokens per sequence.
        max_sequences: stop reading once this many sequences (and ``held_out``) are filled;
            ``None`` reads everything.
        held_out: tokens kept after the last sequence for evaluation.
        bookends: ``(bos, eos)`` recorded in the result (the caller added them).
        source: description recorded in the result.

    Returns:
        :class:`PackedData`.

    Raises:
        ValueError: fewer than ``seq_len + held_out`` tokens in all.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len!r}")
    if max_sequences is not None and max_sequences < 1:
        raise ValueError(f"max_sequences must be >= 1 or None, got {max_sequences!r}")
    if held_out < 0:
        raise ValueError(f"held_out must be >= 0, got {held_out!r}")
    need = None if max_sequences is None else max_sequences * seq_len + held_out
    chunks: list[torch.Tensor] = []
    total = count = 0
    complete = True
    iterator = iter(documents)
    for ids in iterator:
        chunks.append(
            ids.to(torch.long)
            if isinstance(ids, torch.Tensor)
            else torch.as_tensor(list(ids), dtype=torch.long)
        )
        total += chunks[-1].numel()
        count += 1
        if need is not None and total >= need:
            complete = next(iterator, None) is None  # one look ahead: was that the last document?
            break
    if total < seq_len + held_out:
        extra = f" plus {held_out} held out for evaluation" if held_out else ""
        raise ValueError(
            f"the training data ({source}) holds {total} tokens in {count} document(s), fewer than one "
            f"sequence of {seq_len} tokens{extra}: give more data or a shorter sequence length"
        )
    stream = torch.cat(chunks)
    n = (total - held_out) // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    used = n * seq_len
    sequences = stream[:used].reshape(n, seq_len).clone()
    held = stream[used : used + held_out].clone()
    return PackedData(
        sequences=sequences,
        held_out=held,
        documents=count,
        tokens=total,
        dropped=total - used - held_out,
        complete=complete,
        bookends=bookends,
        source=source,
    )


def prepare_data(
    source: Any,
    tokenizer: Any | None = None,
    *,
    seq_len: int,
    max_sequences: int | None = None,
    held_out: int = 0,
    text_column: str = "text",
    split: str = "train",
    progress: bool | None = None,
    vocab_size: int | None = None,
) -> PackedData:
    """Read ``source`` and pack it into ``seq_len``-token sequences (see the module docstring).

    Args:
        source: token ids (a ``[n, s]`` tensor, or a list of id lists: pre-tokenized), a
            ``datasets`` dataset, files/folders, or a Hub dataset name (see
            :func:`load_documents`).
        tokenizer: tokenizes text documents; its ``bos_token_id``/``eos_token_id`` bookend each.
        seq_len: tokens per sequence.
        max_sequences: stop once this many sequences are filled (large sources are not read to
            the end).
        held_out: tokens kept after the last sequence for evaluation.
        text_column: the text column of tabular data.
        split: Hub / saved-dataset split.
        progress: a bar over documents (``None``: on a terminal only).
        vocab_size: the model's vocabulary: pre-tokenized ids outside ``[0, vocab_size)`` are
            refused (``None``: only negative ids).

    Returns:
        :class:`PackedData`.

    Raises:
        ValueError: too little data for one sequence (plus ``held_out``); pre-tokenized ids that
            are not whole numbers or not in the vocabulary (naming the file and line); see
            :func:`load_documents` for the rest.
        TypeError: text data without a tokenizer.
    """
    if isinstance(source, torch.Tensor) or (
        isinstance(source, (list, tuple)) and source and not isinstance(source[0], (str, os.PathLike))
    ):
        rows = (
            list(source)
            if not isinstance(source, torch.Tensor)
            else list(source.reshape(source.shape[0], -1))
        )
        documents = (
            _checked_ids(row, functools.partial(_token_row, index), vocab_size)
            for index, row in enumerate(rows)
        )
        return pack_documents(
            documents, seq_len=seq_len, max_sequences=max_sequences, held_out=held_out, source="token ids"
        )
    with _datasets_bars(progress):
        opened = _open(source, text_column=text_column, split=split)
    if opened.files is not None:
        logger.info(
            "read %d file(s)%s",
            len(opened.files),
            f"; skipped hidden: {', '.join(opened.skipped)}" if opened.skipped else "",
        )
    bookends: tuple[int | None, int | None] = (None, None)
    if opened.kind == "text":
        if tokenizer is None:
            raise TypeError("the training data is text: pass tokenizer= to tokenize it")
        bookends = (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None))
        if bookends == (None, None):
            logger.warning("the tokenizer has neither a BOS nor an EOS token: documents are packed unmarked")
    description = _describe(source)
    total = len(opened.dataset) if hasattr(opened.dataset, "__len__") else None
    with progress_bar(total, desc="packing", unit="doc", enabled=progress) as bar:

        def counted() -> Iterator[Sequence[int] | torch.Tensor]:
            for ids in _document_ids(opened, tokenizer, text_column, bookends, vocab_size):
                bar.update(1)
                yield ids

        packed = pack_documents(
            counted(),
            seq_len=seq_len,
            max_sequences=max_sequences,
            held_out=held_out,
            bookends=bookends,
            source=description,
        )
    files = None if opened.files is None else len(opened.files)
    return dataclasses.replace(packed, files=files, skipped=opened.skipped)


@contextlib.contextmanager
def _datasets_bars(enabled: bool | None) -> Iterator[None]:
    """The ``datasets`` library's own bars (file reading, split generation) follow ``progress``
    too, and are restored afterwards."""
    datasets = _needs_datasets()
    show = enabled if enabled is not None else sys.stderr.isatty()
    was_disabled = datasets.are_progress_bars_disabled()
    if show == (not was_disabled):
        yield
        return
    (datasets.enable_progress_bars if show else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.disable_progress_bars if was_disabled else datasets.enable_progress_bars)()


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (list, tuple)):
        return ", ".join(os.fspath(item) for item in source)
    return type(source).__name__
