"""Tests for the one result format (:mod:`yarn_rope.eval.results`), the report
(:mod:`yarn_rope.eval.report`) and ``yarn-rope report``.

Records are written and read back through files; the Markdown tables are parsed back into cells
and compared with the records they came from; versions are compared with what the installed
packages say; standard errors with :mod:`statistics`.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from importlib.metadata import version

import pytest
import torch
import transformers

import yarn_rope
from yarn_rope import RopeScaling, cli, patched
from yarn_rope.eval.passkey import PasskeyResult, PasskeyTrial
from yarn_rope.eval.perplexity import perplexity
from yarn_rope.eval.report import columns, markdown_table, plot_depth_heatmap, plot_records, render_markdown
from yarn_rope.eval.results import EvalRecord, label_for, load_records, mean_stderr, write_records

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
YARN = RopeScaling(method="yarn", factor=2.0, original_max_position_embeddings=8192).to_dict()


def record(**fields) -> EvalRecord:
    base = {"suite": "ruler", "task": "niah_single", "metric": "accuracy", "value": 0.5, "model": "m"}
    return EvalRecord(**(base | fields))


def parse_table(markdown: str, heading: str) -> list[dict[str, str]]:
    """The rows of the Markdown table under ``## heading`` as {column: cell}."""
    lines = markdown.splitlines()
    start = lines.index(f"## {heading}") + 2
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    header, body = table[0], table[2:]
    return [dict(zip(header, row, strict=True)) for row in body]


# ------------------------------------------------------------------------------------------------
# 1. Records
# ------------------------------------------------------------------------------------------------


