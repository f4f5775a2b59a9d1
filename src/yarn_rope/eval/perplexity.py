"""Perplexity at several context lengths, the way the YaRN paper measures it (section 4.3).

Two modes:

* **truncate** (``stride=None``): each document is scored on its first ``length`` tokens, the
  paper's length curves (its Figure 1 and Table 2). The model is causal, so for a static table
  one forward pass over the first ``max(lengths)`` tokens yields the score of every shorter prefix;
  dynamic methods (whose table depends on the sequence length) get one pass per length.
* **sliding** (``stride=S``): each document is read in windows of ``length`` tokens that start
  ``S`` tokens apart; in each window the labels of tokens an earlier window already scored are
  masked, so every target token of the document is scored exactly once (for ``S < length``).

Memory stays linear in the length: the vocabulary projection runs on slices of the final hidden
states (``chunk_size`` positions at a time), never on the full ``[length, vocab]`` logits (SmolLM2
at 32k tokens would need 6.4 GB of float32 logits for that alone).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .._progress import TokenProgress
from .results import EvalRecord, label_for

__all__ = ["DocumentNLL", "LengthResult", "PerplexityResult", "perplexity", "token_nll"]


@dataclasses.dataclass(frozen=True)
class DocumentNLL:
    """One document at one length: summed negative log-likelihood (nats) over ``tokens`` targets."""

    document: int
    nll_sum: float
    tokens: int

    @property
    def nll(self) -> float:
        return self.nll_sum / self.tokens

    def to_dict(self) -> dict[str, Any]:
        return {"document": self.document, "nll": self.nll, "tokens": self.tokens}


@dataclasses.dataclass(frozen=True)
class LengthResult:
    """All documents at one context length.

    Attributes:
        length: context length in tokens.
        nll: mean negative log-likelihood per target token (nats), over all documents' tokens.
        perplexity: ``exp(nll)``.
        tokens: target tokens scored.
        documents: per-document values (documents shorter than ``length`` are left out in
            truncate mode).
    """

    length: int
    nll: float
    perplexity: float
    tokens: int
    documents: tuple[DocumentNLL, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "length": self.length,
            "nll": self.nll,
            "perplexity": self.perplexity,
            "tokens": self.tokens,
            "documents": [doc.to_dict() for doc in self.documents],
        }


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Perplexity by length.

    Attributes:
        mode: ``"truncate"`` or ``"sliding"``.
        stride: the sliding stride (``None`` in truncate mode).
        lengths: one :class:`LengthResult` per requested length, in the order given.
        scaling: the model's rope scaling as ``RopeScaling.to_dict()`` when yarn_rope patched
            it, else ``None``.
    """

    mode: str
    stride: int | None
    lengths: tuple[LengthResult, ...]
    scaling: dict[str, Any] | None = None

    def at(self, length: int) -> LengthResult:
        for result in self.lengths:
            if result.length == length:
                return result
        raise KeyError(f"no result at length {length}; have {[r.length for r in self.lengths]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "stride": self.stride,
            "scaling": self.scaling,
            "lengths": [result.to_dict() for result in self.lengths],
        }

    def records(
        self, *, model: str = "", method: str | None = None, label: str | None = None
    ) -> list[EvalRecord]:
        """One :class:`~yarn_rope.eval.results.EvalRecord` per length (suite ``"perplexity"``).

        Args:
            model: the model's name for tables.
            method: the method's name (default: from :attr:`scaling`, ``"none"`` when unpatched).
            label: its column name (default: :func:`~yarn_rope.eval.results.label_for`).
        """
        settings = self.scaling
        return [
            EvalRecord(
                suite="perplexity",
                task=self.mode,
                metric="perplexity",
                value=entry.perplexity,
                model=model,
                method=method or (str(settings["method"]) if settings else "none"),
                label=label or label_for(settings),
                settings=settings,
                length=entry.length,
                samples=entry.tokens,
                details={"nll": entry.nll, "stride": self.stride, "documents": len(entry.documents)},
            )
            for entry in self.lengths
        ]


# ------------------------------------------------------------------------------------------------


def _output_head(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder that returns hidden states, vocabulary projection) of a causal LM."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if head is None or decoder is None or not isinstance(decoder, torch.nn.Module):
        raise TypeError(
            f"{type(model).__name__} is not a transformers causal LM with an output projection "
            "(get_output_embeddings) and a base model"
        )
    return decoder, head


