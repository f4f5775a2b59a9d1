"""GGUF copies with new metadata (yarn_rope.gguf.write_copy, export to "gguf") and GGUF reading.

Tensors are compared byte for byte with the ``gguf`` package's own reader; the metadata llama.cpp
reads is compared with what its source (0c1e57098, as vendored by llama-cpp-python 0.3.36) reads
for each architecture.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import yarn_rope
from yarn_rope import methods as M
from yarn_rope.cli import main
from yarn_rope.export import export
from yarn_rope.gguf import write_copy

gguf = pytest.importorskip("gguf")

HEAD_DIM = 64
VOCAB = 32


def _tiny(
    path: Path,
    *,
    arch: str = "llama",
    fields: dict[str, Any] | None = None,
    alignment: int | None = None,
    tensors: dict[str, np.ndarray] | None = None,
) -> Path:
    """A small GGUF file: float32, float16 and raw Q8_0 tensors (and ``tensors``), and a Llama's metadata."""
    writer = gguf.GGUFWriter(str(path), arch=arch)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_uint32(f"{arch}.context_length", 4096)
    writer.add_uint32(f"{arch}.embedding_length", HEAD_DIM)
    writer.add_uint32(f"{arch}.attention.head_count", 1)
    writer.add_uint32(f"{arch}.block_count", 1)
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    writer.add_array("general.tags", ["a", "b"])
    for key, value in (fields or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_float32(key, value)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((VOCAB, HEAD_DIM)).astype(np.float32))
    writer.add_tensor("output_norm.weight", rng.standard_normal(HEAD_DIM).astype(np.float16))
    q8 = rng.integers(0, 256, size=(4, 34 * 2), dtype=np.uint8)  # 4 rows of 64 Q8_0 values
    writer.add_tensor("blk.0.ffn_up.weight", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    for name, array in (tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _fields(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def assert_tensors_identical(first: Path, second: Path) -> None:
    a, b = gguf.GGUFReader(str(first)), gguf.GGUFReader(str(second))
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors, strict=True):
        assert (x.tensor_type, list(x.shape)) == (y.tensor_type, list(y.shape))
        assert x.data.tobytes() == y.data.tobytes()
    assert a.alignment == b.alignment


# ------------------------------------------------------------------------------------------------
# write_copy
# ------------------------------------------------------------------------------------------------


def test_copy_sets_and_removes_keys_and_keeps_tensors_byte_for_byte(tmp_path):
    source = _tiny(tmp_path / "in.gguf", fields={"llama.rope.scaling.yarn_attn_factor": 1.5})
    before = source.read_bytes()
    copy = write_copy(
        source,
        tmp_path / "out.gguf",
        fields={
            "llama.context_length": 8192,
            "llama.rope.scaling.type": "yarn",
            "llama.rope.scaling.factor": 2.0,
        },
        remove=["llama.rope.scaling.yarn_attn_factor", "absent.key"],
        progress=False,
    )
    assert copy.path == tmp_path / "out.gguf" and copy.tensor_count == 3
    assert copy.removed == ("llama.rope.scaling.yarn_attn_factor",)
    assert_tensors_identical(source, copy.path)
    old, new = _fields(source), _fields(copy.path)
    assert new.pop("llama.context_length") == 8192 and old.pop("llama.context_length") == 4096
    assert new.pop("llama.rope.scaling.type") == "yarn" and new.pop("llama.rope.scaling.factor") == 2.0
    del old["llama.rope.scaling.yarn_attn_factor"]
    assert new == old  # everything else as it was, arrays included
    reader = gguf.GGUFReader(str(copy.path))
    assert reader.fields["llama.context_length"].types == [
        gguf.GGUFValueType.UINT32
    ]  # the existing type kept
    assert reader.fields["llama.rope.scaling.factor"].types == [gguf.GGUFValueType.FLOAT32]
    assert source.read_bytes() == before
    # Readable as open() would have made it (the server that loads it may be another user).
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(copy.path.stat().st_mode) == 0o666 & ~umask


def test_copy_keeps_a_custom_alignment(tmp_path):
    source = _tiny(tmp_path / "in.gguf", alignment=64)
    copy = write_copy(source, tmp_path / "out.gguf", fields={"llama.context_length": 1}, progress=False)
    assert gguf.GGUFReader(str(copy.path)).alignment == 64
    assert_tensors_identical(source, copy.path)


def test_copy_refuses_to_overwrite_its_input(tmp_path):
    source = _tiny(tmp_path / "in.gguf")
    before = source.read_bytes()
    with pytest.raises(ValueError, match="refusing to overwrite the input"):
        write_copy(source, source, fields={})
    (tmp_path / "link.gguf").symlink_to(source)
    with pytest.raises(ValueError, match="refusing to overwrite the input"):
        write_copy(source, tmp_path / "link.gguf", fields={})
    with pytest.raises(ValueError, match="refusing to overwrite the input"):
        write_copy(source, tmp_path / "sub" / ".." / "in.gguf", fields={})
    assert source.read_bytes() == before


def test_copy_errors(tmp_path):
    source = _tiny(tmp_path / "in.gguf")
    with pytest.raises(ValueError, match="is a folder"):
        write_copy(source, tmp_path, fields={})
    with pytest.raises(FileNotFoundError, match="no folder"):
        write_copy(source, tmp_path / "missing" / "out.gguf", fields={})
    with pytest.raises(ValueError, match=r"general\.architecture"):
        write_copy(source, tmp_path / "out.gguf", fields={"general.architecture": "qwen2"})
    (tmp_path / "pointer.gguf").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ValueError, match="git-lfs pointer"):
        write_copy(tmp_path / "pointer.gguf", tmp_path / "out.gguf", fields={})
    with pytest.raises(TypeError, match="must be a bool, int, float or str"):
        write_copy(source, tmp_path / "out.gguf", fields={"new.key": [1, 2]})
    assert not (tmp_path / "out.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.gguf", "pointer.gguf"]  # no temporary left


def test_interrupted_copy_leaves_the_old_output_and_no_temporary(tmp_path, monkeypatch):
    source = _tiny(tmp_path / "in.gguf")
    out = tmp_path / "out.gguf"
    out.write_bytes(b"previous")

    def fail(self: Any, *args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fail)
    with pytest.raises(KeyboardInterrupt):
        write_copy(source, out, fields={"llama.context_length": 1})
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.gguf", "out.gguf"]


# ------------------------------------------------------------------------------------------------
# export to "gguf": llama.cpp's keys, and yarn_rope reads back the same settings
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"factor": 2.0}, id="yarn-x2"),
        pytest.param(
            {"factor": 2.7, "beta_fast": 128.0, "beta_slow": 2.0, "mscale_coefficient": 0.07},
            id="yarn-mistral",
        ),
        pytest.param({"method": "linear", "factor": 3.0}, id="linear"),
        pytest.param({"method": "none"}, id="none"),
    ],
)
def test_exported_gguf_reads_back_the_same_settings(tmp_path, settings):
    source = _tiny(tmp_path / "in.gguf")
    result = export(source, "gguf", out=tmp_path / "out.gguf", progress=False, **settings)
    assert result.output == str(tmp_path / "out.gguf")
    assert_tensors_identical(source, tmp_path / "out.gguf")
    plan = yarn_rope.plan_load(tmp_path, gguf_file="out.gguf")
    assert plan.scaling == result.scaling
    again = export(tmp_path / "out.gguf", "llama.cpp")
    assert again.scaling == result.scaling


