"""The README's guarantees, one class of bad input (or unusual model) at a time.

Each class was found by trying the library as a new user and an adversary would (issue 11); each
test says what the input gets: a clear error naming the field or file and the fix, or the exact
model vanilla transformers builds, never a silent different model or a half-changed one.
"""

from __future__ import annotations

import copy
import importlib.machinery
import importlib.util
import json
import logging
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import yarn_rope
import yarn_rope.cli
from yarn_rope import RopeScaling, patch, patch_info, unpatch
from yarn_rope.patch import UnsupportedModelError

pytestmark = pytest.mark.usefixtures("quiet_transformers")

VOCAB = 64
ORIGINAL = 128


def tiny_llama_config(**overrides: Any) -> transformers.LlamaConfig:
    fields = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": ORIGINAL,
        "initializer_range": 0.2,
        **overrides,
    }
    return transformers.LlamaConfig(**fields)


def ids(length: int = 300) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits(model: Any, tokens: torch.Tensor | None = None) -> torch.Tensor:
    out = model(ids() if tokens is None else tokens)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def save_checkpoint(folder: Path, config: dict[str, Any]) -> Path:
    """A tiny plain Llama checkpoint whose config.json is then replaced by ``config`` (merged)."""
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    raw.update(config)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


# ------------------------------------------------------------------------------------------------
# The model card's own call
# ------------------------------------------------------------------------------------------------


def _nous_70b_lookalike(folder: Path) -> Path:
    return save_checkpoint(
        folder,
        {
            "rope_scaling": {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIGINAL,
                             "finetuned": True},
            "max_position_embeddings": 8 * ORIGINAL,
            "auto_map": {"AutoModelForCausalLM": "modeling_llama_yarn.LlamaForCausalLM"},
            "torch_dtype": "bfloat16",
        },
    )  # fmt: skip


def _model_card_call(folder: Path) -> Any:
    """Yarn-Llama-2-70b-32k's model card, verbatim but for the function and the name."""
    return yarn_rope.from_pretrained(
        folder,
        use_flash_attention_2=True,
        torch_dtype=torch.bfloat16,
        device_map="auto",
        trust_remote_code=True,
    )


def _fake_flash_attn(monkeypatch: pytest.MonkeyPatch, present: bool) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "flash_attn":
            return importlib.machinery.ModuleSpec("flash_attn", None) if present else None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(yarn_rope.loading.hardware.importlib.util, "find_spec", find_spec)


class TestModelCardCall:
    def test_without_flash_attn_names_the_extra(self, tmp_path, monkeypatch):
        _fake_flash_attn(monkeypatch, present=False)
        with pytest.raises(ImportError) as info:
            _model_card_call(_nous_70b_lookalike(tmp_path))
        assert "flash-attn" in str(info.value) and "pip install 'yarn-rope[flash]'" in str(info.value)

    def test_without_cuda_says_so(self, tmp_path, monkeypatch):
        _fake_flash_attn(monkeypatch, present=True)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            _model_card_call(_nous_70b_lookalike(tmp_path))

    def test_the_rest_of_the_call_loads_on_this_machine(self, tmp_path, caplog):
        """The same call with use_flash_attention_2=False: everything but flash-attention."""
        folder = _nous_70b_lookalike(tmp_path)
        caplog.set_level(logging.WARNING, logger="yarn_rope")
        model = yarn_rope.from_pretrained(
            folder, use_flash_attention_2=False, torch_dtype=torch.bfloat16, device_map="auto",
            trust_remote_code=True,
        )  # fmt: skip
        assert model.dtype == torch.bfloat16
        assert model.config._attn_implementation != "flash_attention_2"
        scaling = patch_info(model).scaling
        assert (scaling.method, scaling.factor, scaling.original_max_position_embeddings) == (
            "yarn",
            8.0,
            ORIGINAL,
        )
        assert any("trust_remote_code=True is ignored" in r.getMessage() for r in caplog.records)

    @pytest.mark.parametrize(
        ("kwargs", "error", "needle"),
        [
            ({"dtype": "float32", "torch_dtype": torch.bfloat16}, ValueError, "torch_dtype is the old name"),
            ({"use_flash_attention_2": "yes"}, TypeError, "use_flash_attention_2"),
            ({"use_flash_attention_2": True, "attn_implementation": "sdpa"}, ValueError, "give one of them"),
            ({"use_flash_attention_2": False, "attn_implementation": "flash_attention_2"}, ValueError,
             "contradicts use_flash_attention_2=False"),
        ],
    )  # fmt: skip
    def test_contradictory_keywords(self, tmp_path, kwargs, error, needle):
        with pytest.raises(error, match=needle):
            yarn_rope.from_pretrained(_nous_70b_lookalike(tmp_path), **kwargs)

    def test_torch_dtype_alone_is_dtype(self, tmp_path):
        model = yarn_rope.from_pretrained(_nous_70b_lookalike(tmp_path), torch_dtype=torch.bfloat16)
        assert model.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# 1. A bare backbone
