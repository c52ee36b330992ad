"""lm-evaluation-harness against one `quept serve`, every width side by side: JSON and a plot.

Starts `quept serve` (or targets --url) and runs lm-eval's own `local-completions` model, unmodified,
once per precision through the model alias `NAME@<precision>` (w8, w6, w4, w3, mixed:3.5 by
default): the same server and the same loaded checkpoint score every width, nothing is reloaded.
lm-eval tokenizes through the server (`/tokenizer_info`, `/tokenize`: its remote tokenizer) and scores
with `echo` + `logprobs` over token-id prompts. Two tasks on local data, written to a temporary task
directory (no hub):

  quept_wikitext     loglikelihood_rolling over the first --docs articles of the packaged WikiText-2
                     test split (the tokenized release, with <unk>), lm-eval's wikitext detokenizer and
                     metrics: word_perplexity, byte_perplexity, bits_per_byte
  quept_next_sentence  multiple choice (loglikelihood): which of four sentences follows a sentence of
                     the same test split (the true one, three from elsewhere in the text); acc, acc_norm

    pip install -e ".[bench]"
    python benchmarks/lm_eval_widths.py --checkpoint /path/to/calibrated/checkpoint
    python benchmarks/lm_eval_widths.py --url http://127.0.0.1:8000 --precisions w8,w4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_bench import free_port, machine, spawn_server, wait_ready  # noqa: E402

TASK_UTILS = '''from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa: F401
'''

WIKITEXT_YAML = """task: quept_wikitext
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: !function utils.wikitext_detokenizer
process_results: !function utils.process_results
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""

NEXT_SENTENCE_YAML = """task: quept_next_sentence
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

HEADING = re.compile(r"^ = [^=].* = $")


def articles(text: str) -> list[str]:
    """The split's articles, each from its top-level heading (` = Title = `) to the next."""
    docs: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        if HEADING.match(line.rstrip("\n")):
            docs.append([])
        if docs:
            docs[-1].append(line)
    return ["".join(d) for d in docs]


def sentences(text: str) -> list[str]:
    """Whole sentences of the body paragraphs, detokenized (` @-@ ` -> `-`, ` , ` -> `, `, ...)."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    out = []
    for line in text.splitlines():
        line = line.strip()
        if len(line) < 200 or line.startswith("="):
            continue
        for s in re.split(r"(?<= \.) ", line):
            s = wikitext_detokenizer({"page": s}).strip()
            if 40 <= len(s) <= 300 and "<unk>" not in s:
                out.append(s)
    return out


def next_sentence_items(text: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` items: a sentence, and four candidates for the one after it (the true one at `label`)."""
    sents = sentences(text)
    rng = random.Random(seed)
    starts = rng.sample(range(len(sents) - 1), min(n, len(sents) - 1))
    items = []
    for i in starts:
        others = [s for s in rng.sample(sents, 8) if s not in (sents[i], sents[i + 1])][:3]
        choices = [sents[i + 1], *others]
        rng.shuffle(choices)
        items.append({"context": sents[i], "choices": [" " + c for c in choices], "label": choices.index(sents[i + 1])})
    return items


def write_tasks(directory: Path, docs: int, mc_items: int) -> None:
    from quept.data import eval_file

    text = eval_file().read_text(encoding="utf-8")
    with (directory / "wikitext_docs.jsonl").open("w") as f:
        for page in articles(text)[:docs]:
            f.write(json.dumps({"page": page}) + "\n")
    with (directory / "next_sentence.jsonl").open("w") as f:
        for item in next_sentence_items(text, mc_items):
            f.write(json.dumps(item) + "\n")
    (directory / "utils.py").write_text(TASK_UTILS)
    (directory / "quept_wikitext.yaml").write_text(WIKITEXT_YAML.format(docs=directory / "wikitext_docs.jsonl"))
    (directory / "quept_next_sentence.yaml").write_text(
        NEXT_SENTENCE_YAML.format(items=directory / "next_sentence.jsonl"))


