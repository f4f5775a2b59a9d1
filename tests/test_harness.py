"""Tests for :mod:`yarn_rope.eval.harness` (lm-evaluation-harness) and ``yarn-rope eval harness``.

The harness itself runs (no mock): each test writes a small multiple-choice task as a YAML file
plus a JSON-lines dataset into a temporary folder and hands that folder to lm-eval's own
``include_path`` / ``dataset_path: json`` support. Its accuracies are compared with the same
loglikelihood choice computed here from the model's log-probabilities (``log_softmax`` of
``model(ids).logits``, summed over each choice's tokens), patched and unpatched.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import statistics
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from yarn_rope import _compat, cli, patch_info, patched
from yarn_rope.eval.results import load_records

pytest.importorskip("lm_eval")

from yarn_rope.eval.harness import (
    AUTHORS_FEWSHOT,
    HarnessDataUnavailable,
    compare_harness,
    harness,
    load_tasks,
)

pytestmark = pytest.mark.usefixtures("quiet_transformers")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TASK = "yarn_rope_local_mc"
FEWSHOT_TASK = "yarn_rope_local_mc_fewshot"
ORIGINAL = 128


def make_documents(count: int = 16, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = ["red", "blue", "stone", "river", "quiet", "seven", "apple", "north", "glass", "mild", "tall"]
    documents = []
    for _ in range(count):
        question = " ".join(rng.choice(words) for _ in range(3))
        choices = [
            " ".join(rng.choice(words) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(2, 4))
        ]
        documents.append({"question": question, "choices": choices, "answer": rng.randrange(len(choices))})
    return documents


def write_task(folder: Path, name: str, documents: list[dict], extra: str = "") -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in documents), encoding="utf-8")
    (folder / f"{name}.yaml").write_text(
        textwrap.dedent(
            f"""\
            task: {name}
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {data}
            test_split: test
            output_type: multiple_choice
            doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
            doc_to_choice: "{{{{choices}}}}"
            doc_to_target: "{{{{answer}}}}"
            metric_list:
              - metric: acc
                aggregation: mean
                higher_is_better: true
              - metric: acc_norm
                aggregation: mean
                higher_is_better: true
            """
        )
        + extra,
        encoding="utf-8",
    )


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    write_task(folder, TASK, make_documents())
    write_task(folder, FEWSHOT_TASK, make_documents(8, seed=1), extra="num_fewshot: 2\nfewshot_split: test\n")
    return folder


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory, save_byte_tokenizer):
    folder = tmp_path_factory.mktemp("byte-tokenizer")
    save_byte_tokenizer(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=258,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2 * ORIGINAL,
        initializer_range=0.3,
        bos_token_id=256,
        eos_token_id=257,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context): the whole text encoded, the context's tokens split off (the
    harness's convention for causal models), log-probabilities summed over the rest."""
    whole = tokenizer(context + continuation).input_ids
    start = len(tokenizer(context).input_ids)
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    return sum(float(logprobs[position - 1, whole[position]]) for position in range(start, len(whole)))


def expected_scores(model, tokenizer, documents: list[dict]) -> dict[str, tuple[float, float]]:
    """acc and acc_norm (argmax of loglikelihood, of loglikelihood per character) with the standard
    error of the mean, computed here."""
    hits: dict[str, list[float]] = {"acc": [], "acc_norm": []}
    for doc in documents:
        context = f"Question: {doc['question']}\nAnswer:"
        lls = [loglikelihood(model, tokenizer, context, " " + choice) for choice in doc["choices"]]
        best = max(range(len(lls)), key=lambda i: lls[i])
        best_norm = max(range(len(lls)), key=lambda i: lls[i] / len(doc["choices"][i]))
        hits["acc"].append(float(best == doc["answer"]))
        hits["acc_norm"].append(float(best_norm == doc["answer"]))
    return {
        metric: (sum(values) / len(values), statistics.stdev(values) / math.sqrt(len(values)))
        for metric, values in hits.items()
    }


@pytest.fixture(scope="module")
def loaded(task_folder):
    return load_tasks([TASK], num_fewshot=0, include_path=task_folder)


