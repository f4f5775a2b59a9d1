"""Precision of the cos/sin tables at long positions: our angle modes against transformers' table.

Run: .venv/bin/python benchmarks/rope_precision.py [--max-position 1048576] [--json OUT]

For a Llama-2-shaped rotary embedding (head dim 128, base 10000) under YaRN with factor 8 from an
original 4096, every position from 0 to ``--max-position`` - 1 is looked up in four tables:

* ``precise``: yarn_rope's default (angles formed and reduced modulo 2 pi in float64);
* ``fp32``: yarn_rope with ``angles="fp32"`` (float32 angles, bit-equal to transformers);
* ``transformers``: transformers' own ``LlamaRotaryEmbedding`` with the same YaRN config;
* ``bf16 cast``: the precise table stored in bfloat16, what a bf16 model multiplies by anyway.

Each is compared with cos/sin of float64 angles from the same float32 ``inv_freq`` (times the same
attention factor), and the largest |error| over cos and sin is reported per position band. The
headline is the ratio of transformers' error to ours (precise) at the longest position.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

import yarn_rope
from _common import finish, llama_config, table

DIM, BASE, FACTOR, ORIGINAL = 128, 10000.0, 8.0, 4096


def bands(maximum: int) -> list[int]:
    """Upper ends of the position bands: 4k, 16k, 64k, ... (x4), ending at ``maximum``."""
    ends = []
    end = 4096
    while end < maximum:
        ends.append(end)
        end *= 4
    ends.append(maximum)
    return ends


def transformers_rotary(scaling: yarn_rope.RopeScaling) -> torch.nn.Module:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = llama_config(
        scaling,
        rope_theta=BASE,
        hidden_size=DIM * 32,
        num_attention_heads=32,
        max_position_embeddings=int(ORIGINAL * FACTOR),
    )
    return LlamaRotaryEmbedding(config=config)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-position", type=int, default=1 << 20, help="positions 0 .. N-1 (default 2^20)")
    parser.add_argument("--chunk", type=int, default=1 << 16, help="positions per step (memory)")
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)
    if args.max_position < 2 or args.chunk < 1:
        parser.error("--max-position must be >= 2 and --chunk >= 1")

    scaling = yarn_rope.RopeScaling(method="yarn", factor=FACTOR, original_max_position_embeddings=ORIGINAL)
    ours = {
        mode: yarn_rope.RotaryEmbedding(DIM, base=BASE, scaling=scaling, angles=mode)
        for mode in ("precise", "fp32")
    }
    theirs = transformers_rotary(scaling)
    inv64 = ours["precise"].inv_freq.to(torch.float64)
    scale = ours["precise"].attention_scaling
    if not torch.equal(theirs.inv_freq, ours["precise"].inv_freq) or theirs.attention_scaling != scale:
        sys.exit("transformers' YaRN table differs from ours: the comparison would not be like for like")

    names = ("precise", "fp32", "transformers", "bf16 cast")
    ends = bands(args.max_position)
    errors = {name: [0.0] * len(ends) for name in names}
    x = torch.zeros(1, dtype=torch.float32)
    began = time.perf_counter()
    with torch.no_grad():
        for start in range(0, args.max_position, args.chunk):
            positions = torch.arange(start, min(start + args.chunk, args.max_position))
            angles = positions.to(torch.float64)[:, None] * inv64
            ref_cos = (torch.cos(angles) * scale).repeat(1, 2)
            ref_sin = (torch.sin(angles) * scale).repeat(1, 2)
            ids = positions[None]
            tables = {
                "precise": ours["precise"](x, ids),
                "fp32": ours["fp32"](x, ids),
                "transformers": theirs(x, ids),
            }
            tables["bf16 cast"] = tuple(t.to(torch.bfloat16) for t in tables["precise"])
            for name, (cos, sin) in tables.items():
                err = torch.maximum(
                    (cos[0].double() - ref_cos).abs().amax(dim=1),
                    (sin[0].double() - ref_sin).abs().amax(dim=1),
                )
                for band, end in enumerate(ends):
                    low = 0 if band == 0 else ends[band - 1]
                    mask = (positions >= low) & (positions < end)
                    if bool(mask.any()):
                        errors[name][band] = max(errors[name][band], float(err[mask].max()))
    elapsed = time.perf_counter() - began

    rows = []
    for band, end in enumerate(ends):
        low = 0 if band == 0 else ends[band - 1]
        rows.append([f"{low}..{end - 1}", *[errors[name][band] for name in names]])
    longest = {name: max(errors[name]) for name in names}
    headline = longest["transformers"] / longest["precise"] if longest["precise"] > 0 else math.inf
    print(
        f"largest |cos/sin error| vs float64 angles; YaRN factor {FACTOR:g} from {ORIGINAL}, head dim {DIM}, "
        f"base {BASE:g}, attention factor {scale:.4f}"
    )
    print(table(rows, ["positions", *names]))
    print(f"({args.max_position} positions in {elapsed:.1f} s)")
    print(
        f"headline: transformers' fp32 table error / yarn_rope precise error up to position "
        f"{args.max_position - 1} = {headline:,.0f}x "
        f"({longest['transformers']:.2e} vs {longest['precise']:.2e})"
    )
    report = {
        "headline": headline,
        "headline_means": "transformers' fp32 table error / yarn_rope precise error, all positions",
        "settings": {"dim": DIM, "base": BASE, "factor": FACTOR, "original": ORIGINAL, "scale": scale},
        "max_position": args.max_position,
        "bands": [
            {"from": row[0].split("..")[0], "to": end - 1, **{name: errors[name][i] for name in names}}
            for i, (row, end) in enumerate(zip(rows, ends, strict=True))
        ],
        "largest": longest,
    }
    return finish(report, args.json)


if __name__ == "__main__":
    main()
