"""Mini-replication of the YaRN paper's claim: fine-tuned through a 4x extension, which method wins?

Run (about 20 minutes on 2 shared CPU cores; ``--preset smoke`` is CI's seconds-long version):
    nice -n 10 .venv/bin/python benchmarks/finetune_extension.py \
        --json benchmarks/results/finetune_extension.json --plot docs/runs/finetune_extension.png

The paper (Peng et al., ICLR 2024, sections 4.2-4.3, Table 1 and Figure 1) extends Llama-2 and
reports that, at an equal number of fine-tuning steps, YaRN reaches a lower perplexity than
position interpolation (PI, "linear") and NTK-aware scaling, and keeps it beyond the length it was
fine-tuned at. The same experiment, small enough for this machine, with nothing downloaded:

1. corpus: the running Python's standard-library sources (top-level modules and one package
   down, tests left out; about 500 files, 10 MB on Python 3.11), sorted by path and split by
   position in that list: every 10th file is held out for evaluation, the rest is training text
   (the first 70% of the training files for pretraining, the rest for fine-tuning); byte-level
   tokens (256 bytes + BOS/EOS), documents packed with BOS/EOS by :mod:`yarn_rope.finetune`;
2. a small Llama (4 layers, hidden 256, 4 heads of 64, RoPE base 10000: 3.3M weights) is
   **pretrained from scratch** by :func:`yarn_rope.finetune.finetune` (``method="none"``) at a
   context of 256 tokens;
3. it is extended 4x (to 1024) with each of PI (``linear``), NTK-aware (``ntk``) and YaRN
   (``yarn``), and each copy is **fine-tuned the same number of steps** on 1024-token sequences
   with the same recipe (AdamW, warm-up then linear decay, same data in the same order);
4. perplexity on the held-out files (each file's first N tokens, the paper's truncated
   evaluation) at 1x, 2x, 4x and 8x the pretraining context, before fine-tuning (plain RoPE and
   each method patched onto the pretrained model) and after; and at 4x every quarter of the
   fine-tuning steps (the paper's claim is also about how few steps YaRN needs).

The headline is YaRN's held-out perplexity after fine-tuning at the fine-tuned length (4x) over the
best of the other two methods' (below 1: YaRN lowest, as the paper expects). Everything is
seeded; figures move with the Python version (its standard library is the corpus) and, a little,
with the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

import yarn_rope
from _common import finish, table
from yarn_rope.eval import perplexity
from yarn_rope.finetune import FinetuneRecipe, finetune, prepare_data

METHODS = ("linear", "ntk", "yarn")
LABELS = {"none": "plain RoPE", "linear": "PI (linear)", "ntk": "NTK-aware", "yarn": "YaRN"}


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of one run."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    context: int  # pretraining context; fine-tuning at factor x context
    factor: float
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    finetune_steps: int
    finetune_batch: int
    finetune_lr: float
    eval_documents: int


PRESETS = {
    "default": Preset(
        hidden=256,
        layers=4,
        heads=4,
        intermediate=704,
        context=256,
        factor=4.0,
        pretrain_steps=300,
        pretrain_batch=16,
        pretrain_lr=2e-3,
        finetune_steps=40,
        finetune_batch=4,
        finetune_lr=5e-4,
        eval_documents=32,
    ),
    "smoke": Preset(
        hidden=32,
        layers=1,
        heads=2,
        intermediate=64,
        context=32,
        factor=4.0,
        pretrain_steps=3,
        pretrain_batch=2,
        pretrain_lr=1e-3,
        finetune_steps=2,
        finetune_batch=1,
        finetune_lr=1e-3,
        eval_documents=2,
    ),
}


def byte_tokenizer() -> Any:
    """A byte-level tokenizer: the 256 bytes (GPT-2's byte alphabet) and ``<s>``/``</s>``, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<s>"], vocab["</s>"] = 256, 257
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


# Standard-library folders left out of the corpus: tests, installed packages, demos.
SKIPPED = ("site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo")


def corpus() -> tuple[list[str], list[str], list[Path]]:
    """(pretraining texts, fine-tuning texts, held-out files) from the standard library: its
    top-level modules and those one package down, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = [*root.glob("*.py"), *(p for p in root.glob("*/*.py") if p.parent.name not in SKIPPED)]
    files = sorted(found, key=lambda path: path.relative_to(root).as_posix())
    held_out = [path for index, path in enumerate(files) if index % 10 == 0]
    training = [path for index, path in enumerate(files) if index % 10 != 0]
    cut = int(len(training) * 0.7)
    read = [path.read_text(encoding="utf-8", errors="replace") for path in training]
    return read[:cut], read[cut:], held_out


def evaluation_documents(files: list[Path], tokenizer: Any, length: int, count: int) -> list[torch.Tensor]:
    """The first ``count`` held-out files with at least ``length`` tokens, as ``[BOS] ids`` tensors."""
    documents = []
    for path in files:
        ids = [
            tokenizer.bos_token_id,
            *tokenizer(path.read_text(encoding="utf-8", errors="replace"))["input_ids"],
        ]
        if len(ids) >= length:
            documents.append(torch.tensor(ids[:length], dtype=torch.long))
        if len(documents) == count:
            break
    if len(documents) < count:
        raise SystemExit(f"only {len(documents)} held-out files have {length} tokens; lower --eval-documents")
    return documents


def build_model(preset: Preset, tokenizer: Any, seed: int) -> Any:
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden,
        intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.heads,
        max_position_embeddings=preset.context,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def scaling(method: str, preset: Preset) -> yarn_rope.RopeScaling:
    return yarn_rope.RopeScaling(
        method=method, factor=preset.factor, original_max_position_embeddings=preset.context
    )


def measure(model: Any, documents: list[torch.Tensor], lengths: list[int]) -> dict[int, float]:
    result = perplexity(model, documents, lengths=lengths, progress=False)
    return {entry.length: entry.perplexity for entry in result.lengths}


def plot(results: dict[str, Any], lengths: list[int], preset: Preset, path: str) -> None:
    """Three panels: perplexity by length before and after fine-tuning, and at the fine-tuned length
    by fine-tuning step."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    extended = int(preset.context * preset.factor)
    colors = {"none": "grey", "linear": "tab:blue", "ntk": "tab:orange", "yarn": "tab:green"}
    figure = Figure(figsize=(15, 4.4), dpi=110)
    axes = [figure.add_subplot(1, 3, 1)]
    axes += [figure.add_subplot(1, 3, 2, sharey=axes[0]), figure.add_subplot(1, 3, 3, sharey=axes[0])]
    for axis, stage in zip(axes[:2], ("before", "after"), strict=True):
        for method, rows in results.items():
            if method == "none" and stage == "after":  # plain RoPE, not fine-tuned, for reference
                axis.plot(lengths, [rows["before"][n] for n in lengths], color="grey", linestyle=":",
                          marker=".", label="plain RoPE (not fine-tuned)")  # fmt: skip
            elif stage in rows:
                values = [rows[stage][n] for n in lengths]
                axis.plot(lengths, values, marker="o", color=colors[method], label=LABELS[method])
        axis.axvline(preset.context, color="grey", linestyle=":", linewidth=1)
        if stage == "after":
            axis.axvline(extended, color="black", linestyle="--", linewidth=1)
        axis.set_xscale("log", base=2)
        axis.set_xticks(lengths, [str(n) for n in lengths])
        axis.set_xlabel("context length (tokens)")
        axis.set_title(
            "before fine-tuning"
            if stage == "before"
            else f"after {preset.finetune_steps} steps at {extended} tokens"
        )
    steps_axis = axes[2]
    for method in METHODS:
        by_step = results[method]["by_step"]
        steps = sorted(by_step)
        steps_axis.plot(
            steps, [by_step[k] for k in steps], marker="o", color=colors[method], label=LABELS[method]
        )
    steps_axis.set_xlabel("fine-tuning step")
    steps_axis.set_title(f"at {extended} tokens, by fine-tuning step")
    for axis in axes:
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(ScalarFormatter())
        axis.yaxis.set_minor_formatter(ScalarFormatter())  # the curves span less than a decade
        axis.grid(True, alpha=0.3, which="both")
        axis.legend(fontsize=8)
    axes[0].set_ylabel("held-out perplexity")
    figure.suptitle(
        f"Llama with {preset.layers} layers, hidden {preset.hidden}, pretrained at {preset.context} tokens, "
        f"extended x{preset.factor:g}"
    )
    figure.tight_layout()
    from yarn_rope._files import save_figure

    save_figure(figure, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"override a preset size ({', '.join(f.name for f in dataclasses.fields(Preset))})",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine, 2 threads fighting other jobs ran one "
        "training step 12x slower here)",
    )
    parser.add_argument("--workdir", default=None, help="keep the models here (default: a temporary folder)")
    parser.add_argument("--plot", default=None, metavar="OUT.png", help="perplexity by length, before/after")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the report")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    types = {field.name: field.type for field in dataclasses.fields(Preset)}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in types or not value:
            parser.error(f"--set takes NAME=VALUE with NAME one of {', '.join(types)}, got {item!r}")
        preset = dataclasses.replace(preset, **{name: float(value) if types[name] == "float" else int(value)})
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    began = time.perf_counter()

    tokenizer = byte_tokenizer()
    pretrain_texts, finetune_texts, held_out = corpus()
    extended = int(preset.context * preset.factor)
    lengths = [preset.context * k for k in (1, 2, 4, 8)]
    documents = evaluation_documents(held_out, tokenizer, max(lengths), preset.eval_documents)
    import datasets

    pretrain_data = prepare_data(
        datasets.Dataset.from_dict({"text": pretrain_texts}),
        tokenizer,
        seq_len=preset.context,
        max_sequences=preset.pretrain_steps * preset.pretrain_batch,
        progress=False,
    )
    finetune_data = prepare_data(
        datasets.Dataset.from_dict({"text": finetune_texts}),
        tokenizer,
        seq_len=extended,
        max_sequences=preset.finetune_steps * preset.finetune_batch,
        progress=False,
    )
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="finetune_extension."))
    work.mkdir(parents=True, exist_ok=True)

    model = build_model(preset, tokenizer, args.seed)
    weights = sum(p.numel() for p in model.parameters())
    print(
        f"model: Llama, {preset.layers} layers, hidden {preset.hidden}, {preset.heads} heads, "
        f"{weights:,} weights; "
        f"corpus: {len(pretrain_texts)} + {len(finetune_texts)} stdlib files (pretrain + fine-tune), "
        f"{len(held_out)} held out ({len(documents)} scored)"
    )
    pretrain_recipe = FinetuneRecipe(
        method="none",
        seq_len=preset.context,
        steps=preset.pretrain_steps,
        learning_rate=preset.pretrain_lr,
        warmup_steps=max(1, preset.pretrain_steps // 20),
        batch_size=preset.pretrain_batch,
        gradient_accumulation=1,
        weight_decay=0.1,
        gradient_checkpointing=False,
        seed=args.seed,
    )
    stage = time.perf_counter()
    pretrained = finetune(
        model,
        pretrain_data,
        output=work / "pretrained",
        recipe=pretrain_recipe,
        tokenizer=tokenizer,
        eval_every=0,
        checkpoint_every=0,
        plot=False,
        progress=False,
    )
    pretrain_seconds = time.perf_counter() - stage
    print(
        f"pretrained: {preset.pretrain_steps} steps x {preset.pretrain_batch} x {preset.context} tokens "
        f"({pretrained.log[-1].tokens:,} tokens), final loss {pretrained.log[-1].loss:.3f}, "
        f"{pretrain_seconds:.0f} s"
    )

    results: dict[str, dict[str, Any]] = {"none": {"before": measure(pretrained.model, documents, lengths)}}
    for method in METHODS:
        with yarn_rope.patched(pretrained.model, scaling(method, preset)):
            results[method] = {"before": measure(pretrained.model, documents, lengths)}

    finetune_recipe_fields = dict(
        factor=preset.factor,
        seq_len=extended,
        steps=preset.finetune_steps,
        learning_rate=preset.finetune_lr,
        warmup_steps=max(1, preset.finetune_steps // 10),
        batch_size=preset.finetune_batch,
        gradient_accumulation=1,
        gradient_checkpointing=False,
        seed=args.seed,
    )
    for method in METHODS:
        stage = time.perf_counter()
        model = yarn_rope.from_pretrained(work / "pretrained", dtype="float32")
        run = finetune(
            model,
            finetune_data,
            output=work / f"finetuned-{method}",
            recipe=FinetuneRecipe(method=method, **finetune_recipe_fields),
            tokenizer=tokenizer,
            eval_data=[document[:extended] for document in documents],
            eval_lengths=[extended],
            eval_every=max(1, preset.finetune_steps // 4),
            checkpoint_every=0,
            plot=False,
            progress=False,
        )
        results[method]["by_step"] = {record.step: record.perplexity[extended] for record in run.evals}
        results[method]["after"] = measure(run.model, documents, lengths)
        results[method]["losses"] = run.losses
        results[method]["seconds"] = time.perf_counter() - stage
        print(
            f"fine-tuned {LABELS[method]}: final loss {run.log[-1].loss:.3f}, "
            f"{results[method]['seconds']:.0f} s"
        )

    rows = []
    for method in ("none", *METHODS):
        for stage_name in ("before", "after"):
            if stage_name in results[method]:
                label = f"{LABELS[method]}{'' if method == 'none' else f' x{preset.factor:g}'}"
                rows.append([label, stage_name, *(results[method][stage_name][n] for n in lengths)])
    header = ["method", "fine-tuned", *(f"{n} ({n // preset.context}x)" for n in lengths)]
    print()
    print(table(rows, header))
    after = {method: results[method]["after"] for method in METHODS}
    best_other = min(after[m][extended] for m in METHODS if m != "yarn")
    headline = after["yarn"][extended] / best_other
    beyond = max(lengths)
    winner_at = {n: min(METHODS, key=lambda m, n=n: after[m][n]) for n in lengths}
    print(
        f"\nheadline: after {preset.finetune_steps} steps at {extended} tokens, YaRN's perplexity there is "
        f"{headline:.3f}x the best other method's; lowest at each length: "
        + ", ".join(f"{n}: {LABELS[winner_at[n]]}" for n in lengths)
    )
    seconds = time.perf_counter() - began
    print(f"total {seconds / 60:.1f} minutes")
    if args.plot:
        plot(results, lengths, preset, args.plot)
        print(f"wrote {args.plot}")
    report = {
        "headline": headline,
        "headline_means": (
            f"YaRN's held-out perplexity after fine-tuning, at the fine-tuned length {extended}, over the "
            "lowest of PI's and NTK-aware's (below 1: YaRN lowest)"
        ),
        "preset": args.preset,
        "sizes": dataclasses.asdict(preset),
        "weights": weights,
        "lengths": lengths,
        "pretraining_tokens": pretrained.log[-1].tokens,
        "pretraining_final_loss": pretrained.log[-1].loss,
        "finetuning_tokens_per_method": preset.finetune_steps * preset.finetune_batch * extended,
        "eval_documents": len(documents),
        "eval_tokens_per_length": {str(n): len(documents) * (n - 1) for n in lengths},
        "lowest_after_finetuning": {str(n): winner_at[n] for n in lengths},
        "beyond_finetuned_length": {m: after[m][beyond] for m in METHODS},
        "results": {
            method: {
                stage_name: {str(n): value for n, value in values.items()}
                for stage_name, values in entry.items()
                if stage_name in ("before", "after")
            }
            | {key: entry[key] for key in ("losses", "seconds") if key in entry}
            | ({"by_step": {str(k): v for k, v in entry["by_step"].items()}} if "by_step" in entry else {})
            for method, entry in results.items()
        },
        "pretraining_seconds": pretrain_seconds,
        "threads": args.threads,
        "seconds": seconds,
    }
    return finish(report, args.json)


if __name__ == "__main__":
    main()