def test_exported_gguf_holds_what_llamacpp_reads(tmp_path):
    """Yarn-Mistral's settings in a llama file: llama.cpp reads type, factor, original length and
    attn_factor (src/llama-model.cpp) but the betas only for grok / mistral3 (src/models/*.cpp)."""
    source = _tiny(
        tmp_path / "in.gguf",
        fields={"llama.rope.scaling.yarn_attn_factor": 1.3, "llama.rope.scaling.yarn_log_multiplier": 0.1},
    )
    result = export(
        source,
        "gguf",
        out=tmp_path / "out.gguf",
        progress=False,
        factor=8.0,
        original_max_position_embeddings=4096,
        beta_fast=128.0,
        beta_slow=2.0,
        mscale_coefficient=0.07,
    )
    fields = _fields(tmp_path / "out.gguf")
    s = 8.0
    assert fields["llama.rope.scaling.type"] == "yarn"
    assert fields["llama.rope.scaling.factor"] == s
    assert fields["llama.rope.scaling.original_context_length"] == 4096
    assert fields["llama.context_length"] == 32768
    # llama_context: cos/sin x get_mscale(s) x attn_factor (the GGUF key) = 0.07 ln s + 1.
    wanted = 0.07 * math.log(s) + 1
    assert fields["llama.rope.scaling.attn_factor"] * (0.1 * math.log(s) + 1) == pytest.approx(
        wanted, rel=1e-7
    )
    assert "llama.rope.scaling.yarn_attn_factor" not in fields  # replaced as a whole
    assert fields["llama.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1)  # not ours: kept
    assert json.loads(fields[M.GGUF_SETTINGS_KEY])["mscale_coefficient"] == 0.07
    # A llama file's betas reach llama.cpp only as flags: the result says so and passes them.
    assert any("only for grok, mistral3 models" in note for note in result.notes)
    flags = result.command
    assert (
        flags[flags.index("--yarn-beta-fast") + 1] == "128.0"
        and flags[flags.index("--yarn-beta-slow") + 1] == "2.0"
    )
    assert "--rope-scaling" not in flags and "--override-kv" not in flags  # the file carries those
    assert (result.python["yarn_beta_fast"], result.python["yarn_beta_slow"]) == (128.0, 2.0)


def test_ntk_is_written_as_a_new_base(tmp_path):
    source = _tiny(tmp_path / "in.gguf")
    result = export(source, "gguf", out=tmp_path / "out.gguf", progress=False, method="ntk", factor=4.0)
    fields = _fields(tmp_path / "out.gguf")
    wanted = 10000.0 * 4.0 ** (HEAD_DIM / (HEAD_DIM - 2))
    assert fields["llama.rope.freq_base"] == pytest.approx(wanted, rel=1e-6)
    assert fields["llama.rope.scaling.type"] == "none"
    plan = yarn_rope.plan_load(tmp_path, gguf_file="out.gguf")
    assert plan.scaling.method == "none"  # the file is plain RoPE with the new base: the same table
    assert result.scaling.method == "ntk"


def test_settings_key_edited_by_another_tool_is_ignored(tmp_path, caplog):
    source = _tiny(tmp_path / "in.gguf")
    export(source, "gguf", out=tmp_path / "mid.gguf", progress=False, factor=4.0, beta_fast=64.0)
    write_copy(
        tmp_path / "mid.gguf",
        tmp_path / "out.gguf",
        fields={"llama.rope.scaling.factor": 2.0},
        progress=False,
    )
    with caplog.at_level(logging.WARNING, logger="yarn_rope.methods"):
        plan = yarn_rope.plan_load(tmp_path, gguf_file="out.gguf")
    assert plan.scaling.factor == 2.0 and plan.scaling.beta_fast == 64.0  # llama.cpp's keys win
    assert any("edited by another tool" in record.getMessage() for record in caplog.records)


def test_cli_export_gguf_and_inspect_it(tmp_path, capsys):
    source = _tiny(tmp_path / "in.gguf")
    out = tmp_path / "out.gguf"
    argv = ["export", str(source), "--to", "gguf", "--out", str(out), "--factor", "2", "--no-progress"]
    assert main([*argv, "--json", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "command:   llama-server -m" in printed
    assert json.loads((tmp_path / "r.json").read_text())["output"] == str(out)
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "will use:     yarn factor=2.0 original=4096" in printed
    assert main(["export", str(source), "--to", "gguf", "--out", str(source)]) == 2
    assert "refusing to overwrite the input" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "r.json"), "--to", "gguf", "--out", str(out)]) == 2
    assert "is not a .gguf file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Reading GGUF metadata as llama.cpp does
