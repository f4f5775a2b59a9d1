"""Smoke tests of the fine-tuning benchmarks at their smallest size: they run and report what they
promise (the headline and other figures are recomputed here from the reported ones); no measured
figure is asserted. The mini-replication's statistics are also checked on figures made up here."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def extension():
    """``benchmarks/finetune_extension.py`` imported the way the scripts import their neighbours."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        yield importlib.import_module("finetune_extension")


def test_finetune_extension_smoke(tmp_path, run_benchmark, extension):
    plot = importlib.util.find_spec("matplotlib") is not None
    args = ["--preset", "smoke", *(["--plot", str(tmp_path / "plot.png")] if plot else [])]
    report, printed = run_benchmark("finetune_extension.py", tmp_path, *args)
    sizes = report["sizes"]
    context = sizes["context"]
    # The split: disjoint, 80 / 5 / 15 of the files, seeded (the same files again, others with another seed).
    split = report["split"]["files"]
    parts = [set(split[name]) for name in ("pretrain", "finetune", "held_out")]
    everything = set().union(*parts)
    assert sum(len(part) for part in parts) == len(everything) > 100
    assert (
        abs(len(parts[0]) / len(everything) - 0.8) < 0.01
        and abs(len(parts[1]) / len(everything) - 0.05) < 0.01
    )
    assert not {"_pydecimal.py", "decimal.py"} & {name.rsplit("/", 1)[-1] for name in everything}
    files = extension.stdlib_files()
    again = extension.split_files(files, 0)
    assert [str(p.relative_to(extension.STDLIB)) for p in again["held_out"]] == split["held_out"]
    assert extension.split_files(files, 1)["held_out"] != again["held_out"]
    # Bands: the first-N-tokens perplexity from the band sums is yarn_rope.eval.perplexity's.
    assert report["band_edges"] == [0, context // 2, context, 3 * context // 2, 2 * context, 5 * context // 2,
                                    4 * context]  # fmt: skip
    for length, pair in report["prefix_check"].items():
        assert pair["from_bands"] == pytest.approx(pair["perplexity"], rel=1e-5), length
    # The gate, recomputed from the per-file band sums of plain RoPE before fine-tuning.
    tokens = report["band_tokens"]
    before = report["nll_sums"]["plain_before"]
    assert len(before) == sizes["pretrain_seeds"] == len(report["gate"]["ratios"])
    for rows, ratio in zip(before, report["gate"]["ratios"], strict=True):
        reached = [row for row in rows if not math.isnan(row[3])]
        beyond = sum(row[2] + row[3] for row in reached) / ((tokens[2] + tokens[3]) * len(reached))
        inside = sum(row[1] for row in reached) / (tokens[1] * len(reached))
        assert ratio == pytest.approx(math.exp(beyond - inside), rel=1e-5)
    assert report["gate"]["passed"] == all(r >= 1.2 for r in report["gate"]["ratios"])
    # Every arm, every seed; the 0.4 B arm trains 40% of the steps at a tenth of pretraining's peak rate.
    seeds = sizes["pretrain_seeds"] * sizes["data_seeds"]
    arms = {arm["name"]: arm for arm in report["arms"]}
    assert set(arms) == {"pi", "ntk_theta", "ntk_alpha", "yarn", "yarn_0.4", "plain", "yarn_adapted"}
    assert arms["yarn_0.4"]["steps"] == round(0.4 * sizes["finetune_steps"]) < arms["yarn"]["steps"]
    assert report["finetuning_learning_rate"] == pytest.approx(sizes["pretrain_lr"] / 10)
    for name in arms:
        assert len(report["nll_sums"][name]) == seeds and len(report["band_perplexity"][name]) == 6
    # A comparison's per-seed ratios, recomputed from the band sums (rounded to 4 decimals in the JSON).
    comparison = report["comparisons"]["b_yarn04_vs_ntk_tail"]
    for seed, ratio in enumerate(comparison["per_seed"]):
        pairs = [
            (a[4], b[4])
            for a, b in zip(
                report["nll_sums"]["yarn_0.4"][seed], report["nll_sums"]["ntk_theta"][seed], strict=True
            )
            if not math.isnan(a[4])
        ]
        difference = sum(a - b for a, b in pairs) / (tokens[4] * len(pairs))
        assert ratio == pytest.approx(math.exp(difference), rel=1e-4)
    low, high = comparison["interval"]
    assert low <= comparison["ratio"] <= high
    assert report["headline"] == comparison["ratio"]
    # Verdicts: printed and in the JSON; without the premise nothing is ranked.
    for claim in ("a", "b"):
        assert report["verdicts"][claim]["verdict"] in {"supported", "contradicted", "inconclusive"}
        assert f"claim ({claim})" in printed
    if not report["gate"]["passed"]:
        assert "premise absent: inconclusive" in printed
        assert all(entry["ranking"] is None for entry in report["comparisons"].values())
        assert {report["verdicts"][claim]["verdict"] for claim in ("a", "b")} == {"inconclusive"}
    if plot:
        assert (tmp_path / "plot.png").stat().st_size > 1000


