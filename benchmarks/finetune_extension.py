"""Mini-replication of what the YaRN paper's Table 1 claims, with seeds, intervals and a gate.

Run (about 60 minutes on 2 shared CPU cores; ``--preset smoke`` is CI's seconds-long version):
    nice -n 10 .venv/bin/python benchmarks/finetune_extension.py \
        --json benchmarks/results/finetune_extension.json --plot docs/runs/finetune_extension.png

The paper (Peng et al., ICLR 2024, arXiv 2309.00071 v2, Table 1) extends Llama-2 7B from 4k to 8k
(factor 2) and reports, on the first N tokens of Proof-pile documents: PI (1B tokens) 3.34 at 8,192
and 8.07 at 10,240; NTK (theta = 20k, 1B tokens) 3.59 and 6.24; YaRN (400M tokens) 3.35 and 6.04.
The two claims tested here:

(a) inside the new window, YaRN with 40% of the tokens is about as good as PI, and both beat NTK;
(b) beyond the fine-tuned length (1.25x it), YaRN < NTK < PI.

The same experiment, small enough for this machine, with nothing downloaded:

1. corpus: the running Python's standard-library ``.py`` files (tests, GUI/demo folders,
   ``pydoc_data`` and the two ``decimal`` modules left out), split at the file level by a seeded
   shuffle: 80% pretraining, 5% fine-tuning, 15% held out;
2. tokenizer: a byte-level BPE of about 2k tokens trained with ``tokenizers`` on the pretraining
   files only (about 3 bytes per token);
3. model: a Llama of about 4M weights (4 layers, hidden 256, 4 heads of 64, RoPE base 10000),
   **pretrained from scratch** at L = 512 tokens on about 1M tokens by
   :func:`yarn_rope.finetune.finetune` (``method="none"``, the sliced loss);
4. gate: plain RoPE's perplexity on positions (L, 2L] of the held-out files must be at least 1.2x
   its perplexity on (L/2, L] (the failure the methods exist to fix); if it is not, the report says
   "premise absent: inconclusive" and ranks nothing;
5. arms, each fine-tuned at 2L from the same pretrained weights, on the same fine-tuning data in the
   same order, with a learning rate a tenth of pretraining's peak, no warm-up (above zero from the
   first step) and linear decay: PI (``linear`` x2), NTK in its theta form (plain RoPE with the base
   doubled, 10000 -> 20000: the paper's Llama-2 row is theta 10k -> 20k at s = 2) and in its alpha
   form (``ntk`` with alpha = 2: base x 2^(d/(d-2)) = 20452 for d = 64), YaRN x2 at the budget B and
   at 0.4 B, plain RoPE fine-tuned at 2L (the control), and YaRN with betas adapted to L
   ("adapted", see :func:`adapted_betas`);
6. evaluation: the first N tokens of each held-out file at N = 0.5, 1, 1.5, 2, 2.5 and 4 x L (one
   causal pass per file scores every shorter prefix); negative log-likelihoods summed per file and
   per position band (0, L/2], (L/2, L], (L, 1.5L], (1.5L, 2L], (2L, 2.5L], (2.5L, 4L] (a band counts
   for a file that reaches its end), so the bands up to N add up to the first-N-tokens figure;
7. seeds and verdicts: 2 pretraining seeds x 2 fine-tuning data-order seeds; each comparison is the
   mean over the four seeds of the difference in mean NLL per token, with a 95% paired bootstrap
   interval over held-out files (the same files resampled for every seed). A ranking is stated only
   where all four seeds agree in sign and the interval excludes 0. Equivalence (claim (a), YaRN at
   0.4 B vs PI at B) is stated where the interval of the perplexity ratio lies inside 1 +- 1%.

The headline is YaRN (0.4 B)'s perplexity over NTK (theta)'s on the band (2L, 2.5L] (claim (b)'s
first half; below 1 is what the paper reports). Everything is seeded; figures move with the Python
version (its standard library is the corpus) and, a little, with the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import math
import random
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from _common import finish, table
from yarn_rope.eval.perplexity import perplexity, token_nll
from yarn_rope.finetune import FinetuneRecipe, PackedData, finetune, prepare_data

# Llama-2's YaRN settings (the paper's betas at its 4,096-token original context), for the adapted arm.
LLAMA2_CONTEXT, LLAMA2_BETA_FAST, LLAMA2_BETA_SLOW = 4096, 32.0, 1.0
EQUIVALENCE_MARGIN = 0.01  # claim (a)'s "about as good": perplexity ratio within 1 +- 1%
GATE = 1.2  # plain RoPE's (L, 2L] perplexity over its (L/2, L] perplexity, before fine-tuning
BAND_EDGES = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 4.0)  # x L
FACTOR = 2.0


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of one run."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    context: int  # L, the pretraining context; fine-tuning at 2L
    vocabulary: int
    tokenizer_bytes: int  # pretraining text the BPE is trained on (0: all of it)
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    finetune_steps: int  # the budget B, in steps of finetune_batch sequences of 2L tokens
    finetune_batch: int
    pretrain_seeds: int
    data_seeds: int
    min_eval_documents: int  # held-out files that reach 4L (fewer: a warning, each band on those reaching it)
    bootstrap: int


PRESETS = {
    "default": Preset(
        hidden=256,
        layers=4,
        heads=4,
        intermediate=704,
        context=512,
        vocabulary=2048,
        tokenizer_bytes=0,
        pretrain_steps=256,
        pretrain_batch=8,
        pretrain_lr=2e-3,
        finetune_steps=30,
        finetune_batch=1,
        pretrain_seeds=2,
        data_seeds=2,
        min_eval_documents=48,
        bootstrap=2000,
    ),
    "smoke": Preset(
        hidden=32,
        layers=1,
        heads=2,
        intermediate=64,
        context=32,
        vocabulary=320,
        tokenizer_bytes=300_000,
        pretrain_steps=3,
        pretrain_batch=2,
        pretrain_lr=1e-3,
        finetune_steps=5,
        finetune_batch=1,
        pretrain_seeds=2,
        data_seeds=2,
        min_eval_documents=8,
        bootstrap=200,
    ),
}


@dataclasses.dataclass(frozen=True)
class Arm:
    """One fine-tuned copy: a recipe's scaling, a share of the budget, and a RoPE base multiplier."""

    name: str
    label: str
    method: str
    budget: float = 1.0  # share of the budget B
    base_factor: float = 1.0  # the model's rope_theta is multiplied by this (NTK's theta form)
    settings: tuple[tuple[str, float], ...] = ()


