"""Peak memory and time of yarn_rope's perplexity evaluation against the naive loop.

Run: .venv/bin/python benchmarks/eval_memory.py [--lengths 4096 8192 16384 32768] [--json OUT]

The naive loop is what the YaRN paper's evaluation script does per window: ``loss =
model(ids, labels=ids).loss`` under ``torch.no_grad()``, which materialises the full ``[length,
vocabulary]`` float32 logits and a log-softmax of the same size (SmolLM2's vocabulary is 49152: at
32k tokens that is 6.4 GB each). ``yarn_rope.eval.perplexity`` runs the decoder once and projects
the hidden states to the vocabulary 1024 positions at a time.

Each (method, length) runs in its own process: load SmolLM2-135M-Instruct (float32, sdpa), take the first
``length`` tokens of ``_pydecimal.py``, patch YaRN with factor ``length / 8192`` past the trained
context (both methods alike), reset the resident high-water mark, evaluate, and report the peak
minus the resident size right before (the after-load baseline). Both methods score the same
tokens, so their perplexities must agree; the table shows it. The headline is naive peak / ours
at the longest length (goal >= 3 at 32k, and our peak growing linearly with the length).

Expect about 20 minutes on 2 CPU cores for the default lengths (the 32k passes take ~5 minutes
each). ``--model tiny`` uses a small random Llama instead of SmolLM2 (a smoke test in seconds).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import finish, peak_memory, reset_peak_memory, table

TRAINED = 8192
METHODS = ("yarn_rope", "naive")


def load(kind: str) -> tuple[torch.nn.Module, torch.Tensor, int]:
    """(model, token ids of the corpus, trained context)."""
    if kind == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=4096,
            max_position_embeddings=256,
        )
        torch.manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (1 << 16,), generator=torch.Generator().manual_seed(0))
        return LlamaForCausalLM(config).eval(), ids, 256
    from yarn_rope.eval import load_default_model

    model, tokenizer = load_default_model()
    text = inspect.getsource(__import__("_pydecimal"))
    return model, torch.tensor(tokenizer(text).input_ids), TRAINED


def child(method: str, length: int, kind: str) -> dict:
    """One measurement, in this process (the parent starts one process per measurement)."""
    import transformers

    import yarn_rope
    from yarn_rope.eval import perplexity

    transformers.logging.set_verbosity_error()
    model, ids, trained = load(kind)
    if ids.numel() < length:
        raise SystemExit(f"the corpus has {ids.numel()} tokens, fewer than --lengths {length}")
    ids = ids[:length].clone()
    if length > trained:
        yarn_rope.patch(model, factor=length / trained, original_max_position_embeddings=trained)
    gc.collect()
    baseline = reset_peak_memory()
    began = time.perf_counter()
    if method == "naive":
        with torch.no_grad():
            nll = float(model(ids[None], labels=ids[None]).loss)
    else:
        nll = perplexity(model, ids, lengths=[length], progress=False).lengths[0].nll
    seconds = time.perf_counter() - began
    return {
        "method": method,
        "length": length,
        "peak_bytes": peak_memory() - baseline,
        "baseline_bytes": baseline,
        "seconds": seconds,
        "perplexity": math.exp(nll),
    }


def measure(method: str, length: int, kind: str) -> dict:
    """Run :func:`child` in a fresh process; a process that dies is recorded, not raised."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--length", str(length)]
    result = subprocess.run([*command, "--model", kind], capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        why = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        return {"method": method, "length": length, "error": f"{why} (exit status {result.returncode})"}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.length, args.model)))
        return None
    if min(args.lengths) < 2:
        parser.error("--lengths must be >= 2")

    records = []
    for length in sorted(args.lengths):
        for method in METHODS:
            record = measure(method, length, args.model)
            records.append(record)
            shown = f"{record['peak_bytes'] / 2**20:,.0f} MiB" if "error" not in record else record["error"]
            print(f"  {method:>9} at {length:>6} tokens: {shown}", flush=True)

    def get(method: str, length: int) -> dict:
        return next(r for r in records if r["method"] == method and r["length"] == length)

    rows = []
    for length in sorted(args.lengths):
        ours, naive = get("yarn_rope", length), get("naive", length)
        ok = "error" not in ours and "error" not in naive
        rows.append(
            [
                length,
                ours.get("peak_bytes", math.nan) / 2**20,
                naive.get("peak_bytes", math.nan) / 2**20,
                naive["peak_bytes"] / ours["peak_bytes"] if ok else math.nan,
                ours.get("peak_bytes", math.nan) / length / 1024,
                ours.get("seconds", math.nan),
                naive.get("seconds", math.nan),
                ours.get("perplexity", math.nan),
                naive.get("perplexity", math.nan),
            ]
        )
    print(f"peak memory above the after-load baseline, model {args.model}, one process per cell")
    print(
        table(
            rows,
            [
                "tokens",
                "ours MiB",
                "naive MiB",
                "naive/ours",
                "ours KiB/token",
                "ours s",
                "naive s",
                "ours ppl",
                "naive ppl",
            ],
        )
    )
    longest = max(args.lengths)
    headline = rows[-1][3]
    print(f"headline: naive / yarn_rope peak memory at {longest} tokens = {headline:.2f}x (goal >= 3)")
    report = {
        "headline": headline,
        "headline_means": f"naive model(ids, labels=ids) peak / yarn_rope perplexity peak, {longest} tokens",
        "model": args.model,
        "records": records,
    }
    return finish(report, args.json)


if __name__ == "__main__":
    main()
