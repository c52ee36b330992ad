"""Adaptive precision under a load ramp: `fixed w8`, `fixed w4` and the `load` policy on the default model.

For each configuration a `quept serve` subprocess starts on 127.0.0.1 (a free port), and a closed-loop
client ramps the number of concurrent streaming clients up and down (`--levels`, each held for
`--phase-s` seconds; every client sends `auto` requests of `--max-tokens` tokens back to back).
Every `--window-s` seconds of the ramp it records the offered load (clients), the served precision
(token-weighted bits from `quept:generation_tokens_by_width_total`, and the default plan gauge),
p95 inter-token latency (gaps between streamed chunks) against the SLO, and output throughput.
Each configuration runs `--repeats` ramps (2: in the order w8, w4, load, load, w4, w8, so that the
drift of a shared machine hits every configuration alike); results pool the ramps, and the plot
shows their mean per window.

The table: SLO attainment (share of ramp windows whose p95 ITL meets the SLO, and share of all ITL
samples under it), throughput, average served bits, and the perplexity of the tokens actually served
(exp of the token-weighted mean NLL per width, from benchmarks/results/quality_rtn.json or
quality_calibrated.json; a quick 2-window evaluation when neither is there). The `load` server's
cost model (profiled at its start, corrected by live steps) and its switches are stored too.

    python benchmarks/adaptive_load.py                      # ~9 min on 2 cores
    python benchmarks/adaptive_load.py --slo-itl-ms 30 --levels 1,2,4,8,4,2,1

SLO: `--slo-itl-ms`, or (0, the default) set from the run itself: `fixed w8` and `fixed w4` run
first, and the SLO is the window p95 ITL at which the width matters most (the largest difference
between the shares of ramp windows w4 and w8 meet; `choose_slo`). Without both fixed runs:
`--tail-factor` x the geometric mean of the profiled w8 and w4 decode step at the peak batch.
Servers run with one torch thread by default (`--threads`): on a busy 2-core machine OpenMP spin
waits cost more than a second thread gives.
Writes benchmarks/results/adaptive_load.json and adaptive_load.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's packages, also from a checkout without `pip install -e .`
RESULTS = ROOT / "benchmarks" / "results"
PROMPTS = ["Write a short poem about the sea.", "Explain what a hash table is.", "List three uses of copper.",
           "Describe the water cycle in two sentences.", "What is the capital of Italy and why is it famous?",
           "Give me a tip for learning to cook.", "Summarize the plot of a detective story.", "Why is the sky blue?"]
WIDTH_METRIC = "quept:generation_tokens_by_width_total"


# ----------------------------------------------------------------------------- server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    def __init__(self, name: str, checkpoint: Path, flags: list[str], log_path: Path, threads: int) -> None:
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "quept.cli", "serve", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
               "--port", str(self.port), *flags]
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUEPT_")}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the server
        self.cmd = cmd
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name}: not ready after {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


# ----------------------------------------------------------------------------- load generation


def parse_metrics(text: str) -> dict[str, Any]:
    widths = {m.group(1): float(m.group(2)) for m in
              re.finditer(re.escape(WIDTH_METRIC) + r'\{width="(\d+)"\} ([0-9.e+-]+)', text)}
    m = re.search(r"^quept:default_precision_bits ([0-9.e+-]+)", text, re.M)
    return {"widths": widths, "default_bits": float(m.group(1)) if m else None}


async def run_ramp(url: str, levels: list[int], phase_s: float, max_tokens: int) -> dict[str, Any]:
    """Closed loop: client i is active while i < the current level; returns requests and metric scrapes."""
    import httpx

    duration = phase_s * len(levels)
    records: list[dict[str, Any]] = []
    scrapes: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=max(levels) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
        t0 = time.perf_counter()

        def now() -> float:
            return time.perf_counter() - t0

        def level(t: float) -> int:
            return levels[min(len(levels) - 1, int(t // phase_s))]

        async def worker(i: int) -> None:
            k = 0
            while now() < duration:
                if i >= level(now()):
                    await asyncio.sleep(0.05)
                    continue
                body = {"prompt": PROMPTS[(i + k) % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0,
                        "ignore_eos": True, "stream": True}
                k += 1
                start, times, status, plan = now(), [], 0, None
                try:
                    async with client.stream("POST", url + "/v1/completions", json=body,
                                             headers={"X-Precision": "auto"}) as r:
                        status, plan = r.status_code, r.headers.get("x-precision")
                        async for line in r.aiter_lines():
                            if line.startswith("data: {") and '"text":"' in line and '"text":""' not in line:
                                times.append(now())
                except httpx.HTTPError as err:
                    status = f"error: {type(err).__name__}"
                records.append({"client": i, "start": start, "status": status, "plan": plan, "times": times})

        async def scraper() -> None:
            while now() < duration + 1:
                try:
                    r = await client.get(url + "/metrics")
                    scrapes.append({"t": now(), **parse_metrics(r.text)})
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.5)

        await asyncio.gather(scraper(), *(worker(i) for i in range(max(levels))))
    return {"duration_s": duration, "records": records, "scrapes": scrapes}


# ----------------------------------------------------------------------------- analysis


def p95(xs: list[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(math.ceil(0.95 * len(s))) - 1)]


def width_counts_at(scrapes: list[dict[str, Any]], t: float) -> dict[str, float]:
    """Counter values at time t (the last scrape at or before t)."""
    best: dict[str, float] = {}
    for s in scrapes:
        if s["t"] <= t:
            best = s["widths"]
    return best


def run_windows(run: dict[str, Any], levels: list[int], phase_s: float, window_s: float,
                slo_ms: float) -> list[dict[str, Any]]:
    """Per window of one ramp: clients, ITL samples and p95, SLO met, throughput, served and default bits."""
    recs = [r for r in run["records"] if r["status"] == 200]
    gaps = [(b, (b - a) * 1e3) for r in recs for a, b in zip(r["times"], r["times"][1:])]  # (time, ms)
    chunks = [t for r in recs for t in r["times"]]
    windows = []
    for w in range(int(run["duration_s"] // window_s)):
        lo, hi = w * window_s, (w + 1) * window_s
        itl = [g for t, g in gaps if lo <= t < hi]
        c0, c1 = width_counts_at(run["scrapes"], lo), width_counts_at(run["scrapes"], hi)
        delta = {b: c1.get(b, 0.0) - c0.get(b, 0.0) for b in c1}
        toks = sum(delta.values())
        defaults = [s["default_bits"] for s in run["scrapes"] if lo <= s["t"] < hi and s["default_bits"] is not None]
        p = p95(itl)
        windows.append({
            "t0": lo, "clients": levels[min(len(levels) - 1, int(((lo + hi) / 2) // phase_s))],
            "itl_samples": len(itl), "p95_itl_ms": None if p is None else round(p, 2),
            "meets_slo": None if len(itl) < 5 else bool(p <= slo_ms),  # type: ignore[operator]
            "throughput_tok_s": round(sum(lo <= t < hi for t in chunks) / window_s, 2),
            "served_bits": round(sum(int(b) * n for b, n in delta.items()) / toks, 3) if toks else None,
            "default_bits": round(sum(defaults) / len(defaults), 3) if defaults else None,
        })
    return windows


def _mean(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 3) if xs else None


def analyse(runs: list[dict[str, Any]], levels: list[int], phase_s: float, window_s: float, slo_ms: float,
            ppl: dict[int, float]) -> dict[str, Any]:
    """One configuration over its ramps (pooled): SLO attainment, throughput, served bits and perplexity."""
    per_run = [run_windows(r, levels, phase_s, window_s, slo_ms) for r in runs]
    judged = [w for ws in per_run for w in ws if w["meets_slo"] is not None]
    recs = [r for run in runs for r in run["records"] if r["status"] == 200]
    gaps = [(b - a) * 1e3 for r in recs for a, b in zip(r["times"], r["times"][1:])]
    per_width: dict[str, float] = {}
    for run in runs:
        if run["scrapes"]:
            first, last = run["scrapes"][0]["widths"], run["scrapes"][-1]["widths"]
            for b in last:
                per_width[b] = per_width.get(b, 0.0) + last[b] - first.get(b, 0.0)
    total = sum(per_width.values())
    served_bits = sum(int(b) * n for b, n in per_width.items()) / total if total else None
    nll = sum(n * math.log(ppl[int(b)]) for b, n in per_width.items() if n and int(b) in ppl)
    covered = sum(n for b, n in per_width.items() if int(b) in ppl)
    mean_windows = [{"t0": ws[0]["t0"], "clients": ws[0]["clients"],
                     **{k: _mean([w[k] for w in ws]) for k in ("p95_itl_ms", "throughput_tok_s", "served_bits",
                                                               "default_bits")}}
                    for ws in zip(*per_run)]
    return {
        "ramps": len(runs), "requests": len(recs),
        "failed_requests": sum(len(r["records"]) for r in runs) - len(recs),
        "slo_attainment_windows": round(sum(w["meets_slo"] for w in judged) / len(judged), 3) if judged else None,
        "itl_under_slo": round(sum(g <= slo_ms for g in gaps) / len(gaps), 3) if gaps else None,
        "p95_itl_ms": p95(gaps),
        "throughput_tok_s": round(sum(len(r["times"]) for r in recs) / sum(r["duration_s"] for r in runs), 2),
        "tokens_by_width": {b: round(n, 1) for b, n in sorted(per_width.items(), reverse=True) if n},
        "avg_served_bits": None if served_bits is None else round(served_bits, 3),
        "served_ppl": round(math.exp(nll / covered), 3) if covered else None,
        "served_ppl_vs_w8": round(math.exp(nll / covered) / ppl[8] - 1, 4) if covered and 8 in ppl else None,
        "windows": mean_windows,
        "windows_per_ramp": per_run,
    }


def choose_slo(run8: dict[str, Any], run4: dict[str, Any], levels: list[int], phase_s: float,
               window_s: float) -> tuple[float, str]:
    """The p95-ITL target at which the width matters most: max over candidates of (share of ramp windows
    fixed w4 meets) - (share fixed w8 meets), candidates being the window p95s both runs reached."""
    p8 = [w["p95_itl_ms"] for w in run_windows(run8, levels, phase_s, window_s, 1.0) if w["itl_samples"] >= 5]
    p4 = [w["p95_itl_ms"] for w in run_windows(run4, levels, phase_s, window_s, 1.0) if w["itl_samples"] >= 5]
    if not p8 or not p4:
        return float("nan"), "no ITL samples"
    cands = sorted(set(p8 + p4))
    gain = {c: sum(p <= c for p in p4) / len(p4) - sum(p <= c for p in p8) / len(p8) for c in cands}
    top = max(gain.values())
    best = [c for c in cands if gain[c] == top]
    slo = round(best[len(best) // 2], 1)
    return slo, (f"set from this run's fixed w8 and fixed w4 windows: the p95 ITL at which the share of ramp windows "
                 f"w4 meets exceeds the share w8 meets the most ({100 * top:.0f} points)")


def load_perplexities(checkpoint: Path, backend: str) -> tuple[dict[int, float], str]:
    """Per-width perplexity: quality_calibrated.json (calibrated checkpoints) or quality_rtn.json, else a quick eval."""
    meta = json.loads((checkpoint / "elastic.json").read_text())
    names = ["quality_calibrated.json", "quality_rtn.json"] if meta.get("calibration") else ["quality_rtn.json"]
    for name in names:
        path = RESULTS / name
        if path.is_file():
            rows = json.loads(path.read_text()).get("rows", [])
            ppl = {int(round(r["bits"])): float(r["ppl"]) for r in rows
                   if r.get("kind") in ("nested", "calibrated") and float(r["bits"]).is_integer()}
            if ppl:
                return ppl, f"benchmarks/results/{name}"
    from quept.data import eval_file
    from quept.eval.perplexity import perplexity, token_windows
    from quept.model.loader import load_model
    from quept.precision.plan import PrecisionPlan

    lm = load_model(checkpoint, backend=backend)
    windows = token_windows(lm.tokenizer, eval_file(), 2, 512)
    ppl = {b: perplexity(lm.model, windows, PrecisionPlan.uniform(b), progress=False)[0] for b in (8, 6, 5, 4)}
    return ppl, "quick evaluation: first 2 windows of 512 tokens of wikitext-2 test.txt"


def auto_slo(checkpoint: Path, backend: str, peak: int, tail: float) -> tuple[float, dict[str, Any]]:
    """tail x geometric mean of the w8 and w4 decode step at the peak batch (quick in-process profile)."""
    from quept.model.loader import load_model
    from quept.policies import CostModel
    from quept.precision.plan import PrecisionPlan

    lm = load_model(checkpoint, backend=backend)
    w8, w4 = PrecisionPlan.uniform(8), PrecisionPlan.uniform(4)
    cm = CostModel.profile(lm.model, [w8, w4], [1, peak], reps=3)
    t8, t4 = cm.base(w8, peak), cm.base(w4, peak)
    return round(tail * math.sqrt(t8 * t4) * 1e3, 1), {"backend": lm.backend.name, **cm.report()["profiled_ms"]}


# ----------------------------------------------------------------------------- plot


def plot(results: dict[str, Any], slo_ms: float, out_png: Path, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    colors = {"fixed w8": "tab:blue", "fixed w4": "tab:orange", "load": "tab:green"}
    for name, res in results.items():
        ws = res["windows"]
        t = [w["t0"] + 0.5 * (ws[1]["t0"] - ws[0]["t0"] if len(ws) > 1 else 0) for w in ws]
        c = colors.get(name)
        if name == next(iter(results)):
            axes[0].step(t, [w["clients"] for w in ws], where="mid", color="k")
        axes[1].plot(t, [w["served_bits"] for w in ws], marker=".", color=c, label=name)
        axes[2].plot(t, [w["p95_itl_ms"] for w in ws], marker=".", color=c, label=name)
        axes[3].plot(t, [w["throughput_tok_s"] for w in ws], marker=".", color=c, label=name)
    axes[2].axhline(slo_ms, color="r", ls="--", lw=1, label=f"SLO {slo_ms:g} ms")
    axes[0].set_ylabel("offered load\n(concurrent clients)")
    axes[1].set_ylabel("served bits\n(token-weighted)")
    axes[2].set_ylabel("p95 ITL (ms)")
    axes[3].set_ylabel("output tokens/s")
    axes[3].set_xlabel("seconds into the ramp")
    for ax in axes[1:]:
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    axes[0].grid(alpha=0.3)
    import textwrap

    fig.suptitle("quept: load policy vs fixed widths under a load ramp\n" + textwrap.fill(note, 110), fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="default: the default model, built once into ~/.cache/quept")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--levels", default="1,2,3,4,6,8,6,4,3,2,1", help="concurrent clients per phase")
    ap.add_argument("--phase-s", type=float, default=6.0)
    ap.add_argument("--window-s", type=float, default=4.0)
    ap.add_argument("--max-tokens", type=int, default=96, help="long enough that prefill steps stay under 5 %% of steps")
    ap.add_argument("--threads", type=int, default=1, help="server torch threads (OMP_NUM_THREADS; 0: torch's default)")
    ap.add_argument("--slo-itl-ms", type=float, default=0.0, help="0: derive from a quick profile (see --tail-factor)")
    ap.add_argument("--tail-factor", type=float, default=1.5)
    ap.add_argument("--dwell-s", type=float, default=2.0)
    ap.add_argument("--configs", default="fixed w8,fixed w4,load")
    ap.add_argument("--repeats", type=int, default=2, help="ramps per configuration (2: order A B C C B A)")
    ap.add_argument("--out", type=Path, default=RESULTS / "adaptive_load.json")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    peak = max(levels)
    t_start = time.perf_counter()
    if args.checkpoint is None:
        from quept.build.builder import ensure_default_checkpoint
        from quept.model.loader import default_cache_dir

        args.checkpoint = ensure_default_checkpoint(default_cache_dir())  # built once, as quept serve does
    names = [c.strip() for c in args.configs.split(",")]
    slo, slo_source = args.slo_itl_ms, "given"
    from_runs = slo <= 0 and {"fixed w8", "fixed w4"} <= set(names)
    if slo <= 0 and not from_runs:
        slo, prof = auto_slo(args.checkpoint, args.backend, peak, args.tail_factor)
        slo_source = f"{args.tail_factor} x sqrt(w8 x w4 decode step at batch {peak}), profiled: {prof}"
        print(f"SLO {slo:.1f} ms: {slo_source}")
    if from_runs:  # the fixed runs first: the SLO is then set between what they reached at peak load
        names = ["fixed w8", "fixed w4"] + [n for n in names if n not in ("fixed w8", "fixed w4")]
    ppl, ppl_source = load_perplexities(args.checkpoint, args.backend)
    common = ["--backend", args.backend, "--max-batch", str(peak), "--log-level", "info"]
    configs = {
        "fixed w8": ["--policy", "fixed", "--default-precision", "w8"],
        "fixed w4": ["--policy", "fixed", "--default-precision", "w4"],
        "load": ["--policy", "load", "--default-precision", "w8", "--load-dwell-s", str(args.dwell_s),
                 "--load-floor", "w4"],
    }
    order = names + names[::-1] if args.repeats == 2 else names * args.repeats  # mirrored: drift hits all alike
    runs: dict[str, list[dict[str, Any]]] = {}
    extras: dict[str, dict[str, float]] = {}
    controller: dict[str, Any] = {}
    for k, name in enumerate(order):
        if name == "load" and from_runs and "load" not in runs:
            slo, slo_source = choose_slo(runs["fixed w8"][0], runs["fixed w4"][0], levels, args.phase_s, args.window_s)
            print(f"SLO {slo:.1f} ms: {slo_source}", flush=True)
        flags = configs[name] + (["--slo-itl-ms", str(slo)] if name == "load" else [])
        log_path = Path("/tmp") / f"adaptive_load_{name.replace(' ', '_')}_{k}.log"
        srv = ServerProcess(name, args.checkpoint, common + flags, log_path, args.threads)
        try:
            t0 = time.perf_counter()
            srv.wait_ready(300)
            print(f"[{name}] ready in {time.perf_counter() - t0:.0f} s on {srv.url}; ramp {levels} x {args.phase_s} s",
                  flush=True)
            runs.setdefault(name, []).append(asyncio.run(run_ramp(srv.url, levels, args.phase_s, args.max_tokens)))
            import httpx

            prec = httpx.get(srv.url + "/v1/precisions", timeout=10).json()
            metrics = httpx.get(srv.url + "/metrics", timeout=10).text
            for m in re.finditer(r'quept:precision_switches_total\{policy="[^"]*",reason="([^"]+)"\} ([0-9.e+-]+)',
                                 metrics):
                extras.setdefault(name, {})[m.group(1)] = extras.get(name, {}).get(m.group(1), 0.0) + float(m.group(2))
        finally:
            srv.stop()
        if prec.get("controller"):
            controller.setdefault(name, []).append(prec["controller"])
    results: dict[str, Any] = {}
    for name in names:
        res = analyse(runs[name], levels, args.phase_s, args.window_s, slo, ppl)
        res["switches_by_reason"] = extras.get(name, {})
        results[name] = res
        print(f"[{name}] SLO met in {res['slo_attainment_windows']} of windows, {res['throughput_tok_s']} tok/s, "
              f"{res['avg_served_bits']} bits, served ppl {res['served_ppl']}", flush=True)
    cm = (controller.get("load") or [{}])[0].get("cost_model") or {}
    prof = cm.get("profiled_ms", {})
    gain = {int(b): round(1 - prof["w4"][b] / prof["w8"][b], 3) for b in prof.get("w8", {}) if b in prof.get("w4", {})}
    note = (f"shared 2-core CPU machine (noisy; other engineers' jobs ran alongside), backend {args.backend}, "
            f"{args.threads or 'default'} server thread(s), SLO p95 ITL {slo:g} ms, ramp {levels} x {args.phase_s:g} s")
    if gain:
        flat = sorted(b for b, g in gain.items() if g < 0.1)
        note += "; cost model: w4 step shorter than w8 by " + ", ".join(
            f"{100 * g:.0f}% at batch {b}" for b, g in sorted(gain.items()))
        if len(flat) == len(gain):
            note += " - this backend's speed does not depend on the width: no speed-up is claimed"
        elif flat:
            note += f" - at batch {', '.join(map(str, flat))} the widths cost the same, so no plan can help there"
    out = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "note": note,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average_end": os.getloadavg()},
        "checkpoint": str(args.checkpoint),
        "slo_itl_ms": slo, "slo_source": slo_source, "levels": levels, "phase_s": args.phase_s,
        "window_s": args.window_s, "max_tokens": args.max_tokens,
        "perplexity_per_width": ppl, "perplexity_source": ppl_source,
        "w4_step_saving_vs_w8_by_batch": gain,
        "order": order, "results": results, "load_controller": controller.get("load"),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    plot(results, slo, args.out.with_suffix(".png"), note)
    print(f"\n{'config':<10} {'SLO met (windows)':>18} {'ITL<=SLO':>9} {'p95 ITL ms':>11} {'tok/s':>7} {'bits':>6} "
          f"{'served ppl':>11}")
    for name, r in results.items():
        print(f"{name:<10} {r['slo_attainment_windows']!s:>18} {r['itl_under_slo']!s:>9} {r['p95_itl_ms'] or 0:>11.1f} "
              f"{r['throughput_tok_s']:>7.1f} {r['avg_served_bits']!s:>6} {r['served_ppl']!s:>11}")
    print(f"\nperplexities: {ppl_source}; {note}\nwrote {args.out} and {args.out.with_suffix('.png')} "
          f"in {out['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
