"""The rotary module: ``(x, position_ids) -> (cos, sin)``, static and dynamic, fp32 master tables.

Same call contract as the rotary modules of transformers (``LlamaRotaryEmbedding`` and kin):
``cos`` and ``sin`` have shape ``[b, s, dim]`` in the half-rotation layout ``cat(freqs, freqs)``,
already multiplied by the attention scaling, in ``x.dtype``. Notation: ``b`` batch, ``s``
sequence, ``dim`` rotary dimension.

Angles. transformers and the YaRN reference form ``position * inv_freq`` in float32; at long
positions that product loses the low bits of the angle (measured here: max |cos error| against
float64 angles from the same float32 ``inv_freq`` about 1e-4 at 4k positions, 1e-3 at 32k,
3e-2 at 1M). ``angles="precise"`` (the default) forms the product and its reduction modulo 2 pi
in float64, then takes cos/sin of the reduced float32 angle: within 1e-6 of the float64 result at
every position up to 2^20 and beyond, for the cost of a few float64 element-wise operations on a
``[b, s, dim / 2]`` tensor, which is negligible next to attention. ``angles="fp32"`` reproduces
transformers' table bit for bit (and the reference rows to float32 rounding); use it to compare
against vanilla transformers or to reproduce numbers computed with it.

Why precise by default: the error of fp32 angles grows linearly with position and passes bf16's
own rounding (2e-3) near 64k positions, exactly the lengths context extension exists for; the
exact angle is what every model was trained to expect (training used short positions, where
fp32 is exact enough).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from . import _compat
from .config import RopeScaling
from .frequencies import _check_base, _check_dim

__all__ = [
    "ANGLE_MODES",
    "AngleMode",
    "RotaryEmbedding",
    "grid_point",
    "grid_step",
    "reduced_angles",
    "rotate_half",
]

AngleMode = Literal["precise", "fp32"]
ANGLE_MODES: tuple[str, ...] = ("precise", "fp32")
_TWO_PI = 2.0 * math.pi


class RotaryEmbedding(nn.Module):
    """Rotary embedding with exact YaRN (and baseline) frequencies.

    Args:
        dim: rotary dimension (head dim, or its rotated part for partial rotary models).
        base: RoPE base (``rope_theta``).
        scaling: the scaling settings; ``None`` is plain RoPE.
        angles: ``"precise"`` (float64 angle reduction, default) or ``"fp32"`` (transformers'
            float32 angles, bit-equal to its table).
        growth: dynamic methods: ``None`` follows the reference rule (a new table whenever the
            length calls for another factor); a number ``g > 1`` rounds lengths up to the grid
            ``threshold * g^k``, so the table (and a KV cache re-rotated with it) changes only
            at grid points.
        device: where to build the table.

    Attributes:
        inv_freq: non-persistent float32 buffer ``[dim // 2]``, the current table. It stays
            float32 through ``model.half()`` / ``.to(torch.bfloat16)``.
        attention_scaling: the float that multiplies cos and sin (YaRN's ``0.1 ln s + 1``,
            LongRoPE's ``sqrt(1 + ln s / ln L)``; 1.0 for other methods).

    Dynamic methods rebuild the table when the current sequence length (largest position + 1
    over the batch, as transformers takes it) calls for another factor; the table then always
    equals :meth:`RopeScaling.inv_freq` at that length.
    """

    inv_freq: torch.Tensor

    def __init__(
        self,
        dim: int,
        *,
        base: float,
        scaling: RopeScaling | None = None,
        angles: AngleMode = "precise",
        growth: float | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.dim = _check_dim(dim)
        self.base = _check_base(base)
        if scaling is None:
            scaling = RopeScaling(method="none")
        if not isinstance(scaling, RopeScaling):
            raise TypeError(f"scaling must be a yarn_rope.RopeScaling, got {type(scaling).__name__}")
        if angles not in ANGLE_MODES:
            raise ValueError(f"angles must be one of {ANGLE_MODES}, got {angles!r}")
        if growth is not None and (
            isinstance(growth, bool) or not isinstance(growth, (int, float)) or not 1.0 < growth < math.inf
        ):
            raise ValueError(f"growth must be None (the reference rule) or a number > 1, got {growth!r}")
        self.scaling = scaling
        self.angles: AngleMode = angles
        self.growth = None if growth is None else float(growth)
        # Dynamic methods: what the current table was built for (see RopeScaling.table_key).
        self._table_key: object = None
        self._table_seq_len: int | None = scaling.threshold()
        inv_freq, self.attention_scaling = self._compute(device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._table_key = self._key(self._table_seq_len)

    # ----------------------------------------------------------------------------------------

    def _effective_length(self, seq_len: int) -> int:
        """``seq_len`` rounded up to the growth grid ``threshold * growth^k`` (dynamic methods).

        With ``growth=None`` (the reference rule) the table follows every length; with a grid it
        changes only when the sequence crosses a grid point, so a KV cache is re-rotated a handful
        of times instead of at every step (each re-rotation of a half-precision cache rounds).
        """
        threshold = self.scaling.threshold()
        if self.growth is None or threshold is None or seq_len <= threshold:
            return seq_len
        return max(seq_len, grid_point(grid_step(seq_len, threshold, self.growth), threshold, self.growth))

    def _key(self, seq_len: int | None) -> object:
        """What the table at ``seq_len`` depends on (the registry's ``table_key``); ``None`` if static."""
        if seq_len is None:
            return None
        return self.scaling.table_key(seq_len)

    def _compute(self, device: torch.device | str | None) -> tuple[torch.Tensor, float]:
        return self.scaling.inv_freq(self.dim, base=self.base, seq_len=self._table_seq_len, device=device)

    def _rebuild(self, device: torch.device | str | None) -> None:
        self.inv_freq, self.attention_scaling = self._compute(device)

    def _apply(self, fn: Any, recurse: bool = True) -> RotaryEmbedding:
        # Keep the master table in float32 whatever a model-wide cast does, and rebuild it when
        # the module is materialised from the meta device (its values were never computed).
        was_meta = self.inv_freq.is_meta
        _compat.module_apply(self, super()._apply, fn, recurse)
        if self.inv_freq.dtype != torch.float32 or (was_meta and not self.inv_freq.is_meta):
            self._rebuild(self.inv_freq.device)
        return self

    def set_length(self, seq_len: int) -> bool:
        """Dynamic methods: make the table the one for sequences of ``seq_len`` tokens.

        Returns:
            whether the table changed.
        """
        length = self._effective_length(seq_len)
        key = self._key(length)
        if key == self._table_key:
            return False
        self._table_seq_len = length
        self._table_key = key
        self._rebuild(self.inv_freq.device)
        return True

    def table_for(self, seq_len: int) -> tuple[object, torch.Tensor, float]:
        """(key, inv_freq, attention scaling) of the table for ``seq_len`` tokens; no state change."""
        length = self._effective_length(seq_len)
        inv_freq, scale = self.scaling.inv_freq(
            self.dim, base=self.base, seq_len=length, device=self.inv_freq.device
        )
        return self._key(length), inv_freq, scale

    @property
    def table_key(self) -> object:
        """Dynamic methods: what the current table was built for (see :meth:`set_length`)."""
        return self._table_key

    def _update_dynamic(self, position_ids: torch.Tensor) -> None:
        self.set_length(int(position_ids.max()) + 1)

    # ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cos and sin tables for ``position_ids``.

        Args:
            x: any tensor whose dtype and device the output takes (e.g. the values, ``[b, ..., s,
                h_d]``); its values are not read.
            position_ids: integer positions ``[b, s]``.

        Returns:
            ``(cos, sin)``, each ``[b, s, dim]`` in ``x.dtype`` on ``x.device``.
        """
        if self.scaling.is_dynamic:
            self._update_dynamic(position_ids)
        inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float32)
        if self.angles == "fp32":
            # Exactly transformers' expression, so that the result is bit-equal to its table.
            freqs = position_ids[..., None].float() * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        else:
            reduced = reduced_angles(position_ids.to(x.device), inv_freq)
            cos_half = reduced.cos().mul_(self.attention_scaling)
            sin_half = reduced.sin().mul_(self.attention_scaling)
            cos = torch.cat((cos_half, cos_half), dim=-1)
            sin = torch.cat((sin_half, sin_half), dim=-1)
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, method={self.scaling.method!r}, angles={self.angles!r}"


def grid_step(seq_len: int, threshold: int, growth: float) -> int:
    """The step ``k`` of the growth grid ``threshold * growth^k`` that serves ``seq_len`` tokens.

    ``0`` for ``seq_len <= threshold`` (the initial table); otherwise the smallest ``k`` whose grid
    point :func:`grid_point` is at least ``seq_len``. Shared by dynamic tables in transformers
    (:class:`RotaryEmbedding` with ``growth``) and the vLLM plugin (:mod:`yarn_rope.vllm`), so both
    choose the same table for the same length.
    """
    if seq_len <= threshold:
        return 0
    step = max(1, math.ceil(math.log(seq_len / threshold) / math.log(growth) - 1e-12))
    while grid_point(step, threshold, growth) < seq_len:  # float rounding at a grid point
        step += 1
    return step


def grid_point(step: int, threshold: int, growth: float) -> int:
    """The longest sequence step ``step`` of the growth grid serves: ``ceil(threshold * growth^step)``.

    Rounded with a tolerance: ``64 * sqrt(2)^2`` is 64.00000000000001 in floats, not 65.
    """
    return max(threshold, math.ceil(threshold * growth**step - 1e-9))


def reduced_angles(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``position * inv_freq`` reduced to ``[-pi, pi]``, computed in float64, returned float32.

    ``inv_freq`` has 24 significant bits and positions below 2^29 at most 29, so the float64
    product is exact; the reduction by the float64 ``2 pi`` errs by about ``angle * 1e-16``.
    Also used for the difference of two tables (a float64 ``inv_freq``) when a KV cache is
    re-rotated. Shapes: ``position_ids [b, s]``, ``inv_freq [dim / 2]`` -> ``[b, s, dim / 2]``.
    """
    if position_ids.device.type == "mps":  # no float64 there
        return reduced_angles(position_ids.cpu(), inv_freq.cpu()).to(position_ids.device)
    angles = position_ids[..., None].to(torch.float64) * inv_freq.to(torch.float64)
    # angles - 2 pi * round(angles / 2 pi), in place: these are the large temporaries of a prefill.
    turns = torch.div(angles, _TWO_PI).round_().mul_(_TWO_PI)
    return angles.sub_(turns).to(torch.float32)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The half-rotation layout's partner of ``x``: ``cat(-x[..., d/2:], x[..., :d/2])``, shape of ``x``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
