"""yarn_rope.export against each engine's documented reading of the settings it emits.

vLLM and SGLang cannot run here, so each engine's reading is transcribed below from the source of
the release named (the files are cited at each function): which keys its ``get_rope`` passes on,
how it computes the cos/sin multiplier, and which context length it allows. The export must make
the engine compute yarn_rope's own table and attention scaling (``RopeScaling.inv_freq``, checked
bit-equal to the authors' code in test_frequencies.py), for every method the registry marks
expressible, for every NousResearch checkpoint family in the loader's table (config-only
look-alikes), and for a Qwen2.5-style config (factor 4, original 32768 == max_position_embeddings).
llama.cpp's reading is proved against the real engine in test_llamacpp.py; its flag spelling is
checked here against common/arg.cpp.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import yarn_rope
from yarn_rope import methods as M
from yarn_rope.cli import main
from yarn_rope.export import TARGETS, export, export_targets, source_settings

DIM = 128
BASE = 10000.0

# ------------------------------------------------------------------------------------------------
# The engines' readings, transcribed from their sources
# ------------------------------------------------------------------------------------------------


def _ramp_table(
    rope: dict[str, Any], dim: int, base: float, *, extrapolation: float, truncate: bool
) -> torch.Tensor:
    """YaRN's table as vLLM's and SGLang's ``_compute_inv_freq`` write it (float32, torch)."""
    factor = float(rope["factor"])
    original = int(rope["original_max_position_embeddings"])

    def correction(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction(rope.get("beta_fast", 32)), correction(rope.get("beta_slow", 1))
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float) - low) / (high - low), 0, 1)
    mask = (1 - ramp) * extrapolation
    return (1.0 / (factor * pos_freqs)) * (1 - mask) + (1.0 / pos_freqs) * mask


def _get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def vllm_rope(hf_overrides: dict[str, Any], dim: int) -> tuple[torch.Tensor, float]:
    """vLLM 0.33.0: model_executor/layers/rotary_embedding/__init__.py get_rope + its classes.

    hf_overrides dict values replace the config attribute whole (config/model.py,
    _apply_dict_overrides), so the base comes from this dict (``rope_theta``, default 10000).
    """
    rope = hf_overrides["rope_parameters"]
    base = rope.get("rope_theta", 10000)
    rotary = int(dim * rope.get("partial_rotary_factor", 1.0))
    kind = rope.get("rope_type", "default")
    plain = 1.0 / (base ** (torch.arange(0, rotary, 2, dtype=torch.float) / rotary))
    if kind == "default":
        return plain, 1.0
    if kind == "linear":  # linear_scaling_rope.py divides the positions: the same angles
        return plain / rope["factor"], 1.0
    if kind == "yarn":
        # yarn_scaling_rope.py: beta_fast, beta_slow, mscale, mscale_all_dim, attention_factor, truncate.
        table = _ramp_table(rope, rotary, base, extrapolation=1.0, truncate=rope.get("truncate", True))
        factor = rope["factor"]
        if rope.get("attention_factor") is not None:
            scale = float(rope["attention_factor"])
        elif rope.get("mscale") and rope.get("mscale_all_dim"):
            scale = _get_mscale(factor, rope["mscale"]) / _get_mscale(factor, rope["mscale_all_dim"])
        else:
            scale = _get_mscale(factor)
        return table, scale
    if kind == "llama3":
        return yarn_rope.llama3_inv_freq(
            rotary,
            base=base,
            factor=rope["factor"],
            original_max_position_embeddings=rope["original_max_position_embeddings"],
            low_freq_factor=rope["low_freq_factor"],
            high_freq_factor=rope["high_freq_factor"],
        ), 1.0
    if kind == "longrope":  # phi3_long_rope_scaled_rope.py, with use_long_rope: the long factors
        factors = torch.tensor(rope["long_factor"], dtype=torch.float32)
        return 1.0 / (factors * base ** (torch.arange(0, rotary, 2, dtype=torch.float) / rotary)), rope[
            "long_mscale"
        ]
    raise AssertionError(f"vLLM 0.33.0 reading of {kind} not transcribed")


def vllm_legacy_yarn_scale(rope: dict[str, Any]) -> float:
    """vLLM releases before #46280/#48351 (e.g. 0.25): ``yarn_get_mscale(factor) * attn_factor``."""
    return _get_mscale(rope["factor"]) * rope.get("attn_factor", 1.0)


def vllm_max_model_len(config_max: int, hf_overrides: dict[str, Any], max_model_len: int) -> int:
    """vLLM 0.33.0 config/model.py _get_and_verify_max_len: raises above the derived length."""
    derived = hf_overrides.get("max_position_embeddings", config_max)
    rope = hf_overrides["rope_parameters"]
    if rope["rope_type"] not in (
        "su",
        "longrope",
        "llama3",
        "yarn",
        "deepseek_yarn",
        "deepseek_llama_scaling",
    ):
        derived *= rope.get("factor", 1.0)
    if max_model_len > derived:
        raise ValueError(f"max_model_len {max_model_len} > derived {derived}")
    return max_model_len


def sglang_rope(
    declared: dict[str, Any] | None, overrides: dict[str, Any], dim: int
) -> tuple[torch.Tensor, float]:
    """SGLang 0.5.23: srt/layers/rotary_embedding/factory.py get_rope and yarn.py.

    json_model_override_args merges a rope_parameters dict into the config's
    (srt/utils/hf_transformers/config.py); the llama model reads rope_theta from that dict.
    """
    rope = {**(declared or {}), **overrides["rope_parameters"]}
    base = rope.get("rope_theta", 10000)
    kind = rope.get("rope_type") or rope.get("type")
    plain = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    if kind == "default":
        return plain, 1.0
    if kind == "linear":
        return plain / rope["factor"], 1.0
    if kind == "yarn":
        # extrapolation_factor, attn_factor, beta_fast, beta_slow, mscale, mscale_all_dim, truncate;
        # no attention_factor.
        table = _ramp_table(
            rope,
            dim,
            base,
            extrapolation=rope.get("extrapolation_factor", 1),
            truncate=rope.get("truncate", True),
        )
        factor = rope["factor"]
        if rope.get("mscale") is not None and rope.get("mscale_all_dim") is not None:
            scale = _get_mscale(factor, rope["mscale"]) / _get_mscale(factor, rope["mscale_all_dim"])
        else:
            scale = _get_mscale(factor)
        return table, scale * rope.get("attn_factor", 1)
    if kind == "llama3":
        return vllm_rope({"rope_parameters": rope}, dim)
    raise AssertionError(f"SGLang 0.5.23 reading of {kind} not transcribed")


