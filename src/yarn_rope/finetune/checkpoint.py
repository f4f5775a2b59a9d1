"""A fine-tuning run's checkpoints and final model on disk: where they go, what makes one complete,
how a run resumes from one, and how a failed write is reported.

Layout, inside the run's output folder::

    OUTPUT/checkpoints/step_N/   accelerate's state (model, optimizer, every process's random state,
                                 and what the run registered: the schedule, the loop's state), then
                                 run.json, written last: step, recipe, data fingerprint, process
                                 count and the size of every file (a folder without it is incomplete)
    OUTPUT/.model.partial/       the final model while it is written; its files are then moved into
                                 OUTPUT one by one, config.json last

Before anything is loaded, :func:`check_output` checks the output folder and picks the checkpoint
to resume from (the newest complete one), and :func:`compare_run` checks that the resumed run trains
with the same recipe, data and process count. During the run, :class:`RunCheckpoints` saves and
restores checkpoints and writes the final model, turning a failed write into one ``OSError`` that
names the checkpoint that survives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._files import write_json
from .recipe import FinetuneRecipe

__all__ = ["CHECKPOINTS", "RUN_FILE", "RunCheckpoints", "check_output", "compare_run", "latest_checkpoint"]

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
RUN_FILE = "run.json"
# The final model is written here, inside OUTPUT, then its files are moved into OUTPUT (config.json last).
_PARTIAL_MODEL = ".model.partial"
_RUN_KEYS = frozenset({"step", "recipe", "data_fingerprint", "processes"})
_CHECKPOINT_PREFIX = "step_"


# ------------------------------------------------------------------------------------------------
# Before anything is loaded or written


def check_output(output: str | os.PathLike[str], resume: str | os.PathLike[str] | None) -> Path | None:
    """Check the output folder and the resume point; return the checkpoint to resume from.

    Args:
        output: where the run writes. It must not exist (or be empty) unless ``resume`` is given.
        resume: a checkpoint folder (``OUTPUT/checkpoints/step_N``) or a run's output folder
            (its latest checkpoint), or ``None``.

    Raises:
        FileExistsError: ``output`` exists, is not empty, and no ``resume`` was given.
        PermissionError: ``output`` cannot be written.
        FileNotFoundError: ``resume`` is neither a checkpoint nor a folder holding one.
        ValueError: every checkpoint there is incomplete (a truncated ``run.json`` or state file).
            An incomplete newest checkpoint with a complete older one resumes from the older one,
            with a warning.
    """
    target = Path(output)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"output {target} exists and is a file: choose a new folder")
    _check_writable(target)
    if resume is None:
        if target.is_dir() and any(target.iterdir()):
            raise FileExistsError(
                f"output folder {target} exists and is not empty: pass resume={str(target)!r} "
                "(--resume) to continue its run, or choose a new folder"
            )
        return None
    return _checkpoint_of(Path(resume))


def latest_checkpoint(folder: str | os.PathLike[str]) -> Path | None:
    """The newest ``checkpoints/step_N`` in a run's output folder (``None`` if there is none)."""
    found = _checkpoints(Path(folder))
    return found[0] if found else None


def compare_run(checkpoint: Path, recipe: FinetuneRecipe, fingerprint: str, processes: int) -> int:
    """The step ``checkpoint`` resumes at, after checking that the run it saved trained with
    ``recipe``, on the data of ``fingerprint``, on ``processes`` processes.

    Raises:
        ValueError: the recipe, the data or the process count differ (each named).
    """
    with open(checkpoint / RUN_FILE, encoding="utf-8") as handle:
        saved = json.load(handle)
    before = FinetuneRecipe.from_dict(saved["recipe"])
    differences = [
        f"{field.name}: {getattr(before, field.name)!r} -> {getattr(recipe, field.name)!r}"
        for field in dataclasses.fields(FinetuneRecipe)
        if getattr(before, field.name) != getattr(recipe, field.name)
    ]
    if differences:
        raise ValueError(
            f"cannot resume from {checkpoint}: the recipe differs ({'; '.join(differences)}); a resumed "
            "run must train with the recipe it started with"
        )
    if saved["data_fingerprint"] != fingerprint:
        raise ValueError(f"cannot resume from {checkpoint}: the training data differ from the run's data")
    if int(saved["processes"]) != processes:
        raise ValueError(
            f"cannot resume from {checkpoint}: it ran on {saved['processes']} processes, this run has "
            f"{processes}; launch the same number"
        )
    return int(saved["step"])