# ------------------------------------------------------------------------------------------------


def _metadata(arch: str, **scaling: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"general.architecture": arch, f"{arch}.rope.scaling.type": "yarn"}
    out |= {f"{arch}.rope.scaling.{key}": value for key, value in scaling.items()}
    return out


def test_yarn_log_multiplier_is_deepseeks_mscale_all_dim():
    """DeepSeek-V2-Lite: mscale = mscale_all_dim = 0.707, written as 0.1 * 0.707 (conversion/deepseek.py);
    llama.cpp's deepseek2 loader divides by 0.1 and llama_context uses mscale = mscale_all_dim: the
    cos/sin multiplier is 1 (the temperature goes into the softmax scale instead)."""
    config = M.from_gguf_metadata(
        _metadata("deepseek2", factor=40.0, original_context_length=4096, yarn_log_multiplier=0.0707)
    )
    scaling = yarn_rope.RopeScaling.from_hf(config["rope_scaling"])
    assert scaling.mscale == pytest.approx(0.707) and scaling.mscale_all_dim == pytest.approx(0.707)
    assert scaling.attention_scaling() == pytest.approx(1.0)
    assert scaling.mscale_coefficient == 0.1  # not a slope of YaRN's temperature
    # Ministral 3 (conversion/mistral3.py writes mscale_all_dim as is; llama_context takes mscale = 1).
    config = M.from_gguf_metadata(
        _metadata("mistral3", factor=16.0, original_context_length=16384, yarn_log_multiplier=1.0)
    )
    assert yarn_rope.RopeScaling.from_hf(config["rope_scaling"]).attention_scaling() == pytest.approx(1.0)


