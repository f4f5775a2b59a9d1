"""RULER-style synthetic long-context tasks, generated locally from a seed and scored by exact match.

The task families follow RULER (Hsieh, Sun, Kriman, Acharya, Rekesh, Jia, Zhang, Ginsburg, "RULER:
What's the Real Context Size of Your Long-Context Language Models?", COLM 2024, arXiv:2404.06654):
passkey retrieval is easy to pass, and the loss of a context extension shows in the harder
variants below. The wording of the prompts is our own; their structure is RULER's (an
instruction, a long context, a question, and the beginning of the answer for the model to
complete). Everything is generated here, offline: there is nothing to download.

Tasks (``TASKS``) and what the model must produce:

``niah_single``
    One needle ``One of the special magic numbers for {key} is: {value}.`` (``key`` an
    adjective-noun pair such as ``quiet-harbor``, ``value`` a 7-digit number) in the haystack. The
    prompt ends ``... The special magic number for {key} mentioned in the text above is`` and the
    expected answer is ``value``.
``niah_multikey``
    Four needles with different keys; one (the first drawn) is asked for, three distract.
``niah_multivalue``
    Four needles with the same key and different values; all four are expected.
``niah_multiquery``
    Four needles with different keys; all four keys are asked for, all four values expected.
``variable_tracking``
    A chain ``VAR QKZMW = 48213.``, ``VAR PLHXA = QKZMW.``, ... of five assignments (four hops)
    spread through the haystack in order; the question asks which variables hold the number, and
    the five names are expected.
``common_words``
    No haystack: a numbered list (``1. bavoti``, one entry a line) of made-up words in which ten
    words appear ``c`` times each and every other word ``r < c`` times (``c = 30, r = 3`` once
    the list is long enough, as in RULER; fewer at short lengths). The ten frequent words are
    expected. The words are made up (consonant-vowel syllables) so that no English word
    frequency helps, and there are as many as the length needs.

Haystack: lines of a text (default: the longest standard-library source file,
:func:`yarn_rope.eval.data.default_corpus`; or any text the caller passes), read cyclically from a
seeded random line. Needles and assignments are inserted as lines of their own between haystack
lines. Every needle value, key and variable name is drawn so that it does not occur in the
haystack text: each appears in the prompt exactly where it was put.

Depth: the share of the haystack's tokens before a needle (0 = the start of the context, 1 = its
end), using each line's token count. The first needle (the one asked for in ``niah_single`` and
``niah_multikey``, the first value or key of the multi tasks, the assignment of the number in
``variable_tracking``) sits at the trial's stated depth, at the line boundary nearest to it; the
other needles at seeded random depths (the later assignments of a chain between its start and
the end). By default trial ``i`` of ``n`` is placed at depth ``(i + 0.5) / n``; ``depths`` sets
them explicitly.

Length: the number of haystack lines (or list entries) is the largest whose whole prompt, as the
model's tokenizer encodes it (special tokens included, as for :func:`~yarn_rope.eval.passkey`),
has at most ``length`` tokens (a binary search over the line count).

Scoring (exact match): the generated text's word tokens (``\\w+``) are read in order; those that
can be an answer (numbers for the needle tasks; the prompt's variable names; the list's words)
are kept, duplicates dropped, and the first ``k`` of them are compared with the ``k`` expected
answers: the trial scores the share of expected answers among them (1 or 0 when one answer is
expected). Listing more than ``k`` candidates earns nothing, so copying every number or word of
the context is not rewarded. A cell's accuracy is the mean score over its trials, as RULER
averages partial credit. Decoding is greedy; everything random comes from ``seed`` and the
trial's task, length and index, so the same seed gives the same prompts whichever tasks run
together.
"""

from __future__ import annotations

import bisect
import dataclasses
import random
import re
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch

from .._progress import progress_bar
from .perplexity import check_lengths
from .results import EvalRecord, label_for, mean_stderr

__all__ = [
    "TASKS",
    "Haystack",
    "RulerPrompt",
    "RulerResult",
    "RulerTrial",
    "build_prompt",
    "ruler",
    "score_answer",
    "trial_depth",
]

TASKS = (
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "variable_tracking",
    "common_words",
)
NEEDLE_TASKS = TASKS[:5]  # the tasks with a haystack and a depth

