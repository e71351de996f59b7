#!/usr/bin/env python3
"""Issue-6 measurements beyond W1's ratios: scale, memory, grouping cost, incremental re-runs.

Each measurement runs in a fresh subprocess (so peak RSS is that run's alone):

- scale: W1's question on the first 20 days and on all 60 days of a 60-day dataset; wall-time
  ratio (linear growth means ~3.0) and peak RSS of the whole process (goal < 1.5 GB);
- sink: ``tight`` of the 60-day dataset sunk to Parquet, partitioned by day; peak RSS (< 1.5 GB);
- grouping: W1 pooled vs ``by="day"`` vs ``by="symbol"`` (goal: each <= 1.3x pooled);
- incremental: full runs on 19 days into a cache, then the 20th day added to a copy of that cache
  (medians of --runs each; goal: <= 15% of the full run).
- incremental_ic: the same for the per-day rank IC of pred_10s (baseline and liquid), whose
  per-day scans are cached too (one run each: a full rank-IC run takes ~10 s).

usage: scale.py [--data60 DIR] [--w1 DIR] [--runs N] [--only scale,sink,grouping,incremental,incremental_ic]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNNER = r'''
import json, resource, sys, time
from duckharness import Harness
spec = json.loads(sys.argv[1])
h = Harness(spec["source"], cache=spec.get("cache", False), progress=False)
h.add_experiment("liquid", "volume > 1000")
h.add_experiment("tight", "SELECT * FROM liquid WHERE spread < 0.02")
h.add_experiment("clipped", "SELECT * REPLACE (greatest(least(pred_1s, 0.5), -0.5) AS pred_1s, "
                 "greatest(least(pred_10s, 0.5), -0.5) AS pred_10s, greatest(least(pred_60s, 0.5), -0.5) AS pred_60s) "
                 "FROM baseline")
t = time.perf_counter()
if spec["job"] == "sink":
    r = h.sink("tight", spec["out"], partition_by="day")
    rows = r.rows
elif spec["job"] == "rank_ic":
    rows = h.rank_ic(["pred_10s:target_10s"], ["baseline", "liquid"]).height
else:
    df = h.metrics(["count", "r2", "mse", "mae", "corr", "hit_rate"], by=spec.get("by"))
    rows = df.height
wall = time.perf_counter() - t
print(json.dumps({"wall": wall, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rows": rows, "hits": getattr(h.last_run, "cache_hits", 0)}))
'''


def run(spec: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(spec)], capture_output=True, text=True,
                         env={**os.environ, "DUCKHARNESS_CACHE": os.environ.get("DUCKHARNESS_CACHE", "")})
    if out.returncode != 0:
        raise SystemExit(f"run failed: {spec}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_of(spec: dict, runs: int) -> dict:
    results = [run(spec) for _ in range(runs)]
    return {"wall": statistics.median(r["wall"] for r in results),
            "rss_mb": max(r["rss_mb"] for r in results), "rows": results[0]["rows"]}


def ensure(folder: Path, days: int, shared: Path) -> None:
    if (folder / "metadata.json").exists():
        return
    gen = shared / "bench" / "gen_backtest.py"
    print(f"generating {days} days into {folder} ...", flush=True)
    subprocess.run([sys.executable, str(gen), str(folder), "--days", str(days), "--rows", "1000000"], check=True)


def subset(src: Path, n: int, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "metadata.json", dest / "metadata.json")
    for f in sorted(src.glob("*.parquet"))[:n]:
        link = dest / f.name
        if not link.exists():
            link.symlink_to(f)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data60", default=str(REPO / "bench-data" / "w60"))
    ap.add_argument("--w1", default=str(REPO / "bench-data" / "w1"))
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="scale,sink,grouping,incremental,incremental_ic",
                    help="comma-separated measurements to run (default: all)")
    a = ap.parse_args()
    data60, w1, shared = Path(a.data60).resolve(), Path(a.w1).resolve(), Path(a.shared).resolve()
    ensure(w1, 20, shared)
    ensure(data60, 60, shared)
    only = set(a.only.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="dh-scale-"))
    try:
        if "scale" in only:
            first20 = subset(data60, 20, tmp / "first20")
            s20 = median_of({"source": str(first20), "job": "metrics"}, a.runs)
            s60 = median_of({"source": str(data60), "job": "metrics"}, a.runs)
            print(f"scale: 20 days {s20['wall']:.2f} s, 60 days {s60['wall']:.2f} s, "
                  f"ratio {s60['wall'] / s20['wall']:.2f} (linear = 3.00); "
                  f"peak RSS 60 days {s60['rss_mb']:.0f} MB (goal < 1536)")
        if "sink" in only:
            sink = run({"source": str(data60), "job": "sink", "out": str(tmp / "sink")})
            print(f"sink tight of 60 days by day: {sink['wall']:.2f} s, {sink['rows']:,} rows, "
                  f"peak RSS {sink['rss_mb']:.0f} MB (goal < 1536)")
        if "grouping" in only:
            pooled = median_of({"source": str(w1), "job": "metrics"}, a.runs)
            for by in ("day", "symbol"):
                g = median_of({"source": str(w1), "job": "metrics", "by": by}, a.runs)
                print(f"by={by}: {g['wall']:.2f} s vs pooled {pooled['wall']:.2f} s: "
                      f"{g['wall'] / pooled['wall']:.2f}x (goal <= 1.30)")
        if "incremental" in only:
            # Full runs on 19 days, each into a fresh cache; then the 20th day added, each time to
            # a copy of the first 19-day cache (medians of --runs of each).
            nineteen = subset(w1, 19, tmp / "inc")
            fulls = [run({"source": str(nineteen), "job": "metrics", "cache": str(tmp / f"cache{k}")})
                     for k in range(a.runs)]
            last = sorted(w1.glob("*.parquet"))[19]
            (nineteen / last.name).symlink_to(last)
            incs = []
            for k in range(a.runs):
                trial = tmp / f"trial{k}"
                shutil.copytree(tmp / "cache0", trial)
                incs.append(run({"source": str(nineteen), "job": "metrics", "cache": str(trial)}))
            full = statistics.median(r["wall"] for r in fulls)
            inc = statistics.median(r["wall"] for r in incs)
            walls = ", ".join(f"{r['wall']:.3f}" for r in incs)
            print(f"incremental: full 19 days {full:.2f} s; +1 day {inc:.3f} s "
                  f"({incs[0]['hits']} batches from the cache; runs {walls}): "
                  f"{inc / full:.1%} of the full run (goal <= 15%)")
        if "incremental_ic" in only:
            days = subset(w1, 19, tmp / "inc_ic")
            full_ic = run({"source": str(days), "job": "rank_ic", "cache": str(tmp / "ic_cache")})
            (days / sorted(w1.glob("*.parquet"))[19].name).symlink_to(sorted(w1.glob("*.parquet"))[19])
            inc_ic = run({"source": str(days), "job": "rank_ic", "cache": str(tmp / "ic_cache")})
            print(f"incremental rank IC: full 19 days {full_ic['wall']:.2f} s; +1 day {inc_ic['wall']:.3f} s: "
                  f"{inc_ic['wall'] / full_ic['wall']:.1%} of the full run")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
