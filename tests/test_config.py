"""Tests of yarn_rope.config.RopeScaling: construction, validation, HF dialects, to_hf, dynamic rules.

Expected values come from transformers itself (``ROPE_INIT_FUNCTIONS``, ``LlamaRotaryEmbedding``)
or from formulas written out here (the paper's ``0.1 ln(s) + 1``, Nous' dynamic rule), never
from yarn_rope's own output.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import yarn_rope
from yarn_rope import frequencies as F
from yarn_rope.config import PREFIX, RopeScaling

LOGGER = "yarn_rope.config"
BASE = 10000.0


pytestmark = pytest.mark.usefixtures("quiet_transformers")


def llama_config(rope_parameters, *, max_position_embeddings, head_dim=64, **extra):
    """A tiny LlamaConfig: only the rotary part matters."""
    return transformers.LlamaConfig(
        hidden_size=2 * head_dim,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=head_dim,
        num_hidden_layers=1,
        intermediate_size=32,
        vocab_size=32,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=dict(rope_parameters),
        **extra,
    )


def plain_inv_freq(dim, base):
    """RoFormer: 1 / base^(2i/dim), as transformers writes it."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def transformers_table(config, **kwargs):
    """(inv_freq, attention factor) that vanilla transformers computes for ``config``."""
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, **kwargs)


def paper_mscale(factor, mscale=1.0, coefficient=0.1):
    return 1.0 if factor <= 1 else coefficient * mscale * math.log(factor) + 1.0


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


# ------------------------------------------------------------------------------------------------
# 1. Construction
# ------------------------------------------------------------------------------------------------


class TestConstruction:
    def test_defaults(self):
        s = RopeScaling(factor=8.0, original_max_position_embeddings=4096)
        assert s.method == "yarn"
        assert s.factor == 8.0
        assert s.original_max_position_embeddings == 4096
        assert s.max_position_embeddings is None
        assert (s.beta_fast, s.beta_slow) == (32.0, 1.0)
        assert s.extrapolation_factor == 1.0
        assert s.truncate is True
        assert s.attention_factor is None
        assert s.attn_factor == 1.0
        assert s.mscale is None and s.mscale_all_dim is None
        assert s.mscale_coefficient == 0.1
        assert s.finetuned is False

    def test_default_method_needs_original_length(self):
        with pytest.raises(ValueError, match="original_max_position_embeddings"):
            RopeScaling()

    @pytest.mark.parametrize("factor", [None, 1, 1.0])
    def test_none_is_factor_one(self, factor):
        s = RopeScaling(method="none", factor=factor)
        assert s.factor == 1.0 and isinstance(s.factor, float)
        assert s.attention_scaling(8.0) == 1.0
        inv, attention = s.inv_freq(64, base=BASE)
        assert torch.equal(inv, plain_inv_freq(64, BASE))
        assert attention == 1.0

    @pytest.mark.parametrize(
        "method, original, target, expected",
        [
            ("yarn", 4096, 16384, 4.0),
            ("yarn", 4096, 65536, 16.0),
            ("yarn", 4096, 10000, 10000 / 4096),
            ("linear", 2048, 8192, 4.0),
            ("ntk-by-parts", 4096, 32768, 8.0),
            ("dynamic-ntk", 4096, 8192, 2.0),
            ("ntk", 4096, 12288, 3.0),
            ("yarn", 4096, 4096, 1.0),
        ],
    )
    def test_factor_derived_from_target_context(self, method, original, target, expected, caplog):
        caplog.set_level(logging.WARNING, logger=LOGGER)
        s = RopeScaling(
            method=method, original_max_position_embeddings=original, max_position_embeddings=target
        )
        assert s.factor == pytest.approx(expected, rel=1e-15)
        assert isinstance(s.factor, float)
        assert warnings_of(caplog) == []

    def test_explicit_factor_wins_over_target_with_a_warning(self, caplog):
        caplog.set_level(logging.WARNING, logger=LOGGER)
        s = RopeScaling(
            method="yarn", factor=4.0, original_max_position_embeddings=4096, max_position_embeddings=65536
        )
        assert s.factor == 4.0
        (message,) = warnings_of(caplog)
        assert "factor=4.0" in message and "65536" in message

    def test_frozen(self):
        s = RopeScaling(factor=8.0, original_max_position_embeddings=4096)
        with pytest.raises(dataclasses.FrozenInstanceError):
            s.factor = 2.0  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            s.method = "linear"  # type: ignore[misc]
        assert s.factor == 8.0

    def test_keyword_only(self):
        with pytest.raises(TypeError):
            RopeScaling("yarn", 8.0, 4096)  # type: ignore[misc]
        with pytest.raises(TypeError):
            RopeScaling("none")  # type: ignore[misc]

    def test_hashable_and_equal_by_value(self):
        a = RopeScaling(factor=8, original_max_position_embeddings=4096)
        b = RopeScaling(factor=8.0, original_max_position_embeddings=4096.0)
        assert a == b and hash(a) == hash(b)
        assert a != b.replace(factor=4.0)

    @pytest.mark.parametrize(
        "field, value",
        [
            ("factor", 8),
            ("beta_fast", 128),
            ("beta_slow", 2),
            ("extrapolation_factor", 1),
            ("attention_factor", 2),
            ("attn_factor", 2),
            ("mscale", 1),
            ("mscale_all_dim", 1),
            ("mscale_coefficient", 0),
        ],
    )
    def test_ints_normalised_to_float(self, field, value):
        kwargs = {"method": "yarn", "original_max_position_embeddings": 4096, "factor": 8.0, field: value}
        s = RopeScaling(**kwargs)
        got = getattr(s, field)
        assert type(got) is float
        assert got == float(value)

    @pytest.mark.parametrize("field", ["original_max_position_embeddings", "max_position_embeddings"])
    def test_whole_float_lengths_normalised_to_int(self, field):
        values = {"original_max_position_embeddings": 4096.0, "max_position_embeddings": 32768.0}
        s = RopeScaling(method="yarn", factor=8.0, **values)
        assert type(getattr(s, field)) is int
        assert getattr(s, field) == int(values[field])

    def test_replace_returns_validated_copy(self):
        s = RopeScaling(factor=8.0, original_max_position_embeddings=4096)
        t = s.replace(factor=4, beta_fast=128)
        assert (t.factor, t.beta_fast) == (4.0, 128.0)
        assert type(t.factor) is float
        assert s.factor == 8.0 and s.beta_fast == 32.0  # the original is untouched

    @pytest.mark.parametrize(
        "changes, exc",
        [
            ({"factor": 0.5}, ValueError),
            ({"beta_fast": 0.5}, ValueError),
            ({"method": "YaRN"}, ValueError),
            ({"original_max_position_embeddings": None}, ValueError),
            ({"truncate": "no"}, TypeError),
            ({"attention_factor": 1.2, "attn_factor": 1.5}, ValueError),
        ],
    )
    def test_replace_validates(self, changes, exc):
        s = RopeScaling(factor=8.0, original_max_position_embeddings=4096)
        with pytest.raises(exc):
            s.replace(**changes)

    def test_to_dict_is_json_and_rebuilds(self):
        s = RopeScaling(
            method="dynamic-yarn",
            factor=16,
            original_max_position_embeddings=4096,
            max_position_embeddings=65536,
            finetuned=True,
            beta_fast=128,
            beta_slow=2,
            mscale_coefficient=0.07,
        )
        d = s.to_dict()
        assert {f.name for f in dataclasses.fields(RopeScaling)} == set(d)
        assert RopeScaling(**json.loads(json.dumps(d))) == s

    @pytest.mark.parametrize(
        "kwargs, dynamic, vanilla",
        [
            ({"method": "none"}, False, True),
            ({"method": "linear", "factor": 2.0}, False, True),
            ({"method": "ntk", "factor": 2.0}, False, False),
            (
                {"method": "ntk-by-parts", "factor": 2.0, "original_max_position_embeddings": 4096},
                False,
                False,
            ),
            ({"method": "dynamic-ntk", "factor": 2.0, "original_max_position_embeddings": 4096}, True, True),
            ({"method": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096}, False, True),
            (
                {
                    "method": "yarn",
                    "factor": 2.0,
                    "original_max_position_embeddings": 4096,
                    "extrapolation_factor": 0.5,
                },
                False,
                False,
            ),
            ({"method": "dynamic-yarn", "original_max_position_embeddings": 4096}, True, False),
        ],
    )
    def test_is_dynamic_and_vanilla_compatible(self, kwargs, dynamic, vanilla):
        s = RopeScaling(**kwargs)
        assert s.is_dynamic is dynamic
        assert s.vanilla_compatible() is vanilla
        assert (s.threshold() is None) is (not dynamic)

    def test_public_export(self):
        assert yarn_rope.RopeScaling is RopeScaling


