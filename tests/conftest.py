"""Shared test fixtures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def _save_byte_tokenizer(folder: Path) -> int:
    """A byte-level tokenizer (256 bytes + <s>/</s>, no merges) saved into ``folder``; its size."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<s>"], vocab["</s>"] = 256, 257
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return len(vocab)


@pytest.fixture(scope="session")
def save_byte_tokenizer() -> Callable[[Path], int]:
    """Saves a tiny offline tokenizer into a checkpoint folder (tests need no Hub)."""
    return _save_byte_tokenizer


@pytest.fixture
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings about the tiny configs and keys we build on purpose, and its progress
    bars, silenced for one test and restored after it. Test modules opt in with
    ``pytestmark = pytest.mark.usefixtures("quiet_transformers")``."""
    from transformers.utils import logging as tf_logging

    verbosity = tf_logging.get_verbosity()
    bars = tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    yield
    tf_logging.set_verbosity(verbosity)
    if bars:
        tf_logging.enable_progress_bar()
