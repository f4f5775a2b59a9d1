"""Dynamic scaling that stays consistent with a KV cache.

With dynamic scaling the table changes as the sequence grows, but keys already in the cache were
rotated with the old one: every public implementation (transformers' dynamic NTK, the YaRN
authors' code) then attends new queries at new frequencies to keys at stale ones. A key rotated
at angle ``a * p`` with amplitude ``m_a`` becomes the key at angle ``b * p`` with amplitude
``m_b`` by one more rotation by ``(b - a) * p`` and a scale of ``m_b / m_a``. This module does
that, from a forward pre-hook on the decoder, before attention runs:

* the cache then equals one that stores keys *before* RoPE and rotates all of them with the
  current frequencies (the paper's recommendation, section 3.3);
* it is **not** equal to recomputing the whole prefix in a model of two or more layers: deeper
  layers' keys and values came from hidden states that attended under the old table;
* each re-rotation of a float16/bfloat16 cache rounds once more, so the table should change a
  handful of times, not at every step: see ``growth`` in :class:`~yarn_rope.rotary.RotaryEmbedding`
  (the ``schedule`` of :func:`yarn_rope.patch`).

Batches take one table for the whole batch, from the largest position in it (as transformers
does); left padding is read from ``position_ids`` / the attention mask, not from a running
offset. Supported caches: transformers' ``DynamicCache`` and ``StaticCache`` (their layers'
``keys`` tensors), including after beam-search reordering and cropping. Quantized and offloaded
cache layers, whose keys cannot be rotated in place, raise :class:`UnsupportedCacheError` when a
re-rotation would be needed, rather than silently attending to stale keys.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from . import _compat
from .rotary import RotaryEmbedding, reduced_angles, rotate_half

__all__ = ["KeyCacheSync", "UnsupportedCacheError", "rerotate_keys"]


_Table = tuple[object, torch.Tensor, float]  # (table key, inv_freq, attention scaling)


class UnsupportedCacheError(TypeError):
    """A cache whose keys yarn_rope cannot bring to new frequencies."""


def rerotate_keys(
    keys: torch.Tensor,
    positions: torch.Tensor,
    *,
    old_inv_freq: torch.Tensor,
    old_scale: float,
    new_inv_freq: torch.Tensor,
    new_scale: float,
) -> None:
    """Bring keys rotated with one table to another, in place (half-rotation layout).

    Args:
        keys: ``[b, n_kv, s, h_d]`` cached keys; the first ``2 * len(inv_freq)`` channels are
            rotated (partial rotary leaves the rest alone).
        positions: ``[b, s]`` the position each cached key was rotated at.
        old_inv_freq, old_scale: the table and attention scaling the keys carry.
        new_inv_freq, new_scale: the table and attention scaling to bring them to.

    The extra angle ``p * (new - old)`` is formed in float64 and reduced modulo 2 pi; the
    rotation runs in float32 and the result is rounded once to the keys' dtype.
    """
    rot = 2 * old_inv_freq.shape[-1]
    device = keys.device
    delta = new_inv_freq.to(device=device, dtype=torch.float64) - old_inv_freq.to(
        device=device, dtype=torch.float64
    )
    half = reduced_angles(positions.to(device), delta)  # [b, s, rot/2]
    angles = torch.cat((half, half), dim=-1)[:, None]  # [b, 1, s, rot]
    ratio = new_scale / old_scale
    part = keys[..., :rot].float()
    rotated = (part * angles.cos() + rotate_half(part) * angles.sin()) * ratio
    keys[..., :rot] = rotated.to(keys.dtype)


class KeyCacheSync:
    """Forward pre-hook for the decoder: switch the dynamic table, and re-rotate the cache with it.

    Args:
        rotaries: the inserted rotary modules that share the dynamic table (one per model on
            transformers 5, also one per attention layer on 4.x).
        layers: indices of the cache layers whose keys use that table (``None``: all).
    """

    def __init__(self, rotaries: Sequence[RotaryEmbedding], layers: Sequence[int] | None = None) -> None:
        if not rotaries:
            raise ValueError("KeyCacheSync needs at least one rotary module")
        self.rotaries = list(rotaries)
        self.layers = None if layers is None else list(layers)
        self.rerotations = 0  # how many times a cache was brought to a new table (for tests, logs)
        # The table each live cache's keys carry. Kept per cache, not read off the rotary module:
        # a forward at another length (an uncached pass, another conversation) changes the module.
        self._carried: weakref.WeakKeyDictionary[Any, _Table] = weakref.WeakKeyDictionary()

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("past_key_values")
        new_tokens = _new_tokens(args, kwargs)
        past = _compat.cache_length(cache)
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            cache_position = kwargs.get("cache_position")
            if cache_position is not None:
                position_ids = cache_position[None]
            else:
                position_ids = torch.arange(past, past + new_tokens)[None]
        seq_len = int(position_ids.max()) + 1
        leader = self.rotaries[0]
        for rotary in self.rotaries:
            rotary.set_length(seq_len)
        if cache is None:
            return
        current = (leader.table_key, leader.inv_freq, leader.attention_scaling)
        try:
            carried = self._carried.get(cache)
        except TypeError:  # a cache object that cannot be weakly referenced
            carried = None
        if carried is None and past > 0:
            # Keys cached before this hook saw the cache: the table of one pass over all of them.
            carried = leader.table_for(past)
        if past > 0 and carried is not None and carried[0] != current[0]:
            positions = _cached_positions(kwargs.get("attention_mask"), past, new_tokens, position_ids)
            self._rerotate(cache, past, positions, carried, current)
            self.rerotations += 1
        with contextlib.suppress(TypeError):
            self._carried[cache] = (current[0], current[1].clone(), current[2])

    def _rerotate(self, cache: Any, past: int, positions: torch.Tensor, old: _Table, new: _Table) -> None:
        """Bring every scaled layer's cached keys from table ``old`` to table ``new``."""
        layers = _compat.cache_layer_keys(cache)
        if layers is None:
            raise UnsupportedCacheError(
                f"{type(cache).__name__} exposes no per-layer keys; dynamic scaling with yarn_rope needs a "
                "transformers DynamicCache or StaticCache"
            )
        indices = range(len(layers)) if self.layers is None else self.layers
        for index in indices:
            name, keys = layers[index]
            if keys is None:
                raise UnsupportedCacheError(
                    f"cache layer {index} ({name}) cannot be re-rotated in place; use a DynamicCache or "
                    "StaticCache with dynamic scaling, or a static method"
                )
            if keys.numel() == 0:
                continue
            slots = keys.shape[-2]
            if slots >= past:  # dynamic (exactly past) or static (preallocated) layer
                view, where = keys[..., :past, :], positions
            else:  # a sliding-window layer keeps the last `slots` positions
                view, where = keys[..., -slots:, :], positions[:, -slots:]
            if where.shape[0] != view.shape[0]:
                where = where.expand(view.shape[0], -1)
            rerotate_keys(  # in place: `view` is a slice of the cache's own tensor
                view,
                where,
                old_inv_freq=old[1],
                old_scale=old[2],
                new_inv_freq=new[1],
                new_scale=new[2],
            )


def _new_tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    for name in ("input_ids", "inputs_embeds"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            return int(value.shape[1])
    if args and isinstance(args[0], torch.Tensor):
        return int(args[0].shape[1])
    raise UnsupportedCacheError("could not tell how many new tokens this forward call carries")


def _cached_positions(
    attention_mask: Any, past: int, new_tokens: int, position_ids: torch.Tensor
) -> torch.Tensor:
    """``[b, past]``: the position each cached key was rotated at.

    Read from a 2-D attention mask over ``past + new`` tokens (generate's left padding: position =
    number of real tokens before, as transformers computes it); else the cache holds positions
    that end just before the new tokens' first position.
    """
    if (
        isinstance(attention_mask, torch.Tensor)
        and attention_mask.dim() == 2
        and attention_mask.shape[-1] >= past + new_tokens
    ):
        mask = attention_mask[:, : past + new_tokens].long()
        return (mask.cumsum(-1) - 1).clamp(min=0)[:, :past]
    first = position_ids[:, :1].long()
    return first - past + torch.arange(past, device=position_ids.device)[None]