NEEDLES = 4  # needles in the multi-key / multi-value / multi-query tasks (RULER's default)
HOPS = 4  # variable tracking: one chain of HOPS + 1 variables (RULER's default)
COMMON = 10  # common words expected (RULER's default)
MAX_NEW_TOKENS = {
    "niah_single": 16,
    "niah_multikey": 16,
    "niah_multivalue": 48,
    "niah_multiquery": 48,
    "variable_tracking": 32,
    "common_words": 64,
}

_ADJECTIVES = tuple(
    " ".join(
        (
            "amber ancient bold brave bright calm careful cheerful clever cold crimson curious daring",
            "distant eager early faint fierce gentle golden grand green hidden hollow honest humble icy",
            "jolly keen lively lonely loud lucky mellow merry misty modest narrow noble odd pale patient",
            "proud quick quiet rapid rare restless rough rusty silent silver sleepy slow smooth solemn",
            "steady stormy sunny swift tender tidy urgent vivid warm wild wise young",
        )
    ).split()
)
_NOUNS = tuple(
    " ".join(
        (
            "anchor apple arrow badge banner barrel basket beacon bell blanket bridge candle canyon",
            "castle cedar chimney cloud comet compass cottage crystal dragon falcon feather forest",
            "fountain garden glacier harbor helmet island kettle ladder lantern lighthouse meadow mirror",
            "mountain needle orchard otter painting pebble pepper pillow planet pocket puzzle quarry",
            "rabbit ribbon river saddle shadow shell spider statue thimble thunder tower trumpet tunnel",
            "valley violin wagon whistle window",
        )
    ).split()
)
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_NIAH_INTRO = (
    "Some special magic numbers are hidden in the long text below. Memorize them: I will ask "
    "about them afterwards.\n"
)
_VT_INTRO = "Memorize and follow the chain of variable assignments hidden in the long text below.\n"
_CWE_INTRO = (
    "Below is a numbered list of words. Some words appear more often than the others. Memorize "
    "the ones that appear most often.\n"
)


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}.\n"


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _niah_question(keys: Sequence[str], several: bool) -> str:
    about = _join(keys)
    if not several:
        return (
            f"\nWhat is the special magic number for {about} mentioned in the text above? "
            f"The special magic number for {about} mentioned in the text above is"
        )
    return (
        f"\nWhat are all the special magic numbers for {about} mentioned in the text above? "
        f"The special magic numbers for {about} mentioned in the text above are"
    )


def _vt_question(value: str, count: int) -> str:
    return (
        f"\nQuestion: Which variables are assigned the value {value} in the text above? Answer: "
        f"Following the chain of assignments in the text above, {count} variables are assigned the "
        f"value {value}, and they are:"
    )


def _cwe_question() -> str:
    return (
        f"\nQuestion: What are the {COMMON} most common words in the list above? Answer: The "
        f"{COMMON} words that appear most often in the list are:"
    )


# ------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Haystack:
    """A text cut into lines, with each line's token count under one tokenizer.

    Build it once per tokenizer with :meth:`from_text`; prompts read its lines cyclically.
    """

    text: str
    lines: tuple[str, ...]
    line_tokens: tuple[int, ...]

    @classmethod
    def from_text(cls, text: str, tokenizer: Any) -> Haystack:
        """Cut ``text`` into lines (each ends with a newline) and count their tokens.

        Raises:
            ValueError: ``text`` holds no non-blank line.
        """
        if not isinstance(text, str):
            raise TypeError(f"the haystack must be text, got {type(text).__name__}")
        lines = [line if line.endswith("\n") else line + "\n" for line in text.splitlines()]
        lines = [line for line in lines if line.strip()]
        if not lines:
            raise ValueError("the haystack text is empty: pass a text with at least one non-blank line")
        counts = tokenizer(lines, add_special_tokens=False).input_ids
        return cls(text=text, lines=tuple(lines), line_tokens=tuple(len(ids) for ids in counts))


@dataclasses.dataclass(frozen=True)
class RulerPrompt:
    """One generated prompt.

    Attributes:
        task: one of :data:`TASKS`.
        text: the prompt as text.
        input_ids: ``[s]`` its token ids (special tokens as the tokenizer adds them), ``s <= length``.
        answers: the expected answers (strings, in the order they were placed).
        vocabulary: the words that count as answer candidates when scoring (``None``: numbers).
        depth: the stated depth of the first needle (0 start .. 1 end); ``None`` for ``common_words``.
        needle_depths: the measured depth of every inserted needle line, in order of insertion.
        max_new_tokens: tokens to generate for the answer.
    """

    task: str
    text: str
    input_ids: torch.Tensor
    answers: tuple[str, ...]
    vocabulary: frozenset[str] | None
    depth: float | None
    needle_depths: tuple[float, ...]
    max_new_tokens: int


