"""yarn_rope's vLLM plugin without vLLM: the plan's tables against yarn_rope's dynamic module, the
scheduler's bookkeeping on stand-in requests, the runner's row offsets, the export and packaging.

The engine itself is proved in tests/test_vllm_dynamic.py (vLLM's venv).
"""

from __future__ import annotations

import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

import yarn_rope
from yarn_rope.export import export
from yarn_rope.rotary import RotaryEmbedding
from yarn_rope.vllm import SUPPORTED_RELEASES, supported
from yarn_rope.vllm._engine import BUCKETS, Tables, fill_offsets, recompute_crossings, salt
from yarn_rope.vllm.plan import DEFAULT_GROWTH, MAX_TABLE_ROWS, ServePlan, plan_from

REPO = Path(__file__).resolve().parents[1]
DYNAMIC = yarn_rope.RopeScaling(method="dynamic-yarn", original_max_position_embeddings=256)
GROWTHS = [1.03, math.sqrt(2.0), 2.0]


# ------------------------------------------------------------------------------------------------
# The plan: the same buckets and tables as yarn_rope's dynamic module
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("growth", GROWTHS)
def test_buckets_follow_the_dynamic_module_grid(growth):
    plan = ServePlan(DYNAMIC, max_model_len=2000, growth=growth)
    rotary = RotaryEmbedding(64, base=10000.0, scaling=DYNAMIC, growth=growth)
    for length in range(1, 2000):
        bucket = plan.bucket(length)
        assert plan.table_length(bucket) == max(rotary._effective_length(length), 256), length
        assert length <= plan.capacity(bucket)
        assert bucket == 0 or length > plan.capacity(bucket - 1)
    assert plan.num_buckets == plan.bucket(1999) + 1
    assert plan.rows(plan.num_buckets - 1) == min(plan.capacity(plan.num_buckets - 1), 2000)


@pytest.mark.parametrize("angles", ["precise", "fp32"])
@pytest.mark.parametrize("growth", [1.03, DEFAULT_GROWTH])
def test_stacked_rows_equal_the_dynamic_module_at_every_length(angles, growth):
    """Row ``row_starts[bucket(n)] + p`` is what yarn_rope's module gives position p at length n."""
    plan = ServePlan(DYNAMIC, max_model_len=1100, growth=growth, angles=angles)
    cache = plan.cos_sin_cache(32, 10000.0)
    assert cache.shape == (plan.total_rows, 32) and cache.dtype == torch.float32
    rotary = RotaryEmbedding(32, base=10000.0, scaling=DYNAMIC, angles=angles, growth=growth)
    x = torch.zeros(1, dtype=torch.float32)
    for length in (1, 200, 256, 257, 300, 400, 600, 1099):
        rotary.set_length(length)
        positions = torch.arange(length)[None]
        cos, sin = rotary(x, positions)
        start = plan.row_starts[plan.bucket(length)]
        rows = cache[start : start + length]
        assert torch.equal(rows[:, :16], cos[0, :, :16]), length
        assert torch.equal(rows[:, 16:], sin[0, :, :16]), length


def test_bucket_zero_is_plain_rope_and_later_ones_are_yarn():
    plan = ServePlan(DYNAMIC, max_model_len=1024, growth=2.0)
    plain, scale = yarn_rope.inv_freq("none", 64, base=10000.0)
    assert torch.equal(plan.table(64, 10000.0, 0)[0], plain) and plan.table(64, 10000.0, 0)[1] == scale == 1.0
    table, attention = plan.table(64, 10000.0, 2)  # 1024 tokens: s = 4
    expected = yarn_rope.inv_freq("yarn", 64, base=10000.0, factor=4.0, original_max_position_embeddings=256)
    assert torch.equal(table, expected[0]) and attention == pytest.approx(0.1 * math.log(4.0) + 1.0)
    assert plan.row_starts == (0, 256, 768) and plan.total_rows == 256 + 512 + 1024


def test_plan_refuses_what_it_cannot_serve():
    with pytest.raises(ValueError, match="dynamic methods per request"):
        ServePlan(yarn_rope.RopeScaling(method="yarn", factor=2.0, original_max_position_embeddings=256), 512)
    for bad in (1.0, 0.5, True, "exact", math.inf):
        with pytest.raises(ValueError, match=r"\['schedule'\] must be a growth ratio > 1"):
            ServePlan(DYNAMIC, 512, growth=bad)
    with pytest.raises(ValueError, match=r"\['angles'\] must be one of"):
        ServePlan(DYNAMIC, 512, angles="float64")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_model_len must be a positive integer"):
        ServePlan(DYNAMIC, 0)
    with pytest.raises(ValueError, match=f"at most {MAX_TABLE_ROWS}.*coarser grid"):
        ServePlan(DYNAMIC, 1 << 22, growth=1.001)


