#!/usr/bin/env python3
"""Benchmark W1: duckharness against the reference scripts in ``<shared>/bench``.

Workload W1 (see ``<shared>/PERF_NOTES.md``): inside the metadata session window, 4 experiments
(baseline; liquid = volume > 1000; tight = liquid and spread < 0.02; clipped = predictions clipped
to [-0.5, 0.5]) x 3 pairs (pred_1s/target_1s, pred_10s/target_10s, pred_60s/target_60s) x 6
metrics (count, r2, mse, mae, corr, hit_rate), pooled over all days.

Every contender runs in a fresh subprocess, round-robin, ``--runs`` rounds (the starting contender
rotates each round, so machine noise and cache effects hit all of them alike):

- ``duckharness``: a small inline runner that creates the Harness, adds the experiments and times
  only ``h.metrics(...)``; it also reports the wall time including Harness creation.
- ``seed_style``, ``polars_best``, ``scan_floor``: the reference scripts, run unchanged from
  ``<shared>/bench`` under a tiny runpy wrapper that reports the process's peak RSS at exit. Their
  wall time is the ``wall_s,X`` line they print.

Then it prints the medians, the peak RSS, the ratios against the targets, and checks that
duckharness agrees with seed_style's values (all experiments x pairs x metrics: counts exactly,
floats to 1e-9 relative) and with polars_best's ``name (n, r2)`` lines.

Exit status: 0 when the results agree (whether or not the speed targets are met: this is a
measurement), 1 when they disagree, 2 when a contender fails to run.

usage: python benchmarks/w1.py [--data DIR] [--days 20] [--rows 1000000] [--runs 3] [--shared DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

EXPERIMENTS = [
    ("liquid", "volume > 1000"),
    ("tight", "SELECT * FROM liquid WHERE spread < 0.02"),
    (
        "clipped",
        "SELECT * REPLACE (greatest(least(pred_1s, 0.5), -0.5) AS pred_1s, "
        "greatest(least(pred_10s, 0.5), -0.5) AS pred_10s, "
        "greatest(least(pred_60s, 0.5), -0.5) AS pred_60s) FROM baseline",
    ),
]
EXPERIMENT_NAMES = ["baseline"] + [n for n, _ in EXPERIMENTS]
PAIRS = [("pred_1s", "target_1s"), ("pred_10s", "target_10s"), ("pred_60s", "target_60s")]
METRICS = ["count", "r2", "mse", "mae", "corr", "hit_rate"]
SEED_COLUMNS = {"n": "count", "r2": "r2", "mse": "mse", "mae": "mae", "corr": "corr", "hit_rate": "hit_rate"}
REL_TOL = 1e-9

REFERENCES = ["seed_style", "polars_best", "scan_floor"]
SCRIPTS = {"seed_style": "seed_style_polars.py", "polars_best": "polars_best.py", "scan_floor": "scan_floor.py"}
CONTENDERS = ["duckharness", *REFERENCES]

# Targets: issue 2 (faster than polars_best) and issue 6 (ratios of duckharness's metrics time).
TARGETS = [
    ("seed_style", 0.20, "issue 6"),
    ("polars_best", 1.00, "issue 2 (faster than polars_best)"),
    ("polars_best", 0.40, "issue 6"),
    ("scan_floor", 1.50, "issue 6"),
]

MARK = "__W1_RESULT__ "

# The duckharness contender: argv = [data_dir, experiments_json, pairs_json, metrics_json].
DH_RUNNER = r"""
import json, resource, sys, time
t_import = time.perf_counter()
from duckharness import Harness
t0 = time.perf_counter()
data, experiments, pairs, metrics = sys.argv[1], *map(json.loads, sys.argv[2:5])
h = Harness(data, cache=False)  # measure the scan, not the cache
for name, sql in experiments:
    h.add_experiment(name, sql)
t1 = time.perf_counter()
df = h.metrics(metrics, pairs=[f"{p}:{t}" for p, t in pairs])
t2 = time.perf_counter()
h.close()
out = {
    "wall_s": t2 - t1,
    "total_s": t2 - t0,
    "import_s": t0 - t_import,
    "timings": h.last_run.timings if h.last_run else {},
    "rows": df.select("experiment", "pred", "target", "metric", "value").rows(),
    "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "cpu_s": (lambda u: u.ru_utime + u.ru_stime)(resource.getrusage(resource.RUSAGE_SELF)),
    "module": __import__("duckharness").__file__,
}
print("__W1_RESULT__ " + json.dumps(out), flush=True)
"""

# A reference script run unchanged (as `python SCRIPT DATA` would), then its peak RSS.
REF_WRAPPER = r"""
import json, os, resource, runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
try:
    runpy.run_path(script, run_name="__main__")
