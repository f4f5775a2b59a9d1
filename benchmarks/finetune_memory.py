"""Peak memory of one fine-tuning step: the loss in slices against the full logits.

Run: .venv/bin/python benchmarks/finetune_memory.py [--lengths 2048 4096 8192 16384] [--json OUT]
[--extend] [--max-rss-gb 20]

One training step as :class:`yarn_rope.finetune.FinetuneRun` takes it: SmolLM2-135M-Instruct in
float32 (sdpa), gradient checkpointing on, forward, backward and an AdamW step, on the first
``length`` tokens of ``_pydecimal.py`` (YaRN patched at factor ``length / 8192`` past the trained
context, both arms alike). Two arms:

* ``sliced``: :func:`yarn_rope.finetune.loss.causal_lm_loss` with 1,024 positions at a time (the
  trainer's default ``loss_chunk_size``): the LM head and cross-entropy run slice by slice, each
  slice's logits recomputed in the backward pass;
* ``full``: ``model(ids, labels=ids).loss.backward()``: transformers builds the ``[1, length,
  49152]`` logits, upcasts them and runs cross-entropy (0.2 MB per token per float32 copy).

Each measurement runs in a fresh process. The peak of the step is the process's resident
high-water mark during it: the mark is reset after the model and optimizer are set up
(``/proc/self/clear_refs``, as ``eval_memory.py``), because loading SmolLM2 from its GGUF file
dequantises it and peaks at about 2.9 GB on its own, more than a 2k-token step; the process's
lifetime peak (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is recorded too. "step" is that peak
minus the resident size before the step (weights and the model's buffers). The headline is full /
sliced step peak at the longest length (goal >= 3x at 16k, and the sliced peak growing linearly
with the length). Both arms compute the same loss; the table shows both.

Each process runs with ``MALLOC_MMAP_THRESHOLD_=65536`` (``--glibc-default`` leaves it out): glibc
otherwise raises its mmap threshold as large blocks are freed and keeps later freed activations in
its heap, so that the resident peak measures the allocator's retention more than the step's live
tensors (measured on a checkpointed 8- and 16-layer stack at 4k tokens: 15.5 KiB per token per
layer with the default, 3.3 with the fixed threshold, against 2.3 for the one stored input).

Each measurement's process is watched: above ``--max-rss-gb`` resident (default 20), or when the
machine has under 1.5 GiB available, it is killed and recorded as "did not fit under N GB" instead
of running the machine out of memory. ``--extend`` adds the lengths measured now to the report
already in ``--json`` (its other records kept); ``--arms`` measures one arm only.

Expect well over an hour on 2 CPU cores for the default lengths: measured on 2 shared, busy cores,
8k took about 5 minutes per arm, 16k 14 (sliced) and 32 (full) minutes.
``--model tiny`` uses ``eval_memory.py``'s small random Llama (a 4,096-token vocabulary) at 256
tokens (what the test suite runs, seconds).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import finish, peak_memory, reset_peak_memory, table
from eval_memory import load  # the same model and corpus as the evaluation's memory benchmark

ARMS = ("sliced", "full")
# glibc's malloc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after
# which freed activations stay in the heap and count in the resident size: measured here, 15.5 KiB
# per token per checkpointed layer instead of 3.3. A fixed threshold returns each freed block.
MMAP_THRESHOLD = 1 << 16
CHUNK = 1024
# The guard on each measurement's process: killed (and recorded as not fitting) above --max-rss-gb
# resident, or when the machine's available memory falls below this, whichever comes first.
MIN_AVAILABLE = 3 << 29  # 1.5 GiB
WATCH_SECONDS = 0.1


def child(arm: str, length: int, kind: str) -> dict:
    """One measurement, in this process (the parent starts one process per measurement)."""
    import transformers

    import yarn_rope
    from yarn_rope import _compat
    from yarn_rope.finetune.loss import causal_lm_loss

    transformers.logging.set_verbosity_error()
    model, ids, trained = load(kind)
    if ids.numel() < length:
        raise SystemExit(f"the corpus has {ids.numel()} tokens, fewer than --lengths {length}")
    ids = ids[:length].clone()[None]
    if length > trained:
        yarn_rope.patch(model, factor=length / trained, original_max_position_embeddings=trained)
    model.config.use_cache = False
    _compat.set_activation_checkpointing(model, True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    gc.collect()
    before = reset_peak_memory()  # loading's own peak (a GGUF file is dequantised) is not the step's
    began = time.perf_counter()
    batch = {"input_ids": ids, "labels": ids}
    loss = causal_lm_loss(model, batch, chunk_size=CHUNK) if arm == "sliced" else model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    seconds = time.perf_counter() - began
    peak = peak_memory()
    return {
        "arm": arm,
        "length": length,
        "peak_bytes": peak,
        "before_step_bytes": before,
        "step_bytes": peak - before,
        "process_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        "seconds": seconds,
        "loss": float(loss),
    }


def _resident(pid: int) -> int:
    """Resident size of process ``pid`` (bytes); 0 once it has gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def _available() -> int:
    """The machine's available memory (bytes, ``MemAvailable`` in ``/proc/meminfo``)."""
    match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else sys.maxsize