# ------------------------------------------------------------------------------------------------
# 1. The harness's scores equal the loglikelihood choice computed here
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
class TestScores:
    def test_base_and_yarn_columns(self, loaded, byte_tokenizer):
        model = tiny_llama()
        documents = make_documents()
        base = expected_scores(model, byte_tokenizer, documents)
        with patched(model, method="yarn", factor=2.0, original_max_position_embeddings=ORIGINAL):
            yarn = expected_scores(model, byte_tokenizer, documents)
        assert 0.0 < base["acc"][0] < 1.0 and base["acc"] != base["acc_norm"]  # a test that can fail
        results = compare_harness(
            model,
            byte_tokenizer,
            methods=["yarn"],
            factor=2.0,
            original_max_position_embeddings=ORIGINAL,
            tasks=loaded,
            progress=False,
        )
        assert patch_info(model) is None
        assert [(r.method, r.label) for r in results] == [("none", "plain RoPE"), ("yarn", "yarn x2")]
        assert results[0].scaling is None and results[1].scaling["factor"] == 2.0
        for result, expected in zip(results, (base, yarn), strict=True):
            for metric, (value, stderr) in expected.items():
                score = result.score(TASK, metric)
                assert score.value == pytest.approx(value, abs=1e-12)
                assert score.stderr == pytest.approx(stderr, rel=1e-9)
                assert score.samples == len(documents) and score.num_fewshot == 0
            assert result.score(TASK).metric == "acc_norm"  # the primary metric when reported
        # The patch was in force for the second column: the log-probabilities moved.
        context, choice = "Question: red blue stone\nAnswer:", " quiet river"
        plain_ll = loglikelihood(model, byte_tokenizer, context, choice)
        with patched(model, method="yarn", factor=2.0, original_max_position_embeddings=ORIGINAL):
            assert loglikelihood(model, byte_tokenizer, context, choice) != pytest.approx(plain_ll, rel=1e-6)

    def test_records(self, loaded, byte_tokenizer):
        model = tiny_llama()
        with patched(model, method="yarn", factor=2.0, original_max_position_embeddings=ORIGINAL):
            result = harness(model, byte_tokenizer, tasks=loaded, limit=6, progress=False)
        records = result.records(model="tiny")
        assert [(r.task, r.metric) for r in records] == [(TASK, "acc"), (TASK, "acc_norm")]
        for record in records:
            score = result.score(TASK, record.metric)
            assert record.suite == "harness" and record.length is None and record.model == "tiny"
            assert (record.value, record.stderr, record.samples) == (score.value, score.stderr, 6)
            assert record.method == "yarn" and record.label == "yarn x2"
            assert record.settings == result.scaling
            assert record.details["num_fewshot"] == 0 and record.details["limit"] == 6
            assert record.details["primary"] == (record.metric == "acc_norm")
        expected = expected_scores(model, byte_tokenizer, make_documents()[:6])  # unpatched now
        assert patch_info(model) is None
        json.dumps(result.to_dict())
        assert expected["acc"][0] == pytest.approx(
            harness(model, byte_tokenizer, tasks=loaded, limit=6, progress=False).score(TASK, "acc").value
        )

    def test_fewshot_counts(self, task_folder, byte_tokenizer):
        model = tiny_llama()
        # The YAML's own default (2), then an override for one task.
        own = load_tasks([TASK, FEWSHOT_TASK], include_path=task_folder)
        assert own.num_fewshot == {TASK: 0, FEWSHOT_TASK: 2}
        result = harness(model, byte_tokenizer, tasks=own, limit=4, progress=False)
        assert result.score(FEWSHOT_TASK).num_fewshot == 2 and result.score(TASK).num_fewshot == 0
        override = load_tasks([TASK, FEWSHOT_TASK], num_fewshot={TASK: 3}, include_path=task_folder)
        other = harness(model, byte_tokenizer, tasks=override, limit=4, progress=False)
        assert other.score(TASK).num_fewshot == 3 and other.score(FEWSHOT_TASK).num_fewshot == 2

    def test_unknown_task(self, task_folder):
        with pytest.raises(
            ValueError, match=r"no task 'yarn_rope_local_mx' \(did you mean yarn_rope_local_mc"
        ):
            load_tasks(["yarn_rope_local_mx"], include_path=task_folder)


# ------------------------------------------------------------------------------------------------
# 2. Settings, offline datasets, a missing lm-eval
# ------------------------------------------------------------------------------------------------


