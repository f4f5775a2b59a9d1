"""``yarn_rope.patch`` on every supported transformers release (CI runs this file on 5.x and 4.x).

Written against the config conventions of both lines: transformers 5 takes ``rope_parameters``
(with ``rope_theta`` inside), 4.x takes ``rope_scaling`` and a top-level ``rope_theta``. The
reference figures are ``tests/data/yarn_reference.json`` (the authors' code, jquesnelle/yarn
commit 995db5b).

transformers 4.45-4.50 build YaRN's ramp from ``max_position_embeddings`` instead of the
original context length, so their own YaRN differs from the reference for every config that
extends the context; the patch gives the reference numbers there too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version

import yarn_rope
from yarn_rope import RotaryEmbedding

VERSION = Version(transformers.__version__)
IS_V5 = VERSION.major >= 5
# Releases whose own YaRN ramp is built from max_position_embeddings (not the original length).
RAMP_FROM_MAX = Version("4.45") <= VERSION < Version("4.51")

REFERENCE = json.loads((Path(__file__).parent / "data" / "yarn_reference.json").read_text())
CASES = {case["name"]: case for case in REFERENCE["cases"]}


@pytest.fixture(autouse=True)
def quiet():
    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(previous)


def rope_kwargs(theta: float, scaling: dict | None) -> dict:
    """Config keyword arguments for RoPE settings, in the dialect of the installed transformers."""
    if IS_V5:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta} | (scaling or {})}
    return {"rope_theta": theta, "rope_scaling": scaling}


ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {"rotary_pct": 0.5} if not IS_V5 else {"partial_rotary_factor": 0.5},
    ),
}


def build(
    arch: str, *, max_positions: int = 64, scaling: dict | None = None, head_dim: int = 32, seed: int = 0
):
    config_name, model_name, extra = ARCHITECTURES[arch]
    config_class = getattr(transformers, config_name)
    model_class = getattr(transformers, model_name)
    kwargs = dict(
        vocab_size=96,
        hidden_size=2 * head_dim,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_positions,
    )
    if arch != "gpt_neox":
        kwargs["num_key_value_heads"] = 1
        kwargs["head_dim"] = head_dim  # 4.57's YaRN reads config.head_dim even when it is None
    if IS_V5 and arch == "gpt_neox":
        extra = {"rope_parameters": {"partial_rotary_factor": 0.5}}
        kwargs.update(rope_kwargs(10000.0, scaling))
        kwargs["rope_parameters"]["partial_rotary_factor"] = 0.5
    else:
        kwargs.update(rope_kwargs(10000.0, scaling))
        kwargs.update(extra)
    torch.manual_seed(seed)
    return model_class(config_class(**kwargs)).eval()


def logits(model, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, position_ids=positions).logits


def inserted(model) -> list[RotaryEmbedding]:
    return [m for m in model.modules() if isinstance(m, RotaryEmbedding)]


IDS = torch.randint(0, 96, (1, 48), generator=torch.Generator().manual_seed(1))
POSITIONS = torch.arange(200, 248)[None]  # beyond the original 64: scaling matters


class TestReferenceTables:
    def test_llama2_70b_32k_table(self):
        case = CASES["llama2-70b-32k"]
        model = build("llama", max_positions=4096, head_dim=128)
        yarn_rope.patch(model, factor=8.0, original_max_position_embeddings=4096)
        modules = inserted(model)
        assert modules, "no rotary module was replaced"
        for module in modules:
            assert torch.equal(module.inv_freq, torch.tensor(case["inv_freq"]))
            assert module.attention_scaling == pytest.approx(case["mscale"], rel=1e-12)

    def test_transformers_own_yarn_side_by_side(self):
        """transformers' native YaRN vs the reference and ours, for the Yarn-Llama-2-70b-32k config."""
        case = CASES["llama2-70b-32k"]
        reference = torch.tensor(case["inv_freq"])
        scaling = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096}
        native = build("llama", max_positions=32768, head_dim=128, scaling=scaling)
        theirs = native.model.rotary_emb.inv_freq
        ours = build("llama", max_positions=4096, head_dim=128)
        yarn_rope.patch(ours, factor=8.0, original_max_position_embeddings=4096)
        assert torch.equal(ours.model.rotary_emb.inv_freq, reference)
        relative = ((theirs - reference).abs() / reference).max().item()
        if RAMP_FROM_MAX:
            # Their ramp comes from max_position_embeddings=32768: a visibly different table.
            assert relative > 0.5, f"transformers {VERSION}: largest relative difference {relative}"
        else:
            assert torch.equal(theirs, reference), f"transformers {VERSION}: {relative}"


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
class TestEveryArchitecture:
    def test_partial_rotary_dim_read_from_model(self, arch):
        model = build(arch)
        yarn_rope.patch(model, factor=4.0, original_max_position_embeddings=64)
        for module in inserted(model):
            assert module.dim == (16 if arch == "gpt_neox" else 32)

    def test_reverses_bit_exactly(self, arch):
        model = build(arch)
        before = logits(model, IDS, POSITIONS)
        originals = {name: module for name, module in model.named_modules() if "rotary" in name}
        keys = list(model.state_dict())
        parameters = sum(p.numel() for p in model.parameters())
        yarn_rope.patch(model, factor=4.0, original_max_position_embeddings=64)
        assert not torch.equal(logits(model, IDS, POSITIONS), before)
        assert list(model.state_dict()) == keys
        yarn_rope.unpatch(model)
        assert torch.equal(logits(model, IDS, POSITIONS), before)
        assert all(dict(model.named_modules())[name] is module for name, module in originals.items())
        assert list(model.state_dict()) == keys
        assert sum(p.numel() for p in model.parameters()) == parameters
        assert not hasattr(model, "_yarn_rope_patch")

    @pytest.mark.skipif(
        RAMP_FROM_MAX, reason="this transformers builds YaRN's ramp from max_position_embeddings"
    )
    def test_equals_native_yarn(self, arch):
        scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
        native = build(arch, max_positions=256, scaling=scaling)
        model = build(arch)
        model.load_state_dict(native.state_dict())
        yarn_rope.patch(model, factor=4.0, original_max_position_embeddings=64, angles="fp32")
        assert torch.equal(logits(model, IDS, POSITIONS), logits(native, IDS, POSITIONS))

    def test_save_and_reload(self, arch, tmp_path):
        model = build(arch)
        yarn_rope.patch(model, factor=4.0, original_max_position_embeddings=64, angles="fp32")
        model.save_pretrained(tmp_path)
        saved = json.loads((tmp_path / "config.json").read_text())
        assert yarn_rope.RopeScaling.from_hf(saved) == yarn_rope.patch_info(model).scaling
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        if RAMP_FROM_MAX:
            # Vanilla 4.45-4.50 misread the (correct) saved config; patching after loading fixes it.
            yarn_rope.patch(reloaded, angles="fp32")
        assert torch.equal(logits(reloaded, IDS, POSITIONS), logits(model, IDS, POSITIONS))

    def test_non_vanilla_settings_are_refused_by_vanilla(self, arch, tmp_path):
        if arch == "mistral" and VERSION < Version("4.46"):
            pytest.skip("Mistral on transformers 4.45 ignores rope_scaling altogether")
        model = build(arch)
        yarn_rope.patch(model, method="dynamic-yarn", original_max_position_embeddings=64)
        model.save_pretrained(tmp_path)
        saved = json.loads((tmp_path / "config.json").read_text())
        rope = saved.get("rope_parameters") or saved.get("rope_scaling")
        assert rope["rope_type"] == "yarn_rope.dynamic-yarn"
        assert yarn_rope.RopeScaling.from_hf(saved) == yarn_rope.patch_info(model).scaling
        with pytest.raises((KeyError, ValueError)):
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path)

    def test_generate(self, arch):
        model = build(arch)
        yarn_rope.patch(model, factor=4.0, original_max_position_embeddings=64)
        out = model.generate(IDS[:, :8], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 14)


