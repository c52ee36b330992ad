"""The `quept` console script: build, generate, eval and serve.

`quept serve` flags mirror the fields of `quept.server.settings.Settings`; each can also come from a
`QUEPT_<NAME>` environment variable, and a flag wins over the environment.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import shlex
import sys
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quept.errors import QueptError

log = logging.getLogger("quept")


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w.strip().lstrip("w")) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad width list {text!r}; expected e.g. 8,6,5,4,3,2") from None


def build_parser() -> tuple[argparse.ArgumentParser, Any]:
    parser = argparse.ArgumentParser(prog="quept", description="Elastic-precision LLM serving")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build an elastic checkpoint from a source model")
    b.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    b.add_argument("--source", type=Path, help="local HF LLaMA-family directory or GGUF file (default: SmolLM2-135M-Instruct)")
    b.add_argument("--widths", type=_widths, default=(8, 6, 5, 4, 3, 2), help="stored widths, 8 first")
    b.add_argument("--group-size", type=int, default=None,
                   help="input columns per quantization group (must divide every K; default: the source's own "
                        "quantization block when it is 32-aligned and divides every K, e.g. 32 for Q4_1 GGUF, else 64)")
    b.add_argument("--affine", choices=["lsq", "centre"], default="lsq",
                   help="per-width affines (without --calibrate): the least-squares fit of each group's weights on "
                        "its b-bit codes (default), or the centre of each code's 8-bit bin range")
    b.add_argument("--anchor-bits", type=int, choices=range(0, 9), metavar="{0..8}", default=None,
                   help="without --calibrate: master codes whose top bits are each group's own RTN codes at this "
                        "width (default 4 with lsq affines; 0: min/max codes over 255 steps, what --affine centre "
                        "takes)")
    b.add_argument("--ranks", help="adapter rank per width, e.g. 8:0,6:8,5:8,4:16,3:24,2:32")
    b.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    b.add_argument("--calibrate", action="store_true", help="one-shot QuEPT calibration (docs/architecture.md §3)")
    b.add_argument("--calib-file", type=Path, help="calibration text (default: WikiText-2 valid.txt, shipped in the package)")
    b.add_argument("--samples", type=int, default=16, help="calibration sequences (with --calibrate)")
    b.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence (with --calibrate)")
    b.add_argument("--epochs", type=int, default=1, help="passes over the samples per block (with --calibrate)")
    b.add_argument("--threads", type=int, default=0,
                   help="torch threads for calibration (0: one per core; 1 can be faster on a busy, shared machine)")

    g = sub.add_parser("generate", help="generate a completion for one prompt")
    g.add_argument("prompt", help="user prompt (the chat template is applied when the model has one)")
    g.add_argument("--checkpoint", type=Path,
                   help="checkpoint directory (default: the default model, built into $QUEPT_CACHE_DIR or "
                        "~/.cache/quept on first use, as `quept serve` does)")
    g.add_argument("--precision", default="w8", help="w8..w2 or mixed:X")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--backend", default="auto",
                   help="auto|torch|torch-fp32|native|triton (torch computes in fp16; torch-fp32 is the exact reference)")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")

    e = sub.add_parser("eval", help="perplexity table on wikitext-2 test.txt")
    e.add_argument("--checkpoint", type=Path,
                   help="checkpoint directory (default: the default model, built on first use as `quept serve` does)")
    e.add_argument("--precision", default="w8,w6,w5,w4,w3,w2", help="comma list of w8..w2 or mixed:X")
    e.add_argument("--windows", type=int, default=8, help="consecutive windows scored from --start on")
    e.add_argument("--start", type=float, default=0.0,
                   help="where the windows begin, as a fraction of the file's tokens (0: its start; 0.6: the last "
                        "40 %%, away from the windows the committed results and any tuning use)")
    e.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    e.add_argument("--file", type=Path, help="text file (default: WikiText-2 test.txt, shipped in the package)")
    e.add_argument("--baselines", choices=["all", "none"], default="all",
                   help="also score the unquantized source and independent round-to-nearest per width")
    e.add_argument("--json", type=Path, help="write results as JSON (and a PNG plot beside it)")
    e.add_argument("--backend", default="torch-fp32",
                   help="backend to score through (default: the exact fp32 reference; name a serving backend "
                        "such as native to measure what it serves)")
    add_serve_parser(sub)
    return parser, sub


def _flag_type(annotation: Any) -> Any:
    """argparse type of a settings field (`int | None` -> int)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args and (typing.get_origin(annotation) in (typing.Union, types.UnionType)) else annotation
    return base if base in (int, float, Path) else str


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    from quept.server.settings import Settings

    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API",
                       description="Serve a checkpoint (default: SmolLM2-135M-Instruct, built on first use) over an "
                                   "OpenAI-compatible HTTP API. Every flag can also be set as QUEPT_<NAME>.")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"QUEPT_{name.upper()}"
        doc = (field.description or "").replace("%", "%%")
        if field.annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"{doc} [{env}]")
        else:
            p.add_argument(flag, type=_flag_type(field.annotation), default=argparse.SUPPRESS, metavar=name.upper(),
                           help=f"{doc} [{env}]")
    return p


