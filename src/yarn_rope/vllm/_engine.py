"""The engine side of the plugin: which table each request uses, and exact recompute on crossings.

Imported only inside vLLM processes. :func:`install_scheduler` wraps two methods of vLLM's V1
``Scheduler`` (``add_request`` and ``schedule``), :func:`install_runner` the input preparation of
the V1 and V2 model runners; each wrapper passes straight through for a model that declares no
yarn_rope type. The wrappers are recorded once (``__wrapped__``) and never stacked.

The scheduler is the one authority on tables (:class:`Tables`):

* a request's bucket is set when it is admitted, from its length then (the prompt; all its tokens
  after a recompute), and written into its prefix-cache salt, so KV blocks are shared only
  between requests under the same table (vLLM chains the salt through every block hash);
* before each step, a running request whose next length passes its bucket's capacity is preempted
  (its blocks freed), given the bucket of that length and a new salt, and so recomputed from its
  tokens under the new table: vLLM's own preemption path, resumed in the same step when the budget
  allows;
* every step's output carries ``yarn_rope_buckets`` (request id -> bucket), from which the runner
  fills each token's row offset before the forward.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ._model import plan_of_config, rotaries_of
from .plan import ServePlan

__all__ = ["BUCKETS", "Tables", "install_runner", "install_scheduler", "salt"]

#: The attribute of vLLM's SchedulerOutput that carries each scheduled request's bucket.
BUCKETS = "yarn_rope_buckets"
_STATE = "_yarn_rope_tables"


def salt(base: str | None, bucket: int) -> str | None:
    """A request's prefix-cache salt under ``bucket``: its own salt, tagged unless bucket 0."""
    if bucket == 0:
        return base
    return f"{base or ''}|yarn_rope-table-{bucket}"


class Tables:
    """The scheduler's record of each live request's bucket (its table)."""

    def __init__(self, plan: ServePlan) -> None:
        self.plan = plan
        self.buckets: dict[str, int] = {}
        self.salts: dict[str, str | None] = {}

    def assign(self, request: Any, length: int) -> None:
        """Give ``request`` the bucket of ``length`` tokens and rehash its blocks with that salt."""
        request_id = request.request_id
        if request_id not in self.salts:
            self.salts[request_id] = request.cache_salt
        bucket = self.plan.bucket(length)
        self.buckets[request_id] = bucket
        request.cache_salt = salt(self.salts[request_id], bucket)
        request.block_hashes = []
        request.update_block_hashes()

    def outgrown(self, request: Any) -> int | None:
        """The length ``request`` reaches this step if its bucket cannot serve it, else ``None``."""
        length = int(request.num_tokens_with_spec + request.num_output_placeholders)
        if length <= self.plan.capacity(self.buckets[request.request_id]):
            return None
        return length

    def forget(self, live: Any) -> None:
        for request_id in [r for r in self.buckets if r not in live]:
            del self.buckets[request_id]
            self.salts.pop(request_id, None)


def _tables(scheduler: Any) -> Tables | None:
    """The scheduler's :class:`Tables`, made on first use; ``None`` for a model not served by us."""
    state = scheduler.__dict__.get(_STATE)
    if state is None:
        plan = plan_of_config(scheduler.vllm_config)
        state = Tables(plan) if plan is not None else False
        scheduler.__dict__[_STATE] = state
    return state or None


def recompute_crossings(scheduler: Any, tables: Tables) -> list[str]:
    """Preempt every running request that outgrows its table; it resumes under the next one.

    Returns the ids preempted. In reverse order, so that they go back to the waiting queue's head
    in their running order (as vLLM's ``reset_prefix_cache`` does).
    """
    crossing = [(request, tables.outgrown(request)) for request in scheduler.running]
    crossing = [(request, length) for request, length in crossing if length is not None]
    timestamp = time.monotonic()
    for request, length in reversed(crossing):
        scheduler.running.remove(request)
        scheduler._preempt_request(request, timestamp)
        # It may resume within this same step: the V1 runner must then get all its tokens.
        scheduler.prev_step_scheduled_req_ids.discard(request.request_id)
        tables.assign(request, length)
    return [request.request_id for request, _ in crossing]


def _add_request(original: Callable[..., Any]) -> Callable[..., Any]:
    def add_request(self: Any, request: Any) -> Any:
        known = request.request_id in self.requests
        result = original(self, request)
        tables = _tables(self)
        if tables is not None and not known:
            tables.assign(request, int(request.num_tokens))
        return result

    return add_request


