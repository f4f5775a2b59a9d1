"""``yarn-rope verify URL``: does a running server apply the rope scaling? (:func:`yarn_rope.verify`)."""

from __future__ import annotations

import argparse
import math
from typing import Any

from .. import methods as M
from . import _common as common
from . import _flags

_EXAMPLE = "yarn-rope verify http://127.0.0.1:8000 --model path/to/model --factor 2 --length 4096"


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of nats such as 0.01, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of nats, got {text!r}")
    return value


def _cmd_verify(args: argparse.Namespace) -> int:
    if args.method is not None:
        M.check_method(args.method)
    common.check_outputs(args)  # --json: before the server is asked anything
    from ..verify import verify

    settings = _flags.given_scaling(args)
    result = verify(
        args.url,
        args.model,
        text=args.text,
        length=args.length,
        tolerance=args.tolerance,
        served_model=args.served_model,
        gguf_file=args.gguf_file,
        compare_plain=args.plain,
        progress=args.progress,
        **settings,
    )
    _print_result(result)
    if args.json:
        common.write_data(args.json, result.to_dict())
        print(f"wrote {args.json}")
    return 0 if result.applied else 1


def _print_result(result: Any) -> None:
    server = result.server
    limit = f", max_model_len {server.max_model_len}" if server.max_model_len is not None else ""
    print(f"server:    {server.kind} at {server.url} (model {server.model}{limit})")
    print(f"reference: yarn_rope, {result.scaling.method} on {result.source}")
    original = result.original_max_position_embeddings
    print(f"tokens:    {result.length} of {result.text}; original context {original}")
    plain = any(band.plain_perplexity is not None for band in result.bands)
    header = f"{'band':<8}{'positions':>14}{'tokens':>8}{'server ppl':>12}{'yarn_rope ppl':>15}{'ratio':>10}"
    header += f"{'mean |dNLL|':>13}{'max |dNLL|':>12}" + (
        f"{'plain ppl':>11}{'vs plain':>10}" if plain else ""
    )
    print(header)
    for band in result.bands:
        row = (
            f"{band.band:<8}{f'{band.start}-{band.stop}':>14}{band.tokens:>8}{band.server_perplexity:>12.6f}"
        )
        row += f"{band.reference_perplexity:>15.6f}{band.ratio:>10.6f}{band.mean_difference:>13.3g}"
        row += f"{band.max_difference:>12.3g}"
        if band.plain_perplexity is not None:
            row += f"{band.plain_perplexity:>11.6f}{band.plain_mean_difference:>10.3g}"
        print(row)
    print(f"verdict:   {result.verdict}")


def register(commands: Any) -> None:
    """Add the ``verify`` command to the top-level subparsers."""
    from ..verify import DEFAULT_TOLERANCE

    parser = commands.add_parser(
        "verify",
        help="check that a running vLLM, SGLang or llama.cpp server applies the rope scaling",
        description=(
            "Score the same token ids through a running OpenAI-compatible server (vLLM, llama-cpp-python's "
            "server, SGLang) and with yarn_rope's reference for the scaling SOURCE declares (or the flags), "
            "and compare per token inside the original context and beyond it. Exit status 0: the scaling "
            "is applied; 1: it is not; 2: the check could not be made."
        ),
        **common.example(_EXAMPLE),
    )
    parser.add_argument("url", metavar="URL", help="the server's address, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, metavar="SOURCE", help="the model the server runs (folder)")
    parser.add_argument(
        "--gguf-file", default=None, metavar="NAME", help="GGUF file inside the SOURCE folder"
    )
    parser.add_argument(
        "--text", default=None, metavar="FILE", help="UTF-8 text to score (default: _pydecimal.py)"
    )
    parser.add_argument(
        "--length",
        type=common.positive_int,
        default=None,
        metavar="N",
        help="tokens to score (default: twice the original context, within the server's limit)",
    )
    parser.add_argument(
        "--tolerance",
        type=_tolerance,
        default=DEFAULT_TOLERANCE,
        metavar="NATS",
        help=f"largest mean per-token NLL difference per band (default {DEFAULT_TOLERANCE:g}; "
        "quantized weights: 0.1)",
    )
    parser.add_argument(
        "--served-model", default=None, metavar="ID", help="model id, if the server has several"
    )
    parser.add_argument(
        "--plain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also score plain RoPE, so the verdict can say the server matches it better (default: on)",
    )
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the result as JSON")
    parser.add_argument(
        "--method", default=None, metavar="NAME", help="scaling method (default: the source's, else yarn)"
    )
    _flags.add_setting_flags(parser)
    common.add_progress_flags(parser)
    parser.set_defaults(handler=_cmd_verify)
