"""Throughput of yarn_rope's perplexity evaluation: against a plain forward + loss, and the machine.

Run: .venv/bin/python benchmarks/eval_throughput.py [--lengths 2048 4096 8192] [--rounds 3] [--json OUT]

On SmolLM2-135M-Instruct (float32, sdpa; YaRN with factor ``length / 8192`` past its trained context), the
first ``length`` tokens of ``_pydecimal.py`` are scored two ways, in paired rounds that alternate
which goes first:

* ``yarn_rope``: ``yarn_rope.eval.perplexity(model, ids, lengths=[length])``;
* ``plain``: ``model(ids, labels=ids).loss`` under ``torch.no_grad()`` (transformers' own loss).

Tokens/s is ``length`` over the wall time of one evaluation. Achieved FLOP/s counts the model's
FLOPs (the convention is printed: multiply-add = 2, every ``nn.Linear`` including the vocabulary
projection, causal attention at half its square) and is shown as a share of this machine's fp32
matmul peak, measured in the same run (best of repeated 2048^3 products). The headline is the
median over rounds of yarn_rope tokens/s / plain tokens/s at the longest length (goal >= 1: no
slower). ``--model tiny`` uses a small random Llama (a smoke test in seconds).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import transformers

import yarn_rope
from _common import FLOP_CONVENTION, finish, forward_flops, matmul_peak, median_ratio, paired, table, timed
from eval_memory import load


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds per length")
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--peak-size", type=int, default=2048, help="matrix size of the peak measurement")
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)
    if min(args.lengths) < 2 or args.rounds < 1:
        parser.error("--lengths must be >= 2 and --rounds >= 1")
    transformers.logging.set_verbosity_error()
    from yarn_rope.eval import perplexity

    model, ids, trained = load(args.model)
    peak = matmul_peak(torch.float32, "cpu", size=args.peak_size)
    rows, records = [], []
    for length in sorted(args.lengths):
        if ids.numel() < length:
            parser.error(f"the corpus has {ids.numel()} tokens, fewer than {length}")
        sample = ids[:length].clone()
        if length > trained:
            yarn_rope.patch(model, factor=length / trained, original_max_position_embeddings=trained)
        else:
            yarn_rope.unpatch(model)

        def ours(sample: torch.Tensor = sample, length: int = length) -> float:
            return timed(lambda: perplexity(model, sample, lengths=[length], progress=False))

        def plain(sample: torch.Tensor = sample) -> float:
            with torch.no_grad():
                return timed(lambda: model(sample[None], labels=sample[None]).loss)

        ours(), plain()  # warm-up
        ours_s, plain_s = paired(ours, plain, args.rounds)
        flops = forward_flops(model, length)
        ratio = median_ratio(plain_s, ours_s)  # tokens/s ratio = inverse time ratio
        record = {
            "length": length,
            "ours_s": ours_s,
            "plain_s": plain_s,
            "ours_tokens_per_s": length / statistics.median(ours_s),
            "plain_tokens_per_s": length / statistics.median(plain_s),
            "speed_ratio": ratio,
            "flops": flops,
            "ours_flop_per_s": flops / statistics.median(ours_s),
            "plain_flop_per_s": flops / statistics.median(plain_s),
        }
        records.append(record)
        rows.append(
            [
                length,
                record["ours_tokens_per_s"],
                record["plain_tokens_per_s"],
                ratio,
                record["ours_flop_per_s"] / 1e9,
                f"{100 * record['ours_flop_per_s'] / peak:.1f}%",
                f"{100 * record['plain_flop_per_s'] / peak:.1f}%",
            ]
        )
    print(
        f"model {args.model}, float32, {torch.get_num_threads()} threads; "
        f"measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s"
    )
    print(FLOP_CONVENTION)
    print(
        table(
            rows,
            [
                "tokens",
                "ours tok/s",
                "plain tok/s",
                "ours/plain",
                "ours GFLOP/s",
                "ours of peak",
                "plain of peak",
            ],
        )
    )
    headline = records[-1]["speed_ratio"]
    print(
        f"headline: yarn_rope / plain forward+loss tokens/s at {records[-1]['length']} tokens = "
        f"{headline:.3f} (goal >= 1)"
    )
    report = {
        "headline": headline,
        "headline_means": "yarn_rope perplexity tokens/s / plain model(ids, labels=ids) tokens/s, longest",
        "flop_convention": FLOP_CONVENTION,
        "matmul_peak_flop_per_s": peak,
        "model": args.model,
        "records": records,
    }
    return finish(report, args.json)


if __name__ == "__main__":
    main()
