"""Dynamic scaling with a KV cache: re-rotation of cached keys (``yarn_rope.cache``).

What is compared with what (see the docstring of :mod:`yarn_rope.cache`):

* one layer: cached decoding equals recomputing the whole prefix at every length;
* several layers: cached decoding equals a decode loop that caches keys *before* RoPE and rotates
  all of them with the current table at every step (written here, independently of the library);
  it is *not* equal to a full recompute once the table has changed;
* half precision: each re-rotation rounds once more, so the bucketed schedule (``sqrt(2)``) keeps
  the cache close to keys rotated once from the exact source, the exact schedule does not.

The models are tiny random Llamas (``initializer_range`` 0.1, so that attention is sharp enough
for positions to matter: logits have a spread of about 0.8 and stale keys change them by ~1).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import pytest
import torch
import transformers
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import yarn_rope
from yarn_rope import RopeScaling, RotaryEmbedding, patch, patch_info, patched, unpatch
from yarn_rope.cache import KeyCacheSync, UnsupportedCacheError, rerotate_keys
from yarn_rope.patch import cache_sync

ORIGINAL = 32  # pretrained context of the tiny models: dynamic scaling starts beyond it
VOCAB = 64
PROMPT = 20
HEAD_DIM = 16
ATOL = 1e-5  # fp32 "equal": the measured differences are a few 1e-6 at logits of spread ~0.8


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("quiet_transformers")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (many threads spin against concurrent jobs)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build(layers: int = 1, *, seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    """A tiny random Llama in eval mode (head_dim 16, 4 heads, 2 kv heads, vocab 64)."""
    kwargs: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": ORIGINAL,
        "initializer_range": 0.1,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        **overrides,
    }
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens in every row
    model.generation_config.pad_token_id = 0
    return model


def dynamic(model: nn.Module, method: str = "dynamic-yarn", **kwargs: Any) -> nn.Module:
    """``model`` patched with a dynamic method (not fine-tuned) starting beyond ORIGINAL."""
    if method == "dynamic-ntk":
        kwargs.setdefault("factor", 2.0)
    kwargs.setdefault("schedule", "exact")
    return patch(model, method=method, original_max_position_embeddings=ORIGINAL, **kwargs)


def sync_hook(model: nn.Module) -> KeyCacheSync:
    """The KeyCacheSync that patch registered on the decoder (the only one in the model)."""
    hooks = [
        hook
        for module in model.modules()
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, KeyCacheSync)
    ]
    assert len(hooks) == 1, hooks
    return hooks[0]


def token_ids(length: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def cached_decode(
    model: nn.Module,
    prompt: torch.Tensor,
    steps: int,
    *,
    forced: torch.Tensor | None = None,
    cache: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt, then ``steps`` one-token forwards through a cache (greedy, or the tokens ``forced``).

    Returns:
        ``(ids [1, PROMPT + steps], logits [steps + 1, VOCAB])``: the fed tokens and the
        next-token logits after the prompt and after each step (row ``i``: prefix length
        ``prompt_len + i``).
    """
    cache = DynamicCache(config=model.config) if cache is None else cache
    ids = prompt
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1].float()]
    for step in range(steps):
        if forced is not None:
            token = forced[:, prompt.shape[1] + step][:, None]
        else:
            token = out.logits[:, -1:].argmax(-1)
        ids = torch.cat([ids, token], dim=-1)
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1].float())
    return ids, torch.cat(logits)


