"""What the vLLM plugin serves, as data: the growth grid of tables and their stacked cos/sin rows.

Pure (torch and yarn_rope only, no vLLM): the scheduler side uses :meth:`ServePlan.bucket` and
:meth:`ServePlan.capacity` to give each request its table, the model side builds
:meth:`ServePlan.cos_sin_cache` once and picks rows with :meth:`ServePlan.row_starts`. Both
build the plan from the same config with :func:`plan_from`, so they agree on every number.

Bucket ``k`` serves sequences of up to ``capacity(k)`` tokens: ``k = 0`` up to the method's
threshold (the original context for dynamic YaRN, which is plain RoPE there), then the growth grid
``threshold * growth^k`` (:func:`yarn_rope.rotary.grid_step`), the same grid as
``yarn_rope.patch(model, method="dynamic-yarn", schedule=growth)``. Its table is
:meth:`RopeScaling.inv_freq` at the grid point (:meth:`ServePlan.table_length`), so a sequence in
bucket ``k`` gets exactly the table yarn_rope's dynamic module gives a sequence of its length in
transformers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import torch

from ..config import RopeScaling
from ..rotary import ANGLE_MODES, AngleMode, grid_point, grid_step, reduced_angles

__all__ = ["DEFAULT_GROWTH", "MAX_TABLE_ROWS", "OPTIONS", "ServePlan", "plan_from"]

#: The serving default: a new table at every power of sqrt(2) of the threshold. An exact-mode
#: recompute then costs at most sqrt(2) / (sqrt(2) - 1) = 3.4 times a request's final length.
DEFAULT_GROWTH = math.sqrt(2.0)
#: The stacked tables may hold at most this many rows (all buckets together): 64 M rows is 16 GiB
#: at a rotary dimension of 64 in float32; a finer grid or a longer max_model_len is refused.
MAX_TABLE_ROWS = 1 << 26
#: The keys of ``additional_config["yarn_rope"]`` and what each takes.
OPTIONS: dict[str, str] = {
    "schedule": "the growth ratio of the grid of tables, a number > 1 (default sqrt(2))",
    "angles": "'precise' (float64 angle reduction, default) or 'fp32' (transformers' float32 angles)",
    "mode": "'exact' (default: a request that outgrows its table is recomputed under the next one)",
}


@dataclasses.dataclass(frozen=True)
class ServePlan:
    """The tables one served model uses, one per bucket of sequence lengths.

    Attributes:
        scaling: the dynamic settings (e.g. ``method="dynamic-yarn"``).
        max_model_len: vLLM's ``max_model_len``: no position reaches it.
        growth: the grid ratio ``g > 1``.
        angles: how cos/sin are formed (see :mod:`yarn_rope.rotary`).
    """

    scaling: RopeScaling
    max_model_len: int
    growth: float = DEFAULT_GROWTH
    angles: AngleMode = "precise"

    def __post_init__(self) -> None:
        if not isinstance(self.scaling, RopeScaling) or not self.scaling.is_dynamic:
            raise ValueError(
                f"the vLLM plugin serves dynamic methods per request; got {self.scaling!r}: serve static "
                "methods with vLLM's own rotary embeddings (yarn-rope export --to vllm)"
            )
        if (
            isinstance(self.max_model_len, bool)
            or not isinstance(self.max_model_len, int)
            or self.max_model_len < 1
        ):
            raise ValueError(f"max_model_len must be a positive integer, got {self.max_model_len!r}")
        growth = self.growth
        if isinstance(growth, bool) or not isinstance(growth, (int, float)) or not 1.0 < growth < math.inf:
            raise ValueError(
                f"additional_config['yarn_rope']['schedule'] must be a growth ratio > 1 (e.g. 1.4142 or 2), "
                f"got {growth!r}; the per-token reference rule ('exact') would need one table per length"
            )
        object.__setattr__(self, "growth", float(growth))
        if self.angles not in ANGLE_MODES:
            raise ValueError(
                f"additional_config['yarn_rope']['angles'] must be one of {ANGLE_MODES}, got {self.angles!r}"
            )
        if self.total_rows > MAX_TABLE_ROWS:
            raise ValueError(
                f"schedule {self.growth:g} up to max_model_len {self.max_model_len} needs {self.num_buckets} "
                f"tables of {self.total_rows} rows in all (at most {MAX_TABLE_ROWS}): choose a coarser grid "
                "(a larger schedule, e.g. 1.4142 or 2) or a smaller max_model_len"
            )

    @property
    def threshold(self) -> int:
        """The longest sequence bucket 0 serves (the original context for dynamic YaRN)."""
        threshold = self.scaling.threshold()
        assert threshold is not None  # dynamic methods have one
        return int(threshold)

    def bucket(self, length: int) -> int:
        """The bucket of a sequence of ``length`` tokens (``0`` within the threshold)."""
        if length < 1:
            raise ValueError(f"a sequence length is at least 1, got {length}")
        return grid_step(length, self.threshold, self.growth)

    def capacity(self, bucket: int) -> int:
        """The longest sequence bucket ``bucket`` serves (a longer one needs the next table)."""
        if bucket == 0:
            return self.threshold
        point = grid_point(bucket, self.threshold, self.growth)
        # grid_point rounds threshold * growth^k up; a length in between already takes step k + 1.
        return point if grid_step(point, self.threshold, self.growth) == bucket else point - 1

    def table_length(self, bucket: int) -> int:
        """The length whose table bucket ``bucket`` uses: the grid point, as yarn_rope's dynamic
        module in transformers rounds every length of the bucket up to it."""
        return self.threshold if bucket == 0 else grid_point(bucket, self.threshold, self.growth)

    @functools.cached_property
    def num_buckets(self) -> int:
        """Buckets up to the one that serves ``max_model_len`` tokens."""
        return self.bucket(self.max_model_len) + 1

    def rows(self, bucket: int) -> int:
        """Rows (positions) of bucket ``bucket``'s table: its capacity, at most ``max_model_len``."""
        return min(self.capacity(bucket), self.max_model_len)

    @functools.cached_property
    def row_starts(self) -> tuple[int, ...]:
        """The first row of each bucket's table in :meth:`cos_sin_cache`."""
        starts = [0]
        for bucket in range(self.num_buckets - 1):
            starts.append(starts[-1] + self.rows(bucket))
        return tuple(starts)

    @functools.cached_property
    def total_rows(self) -> int:
        return sum(self.rows(bucket) for bucket in range(self.num_buckets))

    def table(self, dim: int, base: float, bucket: int) -> tuple[torch.Tensor, float]:
        """``(inv_freq [dim // 2] float32, attention scaling)`` of bucket ``bucket``."""
        return self.scaling.inv_freq(dim, base=base, seq_len=self.table_length(bucket))

    def cos_sin_cache(self, dim: int, base: float) -> torch.Tensor:
        """Every bucket's ``cat(cos, sin)`` rows, stacked: ``[total_rows, dim]`` float32.

        Row ``row_starts[k] + p`` holds position ``p`` under bucket ``k``'s table, in vLLM's
        layout (``cos`` of the ``dim // 2`` pair angles, then ``sin``), already multiplied by the
        attention scaling, as vLLM's own YaRN cache is.
        """
        parts = []
        for bucket in range(self.num_buckets):
            inv_freq, scale = self.table(dim, base, bucket)
            positions = torch.arange(self.rows(bucket), dtype=torch.int64)
            if self.angles == "fp32":
                angles = positions[:, None].float() * inv_freq  # transformers' expression
            else:
                angles = reduced_angles(positions[None], inv_freq)[0]
            parts.append(torch.cat((angles.cos() * scale, angles.sin() * scale), dim=-1))
        return torch.cat(parts)


