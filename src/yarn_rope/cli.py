"""``yarn-rope`` command line. The only module that prints or configures logging."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .config import RopeScaling
from .frequencies import METHODS, default_inv_freq, interpolation_ramp, yarn_correction_range


def _frequency_rows(scaling: RopeScaling, *, dim: int, base: float, seq_len: int | None) -> dict[str, Any]:
    """Per-pair table of ``scaling`` against plain RoPE, as plain Python data."""
    plain = default_inv_freq(dim, base=base)
    scaled, attention = scaling.inv_freq(dim, base=base, seq_len=seq_len)
    original = scaling.original_max_position_embeddings
    ramp = None
    if scaling.method in ("yarn", "dynamic-yarn") and original is not None:
        low, high = yarn_correction_range(
            dim,
            base=base,
            original_max_position_embeddings=original,
            beta_fast=scaling.beta_fast,
            beta_slow=scaling.beta_slow,
            truncate=scaling.truncate,
        )
        ramp = interpolation_ramp(low, high, dim // 2).tolist()
    rows = []
    for i, (theta, new) in enumerate(zip(plain.tolist(), scaled.tolist(), strict=True)):
        row: dict[str, Any] = {
            "pair": i,
            "wavelength": 2 * math.pi / theta,
            "inv_freq": theta,
            "scaled_inv_freq": new,
            "stretch": theta / new,
        }
        if original is not None:
            row["rotations_in_original"] = original * theta / (2 * math.pi)
        if ramp is not None:
            weight = ramp[i]
            row["interpolation_weight"] = weight
            row["region"] = "extrapolated" if weight == 0 else "interpolated" if weight == 1 else "ramp"
        rows.append(row)
    return {
        "scaling": scaling.to_dict(),
        "dim": dim,
        "base": base,
        "attention_factor": attention,
        "pairs": rows,
    }


def _print_frequency_table(table: dict[str, Any]) -> None:
    scaling = table["scaling"]
    print(
        f"method={scaling['method']} factor={scaling['factor']} "
        f"original_max_position_embeddings={scaling['original_max_position_embeddings']} "
        f"dim={table['dim']} base={table['base']:g}"
    )
    columns = [("pair", "{:>4d}"), ("wavelength", "{:>12.1f}")]
    if "rotations_in_original" in table["pairs"][0]:
        columns.append(("rotations_in_original", "{:>21.3f}"))
    columns += [("inv_freq", "{:>12.5e}"), ("scaled_inv_freq", "{:>15.5e}"), ("stretch", "{:>8.3f}")]
    if "region" in table["pairs"][0]:
        columns += [("interpolation_weight", "{:>20.3f}"), ("region", "  {:<12s}")]
    header = []
    for name, fmt in columns:
        width = len(fmt.format(table["pairs"][0][name]))
        header.append(name.rjust(width) if name != "region" else "  " + name)
    print(" ".join(header))
    for row in table["pairs"]:
        print(" ".join(fmt.format(row[name]) for name, fmt in columns))
    regions = [row.get("region") for row in table["pairs"]]
    if regions[0] is not None:
        counts = {name: regions.count(name) for name in ("extrapolated", "ramp", "interpolated")}
        print(
            f"pairs: {counts['extrapolated']} extrapolated (unchanged), {counts['ramp']} on the ramp, "
            f"{counts['interpolated']} interpolated (divided by the factor)"
        )
    print(f"attention factor (multiplies cos and sin): {table['attention_factor']:.6f}")


def _cmd_frequencies(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {"method": args.method}
    for name in (
        "factor",
        "original_max_position_embeddings",
        "max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "mscale_coefficient",
    ):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    if args.finetuned:
        fields["finetuned"] = True
    scaling = RopeScaling(**fields)
    table = _frequency_rows(scaling, dim=args.dim, base=args.base, seq_len=args.seq_len)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(table, handle, indent=1)
    _print_frequency_table(table)
    return 0


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
    from .loading import plan_load

    plan = plan_load(
        args.model,
        attn_implementation=args.attn_implementation,
        dtype=args.dtype,
        device_map=args.device_map,
        gguf_file=args.gguf_file,
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(plan.to_dict(), handle, indent=1)
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
        attention = scaling.attention_scale(scaling.factor or 1.0)
        print(
            f"will use:     {scaling.method} factor={scaling.factor} "
            f"original={scaling.original_max_position_embeddings} beta_fast={scaling.beta_fast:g} "
            f"beta_slow={scaling.beta_slow:g} attention factor={attention:.6f}"
        )
    for reason in plan.reasons:
        print(f"  because     {reason}")
    print(f"attention:    {plan.attn_implementation} ({plan.attn_reason})")
    print(f"dtype:        {plan.dtype}")
    print(f"weights need: {_format_bytes(plan.weight_bytes)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yarn-rope",
        description="Exact YaRN context-window extension for Hugging Face transformers models.",
    )
    parser.add_argument("--version", action="version", version=f"yarn-rope {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    freq = commands.add_parser(
        "frequencies",
        help="print the per-pair frequency table of a scaling method",
        description="Per-pair rotary frequencies of a scaling method against plain RoPE.",
    )
    freq.add_argument("--method", default="yarn", choices=METHODS)
    freq.add_argument("--factor", type=float, default=None, help="scale factor s (default: 8 for yarn)")
    freq.add_argument("--original-max-position-embeddings", type=int, default=None, metavar="L")
    freq.add_argument("--max-position-embeddings", type=int, default=None, metavar="N", help="target context")
    freq.add_argument("--dim", type=int, default=128, help="rotary dimension (default 128)")
    freq.add_argument("--base", type=float, default=10000.0, help="rope_theta (default 10000)")
    freq.add_argument("--beta-fast", type=float, default=None)
    freq.add_argument("--beta-slow", type=float, default=None)
    freq.add_argument("--mscale-coefficient", type=float, default=None)
    freq.add_argument("--finetuned", action="store_true", help="dynamic-yarn: fine-tuned at --factor")
    freq.add_argument("--seq-len", type=int, default=None, help="dynamic methods: current sequence length")
    freq.add_argument("--json", default=None, metavar="OUT", help="also write the table as JSON")
    freq.set_defaults(handler=_cmd_frequencies)

    insp = commands.add_parser(
        "inspect",
        help="what scaling a checkpoint declares and what the loader will do",
        description="Read a checkpoint's config (no weights, no remote code) and print the load plan.",
    )
    insp.add_argument("model", help="checkpoint folder or Hub name")
    insp.add_argument("--gguf-file", default=None, help="GGUF file inside the folder")
    insp.add_argument("--attn-implementation", default="auto")
    insp.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    insp.add_argument("--device-map", default=None)
    insp.add_argument("--json", default=None, metavar="OUT", help="also write the plan as JSON")
    insp.set_defaults(handler=_cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "frequencies" and args.method != "none":
        if args.factor is None and args.max_position_embeddings is None and args.method != "dynamic-yarn":
            args.factor = 8.0
        if args.original_max_position_embeddings is None and args.method != "linear" and args.method != "ntk":
            args.original_max_position_embeddings = 4096
    try:
        return int(args.handler(args))
    except (ValueError, TypeError, FileNotFoundError, ImportError) as error:
        print(f"yarn-rope: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