def test_keys_llamacpp_ignores_are_ignored_with_a_warning(caplog):
    metadata = _metadata(
        "llama", factor=4.0, original_context_length=4096, yarn_log_multiplier=0.07, yarn_attn_factor=1.5
    )
    with caplog.at_level(logging.WARNING, logger="yarn_rope.methods"):
        config = M.from_gguf_metadata(metadata)
    scaling = yarn_rope.RopeScaling.from_hf(config["rope_scaling"])
    assert scaling.attention_scaling() == pytest.approx(0.1 * math.log(4.0) + 1)
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "yarn_log_multiplier" in messages and "yarn_attn_factor" in messages


def test_attn_factor_multiplies():
    config = M.from_gguf_metadata(
        _metadata("llama", factor=4.0, original_context_length=4096, attn_factor=0.5)
    )
    scaling = yarn_rope.RopeScaling.from_hf(config["rope_scaling"])
    assert scaling.attention_scaling() == pytest.approx(0.5 * (0.1 * math.log(4.0) + 1))


# ------------------------------------------------------------------------------------------------
# The real file
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_copy_is_byte_for_byte_and_loads_patched(tmp_path):
    from yarn_rope.eval.data import default_model_file

    try:
        source = default_model_file()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    result = export(source, "gguf", out=tmp_path / "smollm2-yarn.gguf", progress=False, factor=2.0)
    assert_tensors_identical(source, tmp_path / "smollm2-yarn.gguf")
    assert (
        os.path.getsize(source)
        <= os.path.getsize(tmp_path / "smollm2-yarn.gguf")
        <= os.path.getsize(source) + 4096
    )
    model = yarn_rope.from_pretrained(tmp_path, gguf_file="smollm2-yarn.gguf")
    info = yarn_rope.patch_info(model)
    assert info is not None and info.scaling == result.scaling
    assert model.config.max_position_embeddings == 16384


def test_settings_key_agrees_with_keys_left_at_llamacpps_defaults(tmp_path, caplog):
    source = _tiny(tmp_path / "in.gguf")
    result = export(source, "gguf", out=tmp_path / "mid.gguf", progress=False, factor=3.0, beta_fast=64.0)
    removed = ["llama.rope.scaling.attn_factor", "llama.rope.scaling.yarn_beta_slow"]  # 1.0 and 1.0
    write_copy(tmp_path / "mid.gguf", tmp_path / "out.gguf", fields={}, remove=removed, progress=False)
    with caplog.at_level(logging.WARNING, logger="yarn_rope.methods"):
        plan = yarn_rope.plan_load(tmp_path, gguf_file="out.gguf")
    assert plan.scaling == result.scaling
    assert not [r for r in caplog.records if M.GGUF_SETTINGS_KEY in r.getMessage()]


