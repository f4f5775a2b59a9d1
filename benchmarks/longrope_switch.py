"""LongRoPE's short -> long switch at 8k: recompute the prefix (generate) or re-rotate the cache.

Run: .venv/bin/python benchmarks/longrope_switch.py [--original 8192] [--layers 30] [--rounds 3]

Phi-3-style LongRoPE uses ``short_factor`` up to the original context and ``long_factor`` beyond
it, so the keys already in a KV cache go stale the moment a sequence crosses it. transformers'
Phi-3 ``generate()`` drops the cache there and recomputes the whole prefix (PR #33129); a plain
``model(ids, past_key_values=cache)`` loop keeps the stale keys. A yarn_rope-patched model
re-rotates the cached keys to the long factors once, from a pre-hook on the decoder.

Measured on a random Phi-3 with SmolLM2-135M's shape (hidden 576, 9 heads of 64, 3 KV heads,
``--layers`` layers), a cache of ``--original`` tokens built with the short factors, then the
token that crosses the switch:

* ``recompute``: one forward over ``original + 1`` tokens (what ``generate()`` does at the switch);
* ``rerotate``: the patched model's step through the cache (re-rotation of every layer's keys +
  a one-token forward);
* ``decode``: an ordinary one-token step at the same context (the cache already long).

Prints the times and the ratios; the headline is ``recompute / rerotate``. ``--json OUT`` writes
the report.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from typing import Any

import torch
import transformers

import yarn_rope
from _common import finish, paired, table, timed
from yarn_rope.patch import cache_sync


def phi3(original: int, layers: int) -> transformers.Phi3ForCausalLM:
    """A random Phi-3 with SmolLM2-135M's shape and LongRoPE switching at ``original`` tokens."""
    pairs = 32  # head dim 64
    generator = torch.Generator().manual_seed(0)
    config = transformers.Phi3Config(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8 * original,
        original_max_position_embeddings=original,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": (1.0 + 0.1 * torch.rand(pairs, generator=generator)).tolist(),
            "long_factor": (1.0 + 30.0 * torch.rand(pairs, generator=generator).sort().values).tolist(),
        },
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.Phi3ForCausalLM(config).eval()


@torch.no_grad()
def measure(original: int, layers: int, rounds: int) -> dict[str, Any]:
    model = phi3(original, layers)
    yarn_rope.patch(model)
    hook = cache_sync(model)
    assert hook is not None  # LongRoPE is dynamic: patch registers the cache hook
    ids = torch.randint(3, 49152, (1, original + 2), generator=torch.Generator().manual_seed(1))
    short_cache = transformers.DynamicCache(config=model.config)
    model(input_ids=ids[:, :original], past_key_values=short_cache, use_cache=True)  # short factors
    long_cache = copy.deepcopy(short_cache)
    model(input_ids=ids[:, original : original + 1], past_key_values=long_cache, use_cache=True)
    rerotations_before = hook.rerotations

    def recompute() -> float:
        return timed(lambda: model(input_ids=ids[:, : original + 1], use_cache=True))

    def rerotate() -> float:
        cache = copy.deepcopy(short_cache)
        return timed(
            lambda: model(input_ids=ids[:, original : original + 1], past_key_values=cache, use_cache=True)
        )

    def decode() -> float:
        cache = copy.deepcopy(long_cache)
        return timed(lambda: model(input_ids=ids[:, original + 1 :], past_key_values=cache, use_cache=True))

    recomputes, rerotates = paired(recompute, rerotate, rounds)
    decodes = [decode() for _ in range(rounds)]
    switch_rerotations = (hook.rerotations - rerotations_before) / rounds
    report: dict[str, Any] = {
        "original": original,
        "layers": layers,
        "rounds": rounds,
        "recompute_s": statistics.median(recomputes),
        "rerotate_s": statistics.median(rerotates),
        "decode_s": statistics.median(decodes),
        "rerotations_per_switch": switch_rerotations,
    }
    report["headline"] = statistics.median(a / b for a, b in zip(recomputes, rerotates, strict=True))
    report["headline_means"] = (
        "recompute the prefix (transformers' generate) / re-rotate the cache (yarn_rope)"
    )
    report["rerotate_over_decode"] = report["rerotate_s"] / report["decode_s"]
    report["recompute_over_decode"] = report["recompute_s"] / report["decode_s"]
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", type=int, default=8192, help="where LongRoPE switches (tokens)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    report = measure(args.original, args.layers, args.rounds)
    rows = [
        ["recompute the prefix (generate)", report["recompute_s"], report["recompute_over_decode"]],
        ["re-rotate the cache (yarn_rope)", report["rerotate_s"], report["rerotate_over_decode"]],
        ["ordinary decode step", report["decode_s"], 1.0],
    ]
    print(f"LongRoPE switch at {args.original} tokens, Phi-3 of SmolLM2's shape, {args.layers} layers")
    print(table(rows, ["the step that crosses the switch", "seconds", "x decode step"]))
    print(f"headline: recompute / re-rotate = {report['headline']:.1f}")
    return finish(report, args.json)


if __name__ == "__main__":
    main()