def _fresh_word(rng: random.Random, make: Callable[[random.Random], str], taken: set[str], text: str) -> str:
    """A new word from ``make`` that is neither taken nor anywhere in the haystack ``text``."""
    for _ in range(10_000):
        word = make(rng)
        if word not in taken and word not in text:
            taken.add(word)
            return word
    raise ValueError("could not draw a word absent from the haystack text; pass another --text")


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _variable(rng: random.Random) -> str:
    return "".join(rng.choice(_UPPER) for _ in range(5))


def _made_up_word(rng: random.Random) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.choice((2, 3))))


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text).input_ids)


def _largest_fitting(
    build: Callable[[int], str], tokenizer: Any, length: int, guess: int, *, task: str
) -> int:
    """Largest ``n`` whose ``build(n)`` has at most ``length`` tokens.

    ``build(n)`` grows with ``n`` (each unit adds at least one token). Doubling from ``guess``
    brackets the answer, then a binary search finds it; every step counts the real prompt, since
    tokens of separately counted lines do not add up exactly (merges across line breaks).

    Raises:
        ValueError: even ``build(0)`` is longer than ``length`` (the message gives its length).
    """
    minimum = _count(tokenizer, build(0))
    if minimum > length:
        raise ValueError(
            f"length={length} is too short for a {task} prompt (needs at least {minimum} tokens)"
        )
    low, high = 0, max(1, guess)
    while _count(tokenizer, build(high)) <= length:
        low, high = high, 2 * high
    while high - low > 1:  # build(low) fits, build(high) does not
        middle = (low + high) // 2
        if _count(tokenizer, build(middle)) <= length:
            low = middle
        else:
            high = middle
    return low


def _needle_task(
    task: str, haystack: Haystack, tokenizer: Any, length: int, rng: random.Random, depth: float
) -> tuple[str, tuple[str, ...], frozenset[str] | None, tuple[float, ...]]:
    taken: set[str] = set()
    vocabulary: frozenset[str] | None = None
    if task == "variable_tracking":
        value = _fresh_word(rng, lambda r: _number(r, 5), taken, haystack.text)
        names = [_fresh_word(rng, _variable, taken, haystack.text) for _ in range(HOPS + 1)]
        statements = [f"VAR {names[0]} = {value}.\n"]
        statements += [f"VAR {names[i]} = {names[i - 1]}.\n" for i in range(1, HOPS + 1)]
        depths = [depth, *sorted(depth + (1.0 - depth) * rng.random() for _ in range(HOPS))]
        intro, question = _VT_INTRO, _vt_question(value, HOPS + 1)
        answers, vocabulary = tuple(names), frozenset(name.lower() for name in names)
    else:
        count = 1 if task == "niah_single" else NEEDLES
        values = [_fresh_word(rng, lambda r: _number(r, 7), taken, haystack.text) for _ in range(count)]
        if task == "niah_multivalue":
            keys = [_fresh_word(rng, _key, taken, haystack.text)] * count
        else:
            keys = [_fresh_word(rng, _key, taken, haystack.text) for _ in range(count)]
        statements = [_needle(key, value) for key, value in zip(keys, values, strict=True)]
        depths = [depth] + [rng.random() for _ in range(count - 1)]
        intro = _NIAH_INTRO
        if task in ("niah_single", "niah_multikey"):
            question, answers = _niah_question(keys[:1], several=False), tuple(values[:1])
        elif task == "niah_multivalue":
            question, answers = _niah_question(keys[:1], several=True), tuple(values)
        else:
            question, answers = _niah_question(keys, several=True), tuple(values)
    start = rng.randrange(len(haystack.lines))
    total_lines = len(haystack.lines)

    def layout(n: int) -> tuple[str, list[float]]:
        lines = [haystack.lines[(start + i) % total_lines] for i in range(n)]
        cumulative = [0]
        for i in range(n):
            cumulative.append(cumulative[-1] + haystack.line_tokens[(start + i) % total_lines])
        total = cumulative[-1]
        slots: dict[int, list[str]] = {}
        placed = []
        for statement, wanted in zip(statements, depths, strict=True):
            index = _nearest_boundary(cumulative, wanted * total)
            slots.setdefault(index, []).append(statement)
            placed.append(cumulative[index] / total if total else 0.0)
        parts = [intro]
        for index in range(n + 1):
            parts.extend(slots.get(index, ()))
            if index < n:
                parts.append(lines[index])
        parts.append(question)
        return "".join(parts), placed

    guess, tokens = 0, 0  # about as many lines as fit, counting each line's tokens alone
    while tokens < length:
        tokens += max(1, haystack.line_tokens[(start + guess) % total_lines])
        guess += 1
    text, placed = layout(_largest_fitting(lambda n: layout(n)[0], tokenizer, length, guess, task=task))
    return text, answers, vocabulary, tuple(placed)


