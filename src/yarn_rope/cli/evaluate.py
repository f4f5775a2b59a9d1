"""``yarn-rope eval perplexity|passkey``: evaluation by context length, per method."""

from __future__ import annotations

import argparse
from typing import Any

from . import _common as common


def _cmd_eval_perplexity(args: argparse.Namespace) -> int:
    from ..eval.compare import compare_perplexity

    common.check_outputs(args)
    documents = common.documents(args, args.documents)
    model, tokenizer, original = common.load_model(args)
    names = ", ".join(name for name, _ in documents)
    mode = "truncate" if args.stride is None else f"sliding windows, stride {args.stride}"
    print(f"documents: {names}; {mode}; factor {args.factor:g} over {original} tokens")
    results = compare_perplexity(
        model,
        [text for _, text in documents],
        tokenizer=tokenizer,
        methods=common.methods(args),
        factor=args.factor,
        original_max_position_embeddings=original,
        lengths=args.lengths,
        stride=args.stride,
        progress=args.progress,
    )
    common.print_perplexity_table(results, original)
    common.write_outputs(args, results, original, f"perplexity on {names}")
    return 0


def _cmd_eval_passkey(args: argparse.Namespace) -> int:
    from ..eval.passkey import passkey
    from ..eval.results import EvalRecord

    common.check_outputs(args)
    model, tokenizer, original = common.load_model(args)
    rows: dict[str, dict[int, float]] = {}
    records: list[EvalRecord] = []
    for method in common.each_method(model, args, original):
        result = passkey(
            model, tokenizer, lengths=args.lengths, trials=args.trials, seed=args.seed, progress=args.progress
        )
        rows[method] = result.accuracy
        records.extend(result.records(model=common.model_name(args), method=method))
    print("passkey accuracy" + "".join(f"{method:>12}" for method in rows))
    for length in args.lengths:
        print(f"{length:>16d}" + "".join(f"{rows[m][length]:>12.0%}" for m in rows))
    if args.json:
        common.write_json(args.json, records)
    return 0


def register(commands: Any) -> Any:
    """Add the ``eval`` command; returns its subparsers so that other evaluations can join it."""
    evaluate = commands.add_parser(
        "eval",
        help="perplexity, passkey, RULER-style tasks or lm-eval benchmarks, per method",
        description="Evaluate a model by context length under several scaling methods.",
        **common.example("yarn-rope eval perplexity --method none --method yarn --lengths 8192,16384"),
    )
    kinds = evaluate.add_subparsers(dest="evaluation", metavar="EVALUATION", required=True)
    for kind, handler, help_text, example in (
        (
            "perplexity",
            _cmd_eval_perplexity,
            "perplexity by context length, per method",
            "yarn-rope eval perplexity --method none --method yarn --lengths 4096,8192,16384 --plot ppl.png",
        ),
        (
            "passkey",
            _cmd_eval_passkey,
            "passkey retrieval accuracy by prompt length, per method",
            "yarn-rope eval passkey --lengths 4096,8192,12288,16384 --trials 3",
        ),
    ):
        sub = kinds.add_parser(kind, help=help_text, description=help_text, **common.example(example))
        common.add_model_arguments(sub, default_methods="none, yarn")
        sub.add_argument(
            "--lengths", type=common.parse_lengths, default=[4096, 8192], help="comma-separated lengths"
        )
        sub.add_argument("--json", default=None, metavar="OUT", help="write one record per method and length")
        common.add_progress_flags(sub)
        if kind == "perplexity":
            sub.add_argument(
                "--stride",
                type=common.positive_int,
                default=None,
                help="sliding windows (default: truncate mode)",
            )
            sub.add_argument(
                "--text",
                nargs="+",
                default=None,
                metavar="FILE",
                help="plain-text documents (default: the longest stdlib source files)",
            )
            sub.add_argument(
                "--documents", type=common.positive_int, default=1, help="default corpus: how many files"
            )
            sub.add_argument("--plot", default=None, metavar="OUT.png", help="plot perplexity vs length")
        else:
            sub.add_argument(
                "--trials", type=common.positive_int, default=5, help="prompts per length (default 5)"
            )
            sub.add_argument("--seed", type=int, default=0)
        sub.set_defaults(handler=handler)
    return kinds