@torch.no_grad()
def recompute(model: nn.Module, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Next-token logits of every prefix ``ids[:, :n]``, ``n = start ..``, each computed from scratch
    (so each under the dynamic table of its own length)."""
    return torch.cat(
        [
            model(input_ids=ids[:, :n], use_cache=False).logits[:, -1].float()
            for n in range(start, ids.shape[1] + 1)
        ]
    )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(keys: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scale: float) -> torch.Tensor:
    """Keys ``[b, h, s, d]`` rotated at ``positions [b or 1, s]`` with ``inv_freq`` and amplitude
    ``scale``, all in float64 (the first ``2 * len(inv_freq)`` channels; the rest pass through)."""
    rot = 2 * inv_freq.shape[-1]
    angles = positions.double()[..., None] * inv_freq.double()  # [b, s, rot/2]
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # [b, 1, s, rot]
    part = keys[..., :rot].double()
    rotated = (part * angles.cos() + rotate_half(part) * angles.sin()) * scale
    return torch.cat((rotated, keys[..., rot:].double()), dim=-1)


def capture_pre_rope(model: nn.Module) -> tuple[list[list[torch.Tensor]], list[Any]]:
    """Record every attention layer's keys before RoPE (``[b, n_kv, s, d]`` per call, float64).

    Hooks ``k_norm`` where the architecture has one (Qwen3, ...), else ``k_proj``.
    """
    store: list[list[torch.Tensor]] = [[] for _ in model.model.layers]

    def hook_for(index: int):
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            b, s = output.shape[0], output.shape[1]
            store[index].append(output.detach().reshape(b, s, -1, HEAD_DIM).transpose(1, 2).double())

        return hook

    handles = []
    for index, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        target = getattr(attn, "k_norm", None) or attn.k_proj
        handles.append(target.register_forward_hook(hook_for(index)))
    return store, handles


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference).norm() / reference.norm())


# ------------------------------------------------------------------------------------------------
# (a) one layer: cached decoding equals a full recompute; without re-rotation it does not
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dynamic-yarn", "dynamic-ntk"])
def test_one_layer_cached_decoding_equals_full_recompute(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = 220
    model = dynamic(build(1), method)
    hook = sync_hook(model)
    rotary = model.model.rotary_emb
    tables: list[tuple[float, float]] = []

    original = KeyCacheSync._rerotate

    def spy(self: KeyCacheSync, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        tables.append((rotary.attention_scaling, float(rotary.inv_freq[-1])))

    monkeypatch.setattr(KeyCacheSync, "_rerotate", spy)
    ids, cached = cached_decode(model, token_ids(PROMPT), steps)  # greedy
    full = recompute(model, ids, PROMPT)
    difference = (cached - full).abs().max().item()
    print(f"\n{method}: cached vs recompute max |diff| {difference:.2e}, rerotations {hook.rerotations}")
    assert difference < ATOL
    # The exact schedule changes the table at every length beyond the threshold (33 .. 240).
    assert hook.rerotations == PROMPT + steps - ORIGINAL
    assert len(set(tables)) == len(tables)  # each re-rotation went to a new table
    if method == "dynamic-yarn":  # the attention factor grows with the length
        assert [scale for scale, _ in tables] == sorted(scale for scale, _ in tables)
        assert tables[-1][0] > tables[0][0] > 1.0
    else:
        assert all(scale == 1.0 for scale, _ in tables)

    # Stale keys (what other implementations do): same tokens, no re-rotation.
    monkeypatch.setattr(KeyCacheSync, "_rerotate", lambda self, *args, **kwargs: None)
    _, stale = cached_decode(model, ids[:, :PROMPT], steps, forced=ids)
    stale_difference = (stale - full).abs().amax(-1)
    print(f"{method}: stale keys vs recompute max |diff| {stale_difference.max().item():.3g}")
    threshold_row = ORIGINAL - PROMPT  # row i: prefix of PROMPT + i tokens
    assert stale_difference[: threshold_row + 1].max() < ATOL  # identical until the table changes
    assert stale_difference.max() > 1e-3
    # ... and stays wrong at (almost) every later step (a step whose query attends only to itself
    # does not see the stale keys).
    assert (stale_difference[threshold_row + 1 :] > 1e-3).float().mean() > 0.9


def test_chunked_prefill_across_the_threshold_equals_full_recompute() -> None:
    """Several new tokens at once (past 24, then 16 more up to 40): every position's logits."""
    model = dynamic(build(1))
    ids = token_ids(56)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :24], past_key_values=cache)
        model(input_ids=ids[:, 24:40], past_key_values=cache)  # crosses the threshold: 40 > 32
        chunk = model(input_ids=ids[:, 40:56], past_key_values=cache).logits
        full = model(input_ids=ids).logits[:, 40:]
    assert sync_hook(model).rerotations == 2
    torch.testing.assert_close(chunk, full, atol=ATOL, rtol=0)