def _logit_transform(model: Any) -> tuple[float | None, float | None]:
    """(final logit soft-cap, logit scale) that some heads apply after the projection."""
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    return softcap, scale


def token_nll(
    model: Any,
    input_ids: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    chunk_size: int = 1024,
    progress: bool | None = None,
) -> torch.Tensor:
    """Negative log-likelihood of every next token, without full-length logits.

    Args:
        model: a transformers causal LM.
        input_ids: ``[s]`` or ``[1, s]`` token ids.
        labels: ``[s]`` targets (``input_ids`` shifted inside; ``-100`` entries are skipped);
            default ``input_ids``.
        chunk_size: positions projected to the vocabulary at a time.
        progress: a bar in tokens that moves layer by layer (``None``: on a terminal only).

    Returns:
        ``[s - 1]`` float32 NLL of token ``t + 1`` given tokens ``0..t``; ``nan`` where the label
        is ``-100``.
    """
    ids = input_ids.reshape(1, -1)
    with TokenProgress(model, total=ids.shape[1], desc="forward", enabled=progress, extra_stages=1) as meter:
        return _token_nll(model, ids, labels, chunk_size, meter)


def _token_nll(
    model: Any, ids: torch.Tensor, labels: torch.Tensor | None, chunk_size: int, meter: TokenProgress
) -> torch.Tensor:
    """:func:`token_nll` of ``ids`` ``[1, s]`` as one task of ``meter``."""
    targets = (ids if labels is None else labels.reshape(1, -1))[0, 1:]
    decoder, head = _output_head(model)
    softcap, scale = _logit_transform(model)
    device = next(head.parameters()).device
    with torch.no_grad(), meter.task(ids.shape[1]):
        hidden = decoder(input_ids=ids.to(device), use_cache=False).last_hidden_state[0, :-1]
        out = torch.full((targets.numel(),), float("nan"), dtype=torch.float32)
        for start in range(0, targets.numel(), chunk_size):
            stop = min(start + chunk_size, targets.numel())
            target = targets[start:stop].to(device)
            keep = target != -100
            kept = int(keep.sum())
            if kept > 0:
                if kept == target.numel():  # no masked labels: no gather copies
                    states, keep_cpu = hidden[start:stop], None
                else:
                    states, target, keep_cpu = hidden[start:stop][keep], target[keep], keep.cpu()
                logits = head(states).float()
                if scale is not None:
                    logits = logits * scale
                if softcap is not None:
                    logits = torch.tanh(logits / softcap) * softcap
                losses = F.cross_entropy(logits, target, reduction="none").cpu()
                if keep_cpu is None:
                    out[start:stop] = losses
                else:
                    out[start:stop][keep_cpu] = losses
            meter.advance(stop - start)
    return out


def _documents(inputs: Any, tokenizer: Any | None) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 1:
            return [inputs]
        if inputs.dim() == 2:
            return list(inputs)
        raise ValueError(f"token ids must be [s] or [documents, s], got shape {tuple(inputs.shape)}")
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, Sequence) and inputs and all(isinstance(t, int) for t in inputs):
        inputs = [list(inputs)]  # one document given as a flat list of ids
    if not isinstance(inputs, Sequence) or not inputs:
        raise TypeError("perplexity() takes token ids (a tensor or lists of ints) or texts with tokenizer=")
    documents: list[torch.Tensor] = []
    for index, doc in enumerate(inputs):
        if isinstance(doc, str):
            if tokenizer is None:
                raise TypeError(f"document {index} is text: pass tokenizer= to tokenize it")
            # BOS as the tokenizer says: whatever it adds by default, once, at the document's start.
            documents.append(torch.tensor(tokenizer(doc).input_ids, dtype=torch.long))
        elif isinstance(doc, torch.Tensor):
            documents.append(doc.reshape(-1).long())
        else:
            documents.append(torch.tensor(list(doc), dtype=torch.long))
    return documents


