"""Tests of ``yarn_rope.frequencies``: the rotary frequency tables and attention factors.

Where the expected values come from:

* ``tests/data/yarn_reference.json``: float32 figures computed by the YaRN authors' own code
  (github jquesnelle/yarn, ``scaled_rope/*.py``, commit 995db5b) with torch. They are ground
  truth; nothing in this file is copied from ``yarn_rope``'s own output.
* The installed ``transformers`` (``ROPE_INIT_FUNCTIONS``), compared bit for bit.
* A float64 re-derivation of the YaRN formulas written below, independent of the module.
* Closed-form properties (identity at factor 1, ``0.1 ln s + 1``, ...).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch

import yarn_rope
import yarn_rope.frequencies as frequencies
from yarn_rope.frequencies import (
    default_inv_freq,
    dynamic_factor,
    dynamic_ntk_inv_freq,
    interpolation_ramp,
    linear_inv_freq,
    llama3_inv_freq,
    longrope_attention_scaling,
    longrope_inv_freq,
    ntk_by_parts_inv_freq,
    ntk_inv_freq,
    rotary_dim,
    yarn_correction_range,
    yarn_inv_freq,
    yarn_mscale,
)
from yarn_rope.frequencies import yarn_attention_scaling as yarn_attention_factor
from yarn_rope.methods import METHODS, check_method, inv_freq

# Methods the authors' code (the reference figures) predates; tested against transformers.
_NEWER_METHODS = {"llama3", "longrope"}

REFERENCE_PATH = Path(__file__).parent / "data" / "yarn_reference.json"
REFERENCE_CASES = json.loads(REFERENCE_PATH.read_text())["cases"]
PACKAGE_DIR = Path(frequencies.__file__).resolve().parent

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _case_params(case: dict) -> tuple[int, float, dict]:
    """``(dim, base, params)`` of a reference case, ``params`` ready for :func:`inv_freq`."""
    params = {k: v for k, v in case["params"].items() if k not in ("dim", "base", "note")}
    return case["params"]["dim"], case["params"]["base"], params


def _fp32_rows(
    inv: torch.Tensor, positions: list[int], scale: float, *, position_divisor: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin rows built as the reference and transformers do: float32 angles."""
    pos = torch.tensor(positions, dtype=torch.float32)
    if position_divisor is not None:
        pos = pos / position_divisor
    angle = pos[:, None] * inv.to(torch.float32)[None, :]
    emb = torch.cat((angle, angle), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def _reference_rows(case: dict) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    rows = case["cos_sin_float32"]
    positions = sorted(int(p) for p in rows)
    cos = torch.tensor([rows[str(p)]["cos"] for p in positions], dtype=torch.float64)
    sin = torch.tensor([rows[str(p)]["sin"] for p in positions], dtype=torch.float64)
    return positions, cos, sin


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, what: str) -> None:
    gap = (actual.to(torch.float64) - expected.to(torch.float64)).abs().max().item()
    assert gap <= atol, f"{what}: max abs difference {gap:.3g} > {atol:.3g}"


