"""The load plan: what a checkpoint declares, which code trained it, and what the loader will do.

:func:`plan_load` reads ``config.json`` (or GGUF metadata) and nothing else: no weights, no
checkpoint code. ``yarn-rope inspect`` prints its :class:`LoadPlan`; :func:`from_pretrained`
carries it out.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .. import gguf
from .. import methods as M
from ..config import RopeDeclaration, RopeScaling, read_rope
from .checkpoint import (
    check_shards,
    config_file,
    read_json,
    remote_modeling_entry,
    safetensors_numel,
)
from .hardware import choose_attention, choose_dtype, uses_cuda

__all__ = ["CODE_FAMILIES", "HUB_KEYS", "CodeFamily", "LoadPlan", "code_family", "plan_load"]

logger = logging.getLogger(__name__)

#: Keyword arguments of from_pretrained that locate files (passed to config and weight loading).
HUB_KEYS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "force_download", "proxies")


@dataclasses.dataclass(frozen=True)
class CodeFamily:
    """Settings a family of the authors' modeling files used, whatever the config said."""

    description: str
    beta_fast: float
    beta_slow: float
    mscale_coefficient: float


_LLAMA_CODE = CodeFamily("the YaRN authors' Llama code", 32.0, 1.0, 0.1)
#: Modeling files of the YaRN authors (github jquesnelle/yarn, scaled_rope/), by module name.
CODE_FAMILIES: dict[str, CodeFamily] = {
    "modeling_llama_yarn": _LLAMA_CODE,
    "modeling_llama_together_yarn": _LLAMA_CODE,
    "modeling_mistral_yarn": CodeFamily("the YaRN authors' Mistral code", 128.0, 2.0, 0.07),
}


@dataclasses.dataclass(frozen=True)
class LoadPlan:
    """What :func:`from_pretrained` will do with a checkpoint, and why (``yarn-rope inspect``).

    Attributes:
        source: the folder, Hub name or GGUF file.
        model_type: the config's ``model_type``.
        declared: the rope scaling dict the checkpoint states (``None`` if none).
        remote_code: the ``auto_map`` modeling entry that is *not* executed, if any.
        code_family: which known modeling file trained it (``None`` if none or unknown).
        scaling: the settings the loader applies (``method="none"``: plain RoPE).
        reasons: one line per decision (where each setting came from).
        attn_implementation: the attention kernel, and ``attn_reason`` why.
        dtype: the weights' dtype name.
        weight_bytes: memory the weights need in ``dtype`` (``None`` when unknown before download).
        config: the checkpoint's config as read (``config.json``, or built from the GGUF file).
    """

    source: str
    model_type: str
    declared: dict[str, Any] | None
    remote_code: str | None
    code_family: str | None
    scaling: RopeScaling
    reasons: tuple[str, ...]
    attn_implementation: str
    attn_reason: str
    dtype: str
    weight_bytes: int | None
    config: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["scaling"] = self.scaling.to_dict()
        out["reasons"] = list(self.reasons)
        return out


def code_family(entry: str | None) -> tuple[str | None, CodeFamily | None]:
    """(module name, known family) of an auto_map entry such as ``repo--modeling_x.Class``."""
    if entry is None:
        return None, None
    module = entry.split("--")[-1].rsplit(".", 1)[0]
    return module, CODE_FAMILIES.get(module)


def _read_declaration(raw: dict[str, Any], where: str) -> RopeDeclaration:
    try:
        return read_rope(raw)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{where}: {error}") from None


def _declared_scaling(
    declaration: RopeDeclaration, family: CodeFamily | None, module: str | None, where: str
) -> tuple[RopeScaling, list[str]]:
    """The scaling the checkpoint was trained with, and one reason per setting's origin."""
    reasons: list[str] = []
    rope = declaration.rope
    rope_type = declaration.rope_type
    spec = declaration.spec()
    if rope is None or (spec is not None and spec.name == "none"):
        reasons.append("the config declares no rope scaling: plain RoPE")
        try:
            declaration.scaling()  # warns about a factor on plain RoPE
        except (TypeError, ValueError) as error:
            raise type(error)(f"{where}: rope scaling {dict(rope or {})}: {error}") from None
        return RopeScaling(method="none"), reasons
    stated = dict(rope)
    yarn_ramp = spec is not None and "beta_fast" in spec.settings
    if family is not None and yarn_ramp:
        for key in ("beta_fast", "beta_slow", "mscale_coefficient"):
            if stated.get(key) is None:
                stated[key] = getattr(family, key)
                reasons.append(f"{key}={getattr(family, key)}: {family.description} ({module}.py) uses it")
            else:
                reasons.append(f"{key}={stated[key]}: stated in the config")
    elif module is not None and yarn_ramp:
        logger.warning(
            "%s: auto_map names %s.py, which yarn_rope does not know; using the config's rope settings "
            "(transformers' defaults where it states none)",
            where,
            module,
        )
        reasons.append(f"{module}.py is not a modeling file yarn_rope knows: the config's values are used")
    completed = dataclasses.replace(declaration, rope=stated)
    try:
        scaling = completed.scaling()
    except (ValueError, TypeError) as error:
        raise type(error)(f"{where}: rope scaling {dict(rope)}: {error}") from None
    reasons.insert(0, f"the config declares {rope_type!r} with factor={rope.get('factor')}")
    return scaling, reasons


