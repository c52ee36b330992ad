"""Structured outputs: how many answers follow a JSON schema with and without the grammar, per width, and
what the grammar costs in decode speed, in one run.

Validity: starts `quept serve` on the default model (or --checkpoint) and sends, per precision,
`--num-requests` chat requests (at most `--concurrency` in flight, temperature 0.7, a seed each) that
ask for a pet record following SCHEMA (nested object, enum, bounded array, required fields; the
schema is in the prompt), once with `response_format: json_schema` and once without. An answer is
valid when its whole content parses as JSON and validates with `jsonschema`; without the grammar the
share is also given for the first {...} block found in the text (a lenient client's reading).

Cost: in-process, on the same checkpoint, decode tok/s of a batch of `--batch` free rows (ignore_eos)
against the same batch all constrained by SCHEMA, against one constrained row among free ones (the
free rows' tok/s: what a constrained neighbour costs them), and a lone row free vs constrained; only
steps in which every row of the batch runs are timed.
`--passes` interleaved passes; medians and ratios. Writes JSON and a PNG.

    python benchmarks/structured_outputs_bench.py
    python benchmarks/structured_outputs_bench.py --precisions w8,w2 --num-requests 10 --passes 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # the checkout's packages, also without `pip install -e .`
from serve_bench import checkpoint_path, machine, serving  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "species": {"enum": ["cat", "dog", "bird", "fish"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "owner": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                                   "city": {"type": "string", "maxLength": 20}},
                  "required": ["name", "city"], "additionalProperties": False},
        "vaccinated": {"type": "boolean"},
        "toys": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "species", "age", "owner", "vaccinated", "toys"],
    "additionalProperties": False,
}
PETS = ["a lazy cat", "an old dog", "a singing bird", "a goldfish", "a puppy", "a kitten", "a parrot", "a rescue dog",
        "a barn cat", "a koi fish"]
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Kyoto"]


def messages(i: int) -> list[dict[str, str]]:
    pet, city = PETS[i % len(PETS)], CITIES[i // len(PETS) % len(CITIES)]
    return [{"role": "system", "content": "You answer with a single JSON object and nothing else."},
            {"role": "user", "content": f"Describe {pet} that lives in {city} as a JSON object following this JSON "
                                        f"schema: {json.dumps(SCHEMA)}"}]


def valid(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False


def first_object(text: str) -> str:
    """The first balanced {...} block of `text` ('' when there is none)."""
    start = text.find("{")
    depth = 0
    for k in range(start, len(text)) if start >= 0 else ():
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[start : k + 1]
    return ""


async def validity(url: str, model: str, precision: str, n: int, concurrency: int, grammar: bool,
                   max_tokens: int) -> dict[str, Any]:
    gate = asyncio.Semaphore(concurrency)
    fmt = {"response_format": {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}} if grammar else {}

    async def one(client: httpx.AsyncClient, i: int) -> dict[str, Any]:
        async with gate:
            body = {"model": model, "messages": messages(i), "max_tokens": max_tokens, "temperature": 0.7, "seed": i,
                    **fmt}
            r = await client.post(url + "/v1/chat/completions", json=body, headers={"X-Precision": precision})
            r.raise_for_status()
            out = r.json()
            return {"text": out["choices"][0]["message"]["content"], "finish": out["choices"][0]["finish_reason"],
                    "tokens": out["usage"]["completion_tokens"]}

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        answers = await asyncio.gather(*(one(client, i) for i in range(n)))
    seconds = time.perf_counter() - t0
    ok = [valid(a["text"]) for a in answers]
    lenient = [valid(first_object(a["text"])) for a in answers]
    return {"precision": precision, "grammar": grammar, "requests": n, "valid": sum(ok), "valid_share": sum(ok) / n,
            "valid_first_object": sum(lenient), "finish_length": sum(a["finish"] == "length" for a in answers),
            "mean_completion_tokens": statistics.mean(a["tokens"] for a in answers), "seconds": seconds,
            "example": answers[0]["text"][:300],
            "invalid_examples": [a["text"][:200] for a, v in zip(answers, ok) if not v][:3]}


def run_validity(args: argparse.Namespace, log: Path) -> list[dict[str, Any]]:
    flags = ["--backend", args.backend, "--max-batch", str(args.concurrency)]
    flags += ["--checkpoint", str(args.checkpoint)] if args.checkpoint else []
    rows = []
    with serving(flags, log, 1800) as (url, model):
        for precision in args.precisions.split(","):
            for grammar in (True, False):
                row = asyncio.run(validity(url, model, precision, args.num_requests, args.concurrency, grammar,
                                           args.max_tokens))
                print(f"{precision} grammar={grammar}: {row['valid']}/{row['requests']} valid "
                      f"(first object {row['valid_first_object']}), {row['finish_length']} cut by max_tokens, "
                      f"{row['seconds']:.1f} s", flush=True)
                rows.append(row)
    return rows


def r_free(request_id: str, constrained: int) -> bool:
    """Rows `<tag>-k` with k >= `constrained` are the free ones."""
    return int(request_id.rsplit("-", 1)[1]) >= constrained


def run_cost(args: argparse.Namespace) -> dict[str, Any]:
    """Decode tok/s of free vs constrained rows, in-process."""
    import torch

    from quept.engine.engine import EngineConfig, LLMEngine
    from quept.engine.sampler import SamplingParams
    from quept.engine.sequence import GenerationRequest
    from quept.model.loader import load_model
    from quept.structured.grammar import GrammarCompiler, GrammarSpec

    lm = load_model(checkpoint_path(args), backend=args.backend)
    tok = lm.tokenizer
    engine = LLMEngine.from_loaded(lm, EngineConfig(max_batch=args.batch, kv_cache_bytes=256 << 20),
                                   default_precision=args.cost_precision)
    grammar = GrammarCompiler(tok, lm.model.args.vocab_size, engine.eos_ids).compile(
        GrammarSpec.json_schema(SCHEMA, "response_format"))
    prompt = tuple(tok.apply_chat_template(messages(0), add_generation_prompt=True, tokenize=True))
    if not isinstance(prompt[0], int):  # transformers 5 returns a BatchEncoding
        prompt = tuple(tok.apply_chat_template(messages(0), add_generation_prompt=True, tokenize=True)["input_ids"])
    spec = lm.parse(args.cost_precision)

    def timed(rows: int, constrained: int, tag: str) -> dict[str, float]:
        """Prefill every row, then time the decode steps while all free rows run: tok/s of free and
        constrained rows."""
        reqs = [GenerationRequest(f"{tag}-{k}", prompt, args.cost_tokens, SamplingParams(temperature=0.7, seed=k), spec,
                                  grammar=grammar if k < constrained else None, ignore_eos=k >= constrained)
                for k in range(rows)]
        for r in reqs:
            engine.add_request(r)
        started: set[str] = set()
        while len(started) < rows:  # prefill and the first tokens: not decode
            started.update(out.request_id for out in engine.step() if out.num_output_tokens)
        counts = {"free": 0, "constrained": 0}
        t0 = time.perf_counter()
        steps, full = 0, True
        while full:  # time only steps in which every row runs (a constrained row may end its JSON early)
            for out in engine.step():
                counts["free" if r_free(out.request_id, constrained) else "constrained"] += len(out.new_token_ids)
                full = full and not out.request_finished
            steps += 1
        seconds = time.perf_counter() - t0
        for r in reqs:
            engine.abort(r.request_id)
        return {"seconds": seconds, "steps": steps, "free_tok_s": counts["free"] / seconds,
                "constrained_tok_s": counts["constrained"] / seconds, "ms_per_step": 1000 * seconds / max(steps, 1)}

    configs = {f"batch {args.batch} free": (args.batch, 0), f"batch {args.batch} constrained": (args.batch, args.batch),
               f"batch {args.batch}, 1 constrained": (args.batch, 1), "batch 1 free": (1, 0),
               "batch 1 constrained": (1, 1)}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in configs}
    timed(2, 1, "warm")
    for p in range(args.passes):
        for name, (rows, constrained) in configs.items():
            runs[name].append(timed(rows, constrained, f"p{p}-{name.replace(' ', '_').replace(',', '')}"))
            print(f"pass {p} {name}: {runs[name][-1]}", flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    b = args.batch
    ratios = {
        f"constrained/free tok/s, batch {b}": med[f"batch {b} constrained"]["constrained_tok_s"] /
        med[f"batch {b} free"]["free_tok_s"],
        f"free rows beside 1 constrained / all free, batch {b}": med[f"batch {b}, 1 constrained"]["free_tok_s"] /
        (med[f"batch {b} free"]["free_tok_s"] * (b - 1) / b),
        "constrained/free tok/s, batch 1": med["batch 1 constrained"]["constrained_tok_s"] /
        med["batch 1 free"]["free_tok_s"],
    }
    return {"precision": args.cost_precision, "backend": lm.backend.name, "threads": torch.get_num_threads(),
            "tokens_per_row": args.cost_tokens, "runs": runs, "medians": med, "ratios": ratios}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    rows = report["validity"]
    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    x = range(len(precisions))
    for k, (grammar, label) in enumerate(((True, "with grammar"), (False, "without"))):
        shares = [next(r["valid_share"] for r in rows if r["precision"] == p and r["grammar"] is grammar) * 100
                  for p in precisions]
        a.bar([i + 0.4 * k for i in x], shares, 0.4, label=label)
    a.set_xticks([i + 0.2 for i in x], precisions)
    a.set_ylabel("answers valid against the schema (%)")
    a.set_title(f"{rows[0]['requests']} requests per width")
    a.legend(loc="center")
    cost = report["cost"]["medians"]
    names = list(cost)
    values = [cost[n]["constrained_tok_s"] + cost[n]["free_tok_s"] for n in names]
    b.barh(names, values)
    b.set_xlabel(f"decode tok/s ({report['cost']['precision']}, in-process)")
    b.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--precisions", default="w8,w4,w3,w2")
    ap.add_argument("--num-requests", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=320)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cost-precision", default="w4")
    ap.add_argument("--cost-tokens", type=int, default=32)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: validity, cost")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "structured_outputs.json")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    report: dict[str, Any] = {"command": "python " + " ".join(sys.argv), "machine": machine(), "schema": SCHEMA}
    with tempfile.TemporaryDirectory() as tmp:
        if "validity" not in skip:
            report["validity"] = run_validity(args, Path(tmp) / "server.log")
    if "cost" not in skip:
        report["cost"] = run_cost(args)
        for k, v in report["cost"]["ratios"].items():
            print(f"{k}: {v:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    if "validity" in report and "cost" in report:
        plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
