"""``yarn-rope export``: the exact rope settings for vLLM, SGLang, llama.cpp or transformers; GGUF copies."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .. import methods as M
from ..export import TARGETS
from . import _common as common
from . import _flags

_EXAMPLE = "yarn-rope export path/to/Yarn-Mistral-7b-128k --to vllm --json vllm.json"

# How each target's Python call is spelled (yarn_rope.export.TARGETS names the targets only).
_ENTRY_POINTS = {
    "vllm": "vllm.LLM",
    "sglang": "sglang.Engine",
    "llama.cpp": "llama_cpp.Llama",
    "gguf": "llama_cpp.Llama",
    "transformers": "AutoModelForCausalLM.from_pretrained",
}


def _call(name: str, keywords: dict[str, Any]) -> str:
    return f"{name}(" + ", ".join(f"{key}={value!r}" for key, value in keywords.items()) + ")"


def _check_args(args: argparse.Namespace) -> None:
    """User mistakes, before anything is read: one line each, naming the flag."""
    source = Path(args.source)
    if not source.exists():
        raise FileNotFoundError(f"SOURCE {args.source}: no such checkpoint folder, config or GGUF file")
    if args.to == "gguf":
        if args.out is None:
            raise ValueError("--to gguf needs --out OUT.gguf (the input is never overwritten)")
        if not (source.suffix == ".gguf" or args.gguf_file is not None):
            raise ValueError(f"--to gguf copies a GGUF file; SOURCE {args.source} is not a .gguf file")
    elif args.out is not None:
        raise ValueError(f"--out writes a GGUF copy and needs --to gguf, not --to {args.to}")
    if args.method is not None:
        M.check_method(args.method)
    common.check_outputs(args)  # --json, --out: before anything is read or written


def _cmd_export(args: argparse.Namespace) -> int:
    _check_args(args)
    from ..export import export

    settings = _flags.given_scaling(args)
    result = export(
        args.source,
        args.to,
        out=args.out,
        gguf_file=args.gguf_file,
        context_length=args.context_length,
        allow_approximation=args.allow_approximation,
        rope_theta=args.rope_theta,
        rotary_dim=args.rotary_dim,
        progress=args.progress,
        **settings,
    )
    _print_result(result)
    if result.output is not None:
        print(f"wrote {result.output}")
    if args.json:
        common.write_data(args.json, result.to_dict())
        print(f"wrote {args.json}")
    return 0


def _describe(scaling: Any) -> str:
    """``yarn factor=2 original=4096 beta_fast=32 beta_slow=1 attention scaling=1.069315``."""
    described = f"{scaling.method}"
    if scaling.method != "none":
        described += f" factor={scaling.factor:g}" if scaling.factor is not None else ""
        if scaling.original_max_position_embeddings is not None:
            described += f" original={scaling.original_max_position_embeddings}"
        if "beta_fast" in scaling.spec.settings:
            described += f" beta_fast={scaling.beta_fast:g} beta_slow={scaling.beta_slow:g}"
        described += f" attention scaling={scaling.attention_scaling():.6f}"
    return described


def _print_result(result: Any) -> None:
    """What to type or pass, one labelled line each (an :class:`~yarn_rope.export.ExportResult`)."""
    print(f"source:    {result.source}")
    print(f"target:    {result.engine}")
    print(f"checked:   {result.checked}")
    print(f"scaling:   {_describe(result.scaling)}")
    if result.approximation is not None:
        approximation = result.approximation
        print(f"requested: {approximation.requested.method} (approximated: {approximation.lost})")
        print(
            f"largest relative difference: frequency table {approximation.table_difference:.3g}, attention "
            f"scaling {approximation.attention_difference:.3g} (sequence lengths "
            f"{approximation.lengths[0]}-{approximation.lengths[-1]})"
        )
    context = result.context_length if result.context_length is not None else "the model's own"
    print(f"context:   {context}")
    if result.command:
        print(f"command:   {result.command_line()}")
    print(f"python:    {_call(_ENTRY_POINTS.get(result.target, result.target), result.python)}")
    if result.target in ("vllm", "sglang"):
        print(f"overrides: {json.dumps(result.settings)}")
    else:
        print(f"settings:  {json.dumps(result.settings)}")
    for note in result.notes:
        print(f"note:      {note}")


def register(commands: Any) -> None:
    """Add the ``export`` command to the top-level subparsers."""
    parser = commands.add_parser(
        "export",
        help="the exact rope settings for vLLM, SGLang, llama.cpp or transformers; GGUF copies",
        description=(
            "Print what to type or pass to serve SOURCE (a checkpoint folder, a config.json or a GGUF file) "
            "with its exact rope scaling, for the named engine release: the command line, the Python "
            "keyword arguments, the override JSON and the context length to allow. --to gguf writes a copy "
            "of a GGUF file with the scaling in its metadata, tensors copied byte for byte. Settings an "
            "engine cannot compute are refused, unless --allow-approximation."
        ),
        **common.example(_EXAMPLE),
    )
    parser.add_argument("source", metavar="SOURCE", help="checkpoint folder, config.json or GGUF file")
    parser.add_argument("--to", required=True, choices=list(TARGETS), help="export target")
    parser.add_argument("--out", default=None, metavar="OUT.gguf", help="--to gguf: the copy to write")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the result as JSON")
    parser.add_argument(
        "--gguf-file", default=None, metavar="NAME", help="GGUF file inside the SOURCE folder"
    )
    parser.add_argument(
        "--method", default=None, metavar="NAME", help="scaling method (default: the source's, else yarn)"
    )
    _flags.add_setting_flags(parser)  # every setting of every method, from the registry
    parser.add_argument(
        "--context-length",
        type=int,
        default=None,
        metavar="N",
        help="context to allow (default: what the settings serve)",
    )
    parser.add_argument(
        "--allow-approximation",
        action="store_true",
        help="serve the closest static setting the engine computes, printing the largest differences",
    )
    parser.add_argument(
        "--rope-theta",
        type=float,
        default=None,
        metavar="X",
        help="the model's RoPE base, if SOURCE states none",
    )
    parser.add_argument(
        "--rotary-dim",
        type=int,
        default=None,
        metavar="N",
        help="rotated dimensions per head, if SOURCE states none",
    )
    common.add_progress_flags(parser)
    parser.set_defaults(handler=_cmd_export)