def plan_from(
    rope: Mapping[str, Any] | Any, max_model_len: int, options: Mapping[str, Any] | None
) -> ServePlan:
    """The plan for a model's rope settings, vLLM's ``max_model_len`` and the plugin's options.

    Args:
        rope: what :meth:`RopeScaling.from_hf` reads (a config or its ``rope_parameters``).
        max_model_len: vLLM's final ``max_model_len``.
        options: ``additional_config["yarn_rope"]`` (see :data:`OPTIONS`), or ``None``.

    Raises:
        ValueError: unknown options or bad values, naming the key and what it takes.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        known = "; ".join(f"{key}: {what}" for key, what in OPTIONS.items())
        raise ValueError(f"additional_config['yarn_rope'] has unknown keys {unknown}; it takes {known}")
    mode = options.get("mode", "exact")
    if mode != "exact":
        raise ValueError(
            f"additional_config['yarn_rope']['mode'] = {mode!r} is not offered: only 'exact' (a request that "
            "outgrows its table is recomputed under the next one). Re-rotating cached keys in place is not "
            "equal to a recompute (deeper layers' keys came from hidden states under the old table)"
        )
    scaling = rope if isinstance(rope, RopeScaling) else RopeScaling.from_hf(rope)
    return ServePlan(
        scaling=scaling,
        max_model_len=max_model_len,
        growth=options.get("schedule", DEFAULT_GROWTH),
        angles=options.get("angles", "precise"),
    )
