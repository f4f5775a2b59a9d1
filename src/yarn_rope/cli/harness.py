"""``yarn-rope eval harness``: short-context benchmarks through lm-evaluation-harness, base vs methods."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from typing import Any

from . import _common as common


def _task_names(text: str) -> list[str]:
    names = [part for part in text.replace(" ", "").split(",") if part]
    if not names:
        raise argparse.ArgumentTypeError(
            f"--tasks takes lm-eval task names separated by commas, got {text!r}"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--tasks must not repeat a task, got {text!r}")
    return names


def _fewshot(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"--num-fewshot takes a whole number >= 0, got {text!r}")
    return value


def _limit(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(
            f"--limit takes a number of examples per task (or a fraction below 1), got {text!r}"
        )
    return int(value) if value >= 1 and value == int(value) else value


def _cmd_eval_harness(args: argparse.Namespace) -> int:
    from ..eval.harness import HarnessDataUnavailable, compare_harness, load_tasks
    from ..eval.report import markdown_table, plot_harness

    common.check_outputs(args)  # --json, --plot: the folder, the plot format, matplotlib
    if importlib.util.find_spec("lm_eval") is None:
        raise ImportError(
            "yarn-rope eval harness needs lm-evaluation-harness: pip install 'yarn-rope[harness]'"
        )
    print(f"tasks: {', '.join(args.tasks)} (loading their datasets)")
    try:
        tasks = load_tasks(args.tasks, num_fewshot=args.num_fewshot, include_path=args.include_path)
    except HarnessDataUnavailable as error:
        print(f"yarn-rope: error: {error}", file=sys.stderr)
        return 2
    shots = ", ".join(f"{name} {count}-shot" for name, count in tasks.num_fewshot.items())
    model, tokenizer, original = common.load_model(args)
    print(f"{shots}; methods at factor {args.factor:g} over {original} tokens, beside the unpatched model")
    started = time.perf_counter()
    results = compare_harness(
        model,
        tokenizer,
        methods=args.method or ["yarn"],
        factor=args.factor,
        original_max_position_embeddings=original,
        tasks=tasks,
        limit=args.limit,
        batch_size=args.batch_size,
        quiet=not args.verbose,
        progress=args.progress,
    )
    records = [record for result in results for record in result.records(model=common.model_name(args))]
    print(markdown_table(records, "harness"))
    limited = f", at most {args.limit} example(s) per task" if args.limit is not None else ""
    print(f"(values in %, ± the harness's standard error{limited}; {time.perf_counter() - started:.0f} s)")
    if args.json:
        common.write_json(args.json, records)
    if args.plot:
        plot_harness(records, args.plot)
        print(f"wrote {args.plot}")
    return 0


def register(kinds: Any) -> None:
    """Add ``harness`` to the ``eval`` subparsers (what :func:`yarn_rope.cli.evaluate.register` returns)."""
    from ..eval.harness import AUTHORS_FEWSHOT, DEFAULT_TASKS

    authors = ", ".join(f"{name} {count}-shot" for name, count in AUTHORS_FEWSHOT.items())
    help_text = (
        "short-context benchmarks through lm-evaluation-harness, the unpatched model beside each method"
    )
    sub = kinds.add_parser(
        "harness",
        help=help_text,
        description=f"{help_text}, laid out like a YaRN model card's short-context table. Defaults: the "
        f"authors' eval-harness.sh ({authors}). Datasets download from the Hugging Face Hub the first "
        "time; offline, only cached datasets and local tasks (--include-path) work. Needs lm-eval "
        "(pip install 'yarn-rope[harness]').",
        **common.example(
            "yarn-rope eval harness --tasks arc_challenge,hellaswag --limit 200 --json short.json"
        ),
    )
    common.add_model_arguments(sub, default_methods="yarn; the unpatched model is always the first column")
    sub.add_argument(
        "--tasks",
        type=_task_names,
        default=list(DEFAULT_TASKS),
        help=f"comma-separated lm-eval task or group names (default: {','.join(DEFAULT_TASKS)})",
    )
    sub.add_argument(
        "--num-fewshot",
        type=_fewshot,
        default=None,
        metavar="N",
        help="few-shot examples for every task (default: the authors' per task, else the task's own)",
    )
    sub.add_argument(
        "--limit", type=_limit, default=None, metavar="N", help="examples per task (default: all)"
    )
    sub.add_argument(
        "--include-path",
        default=None,
        metavar="DIR",
        help="folder of local lm-eval task YAML files (e.g. a task on a local JSON dataset)",
    )
    sub.add_argument(
        "--batch-size", type=common.positive_int, default=1, help="lm-eval batch size (default 1)"
    )
    sub.add_argument("--json", default=None, metavar="OUT", help="write the result records (JSON)")
    sub.add_argument(
        "--plot", default=None, metavar="OUT.png", help="bar chart per task with standard errors"
    )
    common.add_progress_flags(sub)
    sub.set_defaults(handler=_cmd_eval_harness)
