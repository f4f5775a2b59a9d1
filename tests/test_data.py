"""Tests for ``yarn_rope.eval.data``: the offline defaults and GGUF tokenizers' pre-tokenizers.

The reference for token ids is llama.cpp itself (llama-cpp-python's ``Llama(vocab_only=True)``
reads the same GGUF file and tokenizes with its own code); those tests are skipped when
``llama_cpp`` is not installed (``pip install 'yarn-rope[llamacpp]'``). Without it, a property
still holds us to SmolLM2's split: every digit is a token of its own.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest
import transformers

from yarn_rope.cli import _common as common
from yarn_rope.eval import data

pytestmark = pytest.mark.usefixtures("quiet_transformers")

# Digits in every position the two splits disagree on: after indentation, after a space, glued to
# letters and punctuation, long runs, other scripts' digits (\p{N}: Nd, Nl, No), at line ends.
DIGIT_HEAVY = (
    "def f(x):\n    0\n        return 1234567890 + 0x1F * 3.14159e-10\n"
    "    \t 42\n\n  7 apples, 12 pears and 2048.5 kg in 1999-12-31T23:59:59Z\n"
    "v2 x86_64 sha256 utf-8 2**31-1 1_000_000 -17 +3 (4) [5] {6} 7%\n"
    "Arabic-Indic ٠١٢٣٤٥٦٧٨٩, Devanagari ४२, fullwidth \uff11\uff12\uff13, superscript x² ³, roman Ⅻ, ½ ¾\n"
    "   9   \n" + " ".join(str(n) for n in range(0, 2000, 37)) + "\n" + "\t" * 3 + "0" * 12
)


def _gguf_path() -> Path:
    try:
        path = data.default_model_file()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    pytest.importorskip("gguf")
    return path


@pytest.fixture(scope="module")
def default_tokenizer():
    _gguf_path()
    return data.load_default_tokenizer()


@pytest.fixture(scope="module")
def llama_vocab() -> Iterator[object]:
    """llama.cpp's own tokenizer for the default model's GGUF file (vocabulary only, no weights)."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed: pip install 'yarn-rope[llamacpp]'")
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(_gguf_path()), vocab_only=True, verbose=False)
    yield vocab
    vocab.close()


def _llama_ids(vocab, text: str) -> list[int]:
    # add_bos=True adds BOS only if the file asks for it (SmolLM2's does not), like the tokenizer.
    return list(vocab.tokenize(text.encode("utf-8"), add_bos=True, special=False))


class TestPreTokenizerName:
    def test_default_model_names_smollm(self):
        assert data.gguf_pre_tokenizer_name(_gguf_path()) == "smollm"

    def test_table_knows_smollm(self):
        assert "smollm" in data.GGUF_PRE_TOKENIZERS


class TestDefaultTokenizerMatchesLlamaCpp:
    def test_digit_heavy_text(self, default_tokenizer, llama_vocab):
        assert default_tokenizer(DIGIT_HEAVY).input_ids == _llama_ids(llama_vocab, DIGIT_HEAVY)

    def test_indented_digit(self, default_tokenizer, llama_vocab):
        # The issue's example: transformers' fallback gave '\n   ', ' ', '0'.
        ids = default_tokenizer("\n    0").input_ids
        assert ids == _llama_ids(llama_vocab, "\n    0")
        assert default_tokenizer.convert_tokens_to_string(
            default_tokenizer.convert_ids_to_tokens(ids[:1])
        ) == ("\n    ")

    @pytest.mark.slow
    def test_pydecimal(self, default_tokenizer, llama_vocab):
        """The default corpus: the whole of _pydecimal.py (the README's tables read its first 16k)."""
        name, text = data.default_corpus(1)[0]
        assert name == "_pydecimal.py"
        ours = default_tokenizer(text).input_ids
        reference = _llama_ids(llama_vocab, text)
        assert ours[:12000] == reference[:12000]
        assert ours == reference

    def test_fallback_differs_from_llama_cpp(self, llama_vocab):
        """Without the fix transformers' tokens differ (this test fails once transformers maps 'smollm')."""
        path = _gguf_path()
        plain = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        assert plain(DIGIT_HEAVY).input_ids != _llama_ids(llama_vocab, DIGIT_HEAVY)


def test_every_digit_is_its_own_token(default_tokenizer):
    """SmolLM2's tokenizer.json splits digits one by one (Digits(individual_digits=True)), so no token
    holds a digit together with anything else. Holds without llama.cpp installed."""
    encoding = default_tokenizer(DIGIT_HEAVY, return_offsets_mapping=True)
    spans = [DIGIT_HEAVY[start:end] for start, end in encoding.offset_mapping]
    with_digits = [span for span in spans if any(unicodedata.category(c).startswith("N") for c in span)]
    assert len(with_digits) > 100, "the text has digits"
    # A digit outside ASCII is several bytes, hence several tokens, each mapped to that one character.
    assert all(len(span) == 1 for span in with_digits), [span for span in with_digits if len(span) != 1]
    assert default_tokenizer.decode(encoding.input_ids) == DIGIT_HEAVY


