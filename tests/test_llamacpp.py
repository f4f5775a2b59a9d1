"""The export proved against a real engine: llama.cpp (llama-cpp-python) on SmolLM2-135M.

The same token ids (the first tokens of ``_pydecimal.py`` from ``load_default_model``'s tokenizer,
which splits text as llama.cpp does: tests/test_data.py) go to yarn_rope (``token_nll`` on the model from
``load_default_model``, patched with YaRN x2) and to llama.cpp, served two ways from
``yarn_rope.export``: the exported GGUF copy (no rope flags) and the exported llama.cpp settings on
the original file. Plain RoPE at 4,096 tokens, each weight file served one of the two ways; YaRN x2
at 12,288 (beyond the trained 8,192) on the float32 file from the GGUF copy and at 4,096 on the
shipped file through flags; and both ways on the same file compared directly.

Two weight files: the shipped Q4_1 file (llama.cpp also rounds layer inputs to 8 bits in Q4_1
products, so the two agree to ~0.25% in perplexity: held to 0.5%), and a float32 copy made with
llama.cpp's own quantize function (its weights are what transformers dequantizes from the Q4_1
file, bit for bit), held to 1e-4 relative in perplexity and 1e-3 nats mean per-token difference.
The float32 copy also gets a float32 KV cache: llama.cpp's default float16 cache alone moves the
per-token NLL by ~1e-3 nats on average (measured: 8.4e-4 at 1,024 tokens, against 1.0e-5 with a
float32 cache), which would hide the rope behind the cache's rounding.
Deliberately wrong settings (``yarn_ext_factor`` equal to the factor, YaRN left out) must fail the
same comparison.

llama.cpp 0c1e57098 (llama-cpp-python 0.3.36) crashes in its AMX kernels on this project's CPU
for Q4_1 (ggml_backend_amx_mul_mat), so models load with ``use_extra_bufts=False`` (its plain CPU
kernels). With ``YARN_ROPE_LLAMACPP_REPORT=FILE`` set, every comparison
is appended to FILE as a JSON line (the README's table comes from such a run).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import yarn_rope
from yarn_rope.export import export

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None,
        reason="llama-cpp-python is not installed: pip install 'yarn-rope[llamacpp]' (builds llama.cpp)",
    ),
]

PLAIN_TOKENS = 4096
YARN_TOKENS = 12288
WRONG_TOKENS = 2048  # a prefix of the YaRN comparison: the model is causal, the table static
MISTRAL_TOKENS = 2048
EQUAL_TOKENS = 1024
# The settings of the authors' Mistral code (betas 128/2, temperature 0.07 ln s + 1), at factor 4:
# through llama.cpp they need the beta flags and the GGUF attn_factor (--override-kv).
MISTRAL_LIKE = yarn_rope.RopeScaling(
    method="yarn",
    factor=4.0,
    original_max_position_embeddings=8192,
    beta_fast=128.0,
    beta_slow=2.0,
    mscale_coefficient=0.07,
)
F32_PERPLEXITY = 1e-4
F32_MEAN_TOKEN = 1e-3
Q4_PERPLEXITY = 5e-3


@contextlib.contextmanager
def _plain_cpu_kernels() -> Iterator[None]:
    """llama_cpp.Llama with use_extra_bufts=False: no AMX / repacked buffers (see the module note)."""
    import llama_cpp
    import llama_cpp.llama as high_level

    defaults = llama_cpp.llama_model_default_params

    def params() -> Any:
        chosen = defaults()
        chosen.use_extra_bufts = False
        return chosen

    original = high_level.llama_cpp.llama_model_default_params
    high_level.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        high_level.llama_cpp.llama_model_default_params = original


def llamacpp_nll(
    path: str | Path, ids: list[int], *, float32_cache: bool = False, **settings: Any
) -> np.ndarray:
    """Per-token NLL (nats) of ``ids[1:]`` from llama.cpp's logits, ``[len(ids) - 1]`` float64."""
    import llama_cpp

    settings = {key: value for key, value in settings.items() if key not in ("model_path", "n_ctx")}
    if float32_cache:
        settings.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    threads = os.cpu_count() or 1
    with _plain_cpu_kernels():
        llm = llama_cpp.Llama(
            str(path),
            n_ctx=len(ids),
            logits_all=True,
            verbose=False,
            n_threads=threads,
            n_threads_batch=threads,
            **settings,
        )
    try:
        llm.eval(ids)
        logits = llm.scores
        nll = np.empty(len(ids) - 1)
        for start in range(0, len(ids) - 1, 1024):
            stop = min(start + 1024, len(ids) - 1)
            block = logits[start:stop].astype(np.float64)
            top = block.max(axis=1)
            total = np.log(np.exp(block - top[:, None]).sum(axis=1)) + top
            nll[start:stop] = total - block[np.arange(stop - start), ids[start + 1 : stop + 1]]
    finally:
        llm.close()
        del llm
        gc.collect()
    return nll