class TestRecord:
    def test_versions_and_defaults(self):
        entry = record()
        assert entry.transformers == transformers.__version__ == version("transformers")
        assert entry.yarn_rope == yarn_rope.__version__
        assert (entry.method, entry.label, entry.settings, entry.length, entry.depth) == (
            "none",
            "plain RoPE",
            None,
            None,
            None,
        )

    def test_round_trip(self, tmp_path):
        entries = [
            record(length=4096, stderr=0.5, samples=2, settings=YARN, method="yarn", label="yarn x2"),
            record(
                suite="perplexity", task="truncate", metric="perplexity", value=8.02, details={"nll": 2.08}
            ),
            record(
                suite="harness",
                task="arc_challenge",
                metric="acc_norm",
                value=0.25,
                details={"num_fewshot": 25},
            ),
            record(depth=0.25, length=8192),
            record(value=float("nan")),
        ]
        path = tmp_path / "results.json"
        write_records(entries, path)
        data = json.loads(path.read_text())  # plain JSON: no NaN literal
        assert isinstance(data, list) and data[4]["value"] == "nan"
        back = load_records(path)
        assert back[:4] == entries[:4]
        assert math.isnan(back[4].value)
        assert sorted(os.listdir(tmp_path)) == ["results.json"]

    def test_non_finite_numbers_are_strict_json(self, tmp_path):
        """No NaN/Infinity literal anywhere (strict parsers reject them); they read back as floats."""
        inf, nan = float("inf"), float("nan")
        details = {"nll": inf, "per_length": [1.5, -inf, nan], "nested": {"loss": nan}, "note": "x"}
        entry = record(value=-inf, stderr=inf, details=details)
        path = tmp_path / "results.json"
        write_records([entry], path)

        def refuse(literal: str) -> None:
            raise AssertionError(f"non-strict JSON literal {literal} written")

        (written,) = json.loads(path.read_text(), parse_constant=refuse)
        assert written["value"] == "-inf" and written["stderr"] is None
        assert written["details"] == {
            "nll": "inf",
            "per_length": [1.5, "-inf", "nan"],
            "nested": {"loss": "nan"},
            "note": "x",
        }
        (back,) = load_records(path)
        assert back.value == -inf and back.stderr is None
        assert back.details["nll"] == inf and back.details["per_length"][:2] == [1.5, -inf]
        assert math.isnan(back.details["per_length"][2]) and math.isnan(back.details["nested"]["loss"])
        assert back.details["note"] == "x"

    def test_write_is_atomic(self, tmp_path):
        path = tmp_path / "results.json"
        write_records([record()], path)
        before = path.read_bytes()
        with pytest.raises(TypeError):  # details not JSON-serialisable: fails half-way through
            write_records([record(), record(details={"bad": object()})], path)
        assert path.read_bytes() == before
        assert sorted(os.listdir(tmp_path)) == ["results.json"]
        with pytest.raises(TypeError, match="item 0 is dict"):
            write_records([{"suite": "x"}], path)

    @pytest.mark.parametrize(
        ("fields", "error", "match"),
        [
            ({"suite": ""}, ValueError, "suite"),
            ({"value": "high"}, TypeError, "value"),
            ({"value": True}, TypeError, "value"),
            ({"length": -1}, ValueError, "length"),
            ({"samples": 1.5}, ValueError, "samples"),
            ({"depth": 1.5}, ValueError, "depth"),
            ({"stderr": "x"}, TypeError, "stderr"),
            ({"settings": "yarn"}, TypeError, "settings"),
            ({"model": None}, TypeError, "model"),
        ],
    )
    def test_validation(self, fields, error, match):
        with pytest.raises(error, match=f"EvalRecord.{match}"):
            record(**fields)

    def test_load_errors(self, tmp_path):
        missing = tmp_path / "missing.json"
        with pytest.raises(FileNotFoundError, match=r"missing\.json"):
            load_records(missing)
        bad = tmp_path / "bad.json"
        bad.write_text("{not json")
        with pytest.raises(ValueError, match=r"bad\.json is not JSON"):
            load_records(bad)
        bad.write_text('{"records": []}')
        with pytest.raises(ValueError, match="not a list"):
            load_records(bad)
        good = record().to_dict()
        bad.write_text(json.dumps([good, {k: v for k, v in good.items() if k != "metric"}]))
        with pytest.raises(ValueError, match=r"bad.json, record 1: record lacks the field\(s\) metric"):
            load_records(bad)
        bad.write_text(json.dumps([good | {"colour": "red"}]))
        with pytest.raises(ValueError, match="record 0: record has unknown field"):
            load_records(bad)

    def test_unreadable_content_names_the_file(self, tmp_path):
        """Deep nesting, non-UTF-8 bytes: a ValueError naming the file, no RecursionError or codec error."""
        deep = tmp_path / "deep.json"
        deep.write_text("[" * 200_000 + "]" * 200_000)
        with pytest.raises(ValueError, match=r"deep\.json is not a results file: .*nested too deeply"):
            load_records(deep)
        in_details = tmp_path / "details.json"
        details = "{}"
        for _ in range(900):  # shallow enough for the parser, deep for the conversion after it
            details = '{"x": ' + details + "}"
        in_details.write_text(json.dumps([record().to_dict() | {"details": None}]).replace("null", details))
        try:  # either it loads or it is refused by name; never a RecursionError
            load_records(in_details)
        except ValueError as error:
            assert "details.json" in str(error)
        latin = tmp_path / "latin.json"
        latin.write_bytes(b'[{"suite": "ruler", "task": "caf\xe9"}]')
        with pytest.raises(ValueError, match=r"latin\.json is not a results file: byte 32 is not UTF-8"):
            load_records(latin)

    def test_mean_stderr(self):
        values = [1.0, 0.0, 1.0, 1.0, 0.0]
        assert mean_stderr(values) == pytest.approx(statistics.stdev(values) / math.sqrt(5))
        assert mean_stderr([1.0]) is None

    def test_label_for(self):
        assert label_for(None) == "plain RoPE"
        assert label_for(YARN) == "yarn x2"
        assert label_for(RopeScaling(method="linear", factor=4.0).to_dict()) == "linear x4"
        dynamic = RopeScaling(method="dynamic-yarn", original_max_position_embeddings=4096).to_dict()
        assert label_for(dynamic) == "dynamic-yarn"