finally:
    sys.stdout.flush()
    u = resource.getrusage(resource.RUSAGE_SELF)
    print("__W1_RESULT__ " + json.dumps({"maxrss_kib": u.ru_maxrss, "cpu_s": u.ru_utime + u.ru_stime}), flush=True)
"""


class ContenderFailed(RuntimeError):
    pass


def run_child(name: str, argv: list[str]) -> dict[str, Any]:
    """Run one contender; return its parsed result plus the process wall time seen from here."""
    load1 = os.getloadavg()[0]  # machine load just before: to judge the noise, not used in results
    t = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    proc_s = time.perf_counter() - t
    if proc.returncode != 0:
        raise ContenderFailed(f"{name} exited with status {proc.returncode}:\n{proc.stderr.strip()[-4000:]}")
    lines = proc.stdout.splitlines()
    result: dict[str, Any] | None = None
    wall_line: str | None = None
    body: list[str] = []
    for line in lines:
        if line.startswith(MARK):
            result = json.loads(line[len(MARK) :])
        elif line.startswith("wall_s,"):
            wall_line = line
        else:
            body.append(line)
    if result is None:
        raise ContenderFailed(f"{name} printed no result line; stdout:\n{proc.stdout[-4000:]}")
    if wall_line is not None:
        result["wall_s"] = float(wall_line.split(",", 1)[1])
    if "wall_s" not in result:
        raise ContenderFailed(f"{name} printed no 'wall_s,X' line; stdout:\n{proc.stdout[-4000:]}")
    result["proc_s"] = proc_s
    result["load1_before"] = load1
    result["stdout"] = body
    return result


def contender_argv(name: str, data: Path, bench: Path) -> list[str]:
    if name == "duckharness":
        return [
            sys.executable,
            "-c",
            DH_RUNNER,
            str(data),
            json.dumps(EXPERIMENTS),
            json.dumps(PAIRS),
            json.dumps(METRICS),
        ]
    return [sys.executable, "-c", REF_WRAPPER, str(bench / SCRIPTS[name]), str(data)]


# -- agreement --------------------------------------------------------------------------------
def rel_diff(a: float, b: float) -> float:
    if a == b:
        return 0.0
    if math.isnan(a) or math.isnan(b):
        return math.inf
    return abs(a - b) / max(abs(a), abs(b))


def dh_values(rows: list[list[Any]]) -> dict[tuple[str, str, str], float | None]:
    return {(e, p, m): v for e, p, _t, m, v in rows}


def parse_seed(lines: list[str]) -> dict[tuple[str, str, str], float]:
    """seed_style's CSV: ``experiment,pred,n,r2,mse,mae,corr,hit_rate`` rows."""
    out: dict[tuple[str, str, str], float] = {}
    header: list[str] | None = None
    for line in lines:
        cells = line.strip().split(",")
        if cells[:2] == ["experiment", "pred"]:
            header = cells
            continue
        if header is None or len(cells) != len(header):
            continue
        for col, val in zip(header[2:], cells[2:], strict=True):
            out[(cells[0], cells[1], SEED_COLUMNS.get(col, col))] = float(val)
    return out


def parse_best(lines: list[str]) -> dict[str, tuple[int, float]]:
    """polars_best's ``name (n, r2)`` lines (n and r2 of the first pair)."""
    out: dict[str, tuple[int, float]] = {}
    for line in lines:
        name, _, rest = line.strip().partition(" ")
        if name in EXPERIMENT_NAMES and rest.startswith("(") and rest.endswith(")"):
            n, r2 = rest[1:-1].split(",")
            out[name] = (int(n), float(r2))
    return out


def compare(
    dh: dict[tuple[str, str, str], float | None], ref: dict[tuple[str, str, str], float], what: str
) -> tuple[bool, float, list[str]]:
    """Counts exactly, floats to REL_TOL relative. Returns (ok, max relative diff, problems)."""
    problems: list[str] = []
    worst = 0.0
    for key, want in sorted(ref.items()):
        got = dh.get(key)
        if got is None:
            problems.append(f"{what}: {key} missing or null in duckharness (reference {want!r})")
            worst = math.inf
            continue
        if key[2] == "count":
            if got != want:
                problems.append(f"{what}: {key} count {got!r} != {want!r}")
                worst = math.inf
            continue
        d = rel_diff(float(got), want)
        worst = max(worst, d)
        if d > REL_TOL:
            problems.append(f"{what}: {key} {got!r} vs {want!r} (rel diff {d:.3g})")
    return not problems, worst, problems


