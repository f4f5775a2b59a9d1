"""Dynamic YaRN per request in vLLM, proved on the real engine (issue 21): vLLM's CPU build with
yarn_rope's plugin, on SmolLM2-135M, against yarn_rope in transformers.

vLLM runs in its own venv (``bash .ci/vllm-venv``, which installs yarn_rope there too, so vLLM
loads the plugin through its ``vllm.general_plugins`` entry point); tests/vllm_dynamic_scorer.py
drives it. The reference is yarn_rope's dynamic module in transformers on the same float32
weights (``patch(..., method="dynamic-yarn", schedule=g)``), held to the static proof's
tolerances (tests/test_vllm.py: 1e-5 relative perplexity, 1e-4 nats mean per-token NLL, per band).

At the model's own scale (trained context 8,192, settings from ``yarn-rope export --to vllm
--method dynamic-yarn`` verbatim, engine processes as ``vllm serve`` runs them, float32 angles):

1. **mixed batch**: one ``generate`` with a 2,048- and a 16,384-token request of the same text
   (CPU default ``max_num_batched_tokens`` 4,096, so the long prompt is prefilled in chunks beside
   the short one): the short one's prompt logprobs equal plain RoPE's, the long one's dynamic
   YaRN's at s = 2;
2. **decoding across buckets**: a request of 8,170 tokens generates 72 greedy tokens on a grid of
   ratio 1.004 (tables at 8,192, 8,225 and 8,258 tokens), so it crosses 8,192 and one more
   bucket while it decodes; its tokens and logprobs equal a transformers forward of the whole
   sequence with the table of each step's bucket (exact mode: recompute on each crossing).

At a small scale (the same model declared as trained at 1,024 tokens, engine core and worker in
the test's scorer process so that broken variants reach them, the default precise angles), each
positive check beside its negative control, a deliberately broken plugin that must fail it:

3. mixed batch (512 + 2,048 tokens in one step) vs **one table for the whole batch**; the same batch
   again in 128-token prefill chunks (``max_num_batched_tokens=128``), and compiled (Dynamo, vLLM's
   CPU CI backend);
4. decoding across two buckets (grid 1.03) vs **stale keys after a crossing** (no recompute);
5. prefix caching on, a short request then a long one with the same prefix: vs **a prefix block
   shared across buckets** (salts that ignore the table).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import yarn_rope
from test_vllm import ORIGINAL, agrees, compare, smollm2_for_vllm
from vllm_scorer import run_scorer
from yarn_rope.export import export
from yarn_rope.vllm.plan import DEFAULT_GROWTH

SCORER = Path(__file__).resolve().parent / "vllm_dynamic_scorer.py"
SHORT, LONG = 2048, 16384
CROSS_PROMPT, CROSS_NEW, CROSS_GROWTH = 8170, 72, 1.004
SMALL = 1024  # the small-scale trained context
SMALL_SHORT, SMALL_LONG = 512, 2048
SMALL_PROMPT, SMALL_NEW, SMALL_GROWTH = 1000, 80, 1.03
PREFIX_LONG, PREFIX_NEW = 2000, 4
MEAN_TOKEN = 1e-4
ENGINE = {"dtype": "float32", "enforce_eager": True}


def _scaling(original: int) -> yarn_rope.RopeScaling:
    return yarn_rope.RopeScaling(method="dynamic-yarn", original_max_position_embeddings=original)


def _engine(folder: Path, original: int, context: int, **options: Any) -> dict[str, Any]:
    """vLLM's keywords: the export's, verbatim, plus the plugin's options and the shared ones."""
    exported = export(folder, "vllm", scaling=_scaling(original), context_length=context).python
    extra = {"additional_config": {"yarn_rope": options}} if options else {}
    return {**exported, **ENGINE, **extra}


# ------------------------------------------------------------------------------------------------
# The reference: yarn_rope's dynamic module in transformers
# ------------------------------------------------------------------------------------------------