LAYOUTS: dict[str, tuple[type, type, dict[str, Any], dict[str, Any]]] = {
    # name: (config class, model class, config overrides, patch arguments)
    "qwen3_k_norm": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": HEAD_DIM}, {}),
    "phi3_partial": (
        transformers.Phi3Config,
        transformers.Phi3ForCausalLM,
        {"partial_rotary_factor": 0.5},
        {},
    ),
    "gpt_neox_partial": (
        transformers.GPTNeoXConfig,
        transformers.GPTNeoXForCausalLM,
        {"partial_rotary_factor": 0.25},
        {},
    ),
    "mistral_sliding_window": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        {"sliding_window": 16},
        {},
    ),
    "gemma3_sliding_layer_types_all": (
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        {"head_dim": HEAD_DIM, "layer_types": ["sliding_attention"], "sliding_window": 16},
        {"layer_types": "all"},
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_other_rotary_layouts_one_layer_equals_full_recompute(layout: str) -> None:
    """k_norm before RoPE, partial rotary (tail channels not rotated), sliding-window cache layers
    (which keep only the last keys: re-rotated at their own positions)."""
    config_class, model_class, overrides, patch_arguments = LAYOUTS[layout]
    config = config_class(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=ORIGINAL,
        initializer_range=0.1,
        pad_token_id=0,
        **overrides,
    )
    torch.manual_seed(0)
    model = dynamic(model_class(config).eval(), **patch_arguments)
    steps = 70
    ids = token_ids(PROMPT + steps, seed=3)
    cache = DynamicCache(config=model.config)
    _, cached = cached_decode(model, ids[:, :PROMPT], steps, forced=ids, cache=cache)
    full = recompute(model, ids, PROMPT)
    assert sync_hook(model).rerotations == PROMPT + steps - ORIGINAL
    torch.testing.assert_close(cached, full, atol=ATOL, rtol=0)
    if "sliding" in layout:  # the window branch of the re-rotation was taken
        assert cache.layers[0].keys.shape[-2] < cache.get_seq_length()


# ------------------------------------------------------------------------------------------------
# (b) four layers: equal to a pre-RoPE key cache, not to a full recompute
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def pre_rope_reference_decode(
    model: nn.Module, ids: torch.Tensor, prompt: int, monkeypatch: pytest.MonkeyPatch
) -> torch.Tensor:
    """The same cached decoding, except that the cache's keys are rebuilt before every forward from
    the pre-RoPE keys, rotated with the current table at positions ``0 .. n - 1`` (float64, then
    cast once): the paper's recommendation (store keys before RoPE), without our re-rotation."""
    rotary = model.model.rotary_emb
    store, handles = capture_pre_rope(model)

    def rebuild(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        cache = kwargs["past_key_values"]
        past = cache.get_seq_length()
        if past == 0:
            return
        rotary.set_length(past + kwargs["input_ids"].shape[1])  # the table for the current length
        positions = torch.arange(past)[None]
        for index, layer in enumerate(cache.layers):
            pre = torch.cat(store[index], dim=-2)[..., :past, :]
            layer.keys = rope(pre, positions, rotary.inv_freq, rotary.attention_scaling).to(layer.keys.dtype)

    handles.append(model.model.register_forward_pre_hook(rebuild, with_kwargs=True))
    try:
        with monkeypatch.context() as context:
            context.setattr(KeyCacheSync, "_rerotate", lambda self, *args, **kwargs: None)
            _, logits = cached_decode(model, ids[:, :prompt], ids.shape[1] - prompt, forced=ids)
    finally:
        for handle in handles:
            handle.remove()
    return logits


def test_four_layers_equal_pre_rope_cache_not_full_recompute(monkeypatch: pytest.MonkeyPatch) -> None:
    steps = 130
    model = dynamic(build(4))
    ids = token_ids(PROMPT + steps, seed=7)
    _, ours = cached_decode(model, ids[:, :PROMPT], steps, forced=ids)
    assert sync_hook(model).rerotations == PROMPT + steps - ORIGINAL
    reference = pre_rope_reference_decode(model, ids, PROMPT, monkeypatch)
    full = recompute(model, ids, PROMPT)

    against_reference = (ours - reference).abs().max().item()
    against_full = (ours - full).abs().amax(-1)
    first_change = ORIGINAL + 1 - PROMPT  # row of the first prefix longer than the threshold
    print(
        f"\n4 layers: vs pre-RoPE reference {against_reference:.2e}; vs full recompute "
        f"before the first change {against_full[:first_change].max().item():.2e}, after "
        f"{against_full[first_change:].max().item():.3g}"
    )
    assert against_reference < ATOL
    # Documented: equal to a recompute while the table has not changed, not equal afterwards
    # (deeper layers' keys and values came from hidden states that attended under old tables).
    assert against_full[:first_change].max() < ATOL
    assert against_full[first_change + 5 :].min() > 1e-6
    assert against_full[first_change:].max() > 1e-2


# ------------------------------------------------------------------------------------------------
# (c) bfloat16: the bucketed schedule bounds the rounding of repeated re-rotations
# ------------------------------------------------------------------------------------------------


def sqrt2_grid_switches(threshold: int, up_to: int) -> list[int]:
    """Lengths at which the sqrt(2) schedule takes a new table: the first length beyond the threshold,
    then the first integer beyond each grid point ``threshold * sqrt(2)^k`` (exact integer maths)."""
    switches = [threshold + 1]
    k = 1
    while True:
        grid_floor = math.isqrt(threshold * threshold * 2**k)  # floor(threshold * sqrt(2)^k)
        if grid_floor + 1 > up_to:
            return switches
        switches.append(grid_floor + 1)
        k += 1


FRESH = 260  # keys from here on were rotated once (by the model, in bf16) with the final sqrt(2) table


@pytest.fixture(scope="module")
def bf16_runs() -> dict[str, dict[str, Any]]:
    """A 2-layer bf16 model decoding 320 forced tokens after a 20-token prompt (to 340, 308 steps
    beyond the threshold), with each schedule; the cache's keys against keys rotated once, in
    float64, from the recorded pre-RoPE keys with the final table."""
    steps = 320
    ids = token_ids(PROMPT + steps, seed=11)
    runs: dict[str, dict[str, Any]] = {}
    for name, schedule in (("exact", "exact"), ("sqrt2", math.sqrt(2.0)), ("auto", "auto")):
        model = dynamic(build(2).to(torch.bfloat16), schedule=schedule)
        rotary = model.model.rotary_emb
        hook = sync_hook(model)
        switches: list[int] = []
        original = hook._rerotate

        def spy(cache: Any, past: int, *args: Any, _original: Any = original, _seen: list = switches) -> None:
            _seen.append(past + 1)
            _original(cache, past, *args)

        hook._rerotate = spy  # type: ignore[method-assign]
        store, handles = capture_pre_rope(model)
        cache = DynamicCache(config=model.config)
        cached_decode(model, ids[:, :PROMPT], steps, forced=ids, cache=cache)
        for handle in handles:
            handle.remove()
        errors, oldest, fresh, single = [], [], [], []
        positions = torch.arange(PROMPT + steps)[None]
        for index, layer in enumerate(cache.layers):
            reference = rope(
                torch.cat(store[index], dim=-2), positions, rotary.inv_freq, rotary.attention_scaling
            )
            errors.append(relative_error(layer.keys, reference))
            oldest.append(relative_error(layer.keys[..., :PROMPT, :], reference[..., :PROMPT, :]))
            fresh.append(relative_error(layer.keys[..., FRESH:, :], reference[..., FRESH:, :]))
            single.append(relative_error(reference.to(torch.bfloat16), reference))
        runs[name] = {
            "growth": rotary.growth,
            "rerotations": hook.rerotations,
            "switches": switches,
            "error": max(errors),
            "oldest": max(oldest),
            "fresh": max(fresh),
            "single": max(single),
        }
    return runs


def test_bf16_bucketed_schedule_bounds_the_rounding(bf16_runs: dict[str, dict[str, Any]]) -> None:
    exact, bucketed = bf16_runs["exact"], bf16_runs["sqrt2"]
    for name, run in bf16_runs.items():
        print(
            f"\nbf16 {name}: {run['rerotations']} rerotations, relative key error {run['error']:.2e} "
            f"(prompt keys {run['oldest']:.2e}, keys from {FRESH} {run['fresh']:.2e}), one bf16 rounding "
            f"{run['single']:.2e}"
        )
    single = bucketed["single"]
    assert 1e-3 < single < 4e-3  # one bf16 rounding: 8 bits of mantissa (measured 1.7e-3)
    # Keys never re-rotated carry the model's own bf16 rotation: about two roundings (measured 3.0e-3).
    assert bucketed["fresh"] < 3 * single
    # Bucketed: the prompt's keys were re-rotated 7 times, one rounding each; the error adds up like
    # independent roundings (measured 7.0e-3 for the prompt's keys, 4.2e-3 over the whole cache).
    assert bucketed["oldest"] < math.sqrt(
        bucketed["fresh"] ** 2 + bucketed["rerotations"] * (2 * single) ** 2
    )
    assert bucketed["oldest"] < 6 * single
    assert bucketed["error"] < 4 * single
    # Exact: one rounding per step; a small extra angle is often rounded away altogether, so the error
    # grows linearly, not like a random walk (measured 0.16 for the prompt's keys, 0.10 overall).
    assert exact["oldest"] > 10 * bucketed["oldest"]
    assert exact["error"] > 10 * bucketed["error"]
    assert exact["oldest"] > math.sqrt(exact["rerotations"]) * single
    # "auto" is the sqrt(2) schedule for a bf16 model: the very same cache.
    assert bf16_runs["auto"]["error"] == bucketed["error"]


def test_bf16_rerotation_counts(bf16_runs: dict[str, dict[str, Any]]) -> None:
    final = PROMPT + 320
    assert bf16_runs["exact"]["growth"] is None
    assert bf16_runs["exact"]["rerotations"] == final - ORIGINAL  # 308: at every step beyond 32
    assert bf16_runs["exact"]["switches"] == list(range(ORIGINAL + 1, final + 1))
    # sqrt(2): at 33, then just past 45.25, 64, 90.5, 128, 181, 256 -> 7 re-rotations up to 340.
    expected = sqrt2_grid_switches(ORIGINAL, final)
    assert expected == [33, 46, 65, 91, 129, 182, 257]
    assert bf16_runs["sqrt2"]["switches"] == expected
    assert bf16_runs["sqrt2"]["rerotations"] == len(expected)
    # "auto" picks sqrt(2) for a bf16 model.
    assert bf16_runs["auto"]["growth"] == pytest.approx(math.sqrt(2.0))
    assert bf16_runs["auto"]["switches"] == expected


# ------------------------------------------------------------------------------------------------
# (d) batches with left padding: per-row positions come from the attention mask
# ------------------------------------------------------------------------------------------------

# Prompt lengths of the batch: rows cross the threshold (32) at different steps of the generation.
BATCH_LENGTHS = (14, 18, 23, 27)
NEW_TOKENS = 64


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.shape[-1] for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - prompt.shape[-1] :] = prompt
        mask[row, width - prompt.shape[-1] :] = 1
    return ids, mask


def generate(model: nn.Module, ids: torch.Tensor, **kwargs: Any) -> Any:
    with torch.no_grad():
        return model.generate(
            ids,
            max_new_tokens=kwargs.pop("max_new_tokens", NEW_TOKENS),
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            **kwargs,
        )


@pytest.fixture(scope="module")
def batch_and_references() -> dict[str, Any]:
    """The batch generation and, for each row, the same prompt generated alone.

    A batch takes one table from its largest position (as transformers does), so a short row in a
    batch runs under the table of the longest row. The reference for each row is therefore the
    prompt alone (batch 1, no padding) under the batch's table: its lengths are offset by
    ``longest - own length`` when the table is chosen (``RotaryEmbedding.set_length``), while its
    positions, and so the positions of its cached keys, stay its own.
    """
    model = dynamic(build(1, seed=3))
    prompts = [token_ids(n, seed=20 + n)[0] for n in BATCH_LENGTHS]
    ids, mask = left_padded(prompts)
    batch = generate(model, ids, attention_mask=mask)
    batch_rerotations = sync_hook(model).rerotations
    longest = max(BATCH_LENGTHS)
    original_set_length = RotaryEmbedding.set_length
    references = []
    for prompt in prompts:
        offset = longest - prompt.shape[-1]

        def shifted(self: RotaryEmbedding, seq_len: int, _offset: int = offset) -> bool:
            return original_set_length(self, seq_len + _offset)

        RotaryEmbedding.set_length = shifted  # type: ignore[method-assign]
        try:
            references.append(generate(model, prompt[None]))
        finally:
            RotaryEmbedding.set_length = original_set_length  # type: ignore[method-assign]
    return {
        "model": model,
        "ids": ids,
        "mask": mask,
        "batch": batch,
        "references": references,
        "rerotations": batch_rerotations,
    }


def test_left_padded_batch_rows_equal_each_prompt_alone(batch_and_references: dict[str, Any]) -> None:
    batch, references = batch_and_references["batch"], batch_and_references["references"]
    width = batch_and_references["ids"].shape[1]
    assert batch_and_references["rerotations"] == width + NEW_TOKENS - 1 - ORIGINAL
    worst = 0.0
    for row, reference in enumerate(references):
        own = BATCH_LENGTHS[row]
        assert torch.equal(batch.sequences[row, width:], reference.sequences[0, own:]), row
        scores = torch.stack(batch.scores)[:, row]
        torch.testing.assert_close(scores, torch.stack(reference.scores)[:, 0], atol=1e-4, rtol=0)
        worst = max(worst, (scores - torch.stack(reference.scores)[:, 0]).abs().max().item())
    print(f"\nbatch vs alone: max |score diff| {worst:.2e}")


def test_left_padded_batch_with_running_offset_positions_differs(
    batch_and_references: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control: re-rotating every row's keys at positions 0 .. past - 1 (a running offset, ignoring
    the mask) changes the padded rows; the test above would see it."""
    import yarn_rope.cache as cache_module

    def running_offset(attention_mask: Any, past: int, new_tokens: int, position_ids: torch.Tensor) -> Any:
        return torch.arange(past)[None].expand(position_ids.shape[0], -1)

    monkeypatch.setattr(cache_module, "_cached_positions", running_offset)
    model = batch_and_references["model"]
    wrong = generate(model, batch_and_references["ids"], attention_mask=batch_and_references["mask"])
    right = batch_and_references["batch"]
    difference = (torch.stack(wrong.scores) - torch.stack(right.scores)).abs().amax(dim=(0, 2))
    print(f"\nrunning offset instead of the mask: max |score diff| per row {difference.tolist()}")
    assert difference[-1] < 1e-4  # the longest row has no padding: its positions are the offset ones
    assert difference[:-1].min() > 1e-3


def test_left_padded_batch_static_cache_and_beam_search(batch_and_references: dict[str, Any]) -> None:
    """The padded batch through a StaticCache equals the DynamicCache batch; beam search on the padded
    batch equals the same beam search without a cache (every prefix recomputed, one layer)."""
    model, ids, mask = (batch_and_references[key] for key in ("model", "ids", "mask"))
    batch = batch_and_references["batch"]
    static = generate(model, ids, attention_mask=mask, cache_implementation="static")
    assert torch.equal(static.sequences, batch.sequences)
    torch.testing.assert_close(torch.stack(static.scores), torch.stack(batch.scores), atol=ATOL, rtol=0)
    beams = generate(model, ids, attention_mask=mask, num_beams=2, max_new_tokens=30)
    uncached = generate(model, ids, attention_mask=mask, num_beams=2, max_new_tokens=30, use_cache=False)
    assert torch.equal(beams.sequences, uncached.sequences)
    torch.testing.assert_close(beams.sequences_scores, uncached.sequences_scores, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# rerotate_keys against an independent rotation
# ------------------------------------------------------------------------------------------------


def test_rerotate_keys_equals_rotating_with_the_new_table() -> None:
    generator = torch.Generator().manual_seed(5)
    b, heads, s, d, rot = 2, 3, 9, 12, 8  # partial rotary: 8 rotated channels, 4 passed through
    pre = torch.randn(b, heads, s, d, generator=generator)
    positions = torch.randint(0, 2**20, (b, s), generator=generator)  # long: the angle needs float64
    old = 1.0 / 10000.0 ** (torch.arange(0, rot, 2).float() / rot)
    new = old / torch.linspace(1.0, 7.5, rot // 2)  # per-channel interpolation, as YaRN
    old_scale, new_scale = 1.05, 1.3
    keys = rope(pre, positions, old, old_scale).float()
    tail = keys[..., rot:].clone()
    rerotate_keys(
        keys, positions, old_inv_freq=old, old_scale=old_scale, new_inv_freq=new, new_scale=new_scale
    )
    expected = rope(pre, positions, new, new_scale)
    torch.testing.assert_close(keys.double(), expected, atol=2e-5, rtol=0)
    assert torch.equal(keys[..., rot:], tail)  # the pass-through channels are untouched (no scale)
    assert not torch.allclose(keys.double(), rope(pre, positions, new, old_scale), atol=1e-2)


def test_rerotate_keys_broadcasts_positions_and_rounds_bf16_once() -> None:
    generator = torch.Generator().manual_seed(6)
    pre = torch.randn(3, 2, 7, 16, generator=generator)
    positions = torch.arange(100, 107)[None]  # one row of positions for the whole batch
    old = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    new = old * 0.5
    keys = rope(pre, positions, old, 1.0).to(torch.bfloat16)
    source = keys.double()
    rerotate_keys(keys, positions, old_inv_freq=old, old_scale=1.0, new_inv_freq=new, new_scale=1.2)
    assert keys.dtype == torch.bfloat16
    # From the same bf16 source, exact maths rounded once to bf16: at most one ulp apart.
    exact = rope(source, positions, new - old, 1.2)
    ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp(min=1e-30))) - 7)
    assert ((keys.double() - exact).abs() <= ulp).all()


# ------------------------------------------------------------------------------------------------
# Other caches
# ------------------------------------------------------------------------------------------------


def test_static_cache_generation_equals_dynamic_cache() -> None:
    model = dynamic(build(1, seed=4))
    prompt = token_ids(PROMPT, seed=4)
    hook = sync_hook(model)
    plain = generate(model, prompt, max_new_tokens=60)
    dynamic_rerotations = hook.rerotations
    static = generate(model, prompt, max_new_tokens=60, cache_implementation="static")
    assert isinstance(static.past_key_values, transformers.StaticCache)
    assert hook.rerotations - dynamic_rerotations == dynamic_rerotations == PROMPT + 60 - 1 - ORIGINAL
    assert torch.equal(static.sequences, plain.sequences)
    torch.testing.assert_close(torch.stack(static.scores), torch.stack(plain.scores), atol=ATOL, rtol=0)
    # ... and both equal a full recompute of every prefix.
    full = recompute(model, plain.sequences[:, :-1], PROMPT)
    torch.testing.assert_close(torch.stack(plain.scores)[:, 0], full, atol=ATOL, rtol=0)


def test_quantized_cache_raises_when_a_rerotation_is_needed() -> None:
    model = dynamic(build(1))
    ids = token_ids(40)
    try:
        cache = transformers.QuantizedCache("fp8", model.config)  # no optional backend needed
    except Exception as error:  # pragma: no cover - depends on the transformers release
        pytest.skip(f"QuantizedCache('fp8') does not build here: {error}")
    with torch.no_grad():
        model(input_ids=ids[:, :24], past_key_values=cache)
        model(input_ids=ids[:, 24:32], past_key_values=cache)  # still within the threshold: fine
        with pytest.raises(UnsupportedCacheError, match="cannot be re-rotated"):
            model(input_ids=ids[:, 32:33], past_key_values=cache)


class _NoLayersCache:
    """A cache object that exposes no per-layer keys."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 30


class _KeylessLayer:
    pass


class _KeylessCache(_NoLayersCache):
    layers = (_KeylessLayer(),)


@pytest.mark.parametrize("cache_class", [_NoLayersCache, _KeylessCache])
def test_cache_without_keys_raises_only_when_a_rerotation_is_needed(cache_class: type) -> None:
    model = dynamic(build(1))
    hook = sync_hook(model)
    decoder = model.model
    # Within the threshold the table does not change: nothing to re-rotate, no error.
    hook(decoder, (), {"input_ids": token_ids(2), "past_key_values": cache_class()})
    with pytest.raises(UnsupportedCacheError):
        hook(
            decoder,
            (),
            {
                "input_ids": token_ids(2),
                "past_key_values": cache_class(),
                "position_ids": torch.arange(30, 34)[None],
            },
        )


def test_beam_search_equals_full_recompute() -> None:
    model = dynamic(build(1, seed=5))
    prompt = token_ids(PROMPT, seed=5)
    hook = sync_hook(model)
    cached = generate(model, prompt, max_new_tokens=40, num_beams=2, num_return_sequences=2)
    assert hook.rerotations > 0
    uncached = generate(
        model, prompt, max_new_tokens=40, num_beams=2, num_return_sequences=2, use_cache=False
    )
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=ATOL, rtol=0)