def sglang_context(
    config_max: int, overrides: dict[str, Any], declared: dict[str, Any] | None, context: int
) -> int:
    """SGLang 0.5.23 get_context_length + ModelConfig._derive_context_length (raises above it)."""
    rope = {**(declared or {}), **overrides["rope_parameters"]}
    factor = rope.get("factor", 1)
    if "original_max_position_embeddings" in rope or rope.get("rope_type") == "llama3":
        factor = 1
    derived = int(factor * overrides.get("max_position_embeddings", config_max))
    if context > derived:
        raise ValueError(f"context_length {context} > derived {derived}")
    return context


def llamacpp_attention(python: dict[str, Any], file_attn_factor: float = 1.0) -> float:
    """llama.cpp 0c1e57098 src/llama-context.cpp: the cos/sin multiplier under YaRN (llama arch).

    ``yarn_attn_factor`` is overwritten by ``get_mscale(factor)`` (then cancelled against ggml's own
    ``1 + 0.1 ln s``) and the GGUF ``rope.scaling.attn_factor`` multiplies the result.
    """
    factor = 1.0 / python["rope_freq_scale"]
    attn = next(iter(python.get("kv_overrides", {}).values()), file_attn_factor)
    return _get_mscale(factor) * attn


def llamacpp_rope(python: dict[str, Any], dim: int, base: float) -> tuple[torch.Tensor, float]:
    """llama.cpp 0c1e57098 from llama_cpp.Llama keywords: ggml-cpu/ops.cpp rope_yarn and
    ggml.c ggml_rope_yarn_corr_dims (floor/ceil always), llama-context.cpp for the attention."""
    kind = python.get("rope_scaling_type", 0)
    base = python.get("rope_freq_base", base)
    freq_scale = python.get("rope_freq_scale", 1.0) if kind != 0 else 1.0
    extrap = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    if kind != 2:  # none / linear: ext_factor 0, theta_interp, scale = attn_factor
        return extrap * freq_scale, 1.0
    rope = {
        "factor": 1.0 / freq_scale,
        "original_max_position_embeddings": python["yarn_orig_ctx"],
        "beta_fast": python.get("yarn_beta_fast", 32.0),
        "beta_slow": python.get("yarn_beta_slow", 1.0),
    }
    table = _ramp_table(rope, dim, base, extrapolation=python.get("yarn_ext_factor", 1.0), truncate=True)
    return table, llamacpp_attention(python)


def assert_same(table: torch.Tensor, scale: float, scaling: yarn_rope.RopeScaling, dim: int = DIM) -> None:
    wanted, wanted_scale = scaling.inv_freq(dim, base=BASE)
    torch.testing.assert_close(table, wanted, rtol=2e-7, atol=0)
    assert scale == pytest.approx(wanted_scale, rel=1e-12)


# ------------------------------------------------------------------------------------------------
# Every method the registry marks expressible, per engine
# ------------------------------------------------------------------------------------------------

EXAMPLES: dict[str, dict[str, Any]] = {
    "none": {"method": "none"},
    "linear": {"method": "linear", "factor": 4.0},
    "ntk": {"method": "ntk", "factor": 4.0},
    "yarn": {"method": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096},
    "yarn-mistral": {
        "method": "yarn",
        "factor": 16.0,
        "original_max_position_embeddings": 8192,
        "beta_fast": 128.0,
        "beta_slow": 2.0,
        "mscale_coefficient": 0.07,
    },
    "yarn-attention-factor": {
        "method": "yarn",
        "factor": 64.0,
        "original_max_position_embeddings": 4096,
        "attention_factor": 1.0,
    },
    "yarn-deepseek": {
        "method": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32.0,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
    },
    "llama3": {
        "method": "llama3",
        "factor": 8.0,
        "original_max_position_embeddings": 8192,
        "max_position_embeddings": 131072,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    },
}

# What each engine release computes exactly, read from its source (see the module docstring).
EXACT = {
    "vllm": {"none", "linear", "ntk", "yarn", "llama3"},
    "sglang": {"none", "linear", "ntk", "yarn", "llama3"},
    "llama.cpp": {"none", "linear", "ntk", "yarn", "llama3"},  # llama3: the converted file's rope_freqs
}


@pytest.mark.parametrize("engine", ["vllm", "sglang", "llama.cpp"])
def test_registry_marks_what_each_engine_computes(engine):
    for spec in M.registered():
        spelling = spec.engines[engine]
        settings = M.validate(spec.name, _example_settings(spec.name))
        assert (spelling.loses(settings) is None) == (spec.name in EXACT[engine]), spec.name
        if spec.name in EXACT[engine]:
            assert spelling.write is not None, spec.name