def _nearest_boundary(cumulative: list[int], target: float) -> int:
    """Index ``k`` of the line boundary whose token offset ``cumulative[k]`` is nearest ``target``."""
    k = bisect.bisect_left(cumulative, target)
    if k == 0:
        return 0
    if k == len(cumulative):
        return k - 1
    return k if cumulative[k] - target < target - cumulative[k - 1] else k - 1


def _common_words(
    tokenizer: Any, length: int, rng: random.Random
) -> tuple[str, tuple[str, ...], frozenset[str]]:
    seed = rng.getrandbits(64)

    def listing(entries: int) -> tuple[str, tuple[str, ...], frozenset[str]]:
        local = random.Random(seed)
        common_count = min(30, max(2, entries // 40))
        rare_count = max(1, common_count // 10)
        taken: set[str] = set()
        common = [_fresh_word(local, _made_up_word, taken, "") for _ in range(COMMON)]
        words = [word for word in common for _ in range(common_count)]
        while len(words) + rare_count <= entries:
            words.extend([_fresh_word(local, _made_up_word, taken, "")] * rare_count)
        local.shuffle(words)
        body = "".join(f"{i + 1}. {word}\n" for i, word in enumerate(words))
        return _CWE_INTRO + body + _cwe_question(), tuple(common), frozenset(taken)

    per_entry = max(1, _count(tokenizer, "".join(f"{i}. bavoti\n" for i in range(100, 200))) // 100)
    return listing(
        _largest_fitting(lambda n: listing(n)[0], tokenizer, length, length // per_entry, task="common_words")
    )


def build_prompt(
    task: str,
    tokenizer: Any,
    length: int,
    *,
    rng: random.Random,
    depth: float | None = 0.5,
    haystack: Haystack | str | None = None,
) -> RulerPrompt:
    """One prompt of ``task`` with at most ``length`` tokens (see the module docstring for formats).

    Args:
        task: one of :data:`TASKS`.
        tokenizer: the model's tokenizer (sizes the prompt).
        length: the prompt's token budget.
        rng: the source of every random choice.
        depth: where the first needle goes, 0 (start of the context) .. 1 (end); ignored by
            ``common_words``.
        haystack: a :class:`Haystack` or a text (default: :func:`~yarn_rope.eval.data.default_corpus`).

    Returns:
        :class:`RulerPrompt`.

    Raises:
        ValueError: an unknown task, a depth outside [0, 1], or a length too short for the
            instructions, needles and question (the message gives the minimum).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if task == "common_words":
        text, answers, words = _common_words(tokenizer, length, rng)
        ids = torch.tensor(tokenizer(text).input_ids, dtype=torch.long)
        return RulerPrompt(task, text, ids, answers, words, None, (), MAX_NEW_TOKENS[task])
    if depth is None or isinstance(depth, bool) or not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"depth must be a number in [0, 1] (0 = start of the context), got {depth!r}")
    if not isinstance(haystack, Haystack):
        if haystack is None:
            from .data import default_corpus

            haystack = default_corpus(1)[0][1]
        haystack = Haystack.from_text(haystack, tokenizer)
    text, answers, vocabulary, placed = _needle_task(task, haystack, tokenizer, length, rng, float(depth))
    ids = torch.tensor(tokenizer(text).input_ids, dtype=torch.long)
    return RulerPrompt(task, text, ids, answers, vocabulary, float(depth), placed, MAX_NEW_TOKENS[task])


# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------


def score_answer(output: str, answers: Sequence[str], *, vocabulary: Collection[str] | None = None) -> float:
    """Exact-match score of a generated ``output`` against the ``answers`` (0..1).

    The output's word tokens (``\\w+``) are read in order; candidates are those in ``vocabulary``
    (compared case-insensitively), or, without one, those made only of digits. Repeats are
    dropped, and the first ``len(answers)`` candidates are compared with ``answers``.

    Returns:
        The share of ``answers`` among those first candidates.

    Raises:
        ValueError: ``answers`` is empty.
    """
    if not answers:
        raise ValueError("answers must hold at least one expected answer")
    allowed = None if vocabulary is None else {word.lower() for word in vocabulary}
    candidates: list[str] = []
    for token in re.findall(r"\w+", output):
        word = token.lower()
        if (word.isdigit() if allowed is None else word in allowed) and word not in candidates:
            candidates.append(word)
    chosen = set(candidates[: len(answers)])
    expected = {answer.lower() for answer in answers}
    return sum(answer in chosen for answer in expected) / len(expected)


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RulerTrial:
    """One prompt and the model's answer.

    Attributes:
        task, length, trial: which cell and which trial in it.
        tokens: the prompt's length in tokens (at most ``length``).
        depth: the first needle's stated depth (``None`` for ``common_words``).
        answers: what was expected.
        output: what the model generated.
        score: :func:`score_answer` of ``output`` (0..1).
    """

    task: str
    length: int
    trial: int
    tokens: int
    depth: float | None
    answers: tuple[str, ...]
    output: str
    score: float

    @property
    def correct(self) -> bool:
        return self.score == 1.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["answers"] = list(self.answers)
        return out


@dataclasses.dataclass(frozen=True)
class RulerResult:
    """Accuracy (mean score) per task and length, and every trial.

    Attributes:
        accuracy: ``{task: {length: mean score}}``.
        trials: every :class:`RulerTrial`, in the order run.
        scaling: ``RopeScaling.to_dict()`` of the patch in force, ``None`` when unpatched.
        seed: the seed the prompts came from.
    """

    accuracy: dict[str, dict[int, float]]
    trials: tuple[RulerTrial, ...]
    scaling: dict[str, Any] | None = None
    seed: int = 0

    def by_depth(self, task: str | None = None) -> dict[tuple[float, int], float]:
        """Mean score per ``(depth, length)`` over one task, or over every needle task (``None``)."""
        cells: dict[tuple[float, int], list[float]] = {}
        for trial in self.trials:
            if trial.depth is not None and (task is None or trial.task == task):
                cells.setdefault((trial.depth, trial.length), []).append(trial.score)
        return {cell: sum(scores) / len(scores) for cell, scores in sorted(cells.items())}

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": {
                task: {str(length): value for length, value in by_length.items()}
                for task, by_length in self.accuracy.items()
            },
            "trials": [trial.to_dict() for trial in self.trials],
            "scaling": self.scaling,
            "seed": self.seed,
        }

    def records(
        self, *, model: str = "", method: str | None = None, label: str | None = None
    ) -> list[EvalRecord]:
        """:class:`~yarn_rope.eval.results.EvalRecord` per task and length (``depth`` ``None``),
        then per task, length and depth for the needle tasks; suite ``"ruler"``, metric
        ``"accuracy"``, ``stderr`` the standard error of the mean over the trials. The per-task
        records keep every trial's depth, expected answers, output and score in ``details``."""
        settings = self.scaling
        common: dict[str, Any] = {
            "suite": "ruler",
            "metric": "accuracy",
            "model": model,
            "method": method or (str(settings["method"]) if settings else "none"),
            "label": label or label_for(settings),
            "settings": settings,
        }
        out = []
        for task, by_length in self.accuracy.items():
            for length, value in by_length.items():
                cell = [t for t in self.trials if t.task == task and t.length == length]
                scores = [t.score for t in cell]
                trials = [
                    {"depth": t.depth, "answers": list(t.answers), "output": t.output, "score": t.score}
                    for t in cell
                ]
                out.append(
                    EvalRecord(
                        task=task,
                        value=value,
                        length=length,
                        stderr=mean_stderr(scores),
                        samples=len(scores),
                        details={"seed": self.seed, "trials": trials},
                        **common,
                    )
                )
        for task in self.accuracy:
            for (depth, length), value in self.by_depth(task).items():
                count = sum(t.task == task and t.length == length and t.depth == depth for t in self.trials)
                out.append(
                    EvalRecord(
                        task=task,
                        value=value,
                        length=length,
                        depth=depth,
                        samples=count,
                        details={"seed": self.seed},
                        **common,
                    )
                )
        return out


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise ValueError(f"tasks must name at least one of {', '.join(TASKS)}")
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}; choose from {', '.join(TASKS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"tasks must not repeat, got {names!r}")
    return names


def _check_depths(depths: Sequence[float] | None) -> list[float] | None:
    if depths is None:
        return None
    values = list(depths)
    if not values or any(
        isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0 for d in values
    ):
        raise ValueError(f"depths must be numbers in [0, 1] (0 = start of the context), got {depths!r}")
    return [float(d) for d in values]


def trial_depth(trial: int, trials: int, depths: Sequence[float] | None = None) -> float:
    """The stated depth of trial ``trial`` (of ``trials``): ``depths`` in turn, else ``(i + 0.5) / n``."""
    if depths:
        return float(depths[trial % len(depths)])
    return (trial + 0.5) / trials


def ruler(
    model: Any,
    tokenizer: Any,
    *,
    lengths: Sequence[int],
    tasks: Sequence[str] = TASKS,
    trials: int = 5,
    seed: int = 0,
    depths: Sequence[float] | None = None,
    haystack: str | None = None,
    progress: bool | None = None,
) -> RulerResult:
    """Accuracy on the RULER-style tasks at each prompt length (greedy decoding, exact match).

    Args:
        model: a transformers causal LM (patched or not).
        tokenizer: its tokenizer.
        lengths: prompt lengths in tokens (each prompt has at most that many).
        tasks: names from :data:`TASKS` (default all six).
        trials: prompts per task and length.
        seed: seeds every prompt; the same seed gives the same prompts.
        depths: stated needle depths in [0, 1], used in turn by the trials (default: trial ``i``
            at ``(i + 0.5) / trials``).
        haystack: the text needles hide in (default: the longest standard-library source file).
        progress: a progress bar counting prompt tokens (``None``: only on a terminal).

    Returns:
        :class:`RulerResult`.

    Raises:
        ValueError: bad lengths, tasks, trials or depths, or a length too short for a prompt.
    """
    lengths = check_lengths(lengths, minimum=1)
    names = _check_tasks(tasks)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive whole number, got {trials!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be a whole number, got {seed!r}")
    stated = _check_depths(depths)
    from ..patch import patch_info

    stack: Haystack | None = None
    if any(name in NEEDLE_TASKS for name in names):
        if haystack is None:
            from .data import default_corpus

            haystack = default_corpus(1)[0][1]
        stack = Haystack.from_text(haystack, tokenizer)
    # Every prompt first: a length too short for a task fails now, not after hours of generation.
    prompts: list[tuple[int, str, int, RulerPrompt]] = []
    for length in lengths:
        for task in names:
            for index in range(trials):
                rng = random.Random(f"{seed}/{task}/{length}/{index}")
                depth = trial_depth(index, trials, stated)
                prompt = build_prompt(task, tokenizer, length, rng=rng, depth=depth, haystack=stack)
                prompts.append((length, task, index, prompt))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results: list[RulerTrial] = []
    total = sum(prompt.input_ids.numel() for _, _, _, prompt in prompts)
    with progress_bar(total, desc="ruler", unit="token", unit_scale=True, enabled=progress) as bar:
        for length, task, index, prompt in prompts:
            ids = prompt.input_ids[None].to(device)
            with torch.no_grad():
                output = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=prompt.max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                )
            answer = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
            value = score_answer(answer, prompt.answers, vocabulary=prompt.vocabulary)
            results.append(
                RulerTrial(task, length, index, ids.shape[1], prompt.depth, prompt.answers, answer, value)
            )
            bar.update(ids.shape[1])
    accuracy = {
        task: {
            length: sum(t.score for t in results if t.task == task and t.length == length) / trials
            for length in lengths
        }
        for task in names
    }
    info = patch_info(model)
    return RulerResult(
        accuracy=accuracy,
        trials=tuple(results),
        scaling=None if info is None else info.scaling.to_dict(),
        seed=seed,
    )