def _schedule(original: Callable[..., Any]) -> Callable[..., Any]:
    def schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        tables = _tables(self)
        if tables is None:
            return original(self, *args, **kwargs)
        recompute_crossings(self, tables)
        output = original(self, *args, **kwargs)
        setattr(output, BUCKETS, {rid: tables.buckets[rid] for rid in output.num_scheduled_tokens})
        tables.forget(self.requests)
        return output

    return schedule


def _wrap(owner: type, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    original = owner.__dict__[name]
    if getattr(original, "__wrapped__", None) is not None and getattr(original, "_yarn_rope", False):
        return
    wrapper = make(original)
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    wrapper._yarn_rope = True  # type: ignore[attr-defined]
    wrapper.__doc__ = original.__doc__
    wrapper.__name__ = name
    setattr(owner, name, wrapper)


def install_scheduler() -> None:
    """Wrap vLLM's V1 scheduler (its subclasses, e.g. the async one, inherit the wrappers)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    _wrap(Scheduler, "add_request", _add_request)
    _wrap(Scheduler, "schedule", _schedule)


# ------------------------------------------------------------------------------------------------
# The runners
# ------------------------------------------------------------------------------------------------


def fill_offsets(
    rotaries: Sequence[Any], scheduler_output: Any, req_ids: Sequence[str], num_scheduled: np.ndarray
) -> None:
    """Write each scheduled token's row offset (its request's bucket start) into ``rotaries``.

    ``req_ids`` and ``num_scheduled`` are the batch in the runner's order; the rest of each
    buffer is zeroed (padding tokens read bucket 0's rows).
    """
    buckets = getattr(scheduler_output, BUCKETS, None)
    if buckets is None:
        raise RuntimeError(
            "yarn_rope's vLLM plugin: the scheduler output carries no tables for this step; the plugin's "
            "scheduler hook is not installed in the engine process (a custom scheduler_cls that does not "
            "subclass vLLM's Scheduler?)"
        )
    for rotary in rotaries:
        starts = np.asarray(rotary.plan.row_starts, dtype=np.int64)
        per_request = starts[[buckets[request_id] for request_id in req_ids]]
        offsets = np.repeat(per_request, num_scheduled)
        buffer = rotary.row_offsets
        if offsets.shape[0] > buffer.shape[0]:
            raise RuntimeError(
                f"yarn_rope's vLLM plugin: a step of {offsets.shape[0]} tokens exceeds the {buffer.shape[0]} "
                "the rotary module was built for (max_num_batched_tokens)"
            )
        full = np.zeros(buffer.shape[0], dtype=np.int64)
        full[: offsets.shape[0]] = offsets
        buffer.copy_(torch.from_numpy(full))


def _rotaries(runner: Any) -> list[Any]:
    found = runner.__dict__.get(_STATE)
    if found is None:
        found = rotaries_of(runner.get_model())
        runner.__dict__[_STATE] = found
    return list(found)


def _prepare_v1(original: Callable[..., Any]) -> Callable[..., Any]:
    def _prepare_inputs(
        self: Any, scheduler_output: Any, num_scheduled_tokens: np.ndarray, *a: Any, **k: Any
    ) -> Any:
        rotaries = _rotaries(self)
        if rotaries:
            count = len(num_scheduled_tokens)
            req_ids = self.input_batch.req_ids[:count]
            fill_offsets(rotaries, scheduler_output, req_ids, num_scheduled_tokens)
        return original(self, scheduler_output, num_scheduled_tokens, *a, **k)

    return _prepare_inputs


def _prepare_v2(original: Callable[..., Any]) -> Callable[..., Any]:
    def prepare_inputs(self: Any, scheduler_output: Any, batch_req_state: Any, *a: Any, **k: Any) -> Any:
        rotaries = _rotaries(self)
        if rotaries:
            fill_offsets(
                rotaries,
                scheduler_output,
                list(batch_req_state.req_ids),
                np.asarray(batch_req_state.num_scheduled_tokens),
            )
        return original(self, scheduler_output, batch_req_state, *a, **k)

    return prepare_inputs


def install_runner() -> None:
    """Wrap the input preparation of the model runners vLLM has imported (V1 and V2)."""
    import sys

    v1 = sys.modules.get("vllm.v1.worker.gpu_model_runner")
    if v1 is not None:
        _wrap(v1.GPUModelRunner, "_prepare_inputs", _prepare_v1)
    v2 = sys.modules.get("vllm.v1.worker.gpu.model_runner")
    if v2 is not None:
        _wrap(v2.GPUModelRunner, "prepare_inputs", _prepare_v2)
