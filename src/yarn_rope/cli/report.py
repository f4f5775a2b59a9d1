"""``yarn-rope report``: one Markdown table (and plots) from the JSON records of several runs."""

from __future__ import annotations

import argparse
import importlib.util
import os
from typing import Any

from . import _common as common


def _cmd_report(args: argparse.Namespace) -> int:
    from .._files import write_text
    from ..eval.report import plot_records, render_markdown
    from ..eval.results import load_records

    common.check_output(args.out, "--out")
    if args.plot is not None:
        if os.path.exists(args.plot) and not os.path.isdir(args.plot):
            raise FileNotFoundError(f"--plot {args.plot} is a file, not a folder")
        if importlib.util.find_spec("matplotlib") is None:
            raise ImportError("--plot needs matplotlib: pip install 'yarn-rope[plot]'")
    records = [record for path in args.results for record in load_records(path)]
    if not records:
        raise ValueError(f"the results file(s) {', '.join(args.results)} hold no records")
    text = render_markdown(records, title=args.title)
    if args.out:
        write_text(args.out, text)
        print(f"wrote {args.out} ({len(records)} records from {len(args.results)} file(s))")
    else:
        print(text, end="")
    if args.plot is not None:
        for path in plot_records(records, args.plot):
            print(f"wrote {path}")
    return 0


def register(commands: Any) -> None:
    """Add the top-level ``report`` command."""
    help_text = "combine the --json records of several evaluations into one Markdown report (and plots)"
    report = commands.add_parser(
        "report",
        help=help_text,
        description=f"{help_text}: one table per suite (perplexity, passkey, RULER-style tasks, "
        "lm-evaluation-harness), rows by task and length, a column per model and method.",
        **common.example("yarn-rope report ruler.json short.json --out REPORT.md --plot plots/"),
    )
    report.add_argument("results", nargs="+", metavar="RESULTS.json", help="files written by --json")
    report.add_argument("--out", default=None, metavar="REPORT.md", help="write here (default: print)")
    report.add_argument("--plot", default=None, metavar="DIR", help="write every plot the records allow here")
    report.add_argument("--title", default="Evaluation report", help="the report's first heading")
    report.set_defaults(handler=_cmd_report)