def check_agreement(results: list[dict[str, dict[str, Any]]]) -> bool:
    print("\n== Agreement ==")
    ok_all = True
    first = dh_values(results[0]["duckharness"]["rows"])
    expected_keys = {(e, p, m) for e in EXPERIMENT_NAMES for p, _ in PAIRS for m in METRICS}
    missing = expected_keys - set(first)
    if missing:
        ok_all = False
        print(
            f"FAIL duckharness output lacks {len(missing)} of the {len(expected_keys)} expected values, "
            f"e.g. {sorted(missing)[:3]}"
        )
    for i, rnd in enumerate(results, 1):
        dh = dh_values(rnd["duckharness"]["rows"])
        seed = parse_seed(rnd["seed_style"]["stdout"])
        if len(seed) != len(expected_keys):
            ok_all = False
            print(f"FAIL run {i}: parsed {len(seed)} values from seed_style's CSV, expected {len(expected_keys)}")
        ok, worst, problems = compare(dh, seed, "seed_style")
        n_floats = sum(1 for k in seed if k[2] != "count")
        print(
            f"{'PASS' if ok else 'FAIL'} run {i}: duckharness vs seed_style, {len(seed)} values "
            f"({len(seed) - n_floats} counts exact, {n_floats} floats), max relative diff {worst:.3g} "
            f"(tolerance {REL_TOL:g})"
        )
        for p in problems[:20]:
            print("    " + p)
        best = parse_best(rnd["polars_best"]["stdout"])
        ref = {}
        for name, (n, r2) in best.items():
            ref[(name, PAIRS[0][0], "count")] = float(n)
            ref[(name, PAIRS[0][0], "r2")] = r2
        ok_b, worst_b, problems_b = compare(dh, ref, "polars_best")
        if len(best) != len(EXPERIMENT_NAMES):
            ok_b = False
            problems_b.append(f"parsed {len(best)} experiments from polars_best, expected {len(EXPERIMENT_NAMES)}")
        print(
            f"{'PASS' if ok_b else 'FAIL'} run {i}: duckharness vs polars_best (n, r2 of {PAIRS[0][0]}), "
            f"{len(ref)} values, max relative diff {worst_b:.3g}"
        )
        for p in problems_b[:20]:
            print("    " + p)
        ok_all = ok_all and ok and ok_b
        if i > 1:  # not a failure: just whether repeated runs gave the same bits
            same = dh == first
            print(f"info run {i}: duckharness values {'bit-identical to' if same else 'DIFFER from'} run 1")
    return ok_all


# -- reporting --------------------------------------------------------------------------------
def mib(kib: float) -> float:
    return kib / 1024.0


def print_round(i: int, order: list[str], rnd: dict[str, dict[str, Any]]) -> None:
    print(f"\n== Run {i} (order: {', '.join(order)}) ==")
    print(
        f"{'contender':<12} {'wall s':>8} {'incl. setup s':>14} {'process s':>10} {'process CPU s':>14} "
        f"{'peak RSS MiB':>13} {'load before':>12}"
    )
    for name in CONTENDERS:
        r = rnd[name]
        setup = f"{r['total_s']:.3f}" if "total_s" in r else "-"
        print(
            f"{name:<12} {r['wall_s']:>8.3f} {setup:>14} {r['proc_s']:>10.3f} {r['cpu_s']:>14.2f} "
            f"{mib(r['maxrss_kib']):>13.0f} {r['load1_before']:>12.2f}"
        )
    t = rnd["duckharness"].get("timings", {})
    if t:
        print("duckharness phases: " + ", ".join(f"{k} {v:.3f}s" for k, v in t.items()))