@pytest.mark.slow
class TestCompile:
    @pytest.mark.parametrize("angles", ["precise", "fp32"])
    def test_static_patch_adds_no_graph_break(self, angles):
        model = build("llama")

        def breaks() -> int:
            torch._dynamo.reset()
            explained = torch._dynamo.explain(lambda ids: model(input_ids=ids).logits)(IDS)
            return explained.graph_break_count

        vanilla = breaks()
        yarn_rope.patch(model, factor=4.0, original_max_position_embeddings=64, angles=angles)
        assert breaks() == vanilla


class TestAttentionImplementations:
    @pytest.mark.parametrize("attention", ["eager", "sdpa"])
    def test_patch_is_independent_of_the_attention_kernel(self, attention):
        def build_with(scaling: dict | None, max_positions: int):
            model = build("llama", max_positions=max_positions, scaling=scaling)
            config = model.config
            torch.manual_seed(0)
            return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()

        scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
        native = build_with(scaling, 256)
        model = build_with(None, 64)
        model.load_state_dict(native.state_dict())
        yarn_rope.patch(model, factor=4.0, original_max_position_embeddings=64, angles="fp32")
        ours = logits(model, IDS, POSITIONS)
        if not RAMP_FROM_MAX:
            assert torch.equal(ours, logits(native, IDS, POSITIONS))
        if hasattr(model, "set_attn_implementation"):  # switching the kernel of a live model
            model.set_attn_implementation("sdpa" if attention == "eager" else "eager")
            torch.testing.assert_close(logits(model, IDS, POSITIONS), ours, atol=1e-5, rtol=1e-5)
