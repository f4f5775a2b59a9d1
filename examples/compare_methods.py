"""Compare the frequency tables of every scaling method for one model shape.

Run: .venv/bin/python examples/compare_methods.py [--dim 128] [--base 10000] [--factor 8]

For each method, prints how much each rotary pair is slowed down (plain inv_freq / scaled
inv_freq) at a few pairs from the fastest to the slowest, and the attention factor. YaRN leaves
the fast pairs alone and divides the slow ones by the factor; linear interpolation divides all of
them; NTK-aware spreads the change over every pair.
"""

from __future__ import annotations

import argparse

import yarn_rope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--base", type=float, default=10000.0)
    parser.add_argument("--factor", type=float, default=8.0)
    parser.add_argument("--original", type=int, default=4096, help="original context length")
    args = parser.parse_args()

    plain = yarn_rope.default_inv_freq(args.dim, base=args.base)
    pairs = sorted({0, args.dim // 8, args.dim // 4, 3 * args.dim // 8, args.dim // 2 - 1})
    settings = {
        "linear": {"factor": args.factor},
        "ntk": {"factor": args.factor},
        "ntk-by-parts": {"factor": args.factor, "original_max_position_embeddings": args.original},
        "yarn": {"factor": args.factor, "original_max_position_embeddings": args.original},
        "dynamic-yarn": {
            "original_max_position_embeddings": args.original,
            "seq_len": round(args.factor * args.original),
        },
    }
    print(f"dim={args.dim} base={args.base:g} factor={args.factor:g} original={args.original}")
    print(f"{'method':<14}" + "".join(f"{'pair ' + str(p):>10}" for p in pairs) + f"{'attention':>11}")
    for method, params in settings.items():
        table, attention = yarn_rope.inv_freq(method, args.dim, base=args.base, **params)
        stretch = (plain / table).tolist()
        print(f"{method:<14}" + "".join(f"{stretch[p]:>10.3f}" for p in pairs) + f"{attention:>11.4f}")


if __name__ == "__main__":
    main()