class TestResultRecords:
    def test_perplexity(self):
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
        )
        model = transformers.LlamaForCausalLM(config).eval()
        ids = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(1))
        with patched(model, method="yarn", factor=2.0, original_max_position_embeddings=16):
            result = perplexity(model, ids, lengths=[16, 40], progress=False)
        records = result.records(model="tiny")
        for entry, length in zip(records, (16, 40), strict=True):
            with torch.no_grad():
                logits = model(ids[None, :length]).logits[0, :-1]  # unpatched now: must differ
            assert entry.length == length and entry.samples == length - 1
            assert entry.value == pytest.approx(result.at(length).perplexity)
            assert entry.details["nll"] == result.at(length).nll
            assert (entry.suite, entry.task, entry.metric) == ("perplexity", "truncate", "perplexity")
            assert (entry.method, entry.label, entry.settings) == ("yarn", "yarn x2", result.scaling)
            plain = math.exp(float(torch.nn.functional.cross_entropy(logits, ids[1:length])))
            assert entry.value != pytest.approx(plain, rel=1e-6)

    def test_passkey(self):
        trials = tuple(
            PasskeyTrial(length, length, 11111, 0.5, "", correct)
            for length, correct in ((100, True), (100, False), (100, True), (200, True))
        )
        result = PasskeyResult(accuracy={100: 2 / 3, 200: 1.0}, trials=trials, scaling=None)
        first, second = result.records(model="m", method="none")
        assert (first.suite, first.task, first.metric, first.length) == (
            "passkey",
            "passkey",
            "accuracy",
            100,
        )
        assert first.value == 2 / 3 and first.samples == 3
        assert first.stderr == pytest.approx(statistics.stdev([1.0, 0.0, 1.0]) / math.sqrt(3))
        assert second.stderr is None and second.samples == 1


# ------------------------------------------------------------------------------------------------
# 2. Report
# ------------------------------------------------------------------------------------------------


def sample_records() -> list[EvalRecord]:
    out = []
    for method, settings, label, shift in (
        ("yarn", YARN, "yarn x2", 0.25),
        ("none", None, "plain RoPE", 0.0),
    ):
        common = {"model": "m", "method": method, "settings": settings, "label": label}
        out += [
            record(task="niah_single", length=4096, value=0.5 + shift / 2, stderr=0.25, samples=4, **common),
            record(task="niah_single", length=8192, value=shift, stderr=0.1, samples=4, **common),
            record(task="common_words", length=4096, value=0.1, samples=4, **common),
            record(task="common_words", length=8192, value=0.3, samples=4, **common),
            record(task="niah_single", length=4096, depth=0.25, value=1.0, **common),
            record(task="niah_single", length=4096, depth=0.75, value=shift, **common),
            record(task="niah_single", length=8192, depth=0.25, value=0.5, **common),
            record(task="niah_single", length=8192, depth=0.75, value=0.0, **common),
            record(
                suite="perplexity",
                task="truncate",
                metric="perplexity",
                length=8192,
                value=8 + shift,
                **common,
            ),
            record(
                suite="harness",
                task="arc_challenge",
                metric="acc",
                value=0.3,
                stderr=0.01,
                details={"num_fewshot": 25, "primary": False},
                **common,
            ),
            record(
                suite="harness",
                task="arc_challenge",
                metric="acc_norm",
                value=0.35 - shift / 10,
                stderr=0.012,
                details={"num_fewshot": 25, "primary": True},
                **common,
            ),
        ]
    return out