class TestAttentionScale:
    @pytest.mark.parametrize(
        "kwargs, factor, expected",
        [
            ({}, 8.0, 0.1 * math.log(8.0) + 1.0),
            ({}, 1.0, 1.0),
            ({"attn_factor": 1.5}, 8.0, 1.5 * (0.1 * math.log(8.0) + 1.0)),
            ({"mscale_coefficient": 0.07}, 16.0, 0.07 * math.log(16.0) + 1.0),
            ({"attention_factor": 1.25}, 8.0, 1.25),
            (
                {"mscale": 1.0, "mscale_all_dim": 0.707},
                40.0,
                (0.1 * math.log(40.0) + 1.0) / (0.1 * 0.707 * math.log(40.0) + 1.0),
            ),
            ({"mscale": 1.0, "mscale_all_dim": 1.0}, 40.0, 1.0),
        ],
    )
    def test_yarn_formula(self, kwargs, factor, expected):
        s = RopeScaling(method="yarn", factor=8.0, original_max_position_embeddings=4096, **kwargs)
        assert s.attention_scaling(factor) == pytest.approx(expected, rel=1e-12)

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"method": "none"},
            {"method": "linear", "factor": 8.0},
            {"method": "ntk", "factor": 8.0},
            {"method": "dynamic-ntk", "factor": 8.0, "original_max_position_embeddings": 4096},
        ],
    )
    def test_other_methods_have_no_attention_factor(self, kwargs):
        s = RopeScaling(**kwargs)
        assert s.attention_scaling(8.0) == 1.0
        assert s.inv_freq(64, base=BASE)[1] == 1.0


