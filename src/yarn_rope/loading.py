"""Open YaRN checkpoints faithfully with native transformers classes, never running their code.

The published YaRN checkpoints (NousResearch Yarn-Llama-2 7b/13b/70b, Yarn-Mistral-7b,
Yarn-Solar-10b) name the authors' modeling files in ``auto_map`` and tell users to pass
``trust_remote_code=True``. Those files no longer import on current transformers, and running
downloaded code is a risk in itself. Their weights use plain Llama/Mistral names, so
:func:`from_pretrained` builds the native class with plain RoPE and puts the exact table in with
:func:`yarn_rope.patch`, using the settings the checkpoint was *trained* with:

* the authors' Llama code (``modeling_llama_yarn``, ``modeling_llama_together_yarn``): betas 32/1,
  attention factor ``0.1 ln(s) + 1``;
* the authors' Mistral code (``modeling_mistral_yarn``): betas 128/2 and ``0.07 ln(s) + 1``,
  which it never reads from the config; vanilla transformers opens these checkpoints with 32/1
  and 0.1 without a word;
* values the config states explicitly win over those defaults; an unknown modeling file gets the
  config's values and a warning.

GGUF files: transformers drops YaRN metadata when it opens them, so ``{arch}.rope.scaling.*`` is
read from the file here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .config import RopeScaling
from .patch import patch
from .rotary import AngleMode

__all__ = ["CodeFamily", "LoadPlan", "choose_attention", "choose_dtype", "from_pretrained", "plan_load"]

logger = logging.getLogger(__name__)

FLASH_EXTRA = "pip install 'yarn-rope[flash]'"
# Keyword arguments of from_pretrained that locate files (passed to config and weight loading).
_HUB_KEYS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "force_download", "proxies")


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


# ------------------------------------------------------------------------------------------------
# Hardware choices
# ------------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _uses_cuda(device_map: Any) -> bool:
    """Whether the weights will live on a GPU under ``device_map``."""
    if device_map is None or not torch.cuda.is_available():
        return False  # transformers loads to the CPU without a device_map
    if isinstance(device_map, str) and device_map.startswith(("auto", "balanced", "sequential")):
        return True
    places = device_map.values() if isinstance(device_map, dict) else [device_map]
    return any(str(place) not in ("cpu", "disk", "meta") for place in places)


def choose_dtype(dtype: str | torch.dtype = "auto", *, cuda: bool | None = None) -> torch.dtype:
    """``"auto"``: bfloat16 on a GPU that supports it, else float16 on GPU, float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(
                f"dtype must be 'auto', one of {', '.join(_DTYPES)} or a torch.dtype, got {dtype!r}"
            )
        return _DTYPES[dtype]
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def choose_attention(
    requested: str = "auto", *, dtype: torch.dtype, cuda: bool | None = None
) -> tuple[str, str]:
    """The attention kernel to load with, and why.

    ``"auto"``: ``flash_attention_2`` when CUDA and ``flash_attn`` are present and the dtype is
    fp16/bf16; otherwise ``sdpa`` (PyTorch's own fused kernels, flash ones on CUDA); ``eager``
    only where PyTorch has no SDPA. An explicit request is honoured, or refused with the way to
    get it.

    Raises:
        ImportError: ``flash_attention_2`` requested without ``flash_attn`` installed.
        ValueError: ``flash_attention_2`` without CUDA or with float32 weights; unknown names.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    has_flash = importlib.util.find_spec("flash_attn") is not None
    half = dtype in (torch.float16, torch.bfloat16)
    if requested == "auto":
        if cuda and has_flash and half:
            return "flash_attention_2", "CUDA, flash_attn installed and half-precision weights"
        missing = [
            why for ok, why in ((cuda, "no CUDA"), (has_flash, "no flash_attn"), (half, "float32")) if not ok
        ]
        if hasattr(torch.nn.functional, "scaled_dot_product_attention"):
            return "sdpa", f"PyTorch SDPA ({', '.join(missing)} rules out flash_attention_2)"
        return "eager", "this PyTorch has no scaled_dot_product_attention"
    if requested == "flash_attention_2":
        if not has_flash:
            raise ImportError(f"attn_implementation='flash_attention_2' needs flash-attn: {FLASH_EXTRA}")
        if not cuda:
            raise ValueError(
                "attn_implementation='flash_attention_2' needs a CUDA GPU; use 'sdpa' on this machine"
            )
        if not half:
            raise ValueError("flash_attention_2 runs in float16/bfloat16; pass dtype='bfloat16' or 'auto'")
        return requested, "requested"
    if not isinstance(requested, str) or not requested:
        raise ValueError(
            f"attn_implementation must be 'auto' or a transformers kernel name, got {requested!r}"
        )
    return requested, "requested"


# ------------------------------------------------------------------------------------------------
# Reading the checkpoint
# ------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise FileNotFoundError(f"cannot read {path}: {error}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON (line {error.lineno}, column {error.colno}): {error.msg}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _config_file(source: str, hub: dict[str, Any]) -> Path:
    folder = Path(source)
    if hub.get("subfolder"):
        folder = folder / hub["subfolder"]
    if folder.is_dir():
        path = folder / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder} holds no config.json; is it a transformers checkpoint folder?")
        return path
    if Path(source).exists():
        raise FileNotFoundError(f"{source} is a file; pass the checkpoint folder (and gguf_file= for GGUF)")
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or (os.sep != "/" and os.sep in source):
        raise FileNotFoundError(f"no checkpoint folder at {source}")
    from transformers.utils.hub import cached_file

    try:
        resolved = cached_file(source, "config.json", **{k: v for k, v in hub.items() if v is not None})
    except Exception as error:  # transformers raises OSError subclasses with long messages
        raise FileNotFoundError(
            f"{source!r} is neither a local folder nor a Hub model whose config.json could be fetched "
            f"(offline?): {str(error).splitlines()[0]}"
        ) from None
    if resolved is None:
        raise FileNotFoundError(f"could not fetch config.json of {source!r}")
    return Path(resolved)


def _check_shards(folder: Path) -> None:
    """Every shard an index names must exist, before anything is loaded."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = folder / index_name
        if not index_path.is_file():
            continue
        index = _read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path} has no weight_map object")
        missing = sorted({name for name in weight_map.values() if not (folder / name).is_file()})
        if missing:
            raise FileNotFoundError(f"{index_path} names shards that are missing: {', '.join(missing)}")