def _example_settings(method: str) -> dict[str, Any]:
    if method in ("none", "linear", "ntk", "yarn", "llama3"):
        fields = dict(EXAMPLES[method])
        fields.pop("method")
        return fields
    return {
        "ntk-by-parts": {"factor": 4.0, "original_max_position_embeddings": 4096},
        "dynamic-ntk": {"factor": 2.0, "original_max_position_embeddings": 4096},
        "dynamic-yarn": {"original_max_position_embeddings": 4096},
        "longrope": {
            "original_max_position_embeddings": 4096,
            "max_position_embeddings": 131072,
            "short_factor": [1.0] * (DIM // 2),
            "long_factor": [float(i + 1) for i in range(DIM // 2)],
        },
    }[method]


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_vllm_reads_the_exact_table(example):
    scaling = yarn_rope.RopeScaling(**EXAMPLES[example])
    result = export(scaling, "vllm", rope_theta=BASE, rotary_dim=DIM)
    table, scale = vllm_rope(result.settings, DIM)
    assert_same(table, scale, scaling)
    assert result.python["hf_overrides"] == result.settings
    assert (
        result.command[:2] == ("vllm", "serve") and "--rope-scaling" not in result.command
    )  # removed in vLLM
    assert json.loads(result.command[result.command.index("--hf-overrides") + 1]) == result.settings


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_sglang_reads_the_exact_table(example):
    scaling = yarn_rope.RopeScaling(**EXAMPLES[example])
    result = export(scaling, "sglang", rope_theta=BASE, rotary_dim=DIM)
    table, scale = sglang_rope(None, result.settings, DIM)
    assert_same(table, scale, scaling)
    assert json.loads(result.python["json_model_override_args"]) == result.settings
    assert result.command[:3] == ("python", "-m", "sglang.launch_server")


@pytest.mark.parametrize("example", [name for name in EXAMPLES if EXAMPLES[name]["method"] != "llama3"])
def test_llamacpp_reads_the_exact_table(example):
    scaling = yarn_rope.RopeScaling(**EXAMPLES[example])
    result = export(scaling, "llama.cpp", rope_theta=BASE, rotary_dim=DIM)
    table, scale = llamacpp_rope(result.python, DIM, BASE)
    assert_same(table, scale, scaling)


def test_yarn_mistral_translations():
    """Yarn-Mistral (betas 128/2, temperature 0.07 ln s + 1), factor 16, in every engine's terms."""
    scaling = yarn_rope.RopeScaling(**EXAMPLES["yarn-mistral"])
    s = 16.0
    wanted = 0.07 * math.log(s) + 1
    ratio = wanted / (0.1 * math.log(s) + 1)
    vllm = export(scaling, "vllm", rope_theta=BASE)
    rope = vllm.settings["rope_parameters"]
    assert rope["attention_factor"] == pytest.approx(wanted, rel=1e-15)  # vLLM 0.33.0: replaces
    assert (rope["beta_fast"], rope["beta_slow"]) == (128.0, 2.0)
    # Older vLLM releases ignore attention_factor and multiply by attn_factor: the note gives it.
    note = next(n for n in vllm.notes if "attn_factor = " in n)
    stated = float(note.split("attn_factor = ")[1].split(",")[0])
    assert vllm_legacy_yarn_scale({"factor": s, "attn_factor": stated}) == pytest.approx(wanted, rel=1e-8)
    assert stated == pytest.approx(ratio, rel=1e-8)
    sglang = export(scaling, "sglang", rope_theta=BASE)
    assert sglang.settings["rope_parameters"]["attn_factor"] == pytest.approx(ratio, rel=1e-15)
    cpp = export(scaling, "llama.cpp")
    assert "--yarn-attn-factor" not in cpp.command  # overwritten whenever YaRN is on
    assert (
        cpp.command[cpp.command.index("--override-kv") + 1]
        == f"ARCH.rope.scaling.attn_factor=float:{ratio!r}"
    )
    assert llamacpp_attention(cpp.python) == pytest.approx(wanted, rel=1e-15)
    flags = dict(zip(cpp.command[3::2], cpp.command[4::2], strict=False))
    assert flags["--yarn-beta-fast"] == "128.0" and flags["--yarn-beta-slow"] == "2.0"
    assert (
        flags["--rope-scaling"] == "yarn"
        and flags["--rope-scale"] == "16.0"
        and flags["--yarn-orig-ctx"] == "8192"
    )
    assert flags["-c"] == "131072"


def test_llamacpp_flags_are_the_ones_it_parses():
    """common/arg.cpp of llama.cpp 0c1e57098 defines these flags; --rope-scale N sets freq_scale = 1/N."""
    scaling = yarn_rope.RopeScaling(
        method="yarn", factor=4.0, original_max_position_embeddings=4096, extrapolation_factor=0.5
    )
    result = export(scaling, "llama.cpp")
    known = {
        "-m",
        "-c",
        "--rope-scaling",
        "--rope-scale",
        "--rope-freq-base",
        "--yarn-orig-ctx",
        "--yarn-ext-factor",
        "--yarn-attn-factor",
        "--yarn-beta-slow",
        "--yarn-beta-fast",
        "--override-kv",
    }
    assert {arg for arg in result.command if arg.startswith("-")} <= known
    assert result.python["yarn_ext_factor"] == 0.5 and result.python["rope_freq_scale"] == 0.25
    assert result.python["rope_scaling_type"] == 2  # LLAMA_ROPE_SCALING_TYPE_YARN in include/llama.h
    plain = export(
        yarn_rope.RopeScaling(method="ntk", factor=4.0), "llama.cpp", rope_theta=BASE, rotary_dim=DIM
    )
    base = float(plain.command[plain.command.index("--rope-freq-base") + 1])
    torch.testing.assert_close(
        1.0 / base ** (torch.arange(0, DIM, 2, dtype=torch.float64) / DIM),
        yarn_rope.ntk_inv_freq(DIM, base=BASE, factor=4.0).double(),
        rtol=1e-6,
        atol=0,
    )


# ------------------------------------------------------------------------------------------------
# The checkpoint families of the loader, and Qwen2.5
# ------------------------------------------------------------------------------------------------

# name -> (model_type, factor, original, auto_map modeling module, (beta_fast, beta_slow, slope)):
# the published configs and the settings the authors' modeling files trained them with
# (jquesnelle/yarn scaled_rope/: the Llama code 32/1 and 0.1, the Mistral code 128/2 and 0.07).
FAMILIES = {
    "Yarn-Llama-2-7b-64k": ("llama", 16.0, 4096, "modeling_llama_together_yarn", (32.0, 1.0, 0.1)),
    "Yarn-Llama-2-7b-128k": ("llama", 32.0, 4096, "modeling_llama_together_yarn", (32.0, 1.0, 0.1)),
    "Yarn-Llama-2-13b-64k": ("llama", 16.0, 4096, "modeling_llama_together_yarn", (32.0, 1.0, 0.1)),
    "Yarn-Llama-2-13b-128k": ("llama", 32.0, 4096, "modeling_llama_yarn", (32.0, 1.0, 0.1)),
    "Yarn-Llama-2-70b-32k": ("llama", 8.0, 4096, "modeling_llama_yarn", (32.0, 1.0, 0.1)),
    "Yarn-Mistral-7b-64k": ("mistral", 8.0, 8192, "modeling_mistral_yarn", (128.0, 2.0, 0.07)),
    "Yarn-Mistral-7b-128k": ("mistral", 16.0, 8192, "modeling_mistral_yarn", (128.0, 2.0, 0.07)),
    "Yarn-Solar-10b-32k": ("llama", 8.0, 4096, "modeling_llama_yarn", (32.0, 1.0, 0.1)),
    "Yarn-Solar-10b-64k": ("llama", 16.0, 4096, "modeling_llama_yarn", (32.0, 1.0, 0.1)),
}


def _config_folder(root: Path, name: str, config: dict[str, Any]) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _family(root: Path, name: str) -> tuple[Path, dict[str, Any]]:
    model_type, factor, original, module, _ = FAMILIES[name]
    arch = "LlamaForCausalLM" if model_type == "llama" else "MistralForCausalLM"
    config = {
        "model_type": model_type,
        "architectures": [arch],
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "vocab_size": 32,
        "rope_theta": BASE,
        "max_position_embeddings": int(factor * original),
        "rope_scaling": {
            "type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": original,
            "finetuned": True,
        },
        "auto_map": {"AutoModelForCausalLM": f"{module}.{arch}"},
    }
    return _config_folder(root, name, config), config


@pytest.mark.parametrize("name", list(FAMILIES))
def test_nous_families_export_to_every_engine(tmp_path, name):
    folder, config = _family(tmp_path, name)
    _, factor, original, _, (fast, slow, slope) = FAMILIES[name]
    trained = yarn_rope.RopeScaling(
        method="yarn",
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=fast,
        beta_slow=slow,
        mscale_coefficient=slope,
    )
    context = int(factor * original)
    vllm = export(folder, "vllm")
    table, scale = vllm_rope(vllm.settings, DIM)
    assert_same(table, scale, trained)
    assert (
        vllm_max_model_len(config["max_position_embeddings"], vllm.settings, vllm.python["max_model_len"])
        == context
    )
    assert "max_position_embeddings" not in vllm.settings  # the config already allows it
    assert vllm.python["model"] == str(folder)
    sglang = export(folder, "sglang")
    declared = config["rope_scaling"] | {"rope_theta": BASE}
    table, scale = sglang_rope(declared, sglang.settings, DIM)
    assert_same(table, scale, trained)
    assert sglang_context(config["max_position_embeddings"], sglang.settings, declared, context) == context
    cpp = export(folder, "llama.cpp")
    assert llamacpp_attention(cpp.python) == pytest.approx(trained.attention_scaling(), rel=1e-15)
    assert (cpp.python["yarn_beta_fast"], cpp.python["yarn_beta_slow"]) == (fast, slow)
    assert cpp.python["n_ctx"] == context
    hf = export(folder, "transformers")
    assert yarn_rope.RopeScaling.from_hf(hf.settings["rope_parameters"]).attention_scaling() == pytest.approx(
        trained.attention_scaling(), rel=1e-15
    )
    for result in (vllm, sglang, cpp):
        assert result.scaling.replace(max_position_embeddings=None, finetuned=False) == trained


def test_qwen25_style_config_allows_the_extended_context(tmp_path):
    """Qwen2.5 documents YaRN factor 4 with both original_max_position_embeddings and
    max_position_embeddings 32768."""
    config = {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 5120,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "vocab_size": 32,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 32768,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    }
    folder = _config_folder(tmp_path, "Qwen2.5-14B-Instruct", config)
    scaling = yarn_rope.RopeScaling(method="yarn", factor=4.0, original_max_position_embeddings=32768)
    vllm = export(folder, "vllm")
    assert vllm.context_length == 131072 and vllm.python["max_model_len"] == 131072
    assert vllm_max_model_len(32768, vllm.settings, 131072) == 131072
    with pytest.raises(ValueError, match="derived"):  # without the override vLLM 0.33.0 refuses it
        vllm_max_model_len(32768, {"rope_parameters": vllm.settings["rope_parameters"]}, 131072)
    table, scale = vllm_rope(vllm.settings, 128)
    wanted, wanted_scale = scaling.inv_freq(128, base=1000000.0)
    torch.testing.assert_close(table, wanted, rtol=2e-7, atol=0)
    assert scale == pytest.approx(wanted_scale, rel=1e-12)
    sglang = export(folder, "sglang")
    declared = config["rope_scaling"] | {"rope_theta": 1000000.0}
    assert sglang_context(32768, sglang.settings, declared, 131072) == 131072
    cpp = export(folder, "llama.cpp")
    assert cpp.python["n_ctx"] == 131072 and cpp.python["yarn_orig_ctx"] == 32768


def test_sglang_nulls_keys_the_config_states_and_the_export_does_not(tmp_path):
    config = {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "rope_theta": BASE,
        "max_position_embeddings": 4096,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 4096,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    }
    folder = _config_folder(tmp_path, "deepseek-like", config)
    result = export(folder, "sglang", method="yarn", factor=4.0, mscale=None, mscale_all_dim=None)
    table, scale = sglang_rope(config["rope_scaling"] | {"rope_theta": BASE}, result.settings, DIM)
    assert_same(
        table, scale, yarn_rope.RopeScaling(method="yarn", factor=4.0, original_max_position_embeddings=4096)
    )


# ------------------------------------------------------------------------------------------------
# What an engine cannot compute: refused, or approximated and measured
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scaling", "engine", "match"),
    [
        (
            yarn_rope.RopeScaling(method="dynamic-yarn", original_max_position_embeddings=4096),
            "vllm",
            "dynamic YaRN",
        ),
        (
            yarn_rope.RopeScaling(method="dynamic-ntk", factor=2.0, original_max_position_embeddings=4096),
            "sglang",
            "NTK base",
        ),
        (
            yarn_rope.RopeScaling(method="ntk-by-parts", factor=4.0, original_max_position_embeddings=4096),
            "llama.cpp",
            "two-ramp",
        ),
        (
            yarn_rope.RopeScaling(
                method="yarn", factor=4.0, original_max_position_embeddings=4096, extrapolation_factor=0.5
            ),
            "vllm",
            "extrapolation_factor",
        ),
        (
            yarn_rope.RopeScaling(
                method="yarn", factor=4.0, original_max_position_embeddings=4096, truncate=False
            ),
            "llama.cpp",
            "truncate",
        ),
    ],
)
def test_inexpressible_settings_are_refused_with_what_would_be_lost(scaling, engine, match):
    with pytest.raises(ValueError, match=match) as error:
        export(scaling, engine, rope_theta=BASE, rotary_dim=DIM, context_length=16384)
    assert "--allow-approximation" in str(error.value)


def test_dynamic_yarn_approximation_is_measured():
    requested = yarn_rope.RopeScaling(method="dynamic-yarn", original_max_position_embeddings=4096)
    result = export(
        requested, "vllm", rope_theta=BASE, rotary_dim=DIM, context_length=16384, allow_approximation=True
    )
    assert result.scaling.method == "yarn" and result.scaling.factor == 4.0
    approximation = result.approximation
    assert approximation is not None and approximation.requested == requested
    # Within the original context dynamic YaRN is plain RoPE: the static table's last pairs are
    # divided by the factor (relative difference 1 - 1/s), its attention is 0.1 ln s + 1 instead of 1.
    assert approximation.table_difference == pytest.approx(1 - 1 / 4, rel=1e-6)
    assert approximation.attention_difference == pytest.approx(0.1 * math.log(4), rel=1e-9)
    assert any(note.startswith("approximated:") for note in result.notes)
    table, scale = vllm_rope(result.settings, DIM)
    assert_same(table, scale, result.scaling)


def test_finetuned_dynamic_yarn_approximation_within_its_context_is_exact_there():
    requested = yarn_rope.RopeScaling(
        method="dynamic-yarn", factor=8.0, original_max_position_embeddings=4096, finetuned=True
    )
    result = export(requested, "sglang", rope_theta=BASE, rotary_dim=DIM, allow_approximation=True)
    assert result.scaling.factor == 8.0 and result.context_length == 32768
    assert result.approximation is not None
    assert result.approximation.table_difference == 0.0 and result.approximation.attention_difference == 0.0


def test_llama3_on_llamacpp_needs_no_flag():
    """Issue 20 D3: convert_hf_to_gguf.py writes Llama 3.1's table into the file as rope_freqs, which
    llama.cpp applies (test_gguf_write.py): no flag, no YaRN stacked on top, even when approximations
    are allowed."""
    requested = yarn_rope.RopeScaling(**EXAMPLES["llama3"])
    for allow in (False, True):
        result = export(requested, "llama.cpp", rope_theta=BASE, rotary_dim=DIM, allow_approximation=allow)
        assert result.scaling == requested and result.approximation is None
        assert result.settings == {"ARCH.context_length": 131072}
        assert result.command == ("llama-server", "-m", "MODEL.gguf", "-c", "131072")
        assert set(result.python) == {"model_path", "n_ctx"}
        assert any("rope_freqs" in note for note in result.notes)


def test_longrope_serves_one_list_of_factors():
    fields = _example_settings("longrope")
    requested = yarn_rope.RopeScaling(method="longrope", **fields)
    with pytest.raises(ValueError, match="long factors"):
        export(requested, "vllm", rope_theta=BASE, rotary_dim=DIM)
    result = export(requested, "vllm", rope_theta=BASE, rotary_dim=DIM, allow_approximation=True)
    rope = result.settings["rope_parameters"]
    assert rope["short_factor"] == rope["long_factor"] == fields["long_factor"]
    table, scale = vllm_rope(result.settings, DIM)
    wanted, wanted_scale = requested.inv_freq(DIM, base=BASE, seq_len=10**5)
    torch.testing.assert_close(table, wanted, rtol=2e-7, atol=0)
    assert scale == pytest.approx(wanted_scale, rel=1e-12)
    with pytest.raises(ValueError, match="no static setting"):
        export(requested, "llama.cpp", rope_theta=BASE, rotary_dim=DIM, allow_approximation=True)


def test_vllm_needs_the_base_of_a_bare_scaling():
    with pytest.raises(ValueError, match="rope_theta"):
        export(yarn_rope.RopeScaling(**EXAMPLES["yarn"]), "vllm")
    with pytest.raises(ValueError, match="rotary dimension"):
        export(yarn_rope.RopeScaling(method="ntk", factor=2.0), "sglang", rope_theta=BASE)
    with pytest.raises(ValueError, match="unknown export target"):
        export(yarn_rope.RopeScaling(**EXAMPLES["yarn"]), "tgi")


def test_export_targets_lists_what_each_target_loses():
    checks = {check.target: check for check in export_targets(yarn_rope.RopeScaling(**EXAMPLES["llama3"]))}
    assert set(checks) == set(TARGETS)
    assert checks["vllm"].exact and checks["sglang"].exact and checks["transformers"].exact
    assert checks["llama.cpp"].exact and checks["gguf"].exact  # through the converted file's rope_freqs
    dynamic = {
        c.target: c
        for c in export_targets(
            yarn_rope.RopeScaling(method="dynamic-yarn", original_max_position_embeddings=4096)
        )
    }
    assert not any(c.exact for c in dynamic.values())
    assert "yarn_rope.from_pretrained" in (dynamic["transformers"].lost or "")


def test_transformers_target_is_what_vanilla_transformers_reads(tmp_path):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    folder, _ = _family(tmp_path, "Yarn-Mistral-7b-64k")
    result = export(folder, "transformers")
    config = LlamaConfig(hidden_size=DIM, num_attention_heads=1, **result.python)
    table, scale = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    assert_same(table, scale, result.scaling)
    assert result.command == ()


def test_patched_model_and_config_dict_sources():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=DIM,
        num_attention_heads=1,
        num_hidden_layers=1,
        intermediate_size=8,
        vocab_size=16,
        max_position_embeddings=4096,
        rope_theta=BASE,
    )
    model = LlamaForCausalLM(config)
    yarn_rope.patch(model, factor=4.0)
    result = export(model, "vllm")
    assert result.settings["rope_parameters"]["rope_theta"] == BASE
    table, scale = vllm_rope(result.settings, DIM)
    assert_same(table, scale, yarn_rope.patch_info(model).scaling)
    from_dict = export(
        {
            "model_type": "llama",
            "hidden_size": DIM,
            "num_attention_heads": 1,
            "rope_theta": BASE,
            "max_position_embeddings": 4096,
        },
        "sglang",
        factor=2.0,
    )
    assert from_dict.scaling.factor == 2.0 and from_dict.scaling.original_max_position_embeddings == 4096


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


def test_cli_export_prints_and_writes_json(tmp_path, capsys):
    folder, _ = _family(tmp_path, "Yarn-Mistral-7b-128k")
    out = tmp_path / "vllm.json"
    assert main(["export", str(folder), "--to", "vllm", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        "vLLM 0.33.0" in printed and "command:   vllm serve" in printed and "max_model_len=131072" in printed
    )
    assert "attn_factor = " in printed  # the Yarn-Mistral translation note
    data = json.loads(out.read_text())
    assert data == export(folder, "vllm").to_dict()
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--to", "gguf"], "--to gguf needs --out"),
        (["--to", "vllm", "--out", "x.gguf"], "--out writes a GGUF copy"),
        (["--to", "vllm", "--method", "yarnn"], "unknown method"),
        (["--to", "vllm", "--method", "dynamic-yarn"], "--allow-approximation"),
    ],
)
def test_cli_user_errors_are_one_line_with_status_2(tmp_path, capsys, argv, message):
    folder, _ = _family(tmp_path, "Yarn-Llama-2-7b-64k")
    assert main(["export", str(folder), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_cli_missing_source(capsys):
    assert main(["export", "/no/such/folder", "--to", "vllm"]) == 2
    assert "SOURCE /no/such/folder" in capsys.readouterr().err


def test_cli_approximation_prints_the_differences(tmp_path, capsys):
    folder, _ = _family(tmp_path, "Yarn-Llama-2-7b-64k")
    argv = ["export", str(folder), "--to", "sglang", "--method", "dynamic-yarn", "--allow-approximation"]
    # Without a context or a factor the approximation has nothing to serve (issue 24): refused.
    assert main(argv) == 2
    assert "--context-length" in capsys.readouterr().err
    assert main([*argv, "--factor", "16"]) == 0
    printed = capsys.readouterr().out
    assert "largest relative difference: frequency table" in printed


def test_inspect_lists_the_export_targets(tmp_path, capsys):
    folder, _ = _family(tmp_path, "Yarn-Mistral-7b-64k")
    assert main(["inspect", str(folder)]) == 0
    printed = capsys.readouterr().out
    for target in TARGETS:
        assert f"export {target}:" in printed
    assert "export vllm:" in printed and "exact [vLLM 0.33.0]" in printed


# ------------------------------------------------------------------------------------------------
# Issue 24: no silent-wrong export
# ------------------------------------------------------------------------------------------------


def test_dynamic_approximation_without_a_context_serves_the_factors_own_context():
    # Before: the context was the original length, so dynamic YaRN x2 was served as factor 1
    # (plain RoPE) and measured over lengths up to the original only.
    requested = yarn_rope.RopeScaling(method="dynamic-yarn", factor=2.0, original_max_position_embeddings=64)
    result = export(requested, "vllm", rope_theta=BASE, rotary_dim=DIM, allow_approximation=True)
    assert result.scaling.method == "yarn" and result.scaling.factor == 2.0
    assert result.context_length == 128
    assert result.approximation is not None and max(result.approximation.lengths) == 128
    ntk = yarn_rope.RopeScaling(method="dynamic-ntk", factor=2.0, original_max_position_embeddings=64)
    served = export(ntk, "vllm", rope_theta=BASE, rotary_dim=DIM, allow_approximation=True)
    assert served.scaling.method == "ntk" and served.scaling.factor == pytest.approx(3.0)  # s * 2 - (s - 1)


def test_dynamic_approximation_without_context_or_factor_is_refused():
    requested = yarn_rope.RopeScaling(method="dynamic-yarn", original_max_position_embeddings=64)
    with pytest.raises(ValueError, match="context-length"):
        export(requested, "vllm", rope_theta=BASE, rotary_dim=DIM, allow_approximation=True)


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
def test_a_model_without_rope_is_refused_naming_its_architecture(tmp_path, model_type):
    config = {"model_type": model_type, "n_positions": 1024, "n_embd": 64, "n_head": 2, "vocab_size": 50}
    with pytest.raises(ValueError, match=f"{model_type}.*no rotary"):
        export(config, "sglang", method="yarn", factor=2.0, original_max_position_embeddings=1024)
    folder = _config_folder(tmp_path, model_type, config)
    with pytest.raises(ValueError, match=f"{model_type}.*no rotary"):
        export(folder, "vllm", method="yarn", factor=2.0)


# ------------------------------------------------------------------------------------------------
# DeepSeek-V2 (issue 20, D1 and D2)
# ------------------------------------------------------------------------------------------------

# DeepSeek-V2-Lite's config.json, its rope settings and the sizes the export reads.
DEEPSEEK_V2 = {
    "model_type": "deepseek_v2",
    "architectures": ["DeepseekV2ForCausalLM"],
    "hidden_size": 2048,
    "num_attention_heads": 16,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "kv_lora_rank": 512,
    "rope_theta": BASE,
    "max_position_embeddings": 163840,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    },
}


def llamacpp_deepseek2_attention(file_keys: dict[str, Any], python: dict[str, Any]) -> float:
    """llama.cpp 0c1e57098 for a deepseek2 file: the loader reads ``yarn_log_multiplier`` and divides
    it by 0.1 (mscale_all_dim, [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]); llama_context multiplies cos/sin by
    get_mscale(s, mscale_all_dim) / get_mscale(s, mscale_all_dim) and by the attn_factor key (or its
    --override-kv)."""
    factor = 1.0 / python["rope_freq_scale"]
    all_dim = float(file_keys["deepseek2.rope.scaling.yarn_log_multiplier"]) / 0.1
    attn = python.get("kv_overrides", {}).get(
        "deepseek2.rope.scaling.attn_factor", file_keys.get("deepseek2.rope.scaling.attn_factor", 1.0)
    )
    return _get_mscale(factor, all_dim) / _get_mscale(factor, all_dim) * attn


def test_deepseek_v2_to_llamacpp_leaves_the_attention_factor_at_1(tmp_path):
    """D1: convert_hf_to_gguf.py writes DeepSeek-V2 as deepseek2 with yarn_log_multiplier = 0.1 *
    mscale_all_dim, from which llama.cpp derives a cos/sin multiplier of 1: no attn_factor override."""
    folder = _config_folder(tmp_path, "DeepSeek-V2-Lite", DEEPSEEK_V2)
    result = export(folder, "llama.cpp")
    assert "--override-kv" not in result.command and "kv_overrides" not in result.python
    assert result.settings["deepseek2.rope.scaling.attn_factor"] == 1.0
    converted = {"deepseek2.rope.scaling.yarn_log_multiplier": float(np.float32(0.1 * 0.707))}
    wanted = result.scaling.attention_scaling()
    assert wanted == pytest.approx(1.0, abs=1e-15)
    assert llamacpp_deepseek2_attention(converted, result.python) == pytest.approx(wanted, rel=1e-7)
    # An attention factor asked for is passed as the key, on top of llama.cpp's 1.
    scaled = export(folder, "llama.cpp", attn_factor=1.1)
    assert llamacpp_deepseek2_attention(converted, scaled.python) == pytest.approx(1.1, rel=1e-7)


def vllm_deepseek_rope(hf_overrides: dict[str, Any], dim: int) -> tuple[torch.Tensor, float, float]:
    """vLLM 0.32.0 / 0.33.0 for DeepSeek-V2/V3: models/deepseek_v2.py turns the rope type into
    deepseek_llama_scaling when ``attention_factor == 1.0``, else deepseek_yarn;
    DeepseekScalingRotaryEmbedding (deepseek_scaling_rope.py) reads beta_fast, beta_slow, mscale
    (default 1) and mscale_all_dim (default 0) only. Returns (table, cos/sin multiplier, softmax
    scale multiplier: get_mscale(s, mscale_all_dim) ** 2 under deepseek_yarn only)."""
    rope = hf_overrides["rope_parameters"]
    kind = "deepseek_llama_scaling" if rope.get("attention_factor") == 1.0 else "deepseek_yarn"
    factor = rope["factor"]
    table = _ramp_table(rope, dim, rope.get("rope_theta", 10000), extrapolation=1.0, truncate=True)
    scale = _get_mscale(factor, float(rope.get("mscale", 1))) / _get_mscale(
        factor, float(rope.get("mscale_all_dim", 0))
    )
    softmax = (
        _get_mscale(factor, float(rope.get("mscale_all_dim", False))) ** 2 if kind == "deepseek_yarn" else 1.0
    )
    return table, scale, softmax


@pytest.mark.parametrize("attn_factor", [1.0, 1.1, 0.9])
def test_deepseek_v2_to_vllm_spells_the_attention_factor(tmp_path, attn_factor):
    """D2: vLLM's DeepSeek class takes no attention_factor; the export spells it through mscale and
    keeps mscale_all_dim (the softmax temperature) as the config states."""
    folder = _config_folder(tmp_path, "DeepSeek-V2-Lite", DEEPSEEK_V2)
    result = export(folder, "vllm", attn_factor=attn_factor)
    rope = result.settings["rope_parameters"]
    assert "attention_factor" not in rope
    table, scale, softmax = vllm_deepseek_rope(result.settings, 64)
    wanted, wanted_scale = result.scaling.inv_freq(64, base=BASE)
    torch.testing.assert_close(table, wanted, rtol=2e-7, atol=0)
    assert wanted_scale == pytest.approx(attn_factor, rel=1e-12)
    assert scale == pytest.approx(wanted_scale, rel=1e-12)
    assert softmax == pytest.approx((0.1 * 0.707 * math.log(40.0) + 1) ** 2, rel=1e-15)


DEEPSEEK_V3 = {**DEEPSEEK_V2, "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"]}


