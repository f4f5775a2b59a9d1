"""Tests of yarn_rope.patch: patch / unpatch / patched / patch_info on live transformers models.

Goldens: models that transformers builds natively with the same YaRN settings (bit parity of the
logits in the ``angles="fp32"`` mode), the authors' reference tables in
``tests/data/yarn_reference.json``, and the unpatched model itself (bit-exact reversal). Every
model is tiny, random, seeded and built from a config: nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

import yarn_rope
from yarn_rope import RopeScaling, RotaryEmbedding, patch, patch_info, patched, unpatch
from yarn_rope.patch import LayerTypeRotaryEmbedding, UnsupportedModelError

REFERENCE = json.loads((Path(__file__).parent / "data" / "yarn_reference.json").read_text())
CASES = {case["name"]: case for case in REFERENCE["cases"]}

LOGGER = "yarn_rope.patch"
M = 128  # original (pretrained) context of the tiny models
FACTOR = 4.0
SEQ = 4 * M  # long enough that the scaling matters
VOCAB = 128
YARN = {"factor": FACTOR, "original_max_position_embeddings": M}

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3", "gpt_neox")
_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": M,
}
_TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_SPECS: dict[str, tuple[type, type, dict[str, Any]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM, {"num_key_value_heads": 2, **_TOKENS}),
    "mistral": (
        MistralConfig,
        MistralForCausalLM,
        {"num_key_value_heads": 2, "sliding_window": None, **_TOKENS},
    ),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"num_key_value_heads": 2, **_TOKENS}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"num_key_value_heads": 2, "head_dim": 16, **_TOKENS}),
    # Phi-3 keeps the pretrained length at the top level (default 4096): make it the real one.
    "phi3": (
        Phi3Config,
        Phi3ForCausalLM,
        {
            "num_key_value_heads": 2,
            "partial_rotary_factor": 0.5,
            "original_max_position_embeddings": M,
            **_TOKENS,
        },
    ),
    "gemma3": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        {
            "num_key_value_heads": 2,
            "head_dim": 16,
            "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": 16,
            **_TOKENS,
        },
    ),
    "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM, {"partial_rotary_factor": 0.25}),
}
# One of each rotary layout: plain, partial with a top-level original length, per layer type, partial.
LAYOUTS = ("llama", "phi3", "gemma3", "gpt_neox")
_ROTARY = {"gpt_neox": "gpt_neox.rotary_emb"}


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("quiet_transformers")


IDS = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1234))


def config(arch: str, rope: Callable[[dict], dict] | None = None, **overrides: Any) -> Any:
    """The tiny config of ``arch``; ``rope`` maps its default rope_parameters to the wanted ones."""
    config_class, _, extra = _SPECS[arch]
    kwargs = {**_COMMON, **extra, **overrides}
    cfg = config_class(**kwargs)
    if rope is not None:
        cfg = config_class(**kwargs, rope_parameters=rope(copy.deepcopy(cfg.rope_parameters)))
    return cfg


def build(
    arch: str, rope: Callable[[dict], dict] | None = None, *, seed: int = 0, **overrides: Any
) -> nn.Module:
    """A tiny random model of ``arch`` in eval mode; the same seed gives the same weights."""
    model_class = _SPECS[arch][1]
    cfg = config(arch, rope, **overrides)
    torch.manual_seed(seed)
    return model_class(cfg).eval()


def native_yarn_parameters(old: dict, layer_types: tuple[str, ...] = ("full_attention",)) -> dict:
    """transformers' own YaRN rope_parameters (only the given layer types of a per-type dict)."""
    yarn = {"rope_type": "yarn", **YARN}
    if any(isinstance(value, dict) for value in old.values()):
        return {key: ({**value, **yarn} if key in layer_types else value) for key, value in old.items()}
    return {**old, **yarn}


def native_yarn(arch: str, weights_from: nn.Module) -> nn.Module:
    """The model transformers builds natively with YaRN factor 4 / original M, same weights."""
    if arch == "phi3":
        # Phi3Config turns rope_type "yarn" into "longrope" (legacy Phi-3 checkpoints); transformers'
        # own YaRN table for the partial rotary dimension comes from its rotary module.
        model = build(arch)
        yarn_config = copy.deepcopy(model.config)
        yarn_config.rope_parameters = native_yarn_parameters(yarn_config.rope_parameters)
        model.model.rotary_emb = Phi3RotaryEmbedding(yarn_config)
    else:
        model = build(arch, native_yarn_parameters)
    model.load_state_dict(weights_from.state_dict())
    return model.eval()


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def rotary(model: nn.Module, arch: str) -> nn.Module:
    return model.get_submodule(_ROTARY.get(arch, "model.rotary_emb"))