def _checkpoint_step(folder: Path) -> int:
    return int(folder.name.removeprefix(_CHECKPOINT_PREFIX))


def _checkpoints(folder: Path) -> list[Path]:
    """The checkpoints of a run folder that have their ``run.json``, newest first."""
    root = folder / CHECKPOINTS
    found = (
        [p for p in root.glob(f"{_CHECKPOINT_PREFIX}*") if (p / RUN_FILE).is_file()] if root.is_dir() else []
    )
    return sorted(found, key=_checkpoint_step, reverse=True)


def _check_writable(target: Path) -> None:
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise FileExistsError(f"output {target}: {existing} is a file, not a folder: choose another output")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".yarn-rope-write-test.", dir=existing))
    except OSError as error:
        raise PermissionError(
            f"cannot write {target}: {existing} is not writable ({error.strerror or error}): choose another "
            "output folder"
        ) from None


def _checkpoint_of(resume: Path) -> Path:
    """The checkpoint to resume from: ``resume`` itself or a run folder's newest, else the newest
    complete one before it (with a warning naming what is incomplete)."""
    if (resume / RUN_FILE).is_file():
        candidates = [resume]
        if resume.parent.name == CHECKPOINTS and resume.name.startswith(_CHECKPOINT_PREFIX):
            older = _checkpoints(resume.parent.parent)
            candidates += [p for p in older if _checkpoint_step(p) < _checkpoint_step(resume)]
    else:
        candidates = _checkpoints(resume)
        if not candidates:
            raise FileNotFoundError(
                f"resume {resume}: neither a checkpoint (no {RUN_FILE}) nor a run folder with one in "
                f"{CHECKPOINTS}/"
            )
    damaged: list[str] = []
    for candidate in candidates:
        problem = _checkpoint_problem(candidate)
        if problem is None:
            if damaged:
                logger.warning(
                    "%s: resuming from the previous complete checkpoint %s", "; ".join(damaged), candidate
                )
            return candidate
        damaged.append(f"checkpoint {candidate} is incomplete ({problem})")
    raise ValueError(
        f"cannot resume from {resume}: {'; '.join(damaged)}, and no earlier checkpoint is complete: start "
        "again in a new output folder"
    )