def evaluate(url: str, model: str, precision: str, tasks_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """lm-eval's `local-completions` at one precision (the alias NAME@precision)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args = {"model": f"{model}@{precision}", "base_url": url + "/v1/completions", "num_concurrent": 1,
                  "max_length": args.max_length, "max_retries": 1, "tokenized_requests": True, "timeout": 600}
    if args.api_key:  # lm-eval's remote tokenizer takes auth_token; its completions read $OPENAI_API_KEY
        model_args["auth_token"] = args.api_key
        os.environ["OPENAI_API_KEY"] = args.api_key
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model="local-completions", model_args=model_args,
                                  tasks=["quept_wikitext", "quept_next_sentence"],
                                  task_manager=TaskManager(include_path=str(tasks_dir)), batch_size=args.batch_size,
                                  log_samples=False)
    seconds = time.perf_counter() - t0
    res = out["results"]
    wiki, mc = res["quept_wikitext"], res["quept_next_sentence"]
    return {"precision": precision, "word_perplexity": wiki["word_perplexity,none"],
            "byte_perplexity": wiki["byte_perplexity,none"], "bits_per_byte": wiki["bits_per_byte,none"],
            "acc": mc["acc,none"], "acc_stderr": mc.get("acc_stderr,none"), "acc_norm": mc["acc_norm,none"],
            "seconds": round(seconds, 1)}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = [r["precision"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    bars = ax1.bar(names, [r["word_perplexity"] for r in rows], color="tab:blue")
    ax1.bar_label(bars, fmt="%.2f")
    ax1.set_ylabel("word perplexity (lower is better)")
    ax1.set_title(f"quept_wikitext: {report['settings']['docs']} articles, loglikelihood_rolling")
    bars = ax2.bar(names, [r["acc"] for r in rows], color="tab:green", yerr=[r["acc_stderr"] or 0 for r in rows])
    ax2.bar_label(bars, fmt="%.3f")
    ax2.axhline(0.25, color="grey", linestyle="--", label="chance")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("accuracy")
    ax2.set_title(f"quept_next_sentence: {report['settings']['mc_items']} items, 4 choices")
    ax2.legend()
    fig.suptitle(f"lm-eval {report['lm_eval_version']} local-completions against one quept serve "
                 f"({report['settings']['checkpoint_name']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start `quept serve` on a free port)")
    ap.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: the default model; mixed:X "
                                                     "needs a calibrated one, `quept build --calibrate`)")
    ap.add_argument("--api-key", default=os.environ.get("QUEPT_API_KEY"))
    ap.add_argument("--precisions", default="w8,w6,w4,w3,mixed:3.5")
    ap.add_argument("--docs", type=int, default=3, help="WikiText-2 test articles to score")
    ap.add_argument("--mc-items", type=int, default=100, help="next-sentence items")
    ap.add_argument("--max-length", type=int, default=512, help="lm-eval's rolling window (tokens)")
    ap.add_argument("--batch-size", type=int, default=4, help="prompts per request (lm-eval batch_size)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lm_eval_widths.json")
    ap.add_argument("--ready-timeout", type=float, default=1800)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval

    proc = None
    url = args.url
    log_path = Path(tempfile.mkstemp(suffix=".log", prefix="quept-serve-")[1])
    if url is None:
        port = free_port()
        proc = spawn_server(["--checkpoint", str(args.checkpoint)] if args.checkpoint else [], port, log_path)
        url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log_path, args.ready_timeout)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
        precisions = httpx.get(url + "/v1/precisions", headers=headers, timeout=30).json()
        rows = []
        with tempfile.TemporaryDirectory(prefix="quept-lm-eval-") as d:
            write_tasks(Path(d), args.docs, args.mc_items)
            for p in args.precisions.split(","):
                rows.append(evaluate(url, model, p, Path(d), args))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    report = {
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "unknown",
        "settings": {"docs": args.docs, "mc_items": args.mc_items, "max_length": args.max_length,
                     "batch_size": args.batch_size, "model": model,
                     "checkpoint_name": Path(str(args.checkpoint or model)).name,
                     "adapters": precisions.get("adapters"), "backend": precisions.get("backend")},
        "machine": machine(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