class TestSetPreTokenizer:
    """set_gguf_pre_tokenizer on a byte-level tokenizer whose pre-tokenizer is transformers' fallback."""

    @pytest.fixture
    def byte_tokenizer(self, tmp_path, save_byte_tokenizer):
        save_byte_tokenizer(tmp_path)
        return transformers.AutoTokenizer.from_pretrained(tmp_path)

    @staticmethod
    def pieces(tokenizer, text):
        return [piece for piece, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]

    def test_known_name_splits_digits(self, byte_tokenizer, caplog):
        before = self.pieces(byte_tokenizer, "x 123\n    0")
        assert "Ġ123" in before  # GPT-2's pattern keeps a number whole, with its space
        assert data.set_gguf_pre_tokenizer(byte_tokenizer, "smollm") is True
        after = self.pieces(byte_tokenizer, "x 123\n    0")
        assert after == ["x", "Ġ", "1", "2", "3", "ĊĠĠĠĠ", "0"]

    def test_unknown_name_logged_and_left(self, byte_tokenizer, caplog):
        before = byte_tokenizer.backend_tokenizer.to_str()
        with caplog.at_level(logging.WARNING, logger="yarn_rope.eval.data"):
            assert data.set_gguf_pre_tokenizer(byte_tokenizer, "made-up-bpe") is False
        assert "made-up-bpe" in caplog.text
        assert byte_tokenizer.backend_tokenizer.to_str() == before

    def test_gpt2_names_and_none_are_left_quietly(self, byte_tokenizer, caplog):
        before = byte_tokenizer.backend_tokenizer.to_str()
        with caplog.at_level(logging.WARNING, logger="yarn_rope.eval.data"):
            assert data.set_gguf_pre_tokenizer(byte_tokenizer, "gpt-2") is False
            assert data.set_gguf_pre_tokenizer(byte_tokenizer, None) is False
        assert caplog.text == ""
        assert byte_tokenizer.backend_tokenizer.to_str() == before

    def test_pre_tokenizer_transformers_built_is_kept(self, byte_tokenizer):
        from tokenizers import Regex, pre_tokenizers

        byte_tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        before = byte_tokenizer.backend_tokenizer.to_str()
        assert data.set_gguf_pre_tokenizer(byte_tokenizer, "smollm") is False
        assert byte_tokenizer.backend_tokenizer.to_str() == before


def test_cli_gguf_tokenizer_is_fixed(tmp_path, llama_vocab):
    """``--model DIR --gguf-file F`` opens the tokenizer the way the default model's is opened."""
    path = _gguf_path()
    (tmp_path / path.name).symlink_to(path)
    tokenizer = common.load_tokenizer(str(tmp_path), path.name)
    assert tokenizer(DIGIT_HEAVY).input_ids == _llama_ids(llama_vocab, DIGIT_HEAVY)


def test_load_default_model_uses_the_fixed_tokenizer(monkeypatch):
    """load_default_model hands out load_gguf_tokenizer's tokenizer (weights not loaded here)."""
    path = _gguf_path()
    calls = []

    def fake_tokenizer(folder, gguf_file):
        calls.append((Path(folder), gguf_file))
        return "tokenizer"

    class FakeModel:
        def eval(self):
            return self

    monkeypatch.setattr(data, "load_gguf_tokenizer", fake_tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: FakeModel())
    _, tokenizer = data.load_default_model(cache=False)  # the GGUF path (the cache: below)
    assert tokenizer == "tokenizer" and calls == [(path.parent, path.name)]


# ------------------------------------------------------------------------------------------------
# The de-quantised model's cache
# ------------------------------------------------------------------------------------------------