def adapted_betas(context: int) -> tuple[float, float]:
    """YaRN's betas for an original context ``context``, chosen so that the same share of the rotary
    pairs is extrapolated, ramped and interpolated as in Llama-2 7B with the paper's 32/1 at 4,096.

    The betas are already ratios (a pair is extrapolated when ``context / wavelength > beta_fast``),
    so "the same wavelength-to-L ratios" is the default 32/1 itself. What the default does not keep
    at a short context is the share of pairs: pair i's wavelength is ``2 pi base^(2i/d)``, so the
    correction pair of a beta is ``(d/2) ln(L / (2 pi beta)) / ln(base)``, whose share of the ``d/2``
    pairs does not depend on d; with Llama-2's base (10000, also ours) equal shares need equal
    ``L / beta``, i.e. the same wavelength bounds in tokens (128 and 4,096): beta = 32 L / 4096 and
    1 L / 4096. At L = 512 that is 4 and 0.125: pairs 0-10 of 32 unchanged (Llama-2: 0-20 of 64),
    where the default 32/1 leaves only pairs 0-3.
    """
    scale = context / LLAMA2_CONTEXT
    return LLAMA2_BETA_FAST * scale, LLAMA2_BETA_SLOW * scale


def arms(context: int) -> tuple[Arm, ...]:
    fast, slow = adapted_betas(context)
    return (
        Arm("pi", "PI", "linear"),
        Arm("ntk_theta", "NTK (theta x2)", "none", base_factor=FACTOR),
        Arm("ntk_alpha", "NTK (alpha 2)", "ntk"),
        Arm("yarn", "YaRN", "yarn"),
        Arm("yarn_0.4", "YaRN (0.4 B)", "yarn", budget=0.4),
        Arm("plain", "plain RoPE (control)", "none"),
        Arm(
            "yarn_adapted",
            f"YaRN adapted ({fast:g}/{slow:g})",
            "yarn",
            settings=(("beta_fast", fast), ("beta_slow", slow)),
        ),
    )


def byte_tokenizer() -> Any:
    """A byte-level tokenizer: the 256 bytes (GPT-2's byte alphabet) and ``<s>``/``</s>``, no merges
    (``benchmarks/gpu_finetune.py`` uses it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<s>"], vocab["</s>"] = 256, 257
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def bpe_tokenizer(texts: list[str], vocabulary: int) -> Any:
    """A byte-level BPE of ``vocabulary`` tokens (``<s>``/``</s>`` included) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocabulary,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