def vllm_deepseek_rope_type(rope: dict[str, Any]) -> str:
    """vLLM 0.32.0 models/deepseek_v2.py:542-547 (DeepseekV2Attention) and :1115-1120
    (DeepseekV2MLAAttention): every rope type but "default" becomes deepseek_llama_scaling when
    ``attention_factor == 1.0``, else deepseek_yarn; rotary_embedding/__init__.py:284-312 builds
    DeepseekScalingRotaryEmbedding (YaRN's ramp) for both. Model type "deepseek" (V1) takes
    DeepseekAttention instead (:1280-1288), which passes the rope dict on unchanged."""
    kind = str(rope.get("rope_type", "default"))
    if kind == "default":
        return kind
    return "deepseek_llama_scaling" if rope.get("attention_factor") == 1.0 else "deepseek_yarn"


@pytest.mark.parametrize("config", [DEEPSEEK_V2, DEEPSEEK_V3], ids=["v2", "v3"])
@pytest.mark.parametrize("method", ["linear", "llama3"])
def test_deepseek_to_vllm_refuses_what_it_would_serve_as_deepseek_yarn(tmp_path, capsys, config, method):
    """vLLM's DeepSeek-V2/V3 attention turns linear and llama3 rope types into DeepSeek's YaRN: the
    export refuses them, naming the method, the model type and why."""
    settings = {k: v for k, v in EXAMPLES[method].items() if k != "method"}
    # The spelling other models get is one vLLM's DeepSeek model file would rewrite.
    plain = export(yarn_rope.RopeScaling(**EXAMPLES[method]), "vllm", rope_theta=BASE)
    assert vllm_deepseek_rope_type(plain.settings["rope_parameters"]) == "deepseek_yarn"
    folder = _config_folder(tmp_path, "DeepSeek", config)
    with pytest.raises(ValueError, match="deepseek_yarn") as error:
        export(folder, "vllm", method=method, **settings)
    message = str(error.value)
    assert f"{method} scaling" in message and f"model_type {config['model_type']!r}" in message
    assert "deepseek_v2.py" in message
    assert export(folder, "sglang", method=method, **settings).scaling.method == method  # vLLM only
    if method == "linear":  # the command: one line, status 2
        assert main(["export", str(folder), "--to", "vllm", "--method", "linear", "--factor", "4"]) == 2
        err = capsys.readouterr().err.strip()
        assert "deepseek_yarn" in err and "\n" not in err