class TestStaticTables:
    """inv_freq of static methods against the formulas written out here."""

    @pytest.mark.parametrize("dim", [16, 64, 128])
    def test_linear(self, dim):
        s = RopeScaling(method="linear", factor=4.0)
        inv, attention = s.inv_freq(dim, base=BASE)
        assert torch.equal(inv, plain_inv_freq(dim, BASE) / 4.0)
        assert attention == 1.0

    @pytest.mark.parametrize("dim", [16, 64, 128])
    def test_ntk(self, dim):
        s = RopeScaling(method="ntk", factor=4.0)
        inv, _ = s.inv_freq(dim, base=BASE)
        expected = plain_inv_freq(dim, BASE * 4.0 ** (dim / (dim - 2)))
        torch.testing.assert_close(inv, expected, rtol=1e-6, atol=0)

    def test_yarn_against_paper_formula(self):
        dim, original, s_ = 128, 4096, 16.0
        s = RopeScaling(method="yarn", factor=s_, original_max_position_embeddings=original)
        inv, attention = s.inv_freq(dim, base=BASE)
        i = torch.arange(dim // 2, dtype=torch.float64)
        theta = BASE ** (-2 * i / dim)
        rotations = original * theta / (2 * math.pi)
        low = math.floor(dim * math.log(original / (32 * 2 * math.pi)) / (2 * math.log(BASE)))
        high = math.ceil(dim * math.log(original / (1 * 2 * math.pi)) / (2 * math.log(BASE)))
        ramp = ((i - low) / (high - low)).clamp(0, 1)
        expected = (1 - ramp) * theta + ramp * theta / s_
        torch.testing.assert_close(inv.double(), expected, rtol=1e-6, atol=0)
        # pairs turning more than 32 times are untouched, fewer than once divided by s
        assert torch.allclose(inv[rotations > 32].double(), theta[rotations > 32], rtol=1e-6)
        assert torch.allclose(inv[rotations < 1].double(), theta[rotations < 1] / s_, rtol=1e-6)
        assert attention == pytest.approx(0.1 * math.log(s_) + 1.0, rel=1e-15)

    def test_device_and_dtype(self):
        inv, _ = RopeScaling(factor=8.0, original_max_position_embeddings=4096).inv_freq(
            64, base=BASE, device="cpu"
        )
        assert inv.dtype == torch.float32 and inv.shape == (32,) and inv.device.type == "cpu"


# ------------------------------------------------------------------------------------------------
# 2. Bad input
# ------------------------------------------------------------------------------------------------

Y = {"method": "yarn", "original_max_position_embeddings": 4096}  # a valid YaRN base for bad values
Y8 = {**Y, "factor": 8.0}

BAD_INPUTS = [
    pytest.param({**Y, "factor": 0}, ValueError, ["factor", "got 0"], id="factor-0"),
    pytest.param({**Y, "factor": -2}, ValueError, ["factor", "got -2"], id="factor-negative"),
    pytest.param({**Y, "factor": 0.5}, ValueError, ["factor", "0.5"], id="factor-below-1"),
    pytest.param(
        {"method": "linear", "factor": 0.5}, ValueError, ["factor", "0.5", "linear"], id="linear-0.5"
    ),
    pytest.param({**Y, "factor": float("nan")}, ValueError, ["factor", "nan"], id="factor-nan"),
    pytest.param({**Y, "factor": float("inf")}, ValueError, ["factor", "inf"], id="factor-inf"),
    pytest.param({**Y, "factor": "8"}, TypeError, ["factor", "'8'"], id="factor-str"),
    pytest.param({**Y, "factor": True}, TypeError, ["factor", "True"], id="factor-bool"),
    pytest.param(
        {**Y8, "original_max_position_embeddings": 0},
        ValueError,
        ["original_max_position_embeddings", "got 0"],
        id="original-0",
    ),
    pytest.param(
        {**Y8, "original_max_position_embeddings": -1},
        ValueError,
        ["original_max_position_embeddings", "-1"],
        id="original-negative",
    ),
    pytest.param(
        {**Y8, "original_max_position_embeddings": 4096.5},
        TypeError,
        ["original_max_position_embeddings", "4096.5"],
        id="original-fraction",
    ),
    pytest.param(
        {**Y8, "original_max_position_embeddings": "4096"},
        TypeError,
        ["original_max_position_embeddings", "'4096'"],
        id="original-str",
    ),
    pytest.param(
        {**Y8, "max_position_embeddings": True},
        TypeError,
        ["max_position_embeddings", "True"],
        id="target-bool",
    ),
    pytest.param(
        {**Y8, "max_position_embeddings": 2048},
        ValueError,
        ["max_position_embeddings=2048", "original_max_position_embeddings=4096"],
        id="target-shorter-than-original",
    ),
    pytest.param(
        {**Y8, "beta_fast": 1.0, "beta_slow": 32.0},
        ValueError,
        ["beta_fast=1.0", "beta_slow=32.0"],
        id="beta-fast-below-slow",
    ),
    pytest.param({**Y8, "beta_slow": float("nan")}, ValueError, ["beta_slow", "nan"], id="beta-nan"),
    pytest.param({**Y8, "beta_fast": 0}, ValueError, ["beta_fast", "got 0"], id="beta-zero"),
    pytest.param(
        {"method": "rope", "factor": 2.0},
        ValueError,
        ["'rope'", "known methods", "ntk-by-parts", "dynamic-yarn"],
        id="method-unknown",
    ),
    pytest.param(
        {**Y8, "method": "YaRN"}, ValueError, ["'YaRN'", "known methods", "'yarn'"], id="method-case"
    ),
    pytest.param(
        {**Y8, "method": "dynamic_yarn"},
        ValueError,
        ["'dynamic_yarn'", "known methods", "'dynamic-yarn'"],
        id="method-underscore",
    ),
    pytest.param({**Y8, "method": None}, TypeError, ["method", "None"], id="method-none-object"),
    pytest.param(
        {"method": "yarn", "factor": 8.0},
        ValueError,
        ["'yarn'", "original_max_position_embeddings"],
        id="yarn-without-original",
    ),
    pytest.param(
        {"method": "ntk-by-parts", "factor": 8.0},
        ValueError,
        ["'ntk-by-parts'", "original_max_position_embeddings"],
        id="ntk-by-parts-without-original",
    ),
    pytest.param(
        {"method": "linear"}, ValueError, ["'linear'", "factor", "max_position_embeddings"], id="linear-bare"
    ),
    pytest.param(
        {"method": "linear", "max_position_embeddings": 8192},
        ValueError,
        ["'linear'", "factor", "original_max_position_embeddings"],
        id="linear-target-only",
    ),
    pytest.param({"method": "none", "factor": 4}, ValueError, ["'none'", "factor=4"], id="none-with-factor"),
    pytest.param(
        {**Y8, "attention_factor": 1.2, "attn_factor": 1.5},
        ValueError,
        ["attention_factor=1.2", "attn_factor=1.5"],
        id="attention-factor-and-attn-factor",
    ),
    pytest.param({**Y8, "attn_factor": 0}, ValueError, ["attn_factor", "got 0"], id="attn-factor-0"),
    pytest.param(
        {**Y8, "attention_factor": -1.0}, ValueError, ["attention_factor", "-1.0"], id="attention-factor-neg"
    ),
    pytest.param(
        {**Y8, "mscale_coefficient": -0.1},
        ValueError,
        ["mscale_coefficient", "-0.1"],
        id="mscale-coefficient-negative",
    ),
    pytest.param(
        {**Y8, "mscale": -20.0, "mscale_all_dim": 1.0},
        ValueError,
        ["mscale=-20.0", "mscale_all_dim=1.0"],
        id="mscale-negative-attention",
    ),
    pytest.param({**Y8, "mscale": "1"}, TypeError, ["mscale", "'1'"], id="mscale-str"),
    pytest.param(
        {**Y8, "extrapolation_factor": -1}, ValueError, ["extrapolation_factor", "-1"], id="extrapolation-neg"
    ),
    pytest.param({**Y8, "truncate": "yes"}, TypeError, ["truncate", "'yes'"], id="truncate-str"),
    pytest.param({**Y8, "finetuned": 1}, TypeError, ["finetuned", "got 1"], id="finetuned-int"),
    pytest.param(
        {"method": "dynamic-yarn", "original_max_position_embeddings": 4096, "finetuned": True},
        ValueError,
        ["dynamic-yarn", "finetuned=True", "factor", "max_position_embeddings"],
        id="dynamic-yarn-finetuned-without-factor",
    ),
    pytest.param(
        {"method": "linear", "factor": 2.0, "attention_factor": 1.2},
        ValueError,
        ["attention_factor=1.2", "linear", "no effect"],
        id="yarn-only-field-on-linear",
    ),
    pytest.param(
        {"method": "ntk", "factor": 2.0, "beta_fast": 64.0},
        ValueError,
        ["beta_fast=64.0", "ntk"],
        id="beta-on-ntk",
    ),
]


class TestBadInput:
    def test_table_is_big_enough(self):
        assert len(BAD_INPUTS) >= 20

    @pytest.mark.parametrize("kwargs, exc, fragments", BAD_INPUTS)
    def test_rejected_with_named_field_and_value(self, kwargs, exc, fragments):
        with pytest.raises(exc) as info:
            RopeScaling(**kwargs)
        assert type(info.value) is exc
        message = str(info.value)
        for fragment in fragments:
            assert fragment in message, f"{fragment!r} missing from {message!r}"

    @pytest.mark.parametrize(
        "config, exc, fragments",
        [
            pytest.param(
                {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                },
                ValueError,
                ["'llama3'", "low_freq_factor"],
                id="llama3-without-low-freq-factor",
            ),
            pytest.param(
                {
                    "max_position_embeddings": 131072,
                    "original_max_position_embeddings": 4096,
                    "rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [2.0, 3.0]},
                },
                ValueError,
                ["short_factor", "long_factor", "1", "2"],
                id="longrope-lists-of-different-lengths",
            ),
            pytest.param(
                {"rope_type": "proportional", "factor": 2.0},
                ValueError,
                ["'proportional'", "does not compute"],
                id="proportional",
            ),
            pytest.param({"type": "su", "factor": 2.0}, ValueError, ["'su'"], id="su"),
            pytest.param(
                {"rope_type": "default", "mrope_section": [16, 24, 24]},
                ValueError,
                ["mrope_section"],
                id="mrope",
            ),
            pytest.param(
                {"rope_type": "yarn", "mrope_section": [16, 24, 24], "factor": 2.0},
                ValueError,
                ["mrope_section"],
                id="mrope-yarn",
            ),
            pytest.param({"rope_type": "bogus"}, ValueError, ["'bogus'", "yarn", "dynamic"], id="unknown"),
            pytest.param({"rope_type": "YaRN", "factor": 2.0}, ValueError, ["'YaRN'"], id="unknown-case"),
            pytest.param({"rope_type": 3}, TypeError, ["rope_type", "3"], id="rope-type-int"),
            pytest.param(42, TypeError, ["int"], id="int"),
            pytest.param("yarn", TypeError, ["str"], id="str"),
            pytest.param(None, TypeError, ["NoneType"], id="none"),
            pytest.param([("rope_type", "yarn")], TypeError, ["list"], id="list"),
            pytest.param({"rope_type": "linear"}, ValueError, ["'linear'", "factor"], id="linear-no-factor"),
            pytest.param({"rope_type": "yarn_rope.ntk"}, ValueError, ["factor"], id="ntk-no-factor"),
            pytest.param(
                {"max_position_embeddings": 4096, "rope_scaling": {"type": "dynamic"}},
                ValueError,
                ["factor"],
                id="dynamic-no-factor",
            ),
            pytest.param(
                {"rope_type": "dynamic", "factor": 2.0},
                ValueError,
                ["original_max_position_embeddings", "max_position_embeddings"],
                id="dynamic-no-length",
            ),
            pytest.param(
                {"rope_type": "yarn", "factor": 4.0},
                ValueError,
                ["'yarn'", "original_max_position_embeddings"],
                id="yarn-no-length",
            ),
            pytest.param(
                {"rope_type": "yarn", "factor": 0.5, "original_max_position_embeddings": 4096},
                ValueError,
                ["factor", "0.5"],
                id="yarn-bad-factor",
            ),
            pytest.param(
                {
                    "max_position_embeddings": 8192,
                    "layer_types": ["sliding_attention", "chunked_attention"],
                    "rope_parameters": {
                        "sliding_attention": {"rope_type": "default"},
                        "chunked_attention": {"rope_type": "linear", "factor": 2.0},
                    },
                },
                ValueError,
                ["full_attention", "sliding_attention", "chunked_attention", "layer_type"],
                id="nested-without-full-attention",
            ),
        ],
    )
    def test_from_hf_rejects(self, config, exc, fragments):
        with pytest.raises(exc) as info:
            RopeScaling.from_hf(config)
        assert type(info.value) is exc
        for fragment in fragments:
            assert fragment in str(info.value), f"{fragment!r} missing from {info.value}"

    def test_from_hf_layer_type_on_flat_dict(self):
        with pytest.raises(ValueError, match="layer_type='sliding_attention'"):
            RopeScaling.from_hf(
                {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096},
                layer_type="sliding_attention",
            )

    def test_from_hf_unknown_layer_type(self):
        config = {
            "max_position_embeddings": 8192,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default"},
                "full_attention": {"rope_type": "linear", "factor": 2.0},
            },
        }
        with pytest.raises(ValueError, match="'chunked_attention'"):
            RopeScaling.from_hf(config, layer_type="chunked_attention")

    def test_from_hf_llama3_config_object(self):
        config = llama_config(
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
                "rope_theta": 500000.0,
            },
            max_position_embeddings=131072,
        )
        s = RopeScaling.from_hf(config)
        assert (s.method, s.factor, s.low_freq_factor, s.high_freq_factor) == ("llama3", 8.0, 1.0, 4.0)
        inv_hf, attention_hf = transformers_table(config)
        inv, attention = s.inv_freq(64, base=500000.0)
        assert torch.equal(inv, inv_hf) and attention == attention_hf == 1.0

    @pytest.mark.parametrize("method", ["linear", "yarn", "ntk"])
    def test_dynamic_factor_refused_for_other_methods(self, method):
        s = RopeScaling(method=method, factor=2.0, original_max_position_embeddings=4096)
        with pytest.raises(ValueError, match="dynamic-yarn"):
            s.dynamic_factor(8192)