class TestSettings:
    def test_authors_fewshot(self):
        # jquesnelle/yarn eval-harness.sh
        assert AUTHORS_FEWSHOT == {"arc_challenge": 25, "hellaswag": 10, "truthfulqa_mc2": 0, "mmlu": 5}

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"tasks": []}, ValueError, "at least one"),
            ({"tasks": ["a", "a"]}, ValueError, "repeat"),
            ({"tasks": ["a"], "num_fewshot": -1}, ValueError, "num_fewshot"),
            ({"tasks": ["a"], "num_fewshot": {"b": 1}}, ValueError, "not among the tasks"),
            ({"tasks": ["a"], "include_path": "/no/such/folder"}, FileNotFoundError, "include_path"),
        ],
    )
    def test_bad_arguments(self, kwargs, error, match):
        with pytest.raises(error, match=match):
            load_tasks(**kwargs)

    def test_bad_limit_and_batch(self, loaded):
        with pytest.raises(ValueError, match="limit"):
            harness(tiny_llama(), None, tasks=loaded, limit=0)
        with pytest.raises(ValueError, match="batch_size"):
            harness(tiny_llama(), None, tasks=loaded, batch_size=0)

    def test_missing_lm_eval(self, monkeypatch):
        import importlib.util

        real = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a)
        )
        with pytest.raises(ImportError, match=r"yarn-rope\[harness\]"):
            load_tasks(["arc_challenge"])