def vocabulary_size(model: Any) -> int | None:
    """Rows of the model's input embedding (the ids it accepts), else ``config.vocab_size``."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if isinstance(rows, int):
        return rows
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def check_token_ids(model: Any, documents: Sequence[torch.Tensor]) -> None:
    """Every id must index the model's vocabulary (else a clear error, not torch's IndexError).

    Raises:
        ValueError: naming the document, the position, the id and the vocabulary size.
    """
    size = vocabulary_size(model)
    if size is None:
        return
    for index, document in enumerate(documents):
        bad = (document < 0) | (document >= size)
        if bool(bad.any()):
            position = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"document {index}: token id {int(document[position])} at position {position} is outside "
                f"the model's vocabulary of {size} ids (0 to {size - 1}); tokenize with the model's own "
                "tokenizer"
            )


def _is_dynamic(model: Any) -> bool:
    """Whether the model's table depends on the sequence length (then a pass per length)."""
    from .. import _compat
    from ..config import read_rope
    from ..patch import patch_info

    info = patch_info(model)
    if info is not None:
        return info.scaling.is_dynamic
    config = getattr(model, "config", None)
    if config is None:
        return False
    try:
        return read_rope(_compat.text_config(config)).is_dynamic()
    except (TypeError, ValueError):
        return False


#: The longest length an evaluation accepts: far beyond any model's context (the longest read
#: ~10M tokens); a 100M-token request is a typo, not days of work to start.
MAX_LENGTH = 1 << 24


def check_lengths(lengths: int | Sequence[int], *, minimum: int) -> list[int]:
    """``lengths`` as distinct whole numbers in ``[minimum, MAX_LENGTH]``, or a ValueError saying why."""
    values = [lengths] if isinstance(lengths, int) else list(lengths)
    if not values or any(isinstance(n, bool) or not isinstance(n, int) or n < minimum for n in values):
        raise ValueError(f"lengths must be whole numbers >= {minimum}, got {lengths!r}")
    if max(values) > MAX_LENGTH:
        raise ValueError(
            f"length {max(values)} is beyond {MAX_LENGTH} tokens, more than any model reads; lengths are in "
            "tokens, e.g. [4096, 8192]"
        )
    if len(set(values)) != len(values):
        raise ValueError(f"lengths must not repeat, got {values!r}")
    return values