# ------------------------------------------------------------------------------------------------
# 3. from_hf dialects
# ------------------------------------------------------------------------------------------------


class TestFromHF:
    def test_transformers5_config_object(self):
        config = llama_config(
            {
                "rope_type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 4096,
                "rope_theta": BASE,
            },
            max_position_embeddings=32768,
        )
        assert RopeScaling.from_hf(config) == RopeScaling(
            method="yarn", factor=8.0, original_max_position_embeddings=4096, max_position_embeddings=32768
        )

    def test_transformers5_config_from_legacy_rope_scaling_kwarg(self):
        config = transformers.LlamaConfig(
            max_position_embeddings=16384,
            rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
        )
        s = RopeScaling.from_hf(config)
        assert (s.method, s.factor, s.original_max_position_embeddings) == ("yarn", 4.0, 4096)
        assert s.max_position_embeddings == 16384

    @pytest.mark.parametrize("key", ["type", "rope_type"])
    def test_transformers4_dict(self, key):
        config = {
            "model_type": "llama",
            "max_position_embeddings": 32768,
            "rope_theta": 10000.0,
            "rope_scaling": {key: "yarn", "factor": 8.0, "original_max_position_embeddings": 4096},
        }
        assert RopeScaling.from_hf(config) == RopeScaling(
            method="yarn", factor=8.0, original_max_position_embeddings=4096, max_position_embeddings=32768
        )

    def test_transformers4_dict_rope_parameters_key(self):
        config = {
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 4096,
                "rope_theta": BASE,
                "beta_fast": 128,
                "beta_slow": 2,
                "truncate": False,
            },
        }
        s = RopeScaling.from_hf(config)
        assert (s.beta_fast, s.beta_slow, s.truncate) == (128.0, 2.0, False)

    @pytest.mark.parametrize(
        "scaling, expected",
        [
            (
                {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096},
                {"method": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096},
            ),
            (
                {"type": "yarn", "factor": 8, "original_max_position_embeddings": 4096},
                {"method": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096},
            ),
            ({"type": "linear", "factor": 4.0}, {"method": "linear", "factor": 4.0}),
            ({"rope_type": "default"}, {"method": "none"}),
            ({"rope_type": "default", "rope_theta": 500000.0}, {"method": "none"}),
            ({}, {"method": "none"}),
            (
                {
                    "rope_type": "yarn_rope.ntk-by-parts",
                    "factor": 2.0,
                    "original_max_position_embeddings": 2048,
                },
                {"method": "ntk-by-parts", "factor": 2.0, "original_max_position_embeddings": 2048},
            ),
            (
                {"rope_type": "dynamic-ntk", "factor": 2.0, "original_max_position_embeddings": 2048},
                {"method": "dynamic-ntk", "factor": 2.0, "original_max_position_embeddings": 2048},
            ),
        ],
    )
    def test_bare_scaling_dict(self, scaling, expected):
        assert RopeScaling.from_hf(scaling) == RopeScaling(**expected)

    def test_input_dict_not_mutated(self):
        scaling = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": None}
        config = {"max_position_embeddings": 32768, "rope_scaling": scaling}
        before = json.dumps(config, sort_keys=True)
        RopeScaling.from_hf(config)
        assert json.dumps(config, sort_keys=True) == before

    def test_nous_yarn_finetuned(self):
        # NousResearch/Yarn-Llama-2-7b-64k config.json
        config = {
            "max_position_embeddings": 65536,
            "rope_scaling": {
                "type": "yarn",
                "factor": 16.0,
                "original_max_position_embeddings": 4096,
                "finetuned": True,
            },
        }
        s = RopeScaling.from_hf(config)
        assert s.method == "yarn"
        assert (s.factor, s.original_max_position_embeddings, s.max_position_embeddings) == (
            16.0,
            4096,
            65536,
        )
        # the same table vanilla transformers builds from this config
        hf = llama_config(config["rope_scaling"] | {"rope_theta": BASE}, max_position_embeddings=65536)
        inv_hf, attention_hf = transformers_table(hf)
        inv, attention = s.inv_freq(64, base=BASE)
        assert torch.equal(inv, inv_hf)
        assert attention == attention_hf

    @pytest.mark.parametrize("finetuned", [True, False])
    def test_nous_dynamic_yarn(self, finetuned):
        max_positions = 65536 if finetuned else 4096
        config = {
            "max_position_embeddings": max_positions,
            "rope_scaling": {
                "type": "dynamic-yarn",
                "factor": 16.0,
                "original_max_position_embeddings": 4096,
                "finetuned": finetuned,
            },
        }
        s = RopeScaling.from_hf(config)
        assert s.method == "dynamic-yarn"
        assert s.finetuned is finetuned
        assert s.original_max_position_embeddings == 4096
        assert s.threshold() == max_positions
        assert s.dynamic_factor(100) == (16.0 if finetuned else 1.0)
        assert s.dynamic_factor(4 * 65536) == 64.0

    def test_bare_nous_dynamic_yarn_dict(self):
        s = RopeScaling.from_hf(
            {
                "type": "dynamic-yarn",
                "factor": 16.0,
                "original_max_position_embeddings": 4096,
                "finetuned": True,
            }
        )
        assert (s.method, s.factor, s.finetuned) == ("dynamic-yarn", 16.0, True)
        assert s.threshold() == 16 * 4096

    @pytest.mark.parametrize("key", ["type", "rope_type"])
    def test_dynamic_reads_original_from_config_max(self, key):
        s = RopeScaling.from_hf(
            {"max_position_embeddings": 4096, "rope_scaling": {key: "dynamic", "factor": 2.0}}
        )
        assert s == RopeScaling(method="dynamic-ntk", factor=2.0, original_max_position_embeddings=4096)
        assert s.max_position_embeddings is None
        assert s.threshold() == 4096

    def test_dynamic_config_object(self):
        config = llama_config(
            {"rope_type": "dynamic", "factor": 4.0, "rope_theta": BASE}, max_position_embeddings=2048
        )
        s = RopeScaling.from_hf(config)
        assert s == RopeScaling(method="dynamic-ntk", factor=4.0, original_max_position_embeddings=2048)
        for seq_len in (None, 1000, 2048, 5000, 16384):
            inv_hf, _ = transformers_table(config, seq_len=seq_len)
            assert torch.equal(s.inv_freq(64, base=BASE, seq_len=seq_len)[0], inv_hf), seq_len

    def test_linear_config(self):
        config = {"max_position_embeddings": 16384, "rope_scaling": {"type": "linear", "factor": 4.0}}
        s = RopeScaling.from_hf(config)
        assert (s.method, s.factor) == ("linear", 4.0)

    @pytest.mark.parametrize(
        "config",
        [
            {"max_position_embeddings": 4096},
            {"max_position_embeddings": 4096, "rope_scaling": None},
            {"max_position_embeddings": 4096, "rope_scaling": {"type": "default"}},
            {"max_position_embeddings": 4096, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
        ],
    )
    def test_no_scaling_is_none(self, config):
        assert RopeScaling.from_hf(config) == RopeScaling(method="none")

    def test_plain_llama_config_is_none(self):
        assert RopeScaling.from_hf(transformers.LlamaConfig()) == RopeScaling(method="none")

    def test_phi3_top_level_original_length(self):
        config = {
            "model_type": "phi3",
            "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096,
            "rope_scaling": {"type": "yarn", "factor": 32.0},
        }
        s = RopeScaling.from_hf(config)
        assert (s.method, s.factor, s.original_max_position_embeddings) == ("yarn", 32.0, 4096)

    def test_top_level_original_wins_like_transformers(self):
        # transformers gives the config's top-level original_max_position_embeddings priority
        config = llama_config(
            {
                "rope_type": "yarn",
                "factor": 32.0,
                "original_max_position_embeddings": 8192,
                "rope_theta": BASE,
            },
            max_position_embeddings=131072,
            original_max_position_embeddings=4096,
        )
        s = RopeScaling.from_hf(config)
        assert s.original_max_position_embeddings == 4096
        inv_hf, attention_hf = transformers_table(config)
        inv, attention = s.inv_freq(64, base=BASE)
        assert torch.equal(inv, inv_hf)
        assert attention == attention_hf

    def test_gemma3_nested_per_layer_type(self):
        config = transformers.Gemma3TextConfig(
            hidden_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            num_hidden_layers=2,
            intermediate_size=32,
            vocab_size=32,
            max_position_embeddings=32768,
            rope_parameters={
                "full_attention": {
                    "rope_type": "yarn",
                    "factor": 8.0,
                    "original_max_position_embeddings": 4096,
                    "rope_theta": 1e6,
                },
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        )
        s = RopeScaling.from_hf(config)
        assert (s.method, s.factor, s.original_max_position_embeddings) == ("yarn", 8.0, 4096)
        assert RopeScaling.from_hf(config, layer_type="full_attention") == s
        assert RopeScaling.from_hf(config, layer_type="sliding_attention") == RopeScaling(method="none")
        inv_hf, attention_hf = ROPE_INIT_FUNCTIONS["yarn"](config, layer_type="full_attention")
        inv, attention = s.inv_freq(32, base=1e6)
        assert torch.equal(inv, inv_hf)
        assert attention == attention_hf

    def test_gemma3_default_config_is_none(self):
        assert RopeScaling.from_hf(transformers.Gemma3TextConfig()) == RopeScaling(method="none")

    def test_nested_dict_with_layer_types(self):
        config = {
            "max_position_embeddings": 131072,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            },
        }
        s = RopeScaling.from_hf(config)
        assert (s.method, s.factor) == ("linear", 8.0)
        assert RopeScaling.from_hf(config, layer_type="sliding_attention").method == "none"

    @pytest.mark.parametrize("rope_type", ["yarn", "yarn_rope.ntk-by-parts", "yarn_rope.dynamic-yarn"])
    def test_missing_original_falls_back_to_max_with_warning(self, rope_type, caplog):
        caplog.set_level(logging.WARNING, logger=LOGGER)
        config = {"max_position_embeddings": 8192, "rope_scaling": {"type": rope_type, "factor": 2.0}}
        s = RopeScaling.from_hf(config)
        assert s.original_max_position_embeddings == 8192
        assert s.factor == 2.0
        # the fallback warning names the rope type and the length taken (not only the factor clash)
        messages = warnings_of(caplog)
        assert any(repr(rope_type) in m and "8192" in m for m in messages), messages

    def test_yarn_original_filled_by_transformers(self, caplog):
        caplog.set_level(logging.WARNING, logger=LOGGER)
        config = llama_config(
            {"rope_type": "yarn", "factor": 2.0, "rope_theta": BASE}, max_position_embeddings=8192
        )
        # transformers itself fills original_max_position_embeddings from max_position_embeddings
        assert config.rope_parameters["original_max_position_embeddings"] == 8192
        s = RopeScaling.from_hf(config)
        assert s.original_max_position_embeddings == 8192
        inv_hf, attention_hf = transformers_table(config)
        inv, attention = s.inv_freq(64, base=BASE)
        assert torch.equal(inv, inv_hf)
        assert attention == attention_hf

    def test_missing_factor_derived_from_lengths_like_transformers(self):
        config = {
            "max_position_embeddings": 32768,
            "rope_scaling": {"type": "yarn", "factor": None, "original_max_position_embeddings": 4096},
        }
        s = RopeScaling.from_hf(config)
        assert s.factor == 8.0
        hf = llama_config(config["rope_scaling"] | {"rope_theta": BASE}, max_position_embeddings=32768)
        inv_hf, attention_hf = transformers_table(hf)
        inv, attention = s.inv_freq(64, base=BASE)
        assert torch.equal(inv, inv_hf)
        assert attention == attention_hf

    def test_qwen25_documented_yarn_warns_and_keeps_factor(self, caplog):
        caplog.set_level(logging.WARNING, logger=LOGGER)
        config = {
            "model_type": "qwen2",
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        }
        s = RopeScaling.from_hf(config)
        assert s.factor == 4.0
        assert s.original_max_position_embeddings == 32768
        messages = warnings_of(caplog)
        assert any("factor=4.0" in m for m in messages), messages
        assert s.attention_scaling(s.factor) == pytest.approx(0.1 * math.log(4.0) + 1.0, rel=1e-15)

    def test_qwen25_config_object_matches_transformers(self, caplog):
        caplog.set_level(logging.WARNING, logger=LOGGER)
        config = transformers.Qwen2Config(
            hidden_size=128,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_hidden_layers=1,
            intermediate_size=32,
            vocab_size=32,
            max_position_embeddings=32768,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32768,
                "rope_theta": 1e6,
            },
        )
        s = RopeScaling.from_hf(config)
        assert s.factor == 4.0
        assert warnings_of(caplog)
        inv_hf, attention_hf = transformers_table(config)
        inv, attention = s.inv_freq(64, base=1e6)
        assert torch.equal(inv, inv_hf)
        assert attention == attention_hf

    def test_unknown_keys_warned(self, caplog):
        caplog.set_level(logging.WARNING, logger=LOGGER)
        s = RopeScaling.from_hf(
            {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 4096,
                "low_freq_factor": 1.0,
                "my_knob": 3,
            }
        )
        assert s.factor == 4.0
        messages = warnings_of(caplog)
        assert any("low_freq_factor" in m and "my_knob" in m for m in messages), messages

    def test_model_keys_not_warned(self, caplog):
        caplog.set_level(logging.WARNING, logger=LOGGER)
        RopeScaling.from_hf(
            {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 4096,
                "rope_theta": 1e6,
                "partial_rotary_factor": 0.5,
            }
        )
        assert warnings_of(caplog) == []

    def test_none_and_zero_betas_mean_default_like_transformers(self):
        scaling = {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": None,
            "beta_slow": 0,
            "attention_factor": None,
            "mscale": None,
        }
        s = RopeScaling.from_hf(scaling)
        assert (s.beta_fast, s.beta_slow, s.attention_factor) == (32.0, 1.0, None)
        hf = llama_config(scaling | {"rope_theta": BASE}, max_position_embeddings=16384)
        inv_hf, attention_hf = transformers_table(hf)
        inv, attention = s.inv_freq(64, base=BASE)
        assert torch.equal(inv, inv_hf)
        assert attention == attention_hf

    def test_partial_rotary_factor_left_to_the_model(self):
        scaling = {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 4096,
            "partial_rotary_factor": 0.5,
        }
        s = RopeScaling.from_hf(scaling)
        hf = llama_config(scaling | {"rope_theta": BASE}, max_position_embeddings=16384)
        inv_hf, attention_hf = transformers_table(hf)
        assert inv_hf.shape == (16,)
        inv, attention = s.inv_freq(F.rotary_dim(64, 0.5), base=BASE)
        assert torch.equal(inv, inv_hf)
        assert attention == attention_hf


