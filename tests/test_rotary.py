"""Tests for ``yarn_rope.rotary.RotaryEmbedding``.

Goldens: ``tests/data/yarn_reference.json`` (the authors' code, jquesnelle/yarn commit 995db5b,
float32 angles), the installed transformers' rotary modules (bit parity in the fp32 angle mode),
and float64 computations written here (the precise angle mode).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from yarn_rope import RopeScaling, RotaryEmbedding, inv_freq

REFERENCE = json.loads((Path(__file__).parent / "data" / "yarn_reference.json").read_text())
CASES = {case["name"]: case for case in REFERENCE["cases"]}

# Tolerances per output dtype: float32 noise of a cos/sin value times a small factor.
TOLERANCE = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


pytestmark = pytest.mark.usefixtures("quiet_transformers")


def reference_scaling(case: dict) -> tuple[int, float, RopeScaling, int | None]:
    params = {k: v for k, v in case["params"].items() if k not in ("note",)}
    dim, base = params.pop("dim"), params.pop("base")
    seq_len = params.pop("seq_len", None)
    if "alpha" in params:
        params["factor"] = params.pop("alpha")
    if case["method"] == "dynamic-ntk":
        params["original_max_position_embeddings"] = params.pop("max_position_embeddings")
    return dim, base, RopeScaling(method=case["method"], **params), seq_len


def float64_table(positions: torch.Tensor, inv: torch.Tensor, scale: float) -> tuple[torch.Tensor, ...]:
    """cos/sin from float64 angles of the same float32 inv_freq; ``[n, dim]``."""
    angles = positions.to(torch.float64)[:, None] * inv.to(torch.float64)[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos() * scale, angles.sin() * scale


def llama_config(dim: int, base: float, scaling: RopeScaling, max_positions: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=dim * 2,
        num_attention_heads=2,
        head_dim=dim,
        max_position_embeddings=max_positions,
        rope_parameters=scaling.to_hf() | {"rope_theta": base},
    )


class TestReferenceRows:
    @pytest.mark.parametrize("name", [n for n, c in CASES.items() if c["method"] != "linear"])
    def test_fp32_rows_match_reference(self, name):
        case = CASES[name]
        dim, base, scaling, seq_len = reference_scaling(case)
        module = RotaryEmbedding(dim, base=base, scaling=scaling, angles="fp32")
        positions = sorted(int(p) for p in case["cos_sin_float32"])
        ids = torch.tensor([positions])
        if seq_len is not None:
            # Dynamic cases: the reference grew its table to seq_len; show the module that length.
            ids = torch.cat((ids, torch.tensor([[seq_len - 1]])), dim=1)
        cos, sin = module(torch.zeros(1), ids)
        for row, position in enumerate(positions):
            expected = case["cos_sin_float32"][str(position)]
            torch.testing.assert_close(cos[0, row], torch.tensor(expected["cos"]), atol=2e-6, rtol=0)
            torch.testing.assert_close(sin[0, row], torch.tensor(expected["sin"]), atol=2e-6, rtol=0)

    def test_linear_rows_within_documented_gap(self):
        case = CASES["linear-pi-4"]
        dim, base, scaling, _ = reference_scaling(case)
        module = RotaryEmbedding(dim, base=base, scaling=scaling, angles="fp32")
        positions = sorted(int(p) for p in case["cos_sin_float32"])
        cos, sin = module(torch.zeros(1), torch.tensor([positions]))
        for row, position in enumerate(positions):
            expected = case["cos_sin_float32"][str(position)]
            # The reference divides positions, transformers (and we) divide inv_freq.
            torch.testing.assert_close(cos[0, row], torch.tensor(expected["cos"]), atol=2e-4, rtol=0)
            torch.testing.assert_close(sin[0, row], torch.tensor(expected["sin"]), atol=2e-4, rtol=0)

    @pytest.mark.parametrize("name", ["llama2-70b-32k", "yarn-mistral-7b-128k", "ntk-by-parts-8"])
    def test_precise_rows_match_float64(self, name):
        case = CASES[name]
        dim, base, scaling, _ = reference_scaling(case)
        module = RotaryEmbedding(dim, base=base, scaling=scaling)
        positions = torch.tensor(sorted(int(p) for p in case["cos_sin_float32"]))
        cos, sin = module(torch.zeros(1), positions[None])
        ref_cos, ref_sin = float64_table(positions, module.inv_freq, module.attention_scaling)
        assert (cos[0].double() - ref_cos).abs().max() < 1e-6
        assert (sin[0].double() - ref_sin).abs().max() < 1e-6


class TestTransformersParity:
    @pytest.mark.parametrize(
        "scaling",
        [
            RopeScaling(method="none"),
            RopeScaling(method="linear", factor=4.0),
            RopeScaling(method="yarn", factor=8.0, original_max_position_embeddings=4096),
            RopeScaling(method="yarn", factor=16.0, original_max_position_embeddings=8192, attn_factor=1.5),
            RopeScaling(method="yarn", factor=4.0, original_max_position_embeddings=2048, truncate=False),
        ],
        ids=["none", "linear", "yarn", "yarn-attn", "yarn-untruncated"],
    )
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_fp32_mode_is_bit_equal(self, scaling, dtype):
        dim, base = 64, 500000.0
        hf = LlamaRotaryEmbedding(llama_config(dim, base, scaling, 32768))
        ours = RotaryEmbedding(dim, base=base, scaling=scaling, angles="fp32")
        torch.manual_seed(0)
        ids = torch.randint(0, 40000, (3, 257))
        x = torch.zeros(1, dtype=dtype)
        for got, expected in zip(ours(x, ids), hf(x, ids), strict=True):
            assert got.dtype == dtype and got.shape == (3, 257, dim)
            assert torch.equal(got, expected)

    def test_dynamic_ntk_matches_transformers(self):
        dim, base = 64, 10000.0
        scaling = RopeScaling(method="dynamic-ntk", factor=2.0, original_max_position_embeddings=1024)
        hf = LlamaRotaryEmbedding(llama_config(dim, base, scaling, 1024))
        ours = RotaryEmbedding(dim, base=base, scaling=scaling, angles="fp32")
        x = torch.zeros(1)
        for length in (100, 1024, 1500, 3000, 5000):
            ids = torch.arange(length)[None]
            got, expected = ours(x, ids), hf(x, ids)
            if length <= 1024:
                assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
            else:
                # transformers' forward grows the base from a tensor seq_len, i.e. in float32; the
                # authors' code (and we) grow it in float64. Same formula, float32 rounding apart.
                torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)
            ours_table, _ = inv_freq(
                "dynamic-ntk",
                dim,
                base=base,
                factor=2.0,
                original_max_position_embeddings=1024,
                seq_len=length,
            )
            assert torch.equal(ours.inv_freq, ours_table)


class TestPrecision:
    @pytest.mark.slow
    def test_precise_within_1e5_up_to_2_pow_20(self):
        dim, base = 128, 10000.0
        scaling = RopeScaling(method="yarn", factor=32.0, original_max_position_embeddings=4096)
        module = RotaryEmbedding(dim, base=base, scaling=scaling)
        limit = 1 << 20
        worst = 0.0
        # Every position in chunks; the tail (largest angles) is where fp32 angles fail.
        for start in range(0, limit + 1, 1 << 16):
            positions = torch.arange(start, min(start + (1 << 16), limit + 1))
            cos, sin = module(torch.zeros(1), positions[None])
            ref_cos, ref_sin = float64_table(positions, module.inv_freq, module.attention_scaling)
            worst = max(worst, (cos[0].double() - ref_cos).abs().max().item())
            worst = max(worst, (sin[0].double() - ref_sin).abs().max().item())
        assert worst < 1e-5

    def test_fp32_mode_drifts_where_precise_does_not(self):
        # Documents why precise is the default: the fp32 error grows with position.
        dim, base = 128, 10000.0
        module32 = RotaryEmbedding(dim, base=base, angles="fp32")
        precise = RotaryEmbedding(dim, base=base)
        errors = {}
        for position in (4096, 32768, 1 << 20):
            positions = torch.arange(position - 2048, position)
            ref_cos, _ = float64_table(positions, precise.inv_freq, 1.0)
            errors[position] = (
                (module32(torch.zeros(1), positions[None])[0][0].double() - ref_cos).abs().max().item(),
                (precise(torch.zeros(1), positions[None])[0][0].double() - ref_cos).abs().max().item(),
            )
        assert errors[4096][0] > 1e-5 and errors[1 << 20][0] > 1e-2
        assert errors[4096][0] < errors[32768][0] < errors[1 << 20][0]
        assert all(precise_error < 1e-6 for _, precise_error in errors.values())

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_output_is_one_rounding_of_fp32(self, dtype):
        scaling = RopeScaling(method="yarn", factor=8.0, original_max_position_embeddings=4096)
        module = RotaryEmbedding(128, base=10000.0, scaling=scaling)
        ids = torch.arange(0, 32768, 7)[None]
        cos32, sin32 = module(torch.zeros(1), ids)
        cos, sin = module(torch.zeros(1, dtype=dtype), ids)
        assert torch.equal(cos, cos32.to(dtype)) and torch.equal(sin, sin32.to(dtype))
        torch.testing.assert_close(cos.float(), cos32, atol=TOLERANCE[dtype], rtol=0)


class TestState:
    def make(self, **kwargs) -> RotaryEmbedding:
        scaling = RopeScaling(method="yarn", factor=8.0, original_max_position_embeddings=4096)
        return RotaryEmbedding(128, base=10000.0, scaling=scaling, **kwargs)

    def test_table_equals_frequencies(self):
        module = self.make()
        expected, attention = inv_freq(
            "yarn", 128, base=10000.0, factor=8.0, original_max_position_embeddings=4096
        )
        assert torch.equal(module.inv_freq, expected)
        assert module.attention_scaling == attention == 0.1 * math.log(8.0) + 1.0

    @pytest.mark.parametrize("cast", ["half", "bfloat16", "double", "to_bf16"])
    def test_model_wide_cast_keeps_fp32_table(self, cast):
        module = self.make()
        before = module.inv_freq.clone()
        ids = torch.arange(5000, 5100)[None]
        reference = module(torch.zeros(1), ids)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), module)
        if cast == "to_bf16":
            model.to(torch.bfloat16)
        else:
            getattr(model, cast)()
        assert module.inv_freq.dtype == torch.float32
        assert torch.equal(module.inv_freq, before)
        after = module(torch.zeros(1), ids)
        assert torch.equal(after[0], reference[0]) and torch.equal(after[1], reference[1])

    def test_buffer_not_in_state_dict(self):
        module = self.make()
        assert "inv_freq" not in module.state_dict()
        assert "inv_freq" in dict(module.named_buffers())

    def test_meta_device_materialises(self):
        expected = self.make().inv_freq
        with torch.device("meta"):
            module = self.make()
        assert module.inv_freq.is_meta
        module.to_empty(device="cpu")
        assert torch.equal(module.inv_freq, expected)

    def test_output_shape_dtype_and_layout(self):
        module = self.make()
        ids = torch.tensor([[0, 1, 2], [10, 11, 12]])
        cos, sin = module(torch.zeros(1, dtype=torch.float16), ids)
        assert cos.shape == sin.shape == (2, 3, 128) and cos.dtype == torch.float16
        # Half-rotation layout: the two halves repeat the dim/2 frequencies.
        assert torch.equal(cos[..., :64], cos[..., 64:]) and torch.equal(sin[..., :64], sin[..., 64:])

    def test_no_grad_and_position_zero(self):
        module = self.make()
        cos, sin = module(torch.zeros(1, requires_grad=True), torch.zeros(1, 1, dtype=torch.long))
        assert not cos.requires_grad
        assert torch.allclose(cos, torch.full_like(cos, module.attention_scaling))
        assert torch.equal(sin, torch.zeros_like(sin))

    @pytest.mark.parametrize(
        ("kwargs", "error", "names"),
        [
            ({"dim": 127}, ValueError, "dim.*127"),
            ({"dim": 0}, ValueError, "dim.*0"),
            ({"base": float("nan")}, ValueError, "base.*nan"),
            ({"base": "10000"}, TypeError, "base.*'10000'"),
            ({"angles": "fp64"}, ValueError, "angles.*fp64"),
            ({"scaling": {"rope_type": "yarn"}}, TypeError, "scaling.*dict"),
        ],
    )
    def test_bad_arguments(self, kwargs, error, names):
        arguments = {"dim": 128, "base": 10000.0} | kwargs
        with pytest.raises(error, match=names):
            RotaryEmbedding(arguments.pop("dim"), **arguments)


class TestDynamic:
    def test_dynamic_yarn_follows_length(self):
        scaling = RopeScaling(
            method="dynamic-yarn", factor=8.0, original_max_position_embeddings=4096, finetuned=True
        )
        assert scaling.threshold() == 32768
        module = RotaryEmbedding(128, base=10000.0, scaling=scaling, angles="fp32")
        x = torch.zeros(1)
        for seq_len, factor in ((100, 8.0), (32768, 8.0), (40000, 40000 / 4096), (50000, 50000 / 4096)):
            module(x, torch.arange(seq_len)[None])
            expected, attention = inv_freq(
                "yarn", 128, base=10000.0, factor=factor, original_max_position_embeddings=4096
            )
            assert torch.equal(module.inv_freq, expected), seq_len
            assert module.attention_scaling == attention

    def test_dynamic_yarn_matches_reference_case(self):
        case = CASES["dyn-not-finetuned-10k"]
        dim, base, scaling, seq_len = reference_scaling(case)
        module = RotaryEmbedding(dim, base=base, scaling=scaling, angles="fp32")
        assert torch.equal(module.inv_freq, torch.tensor(CASES["dyn-not-finetuned-within"]["inv_freq"]))
        module(torch.zeros(1), torch.arange(seq_len)[None])
        assert torch.equal(module.inv_freq, torch.tensor(case["inv_freq"]))
        assert module.attention_scaling == pytest.approx(case["mscale"], rel=1e-12)

    def test_dynamic_uses_batch_maximum(self):
        scaling = RopeScaling(method="dynamic-yarn", original_max_position_embeddings=1024)
        module = RotaryEmbedding(64, base=10000.0, scaling=scaling)
        ids = torch.stack((torch.arange(0, 100), torch.arange(1900, 2000)))
        module(torch.zeros(1), ids)
        assert module.attention_scaling == pytest.approx(0.1 * math.log(2000 / 1024) + 1)