def cmd_build(args: argparse.Namespace) -> int:
    from quept.build.builder import DEFAULT_ANCHOR_BITS, build_checkpoint, parse_ranks
    from quept.build.source import load_source

    ranks = parse_ranks(args.ranks, args.widths) if args.ranks else None
    t0 = time.perf_counter()
    source = load_source(args.source)
    if getattr(args, "calibrate", False):
        from quept.build.calibration import CalibConfig, calibrate_checkpoint

        cfg = CalibConfig(calib_file=args.calib_file, samples=args.samples, seq_len=args.seq_len, epochs=args.epochs,
                          threads=args.threads)
        path = calibrate_checkpoint(source, args.out, args.widths, args.group_size, ranks, cfg, overwrite=args.overwrite)
        print(f"wrote {path} in {time.perf_counter() - t0:.1f} s")
        return 0
    anchor = args.anchor_bits
    if anchor is None:
        anchor = DEFAULT_ANCHOR_BITS if args.affine == "lsq" else 0
    path = build_checkpoint(source, args.out, args.widths, args.group_size, ranks, overwrite=args.overwrite,
                            affine=args.affine, anchor_bits=anchor or None)
    print(f"wrote {path} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from quept.engine.generate import generate
    from quept.engine.sampler import SamplingParams
    from quept.model.loader import load_model

    checkpoint = _checkpoint_or_default(args.checkpoint)
    lm = load_model(checkpoint, backend=args.backend)
    plan = lm.plan_for(args.precision)
    if lm.tokenizer is None:
        raise QueptError(f"{checkpoint} has no tokenizer files")
    ids = list(lm.tokenizer(args.prompt)["input_ids"]) if args.raw else lm.encode_chat(args.prompt)
    params = SamplingParams(temperature=args.temperature, seed=args.seed)
    stop = [lm.tokenizer.eos_token_id] if lm.tokenizer.eos_token_id is not None else []
    result = generate(lm.model, ids, plan, args.max_tokens, params, stop_ids=stop)
    text = lm.tokenizer.decode([t for t in result.tokens if t not in stop], skip_special_tokens=True)
    print(text)
    print(f"[{plan.name}: {len(result.tokens)} tokens, prefill {result.prefill_seconds * 1000:.0f} ms, "
          f"decode {result.decode_tokens_per_second:.1f} tok/s, first-step (includes width switch) "
          f"{result.step_seconds[0] * 1000:.0f} ms, load {lm.load_seconds:.1f} s]", file=sys.stderr)
    return 0


def _checkpoint_or_default(checkpoint: Path | None) -> Path:
    """The checkpoint given, else the default model (built into the cache on first use)."""
    if checkpoint is not None:
        return checkpoint
    from quept.build.builder import ensure_default_checkpoint
    from quept.model.loader import default_cache_dir

    return ensure_default_checkpoint(default_cache_dir())


def cmd_eval(args: argparse.Namespace) -> int:
    from quept.build.baselines import independent_rtn_model
    from quept.data import eval_file
    from quept.eval.bits import read_bits, rtn_read_bits
    from quept.eval.perplexity import Job, format_table, plot_rows, results_json, run_rows, token_windows
    from quept.model.loader import load_model
    from quept.model.model import dense_model
    from quept.precision.plan import PrecisionPlan

    checkpoint = _checkpoint_or_default(args.checkpoint)
    lm = load_model(checkpoint, backend=args.backend)
    specs = [s.strip() for s in args.precision.split(",") if s.strip()]
    plans = [lm.plan_for(s) for s in specs]  # validate every spec before the slow work
    path = args.file or eval_file()
    windows = token_windows(lm.tokenizer, path, args.windows, args.seq_len, args.start)
    protocol = {"file": str(path), "windows": args.windows, "start": args.start, "seq_len": args.seq_len,
                "tokens_scored": args.windows * (args.seq_len - 1), "group_size": lm.ckpt.group_size,
                "checkpoint": str(checkpoint), "source": lm.ckpt.meta.get("source")}
    jobs: list[Job] = []
    dense = PrecisionPlan.uniform(8)  # dense models read no widths
    source = None
    if args.baselines == "all":
        from quept.build.source import load_source

        source = load_source(lm.ckpt.meta.get("source"))
        jobs.append(("unquantized", "unquantized", 16.0, 16.0,
                     lambda: (dense_model(source.args, source.state), dense)))
    method = lm.ckpt.meta.get("calibration") and "calibrated" or "nested"
    for plan in plans:
        bits = plan.avg_bits or float(plan.uniform_bits or 8)
        read = round(read_bits(lm.ckpt.elastic, lm.model.linear_names, plan.widths(lm.model.n_linears)).total, 4)
        if source is not None and plan.uniform_bits is not None:
            b = plan.uniform_bits
            jobs.append((f"independent-rtn w{b}", "independent-rtn", float(b), rtn_read_bits(b, lm.ckpt.group_size),
                         lambda b=b: (independent_rtn_model(source.args, source.state, b, lm.ckpt.group_size), dense)))
        kind = method if plan.uniform_bits is not None else "mixed"
        jobs.append((f"{kind} {plan.name}", kind, bits, read, lambda plan=plan: (lm.model, plan)))
    rows = run_rows(windows, jobs)
    where = f"from {args.start:.0%} of its tokens" if args.start else "from its start"
    print(f"perplexity on {path.name}: {args.windows} windows of {args.seq_len} tokens {where}")
    print(format_table(rows))
    if args.json:
        command = "quept " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results_json(rows, protocol, command), indent=1))
        plot_rows(rows, args.json.with_suffix(".png"), f"{Path(str(protocol['source'])).name}: perplexity vs width")
        print(f"wrote {args.json} and {args.json.with_suffix('.png')}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from quept.server.launch import serve
    from quept.server.settings import Settings

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "verbose")}
    try:
        settings = Settings(**overrides)
    except ValidationError as err:
        for e in err.errors():
            where = ".".join(str(x) for x in e["loc"])
            print(f"error: {where + ': ' if where else ''}{e['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    from quept.model.checkpoint import META_FILE

    if settings.checkpoint is not None and not (Path(settings.checkpoint) / META_FILE).is_file():
        print(f"error: --checkpoint {settings.checkpoint}: not a checkpoint directory (no {META_FILE})", file=sys.stderr)
        return 2
    return serve(settings, verbose=args.verbose)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "build": cmd_build, "generate": cmd_generate, "eval": cmd_eval, "serve": cmd_serve}


def run(args: argparse.Namespace) -> int:
    """Run a parsed runtime command; user errors print one line and exit 2, never a traceback."""
    if args.command != "serve":  # the server sets up its own logging from its settings
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (QueptError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a read-only or vanished directory: what and where, in one line
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def unknown_flag_hint(flag: str, options: list[str]) -> str:
    """`; did you mean --default-precision?` for a flag close to or inside a known one, else ''."""
    name = flag.split("=", 1)[0]
    close = [o for o in options if name.lstrip("-") and name.lstrip("-") in o.lstrip("-")]
    close = close or difflib.get_close_matches(name, options, n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(close[:2])}?" if close else ""


def main(argv: list[str] | None = None) -> int:
    parser, sub = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = sub.choices[args.command]
        options = [o for a in command._actions for o in a.option_strings if o.startswith("--")]
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        command.error(f"unrecognized argument {flag}{unknown_flag_hint(flag, options)}")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