def scaled_module(model: nn.Module, arch: str) -> RotaryEmbedding:
    """The inserted module that carries the scaled (full-attention) table."""
    module = rotary(model, arch)
    if isinstance(module, LayerTypeRotaryEmbedding):
        module = module.scaled["full_attention"]
    assert isinstance(module, RotaryEmbedding)
    return module


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a patch may change: the module objects, the config's values and attribute names."""
    return {
        "modules": list(model.named_modules()),
        "config": copy.deepcopy(model.config.to_dict()),
        "config_attributes": sorted(vars(model.config)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "state_dict_keys": list(model.state_dict().keys()),
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    now = snapshot(model)
    assert [name for name, _ in now["modules"]] == [name for name, _ in before["modules"]]
    for (name, module), (_, original) in zip(now["modules"], before["modules"], strict=True):
        assert module is original, name
    assert now["config"] == before["config"]
    assert now["config_attributes"] == before["config_attributes"]
    assert now["parameters"] == before["parameters"]
    assert now["state_dict_keys"] == before["state_dict_keys"]


# ------------------------------------------------------------------------------------------------
# 1. Parity with transformers' own YaRN
# ------------------------------------------------------------------------------------------------


class TestParityWithTransformers:
    @pytest.mark.parametrize("arch", ARCHS)
    def test_fp32_logits_equal_native_yarn(self, arch):
        model = build(arch)
        native = native_yarn(arch, model)
        plain = logits(model)
        patch(model, angles="fp32", **YARN)
        got = logits(model)
        assert torch.equal(got, logits(native))
        assert not torch.equal(got, plain)

    @pytest.mark.parametrize("arch", LAYOUTS)
    def test_precise_angles_close_to_fp32(self, arch):
        model = build(arch)
        patch(model, angles="fp32", **YARN)
        fp32 = logits(model)
        patch(model, **YARN)  # new settings (angle mode): replaces the patch
        assert patch_info(model).angles == "precise"
        precise = logits(model)
        torch.testing.assert_close(precise, fp32, rtol=0, atol=1e-4)

    # Phi3Config cannot declare yarn (it turns it into longrope).
    @pytest.mark.parametrize("arch", [arch for arch in ARCHS if arch != "phi3"])
    def test_declared_yarn_is_applied_exactly(self, arch):
        model = build(arch, native_yarn_parameters, max_position_embeddings=SEQ)
        before = logits(model)
        patch(model, angles="fp32")  # no settings: the model's own declared scaling
        assert patch_info(model).scaling == RopeScaling(
            method="yarn", factor=FACTOR, original_max_position_embeddings=M, max_position_embeddings=SEQ
        )
        assert torch.equal(logits(model), before)


# ------------------------------------------------------------------------------------------------
# 2. The authors' reference tables
# ------------------------------------------------------------------------------------------------

_REFERENCE_SETUPS = {
    # case name: (model class, config class, max_position_embeddings, patch settings)
    "llama2-70b-32k": (
        LlamaForCausalLM,
        LlamaConfig,
        4096,
        {"factor": 8.0, "original_max_position_embeddings": 4096},
    ),
    "yarn-mistral-7b-64k": (
        MistralForCausalLM,
        MistralConfig,
        32768,
        {
            "factor": 8.0,
            "original_max_position_embeddings": 8192,
            "beta_fast": 128,
            "beta_slow": 2,
            "mscale_coefficient": 0.07,
        },
    ),
}


class TestReferenceTables:
    @pytest.mark.parametrize("name", sorted(_REFERENCE_SETUPS))
    def test_inserted_table_equals_reference(self, name):
        case = CASES[name]
        model_class, config_class, max_positions, settings = _REFERENCE_SETUPS[name]
        assert case["params"]["dim"] == 128 and case["params"]["base"] == 10000.0
        cfg = config_class(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
            head_dim=128,
            max_position_embeddings=max_positions,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            **_TOKENS,
        )
        torch.manual_seed(0)
        model = model_class(cfg).eval()
        patch(model, angles="fp32", **settings)
        module = model.model.rotary_emb
        assert isinstance(module, RotaryEmbedding)
        expected = torch.tensor(case["inv_freq"], dtype=torch.float32)
        assert module.inv_freq.dtype == torch.float32
        assert torch.equal(module.inv_freq, expected)
        assert module.attention_scaling == case["mscale"]
        # The rows of the reference table (float32 angles, mscale applied).
        rows = case["cos_sin_float32"]
        positions = torch.tensor([[int(p) for p in rows]])
        cos, sin = module(torch.zeros(1, dtype=torch.float32), positions)
        torch.testing.assert_close(cos[0], torch.tensor([rows[p]["cos"] for p in rows]), rtol=0, atol=2e-6)
        torch.testing.assert_close(sin[0], torch.tensor([rows[p]["sin"] for p in rows]), rtol=0, atol=2e-6)


# ------------------------------------------------------------------------------------------------
# 3. Reversal
# ------------------------------------------------------------------------------------------------


class TestReversal:
    @pytest.mark.parametrize("arch", ARCHS)
    def test_unpatch_restores_bit_exact(self, arch):
        model = build(arch)
        before = snapshot(model)
        original = rotary(model, arch)
        rope_parameters = model.config.rope_parameters
        max_positions = model.config.max_position_embeddings
        plain = logits(model)

        assert patch(model, **YARN) is model
        assert rotary(model, arch) is not original
        assert model.config.max_position_embeddings == FACTOR * M
        assert not torch.equal(logits(model), plain)
        assert sum(p.numel() for p in model.parameters()) == before["parameters"]
        assert list(model.state_dict().keys()) == before["state_dict_keys"]

        assert unpatch(model) is model
        assert torch.equal(logits(model), plain)
        assert rotary(model, arch) is original
        assert model.config.rope_parameters == rope_parameters
        assert model.config.max_position_embeddings == max_positions
        assert not hasattr(model, "_yarn_rope_patch")
        assert patch_info(model) is None
        assert_unchanged(model, before)

    @pytest.mark.parametrize("arch", LAYOUTS)
    def test_unpatch_of_unpatched_model_is_a_no_op(self, arch):
        model = build(arch)
        before = snapshot(model)
        assert unpatch(model) is model
        assert_unchanged(model, before)

    @pytest.mark.parametrize("arch", LAYOUTS)
    def test_patched_context_restores_on_exit(self, arch):
        model = build(arch)
        before = snapshot(model)
        plain = logits(model)
        with patched(model, factor=FACTOR) as inside:
            assert inside is model
            assert patch_info(model) is not None
            assert patch_info(model).scaling.factor == FACTOR
            assert not torch.equal(logits(model), plain)
        assert patch_info(model) is None
        assert not hasattr(model, "_yarn_rope_patch")
        assert torch.equal(logits(model), plain)
        assert_unchanged(model, before)

    @pytest.mark.parametrize("arch", LAYOUTS)
    def test_patched_context_restores_when_the_body_raises(self, arch):
        model = build(arch)
        before = snapshot(model)
        plain = logits(model)
        with pytest.raises(RuntimeError, match="boom"), patched(model, **YARN):
            assert patch_info(model) is not None
            raise RuntimeError("boom")
        assert patch_info(model) is None
        assert torch.equal(logits(model), plain)
        assert_unchanged(model, before)

    @pytest.mark.parametrize("arch", LAYOUTS)
    def test_patched_inside_a_patched_model_restores_the_previous_patch(self, arch):
        model = build(arch)
        original = rotary(model, arch)
        before = snapshot(model)
        plain = logits(model)
        patch(model, factor=2.0, original_max_position_embeddings=M)
        first_info = patch_info(model)
        first_module = rotary(model, arch)
        first_config = copy.deepcopy(model.config.to_dict())
        first_logits = logits(model)

        with patched(model, **YARN):
            assert patch_info(model).scaling.factor == FACTOR
            assert not torch.equal(logits(model), first_logits)
        assert patch_info(model) == first_info
        assert rotary(model, arch) is first_module
        assert model.config.to_dict() == first_config
        assert torch.equal(logits(model), first_logits)

        with pytest.raises(RuntimeError), patched(model, **YARN):
            raise RuntimeError
        assert patch_info(model) == first_info
        assert rotary(model, arch) is first_module

        unpatch(model)
        assert rotary(model, arch) is original
        assert torch.equal(logits(model), plain)
        assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------------
# 4. Idempotence and replacement
# ------------------------------------------------------------------------------------------------


class TestIdempotenceAndReplacement:
    @pytest.mark.parametrize("arch", ARCHS)
    def test_same_settings_twice_is_a_no_op(self, arch):
        model = build(arch)
        patch(model, **YARN)
        inserted = rotary(model, arch)
        record = model._yarn_rope_patch
        rope_parameters = model.config.rope_parameters
        assert patch(model, **YARN) is model
        assert rotary(model, arch) is inserted
        assert model._yarn_rope_patch is record
        assert model.config.rope_parameters is rope_parameters

    @pytest.mark.parametrize("arch", ARCHS)
    def test_new_settings_replace_instead_of_stacking(self, arch):
        model = build(arch)
        original = rotary(model, arch)
        before = snapshot(model)
        plain = logits(model)
        patch(model, **YARN)
        patch(model, factor=8.0, original_max_position_embeddings=M)

        fresh = build(arch)
        patch(fresh, factor=8.0, original_max_position_embeddings=M)
        ours, theirs = scaled_module(model, arch), scaled_module(fresh, arch)
        assert torch.equal(ours.inv_freq, theirs.inv_freq)
        assert ours.attention_scaling == theirs.attention_scaling
        assert patch_info(model) == patch_info(fresh)
        assert model.config.to_dict() == fresh.config.to_dict()
        assert torch.equal(logits(model), logits(fresh))

        unpatch(model)  # once: back to the original, not to the first patch
        assert rotary(model, arch) is original
        assert patch_info(model) is None
        assert torch.equal(logits(model), plain)
        assert_unchanged(model, before)

    @pytest.mark.parametrize("arch", LAYOUTS)
    def test_alternating_settings_leave_nothing_behind(self, arch):
        model = build(arch)
        before = snapshot(model)
        plain = logits(model)
        for factor in (2.0, FACTOR, 2.0, FACTOR):
            patch(model, factor=factor, original_max_position_embeddings=M)
            assert patch_info(model).scaling.factor == factor
        unpatch(model)
        assert torch.equal(logits(model), plain)
        assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------------
# 5. Atomicity
# ------------------------------------------------------------------------------------------------

_FAILING = [
    pytest.param(
        "llama", {"factor": 0.5, "original_max_position_embeddings": M}, ValueError, id="llama-factor-0.5"
    ),
    pytest.param(
        "gpt_neox", {"factor": 0.5, "original_max_position_embeddings": M}, ValueError, id="neox-factor"
    ),
    pytest.param("gemma3", {"layer_types": ["nonexistent"], **YARN}, ValueError, id="gemma3-layer-type"),
    pytest.param(
        "gemma3", {"factor": 0.5, "original_max_position_embeddings": M}, ValueError, id="gemma3-factor"
    ),
    pytest.param("phi3", {"method": "no-such-method", **YARN}, ValueError, id="phi3-method"),
]


class TestAtomicity:
    @pytest.mark.parametrize(("arch", "settings", "error"), _FAILING)
    def test_failed_patch_leaves_the_model_unchanged(self, arch, settings, error):
        model = build(arch)
        before = snapshot(model)
        plain = logits(model)
        with pytest.raises(error):
            patch(model, **settings)
        assert patch_info(model) is None
        assert not hasattr(model, "_yarn_rope_patch")
        assert_unchanged(model, before)
        assert torch.equal(logits(model), plain)

    @pytest.mark.parametrize(("arch", "settings", "error"), _FAILING)
    def test_failed_patch_keeps_the_previous_patch(self, arch, settings, error):
        model = build(arch)
        original = rotary(model, arch)
        plain = logits(model)
        patch(model, factor=2.0, original_max_position_embeddings=M)
        info = patch_info(model)
        patched_state = snapshot(model)
        patched_logits = logits(model)
        with pytest.raises(error):
            patch(model, **settings)
        assert patch_info(model) == info
        assert_unchanged(model, patched_state)
        assert torch.equal(logits(model), patched_logits)
        unpatch(model)
        assert rotary(model, arch) is original
        assert torch.equal(logits(model), plain)

    def test_unsupported_model_is_left_unchanged(self):
        model = tiny_gpt2()
        before = snapshot(model)
        plain = logits(model)
        with pytest.raises(UnsupportedModelError):
            patch(model, **YARN)
        assert not hasattr(model, "_yarn_rope_patch")
        assert_unchanged(model, before)
        assert torch.equal(logits(model), plain)

    def test_multimodal_rope_model_is_left_unchanged(self):
        model = tiny_qwen2_vl()
        before = snapshot(model)
        text_rope = copy.deepcopy(model.config.text_config.rope_parameters)
        with pytest.raises(UnsupportedModelError):
            patch(model, **YARN)
        assert not hasattr(model, "_yarn_rope_patch")
        assert_unchanged(model, before)
        assert model.config.text_config.rope_parameters == text_rope


# ------------------------------------------------------------------------------------------------
# 6. Errors and warnings
# ------------------------------------------------------------------------------------------------


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4)
    return GPT2LMHeadModel(cfg).eval()


def tiny_qwen2_vl() -> nn.Module:
    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        text_config={
            **_COMMON,
            "num_hidden_layers": 1,
            "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        },
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "patch_size": 2,
            "spatial_merge_size": 1,
            "temporal_patch_size": 1,
        },
    )
    return Qwen2VLForConditionalGeneration(cfg).eval()


