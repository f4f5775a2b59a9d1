"""``yarn-rope inspect``: what a checkpoint declares and what the loader will do."""

from __future__ import annotations

import argparse
import os
from typing import Any

from . import _common as common


def _format_bytes(count: int | None) -> str:
    if count is None:
        return "unknown until the weights are downloaded"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ..export import export_targets
    from ..loading import plan_load

    common.check_outputs(args)
    if args.gguf_file is None and args.model.endswith(".gguf") and os.path.isfile(args.model):
        args.model, args.gguf_file = os.path.dirname(args.model) or ".", os.path.basename(args.model)
    plan = plan_load(
        args.model,
        attn_implementation=args.attn_implementation,
        dtype=args.dtype,
        device_map=args.device_map,
        gguf_file=args.gguf_file,
    )
    if args.json:
        common.write_data(args.json, plan.to_dict())
    scaling = plan.scaling
    print(f"checkpoint:   {plan.source}")
    print(f"model type:   {plan.model_type} (native transformers class)")
    print(f"declares:     {plan.declared if plan.declared is not None else 'no rope scaling'}")
    if plan.remote_code is not None:
        print(f"remote code:  {plan.remote_code} (never executed)")
    print(f"trained by:   {plan.code_family or 'unknown or no modeling file'}")
    if scaling.method == "none":
        print("will use:     plain RoPE")
    else:
        attention = scaling.attention_scaling()
        print(
            f"will use:     {scaling.method} factor={scaling.factor} "
            f"original={scaling.original_max_position_embeddings} beta_fast={scaling.beta_fast:g} "
            f"beta_slow={scaling.beta_slow:g} attention scaling={attention:.6f}"
        )
    for reason in plan.reasons:
        print(f"  because     {reason}")
    print(f"attention:    {plan.attn_implementation} ({plan.attn_reason})")
    print(f"dtype:        {plan.dtype}")
    print(f"weights need: {_format_bytes(plan.weight_bytes)}")
    for check in export_targets(scaling):  # what `yarn-rope export --to TARGET` would give
        verdict = "exact" if check.exact else f"would lose: {check.lost}"
        if not check.exact and check.approximable:
            verdict += " (--allow-approximation: the closest static setting)"
        print(f"export {check.target + ':':<14s}{verdict} [{check.engine}]")
    return 0


def register(commands: Any) -> None:
    """Add the ``inspect`` command to the top-level subparsers."""
    insp = commands.add_parser(
        "inspect",
        help="what scaling a checkpoint declares and what the loader will do",
        description="Read a checkpoint's config (no weights, no remote code) and print the load plan.",
        **common.example("yarn-rope inspect NousResearch/Yarn-Mistral-7b-128k"),
    )
    insp.add_argument("model", help="checkpoint folder, Hub name or GGUF file")
    insp.add_argument("--gguf-file", default=None, help="GGUF file inside the folder")
    insp.add_argument("--attn-implementation", default="auto")
    insp.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    insp.add_argument("--device-map", default=None)
    insp.add_argument("--json", default=None, metavar="OUT", help="also write the plan as JSON")
    insp.set_defaults(handler=_cmd_inspect)
