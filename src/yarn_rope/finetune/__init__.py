"""Fine-tune a model to its new context: the YaRN paper's recipe, on accelerate.

The paper's checkpoints are not patched models: Yarn-Llama-2-70b-32k is Llama-2-70b *trained* for
400 steps through YaRN (factor 8, on 8k-token sequences). This package is that step:

```python
from yarn_rope.finetune import FinetuneRecipe, finetune

recipe = FinetuneRecipe(method="yarn", factor=4.0, seq_len=16384, steps=400)
result = finetune(model, "books/", tokenizer=tokenizer, recipe=recipe, output="smollm2-32k")
```

and ``accelerate launch --num_processes 8 -m yarn_rope.cli finetune ...`` runs the same code on 8
GPUs (``examples/accelerate/`` holds FSDP and DeepSpeed ZeRO-3 configurations).

**Why a plain accelerate loop, not transformers' ``Trainer``.** The reference
(``finetune.py`` of github.com/jquesnelle/yarn, commit 995db5b) is an accelerate loop, so this is
the closest match: the same engine for 1 CPU process, DDP, FSDP and DeepSpeed, with the same
``accelerate launch`` configurations, and every choice that decides the numbers is visible in
one loop (:class:`.trainer.FinetuneRun`): which sequences form a step, how the logged loss is averaged,
when the learning rate moves. That visibility is what the guarantees need: the loss sequence is
the same for one process accumulating ``2k`` micro-batches and two processes accumulating ``k``
(tested), and a resumed run repeats an uninterrupted one exactly (tested). ``Trainer`` would
bring its own data sampler, scheduler stepping, loss normalisation across accumulation (changed in
transformers 4.46) and checkpoint layout, each to be pinned down and kept equal across releases.

**The recipe** (:class:`FinetuneRecipe`; defaults are the reference's):

=========================  ===========================================  =================================
setting                    reference (995db5b, ``train.sh``)            here
=========================  ===========================================  =================================
optimizer                  AdamW (torch defaults), lr 2e-5              same
schedule                   20 warm-up steps, linear decay to 0 at 400   same (``constant``: the 70B run)
steps                      400 (200 for factor 32 from factor 16)       400
batch                      1 per GPU x 8 accumulation (x 8 GPUs = 64)   1 per process x 8 x processes
sequence length            64k (16 x 4k, the whole new context); 70B:   ``factor x original`` by default;
                           8k pre-tokenized with factor 8               any shorter ``seq_len``
data                       PG19, BOS/EOS bookends, chunked              any text/JSONL/parquet/Hub data,
                                                                        packed the same way (:mod:`.data`)
gradient checkpointing     on (off with LoRA)                           on
gradient clipping          a flag that never takes effect (see below)   global norm 1.0
precision                  bf16 weights, bf16 mixed precision           float32 weights; bf16 autocast on
                                                                        GPU, float32 on CPU
attention                  flash-attention 2                            the loader's choice (SDPA with
                                                                        float32 weights; FA2 with bf16
                                                                        weights and flash-attn)
LoRA                       rank 16, alpha 64, dropout 0.05, all         same, + optionally embeddings and
                           linear layers but ``lm_head``                norms trained fully (LongLoRA)
loss                       ``model(**batch).loss``: the full            the LM head and cross-entropy in
                           ``[batch, seq, vocab]`` logits               slices of 1,024 positions
                                                                        (:mod:`.loss`; same loss)
=========================  ===========================================  =================================

Scaled to this machine (2 CPU cores, no GPU): nothing in the recipe; the global batch follows the
process count as in the reference (8 per process, not 64), and precision follows the device. The
factor and sequence length of a run are the user's (the command line's ``--factor`` and
``--seq-len``); the examples, tests and benchmarks choose sizes that fit a CPU and say so.

Two differences from the reference are deliberate. Its ``--grad-norm`` is a ``store_true`` flag
checked with ``isinstance(args.grad_norm, float)``, which is never true, so it never clipped;
clipping at 1.0 is the common choice and ours. And its scheduler goes through
``accelerator.prepare``, which in accelerate advances a scheduler ``num_processes`` times per
optimizer step (``AcceleratedScheduler.step``, ``split_batches=False``); ours is stepped once per
optimizer step, so the learning rate at step ``k`` does not depend on the number of processes.
"""

from __future__ import annotations

from .data import PackedData, PackedSequences, load_documents, pack_documents, prepare_data
from .plot import plot_loss
from .recipe import MIXED_PRECISION, SCHEDULES, TRAINABLE_EXTRAS, FinetuneRecipe
from .trainer import (
    FinetuneResult,
    FinetuneRun,
    StepPerplexity,
    StepRecord,
    check_launch,
    check_output,
    finetune,
    latest_checkpoint,
    make_accelerator,
    original_context,
)

__all__ = [
    "MIXED_PRECISION",
    "SCHEDULES",
    "TRAINABLE_EXTRAS",
    "FinetuneRecipe",
    "FinetuneResult",
    "FinetuneRun",
    "PackedData",
    "PackedSequences",
    "StepPerplexity",
    "StepRecord",
    "check_launch",
    "check_output",
    "finetune",
    "latest_checkpoint",
    "load_documents",
    "make_accelerator",
    "original_context",
    "pack_documents",
    "plot_loss",
    "prepare_data",
]
