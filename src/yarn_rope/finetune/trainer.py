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

Checkpoints, the resume checks and the final model's atomic write live in :mod:`.checkpoint`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import _compat
from .._files import write_json
from .._progress import progress_bar
from ..config import RopeScaling
from .checkpoint import RunCheckpoints, check_output, compare_run, latest_checkpoint
from .data import PackedData, PackedSequences, _checked_ids, prepare_data
from .loss import causal_lm_loss
from .recipe import FinetuneRecipe

__all__ = [
    "FinetuneResult",
    "FinetuneRun",
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
_PLOT_EXTRA = "pip install 'yarn-rope[plot]'"
_FINETUNE_EXTRA = "pip install 'yarn-rope[finetune]'"


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


def plain_rope_warning(seq_len: int, original: int) -> str:
    """What a plain-RoPE run beyond the original context is: a control, not an extension."""
    return (
        f"method 'none' with seq_len={seq_len} beyond the model's context {original}: this trains plain "
        "RoPE at positions it never saw, with no scaling. That is the control of an extension study "
        "(how much does fine-tuning alone extend the context?), not a context extension; choose a "
        "method and a factor to extend"
    )


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


class FinetuneRun:
    """A fine-tuning run in stages, as torchtune's recipes (``setup`` -> ``train`` ->
    ``save_checkpoint``) and litgpt's ``setup -> main -> fit`` are staged.

    :func:`finetune` calls the stages in order; the command line calls them one by one, so that
    every mistake is reported before the model is loaded::

        run = FinetuneRun(output, recipe=recipe, tokenizer=tokenizer)  # checks that load nothing
        run.resolve(config)            # the recipe against the model's context (config or model)
        run.prepare_data("books/")     # pack, check the ids and the resume point
        run.setup(model)               # patch, LoRA, optimizer, schedule, loader, restore
        result = run.train()           # train_step / evaluate / save_checkpoint ..., then save

    Nothing is written before :meth:`setup`; every check (recipe, output folder, resume point,
    sequence length, data) runs before it. The arguments are :func:`finetune`'s.

    Attributes:
        output: the output folder.
        recipe: the recipe (resolved after :meth:`resolve`).
        accelerator: the ``accelerate.Accelerator`` trained with.
        checkpoint: the checkpoint resumed from (``None`` for a new run).
        packed: the training data (after :meth:`prepare_data`).
        lengths: evaluation lengths (after :meth:`resolve`).
        step: optimizer steps done.
    """

    def __init__(
        self,
        output: str | os.PathLike[str],
        *,
        recipe: FinetuneRecipe | None = None,
        tokenizer: Any | None = None,
        accelerator: Any | None = None,
        resume: str | os.PathLike[str] | None = None,
        checkpoint_every: int | None = None,
        keep_checkpoints: int = 1,
        eval_every: int | None = None,
        eval_lengths: Sequence[int] | None = None,
        eval_data: Sequence[torch.Tensor] | None = None,
        plot: bool = True,
        progress: bool | None = None,
    ) -> None:
        self._began = time.perf_counter()
        recipe = FinetuneRecipe() if recipe is None else recipe
        if not isinstance(recipe, FinetuneRecipe):
            raise TypeError(f"recipe must be a FinetuneRecipe, got {type(recipe).__name__}")
        self.recipe = recipe
        self.output = Path(output)
        self.checkpoint = check_output(output, resume)
        _check_run_arguments(plot, eval_lengths, eval_every, checkpoint_every, keep_checkpoints)
        every = max(1, recipe.steps // 4)
        self.eval_every = every if eval_every is None else eval_every
        self.checkpoint_every = every if checkpoint_every is None else checkpoint_every
        self.keep_checkpoints = keep_checkpoints
        self.plot, self.progress, self.tokenizer = plot, progress, tokenizer
        self._eval_lengths = None if eval_lengths is None else sorted({int(n) for n in eval_lengths})
        self._eval_data = None if eval_data is None else list(eval_data)
        self.accelerator = _accelerator_for(recipe, accelerator)
        self._checkpoints = RunCheckpoints(self.output, self.accelerator)
        if self.eval_every and _is_sharded(self.accelerator):
            # perplexity() runs the decoder and the output head separately, which sharded engines only
            # allow through the whole model's forward; not verified here (no GPU): evaluate afterwards.
            logger.warning(
                "periodic evaluation is off under %s: evaluate the saved model after training",
                self.accelerator.distributed_type,
            )
            self.eval_every = 0
        self.processes: int = self.accelerator.num_processes
        self.lengths: list[int] = []
        self.packed: PackedData | None = None
        self.vocab_size: int | None = None
        self._start = 0
        self._state = _LoopState()
        self._resolved = False
        self.scaling: RopeScaling | None = None
        self._model: Any = None
        self._final: Any = None

    @property
    def step(self) -> int:
        """Optimizer steps done (restored ones included)."""
        return self._state.step

    # --- stage 1: before the model is loaded --------------------------------------------------

    def resolve(self, model_or_config: Any) -> FinetuneRecipe:
        """Fill in the recipe's original and sequence lengths from what the model declares.

        Args:
            model_or_config: the model, or its transformers config (enough: the command line
                resolves before it loads the weights).

        Returns:
            the resolved recipe (also :attr:`recipe`).

        Raises:
            ValueError: ``seq_len`` beyond the scaled context. With method ``none`` a ``seq_len``
                beyond the model's context is allowed, with a warning (:func:`plain_rope_warning`).
        """
        recipe = self.recipe.resolve(original_context(model_or_config))
        seq_len, original = recipe.seq_len, recipe.original_max_position_embeddings
        assert seq_len is not None and original is not None
        if recipe.method == "none" and seq_len > original:
            logger.warning(plain_rope_warning(seq_len, original))
        self.recipe = recipe
        self.lengths = [seq_len] if self._eval_lengths is None else self._eval_lengths
        self.vocab_size = _vocabulary(model_or_config)
        self._resolved = True
        return recipe

    def prepare_data(
        self, data: PackedData | Any, *, text_column: str = "text", split: str = "train"
    ) -> PackedData:
        """Pack the training data (after :meth:`resolve`) and check it, and the resume point, against
        the run.

        Args:
            data: :class:`PackedData`, or anything :func:`~yarn_rope.finetune.prepare_data` reads.
            text_column: the text column of tabular data.
            split: the split of a Hub or saved dataset.

        Returns:
            the packed data (also :attr:`packed`).

        Raises:
            ValueError: too little data, sequences of another length, too few held-out tokens, a
                resume whose recipe, data or process count differ.
        """
        if not self._resolved:
            raise RuntimeError("resolve() the recipe against the model (or its config) before prepare_data()")
        recipe, accelerator = self.recipe, self.accelerator
        assert recipe.seq_len is not None
        needed = recipe.steps * recipe.global_batch(self.processes)
        held_out = max(self.lengths) if self.eval_every and self._eval_data is None else 0
        with accelerator.main_process_first():
            packed = (
                data
                if isinstance(data, PackedData)
                else prepare_data(
                    data,
                    self.tokenizer,
                    seq_len=recipe.seq_len,
                    max_sequences=needed,
                    held_out=held_out,
                    text_column=text_column,
                    split=split,
                    progress=self.progress if accelerator.is_main_process else False,
                    vocab_size=self.vocab_size,
                )
            )
        self._check_data(packed, needed)
        if self.checkpoint is not None:
            self._start = compare_run(self.checkpoint, recipe, packed.fingerprint(), self.processes)
        self.packed = packed
        return packed

    def _check_data(self, packed: PackedData, needed: int) -> None:
        recipe = self.recipe
        if packed.seq_len != recipe.seq_len:
            raise ValueError(
                f"the packed data have sequences of {packed.seq_len} tokens, the recipe {recipe.seq_len}"
            )
        if self.eval_every and self._eval_data is None and packed.held_out.numel() < max(self.lengths):
            raise ValueError(
                f"evaluating at {max(self.lengths)} tokens needs that many held-out tokens; the packed data "
                f"hold {packed.held_out.numel()}: pack with held_out={max(self.lengths)}, pass eval_data, "
                "or eval_every=0"
            )
        for name, ids in (("sequences", packed.sequences), ("held-out tokens", packed.held_out)):
            _checked_ids(
                ids, functools.partial(str, f"the {name} packed from {packed.source}"), self.vocab_size
            )
        count = int(packed.sequences.shape[0])
        if count < needed:
            logger.warning(
                "the data hold %d sequences of %d tokens; %d steps of %d need %d: sequences repeat "
                "(%.1f epochs)",
                count,
                recipe.seq_len,
                recipe.steps,
                recipe.global_batch(self.processes),
                needed,
                needed / count,
            )

    # --- stage 2: the model -------------------------------------------------------------------

    def setup(self, model: Any, data: PackedData | Any | None = None) -> None:
        """Make the model trainable through the scaling and restore the resume point.

        Resolves the recipe and packs ``data`` first if :meth:`resolve` / :meth:`prepare_data`
        were not called. Then: seeds, patches the scaling in (replacing any), adds LoRA, builds the
        optimizer, the schedule and the data loader, prepares them with accelerate, restores the
        checkpoint, and creates the output folder. From here on the run is committed.

        Args:
            model: a transformers causal LM (trained in place).
            data: the training data, if :meth:`prepare_data` was not called.

        Raises:
            TypeError: ``model`` is not a causal LM; no data.
            ValueError: see :meth:`resolve` and :meth:`prepare_data`.
        """
        if not hasattr(model, "config") or not hasattr(model, "get_output_embeddings"):
            raise TypeError(f"model must be a transformers causal LM or a path, got {type(model).__name__}")
        if not self._resolved:
            self.resolve(model)
        if self.packed is None:
            if data is None:
                raise TypeError("setup() needs the training data: pass data= or call prepare_data() first")
            self.prepare_data(data)
        self._setup_model(model)
        optimizer, self._scheduler = self._setup_optimizer()
        loader = self._setup_data()
        self._model, self._optimizer, loader = self.accelerator.prepare(self._trained, optimizer, loader)
        self.accelerator.register_for_checkpointing(self._scheduler)
        self.accelerator.register_for_checkpointing(self._state)
        self._batches = iter(loader)
        if self.checkpoint is not None:
            self._restore(self.checkpoint)
        if self.accelerator.is_main_process:
            self.output.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()

    def _setup_model(self, model: Any) -> None:
        from accelerate.utils import set_seed

        recipe = self.recipe
        set_seed(recipe.seed)
        if recipe.method != "none":
            from ..patch import patch

            self.scaling = recipe.scaling()
            patch(model, self.scaling, replace=True)
        _drop_unpacked_gguf_marker(model)
        model.config.use_cache = False
        if recipe.gradient_checkpointing:
            _compat.set_activation_checkpointing(model, True)
        self._trained = _add_lora(model, recipe) if recipe.lora else model
        self._trained.train()

    def _setup_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

        recipe = self.recipe
        optimizer = torch.optim.AdamW(
            [p for p in self._trained.parameters() if p.requires_grad],
            lr=recipe.learning_rate,
            betas=recipe.adam_betas,
            eps=recipe.adam_eps,
            weight_decay=recipe.weight_decay,
        )
        scheduler: Any
        if recipe.schedule == "linear":
            scheduler = get_linear_schedule_with_warmup(  # type: ignore[no-untyped-call]
                optimizer, num_warmup_steps=recipe.warmup_steps, num_training_steps=recipe.steps
            )
        else:
            scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=recipe.warmup_steps)
        return optimizer, scheduler

    def _setup_data(self) -> torch.utils.data.DataLoader[dict[str, torch.Tensor]]:
        assert self.packed is not None
        recipe = self.recipe
        global_batch = recipe.global_batch(self.processes)
        count = int(self.packed.sequences.shape[0])
        order = _data_order(count, recipe.steps * global_batch, recipe.seed)[self._start * global_batch :]
        # A generator of its own: otherwise starting to iterate draws a seed from the global random
        # state, which a resumed run has just restored, and every later dropout mask would shift.
        return torch.utils.data.DataLoader(
            PackedSequences(self.packed.sequences, order),
            batch_size=recipe.batch_size,
            shuffle=False,
            generator=torch.Generator().manual_seed(recipe.seed),
        )

    def _restore(self, checkpoint: Path) -> None:
        self._checkpoints.load(checkpoint)
        if self._state.step != self._start:
            raise ValueError(
                f"checkpoint {checkpoint} restored step {self._state.step}, its run.json says {self._start}"
            )

    # --- stage 3: training ----------------------------------------------------------------------

    def train(self) -> FinetuneResult:
        """Train to ``recipe.steps``: evaluate before the first step (unless a resumed run has),
        then :meth:`train_step`, :meth:`evaluate` every ``eval_every`` steps and after the last,
        :meth:`save_checkpoint` every ``checkpoint_every`` steps, and :meth:`save` at the end.

        Returns:
            :class:`FinetuneResult`.

        Raises:
            FloatingPointError: a non-finite loss.
        """
        self._require_setup()
        recipe, state = self.recipe, self._state
        if self.eval_every and not any(record.step == state.step for record in state.evals):
            self.evaluate()
        enabled = self.progress if self.accelerator.is_main_process else False
        with progress_bar(recipe.steps, desc="finetune", unit="step", enabled=enabled) as bar:
            bar.update(state.step)
            while state.step < recipe.steps:
                record = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{record.loss:.4f}", lr=f"{record.learning_rate:.2e}")
                last = state.step == recipe.steps
                if self.eval_every and (state.step % self.eval_every == 0 or last):
                    self.evaluate()
                if self.checkpoint_every and state.step % self.checkpoint_every == 0 and not last:
                    self.save_checkpoint()
                with self._checkpoints.writing(LOG_FILE):
                    self._write_log(finished=False)
        return self.save()

    def train_step(self) -> StepRecord:
        """One optimizer step over the next global batch (``gradient_accumulation`` micro-batches
        per process); the record is appended to the run's log.

        Raises:
            FloatingPointError: the loss is not finite.
        """
        self._require_setup()
        accelerator, recipe, state, model = self.accelerator, self.recipe, self._state, self._model
        began = time.perf_counter()
        learning_rate = float(self._scheduler.get_last_lr()[0])
        total = torch.zeros((), device=accelerator.device)
        grad_norm = torch.full((), math.nan, device=accelerator.device)
        for _ in range(recipe.gradient_accumulation):
            batch = next(self._batches)
            with accelerator.accumulate(model), _context_parallel(accelerator, batch) as batch:
                loss = causal_lm_loss(model, batch, chunk_size=recipe.loss_chunk_size)
                accelerator.backward(loss)
                total += loss.detach().float()
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(
                        model.parameters(), recipe.max_grad_norm if recipe.max_grad_norm else math.inf
                    )
                    if norm is not None:  # DeepSpeed clips inside and may not report the norm
                        grad_norm = torch.as_tensor(norm, dtype=torch.float32, device=accelerator.device)
                self._optimizer.step()
                self._optimizer.zero_grad()
        self._scheduler.step()
        mean_loss = float(accelerator.reduce(total / recipe.gradient_accumulation, reduction="mean"))
        state.step += 1
        assert recipe.seq_len is not None
        record = StepRecord(
            step=state.step,
            loss=mean_loss,
            learning_rate=learning_rate,
            grad_norm=None if math.isnan(float(grad_norm)) else float(grad_norm),
            tokens=state.step * recipe.global_batch(self.processes) * recipe.seq_len,
            seconds=time.perf_counter() - began,
        )
        state.log.append(record)
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"the loss is {mean_loss} at step {state.step}: lower the learning rate")
        return record

    def evaluate(self) -> StepPerplexity:
        """Perplexity of the model as it is now on the evaluation tokens, at :attr:`lengths`;
        recorded in the run's log under the current step."""
        self._require_setup()
        unwrapped = self.accelerator.unwrap_model(self._model)
        model = unwrapped.get_base_model() if self.recipe.lora else unwrapped
        assert self.packed is not None
        documents = (
            self._eval_data if self._eval_data is not None else [self.packed.held_out[: max(self.lengths)]]
        )
        record = _evaluate(model, documents, self.lengths, self.accelerator, self._state.step)
        self._state.evals.append(record)
        return record

    # --- stage 4: saving ------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Save a resumable checkpoint (``OUTPUT/checkpoints/step_N``: accelerate's state, then
        ``run.json`` last) and delete all but the newest ``keep_checkpoints``.

        Returns:
            the checkpoint folder.
        """
        self._require_setup()
        assert self.packed is not None
        return self._checkpoints.save(
            self._state.step,
            recipe=self.recipe,
            data_fingerprint=self.packed.fingerprint(),
            processes=self.processes,
            keep=self.keep_checkpoints,
        )

    def save(self) -> FinetuneResult:
        """Save the trained model (LoRA merged into it) with the tokenizer, ``finetune.json`` and
        the plot into the output folder.

        Returns:
            :class:`FinetuneResult`, its model in eval mode.
        """
        self._require_setup()
        accelerator, recipe, out = self.accelerator, self.recipe, self.output
        accelerator.wait_for_everyone()
        final = accelerator.unwrap_model(self._model)
        if recipe.lora:
            final = final.merge_and_unload()
            state_dict = None
        else:
            state_dict = accelerator.get_state_dict(self._model)
        if recipe.gradient_checkpointing:
            _compat.set_activation_checkpointing(final, False)
        final.config.use_cache = True
        checkpoints = self._checkpoints
        with checkpoints.writing("the final model", partial=checkpoints.partial_model):
            checkpoints.save_model(final, state_dict=state_dict, tokenizer=self.tokenizer)
            self._write_log(finished=True)
            if self.plot and accelerator.is_main_process:
                from .plot import plot_loss

                plot_loss(self._state.log, out / PLOT_FILE, evals=self._state.evals, title=_title(recipe))
        accelerator.wait_for_everyone()
        final.eval()
        self._final = final
        return self.result()

    def result(self) -> FinetuneResult:
        """What the run has done so far (its model: the saved one after :meth:`save`)."""
        assert self.packed is not None
        return FinetuneResult(
            output=str(self.output),
            recipe=self.recipe,
            scaling=None if self.scaling is None else self.scaling.to_dict(),
            processes=self.processes,
            log=tuple(self._state.log),
            evals=tuple(self._state.evals),
            data=self.packed.to_dict(),
            resumed_from=self._start if self.checkpoint is not None else None,
            seconds=time.perf_counter() - self._began,
            model=self._final,
        )

    def _require_setup(self) -> None:
        if self._model is None:
            raise RuntimeError("call setup(model) before training, evaluating or saving")

    def _write_log(self, finished: bool) -> None:
        if not self.accelerator.is_main_process:
            return
        result = self.result()
        header = {
            "recipe": self.recipe.to_dict(),
            "scaling": result.scaling,
            "processes": self.processes,
            "distributed_type": str(self.accelerator.distributed_type),
            "mixed_precision": self.accelerator.mixed_precision,
            "global_batch": self.recipe.global_batch(self.processes),
            "data": result.data,
            "eval_lengths": self.lengths,
            "resumed_from": result.resumed_from,
        }
        payload = {**header, "finished": finished, **self._state.state_dict()}
        payload["seconds"] = result.seconds
        _write_json(self.output / LOG_FILE, payload)


def _check_run_arguments(
    plot: bool,
    eval_lengths: Sequence[int] | None,
    eval_every: int | None,
    checkpoint_every: int | None,
    keep_checkpoints: int,
) -> None:
    import importlib.util

    if plot and importlib.util.find_spec("matplotlib") is None:
        raise ImportError(f"plot=True needs matplotlib: {_PLOT_EXTRA} (or pass plot=False / --no-plot)")
    for name, value in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a whole number >= 0 (0: never) or None, got {value!r}")
    if isinstance(keep_checkpoints, bool) or not isinstance(keep_checkpoints, int) or keep_checkpoints < 1:
        raise ValueError(f"keep_checkpoints must be a whole number >= 1, got {keep_checkpoints!r}")
    if eval_lengths is not None and any(int(n) < 2 for n in eval_lengths):
        raise ValueError(f"eval_lengths must be whole numbers >= 2, got {eval_lengths!r}")


def _accelerator_for(recipe: FinetuneRecipe, accelerator: Any | None) -> Any:
    """:func:`make_accelerator`'s, or the given one checked against the recipe."""
    if accelerator is None:
        accelerator = make_accelerator(recipe)
    else:
        check_launch(accelerator)
        if accelerator.gradient_accumulation_steps != recipe.gradient_accumulation:
            raise ValueError(
                f"the accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches, the "
                f"recipe {recipe.gradient_accumulation}: build it with make_accelerator(recipe)"
            )
    if recipe.lora and _is_sharded(accelerator):
        raise ValueError(
            "LoRA with FSDP/DeepSpeed is not supported by this loop (the merged model is saved from one "
            "process): train LoRA data parallel, or train all weights under FSDP/DeepSpeed"
        )
    return accelerator


