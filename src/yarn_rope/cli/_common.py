"""Helpers shared by the commands: lengths, the model, documents, tables and output files."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any


class ExampleHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions wrapped to the terminal as usual; the example epilog kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith(_EXAMPLE):
            return super()._fill_text(text, width, indent)  # raw: one line per command
        return argparse.HelpFormatter._fill_text(self, text, width, indent)


_EXAMPLE = "example:\n"


def example(command: str) -> dict[str, Any]:
    """``add_parser`` keywords that end a command's help with one real example line.

    ``commands.add_parser("demo", help=..., **example("yarn-rope demo --quick"))``; a test parses
    every command's example with the real parser, so an example cannot name a flag that is gone.
    """
    return {"epilog": f"{_EXAMPLE}  {command}", "formatter_class": ExampleHelpFormatter}


def add_progress_flags(parser: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress`` (``args.progress``: True, False or None = on a terminal only).

    Every long command takes these two, and passes ``args.progress`` to the library's
    ``progress=`` (see :mod:`yarn_rope._progress`).
    """
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars on standard error (default: only when it is a terminal)",
    )


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--lengths takes whole numbers separated by commas, got {text!r}"
        ) from None
    if not lengths or any(n < 2 for n in lengths):
        raise argparse.ArgumentTypeError(f"--lengths must be whole numbers >= 2, got {text!r}")
    from ..eval.perplexity import MAX_LENGTH

    if max(lengths) > MAX_LENGTH:
        raise argparse.ArgumentTypeError(
            f"--lengths {max(lengths)} is beyond {MAX_LENGTH} tokens, more than any model reads; "
            "pass lengths in tokens, e.g. 4096,8192"
        )
    return lengths


def scale_factor(text: str) -> float:
    """argparse type of ``--factor``: a finite number >= 1 (the context extension ratio)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 2 or 4, got {text!r}") from None
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a finite number >= 1 (the context extension ratio), got {text!r}"
        )
    return value


def load_tokenizer(model: str, gguf_file: str | None) -> Any:
    """The tokenizer of ``--model`` (and ``--gguf-file``: with llama.cpp's pre-tokenizer)."""
    import transformers

    from ..eval.data import load_gguf_tokenizer

    try:
        if gguf_file is not None:
            return load_gguf_tokenizer(model, gguf_file)
        return transformers.AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError, TypeError, AttributeError, ImportError) as error:
        # transformers' messages for a missing tokenizer name sentencepiece or tiktoken, not the folder
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(
            f"--model {model}: no usable tokenizer (tokenizer.json, tokenizer.model or "
            "tokenizer_config.json) "
            f"in it; copy the tokenizer files of the checkpoint there ({first[:160]})"
        ) from None


def load_model(args: argparse.Namespace) -> tuple[Any, Any, int]:
    """(model, tokenizer, original context length) for ``--model``; the default is SmolLM2-135M-Instruct."""
    import transformers

    from .._progress import transformers_bars
    from ..eval.data import DEFAULT_MODEL_NAME, load_default_model
    from ..loading import from_pretrained
    from ..patch import patch_info, unpatch

    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    progress = getattr(args, "progress", None)
    if args.model is None:
        print(f"model: {DEFAULT_MODEL_NAME}, offline, trained context 8192")
        model, tokenizer = load_default_model(progress=progress)
    else:
        with transformers_bars(progress):
            model = from_pretrained(args.model, gguf_file=args.gguf_file)
        tokenizer = load_tokenizer(args.model, args.gguf_file)
    info = patch_info(model)
    original = args.original_max_position_embeddings
    if original is None and info is not None:
        original = info.scaling.original_max_position_embeddings
    if original is None:
        original = int(model.config.max_position_embeddings)
    unpatch(model)
    return model, tokenizer, original


def methods(args: argparse.Namespace) -> list[str]:
    """The ``--method`` values, or plain RoPE and YaRN when none was given."""
    return list(args.method or ["none", "yarn"])


def each_method(model: Any, args: argparse.Namespace, original: int) -> Iterator[str]:
    """Yield each method of :func:`methods` with ``model`` patched for it (``none``: left as is).

    The model is restored before the next method and when the generator closes (the loop ends,
    breaks or raises).
    """
    from ..eval.compare import applied, scaling_for

    for method in methods(args):
        scaling = scaling_for(method, factor=args.factor, original_max_position_embeddings=original)
        with applied(model, scaling):
            yield method


def model_name(args: argparse.Namespace) -> str:
    """The model's name in result records: ``--model`` (and ``--gguf-file``), else the default's."""
    from ..eval.data import DEFAULT_MODEL_NAME

    model = getattr(args, "model", None)
    if not model:
        return DEFAULT_MODEL_NAME
    gguf = getattr(args, "gguf_file", None)
    return f"{model}/{gguf}" if gguf else str(model)