def prompt_nll(model: Any, ids: list[int], scaling: Any, growth: float, angles: str) -> np.ndarray:
    """Per-token NLL of ``ids`` under ``scaling`` (dynamic: the table of the whole length)."""
    from yarn_rope.eval import token_nll

    with yarn_rope.patched(model, scaling, angles=angles, schedule=growth):
        return token_nll(model, torch.tensor(ids), progress=False).numpy()


def decoding_reference(
    model: Any, sequence: list[int], prompt: int, scaling: Any, growth: float, angles: str
) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and logprobs of ``sequence[prompt:]``, each from a full forward under the table
    of its step's bucket: token ``j`` is predicted at length ``j``, so with bucket(j)'s table; a
    forward over ``sequence[:min(len, capacity)]`` gives the dynamic module exactly that table.
    """
    from yarn_rope.vllm.plan import ServePlan

    plan = ServePlan(scaling, max_model_len=len(sequence) + 1, growth=growth)
    by_bucket: dict[int, list[int]] = {}
    for j in range(prompt, len(sequence)):
        by_bucket.setdefault(plan.bucket(j), []).append(j)
    greedy, logprobs = [0] * (len(sequence) - prompt), np.zeros(len(sequence) - prompt)
    with yarn_rope.patched(model, scaling, angles=angles, schedule=growth), torch.no_grad():
        for bucket, steps in by_bucket.items():
            end = min(len(sequence), plan.capacity(bucket))
            hidden = model.model(torch.tensor([sequence[:end]])).last_hidden_state[0]
            logits = model.lm_head(hidden[[j - 1 for j in steps]]).float().log_softmax(-1)
            for row, j in enumerate(steps):
                greedy[j - prompt] = int(logits[row].argmax())
                logprobs[j - prompt] = float(logits[row, sequence[j]])
    return greedy, logprobs


@dataclasses.dataclass(frozen=True)
class Decoding:
    """vLLM's generated tokens against the reference's."""

    tokens: int
    same_tokens: bool
    mean_token: float
    max_token: float

    @property
    def agrees(self) -> bool:
        return self.same_tokens and self.mean_token <= MEAN_TOKEN


def compare_decoding(
    model: Any, prompt_ids: list[int], served: dict[str, Any], scaling: Any, growth: float, angles: str
) -> Decoding:
    sequence = [*prompt_ids, *served["tokens"]]
    greedy, logprobs = decoding_reference(model, sequence, len(prompt_ids), scaling, growth, angles)
    difference = np.abs(np.asarray(served["logprobs"]) - logprobs)
    return Decoding(
        tokens=len(greedy),
        same_tokens=greedy == served["tokens"],
        mean_token=float(difference.mean()),
        max_token=float(difference.max()),
    )


# ------------------------------------------------------------------------------------------------
# One scorer process for every run
# ------------------------------------------------------------------------------------------------


def _runs(folder: Path) -> list[dict[str, Any]]:
    full = {"prompt_logprobs": True}
    mixed_small = [[{"tokens": SMALL_SHORT, **full}, {"tokens": SMALL_LONG, **full}]]
    crossing_small = [[{"tokens": SMALL_PROMPT, "max_tokens": SMALL_NEW}]]
    prefix = [[{"tokens": SMALL_SHORT}], [{"tokens": PREFIX_LONG, "max_tokens": PREFIX_NEW}]]
    small = _engine(folder, SMALL, 4096)
    no_cache = {**small, "enable_prefix_caching": False}
    chunked = {**no_cache, "max_num_batched_tokens": 128, "max_num_seqs": 8}  # 128-token prefill chunks
    return [
        {
            "name": "mixed",
            "engine": _engine(folder, ORIGINAL, LONG + 64, angles="fp32"),
            "calls": [[{"tokens": SHORT, **full}, {"tokens": LONG, **full}]],
        },
        {
            "name": "crossing",
            "engine": {**_engine(folder, ORIGINAL, 8320, angles="fp32", schedule=CROSS_GROWTH)},
            "calls": [[{"tokens": CROSS_PROMPT, "max_tokens": CROSS_NEW}]],
        },
        {
            "name": "small compiled",  # torch.compile (Dynamo traced once, eager backend: vLLM's CPU CI mode)
            "engine": {**no_cache, "enforce_eager": False},
            "env": {"VLLM_CPU_CI_ENV": "1"},
            "in_process": True,
            "calls": mixed_small,
        },
        # both requests in one step (2,560 tokens within the default 4,096): the twin of "one table"
        {"name": "small mixed", "engine": no_cache, "in_process": True, "calls": mixed_small},
        {"name": "small chunked", "engine": chunked, "in_process": True, "calls": mixed_small},
        {
            "name": "small crossing",
            "engine": _engine(folder, SMALL, 4096, schedule=SMALL_GROWTH),
            "in_process": True,
            "calls": crossing_small,
        },
        {
            "name": "small prefix",
            "engine": {**small, "enable_prefix_caching": True},
            "in_process": True,
            "calls": prefix,
        },
        {
            "name": "one table",
            "engine": no_cache,
            "in_process": True,
            "variant": "one-table",
            "calls": mixed_small,
        },
        {
            "name": "stale keys",
            "engine": _engine(folder, SMALL, 4096, schedule=SMALL_GROWTH),
            "in_process": True,
            "variant": "stale-keys",
            "calls": crossing_small,
        },
        {
            "name": "shared prefix",
            "engine": {**small, "enable_prefix_caching": True},
            "in_process": True,
            "variant": "shared-prefix",
            "calls": prefix,
        },
    ]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The model, its folder, the ids and every run's outputs."""
    from yarn_rope.methods import yarn as yarn_family

    python, model, folder, ids = smollm2_for_vllm(tmp_path_factory, LONG)
    # The export is made as where vLLM (and so the plugin) is installed: this venv has no vLLM.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(yarn_family, "vllm_installed", lambda: True)
        runs = _runs(folder)
    job = {"ids": ids, "runs": runs}
    try:
        report = run_scorer(python, job, tmp_path_factory.mktemp("vllm-dynamic"), script=SCORER)
    except RuntimeError as error:
        pytest.fail(str(error))
    path = os.environ.get("YARN_ROPE_VLLM_DYNAMIC_REPORT")
    if path:
        timings = {
            name: {k: v for k, v in run.items() if k != "calls"} for name, run in report["runs"].items()
        }
        Path(path).write_text(json.dumps({"vllm": report["vllm"], "timings": timings}, indent=1) + "\n")
    yield {
        "model": model,
        "ids": ids,
        "runs": report["runs"],
        "engines": {r["name"]: r["engine"] for r in runs},
    }
    del model
    gc.collect()


