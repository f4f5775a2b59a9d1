"""The training loss without the full logits: the LM head and cross-entropy in slices of positions.

``model(ids, labels=ids).loss`` builds the ``[batch, seq, vocab]`` logits, upcasts them to float32
and runs cross-entropy: about three float32 ``[seq, vocab]`` tensors alive at once, 0.2 MB per token
each for a 49,152-token vocabulary (SmolLM2), so about 10 GB at 16k tokens before any activation.
Here the model runs with ``logits_to_keep`` set to no position (transformers 5: the head projects
nothing), a forward hook on the decoder keeps its last hidden state ``[b, s, h]``, and the loss is
summed over slices of ``chunk_size`` positions: each slice's logits are computed, upcast, reduced
to a sum and freed. Each slice runs under non-reentrant activation checkpointing, so the backward
pass recomputes one slice's logits at a time instead of keeping every slice's alive (the same
trade as Liger's and Apple's cut-cross-entropy kernels, which avoid even one slice's float32
logits on GPUs; see ``benchmarks/gpu_finetune.py``).

The result is transformers' ``ForCausalLMLoss`` (labels shifted left by one, ``-100`` ignored,
mean over the counted positions) up to float32 summation order. The model is called through
whatever wraps it (DDP, peft, accelerate), so hooks those wrappers rely on run as usual.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

__all__ = [
    "IGNORE_INDEX",
    "causal_lm_loss",
    "chunked_cross_entropy",
    "shift_labels",
    "supports_chunked_loss",
]

logger = logging.getLogger(__name__)

#: Label value not counted in the loss (transformers' and torch's default).
IGNORE_INDEX = -100
# Config keys of models whose logits are not the head's plain output (a soft cap, a scale): their
# loss goes through the model's own path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor,
    *,
    chunk_size: int = 1024,
    shifted: bool = False,
) -> torch.Tensor:
    """Next-token cross-entropy of ``head(hidden)`` against ``labels``, ``chunk_size`` positions at a time.

    Args:
        hidden: the decoder's last hidden state, ``[b, s, h]`` (``b`` batch, ``s`` positions,
            ``h`` hidden size).
        head: the output projection (``model.get_output_embeddings()``), ``h -> vocab``.
        labels: ``[b, s]`` token ids, not shifted (position ``i`` is scored against ``labels[:, i + 1]``),
            ``-100`` where not counted.
        chunk_size: positions whose logits exist at once (over the flattened ``b x s``).
        shifted: ``labels`` are already the next tokens (position ``i`` scored against
            ``labels[:, i]``: transformers' ``shift_labels``, what context parallelism needs, since
            a shard's last position is scored against the next shard's first token).

    Returns:
        the mean loss over counted positions, a float32 scalar (NaN when none counts, as transformers).

    Raises:
        ValueError: ``chunk_size`` below 1, or shapes that do not match.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} differ in [b, s]")
    if not shifted:
        labels = shift_labels(labels)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.to(hidden.device).reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_labels.numel(), chunk_size):
        rows = slice(start, start + chunk_size)
        total = total + checkpoint(
            _slice_loss,
            flat_hidden[rows],
            flat_labels[rows],
            head,
            use_reentrant=False,
            preserve_rng_state=False,
        )
    return total / (flat_labels != IGNORE_INDEX).sum()


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` labels -> the token each position predicts (``-100`` after the last), as transformers."""
    return torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].contiguous()


def _slice_loss(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    logits = head(hidden).float()
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def _unwrapped(model: Any) -> Any:
    """The transformers model inside DDP / accelerate / peft wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def supports_chunked_loss(model: Any) -> bool:
    """Whether :func:`causal_lm_loss` can slice ``model``'s loss: its forward takes ``logits_to_keep``,
    it has a decoder and an output head, and its logits are the head's plain output."""
    inner = _unwrapped(model)
    try:
        decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    except (AttributeError, ValueError, NotImplementedError):
        return False
    config = getattr(inner, "config", None)
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in _LOGIT_TRANSFORMS):
        return False
    accepts = "logits_to_keep" in inspect.signature(inner.forward).parameters
    return accepts and isinstance(decoder, torch.nn.Module) and isinstance(head, torch.nn.Module)


@contextlib.contextmanager
def _last_hidden_state(decoder: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    kept: list[torch.Tensor] = []

    def keep(_module: Any, _args: Any, output: Any) -> None:
        kept.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = decoder.register_forward_hook(keep)
    try:
        yield kept
    finally:
        handle.remove()


def causal_lm_loss(model: Any, batch: Mapping[str, torch.Tensor], *, chunk_size: int = 1024) -> torch.Tensor:
    """The causal-LM loss of ``batch`` (``input_ids``, ``labels`` or already shifted ``shift_labels``,
    optionally ``position_ids`` and ``attention_mask``) without building the full logits.

    ``chunk_size=0``, or a model :func:`supports_chunked_loss` refuses, takes the model's own path,
    ``model(**batch).loss``.

    Args:
        model: a transformers causal LM, possibly wrapped (DDP, peft); called through the wrapper.
        batch: the model's keyword arguments, with ``labels`` ``[b, s]``.
        chunk_size: positions whose logits exist at once; 0: the full logits.

    Returns:
        the mean loss over the counted positions (a scalar).
    """
    if chunk_size == 0 or not supports_chunked_loss(model):
        if chunk_size:
            logger.warning("%s: the loss goes through the full logits", type(_unwrapped(model)).__name__)
        if "shift_labels" in batch:  # transformers scores shift_labels, but only when labels are given
            batch = {"labels": batch["shift_labels"], **batch}
        return model(**batch).loss  # type: ignore[no-any-return]
    inner = _unwrapped(model)
    inputs = {name: value for name, value in batch.items() if name not in ("labels", "shift_labels")}
    nothing = torch.zeros(0, dtype=torch.long, device=batch["input_ids"].device)
    with _last_hidden_state(inner.get_decoder()) as kept:
        model(**inputs, logits_to_keep=nothing)
    shifted = "shift_labels" in batch
    labels = batch["shift_labels"] if shifted else batch["labels"]
    head = inner.get_output_embeddings()
    return chunked_cross_entropy(kept[-1], head, labels, chunk_size=chunk_size, shifted=shifted)
