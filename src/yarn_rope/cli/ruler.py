"""``yarn-rope eval ruler``: RULER-style long-context tasks by prompt length, per method."""

from __future__ import annotations

import argparse
import random
import time
import types
from typing import Any

from . import _common as common


def _tasks(text: str) -> list[str]:
    from ..eval.ruler import TASKS

    names = [part for part in text.replace(" ", "").split(",") if part]
    if text.strip() == "all":
        return list(TASKS)
    unknown = [name for name in names if name not in TASKS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"--tasks takes names from {', '.join(TASKS)} (or 'all') separated by commas, got {text!r}"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--tasks must not repeat a task, got {text!r}")
    return names


def _depths(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        values = []
    if not values or any(not 0.0 <= value <= 1.0 for value in values):
        raise argparse.ArgumentTypeError(
            f"--depths takes numbers in [0, 1] (0 = start of the context) separated by commas, got {text!r}"
        )
    return values


class _ByteCounter:
    """A stand-in tokenizer, one token per UTF-8 byte plus room for special tokens.

    Byte-level tokenizers never give more tokens than that, so a prompt that fits in these counts
    fits in the model's: the model's tokenizer is needed only when one does not.
    """

    specials = 8

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> Any:
        extra = [0] * self.specials if add_special_tokens else []
        ids = [[*piece.encode(), *extra] for piece in ([text] if isinstance(text, str) else text)]
        return types.SimpleNamespace(input_ids=ids[0] if isinstance(text, str) else ids)


def _check_prompt_lengths(args: argparse.Namespace, haystack: str | None) -> None:
    """``--lengths`` too short for a prompt of ``--tasks``: one line, before the model loads."""
    from ..eval.data import default_corpus, load_default_tokenizer
    from ..eval.ruler import NEEDLE_TASKS, Haystack, build_prompt

    shortest = min(args.lengths)
    needles = any(task in NEEDLE_TASKS for task in args.tasks)
    text = haystack if haystack is not None or not needles else default_corpus(1)[0][1]
    for exact in (False, True):
        tokenizer: Any = _ByteCounter()
        if exact:  # the tokenizer alone: a second load, only for lengths within a few hundred tokens
            tokenizer = (
                common.load_tokenizer(args.model, args.gguf_file) if args.model else load_default_tokenizer()
            )
        stack = Haystack.from_text(text, tokenizer) if text is not None else None
        try:
            for task in args.tasks:
                build_prompt(task, tokenizer, shortest, rng=random.Random(0), haystack=stack)
            return
        except ValueError as error:
            if exact:
                raise ValueError(str(error).replace(f"length={shortest}", f"--lengths {shortest}")) from None


def _cmd_eval_ruler(args: argparse.Namespace) -> int:
    from ..eval.report import markdown_table, plot_depth_heatmap
    from ..eval.results import EvalRecord
    from ..eval.ruler import NEEDLE_TASKS, ruler

    common.check_outputs(args)  # --json, --plot: the folder, the plot format, matplotlib
    if args.plot and not any(task in NEEDLE_TASKS for task in args.tasks):
        raise ValueError("--plot draws accuracy by needle depth: add a needle task to --tasks")
    haystack = None
    if args.text:
        haystack = "\n".join(text for _, text in common.documents(args))
    _check_prompt_lengths(args, haystack)
    model, tokenizer, original = common.load_model(args)
    name = common.model_name(args)
    print(
        f"tasks: {', '.join(args.tasks)}; {args.trials} trial(s) per task and length, seed {args.seed}; "
        f"factor {args.factor:g} over {original} tokens"
    )
    records: list[EvalRecord] = []
    started = time.perf_counter()
    for method in common.each_method(model, args, original):
        result = ruler(
            model,
            tokenizer,
            lengths=args.lengths,
            tasks=args.tasks,
            trials=args.trials,
            seed=args.seed,
            depths=args.depths,
            haystack=haystack,
            progress=args.progress,
        )
        records.extend(result.records(model=name, method=method))
    print(markdown_table(records, "ruler"))
    print(f"({time.perf_counter() - started:.0f} s for {len(common.methods(args))} method(s))")
    if args.json:
        common.write_json(args.json, records)
    if args.plot:
        plot_depth_heatmap(records, args.plot, title=f"{name}: accuracy by needle depth")
        print(f"wrote {args.plot}")
    return 0


def register(kinds: Any) -> None:
    """Add ``ruler`` to the ``eval`` subparsers (what :func:`yarn_rope.cli.evaluate.register` returns)."""
    from ..eval.ruler import TASKS

    help_text = "RULER-style long-context tasks (needle variants, variable tracking, common words)"
    sub = kinds.add_parser(
        "ruler",
        help=help_text,
        description=f"{help_text}: accuracy by prompt length, per method. Prompts are generated "
        "locally from --seed; needles hide in --text (default: the longest standard-library source "
        "file); answers are scored by exact match. Tasks: " + ", ".join(TASKS) + ".",
        **common.example(
            "yarn-rope eval ruler --lengths 4096,8192 --tasks niah_single,variable_tracking "
            "--trials 2 --json ruler.json --plot ruler.png"
        ),
    )
    common.add_model_arguments(sub, default_methods="none, yarn")
    sub.add_argument(
        "--lengths", type=common.parse_lengths, default=[4096, 8192], help="comma-separated lengths"
    )
    sub.add_argument(
        "--tasks", type=_tasks, default=list(TASKS), help="comma-separated task names (default: all six)"
    )
    sub.add_argument(
        "--trials", type=common.positive_int, default=5, help="prompts per task and length (default 5)"
    )
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument(
        "--depths",
        type=_depths,
        default=None,
        help="needle depths in [0, 1] used in turn by the trials (default: trial i of n at (i + 0.5) / n)",
    )
    sub.add_argument(
        "--text",
        nargs="+",
        default=None,
        metavar="FILE",
        help="plain-text haystack (default: the longest standard-library source file)",
    )
    sub.add_argument("--json", default=None, metavar="OUT", help="write the result records (JSON)")
    sub.add_argument(
        "--plot", default=None, metavar="OUT.png", help="heat map of accuracy by depth and length"
    )
    sub.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: only on a terminal)",
    )
    sub.set_defaults(handler=_cmd_eval_ruler)