def _safetensors_numel(folder: Path) -> int | None:
    """Elements of the weights transformers will load: the indexed shards, else model.safetensors."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        files = sorted({folder / name for name in _read_json(index_path)["weight_map"].values()})
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with open(file, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                total += count
    return total


def _remote_modeling_entry(raw: dict[str, Any]) -> str | None:
    auto_map = raw.get("auto_map")
    if not isinstance(auto_map, dict):
        return None
    entry = auto_map.get("AutoModelForCausalLM") or next(
        (value for key, value in auto_map.items() if key.startswith("AutoModel")), None
    )
    if isinstance(entry, (list, tuple)):
        entry = entry[0]
    return entry if isinstance(entry, str) else None


def _code_family(entry: str | None) -> tuple[str | None, CodeFamily | None]:
    """(module name, known family) of an auto_map entry such as ``repo--modeling_x.Class``."""
    if entry is None:
        return None, None
    module = entry.split("--")[-1].rsplit(".", 1)[0]
    return module, CODE_FAMILIES.get(module)


def _rope_dict(raw: dict[str, Any]) -> dict[str, Any] | None:
    rope = raw.get("rope_parameters") or raw.get("rope_scaling")
    return dict(rope) if isinstance(rope, dict) else None


def _declared_scaling(
    raw: dict[str, Any], family: CodeFamily | None, module: str | None, where: str
) -> tuple[RopeScaling, list[str]]:
    reasons: list[str] = []
    rope = _rope_dict(raw)
    rope_type = None if rope is None else (rope.get("rope_type") or rope.get("type"))
    if rope is None or rope_type in (None, "default"):
        reasons.append("the config declares no rope scaling: plain RoPE")
        return RopeScaling(method="none"), reasons
    stated = dict(rope)
    if family is not None and rope_type in ("yarn", "dynamic-yarn"):
        for key in ("beta_fast", "beta_slow", "mscale_coefficient"):
            if stated.get(key) is None:
                stated[key] = getattr(family, key)
                reasons.append(f"{key}={getattr(family, key)}: {family.description} ({module}.py) uses it")
            else:
                reasons.append(f"{key}={stated[key]}: stated in the config")
    elif module is not None and rope_type in ("yarn", "dynamic-yarn"):
        logger.warning(
            "%s: auto_map names %s.py, which yarn_rope does not know; using the config's rope settings "
            "(transformers' defaults where it states none)",
            where,
            module,
        )
        reasons.append(f"{module}.py is not a modeling file yarn_rope knows: the config's values are used")
    context = {
        key: raw[key] for key in ("max_position_embeddings", "original_max_position_embeddings") if key in raw
    }
    try:
        scaling = RopeScaling.from_hf(context | {"rope_scaling": stated})
    except (ValueError, TypeError) as error:
        raise type(error)(f"{where}: rope scaling {rope}: {error}") from None
    reasons.insert(0, f"the config declares {rope_type!r} with factor={rope.get('factor')}")
    return scaling, reasons


def _neutral_rope(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with plain RoPE, so the native class builds whatever the checkpoint declared."""
    cleaned = {key: value for key, value in raw.items() if key != "auto_map"}
    rope = _rope_dict(raw)
    if rope is not None and not any(isinstance(value, dict) for value in rope.values()):
        kept: dict[str, Any] = {
            key: rope[key] for key in ("rope_theta", "partial_rotary_factor") if key in rope
        }
        if "rope_parameters" in raw:
            cleaned["rope_parameters"] = {"rope_type": "default"} | kept
        if "rope_scaling" in raw:
            cleaned["rope_scaling"] = None
            cleaned.update(kept)
    return cleaned


