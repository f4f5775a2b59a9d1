"""Issue 24's rows for records, reports, the model cache and lm-eval that sit between modules.

Each test here failed before its fix: every JSON file the library writes is strict JSON, and
``yarn-rope report`` names the file it cannot read.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from yarn_rope.cli import _common as common
from yarn_rope.finetune import trainer

INF = float("inf")


def strict(path: Path) -> object:
    def refuse(literal: str) -> None:
        raise AssertionError(f"{path.name}: non-strict JSON literal {literal}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


@pytest.mark.parametrize("writer", [common.write_data, trainer._write_json], ids=["cli --json", "finetune"])
def test_every_json_writer_is_strict(tmp_path, writer):
    """``--json`` of export / inspect / frequencies and the fine-tune log go through the one writer."""
    target = tmp_path / "out.json"
    writer(target, {"loss": [2.5, float("nan")], "ratio": INF, "low": -INF})
    assert strict(target) == {"loss": [2.5, "nan"], "ratio": "inf", "low": "-inf"}