# ------------------------------------------------------------------------------------------------
# Issue 24: no silent-wrong GGUF export, no litter
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_a_gguf_without_rope_is_refused_naming_its_architecture(tmp_path, arch):
    source = _tiny(tmp_path / "in.gguf", arch=arch)
    with pytest.raises(ValueError, match=f"{arch}.*no rotary"):
        export(source, "gguf", out=tmp_path / "out.gguf", factor=2.0, original_max_position_embeddings=4096)
    with pytest.raises(ValueError, match=f"{arch}.*no rotary"):
        export(source, "sglang", factor=2.0, original_max_position_embeddings=4096)
    assert not (tmp_path / "out.gguf").exists()


def test_method_none_on_a_yarn_copy_restores_the_original_context(tmp_path):
    source = _tiny(tmp_path / "a.gguf")
    export(source, "gguf", out=tmp_path / "b.gguf", factor=2.0, progress=False)
    assert _fields(tmp_path / "b.gguf")["llama.context_length"] == 8192
    result = export(tmp_path / "b.gguf", "gguf", out=tmp_path / "c.gguf", method="none", progress=False)
    fields = _fields(tmp_path / "c.gguf")
    assert fields["llama.context_length"] == 4096 and result.context_length == 4096
    assert fields["llama.rope.scaling.type"] == "none" and "llama.rope.scaling.factor" not in fields


def test_a_killed_copys_temporary_is_removed_by_the_next_run(tmp_path):
    source = _tiny(tmp_path / "in.gguf")
    litter = tmp_path / ".out.gguf.k1ll3d.tmp"  # what atomic_path left when kill -9 stopped a copy
    litter.write_bytes(b"half a copy")
    other = tmp_path / ".other.gguf.k1ll3d.tmp"  # another output's temporary: not ours to remove
    other.write_bytes(b"x")
    write_copy(source, tmp_path / "out.gguf", fields={})
    assert not litter.exists() and other.exists()


