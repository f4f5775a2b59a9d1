"""The training loop: the recipe on accelerate, one CPU process to many GPUs, resumable exactly.

See :mod:`yarn_rope.finetune` for why the loop is a plain accelerate loop. What it guarantees:

* **Same trajectory for any process count.** The data order is fixed before the processes split
  it (a seeded permutation of the packed sequences; accelerate then deals micro-batch ``i`` to
  process ``i mod P``), so an optimizer step sees the same global batch of sequences whether one
  process accumulates ``2k`` micro-batches or two accumulate ``k`` each. The logged loss is the
  mean over the global batch (every sequence has ``seq_len - 1`` targets, so the mean of
  micro-batch means is the token mean), reduced over the processes. The learning-rate schedule
  (transformers' ``get_linear_schedule_with_warmup`` / ``get_constant_schedule_with_warmup``, as
  the reference) is stepped once per optimizer step by this loop. It is deliberately not given to
  ``accelerator.prepare``: a prepared scheduler advances ``num_processes`` times per optimizer step
  (accelerate 1.15, ``AcceleratedScheduler.step`` with ``split_batches=False``), so the schedule
  would depend on the process count.
* **Exact resumption.** ``accelerator.save_state`` stores the model, optimizer, every process's
  random state, the scheduler and the loop's own state (step, loss log, evaluations); the data
  loader restarts at the first sequence of the next step. A resumed run logs the same losses as an
  uninterrupted one (tested: bit-equal on the CPU).
* **Checks before any step.** A bad recipe, an output folder that exists without ``resume``, a
  sequence length beyond the scaled context, too little data, a resume whose recipe or data differ:
  all raise before the first forward pass, and before anything is written.

Output folder::

    OUTPUT/config.json, model.safetensors, tokenizer files   the fine-tuned model (save_pretrained;
                                                             config.json records the scaling)
    OUTPUT/finetune.json        recipe, data, scaling, loss log and evaluations (rewritten every step)
    OUTPUT/loss.png             loss and perplexity by step (with plot=True)
    OUTPUT/checkpoints/step_N/  accelerate state + run.json (resume from here or from OUTPUT)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import _compat
from .._files import write_json
from .._progress import progress_bar
from ..config import RopeScaling
from .data import PackedData, PackedSequences, prepare_data
from .recipe import FinetuneRecipe

__all__ = [
    "FinetuneResult",
    "StepPerplexity",
    "StepRecord",
    "check_launch",
    "check_output",
    "finetune",
    "latest_checkpoint",
    "make_accelerator",
    "original_context",
]

logger = logging.getLogger(__name__)

LOG_FILE = "finetune.json"
PLOT_FILE = "loss.png"
CHECKPOINTS = "checkpoints"
RUN_FILE = "run.json"
_PLOT_EXTRA = "pip install 'yarn-rope[plot]'"
_FINETUNE_EXTRA = "pip install 'yarn-rope[finetune]'"
# Recipe fields that may differ on resume (none: every field shapes the trajectory).
_CHECKPOINT_PREFIX = "step_"


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One optimizer step.

    Attributes:
        step: 1-based optimizer step.
        loss: mean next-token loss (nats) over the step's global batch, all processes.
        learning_rate: the learning rate the step used.
        grad_norm: global gradient norm before clipping (``None`` where the engine does not report
            it: DeepSpeed clips inside).
        tokens: tokens trained on so far (all processes).
        seconds: wall time of the step.
    """

    step: int
    loss: float
    learning_rate: float
    grad_norm: float | None
    tokens: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class StepPerplexity:
    """Perplexity on the evaluation tokens after ``step`` optimizer steps (0: before training)."""

    step: int
    perplexity: dict[int, float]
    nll: dict[int, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "perplexity": {str(k): v for k, v in self.perplexity.items()},
            "nll": {str(k): v for k, v in self.nll.items()},
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StepPerplexity:
        return cls(
            step=int(values["step"]),
            perplexity={int(k): float(v) for k, v in values["perplexity"].items()},
            nll={int(k): float(v) for k, v in values["nll"].items()},
        )


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
    """What a fine-tuning run did.

    Attributes:
        output: the output folder (the model, ``finetune.json``, checkpoints).
        recipe: the resolved recipe (original and sequence length filled in).
        scaling: the scaling trained through (``RopeScaling.to_dict()``; ``None`` for ``none``).
        processes: data-parallel processes.
        log: one record per optimizer step (the restored ones too, after a resume).
        evals: perplexity records, by step.
        data: what the packing did (:meth:`PackedData.to_dict`).
        resumed_from: the step the run resumed from, else ``None``.
        seconds: wall time of this call.
        model: the trained model (LoRA merged into it), in eval mode; not in :meth:`to_dict`.
    """

    output: str
    recipe: FinetuneRecipe
    scaling: dict[str, Any] | None
    processes: int
    log: tuple[StepRecord, ...]
    evals: tuple[StepPerplexity, ...]
    data: dict[str, Any]
    resumed_from: int | None
    seconds: float
    model: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def losses(self) -> list[float]:
        return [record.loss for record in self.log]

    def records(self, *, model: str = "") -> list[Any]:
        """The periodic perplexities as the evaluations' one result format
        (:class:`~yarn_rope.eval.results.EvalRecord`, suite ``"perplexity"``, task ``"finetune"``,
        the step in ``details``), for ``yarn-rope report``."""
        from ..eval.results import EvalRecord, label_for

        method = str(self.scaling["method"]) if self.scaling else "none"
        return [
            EvalRecord(
                suite="perplexity",
                task="finetune",
                metric="perplexity",
                value=value,
                model=model,
                method=method,
                label=f"{label_for(self.scaling)} step {check.step}",
                settings=self.scaling,
                length=length,
                details={"step": check.step, "nll": check.nll[length]},
            )
            for check in self.evals
            for length, value in sorted(check.perplexity.items())
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "recipe": self.recipe.to_dict(),
            "scaling": self.scaling,
            "processes": self.processes,
            "data": self.data,
            "resumed_from": self.resumed_from,
            "seconds": self.seconds,
            "log": [record.to_dict() for record in self.log],
            "evals": [record.to_dict() for record in self.evals],
        }


class _LoopState:
    """The loop's own state, saved with every checkpoint (``accelerator.register_for_checkpointing``)."""

    def __init__(self) -> None:
        self.step = 0
        self.log: list[StepRecord] = []
        self.evals: list[StepPerplexity] = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "log": [record.to_dict() for record in self.log],
            "evals": [record.to_dict() for record in self.evals],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.log = [StepRecord(**record) for record in state["log"]]
        self.evals = [StepPerplexity.from_dict(record) for record in state["evals"]]


# ------------------------------------------------------------------------------------------------
# Checks that run before anything is loaded or written


def check_output(output: str | os.PathLike[str], resume: str | os.PathLike[str] | None) -> Path | None:
    """Check the output folder and the resume point; return the checkpoint to resume from.

    Args:
        output: where the run writes. It must not exist (or be empty) unless ``resume`` is given.
        resume: a checkpoint folder (``OUTPUT/checkpoints/step_N``) or a run's output folder
            (its latest checkpoint), or ``None``.

    Raises:
        FileExistsError: ``output`` exists, is not empty, and no ``resume`` was given.
        FileNotFoundError: ``resume`` is neither a checkpoint nor a folder holding one.
    """
    target = Path(output)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"output {target} exists and is a file: choose a new folder")
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
    root = Path(folder) / CHECKPOINTS
    found = (
        [p for p in root.glob(f"{_CHECKPOINT_PREFIX}*") if (p / RUN_FILE).is_file()] if root.is_dir() else []
    )
    return max(found, key=lambda p: int(p.name.removeprefix(_CHECKPOINT_PREFIX)), default=None)


