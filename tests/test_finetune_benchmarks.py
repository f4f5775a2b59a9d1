"""Smoke tests of the fine-tuning benchmarks at their smallest size: they run and report what they
promise (the headline is recomputed here from the reported figures); no figure is asserted."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_finetune_extension_smoke(tmp_path, run_benchmark):
    plot = importlib.util.find_spec("matplotlib") is not None
    args = ["--preset", "smoke", *(["--plot", str(tmp_path / "plot.png")] if plot else [])]
    report, printed = run_benchmark("finetune_extension.py", tmp_path, *args)
    lengths = report["lengths"]
    context = report["sizes"]["context"]
    assert lengths == [context, 2 * context, 4 * context, 8 * context]
    results = report["results"]
    assert set(results) == {"none", "linear", "ntk", "yarn"} and "after" not in results["none"]
    for method in ("linear", "ntk", "yarn"):
        entry = results[method]
        assert len(entry["losses"]) == report["sizes"]["finetune_steps"]
        # The loop's step-0 evaluation is the same measurement as "before" at the fine-tuned length.
        assert entry["by_step"]["0"] == pytest.approx(entry["before"][str(4 * context)], rel=1e-9)
        assert int(max(entry["by_step"], key=int)) == report["sizes"]["finetune_steps"]
        for stage in ("before", "after"):
            assert [int(n) for n in entry[stage]] == lengths
            assert all(math.isfinite(v) and v > 1 for v in entry[stage].values())
    extended = str(4 * context)
    best_other = min(results[m]["after"][extended] for m in ("linear", "ntk"))
    assert report["headline"] == pytest.approx(results["yarn"]["after"][extended] / best_other)
    assert "PI (linear) x4" in printed and "YaRN x4" in printed
    if plot:
        assert (tmp_path / "plot.png").stat().st_size > 1000


def test_gpu_finetune_cpu_path(tmp_path, run_benchmark):
    report, printed = run_benchmark("gpu_finetune.py", tmp_path)
    assert report["device"] == "cpu" and report["mixed_precision"] == "no"
    lengths = [str(n) for n in report["lengths"]]
    for key in ("plain_before", "yarn_before", "yarn_after"):
        assert list(report["perplexity"][key]) == lengths
    assert len(report["losses"]) == report["recipe"]["steps"]
    longest = lengths[-1]
    ratio = report["perplexity"]["yarn_after"][longest] / report["perplexity"]["yarn_before"][longest]
    assert report["headline"] == pytest.approx(ratio)
    assert report["recipe"]["method"] == "yarn" and report["recipe"]["factor"] == 4.0
    assert "tiny random Llama (no CUDA)" in printed
    assert report["loss"] == "sliced" and report["recipe"]["loss_chunk_size"] == 1024


def test_finetune_memory_smoke(tmp_path, run_benchmark):
    report, printed = run_benchmark("finetune_memory.py", tmp_path, "--model", "tiny")
    assert report["lengths"] == [256] and report["chunk_size"] == 1024
    records = {(r["arm"], r["length"]): r for r in report["records"]}
    sliced, full = records["sliced", 256], records["full", 256]
    assert "error" not in sliced and "error" not in full
    # Both arms compute the same loss; each ran in its own process, so the peaks are its own.
    assert sliced["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert sliced["peak_bytes"] >= sliced["before_step_bytes"] > 0
    assert report["headline"] == pytest.approx(full["peak_bytes"] / sliced["peak_bytes"])
    assert "full / sliced peak at 256 tokens" in printed


def test_finetune_memory_guard(tmp_path):
    """A measurement past --max-rss-gb is killed and recorded as not fitting; the run goes on."""
    out = tmp_path / "memory.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "finetune_memory.py"
    command = [sys.executable, str(script), "--model", "tiny", "--max-rss-gb", "0.05", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(r["arm"], r["length"]) for r in report["records"]] == [("sliced", 256), ("full", 256)]
    for record in report["records"]:
        assert record["error"].startswith("did not fit under 0.05 GB: killed after"), record
        assert "peak_bytes" not in record
    assert report["headline"] == "nan" and report["max_rss_bytes"] == 5e7
    assert result.stdout.count("did not fit under 0.05 GB") == 2
    # --extend keeps the report's records other than those measured again (here one arm at 128).
    again = [*command, "--extend", "--lengths", "128", "--arms", "full"]
    result = subprocess.run(again, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    extended = json.loads(out.read_text())
    assert extended["lengths"] == [128, 256] and extended["records"][:2] == report["records"]
    assert [(r["arm"], r["length"]) for r in extended["records"][2:]] == [("full", 128)]