class TestDefaultModelCache:
    def test_location_follows_the_environment(self, monkeypatch, tmp_path):
        monkeypatch.setenv("YARN_ROPE_CACHE", str(tmp_path / "here"))
        assert data.default_model_cache() == tmp_path / "here"
        for off in ("", "0", "off", "OFF"):
            monkeypatch.setenv("YARN_ROPE_CACHE", off)
            assert data.default_model_cache() is None
        monkeypatch.delenv("YARN_ROPE_CACHE")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert data.default_model_cache() == tmp_path / "xdg" / "yarn_rope"

    @pytest.mark.slow
    def test_cached_model_is_the_gguf_model(self, monkeypatch, tmp_path):
        """A fresh cache: the first load fills it, the second reads it; both equal the GGUF load."""
        import torch

        _gguf_path()
        monkeypatch.setenv("YARN_ROPE_CACHE", str(tmp_path))
        reference, reference_tokenizer = data.load_default_model(cache=False)
        assert list(tmp_path.iterdir()) == []
        data.load_default_model()  # fills the cache
        (folder,) = tmp_path.iterdir()
        assert (folder / "model.safetensors").is_file() and not folder.name.startswith(".")
        model, tokenizer = data.load_default_model()  # reads it
        assert Path(model.config._name_or_path) == folder  # loaded from the cache, not GGUF
        ours, theirs = model.state_dict(), reference.state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[name], theirs[name]) for name in ours)
        assert (
            model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        )
        assert tokenizer(DIGIT_HEAVY).input_ids == reference_tokenizer(DIGIT_HEAVY).input_ids
        assert tokenizer.eos_token == reference_tokenizer.eos_token
        assert tokenizer.chat_template == reference_tokenizer.chat_template
        ids = torch.tensor([tokenizer(DIGIT_HEAVY).input_ids[:48]])
        with torch.no_grad():
            assert torch.equal(model(ids).logits, reference(ids).logits)

    def test_a_cache_that_cannot_be_written_is_skipped(self, tmp_path, caplog):
        model = _tiny_llama()
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        with caplog.at_level(logging.WARNING, logger="yarn_rope.eval.data"):
            data._save_to_cache(blocker / "model", model, tokenizer=None)
        assert "could not cache the default model" in caplog.text
        assert sorted(tmp_path.iterdir()) == [blocker]
        # A failure half-way (here: no tokenizer to save) leaves no half-written folder behind.
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="yarn_rope.eval.data"):
            data._save_to_cache(tmp_path / "cache" / "model", model, tokenizer=None)
        assert "AttributeError" in caplog.text
        assert list((tmp_path / "cache").iterdir()) == []

    def test_cache_key_follows_the_file_and_hashes_it_once(self, tmp_path):
        """The key is the file's SHA-256 (with the release); a changed file gets a new key."""
        import hashlib
        import os

        import transformers as tf

        weights = tmp_path / "model.gguf"
        weights.write_bytes(b"GGUF" + bytes(range(256)) * 64)
        expected = hashlib.sha256(weights.read_bytes())
        expected.update(f"transformers {tf.__version__}, format {data._CACHE_FORMAT}".encode())
        data._file_digest.cache_clear()
        first = data._cache_folder(tmp_path / "cache", weights)
        assert first == tmp_path / "cache" / f"model-{expected.hexdigest()[:16]}"
        assert data._cache_folder(tmp_path / "cache", weights) == first
        assert data._file_digest.cache_info().misses == 1  # the second key came from the memo
        weights.write_bytes(b"GGUF" + bytes(range(255, -1, -1)) * 64)  # same size, new bytes
        os.utime(weights, ns=(1, 1))  # and a different mtime, as any rewrite has
        assert data._cache_folder(tmp_path / "cache", weights) != first
        assert data._file_digest.cache_info().misses == 2


# ------------------------------------------------------------------------------------------------
# The cache's integrity, on a tiny stand-in for the default model (the GGUF load stubbed)
# ------------------------------------------------------------------------------------------------