def _checkpoint_of(resume: Path) -> Path:
    if (resume / RUN_FILE).is_file():
        return resume
    latest = latest_checkpoint(resume)
    if latest is None:
        raise FileNotFoundError(
            f"resume {resume}: neither a checkpoint (no {RUN_FILE}) nor a run folder with one in "
            f"{CHECKPOINTS}/"
        )
    return latest


def make_accelerator(recipe: FinetuneRecipe) -> Any:
    """The ``accelerate.Accelerator`` for ``recipe`` (gradient accumulation, mixed precision), checked
    with :func:`check_launch`.

    Create it before loading a model that DeepSpeed ZeRO-3 should partition as it loads (the
    accelerate DeepSpeed plugin tells transformers' ``from_pretrained`` to load under
    ``deepspeed.zero.Init``, as in the reference, which created its Accelerator first).
    """
    from accelerate import Accelerator

    accelerator = Accelerator(
        gradient_accumulation_steps=recipe.gradient_accumulation,
        mixed_precision=_mixed_precision(recipe.mixed_precision),
    )
    check_launch(accelerator)
    return accelerator


def check_launch(state: Any) -> None:
    """Refuse a launch that accelerate would silently run as something else.

    * On a machine without GPUs, ``accelerate launch`` with several processes (torchrun) starts
      them, but accelerate joins them into one gloo group only when ``ACCELERATE_USE_CPU`` is set;
      otherwise each would train alone, and all would write the same output folder.
    * accelerate (1.15) turns an FSDP or DeepSpeed launch into FSDP/DeepSpeed only on GPUs and
      similar accelerators; on the CPU (``ACCELERATE_USE_CPU``) the same launch runs plain data
      parallel, every process holding the whole model.

    Args:
        state: an ``accelerate.PartialState`` or ``Accelerator`` (``num_processes``,
            ``distributed_type``).

    Raises:
        ValueError: either case above.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and state.num_processes == 1:
        raise ValueError(
            f"launched as {world} processes, but accelerate sees each as a single process: on a machine "
            "without GPUs, set ACCELERATE_USE_CPU=true for the launch (accelerate then joins them with gloo)"
        )
    requested = [
        name
        for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
        if os.environ.get(variable, "false").lower() in ("1", "true", "yes")
    ]
    if requested and str(state.distributed_type).rsplit(".", 1)[-1] == "MULTI_CPU":
        raise ValueError(
            f"the launch asks for {requested[0]}, but accelerate runs {requested[0]} only on GPUs (and "
            "similar accelerators): on the CPU it would silently be plain data parallel; launch CPU runs "
            "with "
            "examples/accelerate/cpu_2proc.yaml"
        )


def original_context(model_or_config: Any) -> int:
    """The context a model was pretrained with: the original length its scaling declares (patched
    or loaded by :func:`yarn_rope.from_pretrained`), else ``max_position_embeddings / factor`` of a
    scaled config that does not state it (transformers' ``linear``), else
    ``config.max_position_embeddings``."""
    config = getattr(model_or_config, "config", model_or_config)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    declared = RopeScaling.from_hf(config)
    if declared.original_max_position_embeddings is not None:
        return int(declared.original_max_position_embeddings)
    if declared.method != "none" and declared.factor and declared.max_position_embeddings:
        # transformers' linear scaling records only the factor: the context was extended from max / factor.
        return round(declared.max_position_embeddings / declared.factor)
    value = getattr(config, "max_position_embeddings", None)
    if not isinstance(value, int) or value < 2:
        raise ValueError(
            "the model declares no context length (max_position_embeddings): pass "
            "original_max_position_embeddings in the recipe"
        )
    return value


def _compare_run(checkpoint: Path, recipe: FinetuneRecipe, fingerprint: str, processes: int) -> int:
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


# ------------------------------------------------------------------------------------------------
# The run


def _mixed_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _data_order(count: int, needed: int, seed: int) -> list[int]:
    """``needed`` sequence indices: seeded permutations of ``range(count)``, one per epoch."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < needed:
        order.extend(torch.randperm(count, generator=generator).tolist())
    return order[:needed]


def _drop_unpacked_gguf_marker(model: Any) -> None:
    """Training GGUF weights unpacked to float is ordinary training: drop the stale GGUF marker."""
    if _compat.drop_unpacked_gguf_marker(model):
        logger.info("the GGUF weights were unpacked to float at load: training them as plain weights")


def _add_lora(model: Any, recipe: FinetuneRecipe) -> Any:
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise ImportError(f"LoRA needs peft: {_FINETUNE_EXTRA}")
    from peft import LoraConfig, TaskType, get_peft_model

    head = model.get_output_embeddings()
    targets = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head
        }
    )
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=recipe.lora_rank,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=targets,
    )
    peft_model = get_peft_model(model, config)
    base: Any = peft_model.get_base_model()
    extra = 0
    if "embeddings" in recipe.lora_train:
        for module in (base.get_input_embeddings(), base.get_output_embeddings()):
            if module is not None:
                for parameter in module.parameters():
                    extra += 0 if parameter.requires_grad else parameter.numel()
                    parameter.requires_grad_(True)
    if "norms" in recipe.lora_train:
        for module in base.modules():
            if "norm" in type(module).__name__.lower():
                for parameter in module.parameters(recurse=False):
                    extra += 0 if parameter.requires_grad else parameter.numel()
                    parameter.requires_grad_(True)
    logger.info("LoRA on %s, rank %d; %d more weights trained fully", targets, recipe.lora_rank, extra)
    return peft_model


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    write_json(path, payload)