def sliding_windows(total: int, length: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """Windows ``(begin, end, first_new)`` over ``total`` tokens; no target is scored twice.

    Window ``[begin, end)`` scores the targets ``first_new .. end - 1`` (predicted from the tokens
    before each); ``first_new`` is where the previous window's scoring stopped (1 for the first
    window: token 0 has no prediction). With ``stride < length`` every target ``1 .. total - 1``
    is scored exactly once; with ``stride == length`` (disjoint windows) the first token of each
    window has no context inside it and is not scored.
    """
    previous_end = 0
    begin = 0
    while True:
        end = min(begin + length, total)
        first_new = max(previous_end, begin + 1)
        if end > first_new:
            yield begin, end, first_new
        previous_end = end
        if end >= total:
            return
        begin += stride


def perplexity(
    model: Any,
    input_ids_or_docs: Any,
    *,
    lengths: Sequence[int],
    stride: int | None = None,
    tokenizer: Any | None = None,
    chunk_size: int = 1024,
    progress: bool | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` at each context length, the paper's evaluation.

    Args:
        model: a transformers causal LM (patched or not).
        input_ids_or_docs: token ids (``[s]``, ``[documents, s]``, or a list of id lists) or
            texts (with ``tokenizer``).
        lengths: context lengths in tokens.
        stride: ``None`` for truncate mode (each document's first ``length`` tokens); else the
            sliding-window stride, ``0 < stride <= length`` (below ``length``, every token after
            the first is scored exactly once; see :func:`sliding_windows`).
        tokenizer: tokenizes text documents (BOS as it adds by default).
        chunk_size: positions projected to the vocabulary at a time (memory/speed trade-off).
        progress: a bar in tokens that moves layer by layer inside each forward pass, with a
            rate and an ETA (``None``: on a terminal only; see :mod:`yarn_rope._progress`).

    Returns:
        :class:`PerplexityResult`.

    Raises:
        ValueError: no lengths, a length < 2, a bad stride, or (truncate mode) no document as
            long as a requested length.
        TypeError: inputs of the wrong kind.
    """
    lengths = check_lengths(lengths, minimum=2)
    if stride is not None and (isinstance(stride, bool) or not isinstance(stride, int) or stride < 1):
        raise ValueError(f"stride must be a positive whole number or None (truncate mode), got {stride!r}")
    if stride is not None and stride > min(lengths):
        raise ValueError(
            f"stride={stride} is longer than the shortest length {min(lengths)}: tokens would be skipped"
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive whole number, got {chunk_size!r}")
    documents = _documents(input_ids_or_docs, tokenizer)
    check_token_ids(model, documents)
    from ..patch import patch_info

    info = patch_info(model)
    scaling = None if info is None else info.scaling.to_dict()
    if stride is None:
        results = _truncate(model, documents, list(lengths), chunk_size, progress)
        return PerplexityResult(mode="truncate", stride=None, lengths=results, scaling=scaling)
    results = _sliding(model, documents, list(lengths), stride, chunk_size, progress)
    return PerplexityResult(mode="sliding", stride=stride, lengths=results, scaling=scaling)


def _length_result(length: int, docs: list[DocumentNLL]) -> LengthResult:
    tokens = sum(doc.tokens for doc in docs)
    nll = sum(doc.nll_sum for doc in docs) / tokens
    return LengthResult(
        length=length, nll=nll, perplexity=math.exp(nll), tokens=tokens, documents=tuple(docs)
    )


def _truncate(
    model: Any, documents: list[torch.Tensor], lengths: list[int], chunk_size: int, progress: bool | None
) -> tuple[LengthResult, ...]:
    dynamic = _is_dynamic(model)
    per_length: dict[int, list[DocumentNLL]] = {length: [] for length in lengths}
    plans: list[tuple[int, list[int]]] = []  # (document, lengths served by one pass each)
    for index, doc in enumerate(documents):
        usable = [length for length in lengths if doc.numel() >= length]
        if not usable:
            continue
        if dynamic:  # the table depends on the sequence length: one pass per length
            plans.extend((index, [length]) for length in usable)
        else:  # causal and static: the longest pass scores every shorter prefix
            plans.append((index, usable))
    total = sum(max(served) for _, served in plans)
    with TokenProgress(model, total=total, desc="perplexity", enabled=progress, extra_stages=1) as meter:
        for number, (index, served) in enumerate(plans, 1):
            longest = max(served)
            meter.set_postfix(f"pass {number}/{len(plans)}, {longest} tokens")
            nll = _token_nll(model, documents[index][:longest].reshape(1, -1), None, chunk_size, meter)
            for length in served:
                part = nll[: length - 1]
                per_length[length].append(DocumentNLL(index, float(part.double().sum()), part.numel()))
    missing = [length for length in lengths if not per_length[length]]
    if missing:
        longest_doc = max(doc.numel() for doc in documents)
        raise ValueError(
            f"no document has {min(missing)} tokens (the longest has {longest_doc}); truncate mode scores "
            "each document's first `length` tokens: pass longer documents or shorter lengths"
        )
    return tuple(_length_result(length, per_length[length]) for length in lengths)


def _sliding(
    model: Any,
    documents: list[torch.Tensor],
    lengths: list[int],
    stride: int,
    chunk_size: int,
    progress: bool | None,
) -> tuple[LengthResult, ...]:
    windows = {
        (length, index): list(sliding_windows(doc.numel(), length, stride))
        for length in lengths
        for index, doc in enumerate(documents)
    }
    total = sum(end - begin for spans in windows.values() for begin, end, _ in spans)
    count = sum(len(spans) for spans in windows.values())
    number = 0
    results = []
    with TokenProgress(model, total=total, desc="perplexity", enabled=progress, extra_stages=1) as meter:
        for length in lengths:
            docs = []
            for index, doc in enumerate(documents):
                nll_sum, tokens = 0.0, 0
                for begin, end, first_new in windows[(length, index)]:
                    labels = doc[begin:end].clone()
                    labels[: first_new - begin] = -100
                    number += 1
                    meter.set_postfix(f"window {number}/{count}, {end - begin} tokens")
                    nll = _token_nll(model, doc[begin:end].reshape(1, -1), labels, chunk_size, meter)
                    scored = nll[~torch.isnan(nll)]
                    nll_sum += float(scored.double().sum())
                    tokens += scored.numel()
                if tokens:
                    docs.append(DocumentNLL(index, nll_sum, tokens))
            if not docs:
                raise ValueError("no document has two tokens to score")
            results.append(_length_result(length, docs))
    return tuple(results)
