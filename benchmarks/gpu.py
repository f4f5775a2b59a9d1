"""The GPU run: long-context prefill and decode of a YaRN-extended Llama-2-7B shape, against the limit.

Run (GPU machine, from the repository root; needs torch + transformers, yarn_rope from ``src/``):
    PYTHONPATH=src python benchmarks/gpu.py --json gpu.json
Without CUDA the same code runs on the CPU with a tiny shape (what CI's smoke test does).

One process, sized for 8 minutes on an H200 (by estimate: never run on one yet):

1. the bf16 matmul peak of this GPU, measured (best of repeated 8192^3 products): the limit;
2. a Llama-2-7B-shaped model (hidden 4096, 32 heads, MLP 11008, vocabulary 32000; ``--layers``,
   default all 32) with random bf16 weights, patched with static YaRN x8 from 4096 (32k context);
3. prefill tokens/s and model FLOP utilisation (achieved FLOP/s / the measured peak; FLOPs as in
   ``_common.FLOP_CONVENTION``, last-position logits only) at 4k/16k/32k tokens, for the attention
   kernels ``sdpa``, yarn_rope's ``"auto"`` choice (``flash_attention_2`` where flash-attn is
   installed, else ``sdpa``) and ``eager``, which materialises the ``[heads, s, s]`` scores and is
   expected to run out of memory at 32k (recorded, not raised);
4. decode tokens/s at 32k context (prefill 32768 - steps/2 tokens, then ``--steps`` greedy steps
   through a DynamicCache), static YaRN against dynamic YaRN (``schedule="auto"``: in bf16 the
   sqrt(2) growth grid, so one re-rotation of the whole cache happens when the sequence passes
   32768, and its cost is in the time; float32 on the CPU path re-rotates at every step).

The headline is the best prefill MFU at the longest length (a share of the measured peak).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time

import torch
import transformers

import yarn_rope
from _common import FLOP_CONVENTION, finish, forward_flops, matmul_peak, table, timed
from yarn_rope.loading import choose_attention, choose_dtype
from yarn_rope.patch import cache_sync

LLAMA2_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_attention_heads=32, vocab_size=32000, layers=32
)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=256, layers=2)


def build(
    shape: dict, layers: int, original: int, dtype: torch.dtype, device: torch.device
) -> torch.nn.Module:
    """Random-weight Llama of ``shape`` on ``device`` in ``dtype`` (no float32 copy on the way)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_attention_heads"],
        vocab_size=shape["vocab_size"],
        num_hidden_layers=layers,
        max_position_embeddings=original,
    )
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def set_attention(model: torch.nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # transformers 4.x
        model.config._attn_implementation = name


def release(cuda: bool) -> None:
    """Hand freed GPU memory back (after an out-of-memory error, before the next cell)."""
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def out_of_memory(error: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(error, oom) or "out of memory" in str(error).lower()


def prefill(model: torch.nn.Module, ids: torch.Tensor, device: torch.device, repeats: int) -> float:
    """Median seconds of a forward over ``ids`` keeping the last logit (after one warm-up)."""

    def forward() -> None:
        with torch.no_grad():
            model(ids, use_cache=False, logits_to_keep=1)

    times = [timed(forward, device) for _ in range(repeats + 1)]
    return statistics.median(times[1:])  # the first run is the warm-up


def decode(model: torch.nn.Module, ids: torch.Tensor, steps: int, device: torch.device) -> tuple[float, int]:
    """(seconds for ``steps`` greedy decode steps after prefilling ``ids``, cache re-rotations)."""
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)

        def steps_of_greedy_decoding() -> None:
            nonlocal token
            for _ in range(steps):
                token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

        seconds = timed(steps_of_greedy_decoding, device)
    hook = cache_sync(model)
    return seconds, 0 if hook is None else hook.rerotations


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda")
    parser.add_argument(
        "--shape", choices=("auto", "llama2-7b", "tiny"), default="auto", help="auto: 7b on GPU"
    )
    parser.add_argument("--layers", type=int, default=None, help="default: all")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="prefill lengths")
    parser.add_argument("--decode-context", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="decode steps per variant")
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed prefill runs per cell (after a warm-up)"
    )
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda, but this machine has no CUDA device")
    device = torch.device("cuda" if cuda else "cpu")
    big = args.shape == "llama2-7b" or (args.shape == "auto" and cuda)
    shape, original = (LLAMA2_7B, 4096) if big else (TINY, 32)
    layers = args.layers or shape["layers"]
    factor = 8.0
    lengths = args.lengths or [int(original * n) for n in (1, 4, 8)]
    context = args.decode_context or int(original * factor)
    steps = args.steps or (128 if big else 8)
    if min(lengths) < 2 or layers < 1 or steps < 2 or context <= steps:
        parser.error("lengths >= 2, --layers >= 1, --steps >= 2 and --decode-context > --steps")
    transformers.logging.set_verbosity_error()
    began = time.perf_counter()

    dtype = choose_dtype("auto", cuda=cuda)
    peak = matmul_peak(dtype, device, size=8192 if cuda else 512, seconds=3.0 if cuda else 1.0)
    model = build(shape, layers, original, dtype, device)
    parameters = sum(p.numel() for p in model.parameters())
    yarn_rope.patch(model, factor=factor, original_max_position_embeddings=original)
    auto, why = choose_attention("auto", dtype=dtype, cuda=cuda)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (1, max(*lengths, context)), generator=generator).to(device)

    prefill_rows: list[dict] = []
    for label, kernel in (("sdpa", "sdpa"), (f"auto ({auto})", auto), ("eager", "eager")):
        set_attention(model, kernel)
        failed = None
        for length in sorted(lengths):
            row: dict = {"attention": label, "kernel": kernel, "tokens": length}
            if failed:
                row["error"] = failed
            else:
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    seconds = prefill(model, ids[:, :length], device, args.repeats)
                    flops = forward_flops(model, length, lm_head=False)
                    row.update(seconds=seconds, tokens_per_s=length / seconds, mfu=flops / seconds / peak)
                    if cuda:
                        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                except (RuntimeError, MemoryError) as error:
                    if not out_of_memory(error):
                        raise
                    failed = row["error"] = "out of memory"
                release(cuda)  # after the except block: the failed forward's tensors are gone by now
            prefill_rows.append(row)
            shown = f"{row['tokens_per_s']:,.0f} tokens/s" if "error" not in row else row["error"]
            print(f"  prefill {label} {length}: {shown}", flush=True)
    set_attention(model, "sdpa")

    prompt = ids[:, : context - steps // 2]
    decode_rows = []
    variants = (
        ("static YaRN", dict(factor=factor, original_max_position_embeddings=original)),
        ("dynamic YaRN", dict(method="dynamic-yarn", original_max_position_embeddings=original)),
    )
    for label, fields in variants:
        yarn_rope.patch(model, **fields)
        try:
            seconds, rerotations = decode(model, prompt, steps, device)
            growth = getattr(model.model.rotary_emb, "growth", None)
            decode_rows.append(
                {
                    "variant": label,
                    "tokens_per_s": steps / seconds,
                    "ms_per_token": 1e3 * seconds / steps,
                    "rerotations": rerotations,
                    "schedule": "static"
                    if "static" in label
                    else ("exact" if growth is None else f"grid x{growth:.4g}"),
                }
            )
        except (RuntimeError, MemoryError) as error:
            if not out_of_memory(error):
                raise
            decode_rows.append({"variant": label, "error": "out of memory"})
        release(cuda)
        print(f"  decode {label}: {decode_rows[-1]}", flush=True)

    where = torch.cuda.get_device_name(0) if cuda else "CPU (the CPU path of the GPU script)"
    print(
        f"{where}; {'Llama-2-7B shape, ' if big else ''}{layers} layers, "
        f"{parameters / 1e6:,.1f}M parameters, "
        f"{dtype}; YaRN x{factor:g} from {original}"
    )
    print(f"measured {dtype} matmul peak: {peak / 1e12:.3g} TFLOP/s; {FLOP_CONVENTION}")
    print(f'yarn_rope attention "auto" -> {auto} ({why})')
    print(
        table(
            [
                [
                    r["attention"],
                    r["tokens"],
                    r.get("tokens_per_s", r.get("error")),
                    f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-",
                    f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-",
                ]
                for r in prefill_rows
            ],
            ["attention", "prefill tokens", "tokens/s", "MFU", "peak GiB (GPU)"],
        )
    )
    print(
        table(
            [
                [
                    r["variant"],
                    r.get("schedule", "-"),
                    r.get("tokens_per_s", r.get("error")),
                    r.get("ms_per_token", "-"),
                    r.get("rerotations", "-"),
                ]
                for r in decode_rows
            ],
            [f"decode at {context}", "table changes", "tokens/s", "ms/token", "re-rotations"],
        )
    )
    longest = max(lengths)
    mfus = [r["mfu"] for r in prefill_rows if r["tokens"] == longest and "mfu" in r]
    headline = max(mfus) if mfus else math.nan
    elapsed = time.perf_counter() - began
    print(
        f"headline: best prefill MFU at {longest} tokens = {100 * headline:.1f}% of measured peak "
        f"({elapsed:.0f} s in all)"
    )
    report = {
        "headline": headline,
        "headline_means": f"best prefill model FLOP utilisation at {longest} tokens (of measured peak)",
        "device": where,
        "dtype": str(dtype),
        "layers": layers,
        "parameters": parameters,
        "matmul_peak_flop_per_s": peak,
        "flop_convention": FLOP_CONVENTION,
        "auto_attention": {"kernel": auto, "why": why},
        "prefill": prefill_rows,
        "decode_context": context,
        "decode_steps": steps,
        "decode": decode_rows,
        "seconds": elapsed,
    }
    return finish(report, args.json)


if __name__ == "__main__":
    main()