def _gguf_config(source: str, gguf_file: str) -> tuple[dict[str, Any], str, int]:
    """(config dict with the file's rope scaling, where, tensor elements) of a GGUF file."""
    folder = Path(source)
    gguf_path = folder / gguf_file if folder.is_dir() else Path(gguf_file)
    metadata = gguf.read_metadata(gguf_path)
    rope = M.from_gguf_metadata(metadata.fields, rope_freqs=metadata.rope_freqs)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    raw: dict[str, Any] = config.to_dict()
    raw.pop("rope_parameters", None)  # transformers' GGUF config has no scaling: the file's replaces it
    raw["rope_scaling"] = rope["rope_scaling"]
    return raw, str(gguf_path), metadata.tensor_elements


def plan_load(
    name_or_path: str | os.PathLike[str],
    *,
    attn_implementation: str = "auto",
    dtype: str | torch.dtype = "auto",
    device_map: Any = None,
    gguf_file: str | None = None,
    scaling: RopeScaling | None = None,
    allow_flash: bool = True,
    **hub_kwargs: Any,
) -> LoadPlan:
    """Decide how to load a checkpoint without loading its weights (``yarn-rope inspect``).

    Reads ``config.json`` (or the GGUF metadata), recognises the scaling it declares and which
    modeling file trained it, and chooses the attention kernel and dtype. See
    :func:`~yarn_rope.from_pretrained` for the arguments.

    Raises:
        FileNotFoundError: missing folder, config or shards.
        ValueError: corrupt JSON or safetensors headers, a config without ``model_type``, bad
            scaling values, an architecture transformers has no native class for.
    """
    source = os.fspath(name_or_path)
    hub = {key: hub_kwargs.get(key) for key in HUB_KEYS if key in hub_kwargs}
    cuda = uses_cuda(device_map)
    torch_dtype = choose_dtype(dtype, cuda=cuda)
    attention, attn_reason = choose_attention(
        attn_implementation, dtype=torch_dtype, cuda=cuda, allow_flash=allow_flash
    )
    bytes_per = torch.empty((), dtype=torch_dtype).element_size()
    if gguf_file is not None:
        raw, where, numel = _gguf_config(source, gguf_file)
        weight_bytes: int | None = numel * bytes_per
    else:
        config_path = config_file(source, hub)
        raw = read_json(config_path)
        where = str(config_path)
        check_shards(config_path.parent)
        numel_or_none = safetensors_numel(config_path.parent)
        weight_bytes = None if numel_or_none is None else numel_or_none * bytes_per

    model_type = _native_model_type(raw, where)
    entry = remote_modeling_entry(raw)
    module, family = code_family(entry)
    declaration = _read_declaration(raw, where)
    declared_scaling, reasons = _declared_scaling(declaration, family, module, where)
    if scaling is not None:
        reasons.append("settings given by the caller replace the declared ones")
        declared_scaling = scaling
    return LoadPlan(
        source=source if gguf_file is None else f"{source} ({gguf_file})",
        model_type=model_type,
        declared=None if declaration.rope is None else dict(declaration.rope),
        remote_code=entry,
        code_family=None if family is None else family.description,
        scaling=declared_scaling,
        reasons=tuple(reasons),
        attn_implementation=attention,
        attn_reason=attn_reason,
        dtype=str(torch_dtype).removeprefix("torch."),
        weight_bytes=weight_bytes,
        config=raw,
    )


def _native_model_type(raw: dict[str, Any], where: str) -> str:
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(
            f"{where} has no model_type; yarn_rope needs it to pick the native transformers class"
        )
    import transformers
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"{where}: model_type {model_type!r} has no native class in transformers "
            f"{transformers.__version__}; yarn_rope never falls back to the checkpoint's own code"
        )
    return model_type