def _watch(process: subprocess.Popen, max_rss: float) -> str | None:
    """Wait for ``process``, killing it if its resident size passes ``max_rss`` bytes or the machine
    runs short of memory (another process's memory counts there too); return why it was killed."""
    began, largest = time.perf_counter(), 0
    while process.poll() is None:
        resident = _resident(process.pid)
        largest = max(largest, resident)
        short = _available() < MIN_AVAILABLE
        if resident > max_rss or short:
            process.kill()
            process.wait()
            floor = f"{MIN_AVAILABLE / 2**30:.1f} GiB"
            why = f"the machine's available memory fell below {floor}" if short else ""
            return (
                f"did not fit under {max_rss / 1e9:g} GB: killed after {time.perf_counter() - began:.0f} s "
                f"at {largest / 2**20:,.0f} MiB resident{'; ' + why if why else ''}"
            )
        time.sleep(WATCH_SECONDS)
    return None


def measure(
    arm: str, length: int, kind: str, *, fixed_threshold: bool = True, max_rss: float = math.inf
) -> dict:
    """Run :func:`child` in a fresh process; a process that dies, or is killed for passing
    ``max_rss`` bytes resident, is recorded, not raised."""
    flags = ["--child", arm, "--length", str(length), "--model", kind]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)} if fixed_threshold else None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        command = [sys.executable, str(Path(__file__).resolve()), *flags]
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env)
        killed = _watch(process, max_rss)
        out.seek(0)
        err.seek(0)
        printed, complaint = out.read().strip().splitlines(), err.read().strip().splitlines()
    if killed:
        return {"arm": arm, "length": length, "error": killed}
    if process.returncode == 0 and printed:
        return dict(json.loads(printed[-1]))
    last = complaint[-1:] or [f"exit status {process.returncode}"]
    return {"arm": arm, "length": length, "error": f"{last[0]} (exit status {process.returncode})"}


def _rows(records: list[dict], lengths: list[int]) -> list[list]:
    def get(arm: str, length: int) -> dict:
        missing = {"arm": arm, "length": length, "error": "not measured"}
        return next((r for r in records if r["arm"] == arm and r["length"] == length), missing)

    rows = []
    for length in lengths:
        sliced, full = get("sliced", length), get("full", length)
        ok = "error" not in sliced and "error" not in full
        pair = (("s", sliced), ("f", full))
        mib = {name: record.get("peak_bytes", math.nan) / 2**20 for name, record in pair}
        step = {name: record.get("step_bytes", math.nan) / 2**20 for name, record in pair}
        rows.append(
            [
                length,
                mib["s"],
                mib["f"],
                mib["f"] / mib["s"] if ok else math.nan,
                step["s"],
                step["f"],
                step["f"] / step["s"] if ok else math.nan,
                sliced.get("seconds", math.nan),
                full.get("seconds", math.nan),
                sliced.get("loss", math.nan),
                full.get("loss", math.nan),
            ]
        )
    return rows


