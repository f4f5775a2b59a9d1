"""Tests for ``yarn_rope._files``: whole-or-nothing output files with ``open()``'s permissions."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from yarn_rope import _files
from yarn_rope.eval.results import EvalRecord, write_records


@pytest.fixture(params=[0o022, 0o027, 0o077])
def umask(request) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_file_has_the_mode_open_gives(tmp_path, umask):
    reference = tmp_path / "by-open.txt"
    with open(reference, "w") as handle:
        handle.write("x")
    _files.write_text(tmp_path / "ours.txt", "x")
    assert mode(tmp_path / "ours.txt") == mode(reference) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["by-open.txt", "ours.txt"]


def test_replaces_whole_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    _files.write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_failure_keeps_the_target_and_removes_the_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="half way"), _files.atomic_path(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("half way")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_missing_folder_is_an_oserror_before_anything_is_written(tmp_path):
    with pytest.raises(FileNotFoundError):
        _files.write_text(tmp_path / "no" / "out.json", "x")
    assert list(tmp_path.iterdir()) == []


def test_result_records_are_readable_by_others(tmp_path, umask):
    """--json files (and every other output) used to be created 0600 by mkstemp."""
    record = EvalRecord(suite="passkey", task="passkey", metric="accuracy", value=1.0, length=4096)
    write_records([record], tmp_path / "r.json")
    assert mode(tmp_path / "r.json") == 0o666 & ~umask


def test_figures_take_the_format_their_suffix_names(tmp_path, umask):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure()
    try:
        _files.save_figure(figure, tmp_path / "plot.svg")
        _files.save_figure(figure, tmp_path / "plot.PNG")
    finally:
        plt.close(figure)
    assert b"<svg" in (tmp_path / "plot.svg").read_bytes()[:400]
    assert (tmp_path / "plot.PNG").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert mode(tmp_path / "plot.svg") == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.PNG", "plot.svg"]


def test_write_json_is_strict(tmp_path):
    """The one JSON writer: non-finite floats become strings, and nothing non-strict gets through."""
    target = tmp_path / "out.json"
    _files.write_json(target, {"a": [float("inf"), float("-inf"), float("nan"), 1.0], "b": (2.5,)})
    expected = {"a": ["inf", "-inf", "nan", 1.0], "b": [2.5]}
    assert target.read_text() == json.dumps(expected, indent=1) + "\n"
    back = _files.from_strict_json(json.loads(target.read_text()))
    assert back["a"][:2] == [float("inf"), float("-inf")] and back["a"][2] != back["a"][2]


def test_write_json_refuses_what_the_conversion_missed(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_text("old")
    monkeypatch.setattr(_files, "strict_json", lambda value: value)  # as if a float slipped past it
    with pytest.raises(ValueError, match="JSON compliant"):
        _files.write_json(target, {"nll": float("inf")})
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