# Standard-library folders left out of the corpus: tests, installed packages, GUI and demos, generated
# documentation; and the decimal modules, whose text other tests and benchmarks evaluate on.
SKIPPED_FOLDERS = frozenset(
    ("site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "tkinter", "pydoc_data")
)
SKIPPED_FILES = frozenset(("_pydecimal.py", "decimal.py"))
SPLIT_SHARES = (0.80, 0.05)  # pretraining, fine-tuning; the rest (15%) is held out


STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files (see :data:`SKIPPED_FOLDERS`), sorted by relative path."""
    root = STDLIB
    found = [
        path
        for path in root.rglob("*.py")
        if not SKIPPED_FOLDERS & set(path.relative_to(root).parts[:-1]) and path.name not in SKIPPED_FILES
    ]
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def split_files(files: list[Path], seed: int) -> dict[str, list[Path]]:
    """A seeded random file-level split: 80% ``pretrain``, 5% ``finetune``, 15% ``held_out``."""
    shuffled = list(files)
    random.Random(seed).shuffle(shuffled)
    first = round(len(shuffled) * SPLIT_SHARES[0])
    second = first + round(len(shuffled) * SPLIT_SHARES[1])
    return {"pretrain": shuffled[:first], "finetune": shuffled[first:second], "held_out": shuffled[second:]}


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def band_edges(context: int) -> list[int]:
    return [round(edge * context) for edge in BAND_EDGES]


def band_names(context: int) -> list[str]:
    edges = BAND_EDGES
    return [f"({edges[i]:g}L,{edges[i + 1]:g}L]".replace("(0L", "(0") for i in range(len(edges) - 1)]


def band_sums(nll: torch.Tensor, edges: list[int]) -> list[float]:
    """Per band, the summed NLL of the tokens at 1-based positions ``(a, b]`` (``nan`` where the
    document does not reach ``b``). ``nll[j]`` is token ``j + 1``'s (position ``j + 2``), so the
    bands up to N add up to the first-N-tokens sum ``nll[: N - 1]``."""
    reached = nll.numel() + 1
    out = []
    for low, high in itertools.pairwise(edges):
        out.append(float(nll[max(low - 1, 0) : high - 1].double().sum()) if reached >= high else math.nan)
    return out


def band_tokens(edges: list[int]) -> list[int]:
    return [high - 1 - max(low - 1, 0) for low, high in itertools.pairwise(edges)]


def evaluate(model: Any, documents: list[torch.Tensor], edges: list[int]) -> list[list[float]]:
    """``[documents][bands]`` NLL sums: one causal pass over each document's longest evaluated prefix."""
    rows = []
    for ids in documents:
        longest = max(edge for edge in edges if edge <= ids.numel())
        rows.append(band_sums(token_nll(model, ids[:longest], progress=False), edges))
    return rows


def build_model(preset: Preset, tokenizer: Any, base: float = 10000.0) -> Any:
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden,
        intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.heads,
        max_position_embeddings=preset.context,
        rope_parameters={"rope_type": "default", "rope_theta": base},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(config)


def pack(texts: list[str], tokenizer: Any, seq_len: int, sequences: int) -> PackedData:
    import datasets

    source = datasets.Dataset.from_dict({"text": texts})
    return prepare_data(source, tokenizer, seq_len=seq_len, max_sequences=sequences, progress=False)


# --- statistics --------------------------------------------------------------------------------


def _mean_nll(sums: np.ndarray, tokens: np.ndarray, bands: list[int], rows: np.ndarray) -> np.ndarray:
    """Token-weighted mean NLL over ``bands`` of the documents ``rows``.

    ``sums`` is ``[seeds, documents, bands]``, ``rows`` ``[resamples, documents]`` indices; returns
    ``[resamples, seeds]``."""
    picked = sums[:, :, bands].sum(axis=2)[:, rows]  # [seeds, resamples, documents]
    return (picked.sum(axis=2) / (tokens[bands].sum() * rows.shape[1])).T


def compare(
    first: np.ndarray, second: np.ndarray, tokens: np.ndarray, bands: list[int], resamples: int, seed: int
) -> dict[str, Any]:
    """``first`` vs ``second`` (``[seeds, documents, bands]`` NLL sums) on ``bands``, over the
    documents that reach the last of them: perplexity ratio (mean over seeds of the difference in
    mean NLL per token), each seed's ratio, a 95% paired bootstrap interval over documents, and the
    ranking where every seed agrees in sign and the interval excludes 1."""
    keep = ~np.isnan(first[0, :, bands[-1]])
    a, b = first[:, keep], second[:, keep]
    count = int(keep.sum())
    everything = np.arange(count)[None, :]
    per_seed = (_mean_nll(a, tokens, bands, everything) - _mean_nll(b, tokens, bands, everything))[0]
    rows = np.random.default_rng(seed).integers(0, count, size=(resamples, count))
    boot = (_mean_nll(a, tokens, bands, rows) - _mean_nll(b, tokens, bands, rows)).mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    agree = bool(np.all(per_seed < 0) or np.all(per_seed > 0))
    ranking = None
    if agree and (high < 0 or low > 0):
        ranking = "<" if high < 0 else ">"
    return {
        "ratio": math.exp(float(per_seed.mean())),
        "interval": [math.exp(float(low)), math.exp(float(high))],
        "per_seed": [math.exp(float(d)) for d in per_seed],
        "seeds_agree": agree,
        "ranking": ranking,
        "documents": count,
    }


def equivalent(result: dict[str, Any], margin: float) -> str:
    """``equivalent`` (the interval lies inside 1 +- margin), ``different`` (it lies outside, every
    seed on that side) or ``undecided``."""
    low, high = result["interval"]
    if 1 - margin < low and high < 1 + margin:
        return "equivalent"
    outside = [r > 1 + margin for r in result["per_seed"]], [r < 1 - margin for r in result["per_seed"]]
    if (low > 1 + margin and all(outside[0])) or (high < 1 - margin and all(outside[1])):
        return "different"
    return "undecided"


def below(result: dict[str, Any]) -> bool | None:
    """True: first < second stated; False: first > second stated; None: no ranking."""
    return {"<": True, ">": False}.get(result["ranking"])


def verdicts(comparisons: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Claim (a) and (b) as supported / contradicted / inconclusive, with the parts they rest on."""
    equal = equivalent(comparisons["a_yarn04_vs_pi_window"], EQUIVALENCE_MARGIN)
    pi_ntk = below(comparisons["a_pi_vs_ntk_window"])
    yarn_ntk = below(comparisons["a_yarn04_vs_ntk_window"])
    if equal == "equivalent" and pi_ntk and yarn_ntk:
        a = "supported"
    elif equal == "different" or pi_ntk is False or yarn_ntk is False:
        a = "contradicted"
    else:
        a = "inconclusive"
    yarn_vs_ntk = below(comparisons["b_yarn04_vs_ntk_tail"])
    ntk_vs_pi = below(comparisons["b_ntk_vs_pi_tail"])
    if yarn_vs_ntk and ntk_vs_pi:
        b = "supported"
    elif yarn_vs_ntk is False or ntk_vs_pi is False:
        b = "contradicted"
    else:
        b = "inconclusive"
    return {
        "a": {
            "verdict": a,
            "yarn_0.4B_vs_pi": equal,
            "pi_below_ntk": pi_ntk,
            "yarn_0.4B_below_ntk": yarn_ntk,
        },
        "b": {"verdict": b, "yarn_0.4B_below_ntk": yarn_vs_ntk, "ntk_below_pi": ntk_vs_pi},
    }


# (name, first arm, second arm, region): "window" is positions (0, 2L], "tail" (2L, 2.5L].
COMPARISONS = (
    ("a_yarn04_vs_pi_window", "yarn_0.4", "pi", "window"),
    ("a_pi_vs_ntk_window", "pi", "ntk_theta", "window"),
    ("a_yarn04_vs_ntk_window", "yarn_0.4", "ntk_theta", "window"),
    ("b_yarn04_vs_ntk_tail", "yarn_0.4", "ntk_theta", "tail"),
    ("b_ntk_vs_pi_tail", "ntk_theta", "pi", "tail"),
    ("yarn_vs_ntk_tail", "yarn", "ntk_theta", "tail"),
    ("yarn_vs_pi_tail", "yarn", "pi", "tail"),
    ("yarn_vs_pi_window", "yarn", "pi", "window"),
    ("ntk_alpha_vs_theta_window", "ntk_alpha", "ntk_theta", "window"),
    ("ntk_alpha_vs_theta_tail", "ntk_alpha", "ntk_theta", "tail"),
    ("yarn_adapted_vs_yarn_window", "yarn_adapted", "yarn", "window"),
    ("yarn_adapted_vs_yarn_tail", "yarn_adapted", "yarn", "tail"),
    ("plain_vs_pi_window", "plain", "pi", "window"),
    ("plain_vs_pi_tail", "plain", "pi", "tail"),
)
REGIONS = {"window": [0, 1, 2, 3], "tail": [4]}


# --- the run -------------------------------------------------------------------------------------


def pretrain(preset: Preset, tokenizer: Any, data: PackedData, seed: int, work: Path) -> tuple[Any, Any]:
    torch.manual_seed(seed)
    model = build_model(preset, tokenizer)
    recipe = FinetuneRecipe(
        method="none",
        original_max_position_embeddings=preset.context,
        seq_len=preset.context,
        steps=preset.pretrain_steps,
        learning_rate=preset.pretrain_lr,
        warmup_steps=max(1, preset.pretrain_steps // 20),
        batch_size=preset.pretrain_batch,
        gradient_accumulation=1,
        weight_decay=0.1,
        gradient_checkpointing=False,
        seed=seed,
    )
    run = train(model, data, recipe, tokenizer, work / f"pretrained-{seed}")
    return run.model, run


def train(model: Any, data: PackedData, recipe: FinetuneRecipe, tokenizer: Any, output: Path) -> Any:
    """:func:`yarn_rope.finetune.finetune` without its own evaluations, checkpoints, plot or bar."""
    return finetune(model, data, output=output, recipe=recipe, tokenizer=tokenizer, eval_every=0,
                    checkpoint_every=0, plot=False, progress=False)  # fmt: skip


def finetune_arm(
    arm: Arm,
    preset: Preset,
    tokenizer: Any,
    weights: dict[str, torch.Tensor],
    data: PackedData,
    seed: int,
    work: Path,
) -> Any:
    model = build_model(preset, tokenizer, base=10000.0 * arm.base_factor)
    model.load_state_dict(weights)
    recipe = FinetuneRecipe(
        method=arm.method,
        factor=FACTOR,
        original_max_position_embeddings=preset.context,
        seq_len=int(FACTOR * preset.context),
        steps=max(1, round(preset.finetune_steps * arm.budget)),
        learning_rate=preset.pretrain_lr / 10,
        warmup_steps=0,  # above zero from the first step, then linear decay
        schedule="linear",
        batch_size=preset.finetune_batch,
        gradient_accumulation=1,
        gradient_checkpointing=False,
        seed=seed,
        **dict(arm.settings),
    )
    return train(model, data, recipe, tokenizer, work / f"{arm.name}-{seed}")


def held_out_documents(files: list[Path], tokenizer: Any) -> tuple[list[torch.Tensor], float]:
    """``[BOS] ids`` of every held-out file, and the bytes per token over them all."""
    documents, size = [], 0
    for path in files:
        text = read(path)
        documents.append(torch.tensor([tokenizer.bos_token_id, *tokenizer(text)["input_ids"]]))
        size += len(text.encode("utf-8"))
    return documents, size / sum(doc.numel() - 1 for doc in documents)


def scored_documents(documents: list[torch.Tensor], edges: list[int], wanted: int) -> list[torch.Tensor]:
    """The files every band is scored on: those that reach the longest length if there are ``wanted``
    of them (the same files in every band); else those that reach the shortest, each band then scored
    on the files that reach its end."""
    longest = [doc for doc in documents if doc.numel() >= edges[-1]]
    return longest if len(longest) >= wanted else [doc for doc in documents if doc.numel() >= edges[1]]


def band_perplexity(sums: np.ndarray, tokens: np.ndarray) -> list[float]:
    """Per band, exp of the mean over seeds of the token-weighted mean NLL (``sums``
    ``[seeds, documents, bands]``), over the documents that reach the band."""
    out = []
    for band in range(sums.shape[2]):
        column = sums[:, :, band]
        keep = ~np.isnan(column[0])
        out.append(math.exp(float((column[:, keep].sum(axis=1) / (tokens[band] * keep.sum())).mean())))
    return out


def prefix_check(
    model: Any, documents: list[torch.Tensor], rows: list[list[float]], edges: list[int]
) -> dict:
    """The first-N-tokens perplexity two ways: from the band sums, and from
    :func:`yarn_rope.eval.perplexity` (which scores the first N tokens of each file that reaches N)."""
    measured = perplexity(model, documents, lengths=edges[1:], progress=False)
    out = {}
    for index, length in enumerate(edges[1:]):
        reached = [row for row, doc in zip(rows, documents, strict=True) if doc.numel() >= length]
        nll = sum(sum(row[: index + 1]) for row in reached) / (len(reached) * (length - 1))
        out[str(length)] = {"from_bands": math.exp(nll), "perplexity": measured.at(length).perplexity}
    return out


def plot(report: dict[str, Any], path: str) -> None:
    """Per-band perplexity by arm after fine-tuning; plain RoPE before fine-tuning dotted."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    from yarn_rope._files import save_figure

    names = report["bands"]
    x = list(range(len(names)))
    figure = Figure(figsize=(10, 5), dpi=110)
    axis = figure.add_subplot(1, 1, 1)
    axis.plot(
        x,
        report["band_perplexity"]["plain_before"],
        color="grey",
        linestyle=":",
        marker=".",
        label="plain RoPE, not fine-tuned",
    )
    for arm in report["arms"]:
        style = "--" if arm["name"] in ("plain", "yarn_adapted", "ntk_alpha") else "-"
        axis.plot(x, report["band_perplexity"][arm["name"]], marker="o", linestyle=style, label=arm["label"])
    for edge in (1.5, 3.5):  # between (L/2, L] and (L, 1.5L]; between (1.5L, 2L] and (2L, 2.5L]
        axis.axvline(edge, color="black" if edge > 2 else "grey", linestyle="--", linewidth=1)
    axis.set_xticks(x, names)
    axis.set_xlabel("position band (L = pretraining context; fine-tuned at 2L, dashed line)")
    axis.set_ylabel("held-out perplexity (mean over 4 seeds)")
    axis.set_yscale("log")
    axis.yaxis.set_major_formatter(ScalarFormatter())
    axis.yaxis.set_minor_formatter(ScalarFormatter())
    axis.grid(True, alpha=0.3, which="both")
    axis.legend(fontsize=8)
    verdict, gate = report["verdicts"], report["gate"]
    premise = "" if gate["passed"] else (
        "premise absent: plain RoPE (L,2L] / (L/2,L] = "
        + ", ".join(f"{ratio:.2f}" for ratio in gate["ratios"]) + f" < {gate['threshold']:g}\n"
    )  # fmt: skip
    axis.set_title(
        f"{premise}Llama {report['weights'] / 1e6:.1f}M weights, L = {report['sizes']['context']}, x2; "
        f"claim (a): {verdict['a']['verdict']}, claim (b): {verdict['b']['verdict']}"
    )
    figure.tight_layout()
    save_figure(figure, path)


def gate_ratio(rows: np.ndarray, tokens: np.ndarray) -> float:
    """Plain RoPE's perplexity on (L, 2L] over (L/2, L] (``rows`` ``[documents, bands]``), on the files
    that reach 2L."""
    keep = ~np.isnan(rows[:, 3])
    beyond = rows[keep][:, [2, 3]].sum() / (tokens[[2, 3]].sum() * keep.sum())
    inside = rows[keep][:, 1].sum() / (tokens[1] * keep.sum())
    return math.exp(float(beyond - inside))


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Preset]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"override a preset size ({', '.join(f.name for f in dataclasses.fields(Preset))})",
    )
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the file-level split")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine, 2 threads fighting other jobs ran one "
        "training step 12x slower here)",
    )
    parser.add_argument("--workdir", default=None, help="keep the models here (default: a temporary folder)")
    parser.add_argument("--plot", default=None, metavar="OUT.png", help="per-band perplexity by arm")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the report")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    types = {field.name: field.type for field in dataclasses.fields(Preset)}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in types or not value:
            parser.error(f"--set takes NAME=VALUE with NAME one of {', '.join(types)}, got {item!r}")
        preset = dataclasses.replace(preset, **{name: float(value) if types[name] == "float" else int(value)})
    return args, preset