def test_a_running_copys_temporary_is_kept(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    source = _tiny(tmp_path / "in.gguf")
    running = tmp_path / ".out.gguf.running.tmp"
    running.write_bytes(b"being written")
    with open(running, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live copy holds its temporary
        write_copy(source, tmp_path / "out.gguf", fields={})
        assert running.exists()


# ------------------------------------------------------------------------------------------------
# Llama 3.1's rope_freqs tensor (issue 20, D3)
# ------------------------------------------------------------------------------------------------

LLAMA31 = {
    "factor": 8.0,
    "original_max_position_embeddings": 8192,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
}
LLAMA31_BASE = 500000.0


def converted_rope_freqs(
    dim: int, base: float, factor: float, original: int, low: float, high: float
) -> np.ndarray:
    """What convert_hf_to_gguf.py (0c1e57098, LlamaModel.generate_extra_tensors) writes as rope_freqs
    for rope_scaling llama3: per pair of wavelength w, 1 below original / high, factor beyond
    original / low, and 1 / ((1 - t) / factor + t) between, t = (original / w - low) / (high - low)."""
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for freq in freqs:
        wavelength = 2 * math.pi / float(freq)
        if wavelength < original / high:
            out.append(1.0)
        elif wavelength > original / low:
            out.append(factor)
        else:
            t = (original / wavelength - low) / (high - low)
            out.append(1 / ((1 - t) / factor + t))
    return np.array(out, dtype=np.float32)


def llamacpp_angles(rope_freqs: np.ndarray, base: float, positions: np.ndarray) -> np.ndarray:
    """llama.cpp 0c1e57098 ggml/src/ggml-cpu/ops.cpp (ggml_rope_cache_init, rope_yarn) without rope
    scaling (freq_scale 1, ext_factor 0): pair i at position p turns by theta / freq_factors[i], theta
    = p * theta_scale ** i formed by repeated float32 multiplication, theta_scale = base ** (-2 / n_dims);
    the model passes the file's rope_freqs as freq_factors (src/llama-model.cpp, rope_freqs)."""
    dim = 2 * len(rope_freqs)
    theta_scale = np.float32(base ** (-2.0 / dim))
    out = np.empty((len(positions), len(rope_freqs)), dtype=np.float32)
    for row, position in enumerate(positions):
        theta = np.float32(position)
        for i, factor in enumerate(rope_freqs):
            out[row, i] = theta / np.float32(factor)
            theta = np.float32(theta * theta_scale)
    return out


def _llama31_file(tmp_path: Path, **fields: Any) -> Path:
    freqs = converted_rope_freqs(HEAD_DIM, LLAMA31_BASE, 8.0, 8192, 1.0, 4.0)
    return _tiny(
        tmp_path / "llama31.gguf",
        fields={"llama.rope.freq_base": LLAMA31_BASE, "llama.context_length": 131072, **fields},
        tensors={M.ROPE_FREQS_TENSOR: freqs},
    )


def test_llamacpp_divides_each_pair_angle_by_rope_freqs(tmp_path):
    """A converted Llama 3.1 file: llama.cpp's angles are yarn_rope's llama3 table, with no flag."""
    path = _llama31_file(tmp_path)
    read = yarn_rope.gguf.read_metadata(path).rope_freqs
    assert read is not None and len(read) == HEAD_DIM // 2
    factors = np.array(read, dtype=np.float32)
    assert 1 < int(((factors > 1) & (factors < 8)).sum())  # pairs on the ramp
    positions = np.array([1, 100, 4096, 131071], dtype=np.float64)
    ours = yarn_rope.RopeScaling(method="llama3", **LLAMA31).inv_freq(HEAD_DIM, base=LLAMA31_BASE)[0]
    wanted = positions[:, None] * ours.double().numpy()[None, :]
    np.testing.assert_allclose(llamacpp_angles(factors, LLAMA31_BASE, positions), wanted, rtol=5e-6, atol=0)


def test_rope_freqs_is_read_as_llama3_and_served_without_flags(tmp_path):
    path = _llama31_file(tmp_path)
    result = export(path, "llama.cpp")
    assert result.scaling.method == "llama3"
    assert {name: getattr(result.scaling, name) for name in LLAMA31} == LLAMA31
    assert result.command == ("llama-server", "-m", str(path), "-c", "131072")
    assert any("rope_freqs" in note for note in result.notes)
    plan = yarn_rope.plan_load(tmp_path, gguf_file=path.name)
    assert plan.scaling is not None and plan.scaling.method == "llama3" and plan.scaling.factor == 8.0


def test_nothing_is_stacked_on_rope_freqs(tmp_path):
    """Before issue 20, --allow-approximation put YaRN flags on top of the file's rope_freqs."""
    path = _llama31_file(tmp_path)
    for settings in (
        {"method": "yarn", "factor": 8.0},
        {"method": "none"},
        {"method": "linear", "factor": 2.0},
    ):
        with pytest.raises(ValueError, match="rope_freqs"):
            export(path, "llama.cpp", allow_approximation=True, **settings)
    with pytest.raises(ValueError, match="largest relative difference"):
        export(path, "llama.cpp", factor=16.0)  # another llama3 table than the file's


def test_llama3_on_a_file_without_rope_freqs_is_refused(tmp_path):
    path = _tiny(tmp_path / "plain.gguf")
    with pytest.raises(ValueError, match="has none"):
        export(path, "llama.cpp", method="llama3", **LLAMA31, allow_approximation=True)


def test_rope_freqs_that_is_no_llama3_table_is_refused(tmp_path):
    freqs = np.linspace(1.0, 3.0, HEAD_DIM // 2, dtype=np.float32)[::-1].copy()
    path = _tiny(tmp_path / "odd.gguf", tensors={M.ROPE_FREQS_TENSOR: freqs})
    with pytest.raises(ValueError, match=r"not Llama 3\.1's table"):
        export(path, "llama.cpp")