# ------------------------------------------------------------------------------------------------
# 4. to_hf
# ------------------------------------------------------------------------------------------------

# (settings, config.max_position_embeddings). Each object's own max_position_embeddings is what
# from_hf reads back from such a config, so the round trip through the config is exact too.
VANILLA = [
    pytest.param(RopeScaling(method="none"), 4096, id="none"),
    pytest.param(RopeScaling(method="linear", factor=4.0, max_position_embeddings=16384), 16384, id="linear"),
    pytest.param(
        RopeScaling(method="dynamic-ntk", factor=4.0, original_max_position_embeddings=4096),
        4096,
        id="dynamic-ntk",
    ),
    pytest.param(
        RopeScaling(
            method="yarn", factor=8.0, original_max_position_embeddings=4096, max_position_embeddings=32768
        ),
        32768,
        id="yarn",
    ),
    pytest.param(
        RopeScaling(
            method="yarn",
            factor=32.0,
            original_max_position_embeddings=4096,
            max_position_embeddings=131072,
            beta_fast=128.0,
            beta_slow=2.0,
        ),
        131072,
        id="yarn-betas",
    ),
    pytest.param(
        RopeScaling(
            method="yarn",
            factor=32.0,
            original_max_position_embeddings=4096,
            max_position_embeddings=131072,
            truncate=False,
        ),
        131072,
        id="yarn-truncate-false",
    ),
    pytest.param(
        RopeScaling(
            method="yarn",
            factor=8.0,
            original_max_position_embeddings=4096,
            max_position_embeddings=32768,
            attention_factor=1.25,
        ),
        32768,
        id="yarn-attention-factor",
    ),
    pytest.param(
        RopeScaling(
            method="yarn",
            factor=40.0,
            original_max_position_embeddings=4096,
            max_position_embeddings=163840,
            mscale=1.0,
            mscale_all_dim=0.707,
        ),
        163840,
        id="yarn-mscale",
    ),
    pytest.param(
        RopeScaling(
            method="yarn",
            factor=8.0,
            original_max_position_embeddings=4096,
            max_position_embeddings=32768,
            attn_factor=1.5,
        ),
        32768,
        id="yarn-attn-factor",
    ),
    pytest.param(
        RopeScaling(
            method="yarn",
            factor=16.0,
            original_max_position_embeddings=8192,
            max_position_embeddings=131072,
            beta_fast=128.0,
            beta_slow=2.0,
            mscale_coefficient=0.07,
        ),
        131072,
        id="yarn-mistral-coefficient",
    ),
    pytest.param(
        RopeScaling(
            method="yarn", factor=4.0, original_max_position_embeddings=32768, max_position_embeddings=32768
        ),
        32768,
        id="yarn-qwen25",
    ),
]

