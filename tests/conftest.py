"""Shared test fixtures."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def _save_byte_tokenizer(folder: Path) -> int:
    """A byte-level tokenizer (256 bytes + <s>/</s>, no merges) saved into ``folder``; its size."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<s>"], vocab["</s>"] = 256, 257
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return len(vocab)


@pytest.fixture(scope="session")
def save_byte_tokenizer() -> Callable[[Path], int]:
    """Saves a tiny offline tokenizer into a checkpoint folder (tests need no Hub)."""
    return _save_byte_tokenizer


@pytest.fixture(scope="session")
def save_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Any], Path]:
    """Saves a model with the byte tokenizer into a new folder, a local checkpoint; returns it."""

    def save(model: Any) -> Path:
        folder = tmp_path_factory.mktemp("tiny-checkpoint")
        _save_byte_tokenizer(folder)
        model.save_pretrained(folder)
        return folder

    return save


@pytest.fixture
def cli_loads_no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a command gets as far as loading its model (mistakes come first)."""
    from yarn_rope.cli import _common

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr(_common, "load_model", refuse)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run_benchmark(name: str, tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
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


@pytest.fixture(scope="session")
def run_benchmark() -> Callable[..., tuple[dict[str, Any], str]]:
    """``run_benchmark(name, tmp_path, *args)`` runs ``benchmarks/<name>`` with ``args`` and
    ``--json``: (the report, its printed output). It checks what every benchmark promises: exit
    status 0, a float headline that is also printed, no temporary file left by the JSON writer."""
    return _run_benchmark


@pytest.fixture
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings about the tiny configs and keys we build on purpose, and its progress
    bars, silenced for one test and restored after it. Test modules opt in with
    ``pytestmark = pytest.mark.usefixtures("quiet_transformers")``."""
    from transformers.utils import logging as tf_logging

    verbosity = tf_logging.get_verbosity()
    bars = tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    yield
    tf_logging.set_verbosity(verbosity)
    if bars:
        tf_logging.enable_progress_bar()