# ------------------------------------------------------------------------------------------------


class TestBareBackbone:
    def test_patch_a_bare_llama_model(self):
        torch.manual_seed(0)
        backbone = transformers.LlamaModel(tiny_llama_config()).eval()
        plain = logits(backbone)
        patch(backbone, factor=4.0, original_max_position_embeddings=ORIGINAL, angles="fp32")
        assert patch_info(backbone).modules == ("rotary_emb",)
        config = tiny_llama_config(
            max_position_embeddings=4 * ORIGINAL,
            rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                             "rope_theta": 10000.0},
        )  # fmt: skip
        native = transformers.LlamaModel(config).eval()
        native.load_state_dict(backbone.state_dict())
        assert torch.equal(logits(backbone), logits(native))
        unpatch(backbone)
        assert torch.equal(logits(backbone), plain)

    def test_a_rotary_module_alone_is_refused(self):
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        module = LlamaRotaryEmbedding(tiny_llama_config())
        module.config = tiny_llama_config()
        with pytest.raises(UnsupportedModelError, match="is itself a rotary module"):
            patch(module, factor=4.0)


# ------------------------------------------------------------------------------------------------
# 2. Both rope_parameters and rope_scaling in one config
# ------------------------------------------------------------------------------------------------

_BOTH = {
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "max_position_embeddings": 4 * ORIGINAL,
}


class TestBothRopeKeys:
    def test_read_as_transformers_reads_it(self):
        reference = transformers.LlamaConfig.from_dict(copy.deepcopy(_BOTH))
        assert reference.rope_parameters["rope_type"] == "yarn"  # transformers 5: rope_scaling wins
        assert RopeScaling.from_hf(_BOTH) == RopeScaling.from_hf(reference)
        assert RopeScaling.from_hf(_BOTH).method == "yarn"

    def test_from_pretrained_gives_vanilla_logits(self, tmp_path):
        folder = save_checkpoint(tmp_path, _BOTH)
        ours = yarn_rope.from_pretrained(folder, angles="fp32")
        vanilla = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        assert vanilla.config.rope_parameters["rope_type"] == "yarn"
        assert torch.equal(logits(ours), logits(vanilla))

    def test_disagreement_is_logged(self, caplog):
        caplog.set_level(logging.WARNING, logger="yarn_rope.config")
        RopeScaling.from_hf(_BOTH)
        assert any("both rope_scaling" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------
# 3. Broken safetensors files
# ------------------------------------------------------------------------------------------------


def _write_header(path: Path, header: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header)


class TestBrokenSafetensors:
    def _folder(self, tmp_path: Path) -> Path:
        folder = save_checkpoint(tmp_path / "checkpoint", {})
        return folder

    def test_git_lfs_pointer(self, tmp_path):
        folder = self._folder(tmp_path)
        (folder / "model.safetensors").write_text(
            "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123456789\n"
        )
        with pytest.raises(ValueError) as info:
            yarn_rope.plan_load(folder)
        message = str(info.value)
        assert "model.safetensors" in message and "git lfs pull" in message

    @pytest.mark.parametrize(
        "header",
        [
            json.dumps({"w": {"dtype": "F32", "data_offsets": [0, 4]}}).encode(),  # no shape
            b"{this is not json",
            json.dumps(
                {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4000]}}
            ).encode(),  # truncated
        ],
        ids=["no-shape", "not-json", "truncated"],
    )
    def test_corrupt_header_names_the_file(self, tmp_path, header):
        folder = self._folder(tmp_path)
        _write_header(folder / "model.safetensors", header)
        with pytest.raises(ValueError) as info:
            yarn_rope.plan_load(folder)
        assert str(folder / "model.safetensors") in str(info.value)
        assert "not a valid safetensors file" in str(info.value)