# The attention factor each VANILLA setting must give, written from the formulas.
EXPECTED_ATTENTION = {
    "yarn": 0.1 * math.log(8.0) + 1.0,
    "yarn-betas": 0.1 * math.log(32.0) + 1.0,
    "yarn-truncate-false": 0.1 * math.log(32.0) + 1.0,
    "yarn-attention-factor": 1.25,
    "yarn-mscale": (0.1 * math.log(40.0) + 1.0) / (0.1 * 0.707 * math.log(40.0) + 1.0),
    "yarn-attn-factor": 1.5 * (0.1 * math.log(8.0) + 1.0),
    "yarn-mistral-coefficient": 0.07 * math.log(16.0) + 1.0,
    "yarn-qwen25": 0.1 * math.log(4.0) + 1.0,
}

NON_VANILLA = [
    pytest.param(RopeScaling(method="ntk", factor=4.0), id="ntk"),
    pytest.param(
        RopeScaling(method="ntk-by-parts", factor=4.0, original_max_position_embeddings=2048),
        id="ntk-by-parts",
    ),
    pytest.param(
        RopeScaling(
            method="ntk-by-parts", factor=8.0, original_max_position_embeddings=4096, extrapolation_factor=0.0
        ),
        id="ntk-by-parts-no-extrapolation",
    ),
    pytest.param(
        RopeScaling(method="dynamic-yarn", original_max_position_embeddings=4096), id="dynamic-yarn"
    ),
    pytest.param(
        RopeScaling(
            method="dynamic-yarn",
            factor=16.0,
            original_max_position_embeddings=4096,
            finetuned=True,
            beta_fast=128.0,
            beta_slow=2.0,
            mscale_coefficient=0.07,
            attn_factor=1.1,
        ),
        id="dynamic-yarn-finetuned",
    ),
    pytest.param(
        RopeScaling(
            method="yarn", factor=4.0, original_max_position_embeddings=4096, extrapolation_factor=0.5
        ),
        id="yarn-extrapolation-0.5",
    ),
    pytest.param(
        RopeScaling(
            method="yarn",
            factor=4.0,
            original_max_position_embeddings=4096,
            extrapolation_factor=0.5,
            truncate=False,
            attention_factor=1.3,
        ),
        id="yarn-extrapolation-knobs",
    ),
    # Regressions: to_hf() dicts that carry max_position_embeddings, and factor 1.0.
    RopeScaling(
        method="dynamic-yarn",
        factor=16.0,
        original_max_position_embeddings=4096,
        max_position_embeddings=65536,
        finetuned=True,
    ),
    RopeScaling(method="ntk", factor=2.0, max_position_embeddings=8192),
    RopeScaling(method="ntk", factor=1.0),
]


