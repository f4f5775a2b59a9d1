"""Tests for the one progress convention (``yarn_rope._progress``) and the CLI's progress flags.

The CLI is driven in a subprocess on a tiny checkpoint with ``--progress`` forced (tests do not
run on a terminal) and ``TQDM_MININTERVAL=0`` (tqdm otherwise redraws at most every 0.1 s, and a
tiny model finishes a pass faster than that); the bar's states are read back from standard error.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from yarn_rope._progress import TokenProgress, decoder_layers, progress_bar, transformers_bars
from yarn_rope.eval import passkey, perplexity

pytestmark = pytest.mark.usefixtures("quiet_transformers")

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 4


def tiny_llama(layers: int = LAYERS) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=258,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=256,
        eos_token_id=257,
    )
    return transformers.LlamaForCausalLM(config).eval()


def hook_count(model) -> int:
    return sum(len(layer._forward_hooks) for layer in model.model.layers)


class TestProgressBar:
    def test_rejects_non_bool(self):
        with pytest.raises(TypeError, match="progress"):
            progress_bar(3, desc="x", enabled="yes")  # type: ignore[arg-type]

    def test_disabled_prints_nothing(self, capsys):
        with progress_bar(3, desc="quiet", enabled=False) as bar:
            bar.update(3)
        assert capsys.readouterr().err == ""

    def test_auto_is_off_when_not_a_terminal(self, capsys):
        with progress_bar(3, desc="auto", enabled=None) as bar:
            bar.update(3)
        assert capsys.readouterr().err == ""


class TestTransformersBars:
    """transformers' loading bars: its global flag, and the GGUF loader's own unconditional tqdm."""

    @staticmethod
    def draw_gguf_bar() -> None:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        for _ in gguf_utils.tqdm(range(3), desc="de-quantizing"):
            pass

    @pytest.mark.parametrize("enabled", [False, None])  # None: standard error is not a terminal here
    def test_quiet(self, enabled, capsys):
        from transformers.utils import logging as hf_logging

        before = hf_logging.is_progress_bar_enabled()
        with transformers_bars(enabled):
            self.draw_gguf_bar()
            assert not hf_logging.is_progress_bar_enabled()
        assert "de-quantizing" not in capsys.readouterr().err
        assert hf_logging.is_progress_bar_enabled() == before

    def test_forced(self, capsys):
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        from transformers.utils import logging as hf_logging

        original = gguf_utils.tqdm
        with transformers_bars(True):
            self.draw_gguf_bar()
            assert hf_logging.is_progress_bar_enabled()
        assert "de-quantizing" in capsys.readouterr().err
        assert gguf_utils.tqdm is original


class TestTokenProgress:
    def test_finds_the_decoder_layers(self):
        model = tiny_llama()
        assert decoder_layers(model) == list(model.model.layers)
        assert decoder_layers(torch.nn.Linear(2, 2)) == []

    def test_hooks_only_while_open_and_removed_on_error(self):
        model = tiny_llama()
        with (
            pytest.raises(RuntimeError, match="boom"),
            TokenProgress(model, total=10, desc="t", enabled=True),
        ):
            assert hook_count(model) == LAYERS
            raise RuntimeError("boom")
        assert hook_count(model) == 0

    def test_disabled_registers_no_hooks(self):
        model = tiny_llama()
        with TokenProgress(model, total=10, desc="t", enabled=False) as meter:
            assert hook_count(model) == 0 and not meter.enabled

    def test_layers_advance_inside_a_pass(self):
        """Each decoder layer's forward moves the bar by its share of the task's tokens."""
        model = tiny_llama()
        ids = torch.randint(0, 256, (1, 40))
        with TokenProgress(model, total=40, desc="t", enabled=True, extra_stages=1) as meter:
            seen = []
            original = meter._bar.update
            meter._bar.update = lambda step: (seen.append(step), original(step))[1]
            with meter.task(40), torch.no_grad():
                model.model(input_ids=ids)
                assert seen == pytest.approx([40 / (LAYERS + 1)] * LAYERS)
                meter.advance(39)  # the vocabulary projection of 39 targets
            assert meter._bar.n == pytest.approx(40)

    def test_task_never_overshoots(self):
        model = tiny_llama()
        with TokenProgress(model, total=10, desc="t", enabled=True) as meter:
            with meter.task(4):
                for _ in range(20):
                    meter.advance(4)
            assert meter._bar.n == pytest.approx(4)

    def test_results_unchanged_by_progress(self, save_byte_tokenizer, tmp_path):
        model = tiny_llama()
        ids = torch.randint(0, 256, (2, 96))
        quiet = perplexity(model, ids, lengths=[32, 96], progress=False)
        assert perplexity(model, ids, lengths=[32, 96], progress=True) == quiet
        assert perplexity(model, ids, lengths=[48], stride=16, progress=True) == perplexity(
            model, ids, lengths=[48], stride=16, progress=False
        )
        assert hook_count(model) == 0
        save_byte_tokenizer(tmp_path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
        loud = passkey(model, tokenizer, lengths=[400], trials=2, progress=True)
        assert loud == passkey(model, tokenizer, lengths=[400], trials=2, progress=False)
        assert hook_count(model) == 0


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------

STATE = re.compile(r"(\w+):\s*(\d+)%\|[^|]*\|\s*([0-9.]+)([kM]?)/([0-9.]+)([kM]?) \[([^\]]*)\]")


def states(stderr: str, desc: str) -> list[tuple[float, float, str]]:
    """Every drawn state of the bar named ``desc``: (done, total, the bracket with times and rate)."""
    scale = {"": 1.0, "k": 1e3, "M": 1e6}
    found = []
    for match in STATE.finditer(stderr):
        if match.group(1) == desc:
            done = float(match.group(3)) * scale[match.group(4)]
            total = float(match.group(5)) * scale[match.group(6)]
            found.append((done, total, match.group(7)))
    return found


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, save_byte_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-progress")
    save_byte_tokenizer(folder)
    tiny_llama().save_pretrained(folder)
    (folder / "doc.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    return folder


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TQDM_MININTERVAL="0", PYTHONPATH=str(ROOT / "src"))
    return subprocess.run(
        [sys.executable, "-m", "yarn_rope.cli", *args], capture_output=True, text=True, env=env, check=True
    )


@pytest.mark.slow
class TestCliProgress:
    def perplexity_args(self, checkpoint: Path, *flags: str) -> list[str]:
        return [
            "eval",
            "perplexity",
            "--model",
            str(checkpoint),
            "--text",
            str(checkpoint / "doc.txt"),
            "--method",
            "none",
            "--lengths",
            "128,800",
            *flags,
        ]

    def test_perplexity_bar_moves_within_one_pass(self, checkpoint):
        # Truncate mode, one document: a single forward pass of 800 tokens serves both lengths.
        result = run_cli(*self.perplexity_args(checkpoint, "--progress"))
        drawn = states(result.stderr, "perplexity")
        assert drawn, result.stderr
        total = drawn[0][1]
        assert total == pytest.approx(800)
        inside = sorted({done for done, _, _ in drawn if 0 < done < total})
        # One state per decoder layer at least, all inside the single pass.
        assert len(inside) >= LAYERS, drawn
        assert [done for done, _, _ in drawn] == sorted(done for done, _, _ in drawn)
        assert any("token/s" in bracket and "<" in bracket for _, _, bracket in drawn)  # rate, ETA
        assert "pass 1/1" in result.stderr
        assert "perplexity" in result.stdout  # the table still goes to standard output

    def test_no_progress_prints_none(self, checkpoint):
        result = run_cli(*self.perplexity_args(checkpoint, "--no-progress"))
        assert "%|" not in result.stderr and "token/s" not in result.stderr
        assert "perplexity" in result.stdout

    def test_default_is_quiet_off_a_terminal(self, checkpoint):
        result = run_cli(*self.perplexity_args(checkpoint))
        assert "%|" not in result.stderr

    def test_passkey_bar_moves_within_one_trial(self, checkpoint):
        args = ["eval", "passkey", "--model", str(checkpoint), "--method", "none", "--lengths", "400"]
        result = run_cli(*args, "--trials", "1", "--progress")
        drawn = states(result.stderr, "passkey")
        assert drawn, result.stderr
        total = drawn[0][1]
        inside = {done for done, _, _ in drawn if 0 < done < total}
        assert len(inside) >= LAYERS, drawn  # the prompt's pass, layer by layer, then decoding
        assert "length 400, trial 1/1" in result.stderr
        quiet = run_cli(*args, "--trials", "1", "--no-progress")
        assert "%|" not in quiet.stderr