def test_deepseek_v1_to_vllm_keeps_linear():
    """Model type "deepseek" (DeepSeek V1, no MLA) is served by DeepseekAttention, which keeps the
    rope type: linear is exported (a config dict: transformers has no class for it)."""
    config = {"model_type": "deepseek", "architectures": ["DeepseekForCausalLM"], "hidden_size": 2048}
    config |= {"num_attention_heads": 16, "rope_theta": BASE, "max_position_embeddings": 4096}
    result = export(config, "vllm", method="linear", factor=4.0)
    assert result.settings["rope_parameters"]["rope_type"] == "linear"


@pytest.mark.parametrize("attention", [{"attn_factor": 1.2}, {"mscale": 1.0, "mscale_all_dim": 0.5}, {}])
def test_deepseek_v1_to_vllm_yarn_is_spelled_for_vllm_s_own_yarn_class(attention):
    """DeepSeek V1 (DeepseekForCausalLM, model_type "deepseek") keeps the "yarn" type: vLLM builds its
    generic YaRN class, which ignores a lone mscale, so the generic spelling (attention_factor) serves it,
    not DeepSeek V2's."""
    config = {"model_type": "deepseek", "architectures": ["DeepseekForCausalLM"], "hidden_size": 2048}
    config |= {"num_attention_heads": 16, "rope_theta": BASE, "max_position_embeddings": 4096}
    result = export(
        config, "vllm", method="yarn", factor=4.0, original_max_position_embeddings=4096, **attention
    )
    assert result.settings["rope_parameters"]["rope_type"] == "yarn"
    table, scale = vllm_rope(result.settings, 128)
    assert_same(table, scale, result.scaling, dim=128)