def write_json(path: str, records: Sequence[Any]) -> None:
    """Write result records (:class:`~yarn_rope.eval.results.EvalRecord`) to ``--json``, atomically."""
    from ..eval.results import write_records

    try:
        write_records(records, path)
    except OSError as error:
        raise FileNotFoundError(f"cannot write --json {path}: {error.strerror}") from None
    print(f"wrote {path}")


def documents(args: argparse.Namespace, count: int = 1) -> list[tuple[str, str]]:
    from ..eval.data import default_corpus

    if not args.text:
        return default_corpus(count)
    documents = []
    for path in args.text:
        try:
            with open(path, encoding="utf-8") as handle:
                documents.append((os.path.basename(path), handle.read()))
        except OSError as error:
            raise FileNotFoundError(f"cannot read --text {path}: {error.strerror}") from None
        except UnicodeDecodeError as error:
            raise ValueError(
                f"--text {path} is not UTF-8 text (byte {error.start}: {error.reason}); pass a plain-text "
                "file"
            ) from None
        if not documents[-1][1].strip():
            raise ValueError(f"--text {path} is blank (no text to read); pass a file with text in it")
    return documents


def print_perplexity_table(results: Sequence[Any], trained: int | None) -> None:
    lengths = [entry.length for entry in results[0].result.lengths]
    width = max(12, *(len(r.label) + 2 for r in results))
    print("perplexity" + "".join(f"{r.label:>{width}}" for r in results))
    for length in lengths:
        marker = " *" if trained is not None and length > trained else "  "
        cells = "".join(f"{r.result.at(length).perplexity:>{width}.2f}" for r in results)
        print(f"{length:>8d}{marker}{cells}")
    if trained is not None and any(length > trained for length in lengths):
        print(f"(* beyond the trained context of {trained} tokens)")


def write_data(path: str, data: Any) -> None:
    """Write ``data`` as strict JSON to ``path`` whole or not at all (:func:`yarn_rope._files.write_json`)."""
    from .. import _files

    _files.write_json(path, data)


PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def check_outputs(args: argparse.Namespace) -> None:
    """Reject unusable ``--json`` / ``--plot`` files before any model is loaded.

    Raises:
        FileNotFoundError: the file's folder does not exist.
        ValueError: a plot file whose extension is not PNG, SVG or PDF.
        ImportError: ``--plot`` without matplotlib.
    """
    for flag in ("--json", "--plot", "--out"):
        check_output(getattr(args, flag[2:], None), flag)
    plot = getattr(args, "plot", None)
    if plot:
        if os.path.splitext(plot)[1].lower() not in PLOT_SUFFIXES:
            raise ValueError(f"--plot {plot}: the file name must end in .png, .svg or .pdf")
        if importlib.util.find_spec("matplotlib") is None:
            raise ImportError("--plot needs matplotlib: pip install 'yarn-rope[plot]'")


def write_outputs(args: argparse.Namespace, results: Sequence[Any], trained: int, title: str) -> None:
    from ..eval.compare import plot_perplexity

    if args.json:
        records = [record for entry in results for record in entry.records(model=model_name(args))]
        write_json(args.json, records)
    if args.plot:
        plot_perplexity(results, args.plot, trained_length=trained, title=title)
        print(f"wrote {args.plot}")


def add_model_arguments(command: argparse.ArgumentParser, *, default_methods: str) -> None:
    """``--model``, ``--gguf-file``, ``--method``, ``--factor``, ``--original-max-position-embeddings``
    as ``eval passkey`` has them (the default model is SmolLM2)."""
    from .. import METHODS

    command.add_argument(
        "--model", default=None, help="checkpoint folder or Hub name (default: SmolLM2-135M)"
    )
    command.add_argument("--gguf-file", default=None, help="GGUF file inside --model")
    command.add_argument(
        "--method",
        action="append",
        choices=METHODS,
        help=f"repeat to compare several (default: {default_methods})",
    )
    from . import _flags

    _flags.add_setting_flags(
        command,
        ("factor", "original_max_position_embeddings"),
        defaults={"factor": 2.0},
        kinds={"factor": scale_factor},
        notes={"factor": "default 2", "original_max_position_embeddings": "default: what the model declares"},
    )


def check_output(path: str | None, flag: str) -> None:
    """A one-line error before any model is loaded when ``flag``'s file cannot be written.

    Raises:
        FileNotFoundError: the folder does not exist, the path is a folder, or it is not writable.
    """
    if not path or not isinstance(path, str):
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {flag} {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise FileNotFoundError(f"cannot write {flag} {path}: it is a folder; name a file in it")
    if not os.access(folder, os.W_OK):
        raise FileNotFoundError(f"cannot write {flag} {path}: the folder {folder} is not writable")


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value
