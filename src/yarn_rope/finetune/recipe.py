"""The fine-tuning recipe: one frozen, validated description of what is trained and how.

Defaults are the authors' recipe (``finetune.py`` and ``train.sh`` of github.com/jquesnelle/yarn,
commit 995db5b, the runs behind the Yarn-Llama-2 checkpoints); see :mod:`yarn_rope.finetune` for
what differs and why. A recipe describes the training trajectory only: two runs with equal recipes
on equal data see the same batches in the same order and, on the same machine, log the same losses
whatever the number of processes (the global batch is ``batch_size x gradient_accumulation x
processes``: launch twice the processes with half the accumulation for the same global batch).
Where the output goes, how often to evaluate or save, are arguments of
:func:`yarn_rope.finetune.finetune`, not part of the recipe.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .. import methods as M
from ..config import RopeScaling

__all__ = [
    "MIXED_PRECISION",
    "SCALING_SETTINGS",
    "SCHEDULES",
    "TRAINABLE_EXTRAS",
    "TRAINABLE_METHODS",
    "FinetuneRecipe",
]

#: Learning-rate schedules: transformers' ``get_linear_schedule_with_warmup`` (the reference's
#: default) and ``get_constant_schedule_with_warmup`` (its 70B run).
SCHEDULES = ("linear", "constant")
#: ``mixed_precision`` values; ``"auto"`` is bf16 on GPUs that support it, fp16 on other GPUs and
#: ``"no"`` (float32) on the CPU.
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
#: What LoRA runs may train besides the adapters (LongLoRA, Chen et al. 2024, trains the embeddings
#: and normalisation layers too: "LoRA+").
TRAINABLE_EXTRAS = ("embeddings", "norms")

#: The methods a recipe trains through: every static method of the registry (a dynamic method's table
#: changes with the sequence length, so there is no one table to train).
TRAINABLE_METHODS: tuple[str, ...] = tuple(spec.name for spec in M.registered() if not spec.dynamic)
#: The scaling settings of those methods that a recipe carries beside ``method``, ``factor`` and
#: ``original_max_position_embeddings`` (each a field of :class:`FinetuneRecipe`, ``None``: the method's
#: default). ``max_position_embeddings`` is not one: a recipe's context is ``factor x original``.
SCALING_SETTINGS: tuple[str, ...] = tuple(
    name
    for name in M.SETTINGS
    if name not in M.CONTEXT_SETTINGS
    and any(name in spec.accepted for spec in M.registered() if not spec.dynamic)
)

# A stand-in original length, used only to validate method/factor before the model says its own.
_PROBE_ORIGINAL = 4096


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneRecipe:
    """What is trained and how. Frozen, keyword-only, validated on creation.

    Attributes:
        method: the static scaling trained through (``yarn``, ``linear``, ``ntk``,
            ``ntk-by-parts``, ``llama3``, or ``none`` for plain RoPE: see
            :data:`TRAINABLE_METHODS`). Dynamic methods are refused: their table depends on the
            sequence length, so there is no one table to train. ``none`` with ``seq_len`` beyond the
            original context trains plain RoPE there: the control of an extension study.
        factor: scale factor ``s`` over the original context (reference: 16 for the 64k/128k
            7B/13B runs (32 continuing from 16), 8 for the 70B run).
        original_max_position_embeddings: the context the model was pretrained with; ``None``
            takes what the model declares (its config's original length, else
            ``max_position_embeddings``).
        seq_len: training sequence length in tokens; ``None`` is the whole extended context
            ``factor x original`` (the reference's 64k PG19 chunks for factor 16 over 4k). Shorter
            is "train short, test long" (the 70B run: factor 8 on 8k sequences).
        steps: optimizer steps (reference: 400; 200 for factor 32 continuing from 16).
        learning_rate: peak learning rate (reference: 2e-5; 70B: 1e-5).
        warmup_steps: linear warm-up steps from 0 (reference: 20).
        schedule: ``"linear"`` (warm-up, then linear decay to 0 at ``steps``; reference) or
            ``"constant"`` (warm-up, then constant; the 70B run).
        batch_size: sequences per process per micro-batch (reference: 1).
        gradient_accumulation: micro-batches per optimizer step (reference: 8).
        max_grad_norm: clip the global gradient norm to this (``None``: no clipping). The
            reference's ``--grad-norm`` flag is a ``store_true`` that its ``isinstance(...,
            float)`` check never accepts, so its own runs did not clip; 1.0 is the usual choice
            and ours.
        weight_decay, adam_betas, adam_eps: AdamW settings (reference: torch's defaults, 0.01,
            (0.9, 0.999), 1e-8).
        seed: seeds the model-independent randomness (data order, dropout, LoRA init).
        beta_fast, beta_slow, extrapolation_factor, truncate, attention_factor, attn_factor, mscale,
            mscale_all_dim, mscale_coefficient, finetuned, low_freq_factor, high_freq_factor: the
            method's own scaling settings (:data:`SCALING_SETTINGS`, documented in
            :data:`yarn_rope.methods.SETTINGS`); ``None`` is the method's default, and a setting the
            method does not read is an error.
        gradient_checkpointing: recompute activations in the backward pass (reference: on,
            except with LoRA; here on for both).
        loss_chunk_size: positions whose logits exist at once in the loss (the LM head and
            cross-entropy run in slices, :mod:`yarn_rope.finetune.loss`; the same loss up to float32
            rounding); 0 builds the full ``[batch, seq, vocab]`` logits as ``model(**batch).loss``.
        mixed_precision: one of :data:`MIXED_PRECISION` (reference: bf16).
        lora: train LoRA adapters instead of all weights (reference: rank 16, alpha 64,
            dropout 0.05, on every linear layer but the output head).
        lora_rank, lora_alpha, lora_dropout: the adapters' settings.
        lora_train: with ``lora``, also train these fully: ``"embeddings"`` (input and output
            embeddings), ``"norms"`` (normalisation weights); LongLoRA's finding is that long
            contexts need them.

    Raises:
        ValueError, TypeError: on creation, naming the field, the value and the fix.
    """

    method: str = "yarn"
    factor: float = 16.0
    original_max_position_embeddings: int | None = None
    seq_len: int | None = None
    steps: int = 400
    learning_rate: float = 2e-5
    warmup_steps: int = 20
    schedule: str = "linear"
    batch_size: int = 1
    gradient_accumulation: int = 8
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    seed: int = 42
    beta_fast: float | None = None
    beta_slow: float | None = None
    extrapolation_factor: float | None = None
    truncate: bool | None = None
    attention_factor: float | None = None
    attn_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    mscale_coefficient: float | None = None
    finetuned: bool | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    gradient_checkpointing: bool = True
    loss_chunk_size: int = 1024
    mixed_precision: str = "auto"
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    lora_train: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self._check_scaling()
        self._check_optimization()
        self._check_lora()

    def _check_scaling(self) -> None:
        if not isinstance(self.method, str):
            raise TypeError(f"method must be a method name, got {self.method!r}")
        factor = 1.0 if self.method == "none" else _number("factor", self.factor)
        original = self.original_max_position_embeddings
        if original is not None:
            original = _whole("original_max_position_embeddings", original, minimum=2)
        probe = RopeScaling(  # validates the method, the factor and the settings (errors name them)
            method=self.method,
            factor=None if self.method == "none" else factor,
            original_max_position_embeddings=original or _PROBE_ORIGINAL,
            **self.settings(),
        )
        if probe.is_dynamic:
            static = self.method.removeprefix("dynamic-")
            raise ValueError(
                f"method {self.method!r} is dynamic: its table changes with the sequence length, so "
                f"there is no one table to train through; fine-tune with the static {static!r} (the "
                "authors trained static YaRN, and a static fine-tune can be served dynamically)"
            )
        set_ = self._set
        set_("factor", float(factor))
        set_("original_max_position_embeddings", original)
        for name, value in self.settings().items():
            set_(name, getattr(probe, name) if value is not None else None)
        if self.seq_len is not None:
            set_("seq_len", _whole("seq_len", self.seq_len, minimum=2))
            if original is not None:
                self._check_seq_len(original)

    def _check_optimization(self) -> None:
        set_ = self._set
        set_("steps", _whole("steps", self.steps, minimum=1))
        set_("learning_rate", _positive("learning_rate", self.learning_rate))
        set_("warmup_steps", _whole("warmup_steps", self.warmup_steps, minimum=0))
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        set_("batch_size", _whole("batch_size", self.batch_size, minimum=1))
        set_("gradient_accumulation", _whole("gradient_accumulation", self.gradient_accumulation, minimum=1))
        if self.max_grad_norm is not None:
            set_("max_grad_norm", _positive("max_grad_norm (None for no clipping)", self.max_grad_norm))
        decay = _number("weight_decay", self.weight_decay)
        if decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        set_("weight_decay", decay)
        betas = tuple(self.adam_betas)
        if len(betas) != 2 or not all(0 <= _number("adam_betas", b) < 1 for b in betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        set_("adam_betas", (float(betas[0]), float(betas[1])))
        set_("adam_eps", _positive("adam_eps", self.adam_eps))
        set_("seed", _whole("seed", self.seed, minimum=0))
        set_(
            "loss_chunk_size", _whole("loss_chunk_size (0: the full logits)", self.loss_chunk_size, minimum=0)
        )
        for flag in ("gradient_checkpointing", "lora"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}"
            )

    def _check_lora(self) -> None:
        set_ = self._set
        set_("lora_rank", _whole("lora_rank", self.lora_rank, minimum=1))
        set_("lora_alpha", _whole("lora_alpha", self.lora_alpha, minimum=1))
        dropout = _number("lora_dropout", self.lora_dropout)
        if not 0 <= dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        set_("lora_dropout", dropout)
        extras = (self.lora_train,) if isinstance(self.lora_train, str) else tuple(self.lora_train)
        unknown = [name for name in extras if name not in TRAINABLE_EXTRAS]
        if unknown:
            raise ValueError(f"lora_train takes {TRAINABLE_EXTRAS}, got {unknown!r}")
        if extras and not self.lora:
            raise ValueError(f"lora_train={extras!r} needs lora=True (without LoRA every weight is trained)")
        set_("lora_train", tuple(sorted(set(extras))))

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)

    def settings(self) -> dict[str, Any]:
        """The scaling settings this recipe gives (those of :data:`SCALING_SETTINGS` not ``None``)."""
        values = {name: getattr(self, name) for name in SCALING_SETTINGS}
        return {name: value for name, value in values.items() if value is not None}

    def _check_seq_len(self, original: int) -> None:
        context = self.scaled_context(original)
        if self.method != "none" and self.seq_len is not None and self.seq_len > context:
            raise ValueError(
                f"seq_len={self.seq_len} is beyond the scaled context {context} (factor {self.factor:g} x "
                f"original {original}): the model would see positions it was never extended to; raise "
                "factor or shorten seq_len"
            )

    def scaled_context(self, original: int | None = None) -> int:
        """``factor x original`` tokens: the context the scaled model serves."""
        original = self.original_max_position_embeddings if original is None else original
        if original is None:
            raise ValueError("the original context is unknown: pass original or resolve() the recipe")
        return math.floor(self.factor * original)

    def resolve(self, original_max_position_embeddings: int) -> FinetuneRecipe:
        """This recipe with the original length and the sequence length filled in.

        Args:
            original_max_position_embeddings: what the model declares (used only where the recipe
                does not set it).

        Raises:
            ValueError: ``seq_len`` beyond the scaled context ``factor x original``.
        """
        original = self.original_max_position_embeddings or _whole(
            "original_max_position_embeddings", original_max_position_embeddings, minimum=2
        )
        seq_len = self.seq_len if self.seq_len is not None else self.scaled_context(original)
        return self.replace(original_max_position_embeddings=original, seq_len=seq_len)

    def scaling(self) -> RopeScaling:
        """The :class:`~yarn_rope.RopeScaling` this recipe trains through (after :meth:`resolve`)."""
        if self.original_max_position_embeddings is None:
            raise ValueError("resolve() the recipe with the model's original context first")
        if self.method == "none":
            return RopeScaling(method="none")
        return RopeScaling(
            method=self.method,
            factor=self.factor,
            original_max_position_embeddings=self.original_max_position_embeddings,
            **self.settings(),
        )

    def global_batch(self, processes: int = 1) -> int:
        """Sequences per optimizer step over ``processes`` data-parallel processes."""
        return self.batch_size * self.gradient_accumulation * processes

    def replace(self, **changes: Any) -> FinetuneRecipe:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["adam_betas"] = list(self.adam_betas)
        out["lora_train"] = list(self.lora_train)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneRecipe:
        """Inverse of :meth:`to_dict` (unknown keys are an error)."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown recipe fields {unknown}; known: {sorted(known)}")
        fields = dict(values)
        if "adam_betas" in fields:
            fields["adam_betas"] = tuple(fields["adam_betas"])
        if "lora_train" in fields:
            fields["lora_train"] = tuple(fields["lora_train"])
        return cls(**fields)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _positive(name: str, value: Any) -> float:
    number = _number(name, value)
    if number <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return number


def _whole(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value