def _theta64(dim: int, base: float) -> list[float]:
    """Plain RoPE frequencies ``base^(-2i/d)`` in float64."""
    return [base ** (-2.0 * i / dim) for i in range(dim // 2)]


def _rotations64(i: float, dim: int, base: float, original: int) -> float:
    """``r(i) = L / lambda_i``: turns of pair ``i`` over the original context (float64)."""
    wavelength = 2.0 * math.pi * base ** (2.0 * i / dim)
    return original / wavelength


def _pair_where64(rotations: float, dim: int, base: float, original: int) -> float:
    """The fractional pair index ``i`` where ``r(i) == rotations``, solved in float64."""
    # L / (2 pi base^(2i/d)) = beta  <=>  2i/d = log_base(L / (2 pi beta))
    return dim / 2.0 * math.log(original / (2.0 * math.pi * rotations), base)


def _paper_yarn64(
    dim: int, base: float, factor: float, original: int, beta_fast: float, beta_slow: float
) -> tuple[torch.Tensor, int, int]:
    """YaRN frequencies in float64 from the definitions, with the ramp bounds (low, high)."""
    low = max(math.floor(_pair_where64(beta_fast, dim, base, original)), 0)
    high = min(math.ceil(_pair_where64(beta_slow, dim, base, original)), dim - 1)
    out = []
    for i, theta in enumerate(_theta64(dim, base)):
        if low == high:  # degenerate ramp: a step just after ``low``
            ramp = 1.0 if i > low else 0.0
        else:
            ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        out.append((1.0 - ramp) * theta + ramp * theta / factor)
    return torch.tensor(out, dtype=torch.float64), low, high


def _random_settings(seed: int) -> dict:
    rng = random.Random(seed)
    beta_fast = rng.uniform(4.0, 128.0)
    return {
        "dim": rng.choice([16, 32, 64, 80, 96, 128, 160, 256]),
        "base": math.exp(rng.uniform(math.log(500.0), math.log(1e6))),
        "factor": rng.uniform(1.1, 64.0),
        "original": rng.randint(128, 131072),
        "beta_fast": beta_fast,
        "beta_slow": rng.uniform(0.5, min(beta_fast, 4.0)),
    }


def _yarn(dim: int, base: float, factor: float, original: int = 4096, **kwargs) -> torch.Tensor:
    return yarn_inv_freq(dim, base=base, factor=factor, original_max_position_embeddings=original, **kwargs)


def _yarn_from(s: dict, **kwargs) -> torch.Tensor:
    """:func:`yarn_inv_freq` at the settings of :func:`_random_settings`."""
    betas = {"beta_fast": s["beta_fast"], "beta_slow": s["beta_slow"]}
    return _yarn(s["dim"], s["base"], s["factor"], s["original"], **betas, **kwargs)


# --------------------------------------------------------------------------------------------
# 1. The authors' figures
# --------------------------------------------------------------------------------------------


def _ids(cases: list[dict]) -> list[str]:
    return [case["name"] for case in cases]


_SCALED_CASES = [case for case in REFERENCE_CASES if case["method"] != "linear"]
_LINEAR_CASES = [case for case in REFERENCE_CASES if case["method"] == "linear"]
_DYNAMIC_YARN_CASES = [case for case in REFERENCE_CASES if case["method"] == "dynamic-yarn"]


class TestReferenceCases:
    def test_file_covers_every_method_but_none(self):
        assert {case["method"] for case in REFERENCE_CASES} == set(METHODS) - {"none"} - _NEWER_METHODS

    @pytest.mark.parametrize("case", _SCALED_CASES, ids=_ids(_SCALED_CASES))
    def test_inv_freq_bit_equal(self, case):
        dim, base, params = _case_params(case)
        inv, _ = inv_freq(case["method"], dim, base=base, **params)
        expected = torch.tensor(case["inv_freq"], dtype=torch.float32)
        assert inv.dtype == torch.float32
        assert inv.shape == (dim // 2,)
        assert torch.equal(inv, expected), (inv - expected).abs().max()

    @pytest.mark.parametrize("case", REFERENCE_CASES, ids=_ids(REFERENCE_CASES))
    def test_attention_factor(self, case):
        dim, base, params = _case_params(case)
        _, attention = inv_freq(case["method"], dim, base=base, **params)
        assert isinstance(attention, float)
        assert attention == pytest.approx(case.get("mscale", 1.0), rel=1e-12)

    @pytest.mark.parametrize("case", _SCALED_CASES, ids=_ids(_SCALED_CASES))
    def test_cos_sin_rows(self, case):
        dim, base, params = _case_params(case)
        inv, attention = inv_freq(case["method"], dim, base=base, **params)
        positions, ref_cos, ref_sin = _reference_rows(case)
        assert ref_cos.shape == (len(positions), dim)
        cos, sin = _fp32_rows(inv, positions, attention)
        _assert_close(cos, ref_cos, atol=2e-6, what="cos")
        _assert_close(sin, ref_sin, atol=2e-6, what="sin")

    @pytest.mark.parametrize("case", _DYNAMIC_YARN_CASES, ids=_ids(_DYNAMIC_YARN_CASES))
    def test_dynamic_effective_factor(self, case):
        _, _, params = _case_params(case)
        got = dynamic_factor(
            params["seq_len"],
            original_max_position_embeddings=params["original_max_position_embeddings"],
            max_position_embeddings=params.get("max_position_embeddings"),
            factor=params.get("factor"),
            finetuned=params.get("finetuned", False),
        )
        assert got == case["effective_factor"]

    @pytest.mark.parametrize("case", _DYNAMIC_YARN_CASES, ids=_ids(_DYNAMIC_YARN_CASES))
    def test_dynamic_yarn_is_static_yarn_at_effective_factor(self, case):
        dim, base, params = _case_params(case)
        dynamic, _ = inv_freq("dynamic-yarn", dim, base=base, **params)
        static = _yarn(dim, base, case["effective_factor"], params["original_max_position_embeddings"])
        assert torch.equal(dynamic, static)

    @pytest.mark.parametrize("case", _LINEAR_CASES, ids=_ids(_LINEAR_CASES))
    def test_linear_inv_freq(self, case):
        dim, base, params = _case_params(case)
        unscaled = torch.tensor(case["inv_freq_unscaled"], dtype=torch.float32)
        plain, _ = inv_freq("none", dim, base=base)
        assert torch.equal(plain, unscaled)
        inv, attention = inv_freq("linear", dim, base=base, **params)
        assert attention == 1.0
        torch.testing.assert_close(inv, unscaled / params["factor"], rtol=1e-6, atol=0)

    @pytest.mark.parametrize("case", _LINEAR_CASES, ids=_ids(_LINEAR_CASES))
    def test_linear_cos_sin_rows(self, case):
        dim, base, params = _case_params(case)
        positions, ref_cos, ref_sin = _reference_rows(case)
        # Our form (inv_freq divided): equal up to fp32 rounding of the angles.
        inv, attention = inv_freq("linear", dim, base=base, **params)
        cos, sin = _fp32_rows(inv, positions, attention)
        _assert_close(cos, ref_cos, atol=2e-4, what="cos, inv_freq divided")
        _assert_close(sin, ref_sin, atol=2e-4, what="sin, inv_freq divided")
        # The reference form (positions divided) reproduces the rows.
        plain, _ = inv_freq("none", dim, base=base)
        cos, sin = _fp32_rows(plain, positions, 1.0, position_divisor=params["factor"])
        _assert_close(cos, ref_cos, atol=2e-6, what="cos, positions divided")
        _assert_close(sin, ref_sin, atol=2e-6, what="sin, positions divided")


# --------------------------------------------------------------------------------------------
# 2. Parity with transformers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf():
    """``(ROPE_INIT_FUNCTIONS, make_config)`` from the installed transformers, warnings silenced."""
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()

    def make_config(head_dim: int, max_position_embeddings: int, rope_parameters: dict, heads: int = 4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return transformers.LlamaConfig(
                hidden_size=head_dim * heads,
                num_attention_heads=heads,
                head_dim=head_dim,
                max_position_embeddings=max_position_embeddings,
                rope_parameters=dict(rope_parameters),
            )

    def compute(rope_type: str, config, seq_len: int | None = None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return rope_utils.ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len)

    return compute, make_config


DIMS = [16, 64, 96, 128, 256]
BASES = [10000.0, 500000.0, 1e6]
FACTORS = [1.5, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
ORIGINALS = [256, 2048, 4096, 8192, 32768]
BETAS = [(32, 1), (16, 2), (128, 2)]


def _yarn_rope_parameters(base, factor, original, **extra) -> dict:
    return {
        "rope_type": "yarn",
        "rope_theta": base,
        "factor": factor,
        "original_max_position_embeddings": original,
        **extra,
    }


class TestTransformersParity:
    @pytest.mark.parametrize("truncate", [True, False])
    @pytest.mark.parametrize("factor", FACTORS)
    @pytest.mark.parametrize("base", BASES)
    @pytest.mark.parametrize("dim", DIMS)
    def test_yarn_grid(self, hf, dim, base, factor, truncate):
        compute, make_config = hf
        for original in ORIGINALS:
            for beta_fast, beta_slow in BETAS:
                settings = {"beta_fast": beta_fast, "beta_slow": beta_slow, "truncate": truncate}
                config = make_config(
                    dim, round(factor * original), _yarn_rope_parameters(base, factor, original, **settings)
                )
                expected, expected_attention = compute("yarn", config)
                ours, attention = inv_freq(
                    "yarn",
                    dim,
                    base=base,
                    factor=factor,
                    original_max_position_embeddings=original,
                    **settings,
                )
                where = f"original={original}, betas=({beta_fast}, {beta_slow})"
                assert torch.equal(ours, expected), f"{where}: {(ours - expected).abs().max()}"
                assert attention == expected_attention, where

    @pytest.mark.parametrize("attention_factor", [0.5, 1.0, 1.3])
    @pytest.mark.parametrize("factor", [2.0, 16.0, 40.0])
    def test_yarn_attention_factor_override(self, hf, factor, attention_factor):
        compute, make_config = hf
        rope = _yarn_rope_parameters(1e4, factor, 4096, attention_factor=attention_factor)
        expected, expected_attention = compute("yarn", make_config(128, round(factor * 4096), rope))
        ours, attention = inv_freq(
            "yarn",
            128,
            base=1e4,
            factor=factor,
            original_max_position_embeddings=4096,
            attention_factor=attention_factor,
        )
        assert torch.equal(ours, expected)
        assert attention == expected_attention == attention_factor

    @pytest.mark.parametrize(
        ("mscale", "mscale_all_dim"),
        [(1.0, 1.0), (1.0, 0.707), (0.707, 1.0), (1.0, 0.0), (0.0, 1.0), (2.0, 0.5)],
    )
    @pytest.mark.parametrize("factor", [4.0, 40.0])
    def test_yarn_deepseek_mscale(self, hf, factor, mscale, mscale_all_dim):
        compute, make_config = hf
        rope = _yarn_rope_parameters(1e4, factor, 4096, mscale=mscale, mscale_all_dim=mscale_all_dim)
        expected, expected_attention = compute("yarn", make_config(64, round(factor * 4096), rope))
        ours, attention = inv_freq(
            "yarn",
            64,
            base=1e4,
            factor=factor,
            original_max_position_embeddings=4096,
            mscale=mscale,
            mscale_all_dim=mscale_all_dim,
        )
        assert torch.equal(ours, expected)
        assert attention == pytest.approx(expected_attention, rel=1e-12)

    @pytest.mark.parametrize("factor", FACTORS)
    @pytest.mark.parametrize("base", BASES)
    @pytest.mark.parametrize("dim", DIMS)
    def test_linear(self, hf, dim, base, factor):
        compute, make_config = hf
        config = make_config(dim, 4096, {"rope_type": "linear", "rope_theta": base, "factor": factor})
        expected, expected_attention = compute("linear", config)
        ours, attention = inv_freq("linear", dim, base=base, factor=factor)
        assert torch.equal(ours, expected)
        assert torch.equal(linear_inv_freq(dim, base=base, factor=factor), expected)
        assert attention == expected_attention == 1.0

    @pytest.mark.parametrize("max_position_embeddings", [2048, 4096])
    @pytest.mark.parametrize("factor", [1.5, 2.0, 4.0, 8.0])
    @pytest.mark.parametrize("base", BASES)
    @pytest.mark.parametrize("dim", DIMS)
    def test_dynamic_ntk(self, hf, dim, base, factor, max_position_embeddings):
        compute, make_config = hf
        limit = max_position_embeddings
        config = make_config(dim, limit, {"rope_type": "dynamic", "rope_theta": base, "factor": factor})
        for seq_len in [1, limit // 2, limit, limit + 1, 2 * limit, 3 * limit + 7, 10 * limit]:
            expected, _ = compute("dynamic", config, seq_len)
            ours, attention = inv_freq(
                "dynamic-ntk",
                dim,
                base=base,
                factor=factor,
                original_max_position_embeddings=config.max_position_embeddings,
                seq_len=seq_len,
            )
            assert torch.equal(ours, expected), f"seq_len={seq_len}"
            assert attention == 1.0
            # transformers' own name for the threshold is accepted too
            alias, _ = inv_freq(
                "dynamic-ntk", dim, base=base, factor=factor, max_position_embeddings=limit, seq_len=seq_len
            )
            assert torch.equal(alias, expected), f"seq_len={seq_len}"

    @pytest.mark.parametrize(
        ("head_dim", "partial"), [(128, 0.5), (80, 0.4), (96, 0.25), (64, 0.75), (128, 0.32)]
    )
    def test_partial_rotary(self, hf, head_dim, partial):
        compute, make_config = hf
        dim = rotary_dim(head_dim, partial)
        assert dim == int(head_dim * partial)
        extra = {"partial_rotary_factor": partial}
        yarn_config = make_config(head_dim, 32768, _yarn_rope_parameters(1e4, 8.0, 4096, **extra))
        expected, expected_attention = compute("yarn", yarn_config)
        ours, attention = inv_freq("yarn", dim, base=1e4, factor=8.0, original_max_position_embeddings=4096)
        assert ours.shape == (dim // 2,)
        assert torch.equal(ours, expected)
        assert attention == expected_attention

        linear_config = make_config(
            head_dim, 4096, {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0, **extra}
        )
        assert torch.equal(
            inv_freq("linear", dim, base=1e4, factor=4.0)[0], compute("linear", linear_config)[0]
        )

        dynamic_config = make_config(
            head_dim, 4096, {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0, **extra}
        )
        ours, _ = inv_freq(
            "dynamic-ntk", dim, base=1e4, factor=4.0, original_max_position_embeddings=4096, seq_len=9000
        )
        assert torch.equal(ours, compute("dynamic", dynamic_config, 9000)[0])


# --------------------------------------------------------------------------------------------
# 3. Independent float64 derivation
# --------------------------------------------------------------------------------------------


class TestFloat64Derivation:
    @pytest.mark.parametrize("seed", range(40))
    def test_yarn_table_matches(self, seed):
        s = _random_settings(seed)
        expected, _, _ = _paper_yarn64(**s)
        ours = _yarn_from(s)
        torch.testing.assert_close(ours.to(torch.float64), expected, rtol=1e-6, atol=0, msg=str(s))

    @pytest.mark.parametrize("seed", range(40))
    def test_correction_range_is_floor_ceil(self, seed):
        s = _random_settings(seed)
        dim, base, original = s["dim"], s["base"], s["original"]
        fast = _pair_where64(s["beta_fast"], dim, base, original)
        slow = _pair_where64(s["beta_slow"], dim, base, original)
        # The derivation itself: at those indices the pairs turn beta times over L.
        assert _rotations64(fast, dim, base, original) == pytest.approx(s["beta_fast"], rel=1e-12)
        assert _rotations64(slow, dim, base, original) == pytest.approx(s["beta_slow"], rel=1e-12)
        kwargs = {"base": base, "original_max_position_embeddings": original}
        kwargs |= {"beta_fast": s["beta_fast"], "beta_slow": s["beta_slow"]}
        low, high = yarn_correction_range(dim, **kwargs)
        assert (low, high) == (max(math.floor(fast), 0), min(math.ceil(slow), dim - 1))
        low, high = yarn_correction_range(dim, truncate=False, **kwargs)
        assert low == pytest.approx(max(fast, 0.0), rel=1e-12, abs=1e-12)
        assert high == pytest.approx(min(slow, dim - 1.0), rel=1e-12)

    @pytest.mark.parametrize("seed", range(10))
    def test_untruncated_table(self, seed):
        # Fractional bounds: the ramp rounds them to float32, so the tolerance is looser.
        s = _random_settings(seed)
        dim, base, factor, original = s["dim"], s["base"], s["factor"], s["original"]
        low = max(_pair_where64(s["beta_fast"], dim, base, original), 0.0)
        high = min(_pair_where64(s["beta_slow"], dim, base, original), dim - 1.0)
        ramp = [min(max((i - low) / (high - low), 0.0), 1.0) for i in range(dim // 2)]
        expected = torch.tensor(
            [(1 - w) * t + w * t / factor for w, t in zip(ramp, _theta64(dim, base), strict=True)],
            dtype=torch.float64,
        )
        ours = _yarn_from(s, truncate=False)
        torch.testing.assert_close(ours.to(torch.float64), expected, rtol=2e-5, atol=0, msg=str(s))

    @pytest.mark.parametrize(
        ("low", "high", "size"), [(3, 9, 16), (0, 5, 8), (4.5, 7.25, 12), (6, 6, 10), (-2, 30, 8)]
    )
    def test_interpolation_ramp(self, low, high, size):
        ramp = interpolation_ramp(low, high, size)
        width = high - low if high != low else 0.001
        expected = [min(max((i - low) / width, 0.0), 1.0) for i in range(size)]
        assert ramp.dtype == torch.float32
        torch.testing.assert_close(ramp.to(torch.float64), torch.tensor(expected, dtype=torch.float64))

    @pytest.mark.parametrize("seed", range(10))
    def test_default_and_ntk(self, seed):
        rng = random.Random(1000 + seed)
        dim = rng.choice([16, 64, 96, 128, 256])
        base = math.exp(rng.uniform(math.log(500.0), math.log(1e6)))
        alpha = rng.uniform(1.0, 16.0)
        plain = torch.tensor(_theta64(dim, base), dtype=torch.float64)
        torch.testing.assert_close(default_inv_freq(dim, base=base).double(), plain, rtol=1e-6, atol=0)
        ntk_base = base * alpha ** (dim / (dim - 2))
        ntk = torch.tensor(_theta64(dim, ntk_base), dtype=torch.float64)
        torch.testing.assert_close(
            ntk_inv_freq(dim, base=base, factor=alpha).double(), ntk, rtol=2e-6, atol=0
        )


# --------------------------------------------------------------------------------------------
# 4. Properties
# --------------------------------------------------------------------------------------------


class TestIdentityAtFactorOne:
    @pytest.mark.parametrize("base", BASES)
    @pytest.mark.parametrize("dim", DIMS)
    @pytest.mark.parametrize(
        ("method", "extra"),
        [
            ("yarn", {"original_max_position_embeddings": 4096}),
            ("yarn", {"original_max_position_embeddings": 256, "beta_fast": 128, "beta_slow": 2}),
            ("linear", {}),
            ("ntk", {}),
            ("ntk-by-parts", {"original_max_position_embeddings": 4096}),
        ],
    )
    def test_plain_rope(self, method, extra, dim, base):
        ours, attention = inv_freq(method, dim, base=base, factor=1.0, **extra)
        plain = default_inv_freq(dim, base=base)
        moved = (ours != plain).nonzero().flatten().tolist()
        gap = (ours - plain).abs().max().item()
        assert not moved, f"pairs {moved} differ from plain RoPE by up to {gap:.3g}"
        assert attention == 1.0

    @pytest.mark.parametrize("dim", DIMS)
    def test_none(self, dim):
        ours, attention = inv_freq("none", dim, base=1e4)
        expected = torch.tensor(_theta64(dim, 1e4), dtype=torch.float64)
        torch.testing.assert_close(ours.double(), expected, rtol=1e-6, atol=0)
        assert attention == 1.0


_YARN_SETTINGS = [
    (128, 1e4, 8.0, 4096, 32, 1),
    (128, 1e4, 32.0, 4096, 32, 1),
    (128, 5e5, 4.0, 8192, 32, 1),
    (64, 1e4, 4.0, 2048, 32, 1),
    (128, 1e4, 16.0, 8192, 128, 2),
    (256, 1e6, 3.0, 32768, 16, 2),
    (96, 1e4, 6.0, 4096, 32, 1),
]


class TestYarnInvFreq:
    @pytest.mark.parametrize(("dim", "base", "factor", "original", "beta_fast", "beta_slow"), _YARN_SETTINGS)
    def test_extrapolated_and_interpolated_pairs(self, dim, base, factor, original, beta_fast, beta_slow):
        ours = _yarn(dim, base, factor, original, beta_fast=beta_fast, beta_slow=beta_slow)
        plain = default_inv_freq(dim, base=base)
        turns = torch.tensor([_rotations64(i, dim, base, original) for i in range(dim // 2)])
        fast, slow = turns >= beta_fast, turns <= beta_slow
        assert fast.any()
        assert slow.any()
        assert torch.equal(ours[fast], plain[fast])
        if math.log2(factor).is_integer():  # dividing by a power of two is exact
            assert torch.equal(ours[slow], plain[slow] / factor)
        torch.testing.assert_close(ours[slow], plain[slow] / factor, rtol=1e-6, atol=0)
        middle = ~(fast | slow)
        assert (ours[middle] < plain[middle]).all()
        assert (ours[middle] > plain[middle] / factor).all()

    @pytest.mark.parametrize("seed", range(30))
    def test_monotone_and_bounded(self, seed):
        s = _random_settings(seed)
        ours = _yarn_from(s)
        theta = torch.tensor(_theta64(s["dim"], s["base"]), dtype=torch.float64)
        ours64 = ours.to(torch.float64)
        assert (ours[1:] <= ours[:-1]).all()
        assert (ours64 <= theta * (1 + 1e-6)).all()
        assert (ours64 >= theta / s["factor"] * (1 - 1e-6)).all()

    @pytest.mark.parametrize("factor", [1.5, 8.0, 40.0])
    def test_extrapolation_factor_zero_is_linear(self, factor):
        ours = _yarn(128, 1e4, factor, extrapolation_factor=0.0)
        torch.testing.assert_close(ours, default_inv_freq(128, base=1e4) / factor, rtol=1e-6, atol=0)

    def test_original_length_not_extended_length_drives_ramp(self):
        a = _yarn(128, 1e4, 8.0, 4096)
        b = _yarn(128, 1e4, 8.0, 32768)
        assert not torch.equal(a, b)

    def test_zero_dim_tensor_factor(self):
        assert torch.equal(_yarn(128, 1e4, torch.tensor(8.0)), _yarn(128, 1e4, 8.0))

    def test_whole_float_original_accepted(self):
        assert torch.equal(_yarn(128, 1e4, 8.0, 4096.0), _yarn(128, 1e4, 8.0, 4096))


class TestYarnMscale:
    @pytest.mark.parametrize("factor", [0.25, 0.5, 1.0])
    def test_one_at_or_below_one(self, factor):
        assert yarn_mscale(factor) == 1.0

    @pytest.mark.parametrize("factor", [1.5, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 1000.0])
    def test_paper_formula(self, factor):
        assert yarn_mscale(factor) == pytest.approx(0.1 * math.log(factor) + 1, rel=1e-14)
        assert yarn_mscale(factor, coefficient=0.07) == pytest.approx(0.07 * math.log(factor) + 1, rel=1e-14)
        assert yarn_mscale(factor, 0.5) == pytest.approx(0.05 * math.log(factor) + 1, rel=1e-14)

    @pytest.mark.parametrize(("factor", "expected"), [(8.0, 1.1455609079175886), (16.0, 1.1940812105567846)])
    def test_mistral_coefficient_through_inv_freq(self, factor, expected):
        _, attention = inv_freq(
            "yarn",
            128,
            base=1e4,
            factor=factor,
            original_max_position_embeddings=8192,
            mscale_coefficient=0.07,
        )
        assert attention == pytest.approx(expected, rel=1e-12)


class TestYarnAttentionFactor:
    @pytest.mark.parametrize("factor", [2.0, 8.0, 32.0])
    def test_attention_factor_replaces(self, factor):
        for value in (0.5, 1.0, 1.7):
            assert yarn_attention_factor(factor, attention_factor=value) == value
            assert (
                yarn_attention_factor(factor, attention_factor=value, mscale=1.0, mscale_all_dim=0.5) == value
            )
            _, got = inv_freq(
                "yarn",
                64,
                base=1e4,
                factor=factor,
                original_max_position_embeddings=2048,
                attention_factor=value,
            )
            assert got == value

    @pytest.mark.parametrize("factor", [2.0, 8.0, 32.0])
    @pytest.mark.parametrize("attn_factor", [0.5, 1.5, 2.0])
    def test_attn_factor_multiplies(self, factor, attn_factor):
        expected = (0.1 * math.log(factor) + 1) * attn_factor
        assert yarn_attention_factor(factor, attn_factor=attn_factor) == pytest.approx(expected, rel=1e-14)
        _, got = inv_freq(
            "yarn",
            64,
            base=1e4,
            factor=factor,
            original_max_position_embeddings=2048,
            attn_factor=attn_factor,
        )
        assert got == pytest.approx(expected, rel=1e-14)

    def test_both_raise(self):
        with pytest.raises(ValueError, match="attention_factor") as excinfo:
            yarn_attention_factor(8.0, attention_factor=1.2, attn_factor=1.5)
        assert "attn_factor" in str(excinfo.value)
        with pytest.raises(ValueError, match="attn_factor"):
            inv_freq(
                "yarn",
                64,
                base=1e4,
                factor=8.0,
                original_max_position_embeddings=2048,
                attention_factor=1.2,
                attn_factor=1.5,
            )

    @pytest.mark.parametrize(
        ("mscale", "mscale_all_dim"), [(1.0, 0.707), (0.707, 1.0), (2.0, 2.0), (1.0, 0.0)]
    )
    @pytest.mark.parametrize("factor", [4.0, 40.0])
    def test_deepseek_ratio(self, factor, mscale, mscale_all_dim):
        def m(scale):
            return 0.1 * scale * math.log(factor) + 1

        expected = m(mscale) / m(mscale_all_dim) if mscale and mscale_all_dim else m(1.0)
        got = yarn_attention_factor(factor, mscale=mscale, mscale_all_dim=mscale_all_dim)
        assert got == pytest.approx(expected, rel=1e-14)

    def test_lone_mscale_ignored(self):
        assert yarn_attention_factor(8.0, mscale=3.0) == pytest.approx(yarn_attention_factor(8.0), rel=1e-15)


class TestDevice:
    @pytest.mark.parametrize("device", ["cpu", torch.device("cpu")], ids=["str", "torch.device"])
    @pytest.mark.parametrize(
        ("method", "params"),
        [
            ("none", {}),
            ("linear", {"factor": 4.0}),
            ("ntk", {"factor": 4.0}),
            ("ntk-by-parts", {"factor": 4.0, "original_max_position_embeddings": 4096}),
            ("dynamic-ntk", {"factor": 4.0, "original_max_position_embeddings": 4096, "seq_len": 9000}),
            ("yarn", {"factor": 4.0, "original_max_position_embeddings": 4096}),
            ("dynamic-yarn", {"original_max_position_embeddings": 4096, "seq_len": 9000}),
        ],
    )
    def test_cpu(self, method, params, device):
        ours, attention = inv_freq(method, 128, base=1e4, device=device, **params)
        assert ours.device.type == "cpu"
        expected, expected_attention = inv_freq(method, 128, base=1e4, **params)
        assert torch.equal(ours, expected)
        assert attention == expected_attention


class TestDynamicFactor:
    @pytest.mark.parametrize("seq_len", [1, 100, 2048, 4095, 4096])
    def test_within_not_finetuned_is_one(self, seq_len):
        assert dynamic_factor(seq_len, original_max_position_embeddings=4096) == 1.0

    @pytest.mark.parametrize("seq_len", [1, 4096, 20000, 32768])
    def test_within_finetuned_is_factor(self, seq_len):
        assert (
            dynamic_factor(seq_len, original_max_position_embeddings=4096, factor=8.0, finetuned=True) == 8.0
        )
        got = dynamic_factor(
            seq_len, original_max_position_embeddings=4096, max_position_embeddings=32768, finetuned=True
        )
        assert got == 8.0

    @pytest.mark.parametrize("seq_len", [1, 8192, 16384])
    def test_within_finetuned_given_factor_wins(self, seq_len):
        # The trained factor is used within the threshold, even when the threshold says otherwise.
        got = dynamic_factor(
            seq_len,
            original_max_position_embeddings=4096,
            max_position_embeddings=16384,
            factor=8.0,
            finetuned=True,
        )
        assert got == 8.0

    @pytest.mark.parametrize("seq_len", [4097, 10000, 123457])
    def test_beyond_not_finetuned(self, seq_len):
        assert dynamic_factor(seq_len, original_max_position_embeddings=4096) == seq_len / 4096

    @pytest.mark.parametrize("seq_len", [32769, 40000, 1_000_000])
    def test_beyond_finetuned(self, seq_len):
        got = dynamic_factor(seq_len, original_max_position_embeddings=4096, factor=8.0, finetuned=True)
        assert got == seq_len / 4096

    @pytest.mark.parametrize(
        "kwargs",
        [
            {},
            {"factor": 8.0, "finetuned": True},
            {"max_position_embeddings": 16384, "finetuned": True},
            {"max_position_embeddings": 8192},
        ],
    )
    def test_monotone_and_at_least_one(self, kwargs):
        values = [
            dynamic_factor(n, original_max_position_embeddings=4096, **kwargs) for n in range(1, 200_000, 997)
        ]
        assert all(b >= a for a, b in itertools.pairwise(values))
        assert min(values) >= 1.0

    def test_dynamic_yarn_plain_rope_within(self):
        ours, attention = inv_freq(
            "dynamic-yarn", 128, base=1e4, original_max_position_embeddings=4096, seq_len=3000
        )
        assert torch.equal(ours, default_inv_freq(128, base=1e4))
        assert attention == 1.0


class TestNtkAlpha:
    @pytest.mark.parametrize("alpha", [1.0, 2.0, 8.0, 4.5])
    def test_alpha_is_factor(self, alpha):
        by_alpha, _ = inv_freq("ntk", 128, base=1e4, alpha=alpha)
        by_factor, _ = inv_freq("ntk", 128, base=1e4, factor=alpha)
        assert torch.equal(by_alpha, by_factor)
        assert torch.equal(by_alpha, ntk_inv_freq(128, base=1e4, factor=alpha))
        both, _ = inv_freq("ntk", 128, base=1e4, alpha=alpha, factor=alpha)
        assert torch.equal(both, by_factor)
        dyn_alpha, _ = inv_freq(
            "dynamic-ntk", 128, base=1e4, alpha=alpha, max_position_embeddings=4096, seq_len=9000
        )
        dyn = dynamic_ntk_inv_freq(
            128, base=1e4, factor=alpha, original_max_position_embeddings=4096, seq_len=9000
        )
        assert torch.equal(dyn_alpha, dyn)

    @pytest.mark.parametrize("method", ["ntk", "dynamic-ntk"])
    def test_conflict_raises(self, method):
        extra = {"original_max_position_embeddings": 4096, "seq_len": 9000} if method == "dynamic-ntk" else {}
        with pytest.raises(ValueError, match="alpha") as excinfo:
            inv_freq(method, 128, base=1e4, alpha=8.0, factor=4.0, **extra)
        assert "8.0" in str(excinfo.value)
        assert "4.0" in str(excinfo.value)


class TestRotaryDim:
    @pytest.mark.parametrize(
        ("head_dim", "fraction", "expected"),
        [(128, 1.0, 128), (128, 0.5, 64), (80, 0.4, 32), (64, 0.25, 16), (128, 0.32, 40), (96, 0.3, 28)],
    )
    def test_values(self, head_dim, fraction, expected):
        assert rotary_dim(head_dim, fraction) == expected

    def test_default_is_whole_head(self):
        assert rotary_dim(96) == 96


class TestCheckMethod:
    @pytest.mark.parametrize("method", METHODS)
    def test_known(self, method):
        assert check_method(method) == method


# --------------------------------------------------------------------------------------------
# 5. Bad input
# --------------------------------------------------------------------------------------------

_NAN, _INF = float("nan"), float("inf")
_L = {"original_max_position_embeddings": 4096}
_YARN = partial(inv_freq, "yarn", 128, base=1e4)
_YARN4 = partial(_YARN, factor=4, **_L)
_LINEAR = partial(inv_freq, "linear", 128, base=1e4)
_NTK = partial(inv_freq, "ntk", 128, base=1e4)
_DYN_NTK = partial(inv_freq, "dynamic-ntk", 128, base=1e4, factor=2)
_DYN_YARN = partial(inv_freq, "dynamic-yarn", 128, base=1e4, **_L)


def _bad(name: str, call, error: type[Exception], *needles: str):
    """A row: ``call()`` must raise exactly ``error`` with every needle in its message."""
    return pytest.param(call, error, needles, id=name)


BAD_INPUTS = [
    # factor out of range, per method: the message names the field, the value and the real bound
    _bad("yarn-factor-0", partial(_YARN, factor=0, **_L), ValueError, "factor", "0", ">= 1"),
    _bad("yarn-factor--1", partial(_YARN, factor=-1, **_L), ValueError, "factor", "-1", ">= 1"),
    _bad("yarn-factor-0.5", partial(_YARN, factor=0.5, **_L), ValueError, "factor", "0.5", ">= 1"),
    _bad("linear-factor-0", partial(_LINEAR, factor=0), ValueError, "factor", "0", ">= 1"),
    _bad("linear-factor--1", partial(_LINEAR, factor=-1), ValueError, "factor", "-1", ">= 1"),
    _bad("linear-factor-0.5", partial(_LINEAR, factor=0.5), ValueError, "factor", "0.5", ">= 1"),
    _bad("ntk-factor-0", partial(_NTK, factor=0), ValueError, "factor", "0", ">= 1"),
    _bad("ntk-factor--1", partial(_NTK, factor=-1), ValueError, "factor", "-1", ">= 1"),
    _bad("ntk-factor-0.5", partial(_NTK, factor=0.5), ValueError, "factor", "0.5", ">= 1"),
    # non-finite numbers
    _bad("factor-nan", partial(_YARN, factor=_NAN, **_L), ValueError, "factor", "nan"),
    _bad("factor-inf", partial(_YARN, factor=_INF, **_L), ValueError, "factor", "inf"),
    _bad("base-nan", partial(inv_freq, "yarn", 128, base=_NAN, factor=4, **_L), ValueError, "base", "nan"),
    _bad("base-inf", partial(inv_freq, "yarn", 128, base=_INF, factor=4, **_L), ValueError, "base", "inf"),
    _bad("beta_fast-nan", partial(_YARN4, beta_fast=_NAN), ValueError, "beta_fast", "nan"),
    _bad("beta_slow-inf", partial(_YARN4, beta_slow=_INF), ValueError, "beta_slow", "inf"),
    _bad("beta_fast--inf", partial(_YARN4, beta_fast=-_INF), ValueError, "beta_fast", "-inf"),
    # wrong types, None
    _bad("factor-str", partial(_YARN, factor="4", **_L), TypeError, "factor", "'4'", "str"),
    _bad("factor-bool", partial(_YARN, factor=True, **_L), TypeError, "factor", "True", "bool"),
    _bad("factor-complex", partial(_YARN, factor=4 + 0j, **_L), TypeError, "factor", "(4+0j)"),
    _bad("factor-tensor", partial(_YARN, factor=torch.tensor([2.0, 4.0]), **_L), TypeError,
         "factor", "tensor(["),
    _bad("factor-None", partial(_YARN, factor=None, **_L), ValueError, "factor"),
    _bad("yarn_inv_freq-factor-None", partial(yarn_inv_freq, 128, base=1e4, factor=None, **_L), TypeError,
         "factor", "None"),
    _bad("base-None", partial(inv_freq, "yarn", 128, base=None, factor=4, **_L), TypeError, "base", "None"),
    _bad("original-None", partial(_YARN, factor=4, original_max_position_embeddings=None), ValueError,
         "original_max_position_embeddings"),
    _bad("dim-str", partial(inv_freq, "none", "128", base=1e4), TypeError, "dim", "'128'"),
    _bad("dim-float", partial(inv_freq, "none", 128.5, base=1e4), TypeError, "dim", "128.5"),
    _bad("dim-bool", partial(inv_freq, "none", True, base=1e4), TypeError, "dim", "True", "bool"),
    _bad("original-bool", partial(_YARN, factor=4, original_max_position_embeddings=True), TypeError,
         "original_max_position_embeddings", "True"),
    _bad("truncate-str", partial(_YARN4, truncate="yes"), TypeError, "truncate", "'yes'"),
    # dimensions
    _bad("dim-odd", partial(inv_freq, "yarn", 127, base=1e4, factor=4, **_L), ValueError, "dim", "127"),
    _bad("dim-0", partial(inv_freq, "none", 0, base=1e4), ValueError, "dim", "0"),
    _bad("dim-negative", partial(inv_freq, "linear", -128, base=1e4, factor=2), ValueError, "dim", "-128"),
    _bad("ntk-dim-2", partial(inv_freq, "ntk", 2, base=1e4, factor=2), ValueError, "dim", "2"),
    # betas, lengths, base
    _bad("betas-swapped", partial(_YARN4, beta_fast=1, beta_slow=32), ValueError,
         "beta_fast=1", "beta_slow=32"),
    _bad("beta_slow-0", partial(_YARN4, beta_slow=0), ValueError, "beta_slow", "0"),
    _bad("original-0", partial(_YARN, factor=4, original_max_position_embeddings=0), ValueError,
         "original_max_position_embeddings", "0"),
    _bad("original--5", partial(_YARN, factor=4, original_max_position_embeddings=-5), ValueError,
         "original_max_position_embeddings", "-5"),
    _bad("original-float", partial(_YARN, factor=4, original_max_position_embeddings=4096.5), TypeError,
         "original_max_position_embeddings", "4096.5"),
    _bad("base-1", partial(inv_freq, "yarn", 128, base=1.0, factor=4, **_L), ValueError, "base", "1.0"),
    _bad("base-0", partial(inv_freq, "yarn", 128, base=0, factor=4, **_L), ValueError, "base", "0"),
    _bad("base-negative", partial(inv_freq, "none", 128, base=-10000.0), ValueError, "base", "-10000"),
    # methods and settings
    _bad("method-yarn2", partial(inv_freq, "yarn2", 128, base=1e4), ValueError, "'yarn2'", *METHODS),
    _bad("method-YaRN", partial(inv_freq, "YaRN", 128, base=1e4), ValueError, "'YaRN'", *METHODS),
    _bad("method-None", partial(check_method, None), TypeError, "method", "None"),
    _bad("unknown-setting", partial(_LINEAR, factor=4, beta_fast=32), TypeError, "beta_fast", "'linear'"),
    _bad("static-yarn-seq_len", partial(_YARN4, seq_len=100), TypeError, "seq_len", "'yarn'"),
    _bad("missing-original", partial(_YARN, factor=4), ValueError, "original_max_position_embeddings"),
    _bad("missing-factor", _LINEAR, ValueError, "factor"),
    _bad("dynamic-ntk-missing-original", partial(_DYN_NTK, seq_len=10), ValueError,
         "original_max_position_embeddings"),
    # dynamic sequence lengths
    _bad("dynamic-ntk-seq_len-0", partial(_DYN_NTK, seq_len=0, **_L), ValueError, "seq_len", "0"),
    _bad("dynamic-yarn-seq_len-0", partial(_DYN_YARN, seq_len=0), ValueError, "seq_len", "0"),
    _bad("dynamic_factor-seq_len-0", partial(dynamic_factor, 0, **_L), ValueError, "seq_len", "0"),
    _bad("finetuned-str", partial(dynamic_factor, 10, finetuned="no", **_L), TypeError, "finetuned", "'no'"),
    # partial rotary
    _bad("partial-0", partial(rotary_dim, 128, 0), ValueError, "partial_rotary_factor", "0"),
    _bad("partial-1.5", partial(rotary_dim, 128, 1.5), ValueError, "partial_rotary_factor", "1.5"),
    _bad("rotary-odd", partial(rotary_dim, 10, 0.5), ValueError, "head_dim=10", "0.5", "5"),
    _bad("head_dim-0", partial(rotary_dim, 0, 0.5), ValueError, "head_dim", "0"),
    # attention factors
    _bad("attention_factor-0", partial(_YARN4, attention_factor=0), ValueError, "attention_factor", "0"),
    _bad("attn_factor-negative", partial(_YARN4, attn_factor=-1.5), ValueError, "attn_factor", "-1.5"),
    _bad("mscale-nan", partial(_YARN4, mscale=_NAN, mscale_all_dim=1.0), ValueError, "mscale", "nan"),
    _bad("mscale-ratio-negative", partial(yarn_attention_factor, 8.0, mscale=1.0, mscale_all_dim=-100.0),
         ValueError, "mscale_all_dim", "-100.0"),
    _bad("extrapolation-negative", partial(_YARN4, extrapolation_factor=-1), ValueError,
         "extrapolation_factor", "-1"),
    _bad("ntk-by-parts-original-0", partial(ntk_by_parts_inv_freq, 128, base=1e4, factor=4,
         original_max_position_embeddings=0), ValueError, "original_max_position_embeddings", "0"),
]  # fmt: skip


class TestBadInputs:
    def test_table_is_large(self):
        assert len(BAD_INPUTS) >= 20

    @pytest.mark.parametrize(("call", "error", "needles"), BAD_INPUTS)
    def test_raises_own_error_naming_field_and_value(self, call, error, needles):
        with pytest.raises(error) as excinfo:
            call()
        assert type(excinfo.value) is error
        message = str(excinfo.value)
        for needle in needles:
            assert needle in message, f"{needle!r} not in {message!r}"
        # Raised by yarn_rope itself, never by torch or Python deep inside a computation.
        origin = Path(str(excinfo.traceback[-1].path)).resolve()
        assert origin.is_relative_to(PACKAGE_DIR), origin


# --------------------------------------------------------------------------------------------
# 6. Llama 3 and LongRoPE, against transformers' own tables (the authors' code predates them)
# --------------------------------------------------------------------------------------------


def _transformers_table(rope_parameters: dict, *, head_dim: int, max_position_embeddings: int, seq_len=None):
    """(inv_freq, attention scaling) of transformers' ROPE_INIT_FUNCTIONS for a tiny Llama config."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(
        hidden_size=2 * head_dim,
        num_attention_heads=2,
        head_dim=head_dim,
        num_hidden_layers=1,
        intermediate_size=8,
        vocab_size=8,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=dict(rope_parameters),
    )
    return ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](config, None, seq_len=seq_len)


# Llama 3.1 8B/70B/405B and 3.2 1B/3B settings, and some off the beaten track.
_LLAMA3 = [
    (128, 500000.0, 8.0, 1.0, 4.0, 8192),
    (64, 500000.0, 32.0, 1.0, 4.0, 8192),
    (128, 10000.0, 4.0, 1.0, 4.0, 4096),
    (96, 1e6, 16.0, 2.0, 8.0, 2048),
    (128, 500000.0, 1.0, 1.0, 4.0, 8192),
]


class TestLlama3:
    @pytest.mark.parametrize(("dim", "base", "factor", "low", "high", "original"), _LLAMA3)
    def test_bit_equal_to_transformers(self, quiet_transformers, dim, base, factor, low, high, original):
        rope = {
            "rope_type": "llama3",
            "rope_theta": base,
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": original,
        }
        expected, expected_scaling = _transformers_table(
            rope, head_dim=dim, max_position_embeddings=16 * original
        )
        ours = llama3_inv_freq(
            dim,
            base=base,
            factor=factor,
            original_max_position_embeddings=original,
            low_freq_factor=low,
            high_freq_factor=high,
        )
        assert torch.equal(ours, expected), (ours - expected).abs().max()
        by_name, scaling = inv_freq(
            "llama3",
            dim,
            base=base,
            factor=factor,
            original_max_position_embeddings=original,
            low_freq_factor=low,
            high_freq_factor=high,
        )
        assert torch.equal(by_name, expected) and scaling == expected_scaling == 1.0

    def test_regions_follow_the_wavelength_bounds(self):
        dim, base, original = 128, 500000.0, 8192
        plain = default_inv_freq(dim, base=base)
        ours = llama3_inv_freq(
            dim, base=base, factor=8.0, original_max_position_embeddings=original, low_freq_factor=1.0,
            high_freq_factor=4.0,
        )  # fmt: skip
        wavelength = 2 * math.pi / plain
        fast = wavelength < original / 4.0
        slow = wavelength > original / 1.0
        assert torch.equal(ours[fast], plain[fast])  # extrapolated: unchanged
        torch.testing.assert_close(ours[slow], plain[slow] / 8.0, rtol=1e-6, atol=0)  # interpolated
        between = ~fast & ~slow
        assert between.any()
        ratio = plain[between] / ours[between]
        assert torch.all((ratio > 1.0) & (ratio < 8.0))

    def test_high_not_above_low_raises(self):
        with pytest.raises(ValueError, match="high_freq_factor"):
            llama3_inv_freq(
                64, base=1e4, factor=8.0, original_max_position_embeddings=4096, low_freq_factor=4.0,
                high_freq_factor=4.0,
            )  # fmt: skip


def _longrope_rope(pairs: int, original: int, **extra) -> dict:
    generator = torch.Generator().manual_seed(pairs)
    short = (1.0 + 0.2 * torch.rand(pairs, generator=generator)).tolist()
    long = (1.0 + 40.0 * torch.rand(pairs, generator=generator).sort().values).tolist()
    return {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": short,
        "long_factor": long,
        "original_max_position_embeddings": original,
        **extra,
    }


class TestLongRope:
    @pytest.mark.parametrize(
        ("dim", "original", "max_positions", "extra"),
        [
            (96, 4096, 131072, {}),  # Phi-3-mini-128k: no factor key, s = 131072 / 4096
            (128, 4096, 131072, {"factor": 32.0}),
            (64, 8192, 65536, {"attention_factor": 1.25}),
            (32, 2048, 2048, {}),  # s = 1: no attention scaling
        ],
    )
    @pytest.mark.parametrize("seq_len", [None, 100, "original", "original+1", 50000])
    def test_bit_equal_to_transformers(
        self, quiet_transformers, dim, original, max_positions, extra, seq_len
    ):
        rope = _longrope_rope(dim // 2, original, **extra)
        length = {"original": original, "original+1": original + 1}.get(seq_len, seq_len)
        expected, expected_scaling = _transformers_table(
            rope, head_dim=dim, max_position_embeddings=max_positions, seq_len=length
        )
        scaling = yarn_rope.RopeScaling.from_hf(
            {"max_position_embeddings": max_positions, "rope_parameters": rope}
        )
        ours, ours_scaling = scaling.inv_freq(dim, base=10000.0, seq_len=length)
        assert torch.equal(ours, expected), (ours - expected).abs().max()
        assert ours_scaling == pytest.approx(expected_scaling, rel=1e-15)

    def test_switch_is_beyond_the_original_length(self):
        rope = _longrope_rope(16, 1024)
        scaling = yarn_rope.RopeScaling.from_hf({"max_position_embeddings": 8192, "rope_parameters": rope})
        short = longrope_inv_freq(32, base=1e4, rescale_factors=rope["short_factor"])
        long = longrope_inv_freq(32, base=1e4, rescale_factors=rope["long_factor"])
        for seq_len, expected in ((1, short), (1024, short), (1025, long), (8192, long)):
            assert torch.equal(scaling.inv_freq(32, base=1e4, seq_len=seq_len)[0], expected)
        assert scaling.table_key(1024) != scaling.table_key(1025) == scaling.table_key(10**6)

    def test_attention_scaling_formula(self):
        # sqrt(1 + ln(s) / ln(L)), the LongRoPE paper's (and Phi-3's) attention factor.
        assert longrope_attention_scaling(32.0, 4096) == pytest.approx(
            math.sqrt(1 + math.log(32) / math.log(4096))
        )
        assert longrope_attention_scaling(1.0, 4096) == 1.0
        assert longrope_attention_scaling(32.0, 4096, attention_factor=1.1) == 1.1

    @pytest.mark.parametrize(
        ("factors", "error", "needle"),
        [
            ([1.0] * 15, ValueError, "16 pairs"),
            ([1.0] * 15 + [0.0], ValueError, "rescale_factors[15]"),
            ([1.0] * 15 + [float("nan")], ValueError, "nan"),
            ("1,2", TypeError, "list of numbers"),
            (4.0, TypeError, "list of numbers"),
        ],
    )
    def test_bad_factor_lists(self, factors, error, needle):
        with pytest.raises(error) as info:
            longrope_inv_freq(32, base=1e4, rescale_factors=factors)
        assert needle in str(info.value)