HEADER = [
    "tokens",
    "sliced MiB",
    "full MiB",
    "full/sliced",
    "sliced step MiB",
    "full step MiB",
    "step full/sliced",
    "sliced s",
    "full s",
    "sliced loss",
    "full loss",
]


def _earlier(path: str | None, lengths: list[int], arms: list[str]) -> list[dict]:
    """``--extend``: the records of the report at ``path`` that are not measured again now."""
    if not path or not Path(path).exists():
        return []
    report = json.loads(Path(path).read_text())
    return [r for r in report["records"] if r["length"] not in lengths or r["arm"] not in arms]


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for hidden, kind in (("--child", str), ("--length", int)):  # one measurement, in a fresh process
        parser.add_argument(hidden, type=kind, help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="default 2k..16k (tiny: 256)")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument(
        "--extend",
        action="store_true",
        help="keep the records already in --json (those of the lengths and arms measured now are replaced)",
    )
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="default: both")
    parser.add_argument(
        "--max-rss-gb",
        type=float,
        default=20.0,
        help="kill a measurement's process above this resident size (GB, 1e9 bytes), or when the "
        f"machine has under {MIN_AVAILABLE / 2**30:.1f} GiB available, and record it as not fitting",
    )
    parser.add_argument(
        "--glibc-default",
        action="store_true",
        help=f"leave glibc's dynamic mmap threshold (default: MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD})",
    )
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.length, args.model)))
        return None
    lengths = sorted(args.lengths or ([256] if args.model == "tiny" else [2048, 4096, 8192, 16384]))
    if min(lengths) < 2:
        parser.error("--lengths must be >= 2")
    if args.max_rss_gb <= 0:
        parser.error(f"--max-rss-gb must be > 0, got {args.max_rss_gb}")
    records = _earlier(args.json, lengths, args.arms) if args.extend else []
    for length in lengths:
        for arm in args.arms:
            record = measure(
                arm, length, args.model, fixed_threshold=not args.glibc_default, max_rss=args.max_rss_gb * 1e9
            )
            records.append(record)
            shown = f"{record['peak_bytes'] / 2**20:,.0f} MiB" if "error" not in record else record["error"]
            print(f"  {arm:>6} at {length:>6} tokens: {shown}", flush=True)
    return _report(args, records)


def _report(args: argparse.Namespace, records: list[dict]) -> dict:
    """Print the table and the headline (full / sliced at the longest length both arms measured)."""
    lengths = sorted({r["length"] for r in records})
    rows = _rows(records, lengths)
    print(f"peak resident memory of one training step (AdamW, fp32, checkpointing), model {args.model}")
    print(table(rows, HEADER))
    both = [row for row in rows if not math.isnan(row[3])] or rows
    headline, longest = both[-1][3], both[-1][0]
    print(f"headline: full / sliced peak at {longest} tokens = {headline:.2f}x (goal >= 3 at 16k)")
    report = {
        "headline": headline,
        "headline_means": f"peak RSS of a step with model(ids, labels=ids) / with the sliced loss, "
        f"{longest} tokens (the longest length both arms measured)",
        "model": args.model,
        "chunk_size": CHUNK,
        "malloc_mmap_threshold": None if args.glibc_default else MMAP_THRESHOLD,
        "max_rss_bytes": args.max_rss_gb * 1e9,
        "lengths": lengths,
        "table": {"header": HEADER, "rows": rows},
        "records": records,
    }
    return finish(report, args.json)


if __name__ == "__main__":
    main()