def summarize(results: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    def median(name: str, key: str) -> float:
        return statistics.median(r[name][key] for r in results)

    med = {n: median(n, "wall_s") for n in CONTENDERS}
    proc = {n: median(n, "proc_s") for n in CONTENDERS}
    cpu = {n: median(n, "cpu_s") for n in CONTENDERS}
    rss = {n: max(r[n]["maxrss_kib"] for r in results) for n in CONTENDERS}
    total = median("duckharness", "total_s")
    print(f"\n== Summary: medians of {len(results)} run(s) ==")
    print(
        f"{'contender':<12} {'wall s':>8} {'min s':>8} {'max s':>8} {'process s':>10} {'process CPU s':>14} "
        f"{'peak RSS MiB':>13}"
    )
    for n in CONTENDERS:
        walls = [r[n]["wall_s"] for r in results]
        print(
            f"{n:<12} {med[n]:>8.3f} {min(walls):>8.3f} {max(walls):>8.3f} {proc[n]:>10.3f} {cpu[n]:>14.2f} "
            f"{mib(rss[n]):>13.0f}"
        )
    print(f"duckharness including Harness creation: {total:.3f} s (median)")
    print(
        "\nwall = duckharness: h.metrics() only; references: the 'wall_s' they print. process = the whole "
        "subprocess incl. interpreter start and imports (CPU = user + sys). peak RSS = max over runs."
    )
    print("\nRatios (median duckharness metrics wall / median reference wall), against targets:")
    ratios: dict[str, float] = {}
    for ref in REFERENCES:
        ratios[ref] = med["duckharness"] / med[ref]
        ratios[ref + "_incl_setup"] = total / med[ref]
        # Paired within each round (the contenders of a round ran back to back): less sensitive to drift.
        ratios[ref + "_paired"] = statistics.median(r["duckharness"]["wall_s"] / r[ref]["wall_s"] for r in results)
    for ref, limit, issue in TARGETS:
        r = ratios[ref]
        print(
            f"  duckharness/{ref:<12} {r:6.3f}  target <= {limit:.2f} ({issue}): "
            f"{'met' if r <= limit else 'MISSED'}   [incl. Harness creation {ratios[ref + '_incl_setup']:.3f}; "
            f"median of per-run ratios {ratios[ref + '_paired']:.3f}]"
        )
    return {
        "median_wall_s": med,
        "median_process_s": proc,
        "median_process_cpu_s": cpu,
        "peak_rss_kib": rss,
        "duckharness_total_s": total,
        "ratios": ratios,
    }


def code_version() -> str:
    """The repository's commit, plus a digest of any uncommitted changes to the package (measured as they are)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        changes = git("status", "--porcelain", "--untracked-files=all", "--", "duckharness", "sql")
        changes += git("diff", "HEAD", "--", "duckharness", "sql")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    if not changes.strip():
        return head
    digest = hashlib.sha1(changes.encode()).hexdigest()[:8]
    return f"{head} + uncommitted changes in duckharness/ or sql/ (digest {digest})"


def ensure_data(data: Path, shared: Path, days: int, rows: int) -> None:
    if (data / "metadata.json").is_file():
        return
    gen = shared / "bench" / "gen_backtest.py"
    print(f"No metadata.json in {data}: generating {days} days x {rows} rows with {gen} ...", flush=True)
    subprocess.run([sys.executable, str(gen), str(data), "--days", str(days), "--rows", str(rows)], check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--data",
        type=Path,
        default=REPO / "bench-data" / "w1",
        help="dataset folder (default: <repo>/bench-data/w1; generated if it has no metadata.json)",
    )
    ap.add_argument("--days", type=int, default=20, help="days to generate when the data is missing (default 20)")
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows a day to generate (default 1000000)")
    ap.add_argument("--runs", type=int, default=3, help="rounds of every contender (default 3)")
    ap.add_argument(
        "--shared",
        type=Path,
        default=REPO.parent / "shared",
        help="folder holding bench/ with the reference scripts (default: <repo>/../shared)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write every measurement to this JSON file")
    a = ap.parse_args(argv)
    if a.runs < 1:
        ap.error("--runs must be at least 1")
    data, shared = a.data.resolve(), a.shared.resolve()
    bench = shared / "bench"
    for s in SCRIPTS.values():
        if not (bench / s).is_file():
            ap.error(f"reference script {bench / s} not found (set --shared)")
    ensure_data(data, shared, a.days, a.rows)
    n_files = len(list(data.glob("*.parquet")))
    print(f"W1 on {data} ({n_files} Parquet files), {a.runs} run(s), python {sys.executable}")
    version = code_version()
    print(f"repository {REPO} at {version}")

    results: list[dict[str, dict[str, Any]]] = []
    try:
        for i in range(a.runs):
            k = i % len(CONTENDERS)
            order = CONTENDERS[k:] + CONTENDERS[:k]
            rnd: dict[str, dict[str, Any]] = {}
            for name in order:
                rnd[name] = run_child(name, contender_argv(name, data, bench))
            results.append(rnd)
            if i == 0:
                print(f"duckharness imported from {rnd['duckharness'].get('module')}")
            print_round(i + 1, order, rnd)
    except ContenderFailed as e:
        print(f"\nERROR: {e}", file=sys.stderr)
        return 2

    if code_version() != version:
        print(
            f"\nWARNING: the repository changed during the runs (now {code_version()}); the runs may have "
            "measured different code."
        )
    summary = summarize(results)
    ok = check_agreement(results)
    print(f"\nAgreement: {'PASS' if ok else 'FAIL'}")
    if a.json is not None:
        slim = [
            {n: {k: v for k, v in r.items() if k not in ("rows", "stdout")} for n, r in rnd.items()} for rnd in results
        ]
        a.json.write_text(json.dumps({"data": str(data), "runs": slim, "summary": summary, "agreement": ok}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
