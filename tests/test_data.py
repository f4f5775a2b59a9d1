"""Tests for ``yarn_rope.eval.data``: the offline defaults and GGUF tokenizers' pre-tokenizers.

The reference for token ids is llama.cpp itself (llama-cpp-python's ``Llama(vocab_only=True)``
reads the same GGUF file and tokenizes with its own code); those tests are skipped when
``llama_cpp`` is not installed (``pip install 'yarn-rope[llamacpp]'``). Without it, a property
still holds us to SmolLM2's split: every digit is a token of its own.
"""

from __future__ import annotations

import importlib.util
import logging
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
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=64,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
            )
        )
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