# ------------------------------------------------------------------------------------------------
# 4. A truncated GGUF file
# ------------------------------------------------------------------------------------------------


class TestTruncatedGGUF:
    @pytest.fixture
    def truncated(self, tmp_path: Path) -> Path:
        gguf = pytest.importorskip("gguf")
        path = tmp_path / "tiny.gguf"
        writer = gguf.GGUFWriter(str(path), arch="llama")
        writer.add_context_length(4096)
        writer.add_tensor("token_embd.weight", torch.zeros(64, 8).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path

    def test_library(self, truncated):
        with pytest.raises(ValueError) as info:
            yarn_rope.gguf.read_metadata(truncated)
        assert str(truncated) in str(info.value) and "truncated or corrupt" in str(info.value)
        with pytest.raises(ValueError, match="truncated or corrupt"):
            yarn_rope.plan_load(truncated.parent, gguf_file=truncated.name)

    def test_inspect_command(self, truncated, capsys):
        code = yarn_rope.cli.main(["inspect", str(truncated.parent), "--gguf-file", truncated.name])
        captured = capsys.readouterr()
        assert code == 2
        assert "truncated or corrupt" in captured.err and "Traceback" not in captured.err
        assert len(captured.err.strip().splitlines()) == 1

    def test_not_a_gguf_file(self, tmp_path):
        path = tmp_path / "model.gguf"
        path.write_text("version https://git-lfs.github.com/spec/v1\n")
        with pytest.raises(ValueError, match="git lfs pull"):
            yarn_rope.gguf.read_metadata(path)


# ------------------------------------------------------------------------------------------------
# 5-6. Scaling dicts of the wrong kind, a factor on plain RoPE
# ------------------------------------------------------------------------------------------------


class TestScalingDicts:
    @pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
    @pytest.mark.parametrize("value", ["yarn", 4.0, ["yarn"]])
    def test_a_non_dict_scaling_is_an_error(self, key, value):
        with pytest.raises(TypeError) as info:
            RopeScaling.from_hf({"max_position_embeddings": 4096, key: value})
        assert key in str(info.value) and repr(value) in str(info.value)

    def test_the_loader_names_the_file(self, tmp_path):
        folder = save_checkpoint(tmp_path, {"rope_scaling": "yarn"})
        with pytest.raises(TypeError) as info:
            yarn_rope.plan_load(folder)
        assert str(folder / "config.json") in str(info.value) and "rope_scaling" in str(info.value)

    def test_a_factor_on_plain_rope_is_not_dropped_silently(self, caplog):
        caplog.set_level(logging.WARNING, logger="yarn_rope.config")
        scaling = RopeScaling.from_hf({"rope_type": "default", "factor": 8})
        assert scaling.method == "none"  # what vanilla transformers computes too
        assert any("ignores factor=8" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------
# 9. Token ids outside the vocabulary
# ------------------------------------------------------------------------------------------------


class TestTokenIds:
    @pytest.mark.parametrize("bad", [VOCAB, VOCAB + 100, -1])
    def test_named_with_the_vocabulary_size(self, bad):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(tiny_llama_config()).eval()
        tokens = torch.arange(40) % VOCAB
        tokens[17] = bad
        with pytest.raises(ValueError) as info:
            yarn_rope.eval.perplexity(model, tokens, lengths=[32], progress=False)
        message = str(info.value)
        assert str(bad) in message and str(VOCAB) in message and "position 17" in message


# ------------------------------------------------------------------------------------------------
# 10. Dynamic NTK in the fp32 mode against vanilla transformers: the exact difference
# ------------------------------------------------------------------------------------------------


class TestDynamicNtkAgainstTransformers:
    """transformers forms the grown NTK base in float32 (a tensor expression of the sequence
    length), the authors' code and yarn_rope in float64. Within the original length both are plain
    RoPE, bit for bit; beyond it the tables differ by at most 1 ulp (float32), as the README says."""

    @pytest.mark.parametrize("seq_len", [ORIGINAL, ORIGINAL + 1, 3 * ORIGINAL, 1000])
    def test_at_most_one_ulp(self, seq_len):
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        config = tiny_llama_config(
            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
        )
        theirs, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, None, seq_len=torch.tensor(seq_len))
        ours, _ = RopeScaling(
            method="dynamic-ntk", factor=2.0, original_max_position_embeddings=ORIGINAL
        ).inv_freq(16, base=10000.0, seq_len=seq_len)
        ulps = ((ours.view(torch.int32) - theirs.view(torch.int32)).abs()).max().item()
        if seq_len <= ORIGINAL:
            assert ulps == 0
        else:
            assert ulps <= 1


# ------------------------------------------------------------------------------------------------
# 11. Dynamic YaRN with a target context
# ------------------------------------------------------------------------------------------------


class TestDynamicYarnTarget:
    def test_scales_from_the_original_length(self):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(tiny_llama_config()).eval()
        patch(model, method="dynamic-yarn", max_position_embeddings=8 * ORIGINAL)
        rotary = model.model.rotary_emb
        logits(model, ids(2 * ORIGINAL))  # a 2x sequence: factor 2 (not plain RoPE up to 8x)
        expected = yarn_rope.yarn_inv_freq(
            16, base=10000.0, factor=2.0, original_max_position_embeddings=ORIGINAL
        )
        assert torch.equal(rotary.inv_freq, expected)
        assert rotary.attention_scaling == pytest.approx(0.1 * math.log(2.0) + 1)


# ------------------------------------------------------------------------------------------------
# 12. MLA attention (DeepSeek-V3): the softmax scale follows the patch
# ------------------------------------------------------------------------------------------------


def _deepseek(rope: dict[str, Any]) -> Any:
    config = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=16,
        qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1,
        first_k_dense_replace=1, max_position_embeddings=4 * ORIGINAL, rope_parameters=rope, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.DeepseekV3ForCausalLM(config).eval()


_DEEPSEEK_YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": ORIGINAL,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
    "rope_theta": 10000.0,
}


