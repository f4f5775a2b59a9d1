"""Runs ``examples/load_yarn_llama2_70b.ipynb`` against a tiny local Yarn-Llama-2-70b-32k look-alike.

The checkpoint keeps the real one's config dialect (NousResearch ``rope_scaling`` with ``finetuned``,
``auto_map`` naming the authors' modeling file, top-level ``rope_theta``) and head dimension 128, with
one layer and a byte-level tokenizer, so the notebook's code runs unchanged in seconds on a CPU.
CI runs it on transformers 5.x, 4.57.6 and 4.45.2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import yarn_rope

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "load_yarn_llama2_70b.ipynb"
REFERENCE = json.loads((Path(__file__).parent / "data" / "yarn_reference.json").read_text())


@pytest.fixture(scope="module")
def tiny_yarn_llama_70b(tmp_path_factory, save_byte_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("Yarn-Llama-2-70b-32k-tiny")
    vocab = save_byte_tokenizer(folder)
    # The real checkpoint's LlamaTokenizer returns no token_type_ids (which generate() refuses on 4.x);
    # a bare PreTrainedTokenizerFast does on 4.x unless told its model's inputs.
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["model_input_names"] = ["input_ids", "attention_mask"]
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=128,
        bos_token_id=256,
        eos_token_id=257,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("rope_parameters", None)
    raw |= {
        "rope_theta": 10000.0,
        "max_position_embeddings": 32768,
        "rope_scaling": {
            "type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 4096,
            "finetuned": True,
        },
        "auto_map": {
            "AutoConfig": "configuration_llama.LlamaConfig",
            "AutoModelForCausalLM": "modeling_llama_together_yarn.LlamaForCausalLM",
        },
    }
    (folder / "config.json").write_text(json.dumps(raw))
    for name in ("configuration_llama.py", "modeling_llama_together_yarn.py"):
        (folder / name).write_text(f"open({str(folder / 'EXECUTED')!r}, 'w').write('remote code ran')\n")
    return folder


def test_notebook_runs_on_tiny_checkpoint(tiny_yarn_llama_70b, monkeypatch, capsys):
    monkeypatch.setenv("YARN_ROPE_NOTEBOOK_MODEL", str(tiny_yarn_llama_70b))
    monkeypatch.setenv("YARN_ROPE_NOTEBOOK_PROMPT_TOKENS", "600")
    monkeypatch.setenv("YARN_ROPE_NOTEBOOK_NEW_TOKENS", "4")
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    namespace: dict = {}
    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        for cell in cells:
            if cell["cell_type"] == "code":
                exec(compile("".join(cell["source"]), f"{NOTEBOOK.name}:{cell['id']}", "exec"), namespace)
    finally:
        transformers.logging.set_verbosity(previous)

    printed = capsys.readouterr().out
    assert not (tiny_yarn_llama_70b / "EXECUTED").exists()
    model = namespace["model"]
    assert type(model) is transformers.LlamaForCausalLM
    case = next(c for c in REFERENCE["cases"] if c["name"] == "llama2-70b-32k")
    # Every rotary module is ours with the reference table: one per model, and on 4.45 one per layer too.
    rotaries = {name: m for name, m in model.named_modules() if type(m).__name__.endswith("RotaryEmbedding")}
    outer = [name for name in rotaries if not any(name.startswith(f"{o}.") for o in rotaries)]
    assert outer and all(isinstance(rotaries[name], yarn_rope.RotaryEmbedding) for name in outer)
    assert all(torch.equal(rotaries[name].inv_freq, torch.tensor(case["inv_freq"])) for name in outer)
    assert namespace["inputs"].keys() == {"input_ids", "attention_mask"}
    assert yarn_rope.patch_info(model).scaling.factor == 8.0
    assert namespace["inputs"].input_ids.shape[1] >= 600
    assert namespace["output"].shape[1] == namespace["inputs"].input_ids.shape[1] + 4
    assert "never executed" in printed and "answer:" in printed
