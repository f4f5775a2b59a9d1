"""Rotary frequency tables for YaRN and the methods it is compared with.

Pure functions, no state: every function maps settings to ``(inv_freq, attention_factor)`` or
to one of their parts. ``inv_freq`` has shape ``[dim // 2]`` and dtype float32, where ``dim`` is
the *rotary* dimension (the head dimension, or the rotated part of it for partial rotary models,
see :func:`rotary_dim`). The rotary angle of position ``p`` in pair ``i`` is ``p * inv_freq[i]``.

Reference: Peng, Quesnelle, Fan, Shippole, "YaRN: Efficient Context Window Extension of Large
Language Models", ICLR 2024 (arXiv:2309.00071), and the authors' code (github jquesnelle/yarn,
``scaled_rope/``, commit 995db5b), whose float32 figures ``tests/data/yarn_reference.json``
reproduces to the bit. The operation order below follows that code wherever rounding depends on it.

Vocabulary of the ramp (section 3.2 of the paper, "NTK-by-parts"), used in every name here:

* Pair ``i`` of a head of rotary dimension ``d`` turns ``r(i) = L / (2 pi base^(2i/d))`` times over
  the original context ``L``. Pairs with ``r(i) >= beta_fast`` (the first, high-frequency pairs)
  are **extrapolated**: left unchanged. Pairs with ``r(i) <= beta_slow`` (the last, low-frequency
  pairs) are **interpolated**: their frequency is divided by the scale factor ``s``.
* In between, the **interpolation weight** ``ramp(i)`` rises linearly from 0 (extrapolated) to 1
  (interpolated) in the *pair index* ``i``, between the pair indices where ``r`` equals
  ``beta_fast`` and ``beta_slow`` (floored and ceiled unless ``truncate=False``), and
  ``inv_freq(i) = (1 - ramp(i)) * theta_i + ramp(i) * theta_i / s``. This is the authors' code
  (``find_correction_range``, ``linear_ramp_mask``), which every implementation and checkpoint
  follows; the paper's eq. 18 writes the ramp as linear in ``r`` without rounding (see
  :func:`yarn_inv_freq`).
* YaRN then multiplies cos and sin by the **attention scaling** ``0.1 ln(s) + 1`` (the paper's
  ``sqrt(1/t)``, "temperature", eq. 22); ``yarn_mscale`` computes it. "Attention scaling" is the
  one name yarn_rope gives the number that multiplies cos and sin, for every method.

Four different knobs touch it and are kept apart here, each with the name of the config it comes from:

* ``attention_factor`` (transformers): *replaces* the computed value.
* ``attn_factor`` (the authors' code, vLLM, llama.cpp): *multiplies* the computed value.
* ``mscale`` / ``mscale_all_dim`` (DeepSeek): the value becomes the *ratio*
  ``yarn_mscale(s, mscale) / yarn_mscale(s, mscale_all_dim)`` when both are non-zero.
* ``mscale_coefficient``: the slope of the logarithm, 0.1 in the paper and the authors' Llama
  code, 0.07 in their Mistral code (which trained the Yarn-Mistral checkpoints).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable

import torch

__all__ = [
    "default_inv_freq",
    "dynamic_factor",
    "dynamic_ntk_inv_freq",
    "interpolation_ramp",
    "linear_inv_freq",
    "llama3_inv_freq",
    "longrope_attention_scaling",
    "longrope_inv_freq",
    "ntk_by_parts_inv_freq",
    "ntk_inv_freq",
    "rotary_dim",
    "scaled_context",
    "yarn_attention_scaling",
    "yarn_correction_range",
    "yarn_inv_freq",
    "yarn_mscale",
]

#: The longest context length accepted anywhere: every position below it is exact in float64.
MAX_POSITIONS = 2**53

DEFAULT_BETA_FAST = 32.0
DEFAULT_BETA_SLOW = 1.0
DEFAULT_MSCALE_COEFFICIENT = 0.1


# --------------------------------------------------------------------------------------------
# Input checks. Every public function validates what it is given, so that no input reaches a
# torch error or produces a silent wrong table. config.py reuses these.
# --------------------------------------------------------------------------------------------


def _number(name: str, value: object) -> float:
    """``value`` as a finite float, or a TypeError/ValueError naming ``name``."""
    wrong_type = TypeError(
        f"{name} must be a real number, got {value!r} of type {type(value).__name__}; "
        f"pass a number such as {name}=4.0"
    )
    # bool is an int to Python but never a meaningful setting; strings must not be parsed here.
    if isinstance(value, (bool, str, bytes)) or (isinstance(value, torch.Tensor) and value.numel() != 1):
        raise wrong_type
    try:
        number = float(value)  # type: ignore[arg-type]
    except OverflowError:  # an int beyond float range, e.g. 10**400
        raise ValueError(f"{name} must be finite, got {value!r}; pass a finite number") from None
    except (TypeError, ValueError):
        raise wrong_type from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}; pass a finite number")
    return number


def _positive(name: str, value: object) -> float:
    number = _number(name, value)
    if number <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return number


def _integer(name: str, value: object, *, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (whole floats such as 4096.0 from JSON are accepted)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(
            f"{name} must be an integer, got {value!r} of type {type(value).__name__}; "
            f"pass a whole number such as {name}=4096"
        )
    number = operator.index(value)
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return number


def _check_ntk_dim(dim: object, what: str) -> int:
    """An even rotary dimension of at least 4: NTK-aware bases divide by ``dim - 2``."""
    checked = _check_dim(dim)
    if checked < 4:
        raise ValueError(f"{what} needs dim >= 4 (it divides by dim - 2), got dim={checked}")
    return checked


def _check_dim(dim: object) -> int:
    dim = _integer("dim", dim, minimum=1)
    if dim % 2:
        raise ValueError(
            f"dim (the rotary dimension) must be even, got {dim}: rotary embeddings turn pairs of "
            "channels; pass the head dimension or its rotated part, see rotary_dim()"
        )
    return dim


def _check_base(base: object) -> float:
    base = _number("base", base)
    if base <= 1.0:
        raise ValueError(
            f"base (rope_theta) must be > 1, got {base!r}; typical values are 10000.0 or 500000.0"
        )
    return base


def _check_factor(factor: object, *, method: str) -> float:
    factor = _number("factor", factor)
    if factor < 1.0:
        raise ValueError(
            f"factor must be >= 1 for method {method!r} (it is the context extension ratio), got "
            f"{factor!r}; use factor=1.0 for plain RoPE or method='none'"
        )
    return factor


def _check_betas(beta_fast: object, beta_slow: object) -> tuple[float, float]:
    fast = _positive("beta_fast", beta_fast)
    slow = _positive("beta_slow", beta_slow)
    if fast < slow:
        raise ValueError(
            f"beta_fast must be >= beta_slow (beta_fast bounds the extrapolated high-frequency "
            f"pairs, beta_slow the interpolated ones), got beta_fast={beta_fast!r}, "
            f"beta_slow={beta_slow!r}; the paper uses beta_fast=32, beta_slow=1"
        )
    return fast, slow


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def rotary_dim(head_dim: int, partial_rotary_factor: float = 1.0) -> int:
    """Number of rotated channels of a head, as transformers derives it.

    Args:
        head_dim: channels per attention head.
        partial_rotary_factor: the rotated fraction (GPT-NeoX ``rotary_pct``, Phi's
            ``partial_rotary_factor``), in ``(0, 1]``.

    Returns:
        ``int(head_dim * partial_rotary_factor)``; even.

    Raises:
        ValueError: if the fraction is outside ``(0, 1]`` or the result is odd or zero.
    """
    head_dim = _integer("head_dim", head_dim, minimum=1)
    fraction = _number("partial_rotary_factor", partial_rotary_factor)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"partial_rotary_factor must be in (0, 1], got {partial_rotary_factor!r}")
    dim = int(head_dim * fraction)
    if dim == 0 or dim % 2:
        raise ValueError(
            f"head_dim={head_dim} with partial_rotary_factor={partial_rotary_factor} rotates {dim} "
            "channels; the rotary dimension must be even and > 0"
        )
    return dim


def _exponents(dim: int, device: torch.device | str | None) -> torch.Tensor:
    """``[0, 2, ..., dim - 2] / dim`` in float32, shape ``[dim // 2]``."""
    return torch.arange(0, dim, 2, device=device).float() / dim


def default_inv_freq(dim: int, *, base: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Plain RoPE (Su et al., RoFormer): ``1 / base^(2i/dim)``, shape ``[dim // 2]``, float32."""
    dim = _check_dim(dim)
    base = _check_base(base)
    return 1.0 / (base ** _exponents(dim, device))


def linear_inv_freq(
    dim: int, *, base: float, factor: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """Position interpolation (Chen et al. 2023; kaiokendev): every frequency divided by ``factor``.

    The authors' code divides the *positions* by ``factor``; transformers divides ``inv_freq``.
    The two agree in exact arithmetic and differ by float32 rounding (about 1e-4 in cos at 4k
    positions). This returns the transformers form, bit-equal to its ``"linear"`` rope type.

    Returns:
        shape ``[dim // 2]``, float32.
    """
    factor = _check_factor(factor, method="linear")
    inv = default_inv_freq(dim, base=base, device=device)
    inv /= factor
    return inv


def _ntk_base(dim: int, base: float, alpha: float) -> float:
    """NTK-aware base change (bloc97): ``base * alpha^(dim / (dim - 2))``."""
    return float(base * alpha ** (dim / (dim - 2)))


def ntk_inv_freq(
    dim: int, *, base: float, factor: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """NTK-aware scaling (bloc97, 2023): plain RoPE with base ``base * factor^(dim/(dim-2))``.

    ``factor`` is the ``alpha`` of the authors' ``LlamaNTKScaledRotaryEmbedding``.

    Returns:
        shape ``[dim // 2]``, float32.
    """
    dim = _check_ntk_dim(dim, "NTK-aware scaling")
    factor = _check_factor(factor, method="ntk")
    return default_inv_freq(dim, base=_ntk_base(dim, _check_base(base), factor), device=device)


def _correction_dim(num_rotations: float, dim: int, base: float, original: int) -> float:
    """Pair index (fractional) whose wavelength turns ``num_rotations`` times over ``original``."""
    return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_correction_range(
    dim: int,
    *,
    base: float,
    original_max_position_embeddings: int,
    beta_fast: float = DEFAULT_BETA_FAST,
    beta_slow: float = DEFAULT_BETA_SLOW,
    truncate: bool = True,
) -> tuple[float, float]:
    """Pair indices ``(low, high)`` where the ramp leaves 0 (extrapolated) and reaches 1 (interpolated).

    ``low`` is where a pair turns ``beta_fast`` times over the original context, ``high`` where
    it turns ``beta_slow`` times; floored and ceiled when ``truncate`` (the paper and the
    authors' code), then clamped to ``[0, dim - 1]`` as that code does.
    """
    dim = _check_dim(dim)
    base = _check_base(base)
    original = _integer("original_max_position_embeddings", original_max_position_embeddings)
    fast, slow = _check_betas(beta_fast, beta_slow)
    low: float = _correction_dim(fast, dim, base, original)
    high: float = _correction_dim(slow, dim, base, original)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def interpolation_ramp(
    low: float, high: float, size: int, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Interpolation weight per pair: 0 up to ``low`` (extrapolated), 1 from ``high`` (interpolated).

    Returns:
        ``clamp((arange(size) - low) / (high - low), 0, 1)``, shape ``[size]``, float32. When
        ``low == high`` the authors' code widens the ramp by 0.001 to avoid a division by zero.
    """
    if low == high:
        high += 0.001
    ramp = (torch.arange(size, dtype=torch.float32, device=device) - low) / (high - low)
    return torch.clamp(ramp, 0, 1)


def _blend(
    interpolated: torch.Tensor, extrapolated: torch.Tensor, extrapolation_weight: torch.Tensor
) -> torch.Tensor:
    return interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight


def yarn_inv_freq(
    dim: int,
    *,
    base: float,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = DEFAULT_BETA_FAST,
    beta_slow: float = DEFAULT_BETA_SLOW,
    extrapolation_factor: float = 1.0,
    truncate: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """YaRN / NTK-by-parts inverse frequencies (the paper's section 3.2, as the authors' code computes them).

    The ramp is the reference code's (``find_correction_range`` + ``linear_ramp_mask``): linear in
    the *pair index* between the floor and the ceiling of the correction dimensions. The paper's
    eq. 18 writes it as linear in ``r = L / lambda`` without rounding; on the Yarn-Llama-2-70b-32k
    config (factor 8 from 4096, head dim 128) the two differ by up to 2.3x in a ramp pair's
    frequency. Every implementation (the authors', transformers, vLLM, llama.cpp) and every YaRN
    checkpoint follows the code, so these are the code's numbers.

    Args:
        dim: rotary dimension (even).
        base: RoPE base (``rope_theta``), > 1.
        factor: scale factor ``s >= 1`` (extended length / original length). ``1`` gives plain
            RoPE exactly.
        original_max_position_embeddings: the context length the model was pretrained with
            (``L``); the ramp is built from it, never from the extended length.
        beta_fast: pairs turning at least this often over ``L`` are extrapolated (unchanged).
        beta_slow: pairs turning at most this often over ``L`` are interpolated (divided by ``s``).
        extrapolation_factor: multiplies the extrapolation weight (1 in the paper).
        truncate: floor/ceil the ramp bounds (the paper); ``False`` keeps them fractional
            (transformers' ``truncate: false``, used by gpt-oss).
        device: where to build the table.

    Returns:
        ``inv_freq``, shape ``[dim // 2]``, float32. Bit-equal to the authors' code and to
        transformers 5 ``"yarn"`` for the same settings.

    Raises:
        TypeError, ValueError: for non-numbers, NaN/inf, odd dim, ``factor < 1``,
            ``beta_fast < beta_slow``, a non-positive original length, base <= 1.
    """
    dim = _check_dim(dim)
    base = _check_base(base)
    factor = _check_factor(factor, method="yarn")
    extrapolation_factor = _number("extrapolation_factor", extrapolation_factor)
    if extrapolation_factor < 0:
        raise ValueError(f"extrapolation_factor must be >= 0, got {extrapolation_factor!r}")
    low, high = yarn_correction_range(
        dim,
        base=base,
        original_max_position_embeddings=original_max_position_embeddings,
        beta_fast=beta_fast,
        beta_slow=beta_slow,
        truncate=_flag("truncate", truncate),
    )
    if factor == 1.0:
        # Interpolating by 1 is the identity; the blend below could move a ramp pair by an ulp.
        return default_inv_freq(dim, base=base, device=device)
    pos_freqs = base ** _exponents(dim, device)
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (factor * pos_freqs)
    extrapolation_weight = (1 - interpolation_ramp(low, high, dim // 2, device=device)) * extrapolation_factor
    return _blend(interpolated, extrapolated, extrapolation_weight)


def yarn_mscale(
    factor: float, mscale: float = 1.0, *, coefficient: float = DEFAULT_MSCALE_COEFFICIENT
) -> float:
    """YaRN's attention scaling: ``coefficient * mscale * ln(factor) + 1``; 1.0 when ``factor <= 1``.

    With the defaults this is the paper's ``sqrt(1/t) = 0.1 ln(s) + 1`` (eq. 22). ``coefficient``
    is 0.07 in the authors' Mistral code; ``mscale`` is DeepSeek's multiplier of the slope.
    """
    factor = _positive("factor", factor)
    mscale = _number("mscale", mscale)
    coefficient = _number("mscale_coefficient", coefficient)
    if factor <= 1:
        return 1.0
    return coefficient * mscale * math.log(factor) + 1.0


def yarn_attention_scaling(
    factor: float,
    *,
    attention_factor: float | None = None,
    attn_factor: float = 1.0,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
    mscale_coefficient: float = DEFAULT_MSCALE_COEFFICIENT,
) -> float:
    """The number that multiplies cos and sin under YaRN, from every convention in use.

    Args:
        factor: scale factor ``s``.
        attention_factor: transformers' override; when given it *replaces* the computed value
            and ``attn_factor`` must stay 1.
        attn_factor: the authors' / vLLM's multiplier of the computed value.
        mscale, mscale_all_dim: DeepSeek's pair; when both are non-zero the computed value is
            ``yarn_mscale(s, mscale) / yarn_mscale(s, mscale_all_dim)`` (as transformers 5 does;
            a lone ``mscale`` is ignored, as there).
        mscale_coefficient: slope of the logarithm (0.1 paper, 0.07 authors' Mistral code).

    Returns:
        the factor, a Python float > 0.
    """
    attn_factor = _positive("attn_factor", attn_factor)
    if attention_factor is not None:
        attention_factor = _positive("attention_factor", attention_factor)
        if attn_factor != 1.0:
            raise ValueError(
                f"attention_factor={attention_factor!r} replaces the YaRN attention scaling while "
                f"attn_factor={attn_factor!r} multiplies it; give one of them, not both"
            )
        return attention_factor
    if mscale is not None:
        mscale = _number("mscale", mscale)
    if mscale_all_dim is not None:
        mscale_all_dim = _number("mscale_all_dim", mscale_all_dim)
    if mscale and mscale_all_dim:
        computed = yarn_mscale(factor, mscale, coefficient=mscale_coefficient) / yarn_mscale(
            factor, mscale_all_dim, coefficient=mscale_coefficient
        )
    else:
        computed = yarn_mscale(factor, coefficient=mscale_coefficient)
    if not (computed > 0 and math.isfinite(computed)):
        raise ValueError(
            f"the YaRN attention scaling for factor={factor!r}, mscale={mscale!r}, "
            f"mscale_all_dim={mscale_all_dim!r}, mscale_coefficient={mscale_coefficient!r} is "
            f"{computed!r}; it must be a positive number"
        )
    return float(computed * attn_factor)


def ntk_by_parts_inv_freq(
    dim: int,
    *,
    base: float,
    factor: float,
    original_max_position_embeddings: int,
    ntk_bounds: tuple[float, float] = (1.25, 0.75),
    extrapolation_bounds: tuple[float, float] = (16.0, 2.0),
    ntk_factor: float = 1.0,
    extrapolation_factor: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The authors' original "NTK-by-parts" (``LlamaPartNTKScaledRotaryEmbedding``): two ramps.

    First a ramp between the pairs turning ``ntk_bounds = (1.25, 0.75)`` times over the original
    context blends NTK-aware frequencies (faster pairs) into linearly interpolated ones (slower
    pairs); then a ramp at ``extrapolation_bounds = (16, 2)`` blends the unchanged frequencies
    back in for the fastest pairs. The YaRN paper's later "NTK-by-parts" is :func:`yarn_inv_freq`
    without the attention scaling.

    Returns:
        shape ``[dim // 2]``, float32.
    """
    dim = _check_ntk_dim(dim, "NTK-by-parts")
    base = _check_base(base)
    factor = _check_factor(factor, method="ntk-by-parts")
    ntk_factor = _number("ntk_factor", ntk_factor)
    extrapolation_factor = _number("extrapolation_factor", extrapolation_factor)
    original = _integer("original_max_position_embeddings", original_max_position_embeddings)
    if factor == 1.0:
        # Both blends are then between equal tables; skip them so the result is exactly plain RoPE.
        return default_inv_freq(dim, base=base, device=device)
    exponents = _exponents(dim, device)
    unchanged = 1.0 / (base**exponents)
    interpolated = 1.0 / (factor * (base**exponents))
    ntk = 1.0 / (_ntk_base(dim, base, factor) ** exponents)

    def weight(bounds: tuple[float, float], scale: float) -> torch.Tensor:
        fast, slow = bounds
        low, high = yarn_correction_range(
            dim, base=base, original_max_position_embeddings=original, beta_fast=fast, beta_slow=slow
        )
        return (1 - interpolation_ramp(low, high, dim // 2, device=device)) * scale

    blended = _blend(interpolated, ntk, weight(ntk_bounds, ntk_factor))
    return _blend(blended, unchanged, weight(extrapolation_bounds, extrapolation_factor))


def dynamic_ntk_inv_freq(
    dim: int,
    *,
    base: float,
    factor: float,
    original_max_position_embeddings: int,
    seq_len: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Dynamic NTK (emozilla, 2023): plain RoPE up to the original length, then the base grows.

    ``base' = base * (factor * seq_len / L - (factor - 1))^(dim / (dim - 2))`` for
    ``seq_len > L``, the rule of the authors' ``LlamaDynamicScaledRotaryEmbedding`` and of
    transformers' ``"dynamic"`` type (where ``L`` is ``config.max_position_embeddings``).

    Returns:
        shape ``[dim // 2]``, float32.
    """
    dim = _check_ntk_dim(dim, "dynamic NTK")
    base = _check_base(base)
    factor = _check_factor(factor, method="dynamic-ntk")
    original = _integer("original_max_position_embeddings", original_max_position_embeddings)
    seq_len = max(_integer("seq_len", seq_len), original)
    grown = base * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
    return default_inv_freq(dim, base=grown, device=device)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} of type {type(value).__name__}")
    return value


def dynamic_factor(
    seq_len: int,
    *,
    original_max_position_embeddings: int,
    max_position_embeddings: int | None = None,
    factor: float | None = None,
    finetuned: bool = False,
) -> float:
    """Scale factor of dynamic YaRN at a sequence length (the paper's section 3.3).

    Within ``max_position_embeddings`` the factor is the trained one when ``finetuned``
    (``factor``, default ``max_position_embeddings / original_max_position_embeddings``) and 1
    (plain RoPE) otherwise. Beyond it the factor is ``s = seq_len / original`` (the paper's
    ``s = max(1, l'/L)``; the authors' standalone module and flash-attention model file), never
    less than the value within. Some of the authors' other model files divide by
    ``max_position_embeddings`` instead; that is not the paper's rule and is not offered.

    Args:
        seq_len: current sequence length (largest position + 1), >= 1.
        original_max_position_embeddings: pretrained context length ``L``.
        max_position_embeddings: where the rule starts to grow; defaults to
            ``factor * L`` when finetuned, else ``L``.
        factor: the fine-tuned factor (``finetuned`` only).
        finetuned: whether the model was fine-tuned with YaRN at ``factor``.

    Returns:
        the factor, a float >= 1.
    """
    seq_len = _integer("seq_len", seq_len)
    original = _integer("original_max_position_embeddings", original_max_position_embeddings)
    finetuned = _flag("finetuned", finetuned)
    if factor is not None:
        factor = _check_factor(factor, method="dynamic-yarn")
    if max_position_embeddings is None:
        threshold = round(factor * original) if (finetuned and factor is not None) else original
    else:
        threshold = _integer("max_position_embeddings", max_position_embeddings)
    if finetuned:
        within = factor if factor is not None else max(1.0, threshold / original)
    else:
        within = 1.0
    if seq_len <= threshold:
        return within
    return max(within, seq_len / original)


def scaled_context(factor: float, original_max_position_embeddings: int) -> int:
    """The context length a factor extends the original one to: ``round(factor * original)``."""
    factor = _positive("factor", factor)
    original = _integer("original_max_position_embeddings", original_max_position_embeddings)
    return round(factor * original)


def llama3_inv_freq(
    dim: int,
    *,
    base: float,
    factor: float,
    original_max_position_embeddings: int,
    low_freq_factor: float,
    high_freq_factor: float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Llama 3.1's scaling (Meta, ``apply_scaling`` in the Llama 3.1 reference code, 2024).

    Pairs whose wavelength is shorter than ``L / high_freq_factor`` are extrapolated (unchanged),
    pairs longer than ``L / low_freq_factor`` are interpolated (divided by ``factor``), and in
    between the interpolation weight falls linearly in the number of rotations over ``L``
    (``r = L / wavelength``), without rounding: the same idea as YaRN's ramp, parametrised by
    wavelength bounds instead of rotation counts, and without an attention scaling. Llama 3.1,
    3.2 and 3.3 use ``factor`` 8 (32 for 3.2 1B/3B), ``low_freq_factor`` 1, ``high_freq_factor``
    4 and ``L = 8192``. Operation order as in transformers' ``"llama3"`` rope type, so the table
    is bit-equal to it.

    Returns:
        shape ``[dim // 2]``, float32.

    Raises:
        ValueError: ``factor < 1``, ``high_freq_factor <= low_freq_factor``, a factor <= 0.
    """
    factor = _check_factor(factor, method="llama3")
    original = _integer("original_max_position_embeddings", original_max_position_embeddings)
    low = _positive("low_freq_factor", low_freq_factor)
    high = _positive("high_freq_factor", high_freq_factor)
    if high <= low:
        raise ValueError(
            f"high_freq_factor must be > low_freq_factor, got high_freq_factor={high_freq_factor!r}, "
            f"low_freq_factor={low_freq_factor!r}; Llama 3.1 uses low_freq_factor=1, high_freq_factor=4"
        )
    plain = default_inv_freq(dim, base=base, device=device)
    wavelength = 2 * math.pi / plain
    interpolated = wavelength > original / low
    extrapolated = wavelength < original / high
    table = torch.where(interpolated, plain / factor, plain)
    # Between the bounds: the extrapolation weight rises from 0 to 1 with the rotations over L.
    extrapolation_weight = (original / wavelength - low) / (high - low)
    ramp = (1 - extrapolation_weight) * table / factor + extrapolation_weight * table
    return torch.where(~extrapolated & ~interpolated, ramp, table)


def _check_factor_list(name: str, values: object, pairs: int | None = None) -> tuple[float, ...]:
    if isinstance(values, (str, bytes, torch.Tensor)) or not isinstance(values, Iterable):
        raise TypeError(
            f"{name} must be a list of numbers (one per rotary pair), got {values!r} of type "
            f"{type(values).__name__}"
        )
    numbers = tuple(_positive(f"{name}[{index}]", value) for index, value in enumerate(values))
    if not numbers:
        raise ValueError(f"{name} must hold one number per rotary pair, got an empty list")
    if pairs is not None and len(numbers) != pairs:
        raise ValueError(
            f"{name} has {len(numbers)} numbers but the rotary dimension has {pairs} pairs; LongRoPE "
            "factors are per pair: pass a list of length dim // 2"
        )
    return numbers


def longrope_inv_freq(
    dim: int,
    *,
    base: float,
    rescale_factors: object,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """LongRoPE (Ding et al. 2024, "LongRoPE: Extending LLM Context Window Beyond 2 Million
    Tokens"; Phi-3/3.5/4-mini): every pair's frequency divided by its own searched factor.

    Phi-3 keeps two lists: ``short_factor`` for sequences up to the original length and
    ``long_factor`` beyond it; pass the one in force as ``rescale_factors``. Operation order as
    in transformers' ``"longrope"`` rope type (``1 / (factor_i * base^(2i/dim))``), so the table is
    bit-equal to it.

    Args:
        rescale_factors: ``dim // 2`` positive numbers.

    Returns:
        shape ``[dim // 2]``, float32.
    """
    dim = _check_dim(dim)
    base = _check_base(base)
    factors = _check_factor_list("rescale_factors", rescale_factors, dim // 2)
    per_pair = torch.tensor(factors, dtype=torch.float32, device=device)
    return 1.0 / (per_pair * base ** _exponents(dim, device))


def longrope_attention_scaling(
    factor: float, original_max_position_embeddings: int, *, attention_factor: float | None = None
) -> float:
    """LongRoPE's multiplier of cos and sin: ``sqrt(1 + ln(s) / ln(L))`` (1 when ``s <= 1``).

    ``attention_factor``, when given, replaces it (transformers' key, as for YaRN). Phi-3 has no
    ``factor`` key: ``s`` is ``max_position_embeddings / original_max_position_embeddings``.
    """
    if attention_factor is not None:
        return _positive("attention_factor", attention_factor)
    factor = _positive("factor", factor)
    original = _integer("original_max_position_embeddings", original_max_position_embeddings, minimum=2)
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original))
