#!/usr/bin/env python3
"""Evaluate every query of the Grafana dashboard against a Prometheus that scrapes quept.

    python deploy/check_dashboard.py --prometheus http://127.0.0.1:9090 [--json out.json]

Grafana's variables are replaced ($__rate_interval by --rate-interval, $job and $instance by
'.*'). Prints, per panel, how many series each query returns and their current values; exits 1
when a panel returns no series at all (--allow-empty REGEX exempts panels by title, e.g. the
precision switches of a server whose policy never switched).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.parse
import urllib.request
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parent / "grafana" / "dashboards" / "quept.json"


def substitute(expr: str, rate_interval: str) -> str:
    return (expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval)
            .replace('"$job"', '".*"').replace('"$instance"', '".*"'))


def query(prometheus: str, expr: str) -> list[dict]:
    url = f"{prometheus.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=30) as r:
        body = json.loads(r.read())
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090")
    ap.add_argument("--dashboard", type=Path, default=DASHBOARD)
    ap.add_argument("--rate-interval", default="1m")
    ap.add_argument("--allow-empty", default="", help="regex of panel titles that may return nothing")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    dash = json.loads(args.dashboard.read_text())
    results, empty = [], []
    for panel in dash["panels"]:
        series_total = 0
        for target in panel.get("targets", []):
            expr = substitute(target["expr"], args.rate_interval)
            res = query(args.prometheus, expr)
            series_total += len(res)
            values = {json.dumps(r["metric"], sort_keys=True) if r["metric"] else "{}": r["value"][1] for r in res}
            results.append({"panel": panel["title"], "legend": target.get("legendFormat", ""), "expr": expr,
                            "series": len(res), "values": values})
            shown = ", ".join(f"{k}={float(v):.4g}" for k, v in list(values.items())[:6])
            print(f"{panel['title'][:34]:34} {target.get('legendFormat', '')[:22]:22} {len(res):3} series  {shown}")
        if series_total == 0 and not (args.allow_empty and re.search(args.allow_empty, panel["title"])):
            empty.append(panel["title"])
    if args.json:
        args.json.write_text(json.dumps({"prometheus": args.prometheus, "dashboard": str(args.dashboard),
                                         "results": results, "empty_panels": empty}, indent=1) + "\n")
    if empty:
        print(f"panels with no data: {empty}", file=sys.stderr)
        return 1
    print(f"all {len(dash['panels'])} panels return data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