def _gguf_scaling(path: Path) -> tuple[dict[str, Any] | None, int]:
    """(rope scaling dict from ``{arch}.rope.scaling.*``, element count of the tensors)."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading a GGUF file needs the gguf package: pip install gguf")
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    numel = sum(int(tensor.n_elements) for tensor in reader.tensors)
    prefix = f"{arch}.rope.scaling."
    rope_type = value(prefix + "type")
    if rope_type in (None, "none"):
        return None, numel
    names = {
        "factor": "factor",
        "original_context_length": "original_max_position_embeddings",
        "finetuned": "finetuned",
        "attn_factor": "attn_factor",
        "yarn_attn_factor": "attn_factor",
        "yarn_beta_fast": "beta_fast",
        "yarn_beta_slow": "beta_slow",
        "yarn_ext_factor": "extrapolation_factor",
        "yarn_log_multiplier": "mscale_coefficient",
    }
    scaling: dict[str, Any] = {"type": rope_type}
    for gguf_name, ours in names.items():
        found = value(prefix + gguf_name)
        if found is not None:
            scaling[ours] = found
    if scaling.get("attn_factor") == 1.0:
        del scaling["attn_factor"]
    return scaling, numel


def plan_load(
    name_or_path: str | os.PathLike[str],
    *,
    attn_implementation: str = "auto",
    dtype: str | torch.dtype = "auto",
    device_map: Any = None,
    gguf_file: str | None = None,
    scaling: RopeScaling | None = None,
    **hub_kwargs: Any,
) -> LoadPlan:
    """Decide how to load a checkpoint without loading its weights (``yarn-rope inspect``).

    Reads ``config.json`` (or the GGUF metadata), recognises the scaling it declares and which
    modeling file trained it, and chooses the attention kernel and dtype. See
    :func:`from_pretrained` for the arguments.

    Raises:
        FileNotFoundError: missing folder, config or shards.
        ValueError: corrupt JSON, a config without ``model_type``, bad scaling values, an
            architecture transformers has no native class for.
    """
    source = os.fspath(name_or_path)
    hub = {key: hub_kwargs.get(key) for key in _HUB_KEYS if key in hub_kwargs}
    cuda = _uses_cuda(device_map)
    torch_dtype = choose_dtype(dtype, cuda=cuda)
    attention, attn_reason = choose_attention(attn_implementation, dtype=torch_dtype, cuda=cuda)
    bytes_per = torch.empty((), dtype=torch_dtype).element_size()

    if gguf_file is not None:
        folder = Path(source)
        gguf_path = folder / gguf_file if folder.is_dir() else Path(gguf_file)
        if not gguf_path.is_file():
            raise FileNotFoundError(f"no GGUF file at {gguf_path}")
        rope, numel = _gguf_scaling(gguf_path)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(
            folder if folder.is_dir() else gguf_path.parent, gguf_file=gguf_path.name
        )
        raw = config.to_dict()
        raw.pop("rope_parameters", None)  # transformers' GGUF config has no scaling: ours replaces it
        raw["rope_scaling"] = rope
        where = str(gguf_path)
        weight_bytes: int | None = numel * bytes_per
    else:
        config_path = _config_file(source, hub)
        raw = _read_json(config_path)
        where = str(config_path)
        folder = config_path.parent
        _check_shards(folder)
        numel_or_none = _safetensors_numel(folder)
        weight_bytes = None if numel_or_none is None else numel_or_none * bytes_per

    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(
            f"{where} has no model_type; yarn_rope needs it to pick the native transformers class"
        )
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"{where}: model_type {model_type!r} has no native class in transformers "
            f"{_transformers_version()}; yarn_rope never falls back to the checkpoint's own code"
        )
    entry = _remote_modeling_entry(raw)
    module, family = _code_family(entry)
    declared_scaling, reasons = _declared_scaling(raw, family, module, where)
    if scaling is not None:
        reasons.append("settings given by the caller replace the declared ones")
        declared_scaling = scaling
    return LoadPlan(
        source=source if gguf_file is None else f"{source} ({gguf_file})",
        model_type=model_type,
        declared=_rope_dict(raw),
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


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def from_pretrained(
    name_or_path: str | os.PathLike[str],
    *,
    attn_implementation: str = "auto",
    dtype: str | torch.dtype = "auto",
    device_map: Any = None,
    scaling: RopeScaling | None = None,
    angles: AngleMode = "precise",
    **from_pretrained_kwargs: Any,
) -> Any:
    """Load a causal LM with its rope scaling applied exactly, never executing checkpoint code.

    Args:
        name_or_path: a local folder, a Hub name (when a Hub is reachable), or a folder with a
            GGUF file (pass ``gguf_file=``).
        attn_implementation: ``"auto"`` (flash-attention 2 on CUDA with ``flash_attn`` and
            half precision, else SDPA, else eager) or a transformers kernel name.
        dtype: ``"auto"`` (bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU),
            ``"float32"``, ``"float16"``, ``"bfloat16"`` or a ``torch.dtype``.
        device_map: passed to transformers/accelerate (``"auto"`` spreads a 70B model over the
            GPUs; ``max_memory=`` passes through too). Weights are loaded once, straight into
            place. Without one the weights load to the CPU, and ``"auto"`` choices are the CPU's.
        scaling: settings that replace what the checkpoint declares.
        angles: angle mode of the inserted rotary modules (see :mod:`yarn_rope.rotary`).
        **from_pretrained_kwargs: passed to transformers' ``from_pretrained`` unchanged
            (``gguf_file``, ``revision``, ``quantization_config``, ``max_memory``, ...).
            ``trust_remote_code`` is ignored with a warning.

    Returns:
        the model (a native transformers ``PreTrainedModel``), patched when it declares scaling.

    Raises:
        FileNotFoundError, ValueError, ImportError: see :func:`plan_load` and
            :func:`choose_attention`; raised before any weight is loaded.
    """
    kwargs = dict(from_pretrained_kwargs)
    if kwargs.pop("trust_remote_code", False):
        logger.warning(
            "trust_remote_code=True is ignored: yarn_rope loads the native transformers class and never "
            "executes code from the checkpoint"
        )
    for legacy in ("torch_dtype",):
        if legacy in kwargs:
            raise TypeError(f"pass dtype= instead of {legacy}=")
    gguf_file = kwargs.get("gguf_file")
    plan = plan_load(
        name_or_path,
        attn_implementation=attn_implementation,
        dtype=dtype,
        device_map=device_map,
        gguf_file=gguf_file,
        scaling=scaling,
        **{key: kwargs[key] for key in _HUB_KEYS if key in kwargs},
    )
    logger.info(
        "yarn_rope.from_pretrained: %s (%s), scaling %s, attention %s (%s), dtype %s",
        plan.source,
        plan.model_type,
        plan.scaling.method,
        plan.attn_implementation,
        plan.attn_reason,
        plan.dtype,
    )
    from transformers import AutoConfig, AutoModelForCausalLM

    if gguf_file is None:
        cleaned = _neutral_rope(plan.config)
        model_type = cleaned.pop("model_type")
        kwargs["config"] = AutoConfig.for_model(model_type, **cleaned)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        dtype=getattr(torch, plan.dtype),
        attn_implementation=plan.attn_implementation,
        device_map=device_map,
        trust_remote_code=False,
        **kwargs,
    )
    # output_loading_info=True makes transformers return (model, info).
    loaded = model[0] if isinstance(model, tuple) else model
    if plan.scaling.method != "none":
        patch(loaded, plan.scaling, angles=angles, replace=True)
    return model