class TestErrors:
    def test_model_without_rotary_module(self):
        with pytest.raises(UnsupportedModelError) as caught:
            patch(tiny_gpt2(), **YARN)
        message = str(caught.value)
        assert "Supported" in message
        assert "inv_freq" in message and "Llama" in message
        assert issubclass(UnsupportedModelError, ValueError)
        assert yarn_rope.UnsupportedModelError is UnsupportedModelError

    def test_qwen2_vl_multimodal_rope(self):
        model = tiny_qwen2_vl()
        assert "mrope_section" in model.config.text_config.rope_parameters
        with pytest.raises(UnsupportedModelError, match="mrope_section"):
            patch(model, **YARN)

    def test_llama_declaring_mrope_section(self):
        model = build("llama", lambda old: {**old, "mrope_section": [2, 3, 3]})
        with pytest.raises(UnsupportedModelError, match="multimodal"):
            patch(model, **YARN)

    @pytest.mark.parametrize(
        "declared",
        [
            {"rope_type": "linear", "factor": 2.0},
            {
                "rope_type": "llama3",
                "factor": 2.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": M // 2,
            },
        ],
        ids=lambda d: d["rope_type"],
    )
    def test_other_declared_scaling_needs_replace(self, declared):
        model = build("llama", lambda old: {**old, **declared})
        before = snapshot(model)
        plain = logits(model)
        with pytest.raises(ValueError, match="replace=True"):
            patch(model, **YARN)
        assert_unchanged(model, before)

        patch(model, replace=True, angles="fp32", **YARN)
        scaling = patch_info(model).scaling
        assert (scaling.method, scaling.factor, scaling.original_max_position_embeddings) == (
            "yarn",
            FACTOR,
            M,
        )
        assert model.config.rope_parameters["rope_type"] == "yarn"
        reference = native_yarn("llama", model)
        assert torch.equal(logits(model), logits(reference))
        unpatch(model)
        assert torch.equal(logits(model), plain)
        assert_unchanged(model, before)

    def test_guessed_original_length_warns(self, caplog):
        model = build("llama")
        with caplog.at_level(logging.WARNING, logger="yarn_rope"):
            patch(model, factor=FACTOR)
        messages = [r.getMessage() for r in caplog.records if r.name.startswith("yarn_rope")]
        assert any(f"max_position_embeddings={M}" in m and "original" in m for m in messages), messages
        assert patch_info(model).scaling.original_max_position_embeddings == M

    def test_given_original_length_does_not_warn(self, caplog):
        model = build("llama")
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            patch(model, **YARN)
        assert not [r for r in caplog.records if r.name == LOGGER]

    def test_top_level_original_length_is_used(self, caplog):
        """Phi-3 states its pretrained length at the config's top level; it is not a guess."""
        model = build("phi3", max_position_embeddings=SEQ)  # declares original_max_position_embeddings=M
        assert model.config.original_max_position_embeddings == M
        with caplog.at_level(logging.WARNING, logger="yarn_rope"):
            patch(model, factor=FACTOR)
        assert patch_info(model).scaling.original_max_position_embeddings == M
        assert not [r for r in caplog.records if "max_position_embeddings" in r.getMessage()]

    def test_bad_arguments(self):
        model = build("llama")
        with pytest.raises(ValueError, match="angles"):
            patch(model, angles="float64", **YARN)
        with pytest.raises(TypeError, match="replace"):
            patch(model, replace="yes", **YARN)
        with pytest.raises(TypeError, match="RopeScaling"):
            patch(model, {"rope_type": "yarn", **YARN})
        with pytest.raises(ValueError, match="needs settings"):
            patch(model)
        with pytest.raises(ValueError, match="one rotary table for all layers"):
            patch(model, layer_types=["full_attention"], **YARN)
        assert patch_info(model) is None