def _compare(reference: np.ndarray, served: np.ndarray, **label: Any) -> tuple[float, float]:
    """(relative perplexity difference, mean per-token |NLL difference|) over the common prefix."""
    count = min(len(reference), len(served))
    ours, theirs = reference[:count].astype(np.float64), served[:count]
    relative = abs(math.exp(theirs.mean() - ours.mean()) - 1.0)
    mean_token = float(np.abs(theirs - ours).mean())
    report = os.environ.get("YARN_ROPE_LLAMACPP_REPORT")
    if report and label:
        row = {
            **label,
            "tokens": count + 1,
            "perplexity_yarn_rope": math.exp(ours.mean()),
            "perplexity_llamacpp": math.exp(theirs.mean()),
            "relative": relative,
            "mean_token": mean_token,
            "max_token": float(np.abs(theirs - ours).max()),
            "pearson": float(np.corrcoef(ours, theirs)[0, 1]),
        }
        with open(report, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
    return relative, mean_token


def _agrees(weights: str, relative: float, mean_token: float) -> bool:
    if weights == "f32":
        return relative < F32_PERPLEXITY and mean_token < F32_MEAN_TOKEN
    return relative < Q4_PERPLEXITY


# ------------------------------------------------------------------------------------------------
# Fixtures: the reference (yarn_rope), the weight files and the exported ways to serve them
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    """Token ids and yarn_rope's per-token NLL: plain RoPE at 4,096 and YaRN x2 at 12,288."""
    import torch

    from yarn_rope.eval import token_nll
    from yarn_rope.eval.data import default_corpus, load_default_model

    try:
        model, tokenizer = load_default_model()
    except (FileNotFoundError, ImportError) as error:
        pytest.skip(str(error))
    ids = tokenizer(default_corpus(1)[0][1]).input_ids[:YARN_TOKENS]
    assert len(ids) == YARN_TOKENS
    plain = token_nll(model, torch.tensor(ids[:PLAIN_TOKENS])).numpy()
    with yarn_rope.patched(model, factor=2.0):
        yarn = token_nll(model, torch.tensor(ids)).numpy()
    with yarn_rope.patched(model, MISTRAL_LIKE):
        mistral = token_nll(model, torch.tensor(ids[:MISTRAL_TOKENS])).numpy()
    del model
    gc.collect()
    return {"ids": [int(i) for i in ids], "plain": plain, "yarn": yarn, "mistral": mistral}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shipped Q4_1 file and a float32 copy made by llama.cpp's own quantize function."""
    import llama_cpp

    from yarn_rope.eval.data import default_model_file

    try:
        q4 = default_model_file()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    f32 = tmp_path_factory.mktemp("f32") / "SmolLM2-135M-F32.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.nthread = os.cpu_count() or 1
    params.allow_requantize = True  # dequantizing to float32 counts as requantizing
    status = llama_cpp.llama_model_quantize(str(q4).encode(), str(f32).encode(), params)
    assert status == 0, f"llama_model_quantize returned {status}"
    return {"q4_1": q4, "f32": f32}


@pytest.fixture(scope="module")
def served(weights: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``served(weights, method, path)`` -> (file, llama_cpp.Llama keywords), made on first use.

    ``path`` "gguf" is the exported GGUF copy (the settings in the file), "flags" the original file
    with the exported llama.cpp settings; ``method`` "plain" or "yarn" (x2).
    """
    folder = tmp_path_factory.mktemp("exported")
    made: dict[tuple[str, str, str], tuple[Path, dict[str, Any]]] = {}

    def serve(name: str, method: str, path: str) -> tuple[Path, dict[str, Any]]:
        if (name, method, path) not in made:
            settings: dict[str, Any] = {"method": "none"} if method == "plain" else {"factor": 2.0}
            if path == "gguf":
                out = folder / f"{name}-{method}.gguf"
                copy = export(weights[name], "gguf", out=out, progress=False, **settings)
                assert copy.output is not None
                made[(name, method, path)] = (Path(copy.output), copy.python)
            else:
                flags = export(weights[name], "llama.cpp", **settings)
                made[(name, method, path)] = (weights[name], flags.python)
        return made[(name, method, path)]

    return serve


# ------------------------------------------------------------------------------------------------
# The proof
# ------------------------------------------------------------------------------------------------


def test_exported_settings_are_what_llamacpp_reads(served):
    _, gguf_settings = served("q4_1", "yarn", "gguf")
    _, flag_settings = served("q4_1", "yarn", "flags")
    # The copy carries YaRN itself; only the betas stay as keywords (llama_cpp.Llama's own defaults
    # would override the file's otherwise).
    assert "rope_scaling_type" not in gguf_settings and gguf_settings["n_ctx"] == 16384
    assert flag_settings["rope_scaling_type"] == 2  # LLAMA_ROPE_SCALING_TYPE_YARN
    assert flag_settings["rope_freq_scale"] == 0.5 and flag_settings["yarn_orig_ctx"] == 8192
    assert flag_settings["yarn_ext_factor"] == 1.0


# Each weight file is served each way once across the comparisons below: the float32 file proves
# the numbers, the Q4_1 file that the shipped weights work; the paths differ only in where the
# settings travel, which test_each_path_serves_the_same_numbers checks directly.
@pytest.mark.parametrize(("weights_name", "path"), [("f32", "flags"), ("q4_1", "gguf")])
def test_plain_rope_agrees(reference, served, weights_name, path):
    file, settings = served(weights_name, "plain", path)
    nll = llamacpp_nll(file, reference["ids"][:PLAIN_TOKENS], float32_cache=weights_name == "f32", **settings)
    relative, mean_token = _compare(reference["plain"], nll, weights=weights_name, path=path, method="plain")
    assert _agrees(weights_name, relative, mean_token), (relative, mean_token)


def test_yarn_agrees_beyond_the_trained_context(reference, served):
    """The exact check: float32 weights from the exported GGUF copy, 12,288 tokens."""
    file, settings = served("f32", "yarn", "gguf")
    nll = llamacpp_nll(file, reference["ids"], float32_cache=True, **settings)
    relative, mean_token = _compare(reference["yarn"], nll, weights="f32", path="gguf", method="yarn x2")
    assert _agrees("f32", relative, mean_token), (relative, mean_token)
    # Past the trained context too: the last 4,096 tokens alone.
    tail_relative, _ = _compare(reference["yarn"][-4096:], nll[-4096:])
    assert tail_relative < F32_PERPLEXITY * 3


def test_yarn_on_the_shipped_file_through_flags(reference, served):
    """The shipped Q4_1 file with the exported flags (a prefix: the model is causal, the table static)."""
    file, settings = served("q4_1", "yarn", "flags")
    nll = llamacpp_nll(file, reference["ids"][:PLAIN_TOKENS], **settings)
    relative, mean_token = _compare(reference["yarn"], nll, weights="q4_1", path="flags", method="yarn x2")
    assert _agrees("q4_1", relative, mean_token), (relative, mean_token)


def test_each_path_serves_the_same_numbers(reference, served):
    """The GGUF copy and the flags on the original file give llama.cpp the same YaRN table."""
    ids = reference["ids"][:EQUAL_TOKENS]
    nll = {}
    for method, path in (("yarn", "gguf"), ("yarn", "flags"), ("plain", "gguf")):
        file, settings = served("q4_1", method, path)
        nll[(method, path)] = llamacpp_nll(file, ids, **settings)
    through_file = nll[("yarn", "gguf")]
    np.testing.assert_allclose(through_file, nll[("yarn", "flags")], rtol=0, atol=1e-6)
    # ... and not plain RoPE's: the comparison can tell them apart at this length.
    plain = nll[("plain", "gguf")]
    assert np.abs(plain - through_file).mean() > 1e-3


@pytest.mark.parametrize(
    "wrong",
    [
        pytest.param({"yarn_ext_factor": 2.0}, id="yarn_ext_factor-equal-to-factor"),
        pytest.param(None, id="yarn-left-out"),
    ],
)
def test_wrong_settings_fail_the_comparison(reference, served, weights, wrong):
    if wrong is None:
        file, settings = weights["f32"], {}
    else:
        file, exported = served("f32", "yarn", "flags")
        settings = {**exported, **wrong}
    nll = llamacpp_nll(file, reference["ids"][:WRONG_TOKENS], float32_cache=True, **settings)
    label = "yarn left out" if wrong is None else "yarn_ext_factor = factor"
    relative, mean_token = _compare(reference["yarn"], nll, weights="f32", path=label, method="yarn x2")
    assert not _agrees("f32", relative, mean_token), (relative, mean_token)
    assert not _agrees("q4_1", relative, mean_token), (relative, mean_token)


def test_yarn_mistral_settings_agree_through_flags_and_override_kv(reference, weights):
    exported = export(weights["f32"], "llama.cpp", scaling=MISTRAL_LIKE)
    assert "kv_overrides" in exported.python and exported.python["yarn_beta_fast"] == 128.0
    nll = llamacpp_nll(
        weights["f32"], reference["ids"][:MISTRAL_TOKENS], float32_cache=True, **exported.python
    )
    relative, mean_token = _compare(
        reference["mistral"], nll, weights="f32", path="flags", method="yarn-mistral x4"
    )
    assert _agrees("f32", relative, mean_token), (relative, mean_token)
    # Without the attn_factor override (llama.cpp's own 0.1 ln s + 1) it must disagree.
    settings = {key: value for key, value in exported.python.items() if key != "kv_overrides"}
    nll = llamacpp_nll(weights["f32"], reference["ids"][:MISTRAL_TOKENS], float32_cache=True, **settings)
    relative, mean_token = _compare(reference["mistral"], nll)
    assert not _agrees("f32", relative, mean_token), (relative, mean_token)