def _tiny_llama(seed: int = 0):
    import torch

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=258,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def stub_default_model(monkeypatch, tmp_path, save_byte_tokenizer):
    """load_default_model on a tiny model: the 'GGUF' load returns it and is counted; the cache is real."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF tiny stand-in")
    save_byte_tokenizer(tmp_path / "tokenizer")
    reference = _tiny_llama()
    loads = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def from_pretrained(*args, **kwargs):
        if "gguf_file" not in kwargs:
            return original(*args, **kwargs)
        loads.append(kwargs["gguf_file"])
        model = _tiny_llama()
        return model.to(kwargs["dtype"]) if kwargs.get("dtype") is not None else model

    monkeypatch.setattr(data, "default_model_file", lambda: gguf)
    monkeypatch.setattr(data, "_require_gguf", lambda: None)
    monkeypatch.setattr(
        data,
        "load_gguf_tokenizer",
        lambda folder, name: transformers.AutoTokenizer.from_pretrained(tmp_path / "tokenizer"),
    )
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setenv("YARN_ROPE_CACHE", str(tmp_path / "cache"))
    data._file_digest.cache_clear()
    return reference, loads, tmp_path / "cache"


def _same_weights(model, reference) -> bool:
    import torch

    ours, theirs = model.state_dict(), reference.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)


def _flip_a_weight_byte(folder: Path) -> None:
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-7] ^= 0x40  # inside the last tensor's data: the header still parses, the size is unchanged
    weights.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink()


DAMAGE = {
    "flipped weight byte": _flip_a_weight_byte,
    "truncated weights": lambda folder: _truncate(folder / "model.safetensors"),
    "truncated tokenizer.json": lambda folder: _truncate(folder / "tokenizer.json"),
    "emptied entry": _empty,
    "entry without manifest (older release)": lambda folder: (folder / data._MANIFEST).unlink(),
}


class TestCacheIntegrity:
    def test_fill_then_read(self, stub_default_model):
        reference, loads, root = stub_default_model
        data.load_default_model()
        (folder,) = root.iterdir()
        assert data._cache_damage(folder) is None
        manifest = json.loads((folder / data._MANIFEST).read_text())
        assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(manifest["files"])
        model, _ = data.load_default_model()
        assert loads == ["tiny.gguf"] and Path(model.config._name_or_path) == folder
        assert _same_weights(model, reference)

    @pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
    def test_damaged_entry_is_rebuilt_with_a_message(self, stub_default_model, caplog, damage):
        """Never different weights, never a SafetensorError / JSON error: one line, then a rebuild."""
        reference, loads, root = stub_default_model
        data.load_default_model()
        (folder,) = root.iterdir()
        DAMAGE[damage](folder)
        with caplog.at_level(logging.WARNING, logger="yarn_rope.eval.data"):
            model, tokenizer = data.load_default_model()
        (message,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert str(folder) in message and "rebuilding" in message and "\n" not in message
        assert loads == ["tiny.gguf", "tiny.gguf"]  # rebuilt from the 'GGUF' file
        assert _same_weights(model, reference)
        plain = transformers.AutoTokenizer.from_pretrained(root.parent / "tokenizer")
        assert tokenizer(DIGIT_HEAVY).input_ids == plain(DIGIT_HEAVY).input_ids
        assert sorted(root.iterdir()) == [folder] and data._cache_damage(folder) is None
        again, _ = data.load_default_model()  # the rebuilt entry is read, silently
        assert loads == ["tiny.gguf", "tiny.gguf"] and _same_weights(again, reference)

    def test_no_shard_bar_off_a_terminal(self, stub_default_model, capfd):
        """The first load writes the cache without transformers' "Writing model shards" bar on a
        non-terminal, even with transformers' own bars switched on (its default)."""
        from transformers.utils import logging as tf_logging

        _, _, root = stub_default_model
        tf_logging.enable_progress_bar()
        data.load_default_model()
        assert "Writing model shards" not in capfd.readouterr().err
        shutil.rmtree(root)
        data.load_default_model(progress=True)  # asked for: shown, terminal or not
        assert "Writing model shards" in capfd.readouterr().err

    def test_losing_a_fill_race_is_quiet(self, stub_default_model, caplog, save_byte_tokenizer, tmp_path):
        """A process that finds the entry filled by another when it renames its own keeps that one."""
        _, _, root = stub_default_model
        data.load_default_model()
        (folder,) = root.iterdir()
        before = (folder / data._MANIFEST).read_text()
        tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
        with caplog.at_level(logging.INFO, logger="yarn_rope.eval.data"):
            data._save_to_cache(folder, _tiny_llama(seed=1), tokenizer)
        assert "another process cached the default model" in caplog.text
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert sorted(root.iterdir()) == [folder] and (folder / data._MANIFEST).read_text() == before


_FILL = """
import sys, time, transformers
from pathlib import Path
from yarn_rope.eval import data
sys.path.insert(0, {tests!r})
from conftest import _save_byte_tokenizer
from test_data import _tiny_llama
folder, start = Path(sys.argv[1]), float(sys.argv[2])
_save_byte_tokenizer(Path(sys.argv[3]))
tokenizer = transformers.AutoTokenizer.from_pretrained(sys.argv[3])
model = _tiny_llama()
time.sleep(max(0.0, start - time.time()))
data._save_to_cache(folder, model, tokenizer)
"""


def test_two_processes_filling_at_once_end_valid(tmp_path):
    """Two processes fill the same entry at the same moment: one entry, valid, nothing left behind."""
    import subprocess
    import sys
    import time

    folder = tmp_path / "cache" / "tiny-0123"
    script = _FILL.format(tests=str(Path(__file__).parent))
    start = str(time.time() + 8)  # both processes past their imports by then
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(folder), start, str(tmp_path / f"tok{i}")],
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    errors = [run.communicate(timeout=120)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    assert not any("could not cache" in error for error in errors), errors
    assert sorted(path.name for path in folder.parent.iterdir()) == [folder.name]
    assert data._cache_damage(folder) is None