def _evaluate(
    model: Any, documents: Sequence[torch.Tensor], lengths: Sequence[int], accelerator: Any, step: int
) -> StepPerplexity:
    from ..eval.perplexity import perplexity

    was_training = model.training
    model.eval()
    try:
        with accelerator.autocast():
            result = perplexity(model, list(documents), lengths=list(lengths), progress=False)
    finally:
        model.train(was_training)
    return StepPerplexity(
        step=step,
        perplexity={entry.length: entry.perplexity for entry in result.lengths},
        nll={entry.length: entry.nll for entry in result.lengths},
    )


def finetune(
    model: Any,
    data: PackedData | Any,
    *,
    output: str | os.PathLike[str],
    recipe: FinetuneRecipe | None = None,
    tokenizer: Any | None = None,
    resume: str | os.PathLike[str] | None = None,
    eval_lengths: Sequence[int] | None = None,
    eval_every: int | None = None,
    eval_data: Sequence[torch.Tensor] | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 1,
    plot: bool = True,
    dtype: str | torch.dtype = "float32",
    text_column: str = "text",
    accelerator: Any | None = None,
    progress: bool | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` through a context extension, the paper's way; the model is trained in place.

    Runs as it is in one process, and unchanged under ``accelerate launch`` with several processes
    (data parallel, FSDP or DeepSpeed as the launch configures; see :mod:`yarn_rope.finetune`).
    The scaling (``recipe.method`` at ``recipe.factor`` over the model's original context) is
    applied with :func:`yarn_rope.patch` before training, so the model trains through exactly the
    table it will be served with, and the saved ``config.json`` records it: vanilla transformers
    (static YaRN, linear) and :func:`yarn_rope.from_pretrained` (every static method) load the
    result with the same table.

    Args:
        model: a transformers causal LM (trained in place; it may be patched already: a new
            factor replaces the old one, as for the reference's factor 32 run continuing from its
            factor 16 checkpoint), or a folder / Hub name, loaded with
            :func:`yarn_rope.from_pretrained` in ``dtype`` with the loader's attention kernel.
        data: :class:`PackedData`, or anything :func:`~yarn_rope.finetune.prepare_data` reads
            (files, folders, a ``datasets`` dataset, a Hub name, token ids ``[n, s]``).
        output: the output folder; must not exist (or be empty) unless ``resume`` is given.
        recipe: the training settings (default: the reference recipe, :class:`FinetuneRecipe`).
        tokenizer: tokenizes text data; saved with the model.
        resume: continue from a checkpoint (``OUTPUT/checkpoints/step_N``) or from a run folder's
            latest one; the recipe, data and process count must be the run's.
        eval_lengths: perplexity lengths in tokens (default: ``[seq_len]``, the target length).
        eval_every: evaluate every this many steps, and before the first and after the last
            (default: a quarter of the steps; 0: never). Off under FSDP/DeepSpeed (a warning says
            so): evaluate the saved model instead.
        eval_data: documents (``[s]`` token tensors) to evaluate on; default: ``max(eval_lengths)``
            tokens held out of the training data, right after its last sequence.
        checkpoint_every: save a resumable checkpoint every this many steps (default: a quarter of
            the steps; 0: never). The finished run saves the model instead.
        keep_checkpoints: how many of the newest checkpoints to keep (older ones are deleted).
        plot: write ``loss.png`` (needs matplotlib: ``pip install 'yarn-rope[plot]'``).
        dtype: weight dtype when ``model`` is a path (float32 master weights by default; the
            reference trained bfloat16 weights, which a 70B model needs).
        text_column: the text column of tabular data.
        accelerator: the ``accelerate.Accelerator`` to train with (default:
            :func:`make_accelerator`; pass one made before loading a model that DeepSpeed ZeRO-3
            should partition while it loads).
        progress: a progress bar over steps (``None``: on a terminal only).

    Returns:
        :class:`FinetuneResult`.

    Raises:
        ValueError: a bad recipe or argument, ``seq_len`` beyond the scaled context, too little
            data, a resume that does not match, LoRA under FSDP/DeepSpeed.
        FileExistsError: ``output`` exists and ``resume`` is not given.
        FileNotFoundError: ``resume`` holds no checkpoint; missing data files.
        ImportError: ``datasets``/``peft``/``matplotlib`` needed and missing (names the extra).
    """
    import importlib.util

    from accelerate.utils import DistributedType, set_seed

    began = time.perf_counter()
    recipe = FinetuneRecipe() if recipe is None else recipe
    if not isinstance(recipe, FinetuneRecipe):
        raise TypeError(f"recipe must be a FinetuneRecipe, got {type(recipe).__name__}")
    checkpoint = check_output(output, resume)
    if plot and importlib.util.find_spec("matplotlib") is None:
        raise ImportError(f"plot=True needs matplotlib: {_PLOT_EXTRA} (or pass plot=False / --no-plot)")
    for name, value in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a whole number >= 0 (0: never) or None, got {value!r}")
    if isinstance(keep_checkpoints, bool) or not isinstance(keep_checkpoints, int) or keep_checkpoints < 1:
        raise ValueError(f"keep_checkpoints must be a whole number >= 1, got {keep_checkpoints!r}")

    if isinstance(model, (str, os.PathLike)):
        from ..loading import from_pretrained

        model = from_pretrained(model, dtype=dtype)
    if not hasattr(model, "config") or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"model must be a transformers causal LM or a path, got {type(model).__name__}")
    recipe = recipe.resolve(original_context(model))
    seq_len = recipe.seq_len
    assert seq_len is not None and recipe.original_max_position_embeddings is not None
    if recipe.method == "none" and seq_len > recipe.original_max_position_embeddings:
        raise ValueError(
            f"seq_len={seq_len} is beyond the model's context {recipe.original_max_position_embeddings} "
            "and method 'none' scales nothing: choose a method and factor, or shorten seq_len"
        )
    lengths = [seq_len] if eval_lengths is None else sorted({int(n) for n in eval_lengths})
    if any(n < 2 for n in lengths):
        raise ValueError(f"eval_lengths must be whole numbers >= 2, got {eval_lengths!r}")
    every = max(1, recipe.steps // 4)
    eval_every = every if eval_every is None else eval_every
    checkpoint_every = every if checkpoint_every is None else checkpoint_every

    if accelerator is None:
        accelerator = make_accelerator(recipe)
    else:
        check_launch(accelerator)
        if accelerator.gradient_accumulation_steps != recipe.gradient_accumulation:
            raise ValueError(
                f"the accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches, the "
                f"recipe {recipe.gradient_accumulation}: build it with make_accelerator(recipe)"
            )
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if recipe.lora and sharded:
        raise ValueError(
            "LoRA with FSDP/DeepSpeed is not supported by this loop (the merged model is saved from one "
            "process): train LoRA data parallel, or train all weights under FSDP/DeepSpeed"
        )
    if sharded and eval_every:
        # perplexity() runs the decoder and the output head separately, which sharded engines only
        # allow through the whole model's forward; not verified here (no GPU): evaluate afterwards.
        logger.warning(
            "periodic evaluation is off under %s: evaluate the saved model after training",
            accelerator.distributed_type,
        )
        eval_every = 0
    processes = accelerator.num_processes
    global_batch = recipe.global_batch(processes)
    needed = recipe.steps * global_batch

    held_out = max(lengths) if eval_every and eval_data is None else 0
    with accelerator.main_process_first():
        packed = (
            data
            if isinstance(data, PackedData)
            else prepare_data(
                data,
                tokenizer,
                seq_len=seq_len,
                max_sequences=needed,
                held_out=held_out,
                text_column=text_column,
                progress=progress if accelerator.is_main_process else False,
            )
        )
    if packed.seq_len != seq_len:
        raise ValueError(f"the packed data have sequences of {packed.seq_len} tokens, the recipe {seq_len}")
    if eval_every and eval_data is None and packed.held_out.numel() < max(lengths):
        raise ValueError(
            f"evaluating at {max(lengths)} tokens needs that many held-out tokens; the packed data hold "
            f"{packed.held_out.numel()}: pack with held_out={max(lengths)}, pass eval_data, or eval_every=0"
        )
    documents = list(eval_data) if eval_data is not None else [packed.held_out[: max(lengths)]]
    count = int(packed.sequences.shape[0])
    if count < needed:
        logger.warning(
            "the data hold %d sequences of %d tokens; %d steps of %d need %d: sequences repeat (%.1f epochs)",
            count,
            seq_len,
            recipe.steps,
            global_batch,
            needed,
            needed / count,
        )
    start = 0
    if checkpoint is not None:
        start = _compare_run(checkpoint, recipe, packed.fingerprint(), processes)

    # Nothing has been written yet; from here on the run is committed.
    set_seed(recipe.seed)
    scaling = None
    if recipe.method != "none":
        from ..patch import patch

        scaling = recipe.scaling()
        patch(model, scaling, replace=True)
    _drop_unpacked_gguf_marker(model)
    model.config.use_cache = False
    if recipe.gradient_checkpointing:
        _compat.set_activation_checkpointing(model, True)
    trained = _add_lora(model, recipe) if recipe.lora else model
    trained.train()
    parameters = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters,
        lr=recipe.learning_rate,
        betas=recipe.adam_betas,
        eps=recipe.adam_eps,
        weight_decay=recipe.weight_decay,
    )
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    scheduler: Any
    if recipe.schedule == "linear":
        scheduler = get_linear_schedule_with_warmup(  # type: ignore[no-untyped-call]
            optimizer, num_warmup_steps=recipe.warmup_steps, num_training_steps=recipe.steps
        )
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=recipe.warmup_steps)
    order = _data_order(count, needed, recipe.seed)[start * global_batch :]
    loader = torch.utils.data.DataLoader(
        PackedSequences(packed.sequences, order), batch_size=recipe.batch_size, shuffle=False
    )
    prepared, optimizer, loader = accelerator.prepare(trained, optimizer, loader)
    state = _LoopState()
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_for_checkpointing(state)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        if state.step != start:
            raise ValueError(
                f"checkpoint {checkpoint} restored step {state.step}, its {RUN_FILE} says {start}"
            )

    out = Path(output)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    header = {
        "recipe": recipe.to_dict(),
        "scaling": None if scaling is None else scaling.to_dict(),
        "processes": processes,
        "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": accelerator.mixed_precision,
        "global_batch": global_batch,
        "data": packed.to_dict(),
        "eval_lengths": lengths,
        "resumed_from": start if checkpoint is not None else None,
    }

    def evaluation_model() -> Any:
        unwrapped = accelerator.unwrap_model(prepared)
        return unwrapped.get_base_model() if recipe.lora else unwrapped

    def write_log(finished: bool) -> None:
        if accelerator.is_main_process:
            payload = {**header, "finished": finished, **state.state_dict()}
            payload["seconds"] = time.perf_counter() - began
            _write_json(out / LOG_FILE, payload)

    def save_checkpoint() -> None:
        folder = out / CHECKPOINTS / f"{_CHECKPOINT_PREFIX}{state.step:06d}"
        accelerator.save_state(str(folder))
        if accelerator.is_main_process:
            run = {
                "step": state.step,
                "recipe": recipe.to_dict(),
                "data_fingerprint": packed.fingerprint(),
                "processes": processes,
            }
            _write_json(folder / RUN_FILE, run)  # written last: a folder without it is incomplete
            kept = sorted(
                (p for p in (out / CHECKPOINTS).glob(f"{_CHECKPOINT_PREFIX}*") if (p / RUN_FILE).is_file()),
                key=lambda p: int(p.name.removeprefix(_CHECKPOINT_PREFIX)),
            )
            for old in kept[:-keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    if eval_every and not any(record.step == state.step for record in state.evals):
        state.evals.append(_evaluate(evaluation_model(), documents, lengths, accelerator, state.step))
    write_log(finished=False)

    tokens_per_step = global_batch * seq_len
    batches = iter(loader)
    with progress_bar(
        recipe.steps, desc="finetune", unit="step", enabled=progress if accelerator.is_main_process else False
    ) as bar:
        bar.update(state.step)
        while state.step < recipe.steps:
            step_began = time.perf_counter()
            learning_rate = float(scheduler.get_last_lr()[0])
            total = torch.zeros((), device=accelerator.device)
            grad_norm = torch.full((), math.nan, device=accelerator.device)
            for _ in range(recipe.gradient_accumulation):
                batch = next(batches)
                with accelerator.accumulate(prepared):
                    loss = prepared(**batch).loss
                    accelerator.backward(loss)
                    total += loss.detach().float()
                    if accelerator.sync_gradients:
                        norm = accelerator.clip_grad_norm_(
                            prepared.parameters(), recipe.max_grad_norm if recipe.max_grad_norm else math.inf
                        )
                        if norm is not None:  # DeepSpeed clips inside and may not report the norm
                            grad_norm = torch.as_tensor(norm, dtype=torch.float32, device=accelerator.device)
                    optimizer.step()
                    optimizer.zero_grad()
            scheduler.step()
            mean_loss = float(accelerator.reduce(total / recipe.gradient_accumulation, reduction="mean"))
            state.step += 1
            state.log.append(
                StepRecord(
                    step=state.step,
                    loss=mean_loss,
                    learning_rate=learning_rate,
                    grad_norm=None if math.isnan(float(grad_norm)) else float(grad_norm),
                    tokens=state.step * tokens_per_step,
                    seconds=time.perf_counter() - step_began,
                )
            )
            if not math.isfinite(mean_loss):
                raise FloatingPointError(
                    f"the loss is {mean_loss} at step {state.step}: lower the learning rate"
                )
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{learning_rate:.2e}")
            last = state.step == recipe.steps
            if eval_every and (state.step % eval_every == 0 or last):
                state.evals.append(_evaluate(evaluation_model(), documents, lengths, accelerator, state.step))
            if checkpoint_every and state.step % checkpoint_every == 0 and not last:
                save_checkpoint()
            write_log(finished=False)

    accelerator.wait_for_everyone()
    final = accelerator.unwrap_model(prepared)
    if recipe.lora:
        final = final.merge_and_unload()
        state_dict = None
    else:
        state_dict = accelerator.get_state_dict(prepared)
    if recipe.gradient_checkpointing:
        _compat.set_activation_checkpointing(final, False)
    final.config.use_cache = True
    final.save_pretrained(
        out,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=state_dict,
    )
    if accelerator.is_main_process and tokenizer is not None:
        tokenizer.save_pretrained(out)
    write_log(finished=True)
    if plot and accelerator.is_main_process:
        from .plot import plot_loss

        plot_loss(state.log, out / PLOT_FILE, evals=state.evals, title=_title(recipe))
    accelerator.wait_for_everyone()
    final.eval()
    return FinetuneResult(
        output=str(out),
        recipe=recipe,
        scaling=header["scaling"],
        processes=processes,
        log=tuple(state.log),
        evals=tuple(state.evals),
        data=header["data"],
        resumed_from=header["resumed_from"],
        seconds=time.perf_counter() - began,
        model=final,
    )


def _title(recipe: FinetuneRecipe) -> str:
    method = "plain RoPE" if recipe.method == "none" else f"{recipe.method} x{recipe.factor:g}"
    return f"{method}, {recipe.seq_len} tokens per sequence"
