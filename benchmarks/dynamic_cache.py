"""Dynamic YaRN through a KV cache on SmolLM2: consistency and cost.

Run: .venv/bin/python benchmarks/dynamic_cache.py [--length 16384] [--chunk 1024] [--decode 8192:12288]

1. Consistency (issue: the cache must not keep keys at stale frequencies). The first ``--length``
   tokens of ``_pydecimal.py`` are fed through a DynamicCache in ``--chunk``-token pieces with
   dynamic YaRN (SmolLM2 was trained at 8192, so the factor grows past it), and the perplexity is
   compared with one full-window pass at the same length (its table: the factor for the whole
   length). Three numbers: full pass, chunked with re-rotated keys (yarn_rope), chunked with stale
   keys (what transformers' dynamic scaling does). With re-rotation the chunked value is close to
   the full pass but not equal (in a 30-layer model the deeper keys were computed under older
   factors); stale keys are far.
2. Cost: greedy decoding one token at a time from ``--decode START:END`` tokens of context, dynamic
   YaRN (bucketed schedule, sqrt(2) grid) against static YaRN at the final factor; the headline is
   the per-token time ratio (goal <= 1.10).

Prints a table and the headline ratio; ``--json OUT`` writes {"headline": ..., ...}.
"""

from __future__ import annotations

import argparse
import inspect
import math
import statistics
import time

import torch
import torch.nn.functional as F
import transformers

import yarn_rope
from _common import finish
from yarn_rope.cache import KeyCacheSync
from yarn_rope.eval import load_default_model
from yarn_rope.patch import cache_sync

TRAINED = 8192


def chunked_nll(model, ids: torch.Tensor, chunk: int) -> float:
    cache = transformers.DynamicCache(config=model.config)
    head = model.get_output_embeddings()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            piece = ids[:, start : start + chunk]
            hidden = model.model(input_ids=piece, past_key_values=cache, use_cache=True).last_hidden_state[0]
            targets = ids[0, start + 1 : start + 1 + piece.shape[1]]
            logits = head(hidden[: targets.numel()]).float()
            total += float(F.cross_entropy(logits, targets, reduction="sum"))
            count += targets.numel()
    return total / count


def full_nll(model, ids: torch.Tensor) -> float:
    from yarn_rope.eval import perplexity

    result = perplexity(model, ids[0], lengths=[ids.shape[1]], progress=False)
    return result.lengths[0].nll


def decode_times(model, ids: torch.Tensor, start: int, end: int) -> list[float]:
    cache = transformers.DynamicCache(config=model.config)
    times = []
    with torch.no_grad():
        out = model(ids[:, :start], past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(end - start):
            began = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - began)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--decode", default="8192:12288", help="START:END context lengths of the decode test")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    start, end = (int(x) for x in args.decode.split(":"))

    model, tokenizer = load_default_model()
    text = inspect.getsource(__import__("_pydecimal"))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : max(args.length, end)]
    report: dict = {"length": args.length, "chunk": args.chunk, "trained": TRAINED}

    settings = {"method": "dynamic-yarn", "original_max_position_embeddings": TRAINED, "schedule": "exact"}
    with yarn_rope.patched(model, **settings):
        report["full_window_ppl"] = math.exp(full_nll(model, ids[:, : args.length]))
        report["chunked_rerotated_ppl"] = math.exp(chunked_nll(model, ids[:, : args.length], args.chunk))
    original = KeyCacheSync._rerotate
    KeyCacheSync._rerotate = lambda self, *a, **k: None  # stale keys: what other implementations do
    try:
        with yarn_rope.patched(model, **settings):
            report["chunked_stale_ppl"] = math.exp(chunked_nll(model, ids[:, : args.length], args.chunk))
    finally:
        KeyCacheSync._rerotate = original

    final_factor = end / TRAINED
    with yarn_rope.patched(
        model, method="dynamic-yarn", original_max_position_embeddings=TRAINED, schedule=math.sqrt(2)
    ):
        dynamic = decode_times(model, ids, start, end)
        hook = cache_sync(model)
        assert hook is not None  # dynamic YaRN registers one
        report["rerotations"] = hook.rerotations
    with yarn_rope.patched(model, factor=max(1.0, final_factor), original_max_position_embeddings=TRAINED):
        static = decode_times(model, ids, start, end)
    report["decode_ms_dynamic"] = 1000 * statistics.median(dynamic)
    report["decode_ms_static"] = 1000 * statistics.median(static)
    report["decode_mean_ratio"] = sum(dynamic) / sum(static)
    report["headline"] = report["decode_mean_ratio"]

    print(
        f"perplexity of the first {args.length} tokens of _pydecimal.py, dynamic YaRN "
        f"(SmolLM2, trained {TRAINED})"
    )
    print(f"  one full-window pass:                 {report['full_window_ppl']:.3f}")
    print(f"  {args.chunk}-token chunks, keys re-rotated:   {report['chunked_rerotated_ppl']:.3f}")
    print(f"  {args.chunk}-token chunks, stale keys:        {report['chunked_stale_ppl']:.3f}")
    print(
        f"decoding from {start} to {end} tokens, per token (median ms): "
        f"dynamic {report['decode_ms_dynamic']:.1f}, static {report['decode_ms_static']:.1f}; "
        f"re-rotations: {report['rerotations']}"
    )
    print(f"headline: dynamic / static total decode time = {report['headline']:.3f} (goal <= 1.10)")
    report["headline_means"] = "dynamic (sqrt(2) grid) / static YaRN total decode time"
    finish(report, args.json)


if __name__ == "__main__":
    main()