def test_plan_from_reads_the_config_and_the_plugin_options():
    rope = {"rope_type": "yarn_rope.dynamic-yarn", "original_max_position_embeddings": 256, "rope_theta": 1e4}
    plan = plan_from(rope, 4096, {"schedule": 2, "angles": "fp32"})
    assert plan.scaling == DYNAMIC and plan.growth == 2.0 and plan.angles == "fp32"
    assert plan_from(rope, 4096, None) == ServePlan(DYNAMIC, 4096)
    with pytest.raises(ValueError, match=r"unknown keys \['growth'\]; it takes schedule"):
        plan_from(rope, 4096, {"growth": 2})
    with pytest.raises(ValueError, match="'rerotate' is not offered"):
        plan_from(rope, 4096, {"mode": "rerotate"})


# ------------------------------------------------------------------------------------------------
# The scheduler's bookkeeping, on stand-ins for vLLM's requests and scheduler
# ------------------------------------------------------------------------------------------------


class FakeRequest:
    """What the plugin reads and writes of vLLM's Request (v1/request.py)."""

    def __init__(self, request_id: str, tokens: int, cache_salt: str | None = None) -> None:
        self.request_id = request_id
        self.num_tokens_with_spec = tokens
        self.num_output_placeholders = 0
        self.num_tokens = tokens
        self.cache_salt = cache_salt
        self.block_hashes: list[str] = ["stale"]

    def update_block_hashes(self) -> None:  # vLLM salts the first block: each hash carries it
        self.block_hashes.extend(f"{self.cache_salt}:{i}" for i in range(self.num_tokens // 16))


def test_salt_tags_every_bucket_but_the_first():
    assert salt(None, 0) is None and salt("user", 0) == "user"
    assert salt(None, 1) != salt(None, 2) and "user" in (salt("user", 3) or "")
    assert salt("user", 1) != salt("other", 1)


def test_assign_rehashes_the_blocks_with_the_bucket_salt():
    tables = Tables(ServePlan(DYNAMIC, 2048, growth=2.0))
    request = FakeRequest("a", 300, cache_salt="user")
    tables.assign(request, 300)
    assert tables.buckets["a"] == 1 and request.cache_salt == salt("user", 1)
    assert request.block_hashes == [f"{salt('user', 1)}:{i}" for i in range(300 // 16)]
    tables.assign(request, 600)  # a later bucket keeps the user's own salt underneath
    assert tables.buckets["a"] == 2 and request.cache_salt == salt("user", 2)
    short = FakeRequest("b", 100)
    tables.assign(short, 100)
    assert tables.buckets["b"] == 0 and short.cache_salt is None
    tables.forget({"b": short})
    assert set(tables.buckets) == {"b"} and set(tables.salts) == {"b"}


class FakeScheduler:
    def __init__(self, running: list[FakeRequest]) -> None:
        self.running = list(running)
        self.preempted: list[str] = []
        self.prev_step_scheduled_req_ids = {r.request_id for r in running}

    def _preempt_request(self, request: FakeRequest, timestamp: float) -> None:
        assert request not in self.running  # vLLM: popped from running first
        self.preempted.append(request.request_id)


def test_crossings_are_preempted_and_rebucketed_the_rest_untouched():
    tables = Tables(ServePlan(DYNAMIC, 4096, growth=2.0))
    requests = [
        FakeRequest(name, tokens) for name, tokens in (("a", 256), ("b", 300), ("c", 512), ("d", 100))
    ]
    for request in requests:
        tables.assign(request, request.num_tokens)
    for request in requests:  # each decodes one more token
        request.num_tokens_with_spec += 1
        request.num_tokens += 1
    scheduler = FakeScheduler(requests)
    crossed = recompute_crossings(scheduler, tables)  # type: ignore[arg-type]
    assert crossed == ["a", "c"]  # 257 > 256 and 513 > 512; b (301) and d (101) stay
    assert scheduler.preempted == ["c", "a"]  # reversed: they return to the queue's head in order
    assert [r.request_id for r in scheduler.running] == ["b", "d"]
    assert scheduler.prev_step_scheduled_req_ids == {"b", "d"}
    assert tables.buckets == {"a": 1, "b": 1, "c": 2, "d": 0}
    assert requests[0].cache_salt == salt(None, 1) and requests[2].cache_salt == salt(None, 2)


def test_placeholders_count_toward_the_next_length():
    tables = Tables(ServePlan(DYNAMIC, 4096, growth=2.0))
    request = FakeRequest("a", 256)
    tables.assign(request, 256)
    assert tables.outgrown(request) is None
    request.num_output_placeholders = 1  # async scheduling: a token in flight
    assert tables.outgrown(request) == 257


# ------------------------------------------------------------------------------------------------
# The runner: each token's row offset
# ------------------------------------------------------------------------------------------------


def test_fill_offsets_gives_each_token_its_request_bucket_start():
    plan = ServePlan(DYNAMIC, 2048, growth=2.0)
    rotary = types.SimpleNamespace(plan=plan, row_offsets=torch.full((16,), -1, dtype=torch.int64))
    output = types.SimpleNamespace(**{BUCKETS: {"x": 2, "y": 0, "z": 1}})
    fill_offsets([rotary], output, ["y", "x", "z"], np.array([3, 2, 4]))
    starts = plan.row_starts
    expected = [starts[0]] * 3 + [starts[2]] * 2 + [starts[1]] * 4 + [0] * 7
    assert rotary.row_offsets.tolist() == expected
    with pytest.raises(RuntimeError, match="exceeds the 16"):
        fill_offsets([rotary], output, ["x"], np.array([17]))
    with pytest.raises(RuntimeError, match="scheduler hook is not installed"):
        fill_offsets([rotary], types.SimpleNamespace(), ["x"], np.array([1]))


# ------------------------------------------------------------------------------------------------
# Export, packaging, releases
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    from transformers import LlamaConfig

    LlamaConfig(max_position_embeddings=1024, rope_theta=10000.0).save_pretrained(tmp_path)
    return tmp_path


def test_export_names_the_extra_without_vllm_and_spells_the_plugin_with_it(folder, monkeypatch):
    from yarn_rope.methods import yarn as family

    monkeypatch.setattr(family, "vllm_installed", lambda: False)
    with pytest.raises(ValueError, match=r"pip install 'yarn-rope\[vllm\]'"):
        export(folder, "vllm", method="dynamic-yarn", context_length=4096)
    monkeypatch.setattr(family, "vllm_installed", lambda: True)
    result = export(folder, "vllm", method="dynamic-yarn", context_length=4096)
    rope = result.python["hf_overrides"]["rope_parameters"]
    assert rope == {
        "rope_type": "yarn_rope.dynamic-yarn",
        "original_max_position_embeddings": 1024,
        "rope_theta": 10000.0,
    }
    assert result.python["max_model_len"] == 4096
    assert any("yarn_rope's vLLM plugin" in note for note in result.notes)
    # What the plugin then serves is the registry's own reading of that dict.
    assert plan_from(rope, 4096, None).scaling == yarn_rope.RopeScaling.from_hf(rope)
    for engine in ("sglang", "llama.cpp"):
        with pytest.raises(ValueError, match="no serving engine computes dynamic YaRN"):
            export(folder, engine, method="dynamic-yarn", context_length=4096, out=folder / "x.gguf")


def test_entry_point_and_extra_are_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["entry-points"]["vllm.general_plugins"] == {"yarn_rope": "yarn_rope.vllm:register"}
    assert any(requirement.startswith("vllm") for requirement in project["optional-dependencies"]["vllm"])


def test_importing_the_plugin_imports_no_vllm():
    code = (
        "import sys, yarn_rope.vllm, yarn_rope.vllm.plan; "
        "print(any(m.split('.')[0] == 'vllm' for m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_supported_releases():
    assert SUPPORTED_RELEASES == ("0.32",)
    assert supported("0.32.0") and supported("0.32.1+cpu")
    assert not supported("0.33.0") and not supported("0.3.2") and not supported("unknown")


# ------------------------------------------------------------------------------------------------
# register(): on a stand-in vLLM (the real one is in tests/test_vllm_dynamic.py)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_vllm(monkeypatch):
    """A minimal ``vllm`` package: its version, get_rope, a model file that bound get_rope, and the
    scheduler class the plugin wraps."""
    calls = []

    def get_rope(head_size, max_position, is_neox_style=True, rope_parameters=None, dtype=None):
        calls.append(rope_parameters)
        return "vllm's own"

    class Scheduler:
        def add_request(self, request):
            return "added"

        def schedule(self, *args, **kwargs):
            return "scheduled"

    modules = {
        "vllm": types.ModuleType("vllm"),
        "vllm.model_executor": types.ModuleType("vllm.model_executor"),
        "vllm.model_executor.layers": types.ModuleType("vllm.model_executor.layers"),
        "vllm.model_executor.layers.rotary_embedding": types.ModuleType("rotary_embedding"),
        "vllm.model_executor.models": types.ModuleType("vllm.model_executor.models"),
        "vllm.model_executor.models.llama": types.ModuleType("llama"),
        "vllm.v1": types.ModuleType("vllm.v1"),
        "vllm.v1.core": types.ModuleType("vllm.v1.core"),
        "vllm.v1.core.sched": types.ModuleType("vllm.v1.core.sched"),
        "vllm.v1.core.sched.scheduler": types.ModuleType("scheduler"),
    }
    modules["vllm.model_executor.layers.rotary_embedding"].get_rope = get_rope
    modules["vllm.model_executor.layers"].rotary_embedding = modules[
        "vllm.model_executor.layers.rotary_embedding"
    ]
    modules["vllm.model_executor.models.llama"].get_rope = get_rope
    modules["vllm.v1.core.sched.scheduler"].Scheduler = Scheduler
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return types.SimpleNamespace(modules=modules, calls=calls, Scheduler=Scheduler, get_rope=get_rope)


OURS = {"rope_type": "yarn_rope.dynamic-yarn", "original_max_position_embeddings": 256}


def test_an_unsupported_release_refuses_our_types_and_leaves_the_rest(fake_vllm):
    from yarn_rope.vllm import register

    fake_vllm.modules["vllm"].__version__ = "0.40.1"
    register()
    get_rope = fake_vllm.modules["vllm.model_executor.layers.rotary_embedding"].get_rope
    assert fake_vllm.modules["vllm.model_executor.models.llama"].get_rope is get_rope  # rebound
    assert get_rope(64, 4096, True, {"rope_type": "yarn", "factor": 2.0}) == "vllm's own"
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32\.x; this is vLLM 0\.40\.1"):
        get_rope(64, 4096, True, OURS)
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32\.x"):
        get_rope(64, max_position=4096, rope_parameters=OURS)
    assert "__wrapped__" not in fake_vllm.Scheduler.__dict__["schedule"].__dict__  # scheduler untouched
    register()  # again, as vLLM does per process: not stacked
    assert fake_vllm.modules["vllm.model_executor.layers.rotary_embedding"].get_rope is get_rope


def test_a_supported_release_wraps_once_and_passes_other_models_through(fake_vllm):
    from yarn_rope.vllm import register

    fake_vllm.modules["vllm"].__version__ = "0.32.0"
    register()
    get_rope = fake_vllm.modules["vllm.model_executor.layers.rotary_embedding"].get_rope
    assert get_rope.__wrapped__ is fake_vllm.get_rope
    assert get_rope(64, 4096, True, {"rope_type": "default"}) == "vllm's own"
    schedule = fake_vllm.Scheduler.schedule
    assert schedule.__wrapped__.__name__ == "schedule"
    register()
    assert fake_vllm.modules["vllm.model_executor.layers.rotary_embedding"].get_rope is get_rope
    assert fake_vllm.Scheduler.schedule is schedule
    # A scheduler of a model without a yarn_rope type runs vLLM's own code, untouched.
    scheduler = fake_vllm.Scheduler()
    scheduler.vllm_config = types.SimpleNamespace(
        model_config=types.SimpleNamespace(
            hf_text_config=types.SimpleNamespace(rope_parameters={"rope_type": "yarn", "factor": 2.0}),
            hf_config=None,
            max_model_len=4096,
        ),
        additional_config={},
    )
    scheduler.requests = {}
    assert scheduler.schedule() == "scheduled" and scheduler.add_request(FakeRequest("a", 10)) == "added"


def test_engine_features_that_cannot_be_served_exactly_are_refused():
    from yarn_rope.vllm._model import _refuse_unsupported

    def config(speculative=None, pp=1, dp=1):
        parallel = types.SimpleNamespace(pipeline_parallel_size=pp, data_parallel_size=dp)
        return types.SimpleNamespace(speculative_config=speculative, parallel_config=parallel)

    _refuse_unsupported(config())  # tensor parallelism alone: allowed
    with pytest.raises(ValueError, match="speculative decoding"):
        _refuse_unsupported(config(speculative=object()))
    with pytest.raises(ValueError, match=r"pipeline parallelism.*data parallelism"):
        _refuse_unsupported(config(pp=2, dp=2))


def test_export_refuses_a_dynamic_context_that_never_scales(folder, monkeypatch):
    from yarn_rope.methods import yarn as family

    monkeypatch.setattr(family, "vllm_installed", lambda: True)
    with pytest.raises(ValueError, match=r"never leaves its first table.*--context-length"):
        export(folder, "vllm", method="dynamic-yarn")  # the context would be the original 1,024
    with pytest.raises(ValueError, match="never leaves its first table"):
        export(folder, "vllm", method="dynamic-yarn", context_length=1024)
    assert export(folder, "vllm", method="dynamic-yarn", context_length=1025).python["max_model_len"] == 1025