def test_crop_then_continue_equals_full_recompute() -> None:
    """Crop back (beyond the threshold, then below it): the table shrinks, the cache follows it."""
    model = dynamic(build(1))
    ids = token_ids(100, seed=9)
    cache = DynamicCache(config=model.config)
    cached_decode(model, ids[:, :PROMPT], 90 - PROMPT, forced=ids, cache=cache)
    for crop, end in ((60, 100), (25, 45)):
        cache.crop(crop - cache.get_seq_length())  # transformers 5: a negative count of tokens to drop
        assert cache.get_seq_length() == crop
        logits = []
        with torch.no_grad():
            for n in range(crop, end):
                logits.append(model(input_ids=ids[:, n : n + 1], past_key_values=cache).logits[:, -1])
        full = recompute(model, ids[:, :end], crop + 1)
        torch.testing.assert_close(torch.cat(logits), full, atol=ATOL, rtol=0)


def test_uncached_forward_between_cached_steps_keeps_the_cache_consistent() -> None:
    model = dynamic(build(1))
    ids = token_ids(80, seed=13)
    cache = DynamicCache(config=model.config)
    cached_decode(model, ids[:, :PROMPT], 50 - PROMPT, forced=ids, cache=cache)  # cache at table(50)
    with torch.no_grad():
        model(input_ids=ids[:, :80])  # e.g. scoring a longer text: the module's table is now table(80)
        logits = [
            model(input_ids=ids[:, n : n + 1], past_key_values=cache).logits[:, -1] for n in range(50, 70)
        ]
    full = recompute(model, ids[:, :70], 51)
    torch.testing.assert_close(torch.cat(logits), full, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# The hook's life cycle, the schedule, the grid
# ------------------------------------------------------------------------------------------------


def test_hook_registered_by_dynamic_patch_and_removed_by_unpatch() -> None:
    model = build(1)
    assert len(model.model._forward_pre_hooks) == 0
    dynamic(model)
    assert len(model.model._forward_pre_hooks) == 1
    assert patch_info(model).scaling.method == "dynamic-yarn"
    dynamic(model, schedule=2.0)  # new settings replace the patch: never two hooks
    assert len(model.model._forward_pre_hooks) == 1
    assert sync_hook(model).rotaries[0].growth == 2.0
    unpatch(model)
    assert len(model.model._forward_pre_hooks) == 0
    assert len(model.model._forward_pre_hooks_with_kwargs) == 0
    with patched(model, method="dynamic-ntk", factor=2.0, original_max_position_embeddings=ORIGINAL):
        assert len(model.model._forward_pre_hooks) == 1
    assert len(model.model._forward_pre_hooks) == 0
    patch(model, method="yarn", factor=4.0, original_max_position_embeddings=ORIGINAL)
    assert len(model.model._forward_pre_hooks) == 0  # a static table never changes
    assert all(len(module._forward_pre_hooks) == 0 for module in model.modules())
    unpatch(model)


def test_cache_sync_returns_the_registered_hook() -> None:
    model = build(1)
    assert cache_sync(model) is None  # not patched
    dynamic(model)
    hook = cache_sync(model)
    assert hook is sync_hook(model)
    ids = torch.randint(0, VOCAB, (1, ORIGINAL + 3), generator=torch.Generator().manual_seed(7))
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :ORIGINAL], past_key_values=cache)
        for n in range(ORIGINAL, ORIGINAL + 3):  # past the original length: a new factor per step
            model(input_ids=ids[:, n : n + 1], past_key_values=cache)
    assert hook.rerotations == 3
    patch(model, method="yarn", factor=4.0, original_max_position_embeddings=ORIGINAL)
    assert cache_sync(model) is None  # a static table registers no hook
    unpatch(model)
    assert cache_sync(model) is None