# ------------------------------------------------------------------------------------------------
# 7. dtypes and devices
# ------------------------------------------------------------------------------------------------


class TestDtypeAndDevice:
    @pytest.mark.parametrize("arch", ARCHS)
    def test_cast_after_patch_keeps_float32_tables(self, arch):
        model = build(arch)
        patch(model, **YARN)
        module = scaled_module(model, arch)
        table, scale = module.inv_freq.clone(), module.attention_scaling
        model.to(torch.bfloat16)
        assert scaled_module(model, arch) is module
        assert module.inv_freq.dtype == torch.float32
        assert torch.equal(module.inv_freq, table)
        assert module.attention_scaling == scale
        out = logits(model)
        assert out.dtype == torch.bfloat16
        assert torch.isfinite(out).all()

    @pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gemma3"])
    def test_meta_device_model(self, arch):
        with torch.device("meta"):
            model = _SPECS[arch][1](config(arch))
        patch(model, **YARN)
        assert scaled_module(model, arch).inv_freq.is_meta
        model.to_empty(device="cpu")
        reference = build(arch)
        patch(reference, **YARN)
        ours, theirs = scaled_module(model, arch), scaled_module(reference, arch)
        assert ours.inv_freq.device.type == "cpu"
        assert torch.equal(ours.inv_freq, theirs.inv_freq)
        assert ours.attention_scaling == theirs.attention_scaling

    @pytest.mark.parametrize("arch", ["llama"])
    def test_patch_after_cast_to_bfloat16(self, arch):
        model = build(arch).to(torch.bfloat16)
        patch(model, **YARN)
        reference = build(arch)
        patch(reference, **YARN)
        assert torch.equal(scaled_module(model, arch).inv_freq, scaled_module(reference, arch).inv_freq)

    def test_cast_while_patched_then_unpatch_equals_never_patched(self):
        never = build("llama").to(torch.bfloat16)
        model = build("llama")
        patch(model, **YARN)
        model.to(torch.bfloat16)
        unpatch(model)
        assert model.model.rotary_emb.inv_freq.dtype == never.model.rotary_emb.inv_freq.dtype
        assert torch.equal(logits(model), logits(never))

    def test_meta_model_materialised_while_patched_then_unpatched(self):
        with torch.device("meta"):
            model = LlamaForCausalLM(config("llama"))
        patch(model, **YARN)
        model.to_empty(device="cpu")
        unpatch(model)
        assert not model.model.rotary_emb.inv_freq.is_meta
        logits(model)