class TestToHF:
    @pytest.mark.parametrize("scaling, max_positions", VANILLA)
    @pytest.mark.parametrize("dim", [64, 128])
    def test_vanilla_transformers_rebuilds_the_same_table(self, scaling, max_positions, dim):
        assert scaling.vanilla_compatible()
        hf = scaling.to_hf()
        assert not hf["rope_type"].startswith(PREFIX)
        assert "rope_theta" not in hf
        base = 500000.0 if dim == 128 else BASE
        config = llama_config(hf | {"rope_theta": base}, max_position_embeddings=max_positions, head_dim=dim)
        inv_hf, attention_hf = transformers_table(config)
        inv, attention = scaling.inv_freq(dim, base=base)
        assert inv.dtype == inv_hf.dtype == torch.float32
        assert torch.equal(inv, inv_hf)
        assert attention == attention_hf

    @pytest.mark.parametrize("scaling, max_positions", VANILLA)
    def test_vanilla_rotary_module_and_round_trip(self, scaling, max_positions, request):
        config = llama_config(scaling.to_hf() | {"rope_theta": BASE}, max_position_embeddings=max_positions)
        rotary = LlamaRotaryEmbedding(config)
        inv, attention = scaling.inv_freq(64, base=BASE)
        assert torch.equal(rotary.inv_freq, inv)
        assert rotary.attention_scaling == attention
        case = request.node.callspec.id
        if case in EXPECTED_ATTENTION:
            assert attention == pytest.approx(EXPECTED_ATTENTION[case], rel=1e-12)
        else:
            assert attention == 1.0
        back = RopeScaling.from_hf(config)
        if scaling.attn_factor == 1.0 and scaling.mscale_coefficient == 0.1:
            assert back == scaling
        else:  # folded into attention_factor: a different spelling of the same table
            assert back.attention_factor == pytest.approx(EXPECTED_ATTENTION[case], rel=1e-12)
            assert (back.attn_factor, back.mscale_coefficient) == (1.0, 0.1)
            back_inv, back_attention = back.inv_freq(64, base=BASE)
            assert torch.equal(back_inv, inv)
            assert back_attention == attention

    def test_none_table_is_plain_rope(self):
        config = llama_config(
            RopeScaling(method="none").to_hf() | {"rope_theta": BASE}, max_position_embeddings=4096
        )
        assert torch.equal(LlamaRotaryEmbedding(config).inv_freq, plain_inv_freq(64, BASE))

    @pytest.mark.parametrize(
        "scaling, expected",
        [
            (RopeScaling(method="none"), {"rope_type": "default"}),
            (RopeScaling(method="linear", factor=4.0), {"rope_type": "linear", "factor": 4.0}),
            (
                RopeScaling(method="dynamic-ntk", factor=2.0, original_max_position_embeddings=4096),
                {"rope_type": "dynamic", "factor": 2.0},
            ),
        ],
    )
    def test_simple_dicts(self, scaling, expected):
        assert scaling.to_hf() == expected

    @pytest.mark.parametrize(
        "kwargs, expected_attention",
        [
            ({"attn_factor": 1.5}, 1.5 * (0.1 * math.log(8.0) + 1.0)),
            ({"mscale_coefficient": 0.07}, 0.07 * math.log(8.0) + 1.0),
            ({"attn_factor": 2.0, "mscale_coefficient": 0.07}, 2.0 * (0.07 * math.log(8.0) + 1.0)),
        ],
    )
    def test_unknown_knobs_folded_into_attention_factor(self, kwargs, expected_attention):
        s = RopeScaling(method="yarn", factor=8.0, original_max_position_embeddings=4096, **kwargs)
        hf = s.to_hf()
        assert hf["rope_type"] == "yarn"
        assert "attn_factor" not in hf and "mscale_coefficient" not in hf
        assert hf["attention_factor"] == pytest.approx(expected_attention, rel=1e-12)

    def test_yarn_dict_passes_transformers_validation_silently(self, caplog):
        """transformers warns about keys it does not know; to_hf must not write any."""
        s = RopeScaling(
            method="yarn",
            factor=8.0,
            original_max_position_embeddings=4096,
            truncate=False,
            mscale=1.0,
            mscale_all_dim=1.0,
        )
        known = {
            "rope_type",
            "factor",
            "original_max_position_embeddings",
            "attention_factor",
            "beta_fast",
            "beta_slow",
            "mscale",
            "mscale_all_dim",
            "truncate",
        }
        assert set(s.to_hf()) <= known

    @pytest.mark.parametrize("scaling", NON_VANILLA)
    def test_non_vanilla_round_trip(self, scaling):
        assert not scaling.vanilla_compatible()
        hf = scaling.to_hf()
        assert hf["rope_type"] == PREFIX + scaling.method
        json.dumps(hf)
        assert RopeScaling.from_hf(hf) == scaling

    @pytest.mark.parametrize("scaling", NON_VANILLA[:7])
    def test_non_vanilla_round_trip_through_config_dict(self, scaling):
        max_positions = scaling.max_position_embeddings or scaling.threshold() or 8192
        config = {"max_position_embeddings": max_positions, "rope_scaling": scaling.to_hf()}
        assert RopeScaling.from_hf(config) == scaling.replace(max_position_embeddings=max_positions)

    @pytest.mark.parametrize("scaling", NON_VANILLA[:7])
    def test_vanilla_transformers_refuses_non_vanilla(self, scaling):
        config = llama_config(
            scaling.to_hf() | {"rope_theta": BASE}, max_position_embeddings=65536, head_dim=16
        )
        with pytest.raises((KeyError, ValueError)):
            LlamaRotaryEmbedding(config)
        assert config.rope_parameters["rope_type"] not in ROPE_INIT_FUNCTIONS

    def test_vanilla_model_refuses_non_vanilla(self):
        s = RopeScaling(
            method="dynamic-yarn", factor=16.0, original_max_position_embeddings=4096, finetuned=True
        )
        config = llama_config(s.to_hf() | {"rope_theta": BASE}, max_position_embeddings=65536, head_dim=16)
        with pytest.raises((KeyError, ValueError)):
            transformers.LlamaForCausalLM(config)

    def test_non_vanilla_dict_keeps_only_non_defaults(self):
        s = RopeScaling(method="ntk-by-parts", factor=4.0, original_max_position_embeddings=2048)
        assert s.to_hf() == {
            "rope_type": "yarn_rope.ntk-by-parts",
            "factor": 4.0,
            "original_max_position_embeddings": 2048,
        }


