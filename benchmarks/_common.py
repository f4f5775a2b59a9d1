"""What the benchmark scripts share: paired timing, peak memory, FLOP counting, the machine, output.

Conventions (every script):

* Timings are paired and alternating: each round runs both sides, in alternating order (A B, then
  B A, ...), and the headline is the median of the per-round ratios, so drift on a shared machine
  (frequency scaling, other jobs) cancels instead of biasing one side.
* FLOPs count a multiply-add as 2. A model forward over ``s`` tokens costs ``2 * s * P`` for the
  ``P`` weights of its ``nn.Linear`` layers (the vocabulary projection included, embedding lookups
  not) plus attention: ``Q K^T`` and ``A V`` are ``2 * s^2 * d`` each per layer (``d`` = heads x
  head dim), and a causal mask needs only half of them: ``2 * s^2 * d`` per layer in all.
* Peak memory on CPU is the process's resident high-water mark (``VmHWM``), reset with
  ``/proc/self/clear_refs`` after the model is loaded (and free heap memory trimmed), minus the
  resident size at that moment.
* ``--json OUT`` writes one object whose ``headline`` field is the headline ratio, plus the table.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work (a no-op on CPU), so that a clock reading means something."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | str | None = None) -> float:
    """Seconds one call of ``fn`` takes (GPU work included)."""
    synchronize(device)
    began = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - began


def paired(
    first: Callable[[], float], second: Callable[[], float], rounds: int
) -> tuple[list[float], list[float]]:
    """Run ``first`` and ``second`` ``rounds`` times each, alternating which goes first.

    Each callable returns its own measurement (seconds). Returns the two lists of measurements,
    round by round, so that ``second[i] / first[i]`` is the ratio of round ``i``.
    """
    a: list[float] = []
    b: list[float] = []
    for index in range(rounds):
        if index % 2 == 0:
            a.append(first())
            b.append(second())
        else:
            b.append(second())
            a.append(first())
    return a, b


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median over rounds of ``numerator / denominator``."""
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))


def linear_weights(model: torch.nn.Module) -> int:
    """Weights of the model's ``nn.Linear`` layers (each counted once, tied ones too)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    return total


def attention_width(config: Any) -> tuple[int, int]:
    """(layers, query heads x head dim) of a transformers decoder config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads * head_dim


def forward_flops(model: torch.nn.Module, tokens: int, *, lm_head: bool = True) -> float:
    """FLOPs of one causal forward over ``tokens`` tokens (see the module docstring).

    ``lm_head=False`` leaves the vocabulary projection out (a prefill that keeps one logit).
    """
    weights = linear_weights(model)
    if not lm_head and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
        if head is not None:
            weights -= head.weight.numel()
    layers, width = attention_width(model.config)
    return 2.0 * tokens * weights + 2.0 * tokens * tokens * width * layers


FLOP_CONVENTION = (
    "FLOPs: multiply-add = 2; 2*tokens*(nn.Linear weights) + causal attention 2*s^2*(heads*head_dim) "
    "per layer (QK^T and AV counted at half their square)"
)


def matmul_peak(
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    size: int = 2048,
    seconds: float = 2.0,
) -> float:
    """Measured peak matmul FLOP/s: the best of repeated ``size x size`` products for ``seconds``."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    out = torch.empty(size, size, dtype=dtype, device=device)
    torch.mm(a, b, out=out)  # warm-up (kernel selection, threads)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        best = min(best, timed(lambda: torch.mm(a, b, out=out), device))
    return 2.0 * size**3 / best


def llama_config(scaling: Any, *, rope_theta: float, **fields: Any) -> Any:
    """A ``LlamaConfig`` that declares ``scaling`` (a ``yarn_rope.RopeScaling``) natively, so that
    transformers builds its own rotary module for it: ``rope_parameters`` on 5.x, ``rope_scaling``
    and ``rope_theta`` on 4.x."""
    import transformers

    declared = scaling.to_hf()
    if int(transformers.__version__.split(".")[0]) >= 5:
        return transformers.LlamaConfig(**fields, rope_parameters={**declared, "rope_theta": rope_theta})
    return transformers.LlamaConfig(**fields, rope_theta=rope_theta, rope_scaling=declared)


# ------------------------------------------------------------------------------------------------
# Memory


_HWM = re.compile(r"^VmHWM:\s+(\d+) kB", re.MULTILINE)
_RSS = re.compile(r"^VmRSS:\s+(\d+) kB", re.MULTILINE)


def _status(pattern: re.Pattern[str]) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        match = pattern.search(handle.read())
    if match is None:
        raise RuntimeError("/proc/self/status has no VmHWM/VmRSS: peak memory needs Linux")
    return int(match.group(1)) * 1024


def reset_peak_memory() -> int:
    """Reset the resident high-water mark to the current resident size; return that size (bytes).

    Freed heap memory that the C allocator still holds is handed back to the system first
    (``malloc_trim``, glibc), so that what the measured code allocates shows up in the peak
    instead of silently reusing memory freed while loading.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")
    return _status(_RSS)


def peak_memory() -> int:
    """Resident high-water mark of this process since the last reset (bytes)."""
    return _status(_HWM)


# ------------------------------------------------------------------------------------------------
# Output


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import transformers

    info: dict[str, Any] = {
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(path: str | os.PathLike[str], report: dict[str, Any]) -> None:
    """Write ``report`` (which must have a ``headline``) to ``path`` atomically: all or nothing."""
    if "headline" not in report:
        raise ValueError("a benchmark report needs its headline ratio under 'headline'")
    from yarn_rope._files import write_json as write_strict_json

    write_strict_json(path, report)


def finish(report: dict[str, Any], path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Add the machine to ``report``, write it to ``path`` (``--json``) if given, and return it."""
    report["machine"] = machine()
    if path:
        write_json(path, report)
    return report


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain aligned text table."""
    cells = [header, *[[_cell(value) for value in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(value.rjust(width) for value, width in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value or value == 0 or not 1e-3 <= abs(value) < 1e6:  # nan, 0, tiny, huge
            return f"{value:.2e}" if value == value and value != 0 else str(value)
        if abs(value) < 1:
            return f"{value:.4g}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)
