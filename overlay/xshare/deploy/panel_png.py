"""Draw one dashboard panel from real scraped data, without Grafana (``python -m xshare.deploy.panel_png``).

Either query a running Prometheus (``--prometheus URL``), or let this command run one: ``--targets HOST:PORT,...``
starts the Debian ``prometheus`` binary on loopback with a 1 s scrape of those ``/metrics`` endpoints for
``--duration`` seconds (drive traffic meanwhile, or let ``--load N`` send SGLang ``/generate`` requests from N
clients), then evaluates the panel's PromQL over that window with
``query_range`` and plots every series (legend from the panel's ``legendFormat``) to a PNG::

    python -m xshare.deploy.panel_png --targets 127.0.0.1:30000 --duration 120 \\
        --panel "Peak per-GPU activated experts" --out peak.png

Grafana's placeholders are replaced: ``$__rate_interval`` by ``--rate-interval``, other ``$__*`` by their
defaults, and variables by ``--var NAME=VALUE`` (default ``.*``, matching everything).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

_VAR = re.compile(r"\$\{([A-Za-z0-9_]+)(?::[^}]*)?\}|\$([A-Za-z0-9_]+)|\[\[([A-Za-z0-9_]+)\]\]")
_LEGEND = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def find_panel(dashboard: dict[str, Any], title: str) -> dict[str, Any]:
    panels = []
    stack = list(dashboard.get("panels") or [])
    while stack:
        p = stack.pop(0)
        panels.append(p)
        stack[:0] = p.get("panels") or []
    for p in panels:
        if p.get("title") == title:
            return p
    titles = ", ".join(repr(p.get("title")) for p in panels if p.get("type") != "row")
    raise KeyError(f"no panel titled {title!r}; panels: {titles}")


def substitute(expr: str, variables: dict[str, str], rate_interval: str) -> str:
    fixed = {"__rate_interval": rate_interval, "__interval": "15s", "__range": "1h"}

    def rep(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return fixed.get(name, variables.get(name, ".*"))

    return _VAR.sub(rep, expr)


def legend(fmt: str, labels: dict[str, str], expr: str) -> str:
    if not fmt:
        return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or expr
    return _LEGEND.sub(lambda m: labels.get(m.group(1), ""), fmt)


def query_range(prom: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    q = urllib.parse.urlencode({"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"})
    try:
        with urllib.request.urlopen(f"{prom.rstrip('/')}/api/v1/query_range?{q}", timeout=30) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:  # 400/422: Prometheus says why in the body
        raise RuntimeError(f"Prometheus rejected {expr!r}: {e.read().decode(errors='replace')}") from None
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus rejected {expr!r}: {body}")
    return body["data"]["result"]


def panel_series(prom: str, panel: dict[str, Any], variables: dict[str, str], rate_interval: str, start: float,
                 end: float, step: float) -> list[tuple[str, list[float], list[float]]]:
    """(legend, times, values) of every series of every target of the panel."""
    out = []
    for t in panel.get("targets") or []:
        expr = substitute(t["expr"], variables, rate_interval)
        for s in query_range(prom, expr, start, end, step):
            ts = [float(x) for x, _ in s["values"]]
            vs = [float(v) for _, v in s["values"]]
            out.append((legend(t.get("legendFormat", ""), s["metric"], expr), ts, vs))
    return out


def plot(series: list[tuple[str, list[float], list[float]]], title: str, unit: str, out: Path,
         note: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=110)
    t0 = min((ts[0] for _, ts, _ in series if ts), default=0.0)
    for name, ts, vs in series:
        ax.plot([t - t0 for t in ts], vs, label=name, linewidth=1.6)
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=11)
    ax.set_xlabel("seconds")
    ax.set_ylabel("" if unit in ("short", "none") else unit)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)


_PROMPTS = ("def hello(name):", "import os\n", "class Foo:\n    def", "for i in range(10):", "# compute the sum of",
            "with open(path) as f:", "try:\n    x =", "def fib(n):")


def drive_load(url: str, seconds: float, concurrency: int, seed: int = 0) -> int:
    """Send SGLang ``/generate`` requests from ``concurrency`` clients for ``seconds``; returns the number done."""
    import random
    import threading

    end = time.time() + seconds
    done = [0] * concurrency

    def client(i: int) -> None:
        rnd = random.Random(seed + i)
        while time.time() < end:
            body = json.dumps({"text": rnd.choice(_PROMPTS),
                               "sampling_params": {"max_new_tokens": rnd.randint(16, 48), "temperature": 0.8}})
            req = urllib.request.Request(url.rstrip("/") + "/generate", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    r.read()
                done[i] += 1
            except OSError:
                time.sleep(1)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done)


class LocalPrometheus:
    """The Debian ``prometheus`` binary on loopback, scraping ``targets`` every second (a context manager)."""

    def __init__(self, targets: list[str], binary: str | None = None, raw_job: bool = False) -> None:
        """Job ``xshare`` scrapes ``targets`` with :data:`xshare.deploy.promql.COLON_RESTORE_RELABEL`;
        ``raw_job`` adds job ``raw`` scraping them without it."""
        self.binary = binary or shutil.which("prometheus")
        if not self.binary:
            raise FileNotFoundError("prometheus not found (Debian package 'prometheus'; scripts/ci_system_deps.sh)")
        self.targets = targets
        self.raw_job = raw_job
        self.dir = Path(tempfile.mkdtemp(prefix="xshare-prom-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LocalPrometheus:
        import yaml

        from xshare.deploy.promql import COLON_RESTORE_RELABEL

        jobs = [{"job_name": "xshare", "static_configs": [{"targets": self.targets}],
                 "metric_relabel_configs": [COLON_RESTORE_RELABEL]}]
        if self.raw_job:
            jobs.append({"job_name": "raw", "static_configs": [{"targets": self.targets}]})
        cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": jobs}
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "prometheus.log", "wb"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(self.dir / 'prometheus.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("prometheus did not get ready in 60 s")

    def targets_up(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(self.url + "/api/v1/targets", timeout=10) as r:
            return json.loads(r.read())["data"]["activeTargets"]

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xshare.deploy.panel_png", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--dashboard", type=Path, default=Path(__file__).resolve().parents[3] / "dashboards" /
                   "xshare-sglang.json")
    p.add_argument("--panel", required=True, help="panel title")
    p.add_argument("--out", type=Path, required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prometheus", help="URL of a running Prometheus")
    src.add_argument("--targets", help="HOST:PORT[,HOST:PORT...] to scrape with a local prometheus")
    p.add_argument("--duration", type=float, default=60.0, help="seconds to scrape (--targets) or to look back")
    p.add_argument("--step", type=float, default=2.0)
    p.add_argument("--rate-interval", default="10s")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--note", default="", help="a second title line (what was scraped)")
    p.add_argument("--load", type=int, default=0, metavar="CLIENTS",
                   help="with --targets: send SGLang /generate requests to the first target from this many clients")
    args = p.parse_args(argv)
    try:
        dash = json.loads(args.dashboard.read_text())
        panel = find_panel(dash, args.panel)
    except (OSError, json.JSONDecodeError, KeyError) as e:
        print(f"panel_png: {e}", file=sys.stderr)
        return 2
    variables = {}
    for item in args.var:
        k, sep, v = item.partition("=")
        if not sep:
            print(f"panel_png: --var expects NAME=VALUE, got {item!r}", file=sys.stderr)
            return 2
        variables[k] = v
    unit = ((panel.get("fieldConfig") or {}).get("defaults") or {}).get("unit", "")
    if args.prometheus:
        end = time.time()
        series = panel_series(args.prometheus, panel, variables, args.rate_interval, end - args.duration, end,
                              args.step)
    else:
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        with LocalPrometheus(targets) as prom:
            start = time.time()
            if args.load > 0:
                n = drive_load(f"http://{targets[0]}", args.duration, args.load)
                print(f"panel_png: {n} requests sent to {targets[0]}", file=sys.stderr)
            else:
                time.sleep(args.duration)
            series = panel_series(prom.url, panel, variables, args.rate_interval, start, time.time(), args.step)
    if not series:
        print(f"panel_png: the panel's queries returned no data over {args.duration} s", file=sys.stderr)
        return 1
    plot(series, args.panel, unit, args.out, args.note)
    print(f"{args.out}: {len(series)} series")
    return 0


if __name__ == "__main__":
    sys.exit(main())
