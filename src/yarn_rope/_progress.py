"""One progress convention for every long loop in yarn_rope.

Every function that runs for more than a few seconds takes ``progress: bool | None = None`` and
opens its bar with :func:`progress_bar`:

* ``None`` (the default): a bar on standard error when it is a terminal, nothing otherwise
  (logs, CI, pipes stay clean);
* ``True``: always a bar, terminal or not (``--progress`` on the command line);
* ``False``: never (``--no-progress``).

Bars count real units of work (tokens, layers, trials, steps, bytes) so that they move during
long passes and show a rate and an ETA, never a single ``0/1 pass`` that jumps at the end.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["TokenProgress", "decoder_layers", "progress_bar", "transformers_bars"]


def progress_bar(
    total: float | None,
    *,
    desc: str,
    unit: str = "it",
    enabled: bool | None = None,
    unit_scale: bool = False,
) -> Any:
    """A tqdm bar that follows the convention above; use it as a context manager.

    Args:
        total: units of work in all (``None`` if unknown).
        desc: what is being done, e.g. ``"perplexity"``.
        unit: the unit counted (``"token"``, ``"layer"``, ``"trial"``, ``"step"``, ``"B"``).
        enabled: ``None`` (on a terminal only), ``True`` (always) or ``False`` (never).
        unit_scale: print large counts with SI prefixes (tokens, bytes).

    Returns:
        a ``tqdm`` instance (disabled bars accept the same calls and print nothing).
    """
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"progress must be True, False or None (on a terminal only), got {enabled!r}")
    from tqdm.auto import tqdm

    # tqdm's disable=None turns the bar off when its stream is not a terminal.
    disable = None if enabled is None else not enabled
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        disable=disable,
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layers of a transformers model, in order (``[]`` if none are recognised).

    The layer stack is the first ``nn.ModuleList`` as long as the config's ``num_hidden_layers``
    (``model.model.layers`` for Llama, ``transformer.h`` for GPT-2, ...).
    """
    import torch

    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int) or count < 1 or not isinstance(model, torch.nn.Module):
        return []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return list(module)
    return []


class TokenProgress:
    """A bar in tokens that moves inside each forward pass, layer by layer; a context manager.

    Work comes in *tasks* (one forward pass, one ``generate`` call), each with a known number of
    tokens. A task's tokens count once per stage: every decoder layer is a stage (a forward hook
    on each layer advances the bar by the tokens it just processed), and ``extra_stages`` more
    are advanced by hand with :meth:`advance` (perplexity's vocabulary projection, chunk by
    chunk). The bar shows tokens (a task's share of each stage), so its rate is tokens per second
    of whole-model work and its ETA holds across tasks of different lengths. When a task ends
    the bar is set to exactly its share (a ``generate`` that stopped early, a model whose layers
    were not recognised), and the hooks are removed on exit, on error too. A disabled bar
    registers no hooks.

    Args:
        model: the model whose decoder layers are counted.
        total: tokens of all tasks together.
        desc: the bar's description.
        enabled: ``None`` (on a terminal only), ``True`` or ``False``.
        extra_stages: stages per task besides the decoder layers.
    """

    def __init__(
        self, model: Any, *, total: int, desc: str, enabled: bool | None = None, extra_stages: int = 0
    ) -> None:
        self._bar = progress_bar(total, desc=desc, unit="token", enabled=enabled, unit_scale=True)
        self._layers = decoder_layers(model) if not self._bar.disable else []
        self._stages = max(1, len(self._layers) + extra_stages)
        self._handles: list[Any] = []
        self._task_left = 0.0

    @property
    def enabled(self) -> bool:
        return not self._bar.disable

    def __enter__(self) -> TokenProgress:
        try:
            for layer in self._layers:
                self._handles.append(layer.register_forward_hook(self._layer_done, with_kwargs=True))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._bar.close()

    def _layer_done(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        shape = getattr(hidden, "shape", None)
        if shape is not None and len(shape) >= 2:
            self.advance(int(shape[-2]))

    def advance(self, tokens: int) -> None:
        """``tokens`` went through one stage of the current task."""
        step = min(tokens / self._stages, self._task_left)
        if step > 0:
            self._task_left -= step
            self._bar.update(step)

    def set_postfix(self, text: str) -> None:
        self._bar.set_postfix_str(text, refresh=False)

    @contextlib.contextmanager
    def task(self, tokens: int) -> Iterator[None]:
        """One unit of work of ``tokens`` tokens; on a clean exit the bar holds its full share."""
        self._task_left = float(tokens)
        yield
        if self._task_left > 0:
            self._bar.update(self._task_left)
        self._task_left = 0.0


@contextlib.contextmanager
def transformers_bars(enabled: bool | None = None) -> Iterator[None]:
    """transformers' own loading bars (checkpoint shards, GGUF de-quantisation) follow the convention.

    transformers draws them whenever its global flag is on, terminal or not, and its GGUF loader
    draws one unconditionally (``transformers/modeling_gguf_pytorch_utils.py``, a module-level
    ``tqdm``; checked on transformers 5.23.0 and 4.57.6). Inside this context both follow
    ``enabled`` (``None``: only when standard error is a terminal); the flag and the loader's
    ``tqdm`` are restored afterwards.
    """
    import importlib

    from transformers.utils import logging as hf_logging

    show = sys.stderr.isatty() if enabled is None else bool(enabled)
    was_enabled = hf_logging.is_progress_bar_enabled()
    if show:
        hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    else:
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        gguf_utils: Any = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:  # an older transformers without GGUF support: nothing more to quieten
        gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:

        def following(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("disable", not show)
            return original(*args, **kwargs)

        gguf_utils.tqdm = following
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
        else:
            hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