class TestReport:
    def test_tables(self):
        records = sample_records()
        text = render_markdown(records, title="SmolLM2")
        assert text.startswith("# SmolLM2\n")
        ruler = parse_table(text, "RULER-style tasks: accuracy (%)")
        assert list(ruler[0]) == ["task", "tokens", "plain RoPE", "yarn x2"]  # unpatched first
        cells = {(row["task"], row["tokens"]): row for row in ruler}
        assert cells[("niah_single", "4,096")]["plain RoPE"] == "50.0 ± 25.0"
        assert cells[("niah_single", "4,096")]["yarn x2"] == "62.5 ± 25.0"
        assert cells[("common_words", "8,192")]["yarn x2"] == "30.0"
        # The mean over tasks per length, computed here.
        assert cells[("mean of 2 tasks", "8,192")]["yarn x2"] == f"{100 * (0.25 + 0.3) / 2:.1f}"
        assert len(ruler) == 6  # per-depth records stay out of the table
        harness = parse_table(text, "Short-context benchmarks (lm-evaluation-harness, %)")
        assert harness == [
            {"task": "arc_challenge (25-shot, acc_norm)", "plain RoPE": "35.0 ± 1.2", "yarn x2": "32.5 ± 1.2"}
        ]
        ppl = parse_table(text, "Perplexity by context length")
        assert ppl == [{"tokens": "8,192", "plain RoPE": "8.00", "yarn x2": "8.25"}]
        assert "factor=2.0, original_max_position_embeddings=8192" in text
        assert f"transformers {transformers.__version__}" in text

    def test_mean_rows_only_over_complete_task_sets(self):
        records = [
            record(task="niah_single", length=4096, value=1.0),
            record(task="common_words", length=4096, value=0.5),
            record(
                task="niah_single", length=4096, value=0.25, method="yarn", label="yarn x2", settings=YARN
            ),
            record(task="niah_single", length=16384, value=0.0),
        ]
        rows = parse_table(render_markdown(records), "RULER-style tasks: accuracy (%)")
        means = [row for row in rows if row["task"].startswith("mean")]
        # 4096: two tasks for plain RoPE (mean 75), one for yarn (no mean); 16384: one task, no row.
        assert means == [{"task": "mean of 2 tasks", "tokens": "4,096", "plain RoPE": "75.0", "yarn x2": ""}]

    def test_several_models_and_duplicates(self):
        records = [
            record(model="a", length=4096, value=0.5),
            record(model="b", length=4096, value=0.75),
            record(model="a", length=4096, value=0.0),  # the same cell again: set aside
        ]
        text = render_markdown(records)
        rows = parse_table(text, "RULER-style tasks: accuracy (%)")
        assert rows == [
            {"task": "niah_single", "tokens": "4,096", "plain RoPE (a)": "50.0", "plain RoPE (b)": "75.0"}
        ]
        assert "1 record(s) for a cell already filled were set aside" in text
        assert [c.model for c in columns(records)] == ["a", "b"]

    def test_markdown_table_and_errors(self):
        assert markdown_table(sample_records(), "perplexity").startswith("| tokens | plain RoPE | yarn x2 |")
        with pytest.raises(ValueError, match="no passkey records"):
            markdown_table(sample_records(), "passkey")
        with pytest.raises(ValueError, match="no records"):
            render_markdown([])

    def test_plots(self, tmp_path):
        written = plot_records(sample_records(), tmp_path / "plots")
        assert sorted(os.path.basename(p) for p in written) == [
            "harness.png",
            "perplexity.png",
            "ruler.png",
            "ruler_depth.png",
        ]
        for path in written:
            with open(path, "rb") as handle:
                assert handle.read(8) == PNG_SIGNATURE
        assert sorted(os.listdir(tmp_path / "plots")) == sorted(os.path.basename(p) for p in written)
        plot_depth_heatmap(sample_records(), tmp_path / "depth.svg")
        assert b"<svg" in (tmp_path / "depth.svg").read_bytes()[:1000]
        with pytest.raises(ValueError, match="per-depth"):
            plot_depth_heatmap([record()], tmp_path / "none.png")


class TestCommandLine:
    def test_report_from_two_runs(self, tmp_path, capsys):
        records = sample_records()
        first, second = tmp_path / "a.json", tmp_path / "b.json"
        write_records([r for r in records if r.suite != "harness"], first)
        write_records([r for r in records if r.suite == "harness"], second)
        out = tmp_path / "REPORT.md"
        argv = ["report", str(first), str(second), "--out", str(out), "--plot", str(tmp_path / "plots")]
        argv += ["--title", "two runs"]
        assert cli.main(argv) == 0
        printed = capsys.readouterr().out
        assert f"wrote {out} ({len(records)} records from 2 file(s))" in printed
        assert out.read_text() == render_markdown(records, title="two runs")
        assert len(os.listdir(tmp_path / "plots")) == 4
        # Without --out the report goes to standard output.
        assert cli.main(["report", str(second)]) == 0
        assert "| arc_challenge (25-shot, acc_norm) |" in capsys.readouterr().out

    def test_bad_inputs(self, tmp_path, capsys):
        assert cli.main(["report", str(tmp_path / "missing.json")]) == 2
        err = capsys.readouterr().err
        assert "missing.json" in err and "Traceback" not in err and len(err.splitlines()) == 1
        empty = tmp_path / "empty.json"
        write_records([], empty)
        assert cli.main(["report", str(empty)]) == 2
        assert "hold no records" in capsys.readouterr().err
        assert cli.main(["report", str(empty), "--out", str(tmp_path / "no" / "r.md")]) == 2
        assert "--out" in capsys.readouterr().err
        (tmp_path / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
        (tmp_path / "latin.json").write_bytes(b'[{"task": "caf\xe9"}]')
        for name in ("deep.json", "latin.json"):
            assert cli.main(["report", str(tmp_path / name)]) == 2
            err = capsys.readouterr().err
            assert name in err and "Traceback" not in err and len(err.splitlines()) == 1, err
