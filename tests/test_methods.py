"""Tests of yarn_rope.methods: the method registry, and the public names that hang off it.

The registry is the one place that knows what a method is; these tests hold it to that: every
``RopeScaling`` field is a declared setting, every method's table and ``to_hf`` / ``from_hf``
agree, and transformers rebuilds the table of every method it computes (its own functions are
the golden, not yarn_rope's).
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import warnings

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import yarn_rope
from yarn_rope import methods as M
from yarn_rope.config import RopeScaling

pytestmark = pytest.mark.usefixtures("quiet_transformers")

DIM, BASE = 64, 10000.0
_PAIRS = DIM // 2

# Typical settings of every method (what a user or a config would state).
TYPICAL: dict[str, dict] = {
    "none": {},
    "linear": {"factor": 4.0},
    "ntk": {"factor": 4.0},
    "ntk-by-parts": {"factor": 4.0, "original_max_position_embeddings": 2048},
    "dynamic-ntk": {"factor": 2.0, "original_max_position_embeddings": 2048},
    "yarn": {"factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 64.0},
    "dynamic-yarn": {"original_max_position_embeddings": 4096, "factor": 4.0, "finetuned": True},
    "llama3": {
        "factor": 8.0,
        "original_max_position_embeddings": 8192,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    },
    "longrope": {
        "original_max_position_embeddings": 4096,
        "max_position_embeddings": 131072,
        "short_factor": tuple(1.0 + 0.01 * i for i in range(_PAIRS)),
        "long_factor": tuple(1.0 + 0.5 * i for i in range(_PAIRS)),
    },
}


def test_every_method_has_typical_settings_here():
    assert set(TYPICAL) == set(M.METHODS)


class TestRegistry:
    def test_methods_are_the_registered_specs(self):
        assert M.METHODS == tuple(spec.name for spec in M.registered())
        assert yarn_rope.METHODS is M.METHODS
        assert M.DYNAMIC_METHODS == {"dynamic-ntk", "dynamic-yarn", "longrope"}

    def test_rope_scaling_fields_are_the_declared_settings(self):
        fields = {field.name: field.default for field in dataclasses.fields(RopeScaling)}
        assert set(fields) == {"method"} | set(M.SETTINGS)
        for name, setting in M.SETTINGS.items():
            assert fields[name] == setting.default, name

    def test_every_spec_names_only_declared_settings(self):
        for spec in M.registered():
            assert set(spec.settings) <= set(M.SETTINGS)
            assert set(spec.required) <= set(spec.accepted) | set(M.CONTEXT_SETTINGS)
            assert spec.dynamic == (spec.threshold is not None) == (spec.table_key is not None)

    @pytest.mark.parametrize(
        ("spelling", "method"),
        [
            ("default", "none"),
            ("dynamic", "dynamic-ntk"),
            ("su", "longrope"),
            ("yarn_rope.ntk-by-parts", "ntk-by-parts"),
            *[(name, name) for name in M.METHODS],
        ],
    )
    def test_spellings(self, spelling, method):
        spec = M.lookup_rope_type(spelling)
        assert spec is not None and spec.name == method

    @pytest.mark.parametrize("spelling", ["YaRN", "yarn_rope.yarn2", "proportional", ""])
    def test_unknown_spellings(self, spelling):
        assert M.lookup_rope_type(spelling) is None

    def test_register_refuses_a_taken_spelling_and_undeclared_settings(self):
        spec = M.get("linear")
        with pytest.raises(ValueError, match="already registered"):
            M.register(dataclasses.replace(spec, name="linear2", aliases=("default",)))
        with pytest.raises(ValueError, match="undeclared settings"):
            M.register(dataclasses.replace(spec, name="linear3", settings=("temperature",)))
        assert "linear2" not in M.METHODS and "linear3" not in M.METHODS

    def test_register_refuses_a_method_that_leaves_an_engine_unanswered(self):
        spec = M.get("linear")
        without = {engine: spelling for engine, spelling in spec.engines.items() if engine != "sglang"}
        with pytest.raises(ValueError, match=r"no spelling for engine.*sglang"):
            M.register(dataclasses.replace(spec, name="linear4", engines=without))
        with pytest.raises(ValueError, match=r"unknown engine.*tgi"):
            M.register(
                dataclasses.replace(
                    spec, name="linear5", engines={**spec.engines, "tgi": spec.engines["vllm"]}
                )
            )
        assert "linear4" not in M.get("linear").name and M.lookup_rope_type("linear4") is None

    def test_every_method_answers_every_engine(self):
        for spec in M.registered():
            assert set(spec.engines) == set(M.ENGINES), spec.name

    def test_name_checks_are_spec_fields(self):
        assert [s.name for s in M.registered() if s.length_is_original] == ["dynamic-ntk"]
        assert [s.name for s in M.registered() if s.factor_is_key] == ["dynamic-yarn"]
        assert {s.name for s in M.registered() if not s.states_target} == {"none", "llama3", "longrope"}


class TestEveryMethod:
    @pytest.mark.parametrize("method", M.METHODS)
    def test_table_shape_dtype_and_bounds(self, method):
        scaling = RopeScaling(method=method, **TYPICAL[method])
        table, attention = scaling.inv_freq(DIM, base=BASE)
        plain = yarn_rope.default_inv_freq(DIM, base=BASE)
        assert table.dtype == torch.float32 and table.shape == (_PAIRS,)
        assert torch.all(table > 0) and torch.all(table <= plain * (1 + 1e-6))  # scaling only slows pairs
        assert attention >= 1.0
        by_name, by_name_attention = yarn_rope.inv_freq(method, DIM, base=BASE, **_call_params(scaling))
        assert torch.equal(by_name, table) and by_name_attention == attention

    @pytest.mark.parametrize("method", M.METHODS)
    def test_to_hf_round_trip(self, method):
        scaling = RopeScaling(method=method, **TYPICAL[method])
        hf = scaling.to_hf()
        config = {"max_position_embeddings": scaling.context_length() or 4096, "rope_parameters": hf}
        read = RopeScaling.from_hf(config)
        assert torch.equal(read.inv_freq(DIM, base=BASE)[0], scaling.inv_freq(DIM, base=BASE)[0])
        assert read.attention_scaling() == scaling.attention_scaling()
        assert read.method == scaling.method

    @pytest.mark.parametrize(
        "method", [spec.name for spec in M.registered() if spec.transformers is not None]
    )
    def test_vanilla_transformers_rebuilds_the_table(self, method):
        scaling = RopeScaling(method=method, **TYPICAL[method])
        assert scaling.vanilla_compatible()
        hf = scaling.to_hf()
        assert hf["rope_type"] == scaling.spec.transformers.rope_type
        config = transformers.LlamaConfig(
            hidden_size=2 * DIM,
            num_attention_heads=2,
            head_dim=DIM,
            num_hidden_layers=1,
            intermediate_size=8,
            vocab_size=8,
            max_position_embeddings=scaling.context_length() or 4096,
            rope_parameters=hf | {"rope_theta": BASE},
        )
        if method == "none":
            from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

            expected, expected_attention = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
        else:
            expected, expected_attention = ROPE_INIT_FUNCTIONS[hf["rope_type"]](config, None)
        table, attention = scaling.inv_freq(DIM, base=BASE)
        assert torch.equal(table, expected)
        assert attention == pytest.approx(expected_attention, rel=1e-15)

    @pytest.mark.parametrize("method", [spec.name for spec in M.registered() if spec.transformers is None])
    def test_what_transformers_cannot_compute_is_written_as_ours(self, method):
        hf = RopeScaling(method=method, **TYPICAL[method]).to_hf()
        assert hf["rope_type"] == M.PREFIX + method

    @pytest.mark.parametrize("method", [m for m in M.METHODS if "factor" in M.get(m).required])
    def test_factor_one_is_plain_rope(self, method):
        settings = {**TYPICAL[method], "factor": 1.0}
        settings.pop("max_position_embeddings", None)
        table, attention = RopeScaling(method=method, **settings).inv_freq(DIM, base=BASE)
        assert torch.equal(table, yarn_rope.default_inv_freq(DIM, base=BASE))
        assert attention == 1.0


def _call_params(scaling: RopeScaling) -> dict:
    params = scaling.params()
    if scaling.method == "dynamic-ntk":  # inv_freq also takes transformers' name of the threshold
        params.pop("max_position_embeddings", None)
    if scaling.is_dynamic:
        params["seq_len"] = scaling.threshold()
    return params


class TestSettingsValidation:
    def test_settings_of_other_methods_are_refused_with_their_owners(self):
        with pytest.raises(ValueError) as info:
            RopeScaling(method="linear", factor=2.0, low_freq_factor=1.0)
        message = str(info.value)
        assert "low_freq_factor=1.0" in message and "'linear'" in message and "llama3" in message

    def test_from_hf_ignores_other_methods_keys_with_a_warning(self, caplog):
        caplog.set_level(logging.WARNING, logger="yarn_rope.config")
        scaling = RopeScaling.from_hf({"rope_type": "linear", "factor": 2.0, "beta_fast": 32})
        assert scaling == RopeScaling(method="linear", factor=2.0)
        assert any("beta_fast" in record.getMessage() for record in caplog.records)

    @pytest.mark.parametrize(
        ("kwargs", "needles"),
        [
            ({"method": "yarn", "factor": 1e300, "original_max_position_embeddings": 4096},
             ["factor", "1e+300"]),
            ({"method": "linear", "factor": 1e300}, ["factor"]),
            ({"method": "yarn", "factor": 1e308, "original_max_position_embeddings": 4096}, ["factor"]),
            ({"method": "yarn", "factor": 4.0, "original_max_position_embeddings": 10**400}, ["original"]),
            ({"method": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
              "max_position_embeddings": 10**400}, ["max_position_embeddings"]),
            ({"method": "linear", "factor": 10**400}, ["factor"]),
        ],
    )  # fmt: skip
    def test_extreme_values_are_refused_naming_the_field(self, kwargs, needles):
        with pytest.raises(ValueError) as info:
            RopeScaling(**kwargs)
        for needle in needles:
            assert needle in str(info.value)

    def test_no_inverse_frequency_may_underflow(self):
        # Allowed by the length bound, but the table itself would underflow float32.
        scaling = RopeScaling(method="linear", factor=2.0**52)
        with pytest.raises(ValueError, match="underflow"):
            scaling.inv_freq(DIM, base=1e30)

    def test_replace_does_not_repeat_a_lengths_warning(self, caplog):
        caplog.set_level(logging.WARNING, logger="yarn_rope.config")
        qwen = RopeScaling(
            method="yarn", factor=4.0, original_max_position_embeddings=32768, max_position_embeddings=32768
        )
        assert len(caplog.records) == 1
        qwen.replace(beta_fast=64.0)
        assert len(caplog.records) == 1  # same lengths: already said
        qwen.replace(factor=2.0)
        assert len(caplog.records) == 2  # new lengths, still inconsistent: said again


class TestPublicNames:
    def test_star_import_does_not_shadow_builtins(self):
        code = (
            "import builtins\n"
            "from yarn_rope import *\n"
            "assert eval is builtins.eval, 'eval shadowed'\n"
            "assert all(not hasattr(builtins, name) for name in __import__('yarn_rope').__all__)\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True)

    def test_errors_at_top_level(self):
        from yarn_rope.cache import UnsupportedCacheError
        from yarn_rope.patch import UnsupportedModelError

        assert yarn_rope.UnsupportedCacheError is UnsupportedCacheError
        assert yarn_rope.UnsupportedModelError is UnsupportedModelError
        assert {"UnsupportedCacheError", "UnsupportedModelError", "MethodSpec"} <= set(yarn_rope.__all__)

    def test_dead_names_are_gone(self):
        assert not hasattr(yarn_rope.frequencies, "STATIC_METHODS")
        assert not hasattr(yarn_rope.RotaryEmbedding, "reset_table")

    def test_one_name_for_the_attention_scaling(self):
        scaling = RopeScaling(method="yarn", factor=8.0, original_max_position_embeddings=4096)
        rotary = yarn_rope.RotaryEmbedding(DIM, base=BASE, scaling=scaling)
        value = yarn_rope.yarn_attention_scaling(8.0)
        assert scaling.attention_scaling() == rotary.attention_scaling == value == yarn_rope.yarn_mscale(8.0)

    @pytest.mark.parametrize(
        ("get", "new"),
        [
            (lambda: yarn_rope.yarn_attention_factor, yarn_rope.yarn_attention_scaling),
            (lambda: yarn_rope.frequencies.inv_freq, M.inv_freq),
            (lambda: yarn_rope.frequencies.METHODS, M.METHODS),
            (lambda: yarn_rope.frequencies.check_method, M.check_method),
        ],
        ids=[
            "yarn_attention_factor",
            "frequencies.inv_freq",
            "frequencies.METHODS",
            "frequencies.check_method",
        ],
    )
    def test_renamed_names_keep_a_deprecated_alias(self, get, new):
        with pytest.warns(DeprecationWarning, match="next release"):
            assert get() is new

    def test_attention_scale_is_a_deprecated_alias(self):
        scaling = RopeScaling(method="yarn", factor=8.0, original_max_position_embeddings=4096)
        with pytest.warns(DeprecationWarning, match="attention_scaling"):
            assert scaling.attention_scale(8.0) == scaling.attention_scaling(8.0)

    def test_current_names_do_not_warn(self):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert callable(yarn_rope.inv_freq) and callable(yarn_rope.yarn_attention_scaling)