@pytest.fixture
def hub_offline(monkeypatch):
    """The Hugging Face Hub switched off the way HF_HUB_OFFLINE=1 does (read at import time, so the
    imported constants are set)."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.slow
class TestOffline:
    def test_load_tasks(self, hub_offline):
        try:
            load_tasks(["arc_challenge"])
        except HarnessDataUnavailable as error:
            message = str(error)
        else:
            pytest.skip("arc_challenge is in this machine's dataset cache")
        assert "arc_challenge" in message and "unreachable" in message and "\n" not in message

    @pytest.mark.usefixtures("cli_loads_no_model")
    def test_command_line(self, hub_offline, capsys):
        status = cli.main(["eval", "harness", "--tasks", "arc_challenge", "--limit", "5"])
        err = capsys.readouterr().err
        if status == 0:
            pytest.skip("arc_challenge is in this machine's dataset cache")
        assert status == 2 and "Traceback" not in err
        lines = [line for line in err.splitlines() if line.startswith("yarn-rope: error:")]
        assert len(lines) == 1 and "arc_challenge" in lines[0] and "--include-path" in lines[0]


@pytest.fixture
def no_network(monkeypatch):
    """No network, and nothing said about it: HF_HUB_OFFLINE unset, every connection refused.

    Returns the list of connection attempts (host, port), each refused at once.
    """
    import socket

    import datasets
    import huggingface_hub.constants

    attempts: list[object] = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise OSError(101, "Network is unreachable (faked by the test)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: refuse((host, a[0] if a else None)))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return attempts


class TestNoNetwork:
    """Without a network (and without HF_HUB_OFFLINE) one short try tells, not the Hub client's
    retries with back-off (23 lines of warnings over about 50 s before)."""

    def test_load_tasks_tries_once(self, no_network, capfd, caplog):
        import datasets
        import huggingface_hub.constants

        try:
            load_tasks(["arc_challenge"])
        except HarnessDataUnavailable as error:
            message = str(error)
            assert "arc_challenge" in message and "unreachable" in message and "\n" not in message
        # else: the dataset is in this machine's cache, and was read from it offline
        assert len(no_network) == 1  # the probe; the datasets library tried nothing
        assert "Retry" not in capfd.readouterr().err + caplog.text
        assert datasets.config.HF_HUB_OFFLINE is False and huggingface_hub.constants.HF_HUB_OFFLINE is False

    @pytest.mark.slow
    @pytest.mark.usefixtures("cli_loads_no_model")
    def test_command_line_says_it_once(self, no_network, capfd, caplog):
        status = cli.main(["eval", "harness", "--tasks", "arc_challenge", "--limit", "5"])
        if status == 0:
            pytest.skip("arc_challenge is in this machine's dataset cache")
        err = capfd.readouterr().err
        assert status == 2 and err.count("unreachable") == 1 and len(err.splitlines()) == 1, err
        assert len(no_network) == 1 and "Retry" not in caplog.text


# ------------------------------------------------------------------------------------------------
# 3. Command line on a tiny checkpoint and a local task
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(save_checkpoint) -> Path:
    """A tiny Llama with the byte tokenizer, saved as a local checkpoint folder."""
    return save_checkpoint(tiny_llama(seed=1))


class TestCommandLine:
    @pytest.mark.slow
    def test_run(self, tiny_checkpoint, task_folder, tmp_path, capfd, monkeypatch):
        out, png = tmp_path / "short.json", tmp_path / "short.png"
        argv = ["eval", "harness", "--model", str(tiny_checkpoint), "--original-max-position-embeddings"]
        argv += [str(ORIGINAL), "--tasks", TASK, "--include-path", str(task_folder), "--limit", "8"]
        argv += ["--json", str(out), "--plot", str(png), "--no-progress"]
        monkeypatch.chdir(tmp_path)  # outside any git checkout: lm-eval's `git describe` fails here
        assert cli.main(argv) == 0
        printed, errors = capfd.readouterr()  # file descriptors: git's own stderr would show here
        assert "fatal" not in errors and "it/s" not in errors and "%|" not in errors, errors
        assert re.search(r"\| task \| plain RoPE \| yarn x2 \|", printed)
        row = next(line for line in printed.splitlines() if line.startswith(f"| {TASK} (0-shot, acc_norm)"))
        records = load_records(out)
        assert [(r.method, r.metric) for r in records] == [
            ("none", "acc"),
            ("none", "acc_norm"),
            ("yarn", "acc"),
            ("yarn", "acc_norm"),
        ]
        # Independently: the loglikelihood choice on the checkpoint, unpatched and patched.
        model = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
        base = expected_scores(model, tokenizer, make_documents()[:8])
        with patched(model, method="yarn", factor=2.0, original_max_position_embeddings=ORIGINAL):
            yarn = expected_scores(model, tokenizer, make_documents()[:8])
        for record in records:
            value, stderr = (base if record.method == "none" else yarn)[record.metric]
            assert record.value == pytest.approx(value) and record.stderr == pytest.approx(stderr)
        for record in records[1::2]:
            assert f"{100 * record.value:.1f} ± {100 * record.stderr:.1f}" in row
        assert png.read_bytes()[:8] == PNG_SIGNATURE

    @pytest.mark.parametrize(
        ("flag", "value"), [("--num-fewshot", "-1"), ("--limit", "0"), ("--limit", "x"), ("--tasks", ",")]
    )
    def test_bad_flags(self, flag, value, capsys):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["eval", "harness", flag, value])
        assert exit_info.value.code == 2
        assert flag in capsys.readouterr().err

    @pytest.mark.usefixtures("cli_loads_no_model")
    def test_errors_before_the_model_loads(self, tmp_path, capsys):
        assert cli.main(["eval", "harness", "--include-path", str(tmp_path / "none")]) == 2
        assert "include_path" in capsys.readouterr().err
        assert cli.main(["eval", "harness", "--json", str(tmp_path / "no" / "x.json")]) == 2
        assert "--json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# 4. SmolLM2 (slow): lm-eval on the GGUF-loaded model
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_local_task(loaded):
    from yarn_rope.eval.data import load_default_model

    try:
        model, tokenizer = load_default_model()
    except (FileNotFoundError, ImportError) as error:
        pytest.skip(str(error))
    result = harness(model, tokenizer, tasks=loaded, limit=5, progress=False)
    expected = expected_scores(model, tokenizer, make_documents()[:5])
    for metric, (value, stderr) in expected.items():
        assert result.score(TASK, metric).value == pytest.approx(value)
        assert result.score(TASK, metric).stderr == pytest.approx(stderr)


class TestLmEvalOutput:
    """``_compat.lm_eval_output``: lm-eval's stray output quietened for a run, and put back."""

    def test_git_lookup_is_the_same_without_the_noise(self, tmp_path, capfd, monkeypatch):
        evaluator = pytest.importorskip("lm_eval.evaluator")
        if shutil.which("git") is None:
            pytest.skip("git is not installed: lm-eval's lookup prints nothing to quieten")
        original = evaluator.get_git_commit_hash
        for folder in (tmp_path, Path(__file__).resolve().parent):  # outside and inside a checkout
            monkeypatch.chdir(folder)
            capfd.readouterr()
            expected = original()
            with _compat.lm_eval_output(bars=True):
                assert evaluator.get_git_commit_hash() == expected
            assert capfd.readouterr().err.count("fatal") == (1 if expected is None else 0)
        assert evaluator.get_git_commit_hash is original

    def test_bars_while_building_prompts(self, capfd):
        task = pytest.importorskip("lm_eval.api.task")
        original = task.tqdm
        with _compat.lm_eval_output(bars=False):
            for _ in task.tqdm(range(3), total=3):
                pass
        assert capfd.readouterr().err == ""
        with _compat.lm_eval_output(bars=True):
            assert task.tqdm is original
        assert task.tqdm is original