@pytest.mark.parametrize(
    "schedule", [1, 1.0, 0.5, -2.0, 0, "fast", "", None, True, float("nan"), float("inf"), [2.0]]
)
def test_bad_schedule_raises(schedule: Any) -> None:
    model = build(1)
    with pytest.raises(ValueError, match="schedule"):
        dynamic(model, schedule=schedule)
    assert patch_info(model) is None
    assert len(model.model._forward_pre_hooks) == 0


@pytest.mark.parametrize(
    ("dtype", "schedule", "growth"),
    [
        (torch.float32, "auto", None),
        (torch.bfloat16, "auto", math.sqrt(2.0)),
        (torch.float16, "auto", math.sqrt(2.0)),
        (torch.bfloat16, "exact", None),
        (torch.float32, 2, 2.0),
        (torch.float32, 1.25, 1.25),
    ],
)
def test_schedule_resolves_to_growth(dtype: torch.dtype, schedule: Any, growth: float | None) -> None:
    model = dynamic(build(1).to(dtype), schedule=schedule)
    assert model.model.rotary_emb.growth == growth


def exact_grid_length(seq_len: int, threshold: int, growth: Fraction) -> int:
    """``seq_len`` rounded up to the grid ``threshold * growth^k`` (rational growth, exact)."""
    if seq_len <= threshold:
        return seq_len
    point = Fraction(threshold)
    while point < seq_len:
        point *= growth
    return max(seq_len, math.ceil(point))


