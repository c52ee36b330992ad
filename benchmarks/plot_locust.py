"""Plot a locust run of benchmarks/locustfile.py: latency percentiles and throughput over time.

    python benchmarks/plot_locust.py benchmarks/results/locust [-o benchmarks/results/locust.png]

Reads `<prefix>_requests.csv` (one row per request, written by the locustfile),
`<prefix>_summary.json` and, when present, `<prefix>_stats_history.csv` (locust's
--csv-full-history, for the user count). Percentiles over time are taken over windows of
--window seconds of request start times.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _float(x: str) -> float | None:
    return float(x) if x not in ("", "None") else None


def load_requests(path: Path) -> list[dict]:
    rows = []
    with path.open() as f:
        for r in csv.DictReader(f):
            rows.append({
                "t": float(r["t_start"]), "precision": r["precision"], "error": r["error"],
                "status": int(r["status"] or 0), "ttft": _float(r["ttft_ms"]), "tpot": _float(r["tpot_ms"]),
                "e2e": float(r["e2e_ms"]), "tokens": int(r["completion_tokens"] or 0) if r["completion_tokens"] else 0,
            })
    return rows


def load_users(path: Path) -> tuple[list[float], list[float]]:
    if not path.exists():
        return [], []
    ts, users = [], []
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("Name") == "Aggregated"]
    if not rows:
        return [], []
    t0 = float(rows[0]["Timestamp"])
    for r in rows:
        ts.append(float(r["Timestamp"]) - t0)
        users.append(float(r["User Count"]))
    return ts, users


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prefix", help="the --csv prefix of the locust run")
    ap.add_argument("-o", "--out", default="", help="PNG path (default: <prefix dir>/locust.png)")
    ap.add_argument("--window", type=float, default=10.0, help="seconds per time bin")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix = Path(args.prefix)
    rows = load_requests(Path(f"{prefix}_requests.csv"))
    summary_path = Path(f"{prefix}_summary.json")
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    out = Path(args.out) if args.out else prefix.parent / "locust.png"
    ok = [r for r in rows if not r["error"]]
    end = max((r["t"] + r["e2e"] / 1000 for r in rows), default=0.0)
    nbins = max(1, math.ceil(end / args.window))
    centers = [(i + 0.5) * args.window for i in range(nbins)]

    def binned(key: str, q: float, subset: list[dict] | None = None) -> list[float]:
        src = ok if subset is None else subset
        return [_pct([r[key] for r in src if r[key] is not None and i * args.window <= r["t"] < (i + 1) * args.window], q)
                for i in range(nbins)]

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    ax = axes[0][0]
    for q, style in ((0.5, "-"), (0.9, "--"), (0.99, ":")):
        ax.plot(centers, binned("ttft", q), style, marker="o", ms=3, label=f"TTFT p{round(q * 100)}")
    ax.set(title="Time to first token", xlabel="time (s)", ylabel="ms")
    ax.grid(alpha=0.3)
    ax.legend()

    ax = axes[0][1]
    for q, style in ((0.5, "-"), (0.9, "--"), (0.99, ":")):
        ax.plot(centers, binned("tpot", q), style, marker="o", ms=3, label=f"TPOT p{round(q * 100)}")
    ax.set(title="Time per output token (and end-to-end latency)", xlabel="time (s)", ylabel="TPOT ms")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(centers, binned("e2e", 0.5), "-", color="grey", alpha=0.6, label="E2E p50 (right)")
    ax2.plot(centers, binned("e2e", 0.99), ":", color="grey", alpha=0.6, label="E2E p99 (right)")
    ax2.set_ylabel("E2E ms")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)

    ax = axes[1][0]
    rps = [sum(1 for r in ok if i * args.window <= r["t"] + r["e2e"] / 1000 < (i + 1) * args.window) / args.window
           for i in range(nbins)]
    tps = [sum(r["tokens"] for r in ok if i * args.window <= r["t"] + r["e2e"] / 1000 < (i + 1) * args.window)
           / args.window for i in range(nbins)]
    rej = [sum(1 for r in rows if r["status"] == 429 and i * args.window <= r["t"] < (i + 1) * args.window)
           / args.window for i in range(nbins)]
    ax.plot(centers, tps, "-o", ms=3, color="tab:green", label="output tokens/s")
    ax.set(title="Throughput (by completion time)", xlabel="time (s)", ylabel="output tokens/s")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(centers, rps, "-s", ms=3, color="tab:blue", label="completed req/s")
    if any(rej):
        ax2.plot(centers, rej, "-x", ms=4, color="tab:red", label="429 rejected/s")
    ax2.set_ylabel("req/s")
    ax2.set_ylim(bottom=0)
    ax.set_ylim(bottom=0)
    ts, users = load_users(Path(f"{prefix}_stats_history.csv"))
    if ts:  # the user ramp, as a shaded band along the bottom
        top = max(users) or 1
        ax.fill_between(ts, 0, [u / top * ax.get_ylim()[1] * 0.08 for u in users], step="post",
                        color="black", alpha=0.15, label=f"users (0..{top:g})")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="best", fontsize=8)

    ax = axes[1][1]
    precisions = sorted({r["precision"] for r in ok})
    x = range(len(precisions))
    width = 0.2
    for j, (key, q, label) in enumerate((("ttft", 0.5, "TTFT p50"), ("ttft", 0.99, "TTFT p99"),
                                         ("tpot", 0.5, "TPOT p50"), ("tpot", 0.99, "TPOT p99"))):
        vals = [_pct([r[key] for r in ok if r["precision"] == p and r[key] is not None], q) for p in precisions]
        ax.bar([i + (j - 1.5) * width for i in x], vals, width, label=label)
    counts = {p: sum(1 for r in ok if r["precision"] == p) for p in precisions}
    ax.set_xticks(list(x), [f"{p}\n(n={counts[p]})" for p in precisions])
    ax.set(title="Latency by requested precision", ylabel="ms")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper left", fontsize=8, ncols=2)
    ax.set_ylim(top=ax.get_ylim()[1] * 1.15)

    if summary:
        s = summary
        title = (f"quept locust run: {s.get('model')} on {s.get('host')}, {s.get('users')} users, "
                 f"{s.get('duration_s')} s, mix {s.get('precision_mix')}\n"
                 f"{s.get('completed')} completed, {s.get('failed_429')} rejected (429), "
                 f"{s.get('failed_other')} failed; {s.get('request_throughput_rps')} req/s, "
                 f"{s.get('output_token_throughput_tps')} tok/s; TTFT p50 {s['ttft_ms']['p50']} ms, "
                 f"p99 {s['ttft_ms']['p99']} ms; TPOT p50 {s['tpot_ms']['p50']} ms")
        if s.get("cpu_count"):
            title += (f"\nclient and server on one {s['cpu_count']}-core machine, 1-min load average "
                      f"{s.get('load_avg_start')} at start, {s.get('load_avg_end')} at end")
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