def _outputs(served: dict[str, Any], name: str, call: int = 0) -> list[dict[str, Any]]:
    return served["runs"][name]["calls"][call]


def _mixed_bands(served: dict[str, Any], name: str, original: int, short: int, long: int, angles: str) -> Any:
    model, ids = served["model"], served["ids"]
    short_out, long_out = _outputs(served, name)
    plain = prompt_nll(model, ids[:short], yarn_rope.RopeScaling(method="none"), DEFAULT_GROWTH, angles)
    dynamic = prompt_nll(model, ids[:long], _scaling(original), DEFAULT_GROWTH, angles)
    return (
        compare(plain, np.asarray(short_out["prompt_nll"]), original=original),
        compare(dynamic, np.asarray(long_out["prompt_nll"]), original=original),
    )


# ------------------------------------------------------------------------------------------------
# The proof, at the model's scale
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_engine_served_the_export_with_the_plugin(served):
    engine = served["engines"]["mixed"]
    assert engine["hf_overrides"]["rope_parameters"]["rope_type"] == "yarn_rope.dynamic-yarn"
    assert engine["max_model_len"] == LONG + 64
    short_out, long_out = _outputs(served, "mixed")
    assert len(short_out["prompt_nll"]) == SHORT - 1 and len(long_out["prompt_nll"]) == LONG - 1