# ------------------------------------------------------------------------------------------------
# 8. save_pretrained / from_pretrained
# ------------------------------------------------------------------------------------------------

_SAVABLE = tuple(arch for arch in ARCHS if arch != "phi3")


class TestSaveReload:
    @pytest.mark.parametrize("arch", _SAVABLE)
    def test_yarn_reloads_in_vanilla_transformers(self, arch, tmp_path):
        model = build(arch)
        patch(model, angles="fp32", **YARN)
        model.save_pretrained(tmp_path)
        saved = json.loads((tmp_path / "config.json").read_text())
        assert RopeScaling.from_hf(saved) == patch_info(model).scaling
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert type(reloaded) is type(model)
        assert torch.equal(logits(reloaded), logits(model))
        # The patched model itself is untouched by saving, and still unpatches exactly.
        assert patch_info(model) is not None

    @pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt_neox"])
    @pytest.mark.parametrize(
        "settings",
        [
            {"method": "dynamic-yarn", "original_max_position_embeddings": M},
            {"method": "dynamic-yarn", "finetuned": True, **YARN},
            {"method": "ntk-by-parts", **YARN},
            {"method": "yarn", "extrapolation_factor": 0.5, **YARN},
        ],
        ids=["dynamic-yarn", "dynamic-yarn-finetuned", "ntk-by-parts", "yarn-extrapolation"],
    )
    def test_other_methods_are_refused_by_vanilla_transformers(self, arch, settings, tmp_path):
        model = build(arch)
        patch(model, **settings)
        model.save_pretrained(tmp_path)
        saved = json.loads((tmp_path / "config.json").read_text())
        rope = saved["rope_parameters"]
        if arch == "gemma3":
            assert rope["sliding_attention"]["rope_type"] == "default"
            rope = rope["full_attention"]
        assert rope["rope_type"].startswith("yarn_rope.")
        assert RopeScaling.from_hf(saved) == patch_info(model).scaling
        with pytest.raises((KeyError, ValueError)):
            AutoModelForCausalLM.from_pretrained(tmp_path)

    def test_phi3_patches_but_refuses_to_save_cleanly(self, tmp_path, caplog):
        """Phi3Config accepts only default/longrope rope types: patch warns, save writes nothing."""
        model = build("phi3")
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            patch(model, angles="fp32", **YARN)
        assert any("cannot record this scaling" in r.getMessage() for r in caplog.records)
        logits(model)  # the patched model runs
        with pytest.raises(StrictDataclassClassValidationError):
            model.save_pretrained(tmp_path)
        assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------