def exact_sqrt2_grid_length(seq_len: int, threshold: int) -> int:
    """The same for growth sqrt(2), in integers: ``threshold * sqrt(2)^k >= n`` iff ``t^2 2^k >= n^2``."""
    if seq_len <= threshold:
        return seq_len
    k = 0
    while threshold * threshold * 2**k < seq_len * seq_len:
        k += 1
    return max(seq_len, math.isqrt(threshold * threshold * 2**k - 1) + 1)  # ceil(t * sqrt(2)^k)


@pytest.mark.parametrize("method", ["dynamic-yarn", "dynamic-ntk"])
@pytest.mark.parametrize("growth", [Fraction(2), Fraction(3, 2)])
def test_effective_length_follows_the_grid(method: str, growth: Fraction) -> None:
    extra = {"factor": 2.0} if method == "dynamic-ntk" else {}
    scaling = RopeScaling(method=method, original_max_position_embeddings=ORIGINAL, **extra)
    rotary = RotaryEmbedding(HEAD_DIM, base=10000.0, scaling=scaling, growth=float(growth))
    lengths = range(1, 1200)
    assert [rotary._effective_length(n) for n in lengths] == [
        exact_grid_length(n, ORIGINAL, growth) for n in lengths
    ]
    # The table changes exactly when the length passes a grid point.
    changes = [n for n in lengths if rotary.set_length(n)]
    expected = [
        n
        for n in lengths[1:]
        if exact_grid_length(n, ORIGINAL, growth) != exact_grid_length(n - 1, ORIGINAL, growth)
    ]
    expected = [n for n in expected if n > ORIGINAL]
    assert changes == expected
    assert rotary.set_length(10)  # and back below the threshold: the initial table again
    assert torch.equal(rotary.inv_freq, scaling.inv_freq(HEAD_DIM, base=10000.0)[0])


