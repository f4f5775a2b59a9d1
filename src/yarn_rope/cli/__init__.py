"""``yarn-rope`` command line: the only package that prints or configures logging.

One module per command, each with a ``register(subparsers)`` function:

- ``frequencies``: ``yarn-rope frequencies``, the per-pair table of a scaling method;
- ``inspection``: ``yarn-rope inspect MODEL``, what a checkpoint declares and what the loader does;
- ``demo``: ``yarn-rope demo``, plain RoPE vs YaRN on SmolLM2;
- ``evaluate``: ``yarn-rope eval perplexity|passkey`` (and the ``eval`` group the next two join);
- ``ruler``: ``yarn-rope eval ruler``, RULER-style long-context tasks;
- ``harness``: ``yarn-rope eval harness``, short-context benchmarks through lm-evaluation-harness;
- ``report``: ``yarn-rope report RESULTS...``, result files into one Markdown report;
- ``finetune``: ``yarn-rope finetune``, training through a context extension;
- ``export``: ``yarn-rope export SOURCE --to ...``, the exact settings per serving engine.
- ``verify``: ``yarn-rope verify URL --model SOURCE``, does a running server apply the scaling.

Helpers they share live in ``_common``; ``_flags`` generates the flags of the scaling settings
(from the registry's ``SETTINGS``) and of the fine-tuning recipe (from its fields).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from .. import __version__
from . import (
    _common,
    demo,
    evaluate,
    export,
    finetune,
    frequencies,
    harness,
    inspection,
    report,
    ruler,
    verify,
)

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``yarn-rope eval passkey: error: argument --lengths: ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``yarn-rope`` argument parser with every command registered."""
    parser = _Parser(
        prog="yarn-rope",
        description="Exact YaRN context-window extension for Hugging Face transformers models.",
        **_common.example("yarn-rope demo --quick"),
    )
    parser.add_argument("--version", action="version", version=f"yarn-rope {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    frequencies.register(commands)
    inspection.register(commands)
    demo.register(commands)
    evaluations = evaluate.register(commands)
    ruler.register(evaluations)
    harness.register(evaluations)
    report.register(commands)
    finetune.register(commands)
    export.register(commands)
    verify.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a user error, printed in one line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.handler(args))
    except (ValueError, TypeError, OSError, ImportError) as error:
        # Every user mistake is one line; OSError covers files that cannot be read or written
        # (FileNotFoundError, IsADirectoryError, PermissionError) and an unreachable Hub.
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"yarn-rope: error: {message}", file=sys.stderr)
        return 2
