"""Run requests through a real vLLM engine with yarn_rope's plugin (run in vLLM's venv).

tests/test_vllm_dynamic.py and benchmarks/vllm_dynamic.py run it with the python of vLLM's venv,
where yarn_rope is installed (``bash .ci/vllm-venv``), so vLLM loads the plugin through its
entry point::

    .venv-vllm/bin/python tests/vllm_dynamic_scorer.py JOB.json OUT.json

JOB.json::

    {"ids": [token ids],
     "runs": [{"name": ..., "engine": {vllm.LLM keywords}, "variant": null | "one-table" |
               "stale-keys" | "shared-prefix", "in_process": bool, "env": {variables for this run},
               "calls": [[{"start": i, "tokens": n, "max_tokens": k, "prompt_logprobs": bool}, ...],
                         ...]}]}

Each call is one ``generate`` over its requests (a batch), greedy; the calls of a run go one
after another on one engine. A request's prompt is ``ids[start:start + tokens]``. ``variant``
deliberately breaks the plugin for the negative controls (each needs ``in_process``: engine core
and worker in this process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the ``uni`` executor, so that
the breakage reaches them):

* ``one-table``: every request of a step gets the batch's largest table;
* ``stale-keys``: a request that outgrows its table moves to the next one without recompute, its
  cached keys left as they were;
* ``shared-prefix``: prefix-cache salts ignore the table, so blocks are shared across buckets.

OUT.json: ``{"vllm": version, "runs": {name: {"calls": [[{"prompt_nll": [...] | null,
"tokens": [generated ids], "logprobs": [their logprobs]}, ...]], "load_s", "run_s", "call_s",
"compilation": {"mode", "backend"} of vLLM's final config}}}``; ``call_s`` holds each call's own
``generate`` seconds, in order (benchmarks/vllm_dynamic.py times them). A run with
``"count_preemptions": true`` (optional) turns vLLM's statistics on and adds ``"preemptions"``: how
many preemptions (recomputes) each call caused, from ``vllm:num_preemptions``.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from typing import Any


def _one_table(engine: Any) -> Callable[[], None]:
    original = engine.fill_offsets

    def fill(rotaries: Any, output: Any, req_ids: Any, num_scheduled: Any) -> None:
        buckets = getattr(output, engine.BUCKETS)
        top = max(buckets[request_id] for request_id in req_ids)
        setattr(output, engine.BUCKETS, dict.fromkeys(buckets, top))
        original(rotaries, output, req_ids, num_scheduled)

    engine.fill_offsets = fill
    return lambda: setattr(engine, "fill_offsets", original)


def _stale_keys(engine: Any) -> Callable[[], None]:
    original = engine.recompute_crossings

    def move_without_recompute(scheduler: Any, tables: Any) -> list[str]:
        for request in scheduler.running:
            length = tables.outgrown(request)
            if length is not None:
                tables.buckets[request.request_id] = tables.plan.bucket(length)
        return []

    engine.recompute_crossings = move_without_recompute
    return lambda: setattr(engine, "recompute_crossings", original)


def _shared_prefix(engine: Any) -> Callable[[], None]:
    original = engine.salt
    engine.salt = lambda base, bucket: base
    return lambda: setattr(engine, "salt", original)


VARIANTS = {"one-table": _one_table, "stale-keys": _stale_keys, "shared-prefix": _shared_prefix}


def _request_output(output: Any, ids: list[int], prompt_logprobs: bool) -> dict[str, Any]:
    prompt_nll = None
    if prompt_logprobs:
        entries = output.prompt_logprobs
        prompt_nll = [-entry[token].logprob for entry, token in zip(entries[1:], ids[1:], strict=True)]
    completion = output.outputs[0]
    tokens = list(completion.token_ids)
    logprobs = [entry[token].logprob for entry, token in zip(completion.logprobs or [], tokens, strict=True)]
    return {"prompt_nll": prompt_nll, "tokens": tokens, "logprobs": logprobs}


def _preemptions(llm: Any) -> int:
    """vLLM's cumulative preemption count for this engine (its statistics must be on)."""
    return int(sum(metric.value for metric in llm.get_metrics() if metric.name == "vllm:num_preemptions"))


def run(job_ids: list[int], spec: dict[str, Any]) -> dict[str, Any]:
    """One engine built from ``spec["engine"]``, its calls in order; their outputs and times."""
    from vllm import LLM, SamplingParams

    engine_kwargs = dict(spec["engine"])
    if spec.get("in_process"):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        engine_kwargs.setdefault("distributed_executor_backend", "uni")
    else:
        os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    saved_environment = {name: os.environ.get(name) for name in spec.get("env", {})}
    os.environ.update(spec.get("env", {}))
    counting = bool(spec.get("count_preemptions"))
    if counting:
        engine_kwargs["disable_log_stats"] = False
    restore = None
    if spec.get("variant"):
        if not spec.get("in_process"):
            raise ValueError(f"variant {spec['variant']!r} needs in_process: true")
        from yarn_rope.vllm import _engine

        restore = VARIANTS[spec["variant"]](_engine)
    try:
        started = time.perf_counter()
        llm = LLM(**engine_kwargs)
        loaded = time.perf_counter()
        calls, call_seconds, preemptions = [], [], []
        for call in spec["calls"]:
            prompts, params = [], []
            for request in call:
                ids = job_ids[request.get("start", 0) : request.get("start", 0) + request["tokens"]]
                prompts.append({"prompt_token_ids": ids})
                params.append(
                    SamplingParams(
                        max_tokens=request.get("max_tokens", 1),
                        temperature=0.0,
                        logprobs=0,
                        prompt_logprobs=0 if request.get("prompt_logprobs") else None,
                    )
                )
            before = _preemptions(llm) if counting else 0
            began = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            call_seconds.append(time.perf_counter() - began)
            if counting:
                preemptions.append(_preemptions(llm) - before)
            calls.append(
                [
                    _request_output(output, prompt["prompt_token_ids"], bool(request.get("prompt_logprobs")))
                    for output, prompt, request in zip(outputs, prompts, call, strict=True)
                ]
            )
        finished = time.perf_counter()
        compilation = llm.llm_engine.vllm_config.compilation_config
        compiled = {
            "mode": getattr(compilation.mode, "name", str(compilation.mode)),
            "backend": str(compilation.backend),
        }
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    finally:
        if restore is not None:
            restore()
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    result = {
        "calls": calls,
        "load_s": loaded - started,
        "run_s": finished - loaded,
        "call_s": call_seconds,
        "compilation": compiled,
    }
    if counting:
        result["preemptions"] = preemptions
    return result


if __name__ == "__main__":
    from vllm_scorer import command_line  # the same directory: the script's own is on sys.path

    command_line(lambda job, spec: run(job["ids"], spec))