def corpus(preset: Preset, seed: int) -> dict[str, Any]:
    """The split, the tokenizer trained on its pretraining files, and the held-out documents."""
    files = stdlib_files()
    split = split_files(files, seed)
    texts = {part: [read(path) for path in paths] for part, paths in split.items()}
    training = texts["pretrain"]
    if preset.tokenizer_bytes:
        sizes = np.cumsum([len(text) for text in training])
        training = training[: int(np.searchsorted(sizes, preset.tokenizer_bytes)) + 1]
    tokenizer = bpe_tokenizer(training, preset.vocabulary)
    held_out, bytes_per_token = held_out_documents(split["held_out"], tokenizer)
    documents = scored_documents(held_out, band_edges(preset.context), preset.min_eval_documents)
    return {
        "files": files,
        "split": split,
        "texts": texts,
        "tokenizer": tokenizer,
        "documents": documents,
        "held_out_reaching": {
            str(n): sum(doc.numel() >= n for doc in held_out) for n in band_edges(preset.context)[1:]
        },
        "bytes_per_token": bytes_per_token,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, preset = parse(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    for name in ("accelerate", "yarn_rope"):
        logging.getLogger(name).setLevel(logging.ERROR)
    began = time.perf_counter()
    L = preset.context
    edges = band_edges(L)
    tokens = np.array(band_tokens(edges), dtype=np.float64)
    all_arms = arms(L)

    data = corpus(preset, args.split_seed)
    tokenizer, documents, split = data["tokenizer"], data["documents"], data["split"]
    reaching = {str(n): sum(doc.numel() >= n for doc in documents) for n in edges[1:]}
    pretrain_data = pack(
        data["texts"]["pretrain"], tokenizer, L, preset.pretrain_steps * preset.pretrain_batch
    )
    finetune_data = pack(
        data["texts"]["finetune"], tokenizer, int(FACTOR * L), preset.finetune_steps * preset.finetune_batch
    )
    seconds = {"corpus": time.perf_counter() - began}
    print(
        f"corpus: {len(data['files'])} stdlib files split {len(split['pretrain'])} / "
        f"{len(split['finetune'])} / {len(split['held_out'])} "
        f"(pretrain / fine-tune / held out, seed {args.split_seed}); BPE of "
        f"{len(tokenizer)} tokens, {data['bytes_per_token']:.2f} bytes per token on the held-out files; "
        f"held-out files reaching each length: {data['held_out_reaching']}; "
        f"scored: {reaching}"
    )
    if reaching[str(edges[-1])] < preset.min_eval_documents:
        print(
            f"note: only {reaching[str(edges[-1])]} held-out files reach {edges[-1]} tokens "
            f"(wanted {preset.min_eval_documents}): each band is scored on the files that reach it"
        )
    if finetune_data.sequences.shape[0] < preset.finetune_steps * preset.finetune_batch:
        print(f"note: the fine-tuning files fill {finetune_data.sequences.shape[0]} sequences; they repeat")

    before: list[list[list[float]]] = []
    after: dict[str, list[list[list[float]]]] = {arm.name: [] for arm in all_arms}
    pretraining: list[dict[str, Any]] = []
    check: dict[str, Any] = {}
    finetune_seconds: dict[str, float] = {arm.name: 0.0 for arm in all_arms}
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="finetune_extension."))
    for pretrain_seed in range(preset.pretrain_seeds):
        stage = time.perf_counter()
        model, run = pretrain(preset, tokenizer, pretrain_data, pretrain_seed, work)
        weights = {key: value.detach().clone() for key, value in model.state_dict().items()}
        trained = time.perf_counter() - stage
        rows = evaluate(model, documents, edges)
        before.append(rows)
        if not check:
            check = prefix_check(model, documents, rows, edges)
        ratio = gate_ratio(np.array(rows), tokens)
        pretraining.append(
            {
                "seed": pretrain_seed,
                "tokens": run.log[-1].tokens,
                "final_loss": run.log[-1].loss,
                "seconds": trained,
                "gate_ratio": ratio,
            }
        )
        print(
            f"pretrained seed {pretrain_seed}: {run.log[-1].tokens:,} tokens, "
            f"final loss {run.log[-1].loss:.3f}, "
            f"{trained:.0f} s; plain RoPE (L,2L] / (L/2,L] perplexity {ratio:.3f} (gate {GATE})"
        )
        for data_seed in range(preset.data_seeds):
            for arm in all_arms:
                stage = time.perf_counter()
                tuned = finetune_arm(
                    arm,
                    preset,
                    tokenizer,
                    weights,
                    finetune_data,
                    data_seed,
                    work / f"pretrained-{pretrain_seed}-finetuned",
                )
                after[arm.name].append(evaluate(tuned.model, documents, edges))
                finetune_seconds[arm.name] += time.perf_counter() - stage
            print(f"  fine-tuned data seed {data_seed}: {time.perf_counter() - began:.0f} s so far")
    seconds["pretraining"] = sum(entry["seconds"] for entry in pretraining)
    seconds["finetuning_and_evaluation"] = finetune_seconds
    if args.workdir:  # the raw figures, kept with the models
        raw = {
            "before": before,
            "after": after,
            "pretraining": pretraining,
            "check": check,
            "seconds": seconds,
        }
        (work / "raw.json").write_text(json.dumps(raw))
    else:
        shutil.rmtree(work, ignore_errors=True)
    return report_run(args, preset, data, reaching, before, after, pretraining, check, began, seconds)