def _comparison(ratio, low, high, seeds=(1, 1, 1, 1)):
    ranking = None
    if low > 1 or high < 1:
        ranking = "<" if high < 1 else ">"
    per_seed = [ratio * s for s in seeds]
    agree = all(r < 1 for r in per_seed) or all(r > 1 for r in per_seed)
    return {
        "ratio": ratio,
        "interval": [low, high],
        "per_seed": per_seed,
        "ranking": ranking if agree else None,
    }


def test_finetune_extension_verdicts(extension):
    same = _comparison(1.002, 0.995, 1.008)
    better = _comparison(0.93, 0.92, 0.94)
    worse = _comparison(1.07, 1.06, 1.08)
    unclear = _comparison(0.99, 0.97, 1.01)
    claims = {
        "a_yarn04_vs_pi_window": same,
        "a_pi_vs_ntk_window": better,
        "a_yarn04_vs_ntk_window": better,
        "b_yarn04_vs_ntk_tail": better,
        "b_ntk_vs_pi_tail": better,
    }
    verdicts = extension.verdicts(claims)
    assert verdicts["a"]["verdict"] == verdicts["b"]["verdict"] == "supported"
    # YaRN clearly off PI (beyond the 1% margin, every seed): (a) contradicted; NTK above PI on the
    # tail: (b) contradicted.
    verdicts = extension.verdicts(claims | {"a_yarn04_vs_pi_window": worse, "b_ntk_vs_pi_tail": worse})
    assert verdicts["a"]["verdict"] == verdicts["b"]["verdict"] == "contradicted"
    assert verdicts["a"]["yarn_0.4B_vs_pi"] == "different" and verdicts["b"]["ntk_below_pi"] is False
    # An interval that straddles the margin or 1, or seeds that disagree: inconclusive.
    mixed = _comparison(0.95, 0.9, 0.99, seeds=(0.9, 0.95, 1.1, 0.98))
    verdicts = extension.verdicts(claims | {"a_yarn04_vs_pi_window": unclear, "b_ntk_vs_pi_tail": mixed})
    assert verdicts["a"]["verdict"] == verdicts["b"]["verdict"] == "inconclusive"
    assert extension.equivalent(unclear, 0.01) == "undecided" and extension.below(mixed) is None


def test_finetune_extension_bands(extension):
    edges = extension.band_edges(8)
    assert edges == [0, 4, 8, 12, 16, 20, 32] and extension.band_tokens(edges) == [3, 4, 4, 4, 4, 12]
    nll = torch.arange(1.0, 20.0)  # a 20-token document: tokens 2..20 scored, it reaches 20 but not 32
    sums = extension.band_sums(nll, edges)
    assert sums[:5] == [6.0, 22.0, 38.0, 54.0, 70.0] and math.isnan(sums[5])
    for n, index in ((8, 2), (16, 4), (20, 5)):
        assert sum(sums[:index]) == float(nll[: n - 1].sum())  # the bands up to N are the first N tokens
    low, high = extension.adapted_betas(512)
    assert (low, high) == (4.0, 0.125)


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