@contextlib.contextmanager
def _context_parallel(accelerator: Any, batch: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """``batch``, split along the sequence over the context-parallel ranks when the launch asks for it
    (accelerate's ``parallelism_config`` with ``cp_size > 1``, FSDP2, SDPA: ring attention over the
    ranks; ``examples/accelerate/fsdp2_context_parallel.yaml``); unchanged otherwise.

    The labels are shifted before the split (``shift_labels``), so that each shard's last position
    is scored against the next shard's first token. Not run here: it needs several GPUs.
    """
    config = getattr(accelerator, "parallelism_config", None)
    if config is None or not getattr(config, "cp_enabled", False):
        yield batch
        return
    from .loss import shift_labels

    sharded = {name: value for name, value in batch.items() if name != "labels"}
    sharded["shift_labels"] = shift_labels(batch["labels"])  # scored instead of labels
    buffers = list(sharded.values())
    with accelerator.maybe_context_parallel(
        buffers=buffers, buffer_seq_dims=[1] * len(buffers), no_restore_buffers=set(buffers)
    ):
        yield sharded


def _is_sharded(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _vocabulary(model_or_config: Any) -> int | None:
    """The number of token ids the model embeds (``None`` if it does not say)."""
    embeddings = getattr(model_or_config, "get_input_embeddings", None)
    if callable(embeddings):
        module = embeddings()
        if isinstance(getattr(module, "num_embeddings", None), int):
            return int(module.num_embeddings)
    config = getattr(model_or_config, "config", model_or_config)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(config, "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else None


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
    run = FinetuneRun(
        output,
        recipe=recipe,
        tokenizer=tokenizer,
        resume=resume,
        eval_lengths=eval_lengths,
        eval_every=eval_every,
        eval_data=eval_data,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        plot=plot,
        accelerator=accelerator,
        progress=progress,
    )
    if isinstance(model, (str, os.PathLike)):
        from ..loading import from_pretrained

        model = from_pretrained(model, dtype=dtype)
    if not hasattr(model, "config") or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"model must be a transformers causal LM or a path, got {type(model).__name__}")
    run.resolve(model)
    run.prepare_data(data, text_column=text_column)
    run.setup(model)
    return run.train()


def _title(recipe: FinetuneRecipe) -> str:
    method = "plain RoPE" if recipe.method == "none" else f"{recipe.method} x{recipe.factor:g}"
    return f"{method}, {recipe.seq_len} tokens per sequence"