def report_run(
    args: argparse.Namespace,
    preset: Preset,
    data: dict[str, Any],
    reaching: dict[str, int],
    before: list[list[list[float]]],
    after: dict[str, list[list[list[float]]]],
    pretraining: list[dict[str, Any]],
    check: dict[str, Any],
    began: float,
    seconds: dict[str, Any],
) -> dict[str, Any]:
    L = preset.context
    edges, names = band_edges(L), band_names(L)
    tokens = np.array(band_tokens(edges), dtype=np.float64)
    all_arms = arms(L)
    sums = {name: np.array(rows, dtype=np.float64) for name, rows in after.items()}
    band_ppl = {"plain_before": band_perplexity(np.array(before, dtype=np.float64), tokens)}
    band_ppl |= {arm.name: band_perplexity(sums[arm.name], tokens) for arm in all_arms}
    gate_passed = all(entry["gate_ratio"] >= GATE for entry in pretraining)
    comparisons = {
        name: compare(sums[first], sums[second], tokens, REGIONS[region], preset.bootstrap, seed=0)
        | {"first": first, "second": second, "region": region}
        for name, first, second, region in COMPARISONS
    }
    if gate_passed:
        claims = verdicts(comparisons)
    else:  # the failure the methods fix is absent: rank nothing
        for entry in comparisons.values():
            entry["ranking"] = None
        claims = {claim: {"verdict": "inconclusive", "reason": "premise absent"} for claim in ("a", "b")}

    print()
    rows = [["plain RoPE, not fine-tuned", *band_ppl["plain_before"]]]
    rows += [[arm.label, *band_ppl[arm.name]] for arm in all_arms]
    rows.append(["held-out files in the band", *(reaching[str(n)] for n in edges[1:])])
    print(table(rows, ["perplexity by position band", *names]))
    print()
    labels = {arm.name: arm.label for arm in all_arms}
    rows = []
    for entry in comparisons.values():
        low, high = entry["interval"]
        rows.append(
            [
                f"{labels[entry['first']]} / {labels[entry['second']]}",
                entry["region"],
                entry["ratio"],
                f"[{low:.4f}, {high:.4f}]",
                " ".join(f"{r:.3f}" for r in entry["per_seed"]),
                entry["ranking"] or "-",
            ]
        )
    print(
        table(
            rows, ["perplexity ratio", "positions", "mean of 4 seeds", "95% interval", "per seed", "ranked"]
        )
    )
    print("(window: positions (0, 2L] of the files reaching 2L; tail: (2L, 2.5L] of those reaching 2.5L)")
    if not gate_passed:
        print(
            "\npremise absent: inconclusive (plain RoPE does not degrade enough beyond L to test the methods)"
        )
    for claim, text in (
        ("a", "inside 2L, YaRN (0.4 B) ~ PI (B), both < NTK"),
        ("b", "on (2L, 2.5L], YaRN < NTK < PI"),
    ):
        details = {key: value for key, value in claims[claim].items() if key != "verdict"}
        print(f"claim ({claim}) {text}: {claims[claim]['verdict'].upper()} {details}")
    headline = comparisons["b_yarn04_vs_ntk_tail"]["ratio"]
    print(
        f"\nheadline: YaRN (0.4 B) / NTK (theta) perplexity on (2L, 2.5L] = {headline:.4f} (the paper: < 1)"
    )
    seconds["total"] = time.perf_counter() - began
    print(f"total {seconds['total'] / 60:.1f} minutes")
    report = {
        "headline": headline,
        "headline_means": "YaRN (0.4 B)'s held-out perplexity over NTK (theta x2)'s on positions (2L, 2.5L], "
        "after fine-tuning at 2L, mean over 4 seeds (below 1: as the paper reports)",
        "verdicts": claims,
        "gate": {"threshold": GATE, "passed": gate_passed, "ratios": [e["gate_ratio"] for e in pretraining]},
        "equivalence_margin": EQUIVALENCE_MARGIN,
        "comparisons": comparisons,
        "preset": args.preset,
        "sizes": dataclasses.asdict(preset),
        "weights": sum(value.numel() for value in build_model(preset, data["tokenizer"]).parameters()),
        "arms": [
            dataclasses.asdict(arm) | {"steps": max(1, round(preset.finetune_steps * arm.budget))}
            for arm in all_arms
        ],
        "finetuning_tokens_budget": preset.finetune_steps * preset.finetune_batch * int(FACTOR * L),
        "finetuning_learning_rate": preset.pretrain_lr / 10,
        "split": {
            "seed": args.split_seed,
            "files": {
                part: [str(path.relative_to(STDLIB)) for path in paths]
                for part, paths in data["split"].items()
            },
        },
        "tokenizer": {"vocabulary": len(data["tokenizer"]), "bytes_per_token": data["bytes_per_token"]},
        "bands": names,
        "band_edges": edges,
        "band_tokens": [int(t) for t in tokens],
        "held_out_reaching": data["held_out_reaching"],
        "documents_scored": reaching,
        "band_perplexity": band_ppl,
        "prefix_check": check,
        "pretraining": pretraining,
        "nll_sums": {
            "plain_before": np.round(np.array(before), 4).tolist(),
            **{name: np.round(value, 4).tolist() for name, value in sums.items()},
        },
        "threads": args.threads,
        "seconds": seconds,
    }
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return finish(report, args.json)


if __name__ == "__main__":
    main()