@pytest.mark.parametrize("config", [DEEPSEEK_V2, DEEPSEEK_V3], ids=["v2", "v3"])
def test_deepseek_ntk_to_vllm_is_plain_rope_over_the_rotated_dims(tmp_path, config):
    """NTK-aware scaling is spelled rope_type "default" with a new base, which vLLM's DeepSeek
    attention keeps (no deepseek_yarn, no softmax temperature); its rotary embedding has
    qk_rope_head_dim (64) channels, so the base is rope_theta * factor^(64/62)."""
    folder = _config_folder(tmp_path, "DeepSeek", config)
    result = export(folder, "vllm", method="ntk", factor=4.0)
    rope = result.settings["rope_parameters"]
    assert vllm_deepseek_rope_type(rope) == "default"
    table, scale = vllm_rope(result.settings, 64)
    assert rope["rope_theta"] == pytest.approx(BASE * 4.0 ** (64 / 62), rel=1e-15)
    assert_same(table, scale, result.scaling, dim=64)


def test_vllm_note_on_the_tokenizer_length():
    """D4: vLLM 0.32/0.33 read the tokenizer's model_max_length only for pooling models with absolute
    position embeddings (config/model.py)."""
    result = export(yarn_rope.RopeScaling(**EXAMPLES["yarn"]), "vllm", rope_theta=BASE)
    note = next(note for note in result.notes if "model_max_length" in note)
    assert "does not cap max_model_len" in note and "pooling" in note


def test_source_settings_reads_what_export_and_verify_use(tmp_path):
    """The public reader: the source's declared settings, the caller's changes over them, and the
    original context (the scaling's, else the config's max_position_embeddings)."""
    config = {"model_type": "llama", "hidden_size": 256, "num_attention_heads": 2, "rope_theta": BASE}
    folder = _config_folder(tmp_path, "plain", {**config, "max_position_embeddings": 4096})
    read = source_settings(folder, method="yarn", factor=2.0)
    assert read.label == str(folder) and read.declared.method == "none"
    wanted = yarn_rope.RopeScaling(method="yarn", factor=2.0, original_max_position_embeddings=4096)
    assert read.scaling == wanted
    assert read.max_position_embeddings == 4096 and read.original_max_position_embeddings == 4096
    assert export(folder, "vllm", method="yarn", factor=2.0).scaling.factor == read.scaling.factor
