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

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

pytestmark = pytest.mark.slow


def run_script(name: str, tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / f"{name}.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert isinstance(report["headline"], float) and "headline" in result.stdout
    assert not list(tmp_path.glob(f".{name}.json.*")), "the JSON writer left a temporary file"
    return report, result.stdout


def test_finetune_extension_smoke(tmp_path):
    plot = importlib.util.find_spec("matplotlib") is not None
    args = ["--preset", "smoke", *(["--plot", str(tmp_path / "plot.png")] if plot else [])]
    report, printed = run_script("finetune_extension.py", tmp_path, *args)
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


def test_gpu_finetune_cpu_path(tmp_path):
    report, printed = run_script("gpu_finetune.py", tmp_path)
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