# 9. Per-layer-type rotary (Gemma3)
# ------------------------------------------------------------------------------------------------


class TestLayerTypes:
    X = torch.zeros(1, 4, SEQ, 16)
    POSITIONS = torch.arange(SEQ)[None]

    def test_default_scales_only_full_attention(self):
        model = build("gemma3")
        original = model.model.rotary_emb
        sliding_rope = copy.deepcopy(model.config.rope_parameters["sliding_attention"])
        patch(model, **YARN)
        inserted = model.model.rotary_emb
        assert isinstance(inserted, LayerTypeRotaryEmbedding)
        assert inserted.original is original
        assert set(inserted.scaled) == {"full_attention"}
        assert patch_info(model).layer_types == ("full_attention",)
        assert patch_info(model).modules == ("model.rotary_emb",)

        for new, old in zip(
            inserted(self.X, self.POSITIONS, "sliding_attention"),
            original(self.X, self.POSITIONS, "sliding_attention"),
            strict=True,
        ):
            assert torch.equal(new, old)
        full_new = inserted(self.X, self.POSITIONS, "full_attention")[0]
        assert not torch.equal(full_new, original(self.X, self.POSITIONS, "full_attention")[0])
        table, scale = RopeScaling(method="yarn", **YARN).inv_freq(16, base=1e6)
        assert torch.equal(inserted.scaled["full_attention"].inv_freq, table)
        assert inserted.scaled["full_attention"].attention_scaling == scale

        rope = model.config.rope_parameters
        assert rope["sliding_attention"] == sliding_rope
        assert rope["full_attention"]["rope_type"] == "yarn"
        assert rope["full_attention"]["rope_theta"] == 1e6

    def test_all_scales_both(self):
        model = build("gemma3")
        original = model.model.rotary_emb
        native = build(
            "gemma3", lambda old: native_yarn_parameters(old, ("full_attention", "sliding_attention"))
        )
        native.load_state_dict(model.state_dict())
        patch(model, layer_types="all", angles="fp32", **YARN)
        inserted = model.model.rotary_emb
        assert set(inserted.scaled) == {"full_attention", "sliding_attention"}
        assert set(patch_info(model).layer_types) == {"full_attention", "sliding_attention"}
        for layer_type, base in (("full_attention", 1e6), ("sliding_attention", 1e4)):
            table, _ = RopeScaling(method="yarn", **YARN).inv_freq(16, base=base)
            assert torch.equal(inserted.scaled[layer_type].inv_freq, table)
            assert model.config.rope_parameters[layer_type]["rope_type"] == "yarn"
            assert model.config.rope_parameters[layer_type]["rope_theta"] == base
            assert not torch.equal(
                inserted(self.X, self.POSITIONS, layer_type)[0],
                original(self.X, self.POSITIONS, layer_type)[0],
            )
        assert torch.equal(logits(model), logits(native))

    def test_explicit_list(self):
        model = build("gemma3")
        full_rope = copy.deepcopy(model.config.rope_parameters["full_attention"])
        patch(model, layer_types=["sliding_attention"], **YARN)
        assert patch_info(model).layer_types == ("sliding_attention",)
        assert set(model.model.rotary_emb.scaled) == {"sliding_attention"}
        assert model.config.rope_parameters["full_attention"] == full_rope

    def test_changing_layer_types_replaces_the_patch(self):
        model = build("gemma3")
        original = model.model.rotary_emb
        before = snapshot(model)
        plain = logits(model)
        patch(model, **YARN)
        patch(model, layer_types="all", **YARN)
        assert set(patch_info(model).layer_types) == {"full_attention", "sliding_attention"}
        assert model.model.rotary_emb.original is original
        unpatch(model)
        assert torch.equal(logits(model), plain)
        assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------------