def test_effective_length_switch_points_on_the_sqrt2_grid() -> None:
    """sqrt(2): the table changes at the first integer beyond each grid point (33, 46, 65, 91, ...)."""
    scaling = RopeScaling(method="dynamic-yarn", original_max_position_embeddings=ORIGINAL)
    rotary = RotaryEmbedding(HEAD_DIM, base=10000.0, scaling=scaling, growth=math.sqrt(2.0))
    changes = [n for n in range(1, 3000) if rotary.set_length(n)]
    assert changes == sqrt2_grid_switches(ORIGINAL, 2999)


def test_effective_length_sqrt2_grid_points_are_exact() -> None:
    scaling = RopeScaling(method="dynamic-yarn", original_max_position_embeddings=ORIGINAL)
    rotary = RotaryEmbedding(HEAD_DIM, base=10000.0, scaling=scaling, growth=math.sqrt(2.0))
    lengths = range(1, 3000)
    assert [rotary._effective_length(n) for n in lengths] == [
        exact_sqrt2_grid_length(n, ORIGINAL) for n in lengths
    ]


def test_dynamic_yarn_factor_follows_the_paper_rule() -> None:
    """s = max(1, n / original) beyond the threshold, read off the live table."""
    model = dynamic(build(1))
    rotary = model.model.rotary_emb
    for n, factor in ((20, 1.0), (32, 1.0), (33, 33 / 32), (64, 2.0), (100, 100 / 32)):
        rotary.set_length(n)
        assert yarn_rope.dynamic_factor(n, original_max_position_embeddings=ORIGINAL) == factor
        inv_freq, scale = patch_info(model).scaling.inv_freq(HEAD_DIM, base=10000.0, seq_len=n)
        assert torch.equal(rotary.inv_freq, inv_freq)
        assert rotary.attention_scaling == scale


