"""``yarn-rope frequencies``: the per-pair table of a scaling method."""

from __future__ import annotations

import argparse
import math
from typing import Any

from .. import methods as M
from ..config import RopeScaling
from ..frequencies import default_inv_freq, interpolation_ramp, yarn_correction_range
from . import _common as common
from . import _flags

# Example values for a table when a method needs a setting the user did not give.
_EXAMPLE = {"factor": 8.0, "original_max_position_embeddings": 4096}


def _frequency_rows(scaling: RopeScaling, *, dim: int, base: float, seq_len: int | None) -> dict[str, Any]:
    """Per-pair table of ``scaling`` against plain RoPE, as plain Python data."""
    plain = default_inv_freq(dim, base=base)
    scaled, attention = scaling.inv_freq(dim, base=base, seq_len=seq_len)
    original = scaling.original_max_position_embeddings
    ramp = None
    if "beta_fast" in scaling.spec.settings and original is not None:  # methods with YaRN's ramp
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
        "attention_scaling": attention,
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
    print(f"attention scaling (multiplies cos and sin): {table['attention_scaling']:.6f}")


def _settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, completed with example values the method needs."""
    spec = M.get(args.method)
    fields: dict[str, Any] = {"method": spec.name, **_flags.given_settings(args)}
    if spec.name == "none":
        return fields
    for name, value in spec.defaults.items():
        fields.setdefault(name, value)
    if "original_max_position_embeddings" in spec.required:
        fields.setdefault("original_max_position_embeddings", _EXAMPLE["original_max_position_embeddings"])
    if spec.factor_from_lengths and "factor" not in fields and "max_position_embeddings" not in fields:
        fields["factor"] = _EXAMPLE["factor"]
    return fields


def _cmd_frequencies(args: argparse.Namespace) -> int:
    common.check_outputs(args)
    fields = _settings_from_args(args)
    scaling = RopeScaling(**fields)
    table = _frequency_rows(scaling, dim=args.dim, base=args.base, seq_len=args.seq_len)
    if args.json:
        common.write_data(args.json, table)
    _print_frequency_table(table)
    return 0


def register(commands: Any) -> None:
    """Add the ``frequencies`` command to the top-level subparsers."""
    freq = commands.add_parser(
        "frequencies",
        help="print the per-pair frequency table of a scaling method",
        description="Per-pair rotary frequencies of a scaling method against plain RoPE.",
        **common.example(
            "yarn-rope frequencies --method yarn --factor 8 --original-max-position-embeddings 4096"
        ),
    )
    freq.add_argument("--method", default="yarn", choices=M.METHODS)
    freq.add_argument("--dim", type=int, default=128, help="rotary dimension (default 128)")
    freq.add_argument("--base", type=float, default=10000.0, help="rope_theta (default 10000)")
    _flags.add_setting_flags(  # every setting of every method, from the registry
        freq, notes={name: f"default for a table: {value:g}" for name, value in _EXAMPLE.items()}
    )
    freq.add_argument("--seq-len", type=int, default=None, help="dynamic methods: current sequence length")
    freq.add_argument("--json", default=None, metavar="OUT", help="also write the table as JSON")
    freq.set_defaults(handler=_cmd_frequencies)