def _checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint (``None`` if it is): ``run.json`` unreadable, a
    file of another size than written, or a torch archive without its end (a truncated file)."""
    try:
        saved = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{RUN_FILE} cannot be read: {error}"
    if not isinstance(saved, dict) or not _RUN_KEYS <= saved.keys():
        return f"{RUN_FILE} lacks some of {sorted(_RUN_KEYS)}"
    for name, size in dict(saved.get("files") or {}).items():
        path = folder / name
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            return (
                f"{name} is missing"
                if actual is None
                else f"{name} holds {actual} bytes, {size} were written"
            )
    for path in sorted(folder.iterdir()):
        if path.suffix in (".bin", ".pkl", ".pt") and path.is_file() and not zipfile.is_zipfile(path):
            return f"{path.name} is truncated or damaged (not a whole torch archive)"
    return None


# ------------------------------------------------------------------------------------------------
# During the run


class RunCheckpoints:
    """The checkpoints and the final model of one run, written through its accelerator.

    Every process calls every method (they wait for one another); only the main process writes
    ``run.json``, deletes old checkpoints and moves the final model's files.

    Args:
        output: the run's output folder.
        accelerator: the ``accelerate.Accelerator`` the run trains with; what it registered for
            checkpointing (the schedule, the loop's state) is saved and restored with the model.
    """

    def __init__(self, output: Path, accelerator: Any) -> None:
        self.output = output
        self.accelerator = accelerator

    @property
    def partial_model(self) -> Path:
        """Where the final model is written before its files move into the output folder."""
        return self.output / _PARTIAL_MODEL

    def save(
        self, step: int, *, recipe: FinetuneRecipe, data_fingerprint: str, processes: int, keep: int
    ) -> Path:
        """Save ``checkpoints/step_N``: accelerate's state, then ``run.json`` last (with the size of
        every file, so a truncated one is found on resume); delete all but the newest ``keep``.

        Returns:
            the checkpoint folder.

        Raises:
            OSError: the write failed (see :meth:`writing`).
        """
        accelerator = self.accelerator
        folder = self.output / CHECKPOINTS / f"{_CHECKPOINT_PREFIX}{step:06d}"
        with self.writing(f"checkpoint {folder.name}", partial=folder):
            accelerator.save_state(str(folder))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                run = {
                    "step": step,
                    "recipe": recipe.to_dict(),
                    "data_fingerprint": data_fingerprint,
                    "processes": processes,
                    "files": {
                        p.relative_to(folder).as_posix(): p.stat().st_size
                        for p in folder.rglob("*")
                        if p.is_file()
                    },
                }
                write_json(folder / RUN_FILE, run)  # written last: a folder without it is incomplete
        if accelerator.is_main_process:
            for old in _checkpoints(self.output)[keep:]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return folder

    def load(self, checkpoint: Path) -> None:
        """Restore accelerate's state (model, optimizer, random states, registered objects).

        Raises:
            ValueError: the state cannot be restored (names the checkpoint and what to do).
        """
        try:
            self.accelerator.load_state(str(checkpoint))
        except (OSError, RuntimeError, EOFError, ValueError, KeyError) as error:
            raise ValueError(
                f"cannot restore checkpoint {checkpoint} ({type(error).__name__}: {_first_line(error)}): "
                "resume from an earlier checkpoint, or start again in a new output folder"
            ) from error

    def save_model(self, model: Any, *, state_dict: dict[str, Any] | None, tokenizer: Any | None) -> None:
        """Write the final model (and ``tokenizer``) into :attr:`partial_model`, then move its files
        into the output folder, ``config.json`` last. Call it inside :meth:`writing` with
        ``partial=self.partial_model``.

        Args:
            model: the unwrapped model (``save_pretrained``).
            state_dict: the full state dict (``accelerator.get_state_dict``; ``None``: the model's own).
            tokenizer: saved beside it, if given.
        """
        accelerator, partial = self.accelerator, self.partial_model
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving
        accelerator.wait_for_everyone()
        model.save_pretrained(
            partial,
            is_main_process=accelerator.is_main_process,
            save_function=accelerator.save,
            state_dict=state_dict,
        )
        if accelerator.is_main_process:
            if tokenizer is not None:
                tokenizer.save_pretrained(partial)
            _move_into(partial, self.output)

    @contextlib.contextmanager
    def writing(self, what: str, partial: Path | None = None) -> Iterator[None]:
        """A failed write (a full disk: ``torch.save`` raises ``RuntimeError``, not ``OSError``)
        becomes one ``OSError`` that says what survives; ``partial`` is removed."""
        try:
            yield
        except (OSError, RuntimeError) as error:
            if partial is not None and self.accelerator.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
            kept = _checkpoints(self.output)
            survives = (
                f"the last complete checkpoint {kept[0]} survives: rerun with --resume {self.output} "
                f"(resume={str(self.output)!r}) to continue exactly from step {_checkpoint_step(kept[0])}"
                if kept
                else "no checkpoint is complete yet: free some space and start again"
            )
            raise OSError(
                f"cannot write {what} in {self.output} ({type(error).__name__}: {_first_line(error)}; is the "
                f"disk full?); {survives}"
            ) from error


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _move_into(partial: Path, out: Path) -> None:
    """Move the files saved in ``partial`` into ``out``, ``config.json`` last (each move is atomic:
    a killed save leaves whole files, and no config.json until the weights are in place)."""
    for name in sorted(os.listdir(partial), key=lambda name: name == "config.json"):
        os.replace(partial / name, out / name)
    partial.rmdir()