# ------------------------------------------------------------------------------------------------
# LongRoPE: the short -> long switch in a plain cached loop
# ------------------------------------------------------------------------------------------------


def phi3_longrope(layers: int) -> nn.Module:
    """A tiny Phi-3 with LongRoPE (original 32, long 128), attention sharp enough to see positions."""
    pairs = HEAD_DIM // 2
    config = transformers.Phi3Config(
        vocab_size=VOCAB,
        hidden_size=4 * HEAD_DIM,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4 * ORIGINAL,
        original_max_position_embeddings=ORIGINAL,
        initializer_range=0.1,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.05 * i for i in range(pairs)],
            "long_factor": [1.0 + 1.5 * i for i in range(pairs)],
        },
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.Phi3ForCausalLM(config).eval()


def test_longrope_one_layer_plain_loop_across_the_switch_equals_full_recompute() -> None:
    """transformers' generate() recomputes the prefix at the switch; a plain cached loop does not,
    and attends to keys rotated with the short factors. Patched, the loop re-rotates them once."""
    native = phi3_longrope(1)
    model = phi3_longrope(1)
    patch(model)
    hook = sync_hook(model)
    steps = 30  # prompt of 20 tokens, switch at 33
    ids, cached = cached_decode(model, token_ids(PROMPT), steps)
    full = recompute(model, ids, PROMPT)
    assert (cached - full).abs().max().item() < ATOL
    assert hook.rerotations == 1  # short -> long, once
    # The unpatched model in the same loop: equal before the switch, stale after it.
    _, stale = cached_decode(native, ids[:, :PROMPT], steps, forced=ids)
    native_full = recompute(native, ids, PROMPT)
    difference = (stale - native_full).abs().amax(-1)
    switch_row = ORIGINAL - PROMPT
    assert difference[: switch_row + 1].max() < ATOL
    assert difference[switch_row + 1 :].max() > 1e-3
    torch.testing.assert_close(full, native_full, rtol=0, atol=1e-4)  # same model, precise angles