# 10. generate()
# ------------------------------------------------------------------------------------------------


_GENERATE = {
    "max_new_tokens": 10,
    "min_new_tokens": 10,
    "do_sample": False,
    "output_scores": True,
    "return_dict_in_generate": True,
}


class TestGenerate:
    PROMPT = IDS[:, : 3 * M]

    def test_greedy_generation_on_a_patched_model(self):
        model = build("llama")
        patch(model, **YARN)
        out = model.generate(self.PROMPT, max_new_tokens=10, do_sample=False, min_new_tokens=10)
        assert isinstance(out, torch.Tensor)
        assert out.shape == (1, 3 * M + 10)
        assert torch.equal(out[:, : 3 * M], self.PROMPT)

    def test_fp32_generation_equals_native_yarn(self):
        model = build("llama")
        native = native_yarn("llama", model)
        plain = model.generate(self.PROMPT, **_GENERATE)
        patch(model, angles="fp32", **YARN)
        ours = model.generate(self.PROMPT, **_GENERATE)
        theirs = native.generate(self.PROMPT, **_GENERATE)
        assert torch.equal(ours.sequences, theirs.sequences)
        for mine, native_scores, plain_scores in zip(ours.scores, theirs.scores, plain.scores, strict=True):
            assert torch.equal(mine, native_scores)
            assert not torch.equal(mine, plain_scores)
        unpatch(model)
        again = model.generate(self.PROMPT, **_GENERATE)
        assert torch.equal(again.sequences, plain.sequences)
        for restored, plain_scores in zip(again.scores, plain.scores, strict=True):
            assert torch.equal(restored, plain_scores)


# ------------------------------------------------------------------------------------------------
# 11. PEFT
# ------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning")
class TestPeft:
    @pytest.mark.parametrize("arch", ["llama", "gemma3"])
    def test_patch_a_peft_model(self, arch):
        peft = pytest.importorskip("peft")
        base = build(arch)
        original = rotary(base, arch)
        reference = build(arch)
        patch(reference, **YARN)
        model = peft.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4)).eval()
        plain = logits(model)

        assert patch(model, **YARN) is model
        info = patch_info(model)
        assert info is not None and len(info.modules) == 1
        assert info.modules[0].endswith("rotary_emb")
        assert rotary(base, arch) is not original
        assert torch.equal(logits(model), logits(reference))

        unpatch(model)
        assert rotary(base, arch) is original
        assert patch_info(model) is None
        assert torch.equal(logits(model), plain)


# ------------------------------------------------------------------------------------------------
# 12. accelerate
# ------------------------------------------------------------------------------------------------


