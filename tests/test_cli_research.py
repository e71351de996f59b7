"""The research commands of the CLI: ``info``, ``sample`` and ``sink``.

In process through ``duckharness.cli.main`` (with capsys) and in a real subprocess. Outputs are
checked against what is computed here from the Parquet files (pyarrow, US/Eastern local times).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import SESSION, write_dataset
from polars.testing import assert_frame_equal

from duckharness import Harness
from duckharness.cli import main
from duckharness.demo import one_day, trading_days

DAYS = trading_days(dt.date(2026, 3, 4), 4)  # 03-04, 03-05, 03-06, 03-09 (after the DST switch)
ROWS = 1500
EXPERIMENTS_SQL = """\
-- experiment: liquid
SELECT * FROM baseline WHERE volume > 1000;
-- experiment: tight
SELECT * FROM liquid WHERE spread < 0.02;
"""


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli_research") / "bt"
    rng = np.random.default_rng(21)
    write_dataset(out, {d.isoformat(): one_day(d, ROWS, rng, symbols=6) for d in DAYS},
                  {**SESSION, "model": "cli-test"}, row_group_size=500)
    (out.parent / "experiments.sql").write_text(EXPERIMENTS_SQL)
    return out


@pytest.fixture(scope="module")
def exps(src: Path) -> str:
    return str(src.parent / "experiments.sql")


@pytest.fixture(scope="module")
def raw(src: Path) -> pl.DataFrame:
    df = pl.concat([pl.from_arrow(pq.read_table(p)) for p in sorted(src.glob("*.parquet"))])  # type: ignore[misc]
    local = pl.col("ts").dt.convert_time_zone("US/Eastern")
    df = df.with_columns(local.dt.date().alias("_day"), local.dt.time().alias("_tod")).sort("ts")
    assert df["ts"].is_unique().all()
    return df


@pytest.fixture(scope="module")
def tight(raw: pl.DataFrame) -> pl.DataFrame:
    """The rows of experiment 'tight' under the 09:30-16:00 window, sorted by time."""
    return raw.filter((pl.col("_tod") >= dt.time(9, 30)) & (pl.col("_tod") <= dt.time(16, 0))
                      & (pl.col("volume") > 1000) & (pl.col("spread") < 0.02))


def assert_rows(got: pl.DataFrame, want: pl.DataFrame, *, sort: bool = False) -> None:
    want = want.drop("_day", "_tod")
    assert got.columns == want.columns
    assert_frame_equal(got.sort("ts") if sort else got, want)


def local_days(df: pl.DataFrame) -> set[dt.date]:
    return set(df["ts"].dt.convert_time_zone("US/Eastern").dt.date().to_list())


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "duckharness", *args], capture_output=True, text=True, timeout=120)


# --- info ------------------------------------------------------------------------------------------

def test_info_text_describes_files_rows_days_window_columns_and_experiments(
        src: Path, exps: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(src), "--experiments", exps]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in src.glob("*.parquet"))
    lines = out.splitlines()
    assert f"Source:   {src}" in lines
    assert any(re.fullmatch(rf"Files:    4 \(\d+\.\d\d GiB\), rows {rows:,}", line) for line in lines), out
    assert "Days:     4 (2026-03-04 to 2026-03-09)" in lines
    assert "Time:     ts; session window: 09:30:00–16:00:00 US/Eastern" in lines
    assert '  model: cli-test' in out
    expected_roles = {"ts": ("time", "TIMESTAMP WITH TIME ZONE"), "symbol": ("feature", "VARCHAR"),
                      "volume": ("feature", "BIGINT"), "spread": ("feature", "DOUBLE"),
                      "pred_10s": ("prediction", "DOUBLE"), "target_10s": ("target", "DOUBLE"),
                      "pred_60s": ("prediction", "DOUBLE"), "target_1s": ("target", "DOUBLE")}
    for col, (role, typ) in expected_roles.items():
        assert any(re.fullmatch(rf"\s+{col}\s+{role}\s+{typ}", line) for line in lines), (col, out)
    i = lines.index("Experiments:")
    assert lines[i + 1:i + 4] == ["  baseline",
                                  "  └── liquid  SQL: SELECT * FROM baseline WHERE volume > 1000;",
                                  "      └── tight  SQL: SELECT * FROM liquid WHERE spread < 0.02;"]


def test_info_json_is_machine_readable(src: Path, exps: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(src), "--experiments", exps, "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    files = sorted(src.glob("*.parquet"))
    assert info["files"] == len(files)
    assert info["bytes"] == sum(p.stat().st_size for p in files)
    assert info["rows"] == len(DAYS) * ROWS
    assert (info["days"], info["first_day"], info["last_day"]) == (4, "2026-03-04", "2026-03-09")
    assert info["time_column"] == "ts"
    assert info["experiments"] == ["baseline", "liquid", "tight"]
    assert info["metadata"]["model"] == "cli-test" and info["metadata"]["timezone"] == "US/Eastern"
    schema = pq.read_schema(files[0])
    assert list(info["columns"]) == schema.names
    for col, d in info["columns"].items():
        want = ("time" if col == "ts" else "target" if col.startswith("target_")
                else "prediction" if col.startswith("pred_") else "feature")
        assert d["role"] == want, col


def test_info_without_experiments_lists_only_baseline(src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(src), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["experiments"] == ["baseline"]


# --- sample ----------------------------------------------------------------------------------------

def test_sample_random_days_writes_whole_days_of_the_experiment(
        src: Path, exps: str, tight: pl.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.parquet"
    assert main(["sample", str(src), "--experiments", exps, "--experiment", "tight", "--strategy", "random_days",
                 "--days", "2", "--seed", "3", "-o", str(out)]) == 0
    got = pl.read_parquet(out)
    days = local_days(got)
    assert len(days) == 2
    assert_rows(got, tight.filter(pl.col("_day").is_in(sorted(days))), sort=True)
    text = capsys.readouterr().out
    assert text.strip() == (f"Wrote {got.height:,} rows x {got.width} columns of 'tight' (random_days) to {out}")
    assert os.listdir(tmp_path) == ["s.parquet"]  # no temporary file left
    # Same seed, same days; --n-days is --days under the API's name (n_days).
    out2 = tmp_path / "s2.parquet"
    assert main(["sample", str(src), "--experiments", exps, "--experiment", "tight", "--n-days", "2", "--seed", "3",
                 "-o", str(out2)]) == 0
    assert pl.read_parquet(out2).equals(got)


@pytest.mark.parametrize(("args", "reference"), [
    (["--strategy", "head", "--n", "500"], lambda df: df.head(500)),
    (["--strategy", "gather_every", "--step", "9"], lambda df: df.gather_every(9)),
])
def test_sample_head_and_gather_every_follow_time_order(
        src: Path, exps: str, tight: pl.DataFrame, tmp_path: Path, args: list[str], reference) -> None:
    out = tmp_path / "s.parquet"
    assert main(["sample", str(src), "--experiments", exps, "--experiment", "tight", *args, "-o", str(out)]) == 0
    assert_rows(pl.read_parquet(out), reference(tight))


def test_sample_no_window_includes_rows_outside_the_session(
        src: Path, raw: pl.DataFrame, tmp_path: Path) -> None:
    out = tmp_path / "s.parquet"
    assert main(["sample", str(src), "--no-window", "--strategy", "head", "--n", "20", "-o", str(out)]) == 0
    got = pl.read_parquet(out)
    assert_rows(got, raw.head(20))
    assert got["ts"].dt.convert_time_zone("US/Eastern").dt.time().max() < dt.time(9, 30)


# --- sink ------------------------------------------------------------------------------------------

def test_sink_partitioned_by_day_writes_day_files_and_reports(
        src: Path, exps: str, tight: pl.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["sink", str(src), "--experiments", exps, "--experiment", "tight", "-o", str(out),
                 "--partition-by", "day", "-q"]) == 0
    text, err = capsys.readouterr()
    assert err == ""
    assert re.fullmatch(rf"Wrote {tight.height:,} rows of 'tight' in 4 files to {re.escape(str(out))} "
                        r"\(\d+\.\d\d s\)\n", text), text
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{d}.parquet" for d in DAYS] + ["metadata.json"])
    for d in DAYS:
        assert_rows(pl.read_parquet(out / f"{d}.parquet"), tight.filter(pl.col("_day") == d))
    assert json.loads((out / "metadata.json").read_text())["duckharness_sink"]["experiment"] == "tight"


def test_sink_refuses_existing_output_unless_overwrite(
        src: Path, exps: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    base = ["sink", str(src), "--experiments", exps, "--experiment", "liquid", "-o", str(out)]
    assert main(base) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(base) == 1
    out_text, err = capsys.readouterr()
    assert out_text == ""
    assert err.startswith(f"Error: Output {out} already exists.") and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main([*base, "--overwrite"]) == 0
    assert "Wrote " in capsys.readouterr().out
    assert os.listdir(tmp_path) == ["out"]


def test_sink_with_window_option_keeps_only_rows_in_that_window(
        src: Path, raw: pl.DataFrame, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["sink", str(src), "--window", "10:00-11:00", "-o", str(out), "--experiment", "baseline"]) == 0
    want = raw.filter((pl.col("_tod") >= dt.time(10)) & (pl.col("_tod") <= dt.time(11)))
    got = pl.concat([pl.read_parquet(p) for p in sorted(out.glob("*.parquet"))])
    assert_rows(got, want, sort=True)
    meta = json.loads((out / "metadata.json").read_text())
    assert (meta["start_time"], meta["end_time"]) == ("10:00:00", "11:00:00")


# --- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (["sample", "{src}", "--experiments", "{exps}", "--experiment", "nope", "-o", "{out}"],
     "Error: Unknown experiment 'nope'"),
    (["sample", "{src}", "--experiments", "{missing}", "-o", "{out}"], "Error: Cannot read experiments file"),
    (["info", "{missing}"], "Error: "),
    (["sink", "{src}", "--experiments", "{exps}", "--experiment", "nope", "-o", "{out}"],
     "Error: Unknown experiment 'nope'"),
])
def test_errors_print_a_short_message_and_exit_1(
        src: Path, exps: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
        message: str) -> None:
    fill = {"src": str(src), "exps": exps, "out": str(tmp_path / "o.parquet"), "missing": str(tmp_path / "no.sql")}
    assert main([a.format(**fill) for a in args]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(message) and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []  # nothing written


# --- real subprocesses -----------------------------------------------------------------------------

def test_sink_in_a_subprocess_writes_a_folder_that_opens_as_a_harness(
        src: Path, exps: str, tight: pl.DataFrame, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli("sink", str(src), "--experiments", exps, "--experiment", "tight", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Wrote {tight.height:,} rows of 'tight' in ")
    assert "Traceback" not in proc.stderr
    with Harness(out) as h:
        assert h.metrics(["count"], pairs=["pred_10s:target_10s"])["value"][0] == tight.height


def test_refused_sample_in_a_subprocess_exits_1_without_traceback(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.parquet"
    proc = run_cli("sample", str(src), "--experiment", "ghost", "--seed", "1", "-o", str(out))
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error: Unknown experiment 'ghost'")
    assert "Traceback" not in proc.stderr
    assert not out.exists()