@pytest.mark.slow
def test_mixed_batch_short_gets_plain_rope_long_gets_dynamic_yarn(served):
    short, long = _mixed_bands(served, "mixed", ORIGINAL, SHORT, LONG, "fp32")
    assert [band.tokens for band in short] == [SHORT - 1]
    assert [band.tokens for band in long] == [ORIGINAL - 1, LONG - ORIGINAL]
    assert agrees(short), short
    assert agrees(long), long
    # and the long one's table is not plain RoPE's, even on the tokens the short one also has
    short_out, long_out = _outputs(served, "mixed")
    same_tokens = np.asarray(long_out["prompt_nll"][: SHORT - 1])
    assert not agrees(compare(np.asarray(short_out["prompt_nll"]), same_tokens))


@pytest.mark.slow
def test_decoding_across_two_buckets_equals_a_full_forward_per_step(served):
    from yarn_rope.vllm.plan import ServePlan

    out = _outputs(served, "crossing")[0]
    assert len(out["tokens"]) == CROSS_NEW
    plan = ServePlan(_scaling(ORIGINAL), max_model_len=8320, growth=CROSS_GROWTH)
    lengths = range(CROSS_PROMPT, CROSS_PROMPT + CROSS_NEW)
    assert sorted({plan.bucket(n) for n in lengths}) == [0, 1, 2]  # crosses 8,192 and 8,225
    result = compare_decoding(
        served["model"], served["ids"][:CROSS_PROMPT], out, _scaling(ORIGINAL), CROSS_GROWTH, "fp32"
    )
    assert result.agrees, result


# ------------------------------------------------------------------------------------------------
# Small scale: each check beside a broken plugin that must fail it
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("run", ["small mixed", "small chunked", "small compiled"])
def test_small_mixed_batch_agrees(served, run):
    short, long = _mixed_bands(served, run, SMALL, SMALL_SHORT, SMALL_LONG, "precise")
    assert agrees(short) and agrees(long), (short, long)
    compiled = served["runs"][run]["compilation"]["mode"]
    assert ("NONE" not in compiled) == (run == "small compiled"), compiled


@pytest.mark.slow
def test_one_table_for_the_whole_batch_fails(served):
    short, long = _mixed_bands(served, "one table", SMALL, SMALL_SHORT, SMALL_LONG, "precise")
    assert agrees(long), long  # the long request's own table is the batch's
    assert not agrees(short), short


def _small_decoding(served: dict[str, Any], run: str) -> Decoding:
    out = _outputs(served, run)[0]
    assert len(out["tokens"]) == SMALL_NEW
    return compare_decoding(
        served["model"], served["ids"][:SMALL_PROMPT], out, _scaling(SMALL), SMALL_GROWTH, "precise"
    )


@pytest.mark.slow
def test_small_decoding_across_buckets_agrees_and_stale_keys_fail(served):
    from yarn_rope.vllm.plan import ServePlan

    plan = ServePlan(_scaling(SMALL), max_model_len=4096, growth=SMALL_GROWTH)
    assert sorted({plan.bucket(n) for n in range(SMALL_PROMPT, SMALL_PROMPT + SMALL_NEW)}) == [0, 1, 2]
    good = _small_decoding(served, "small crossing")
    assert good.agrees, good
    stale = _small_decoding(served, "stale keys")
    assert not stale.agrees, stale
    assert stale.mean_token > 10 * MEAN_TOKEN, stale


def _prefix_decoding(served: dict[str, Any], run: str) -> Decoding:
    (short,) = _outputs(served, run, 0)
    (long,) = _outputs(served, run, 1)
    assert len(short["tokens"]) == 1 and len(long["tokens"]) == PREFIX_NEW
    return compare_decoding(
        served["model"], served["ids"][:PREFIX_LONG], long, _scaling(SMALL), DEFAULT_GROWTH, "precise"
    )


@pytest.mark.slow
def test_prefix_cache_is_salted_per_bucket_and_sharing_across_buckets_fails(served):
    good = _prefix_decoding(served, "small prefix")
    assert good.agrees, good
    shared = _prefix_decoding(served, "shared prefix")
    assert not shared.agrees, shared