class TestAccelerate:
    @pytest.mark.parametrize("arch", ["llama", "gemma3"])
    def test_hooked_rotary_module(self, arch):
        hooks = pytest.importorskip("accelerate.hooks")
        model = build(arch)
        original = rotary(model, arch)
        hooks.add_hook_to_module(
            original, hooks.AlignDevicesHook(execution_device="cpu", io_same_device=True)
        )
        plain = logits(model)
        reference = build(arch)
        patch(reference, **YARN)

        patch(model, **YARN)
        inserted = rotary(model, arch)
        assert inserted is not original
        assert isinstance(getattr(inserted, "_hf_hook", None), hooks.AlignDevicesHook)
        assert inserted._hf_hook.execution_device == original._hf_hook.execution_device
        assert torch.equal(logits(model), logits(reference))

        unpatch(model)
        assert rotary(model, arch) is original
        assert isinstance(original._hf_hook, hooks.AlignDevicesHook)
        assert torch.equal(logits(model), plain)

    def test_dispatched_model(self):
        accelerate = pytest.importorskip("accelerate")
        model = accelerate.dispatch_model(build("llama"), device_map={"": "cpu"})
        reference = build("llama")
        patch(reference, **YARN)
        patch(model, **YARN)
        assert isinstance(model.model.rotary_emb, RotaryEmbedding)
        assert torch.equal(logits(model), logits(reference))


# ------------------------------------------------------------------------------------------------
# 12. Llama 3 and LongRoPE models
# ------------------------------------------------------------------------------------------------


def _llama3(rope: dict) -> dict:
    return {
        **rope,
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": M // 2,
    }


class TestLlama3Model:
    def test_patch_reproduces_native_logits_and_reverts(self):
        model = build("llama", _llama3)
        native = logits(model)
        before = snapshot(model)
        patch(model, angles="fp32")  # the declared llama3 scaling, with yarn_rope's module
        info = patch_info(model)
        assert info is not None and info.scaling.method == "llama3"
        assert isinstance(rotary(model, "llama"), RotaryEmbedding)
        assert torch.equal(logits(model), native)
        unpatch(model)
        assert torch.equal(logits(model), native)
        assert_unchanged(model, before)

    def test_precise_angles_stay_close(self):
        model = build("llama", _llama3)
        native = logits(model)
        patch(model)
        assert not torch.equal(logits(model), native)  # float64 angles, not transformers' float32
        torch.testing.assert_close(logits(model), native, rtol=0, atol=1e-4)

    def test_yarn_replaces_llama3_only_when_asked(self):
        model = build("llama", _llama3)
        with pytest.raises(ValueError, match="replace=True"):
            patch(model, factor=4.0)
        patch(model, factor=4.0, replace=True, angles="fp32")
        scaling = patch_info(model).scaling
        # The original length comes from what the llama3 scaling declared.
        assert (scaling.method, scaling.factor, scaling.original_max_position_embeddings) == (
            "yarn",
            4.0,
            M // 2,
        )
        expected = yarn_rope.yarn_inv_freq(
            16, base=10000.0, factor=4.0, original_max_position_embeddings=M // 2
        )
        assert torch.equal(scaled_module(model, "llama").inv_freq, expected)

    def test_saved_llama3_reloads_in_vanilla_transformers(self, tmp_path):
        model = build("llama")
        patch(model, method="llama3", factor=8.0, original_max_position_embeddings=M // 2, angles="fp32")
        model.save_pretrained(tmp_path)
        saved = json.loads((tmp_path / "config.json").read_text())
        assert saved["rope_parameters"]["rope_type"] == "llama3"
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert torch.equal(logits(reloaded), logits(model))


def _phi3_longrope(layers: int = 2, *, seed: int = 0) -> nn.Module:
    """A tiny Phi-3 with LongRoPE: original context 64, long context 256, 8 rotary pairs."""
    pairs = 8
    cfg = Phi3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        original_max_position_embeddings=64,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.1 * i for i in range(pairs)],
            "long_factor": [1.0 + 0.9 * i for i in range(pairs)],
        },
        **_TOKENS,
    )
    torch.manual_seed(seed)
    return Phi3ForCausalLM(cfg).eval()


class TestLongRopeModel:
    def test_forward_equals_native_below_and_beyond_the_switch(self):
        model = _phi3_longrope()
        short, long = IDS[:, :60], IDS[:, :200]
        native_short, native_long = logits(model, short), logits(model, long)
        patch(model, angles="fp32")
        assert patch_info(model).scaling.method == "longrope"
        assert torch.equal(logits(model, short), native_short)
        assert torch.equal(logits(model, long), native_long)

    def test_generate_across_the_switch_equals_native_generate(self):
        """transformers' Phi-3 generate() drops the cache at the switch and recomputes (PR #33129):
        the patched model must give that exact answer, step by step."""
        native = _phi3_longrope()
        model = copy.deepcopy(native)
        patch(model, angles="fp32")
        prompt = IDS[:, :58]  # the switch (65 tokens) falls inside the 12 generated ones
        options = {**_GENERATE, "max_new_tokens": 12, "min_new_tokens": 12}
        theirs = native.generate(prompt, **options)
        ours = model.generate(prompt, **options)
        assert torch.equal(ours.sequences, theirs.sequences)
        for mine, reference in zip(ours.scores, theirs.scores, strict=True):
            assert torch.equal(mine, reference)
