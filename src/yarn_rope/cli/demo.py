"""``yarn-rope demo``: plain RoPE vs YaRN (and linear) on SmolLM2, inside and beyond its context."""

from __future__ import annotations

import argparse
from typing import Any

from . import _common as common

DEMO_LENGTHS = [2048, 4096, 8192, 12288, 16384]
QUICK_LENGTHS = [2048, 4096, 8192, 12288]


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..eval.compare import compare_perplexity

    methods = ["none", "yarn"] if args.quick else ["none", "linear", "yarn"]
    lengths = QUICK_LENGTHS if args.quick else DEMO_LENGTHS
    args.model = None
    args.gguf_file = None
    args.original_max_position_embeddings = None
    model, tokenizer, original = common.load_model(args)
    name, text = common.documents(args)[0]
    print(
        f"document: {name} from this Python's standard library; perplexity of its first N tokens, "
        f"N = {', '.join(map(str, lengths))}; methods at factor 2: {', '.join(methods)}"
    )
    results = compare_perplexity(
        model,
        [text],
        tokenizer=tokenizer,
        methods=methods,
        factor=2.0,
        original_max_position_embeddings=original,
        lengths=lengths,
        progress=args.progress,
    )
    common.print_perplexity_table(results, original)
    beyond = max(lengths)
    by_method = {entry.method: entry.result for entry in results}
    plain_rise = by_method["none"].at(beyond).perplexity / by_method["none"].at(original).perplexity
    yarn_change = by_method["yarn"].at(beyond).perplexity / by_method["yarn"].at(original).perplexity - 1
    print(
        f"from {original} to {beyond} tokens: plain RoPE perplexity x{plain_rise:.2f}; "
        f"YaRN {yarn_change:+.0%} of its own value at {original}"
    )
    common.write_outputs(args, results, original, f"SmolLM2-135M on {name}")
    return 0


def register(commands: Any) -> None:
    """Add the ``demo`` command to the top-level subparsers."""
    demo = commands.add_parser(
        "demo",
        help="plain RoPE vs YaRN (and linear) on SmolLM2, inside and beyond its trained context",
        description="Perplexity of SmolLM2-135M (trained context 8192) on _pydecimal.py at 2k..16k tokens "
        "with plain RoPE, linear interpolation and YaRN at factor 2. Offline; about 5 minutes on 2 CPU "
        "cores (--quick: about 2).",
    )
    demo.add_argument("--quick", action="store_true", help="plain RoPE and YaRN only, up to 12288 tokens")
    demo.add_argument(
        "--plot", default="yarn-rope-demo.png", metavar="OUT.png", help="plot file ('' for none)"
    )
    demo.add_argument("--json", default=None, metavar="OUT", help="write one record per method and length")
    common.add_progress_flags(demo)
    demo.set_defaults(handler=_cmd_demo, text=None)
