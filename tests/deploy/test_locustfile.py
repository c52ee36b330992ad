"""benchmarks/locustfile.py runs headless against a stub SSE server and writes its CSV files and
summary; plot_locust.py turns them into a PNG. Locust runs in subprocesses (it monkey-patches
the interpreter with gevent)."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.deploy.conftest import REPO

# find_spec, not importorskip: importing locust here would monkey-patch this interpreter with gevent
# and break every later test that runs asyncio in a thread (the live servers)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="needs locust (test extra)")
LOCUSTFILE = REPO / "benchmarks" / "locustfile.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def stub() -> str:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "sse_stub.py"), str(port)])
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def _locust(host: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
           "--only-summary", "--loglevel", "WARNING", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_precision_mix_parsing() -> None:
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import locustfile as L\n"
        "m = L.parse_precision_mix('w8:0.5,w4:0.3,auto:0.2')\n"
        "assert [s for s, _ in m] == ['w8', 'w4', 'auto'] and abs(sum(w for _, w in m) - 1) < 1e-9\n"
        "assert L.parse_precision_mix('mixed:3.5:1,auto;min=w4;max=w8:1') == "
        "[('mixed:3.5', 0.5), ('auto;min=w4;max=w8', 0.5)]\n"
        "for bad in ['', 'w8', 'w8:0', 'w8:x', ':1']:\n"
        "    try:\n        L.parse_precision_mix(bad)\n    except ValueError:\n        pass\n"
        "    else:\n        raise AssertionError(bad)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_precision_schedule_interleaves_by_weight() -> None:
    code = (
        "import sys, collections; sys.path.insert(0, 'benchmarks'); import locustfile as L\n"
        "s = L.PrecisionSchedule(L.parse_precision_mix('w8:0.3,w4:0.2,w2:0.5'))\n"
        "first = [s.next() for _ in range(10)]\n"
        "assert collections.Counter(first) == {'w2': 5, 'w8': 3, 'w4': 2}, first\n"
        "assert set(first[:4]) == {'w8', 'w4', 'w2'}, first\n"
        "assert collections.Counter(s.next() for _ in range(1000)) == {'w2': 500, 'w8': 300, 'w4': 200}\n"
        "t = L.PrecisionSchedule(L.parse_precision_mix('w8:0.3,w4:0.2,w2:0.5'))\n"
        "assert [t.next() for _ in range(10)] == first, 'the schedule is deterministic'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_headless_run_writes_csv_summary_and_plot(stub: str, tmp_path: Path) -> None:
    prefix = tmp_path / "locust"
    r = _locust(stub, "-u", "4", "-r", "4", "-t", "4s", "--precision-mix", "w8:0.3,w4:0.2,w2:0.5",
                "--max-tokens", "6", "--csv", str(prefix), "--csv-full-history")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads(Path(f"{prefix}_summary.json").read_text())
    assert summary["completed"] > 5 and summary["failed_other"] == 0
    assert summary["failed_429"] >= 1, "the stub rejects every 2nd w2 request"
    assert set(summary["by_precision"]) == {"w8", "w4", "w2"}
    assert set(summary["by_endpoint"]) == {"/v1/chat/completions", "/v1/completions"}
    assert summary["ttft_ms"]["p50"] > 0 and summary["tpot_ms"]["p50"] > 0
    assert summary["output_tokens"] == 6 * summary["completed"]
    stats = Path(f"{prefix}_stats.csv").read_text()
    for entry in ("SSE,/v1/completions", "SSE,/v1/chat/completions", "TTFT,w8", "TPOT,w4"):
        assert entry in stats, entry
    rows = Path(f"{prefix}_requests.csv").read_text().splitlines()
    assert len(rows) == summary["requests"] + 1
    png = tmp_path / "locust.png"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "plot_locust.py"), str(prefix), "-o", str(png)],
                   check=True, cwd=REPO, timeout=120, capture_output=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_other_failures_give_exit_code_1(tmp_path: Path) -> None:
    port = _free_port()  # nothing listens there: connection refused
    host = f"http://127.0.0.1:{port}"
    r = _locust(host, "-u", "1", "-r", "1", "-t", "2s", "--model", "m", "--summary-prefix", str(tmp_path / "x"))
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert json.loads((tmp_path / "x_summary.json").read_text())["failed_other"] >= 1


def test_refuses_non_loopback_host(tmp_path: Path) -> None:
    r = _locust("http://example.invalid:8000", "-u", "1", "-r", "1", "-t", "2s", "--model", "m",
                "--summary-prefix", str(tmp_path / "x"))
    assert r.returncode != 0
    assert "refusing non-loopback host" in r.stdout + r.stderr
    assert not (tmp_path / "x_summary.json").exists()