# ------------------------------------------------------------------------------------------------
# 5. Dynamic methods
# ------------------------------------------------------------------------------------------------


def nous_dynamic_factor(seq_len, *, original, threshold, finetuned, factor):
    """The authors' LlamaDynamicYaRNScaledRotaryEmbedding: fine-tuned factor (or plain RoPE) up
    to the cached length ``threshold``, then seq_len / original."""
    within = (factor if factor is not None else threshold / original) if finetuned else 1.0
    return within if seq_len <= threshold else max(within, seq_len / original)


DYNAMIC = [
    # kwargs, expected threshold
    pytest.param(
        {"factor": 16.0, "max_position_embeddings": 65536, "finetuned": True}, 65536, id="finetuned-64k"
    ),
    pytest.param({"factor": 8.0, "finetuned": True}, 32768, id="finetuned-no-max"),
    pytest.param({"max_position_embeddings": 32768, "finetuned": True}, 32768, id="finetuned-no-factor"),
    pytest.param({"factor": 16.0, "max_position_embeddings": 4096}, 4096, id="not-finetuned"),
    pytest.param({}, 4096, id="not-finetuned-bare"),
    # Not fine-tuned, a target context stated: the factor still grows from L (the paper's rule,
    # s = max(1, seq_len / L)); the authors' module would keep plain RoPE up to 16384 instead.
    pytest.param({"max_position_embeddings": 16384}, 4096, id="not-finetuned-target-16k"),
]
SEQ_LENS = [1, 2048, 4096, 4097, 8192, 16384, 32768, 32769, 65536, 65537, 100000, 262144]


class TestDynamic:
    @pytest.mark.parametrize("kwargs, threshold", DYNAMIC)
    def test_threshold(self, kwargs, threshold):
        s = RopeScaling(method="dynamic-yarn", original_max_position_embeddings=4096, **kwargs)
        assert s.threshold() == threshold

    @pytest.mark.parametrize("kwargs, threshold", DYNAMIC)
    def test_dynamic_factor_nous_semantics(self, kwargs, threshold):
        s = RopeScaling(method="dynamic-yarn", original_max_position_embeddings=4096, **kwargs)
        for seq_len in SEQ_LENS:
            expected = nous_dynamic_factor(
                seq_len,
                original=4096,
                threshold=threshold,
                finetuned=kwargs.get("finetuned", False),
                factor=kwargs.get("factor"),
            )
            assert s.dynamic_factor(seq_len) == pytest.approx(expected, rel=1e-15), seq_len

    def test_dynamic_factor_spot_values(self):
        tuned = RopeScaling(
            method="dynamic-yarn",
            factor=16.0,
            original_max_position_embeddings=4096,
            max_position_embeddings=65536,
            finetuned=True,
        )
        assert [tuned.dynamic_factor(n) for n in (1, 65536, 131072)] == [16.0, 16.0, 32.0]
        assert tuned.dynamic_factor(65537) == 65537 / 4096
        plain = RopeScaling(method="dynamic-yarn", original_max_position_embeddings=4096)
        assert [plain.dynamic_factor(n) for n in (1, 4096, 8192, 16384)] == [1.0, 1.0, 2.0, 4.0]

    @pytest.mark.parametrize("kwargs, threshold", DYNAMIC)
    @pytest.mark.parametrize("seq_len", [None, 1000, 4096, 20000, 65536, 131072])
    def test_inv_freq_is_yarn_at_the_dynamic_factor(self, kwargs, threshold, seq_len):
        dim = 64
        s = RopeScaling(method="dynamic-yarn", original_max_position_embeddings=4096, **kwargs)
        n = threshold if seq_len is None else seq_len
        factor = nous_dynamic_factor(
            n, original=4096, threshold=threshold, finetuned=s.finetuned, factor=kwargs.get("factor")
        )
        inv, attention = s.inv_freq(dim, base=BASE, seq_len=seq_len)
        expected = F.yarn_inv_freq(dim, base=BASE, factor=factor, original_max_position_embeddings=4096)
        assert torch.equal(inv, expected)
        assert attention == pytest.approx(paper_mscale(factor), rel=1e-12)

    def test_inv_freq_passes_knobs_at_dynamic_factor(self):
        s = RopeScaling(
            method="dynamic-yarn",
            factor=8.0,
            original_max_position_embeddings=4096,
            finetuned=True,
            beta_fast=128.0,
            beta_slow=2.0,
            mscale_coefficient=0.07,
            truncate=False,
        )
        inv, attention = s.inv_freq(64, base=BASE, seq_len=65536)
        expected = F.yarn_inv_freq(
            64,
            base=BASE,
            factor=16.0,
            original_max_position_embeddings=4096,
            beta_fast=128.0,
            beta_slow=2.0,
            truncate=False,
        )
        assert torch.equal(inv, expected)
        assert attention == pytest.approx(0.07 * math.log(16.0) + 1.0, rel=1e-12)

    def test_inv_freq_grows_monotonically_with_length(self):
        s = RopeScaling(method="dynamic-yarn", original_max_position_embeddings=4096)
        tables = [s.inv_freq(64, base=BASE, seq_len=n)[0] for n in (4096, 8192, 16384, 32768)]
        assert torch.equal(tables[0], plain_inv_freq(64, BASE))
        for shorter, longer in itertools.pairwise(tables):
            assert torch.all(longer <= shorter)
            assert torch.any(longer < shorter)

    @pytest.mark.parametrize("seq_len", [None, 1000, 4096, 4097, 10000, 65536])
    def test_dynamic_ntk_matches_transformers(self, seq_len):
        s = RopeScaling(method="dynamic-ntk", factor=2.0, original_max_position_embeddings=4096)
        assert s.threshold() == 4096
        config = llama_config(s.to_hf() | {"rope_theta": BASE}, max_position_embeddings=4096)
        inv_hf, attention_hf = transformers_table(config, seq_len=seq_len)
        inv, attention = s.inv_freq(64, base=BASE, seq_len=seq_len)
        assert torch.equal(inv, inv_hf)
        assert attention == attention_hf == 1.0

    def test_static_methods_ignore_seq_len(self):
        s = RopeScaling(method="yarn", factor=8.0, original_max_position_embeddings=4096)
        a, _ = s.inv_freq(64, base=BASE)
        b, _ = s.inv_freq(64, base=BASE, seq_len=1_000_000)
        assert torch.equal(a, b)
