"""Passkey retrieval (Mohtashami & Jaggi 2023, as used in the YaRN paper, section 4.3.2).

A five-digit pass key is hidden at a uniformly random depth in repeated filler text; the model
reads the whole prompt and greedily continues "The pass key is". A trial succeeds when the key is
the first number of the answer. Prompts are sized to the requested length in tokens of the
model's own tokenizer; everything random comes from one seeded generator.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Sequence
from typing import Any

import torch

from .._progress import TokenProgress
from .perplexity import check_lengths
from .results import EvalRecord, label_for, mean_stderr

__all__ = ["PasskeyPrompt", "PasskeyResult", "PasskeyTrial", "build_prompt", "passkey"]

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"


def _needle(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


@dataclasses.dataclass(frozen=True)
class PasskeyPrompt:
    """One prompt: its token ids ``[s]``, the key, and where the key sits (0 start .. 1 end)."""

    input_ids: torch.Tensor
    key: int
    depth: float


@dataclasses.dataclass(frozen=True)
class PasskeyTrial:
    length: int
    tokens: int
    key: int
    depth: float
    answer: str
    correct: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PasskeyResult:
    """Accuracy by length, and every trial."""

    accuracy: dict[int, float]
    trials: tuple[PasskeyTrial, ...]
    scaling: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": {str(length): value for length, value in self.accuracy.items()},
            "trials": [trial.to_dict() for trial in self.trials],
            "scaling": self.scaling,
        }

    def records(
        self, *, model: str = "", method: str | None = None, label: str | None = None
    ) -> list[EvalRecord]:
        """One :class:`~yarn_rope.eval.results.EvalRecord` per length: accuracy over the trials,
        with the standard error of that mean (suite and task ``"passkey"``)."""
        settings = self.scaling
        out = []
        for length, accuracy in self.accuracy.items():
            hits = [float(trial.correct) for trial in self.trials if trial.length == length]
            out.append(
                EvalRecord(
                    suite="passkey",
                    task="passkey",
                    metric="accuracy",
                    value=accuracy,
                    model=model,
                    method=method or (str(settings["method"]) if settings else "none"),
                    label=label or label_for(settings),
                    settings=settings,
                    length=length,
                    stderr=mean_stderr(hits),
                    samples=len(hits),
                )
            )
        return out


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def build_prompt(tokenizer: Any, length: int, *, rng: random.Random) -> PasskeyPrompt:
    """A passkey prompt of about ``length`` tokens (within one filler sentence) with one key.

    Raises:
        ValueError: ``length`` too short to hold the instructions, the key and the question.
    """
    key = rng.randint(10000, 99999)
    needle = _needle(key)
    fixed = _count(tokenizer, INTRO + needle + QUESTION) + len(tokenizer("").input_ids)
    per_filler = _count(tokenizer, FILLER * 8) / 8
    repeats = int((length - fixed) // per_filler)
    if repeats < 1:
        minimum = fixed + math.ceil(per_filler)
        raise ValueError(
            f"length={length} is too short for a passkey prompt (needs at least {minimum} tokens)"
        )
    position = rng.randint(0, repeats)
    text = INTRO + FILLER * position + needle + FILLER * (repeats - position) + QUESTION
    ids = torch.tensor(tokenizer(text).input_ids, dtype=torch.long)
    return PasskeyPrompt(input_ids=ids, key=key, depth=position / repeats)


def passkey(
    model: Any,
    tokenizer: Any,
    *,
    lengths: Sequence[int],
    trials: int = 10,
    seed: int = 0,
    max_new_tokens: int = 8,
    progress: bool | None = None,
) -> PasskeyResult:
    """Passkey retrieval accuracy at each prompt length (greedy decoding).

    Args:
        model: a transformers causal LM (patched or not).
        tokenizer: its tokenizer.
        lengths: prompt lengths in tokens.
        trials: prompts per length (each with its own key and depth).
        seed: seeds keys and depths; the same seed gives the same prompts.
        max_new_tokens: tokens generated for the answer.
        progress: a bar in tokens that moves per trial and length, and layer by layer inside
            each prompt's forward pass, with a rate and an ETA (``None``: on a terminal only).

    Returns:
        :class:`PasskeyResult`.
    """
    lengths = check_lengths(lengths, minimum=1)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive whole number, got {trials!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive whole number, got {max_new_tokens!r}")
    from ..patch import patch_info

    rng = random.Random(seed)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Every prompt first (the generator draws keys and depths in the same order either way), so that
    # the bar knows the tokens to come: each prompt once, then one token per further decoding step.
    prompts = [
        (length, build_prompt(tokenizer, length, rng=rng)) for length in lengths for _ in range(trials)
    ]
    steps = max_new_tokens - 1
    total = sum(prompt.input_ids.numel() + steps for _, prompt in prompts)
    results: list[PasskeyTrial] = []
    with TokenProgress(model, total=total, desc="passkey", enabled=progress) as meter:
        for number, (length, prompt) in enumerate(prompts):
            meter.set_postfix(f"length {length}, trial {number % trials + 1}/{trials}")
            ids = prompt.input_ids[None].to(device)
            with torch.no_grad(), meter.task(ids.shape[1] + steps):
                output = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                )
            answer = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
            found = re.search(r"\d+", answer)
            correct = found is not None and found.group() == str(prompt.key)
            results.append(PasskeyTrial(length, ids.shape[1], prompt.key, prompt.depth, answer, correct))
    accuracy = {length: sum(t.correct for t in results if t.length == length) / trials for length in lengths}
    info = patch_info(model)
    return PasskeyResult(
        accuracy=accuracy, trials=tuple(results), scaling=None if info is None else info.scaling.to_dict()
    )
