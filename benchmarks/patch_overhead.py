"""Run-time cost of the patch: yarn_rope's rotary module against transformers' native YaRN.

Run: .venv/bin/python benchmarks/patch_overhead.py [--context 4096] [--rounds 7] [--json OUT]

One Llama with random weights (default: hidden 1024, 8 layers, 16 heads, vocabulary 32000; 168M
parameters, 0.67 GB in float32) whose config declares YaRN (factor 4 from 1024 positions), so
transformers builds its own YaRN rotary module. The same model, same weights, is timed two ways:
native (as loaded) and patched (``yarn_rope.patch(model)`` applies the declared scaling with our
module and its default precise angles); the patch is put on and taken off between runs.

* prefill: one forward over ``--context`` tokens with a fresh KV cache, keeping the last logit
  (what ``generate`` does first);
* decode: one token at ``--context`` tokens of context (the cache is cropped back after each
  step, so every step sees the same context); per round, the median of ``--steps`` steps.

Rounds alternate which side runs first; the ratios are patched / native per round, and the
figures are their medians. Goals: <= 1.02 for prefill, <= 1.05 per decode token. The headline is
the larger of the two. The rotary modules alone are also timed (many calls, paired), to show
what the whole-model ratios are made of.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

import yarn_rope
from _common import finish, llama_config, median_ratio, paired, table, timed


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    scaling = yarn_rope.RopeScaling(method="yarn", factor=4.0, original_max_position_embeddings=args.original)
    fields = dict(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=4 * args.original,
        tie_word_embeddings=False,
    )
    config = llama_config(scaling, rope_theta=10000.0, **fields)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096, help="prefill length and decode context")
    parser.add_argument("--rounds", type=int, default=7, help="paired rounds (odd: a clean median)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per side per round")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--original", type=int, default=1024, help="original context of the YaRN config")
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)
    if min(args.context, args.rounds, args.steps) < 1:
        parser.error("--context, --rounds and --steps must be positive")
    transformers.logging.set_verbosity_error()

    model = build_model(args)
    parameters = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, args.vocab, (1, args.context + 1), generator=torch.Generator().manual_seed(0))
    prompt, next_token = ids[:, : args.context], ids[:, args.context :]
    caches: dict[str, transformers.DynamicCache] = {}
    logits: dict[str, torch.Tensor] = {}

    def use(side: str) -> None:
        if side == "patched":
            yarn_rope.patch(model)
        else:
            yarn_rope.unpatch(model)

    def prefill(side: str) -> float:
        use(side)
        cache = transformers.DynamicCache(config=model.config)
        with torch.no_grad():
            seconds = timed(
                lambda: logits.__setitem__(
                    side, model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
                )
            )
        caches[side] = cache
        return seconds

    def decode(side: str) -> float:
        use(side)
        cache = caches[side]
        steps = []
        with torch.no_grad():
            for _ in range(args.steps):
                steps.append(timed(lambda: model(next_token, past_key_values=cache, use_cache=True)))
                cache.crop(-1)  # back to --context tokens (negative: tokens to drop)
        return statistics.median(steps)

    # Warm-up (allocator, thread pools) on both sides, then the paired rounds.
    for side in ("native", "patched"):
        prefill(side)
        decode(side)
    # Same weights, same table (precise vs float32 angles apart): the outputs must agree.
    difference = float((logits["patched"] - logits["native"]).abs().max())
    native_prefill, patched_prefill = paired(
        lambda: prefill("native"), lambda: prefill("patched"), args.rounds
    )
    native_decode, patched_decode = paired(lambda: decode("native"), lambda: decode("patched"), args.rounds)
    yarn_rope.unpatch(model)

    # The rotary modules alone: same inputs, many calls.
    native_rotary = model.model.rotary_emb
    ours = yarn_rope.RotaryEmbedding(
        args.hidden // args.heads,
        base=10000.0,
        scaling=yarn_rope.RopeScaling(
            method="yarn", factor=4.0, original_max_position_embeddings=args.original
        ),
    )
    x = torch.zeros(1, dtype=torch.float32)
    rotary_rows = []
    for label, positions in (
        ("prefill", torch.arange(args.context)[None]),
        ("decode", torch.tensor([[args.context]])),
    ):
        calls = 200 if label == "prefill" else 2000

        def run(module: torch.nn.Module, positions: torch.Tensor = positions, calls: int = calls) -> float:
            began = time.perf_counter()
            for _ in range(calls):
                module(x, positions)
            return (time.perf_counter() - began) / calls

        native_t, ours_t = paired(lambda: run(native_rotary), lambda: run(ours), 5)
        rotary_rows.append(
            {
                "call": label,
                "native_us": 1e6 * statistics.median(native_t),
                "patched_us": 1e6 * statistics.median(ours_t),
                "ratio": median_ratio(ours_t, native_t),
            }
        )

    prefill_ratio = median_ratio(patched_prefill, native_prefill)
    decode_ratio = median_ratio(patched_decode, native_decode)
    rows = [
        [
            f"prefill {args.context} tokens (s)",
            statistics.median(native_prefill),
            statistics.median(patched_prefill),
            prefill_ratio,
            "<= 1.02",
        ],
        [
            f"decode at {args.context} (ms/token)",
            1e3 * statistics.median(native_decode),
            1e3 * statistics.median(patched_decode),
            decode_ratio,
            "<= 1.05",
        ],
    ]
    rows += [
        [f"rotary module alone, {r['call']} (us/call)", r["native_us"], r["patched_us"], r["ratio"], ""]
        for r in rotary_rows
    ]
    print(
        f"Llama {parameters / 1e6:.0f}M parameters (hidden {args.hidden}, {args.layers} layers), "
        "float32, sdpa, "
        f"{torch.get_num_threads()} threads; YaRN x4 from {args.original}; {args.rounds} paired rounds"
    )
    print(table(rows, ["", "native YaRN", "yarn_rope", "ratio (median)", "goal"]))
    headline = max(prefill_ratio, decode_ratio)
    print(f"largest |logit difference|, patched vs native, {args.context}-token prefill: {difference:.2e}")
    print(f"headline: worse of the two ratios (patched / native) = {headline:.3f}")
    report = {
        "headline": headline,
        "headline_means": "max(prefill ratio, decode ratio), patched / native, medians of paired rounds",
        "max_logit_difference": difference,
        "prefill_ratio": prefill_ratio,
        "decode_ratio": decode_ratio,
        "context": args.context,
        "rounds": args.rounds,
        "parameters": parameters,
        "prefill_s": {"native": native_prefill, "patched": patched_prefill},
        "decode_s_per_token": {"native": native_decode, "patched": patched_decode},
        "rotary_alone": rotary_rows,
    }
    return finish(report, args.json)


if __name__ == "__main__":
    main()