class TestDeepSeekMLA:
    def test_new_settings_equal_vanilla_transformers_and_revert(self):
        model = _deepseek(_DEEPSEEK_YARN)
        before = logits(model)
        scales = [module.scaling for module in model.modules() if hasattr(module, "qk_head_dim")]
        vanilla = _deepseek(_DEEPSEEK_YARN | {"factor": 8.0})
        vanilla.load_state_dict(model.state_dict())
        patch(model, factor=8.0, angles="fp32")
        assert torch.equal(logits(model), logits(vanilla))
        unpatch(model)
        assert [module.scaling for module in model.modules() if hasattr(module, "qk_head_dim")] == scales
        assert torch.equal(logits(model), before)

    def test_declared_settings_keep_the_scale(self):
        model = _deepseek(_DEEPSEEK_YARN)
        before = logits(model)
        patch(model, angles="fp32")
        assert torch.equal(logits(model), before)

    def test_dynamic_method_with_mscale_all_dim_is_refused_atomically(self):
        model = _deepseek(_DEEPSEEK_YARN)
        before = logits(model)
        with pytest.raises(UnsupportedModelError, match="softmax scale"):
            patch(model, method="dynamic-yarn", original_max_position_embeddings=ORIGINAL,
                  mscale_all_dim=0.707, mscale=0.707, replace=True)  # fmt: skip
        assert patch_info(model) is None
        assert torch.equal(logits(model), before)


# ------------------------------------------------------------------------------------------------
# 8 (library side). A checkpoint folder without weights
# ------------------------------------------------------------------------------------------------


def test_a_folder_with_a_config_but_no_weights(tmp_path):
    folder = save_checkpoint(tmp_path, {})
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    yarn_rope.plan_load(folder)  # the plan (yarn-rope inspect, export) needs only the config
    with pytest.raises(FileNotFoundError) as info:
        yarn_rope.from_pretrained(folder)
    assert str(folder) in str(info.value) and "no weights" in str(info.value)
