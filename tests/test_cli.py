"""The command line, in a real subprocess and in-process through ``duckharness.cli.main``."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from conftest import read_all, write_dataset

from duckharness import Harness
from duckharness.cli import build_parser, main
from duckharness.demo import write_demo_dataset

PAIR = "pred_10s:target_10s"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "duckharness", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def rows_of(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "demo"
    write_demo_dataset(folder, days=3, rows=600)
    return folder


@pytest.fixture(scope="module")
def api_r2(demo: Path) -> dict[str, float]:
    with Harness(demo) as h:
        h.load_experiments(demo / "experiments.sql")
        df = h.metrics(["r2"], pairs=[PAIR])
    df = df.filter(pl.col("metric") == "r2")
    return dict(zip(df["experiment"].to_list(), df["value"].to_list(), strict=True))


# -- demo ----------------------------------------------------------------------------------------------

def test_demo_subprocess_writes_files_and_prints_a_table(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = run_cli("demo", str(out), "--days", "2", "--rows", "400")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["2026-03-04.parquet", "2026-03-05.parquet",
                                                     "experiments.sql", "metadata.json"]
    assert json.loads((out / "metadata.json").read_text())["timezone"] == "US/Eastern"
    text = proc.stdout
    assert f"Wrote 2 daily Parquet files, metadata.json and experiments.sql to {out}" in text
    header = next(line for line in text.splitlines() if line.startswith("experiment"))
    for col in ("pred", "target", "count", "r2", "rmse", "mae", "bias", "corr", "hit_rate"):
        assert col in header.split()
    for name in ("baseline", "liquid", "tight", "clipped"):
        assert any(line.startswith(name + " ") for line in text.splitlines())
    assert "Traceback" not in proc.stderr


def test_demo_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d"
    assert main(["demo", str(out), "--days", "1", "--rows", "300"]) == 0
    captured = capsys.readouterr()
    assert len(list(out.glob("*.parquet"))) == 1
    assert "Session window: 09:30:00–16:00:00 US/Eastern" in captured.out
    assert "experiments: baseline, liquid, tight, clipped" in captured.out
    lines = captured.out.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("experiment"))
    assert set(lines[i + 1].replace(" ", "")) == {"-"}  # the rule under the header
    assert captured.err == ""


def test_demo_into_a_folder_with_data_refuses_and_keeps_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every other command's first argument is a source: ``demo DATA`` by mistake must not
    delete DATA, even when DATA is itself an earlier demo."""
    out = tmp_path / "d"
    assert main(["demo", str(out), "--days", "3", "--rows", "300"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["demo", str(out), "--days", "1", "--rows", "300"]) == 1
    assert capsys.readouterr().err == (
        f"Error: Folder {out} is not empty; choose a new folder, or pass --overwrite (overwrite=True) to replace "
        "an earlier demo dataset there.\n"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "2026-01-02.parquet").write_bytes(b"not a demo")
    assert main(["demo", str(other), "--overwrite"]) == 1
    assert "already holds Parquet files that are not a demo dataset" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["2026-01-02.parquet"]
    (out / "mine.parquet").write_bytes(b"a user's file added to the demo folder")
    assert main(["demo", str(out), "--overwrite"]) == 1
    assert "holds Parquet files a demo does not write (mine.parquet)" in capsys.readouterr().err
    assert (out / "mine.parquet").exists()
    (out / "mine.parquet").unlink()
    assert main(["demo", str(out), "--days", "1", "--rows", "300", "--overwrite"]) == 0  # an earlier demo: replaced
    assert len(list(out.glob("*.parquet"))) == 1
    capsys.readouterr()
    assert main(["demo", str(out / "2026-03-04.parquet")]) == 1
    day_file = out / "2026-03-04.parquet"
    assert capsys.readouterr().err == f"Error: {day_file} is a file; give a folder for the demo dataset.\n"


def test_demo_into_a_missing_folder_names_it_and_writes_nothing(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Before, an OSError naming the demo's hidden staging folder reached the user."""
    assert main(["demo", str(tmp_path / "nodir" / "x"), "--days", "1", "--rows", "100"]) == 1
    assert capsys.readouterr().err == (
        f"Error: Cannot write {tmp_path / 'nodir' / 'x'}: folder {tmp_path / 'nodir'} does not exist. "
        "Create it first or choose another path.\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_closed_output_pipe_ends_quietly_like_other_unix_tools(demo: Path) -> None:
    """``duckharness info DATA | head -1`` printed ``Error: BrokenPipeError`` and exited 1."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        proc = subprocess.run([sys.executable, "-m", "duckharness", "info", str(demo)], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (141, "")  # 128 + SIGPIPE, as `yes | head` gives


# -- metrics -----------------------------------------------------------------------------------------

def test_metrics_csv_subprocess_matches_python_api(demo: Path, api_r2: dict[str, float]) -> None:
    proc = run_cli("metrics", str(demo), "--experiments", str(demo / "experiments.sql"), "--metric", "r2",
                   "--pair", PAIR, "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "experiment,pred,target,metric,value"
    rows = [r for r in rows_of(proc.stdout) if r["metric"] == "r2"]
    assert [r["experiment"] for r in rows] == ["baseline", "liquid", "tight", "clipped"]
    for r in rows:
        assert (r["pred"], r["target"]) == ("pred_10s", "target_10s")
        assert float(r["value"]) == pytest.approx(api_r2[r["experiment"]], rel=1e-12)


def test_metrics_csv_in_process_matches_python_api(demo: Path, api_r2: dict[str, float],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["metrics", str(demo), "--experiments", str(demo / "experiments.sql"), "--metric", "r2",
                 "--pair", PAIR, "--format", "csv"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[0] == "experiment,pred,target,metric,value"
    got = {r["experiment"]: float(r["value"]) for r in rows_of(out) if r["metric"] == "r2"}
    assert got == pytest.approx(api_r2, rel=1e-12)


def test_time_of_day_buckets_read_alike_in_csv_json_and_table(demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # CSV wrote them as 09:30:00.000000000 where the table and JSON say 09:30:00.
    args = ["metrics", str(demo), "--metric", "count", "--pair", PAIR, "--by", "tod:30min", "-q"]
    outputs = {}
    for fmt in ("csv", "json", "table"):
        assert main([*args, "--format", fmt]) == 0
        outputs[fmt] = capsys.readouterr().out
    csv_tods = sorted({r["tod"] for r in rows_of(outputs["csv"])})
    json_tods = sorted({r["tod"] for r in json.loads(outputs["json"])})
    assert csv_tods == json_tods and csv_tods[0] == "09:30:00" and len(csv_tods) == 13  # 09:30 ... 15:30
    assert all(t in outputs["table"] for t in csv_tods)


def test_cache_options_choose_the_cache_folder(demo: Path, tmp_path: Path, api_r2: dict[str, float],
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUCKHARNESS_CACHE", str(tmp_path / "env-cache"))
    args = ["metrics", str(demo), "--metric", "r2", "--pair", PAIR, "--format", "csv"]
    assert main([*args, "--cache", str(tmp_path / "mine")]) == 0
    first = capsys.readouterr().out
    assert len(list((tmp_path / "mine").glob("*/*.parquet"))) == 3  # one entry per day
    assert main([*args, "--cache", str(tmp_path / "mine"), "--trace"]) == 0
    captured = capsys.readouterr()
    assert captured.out == first and captured.err.count("-- from the cache") == 3
    assert main([*args, "--no-cache"]) == 0
    assert capsys.readouterr().out == first
    assert not (tmp_path / "env-cache").exists()  # neither run used the default folder
    got = {r["experiment"]: float(r["value"]) for r in rows_of(first) if r["metric"] == "r2"}
    assert got["baseline"] == pytest.approx(api_r2["baseline"], rel=1e-12)
    with pytest.raises(SystemExit):
        main([*args, "--cache", str(tmp_path / "x"), "--no-cache"])


def test_metrics_by_day_csv_has_a_day_column(demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["metrics", str(demo), "--metric", "count", "--pair", PAIR, "--by", "day", "--format", "csv"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[0] == "experiment,pred,target,day,metric,value"
    counts = {r["day"]: float(r["value"]) for r in rows_of(out) if r["metric"] == "count"}
    assert sorted(counts) == ["2026-03-04", "2026-03-05", "2026-03-06"]
    with Harness(demo) as h:
        total = h.metrics(["count"], pairs=[PAIR])
    assert sum(counts.values()) == total.filter(pl.col("metric") == "count")["value"][0]


def test_by_day_output_has_an_n_excluded_row_per_day(demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Pooled output has an n_excluded row per (experiment, pair); grouped output should too.
    assert main(["metrics", str(demo), "--metric", "count", "--pair", PAIR, "--by", "day", "--format", "csv"]) == 0
    rows = rows_of(capsys.readouterr().out)
    days = {r["day"] for r in rows}
    assert {r["day"] for r in rows if r["metric"] == "n_excluded"} == days
    assert all(float(r["value"]) == 0 for r in rows if r["metric"] == "n_excluded")


def test_metrics_json_parses(demo: Path, api_r2: dict[str, float], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["metrics", str(demo), "--experiments", str(demo / "experiments.sql"), "--metric", "r2",
                 "--pair", PAIR, "--format", "json"])
    assert code == 0
    records = json.loads(capsys.readouterr().out)
    assert isinstance(records, list)
    r2 = {r["experiment"]: r["value"] for r in records if r["metric"] == "r2"}
    assert r2 == pytest.approx(api_r2, rel=1e-12)
    assert set(records[0]) == {"experiment", "pred", "target", "metric", "value"}


def test_metrics_table_format_is_the_default(demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["metrics", str(demo), "--metric", "count", "--metric", "mae", "--pair", PAIR]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["experiment", "pred", "target", "count", "mae", "n_excluded"]
    assert lines[2].split()[:3] == ["baseline", "pred_10s", "target_10s"]


def test_experiment_option_limits_the_experiments(demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["metrics", str(demo), "--experiments", str(demo / "experiments.sql"), "--experiment", "tight",
                 "--metric", "count", "--pair", PAIR, "--format", "csv"]) == 0
    assert {r["experiment"] for r in rows_of(capsys.readouterr().out)} == {"tight"}


def test_window_options_change_the_rows_counted(demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def count(*extra: str) -> float:
        assert main(["metrics", str(demo), "--metric", "count", "--pair", PAIR, "--format", "csv", *extra]) == 0
        return next(float(r["value"]) for r in rows_of(capsys.readouterr().out) if r["metric"] == "count")
    session, everything, morning = count(), count("--no-window"), count("--window", "09:30-12:00")
    assert everything == 3 * 600
    assert morning < session < everything


def test_user_metric_dir_option(demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "n_rows.sql").write_text("-- stats\nSELECT count(*) AS n FROM input;\n"
                                         "-- final\nSELECT n AS value FROM merged;\n")
    assert main(["metrics", str(demo), "--metric-dir", str(tmp_path), "--metric", "n_rows", "--metric", "count",
                 "--pair", PAIR, "--format", "csv"]) == 0
    rows = rows_of(capsys.readouterr().out)
    values = {r["metric"]: r["value"] for r in rows}
    assert values["n_rows"] == values["count"]


# -- errors --------------------------------------------------------------------------------------------

def test_info_shows_each_experiments_sql_not_its_leading_comment(demo: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(demo), "--experiments", str(demo / "experiments.sql")]) == 0
    clipped = next(line for line in capsys.readouterr().out.splitlines() if "clipped" in line)
    assert clipped.split("clipped", 1)[1].strip().startswith("SQL: SELECT * REPLACE (")
    assert "--" not in clipped


def test_an_experiments_file_with_comments_after_its_statements_runs(demo: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "f.sql"
    f.write_text("-- experiment: liquid\nSELECT * FROM baseline WHERE volume > 1000;   -- trailing note\n"
                 "-- a comment line after it\n")
    assert main(["metrics", str(demo), "--experiments", str(f), "--metric", "count", "--pair", PAIR,
                 "--experiment", "liquid", "--no-window", "--format", "csv", "--no-cache"]) == 0
    t = read_all(demo)
    ok = np.isfinite(t["pred_10s"].to_numpy()) & np.isfinite(t["target_10s"].to_numpy())
    expected = np.sum((t["volume"].to_numpy() > 1000) & ok)
    rows = [r for r in rows_of(capsys.readouterr().out) if r["metric"] == "count"]
    assert [(r["experiment"], float(r["value"])) for r in rows] == [("liquid", expected)]


def test_missing_source_subprocess_prints_error_without_traceback(tmp_path: Path) -> None:
    proc = run_cli("metrics", str(tmp_path / "nowhere"))
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error: ")
    assert "nowhere" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


ERROR_CASES = {
    # case: (arguments after "metrics", experiments file text or None, what stderr must say)
    "missing_source": (["{tmp}/nowhere"], None, "does not exist"),
    "unknown_metric": (["{demo}", "--metric", "r3"], None, "Unknown metric 'r3'. Available:"),
    "sql_before_marker": (["{demo}", "--experiments", "{exp}"], "volume > 1\n",
                          "SQL before the first '-- experiment: NAME' line"),
    "unknown_column": (["{demo}", "--experiments", "{exp}"], "-- experiment: x\nvolumne > 1\n",
                       "reads column 'volumne'"),
    "missing_experiments_file": (["{demo}", "--experiments", "{tmp}/none.sql"], None,
                                 "Cannot read experiments file"),
    "unknown_experiment": (["{demo}", "--experiment", "ghost"], None, "Unknown experiment 'ghost'"),
    "bad_pair": (["{demo}", "--pair", "garbage"], None, "must be written PRED:TARGET"),
    "pair_with_two_colons": (["{demo}", "--pair", "a:b:c"], None, "Pair 'a:b:c' must be written PRED:TARGET"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_print_error_line_and_exit_1(demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            case: str) -> None:
    template, experiments, needle = ERROR_CASES[case]
    exp_file = tmp_path / "exp.sql"
    if experiments is not None:
        exp_file.write_text(experiments)
    args = [a.format(demo=demo, tmp=tmp_path, exp=exp_file) for a in template]
    assert main(["metrics", *args]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("Error: ")
    assert needle in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_experiments_file_that_is_not_utf8_is_a_clean_error(demo: Path, tmp_path: Path) -> None:
    f = tmp_path / "exp.sql"
    f.write_bytes(b"-- experiment: x\n\xff\xfe volume > 1\n")
    proc = run_cli("metrics", str(demo), "--experiments", str(f))
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error: ")
    assert "Traceback" not in proc.stderr


def test_debug_flag_raises_the_library_error(tmp_path: Path) -> None:
    from duckharness import SourceError

    with pytest.raises(SourceError, match="nowhere"):
        main(["--debug", "metrics", str(tmp_path / "nowhere")])


def test_an_unclosed_quote_in_an_experiments_file_is_a_one_line_error_naming_file_and_experiment(
        demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exps = tmp_path / "exps.sql"
    exps.write_text("-- experiment: a\nSELECT * FROM baseline WHERE symbol = 'A;\n")
    assert main(["metrics", str(demo), "--experiments", str(exps), "--metric", "count", "--pair", PAIR]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"Error: {exps}: Experiment 'a': SQL does not parse: a quote")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["metrics", "x", "--format", "xml"])
    assert info.value.code == 2
    assert "invalid choice: 'xml'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:  # said with the command's usage, which lists its options
        main(["metrics", "x", "--bogus"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "usage: duckharness metrics" in err and "--metric NAME" in err
    assert "unrecognized arguments: --bogus" in err


# -- help ----------------------------------------------------------------------------------------------

def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return dict(actions[0].choices)


def test_there_are_subcommands() -> None:
    assert {"demo", "metrics"} <= set(_subparsers())


@pytest.mark.parametrize("name", sorted(_subparsers()))
def test_every_subcommand_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    sub = _subparsers()[name]
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    assert out.startswith(f"usage: duckharness {name}")
    assert sub.description and " ".join(sub.description.split()) in flat
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name}: argument {action.dest} has no help text"
        for opt in action.option_strings:
            assert opt in out


def test_top_level_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    parser = build_parser()
    sub_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub_action._choices_actions}
    for name in _subparsers():
        assert name in out
        assert helps.get(name), f"subcommand {name} has no one-line help"
        assert helps[name] in " ".join(out.split())


@pytest.mark.parametrize("repeated", [
    ["--metric", "mse", "--metric", "mse", "--metric", "count"],
    ["--metric", "mse", "--metric", "count", "--pair", "pred_10s", "--pair", "pred_10s:target_10s"],
    ["--metric", "mse", "--metric", "count", "--by", "symbol", "--by", "symbol"],
], ids=["metric", "pair", "by"])
def test_an_option_given_twice_counts_once(demo: Path, repeated: list[str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    by = ["--by", "symbol"] if "--by" in repeated else []
    assert main(["metrics", str(demo), "--metric", "mse", "--metric", "count", "--pair", PAIR, *by,
                 "--format", "csv"]) == 0
    once = capsys.readouterr().out
    assert main(["metrics", str(demo), *repeated, *([] if "--pair" in repeated else ["--pair", PAIR]),
                 "--format", "csv"]) == 0
    twice = capsys.readouterr().out
    assert twice == once and len(rows_of(once)) > 0


@pytest.mark.parametrize("option", ["--a", "--b", "--metric"])
def test_compare_refuses_a_single_valued_option_given_twice(demo: Path, option: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    args = {"--a": ["liquid"], "--b": ["baseline"], "--metric": ["mse"]}
    args[option] = [*args[option], {"--a": "tight", "--b": "tight", "--metric": "corr"}[option]]
    argv = ["compare", str(demo), "--experiments", str(demo / "experiments.sql")]
    for name, values in args.items():
        for v in values:
            argv += [name, v]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert f"{option} given twice" in capsys.readouterr().err


def test_a_window_without_a_dash_is_a_usage_error(demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["metrics", str(demo), "--metric", "count", "--pair", PAIR, "--window", "10:00"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "--window: '10:00' must be START-END" in err
    assert main(["metrics", str(demo), "--metric", "count", "--pair", PAIR, "--window", "10:00-"]) == 0


def test_demo_overwrite_keeps_a_users_own_metadata_and_experiments(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metadata.json").write_text('{"timezone": "Europe/London", "model": "prod-v3"}')
    (out / "experiments.sql").write_text("-- my experiments\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["demo", str(out), "--overwrite"]) == 1
    assert "already holds files that are not a demo dataset (experiments.sql, metadata.json)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_sink_and_sample_refuse_two_experiments(demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["sink", str(demo), "--experiment", "liquid", "--experiment", "baseline", "-o", str(tmp_path / "s")],
                 ["sample", str(demo), "--experiment", "liquid", "--experiment", "baseline",
                  "-o", str(tmp_path / "s.parquet")]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert "--experiment given twice ('liquid' and 'baseline')" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("window", "why"), [
    ("9.30-16:00", "'9.30' must be a wall-clock time 'HH:MM'"),
    ("10-11", "'10' must be a wall-clock time 'HH:MM'"),
    ("25:00-26:00", "'25:00' is not a valid time of day"),
    ("10:00-10:00", "starts and ends at one time"),
])
def test_a_malformed_window_time_is_a_usage_error_like_a_malformed_shape(
        demo: Path, window: str, why: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Before, '10-11' and '25:00-26:00' were library errors (exit 1) while 'abc' was a usage error."""
    with pytest.raises(SystemExit) as info:
        main(["metrics", str(demo), "--metric", "count", "--pair", PAIR, "--window", window])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and f"--window: {window!r}: {why}" in err


@pytest.mark.parametrize(("command", "args", "why"), [
    ("summary", ["--lag", "-1"], "--lag: must be 0 or more, got -1"),
    ("compare", ["--a", "baseline", "--b", "liquid", "--metric", "mse", "--lag", "-2"], "--lag: must be 0 or more"),
    ("sample", ["--strategy", "random_rows", "-o", "x.parquet"], "invalid choice: 'random_rows'"),
    ("metrics", ["--retries", "-1"], "--retries: must be 0 or more, got -1"),
    ("metrics", ["--pair", PAIR, "--by", "tod:7min"], "--by: Time-of-day bucket 'tod:7min' must divide 24 hours"),
    ("metrics", ["--by", "tod:0min"], "--by: Time-of-day bucket"),
    ("compare", ["--a", "baseline", "--b", "liquid", "--metric", "mse", "--level", "1.5"],
     "--level: must be between 0 and 1 (e.g. 0.95), got 1.5"),
    ("compare", ["--a", "baseline", "--b", "liquid", "--metric", "mse", "--level", "high"],
     "--level: must be a number"),
])
def test_option_values_the_command_cannot_use_are_usage_errors(demo: Path, command: str, args: list[str], why: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, str(demo), *args])
    assert info.value.code == 2 and why in capsys.readouterr().err


def test_debug_may_follow_the_command_and_version_is_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    from duckharness import SourceError, __version__

    with pytest.raises(SourceError, match="nowhere"):
        main(["metrics", str(tmp_path / "nowhere"), "--debug"])
    assert main(["metrics", str(tmp_path / "nowhere")]) == 1  # without it: the error line
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"duckharness {__version__}\n"


def test_a_metric_folder_that_is_a_file_says_so(demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                ) -> None:
    f = tmp_path / "mine.sql"
    f.write_text("-- stats\nSELECT count(*) AS n FROM input;\n-- final\nSELECT n AS value FROM merged;\n")
    assert main(["metrics", str(demo), "--metric-dir", str(f), "--pair", PAIR]) == 1
    assert capsys.readouterr().err == (
        f"Error: Metric folder {f} is a file; give the folder that holds metric .sql files.\n")


def test_no_pairs_found_names_the_option_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_dataset(tmp_path / "src", {"d": pa.table({"x": [1.0, 2.0], "y": [2.0, 1.0]})}, {})
    assert main(["metrics", str(tmp_path / "src")]) == 1
    assert "pairs=['PRED:TARGET'] (--pair PRED:TARGET)" in capsys.readouterr().err


@pytest.mark.parametrize("window", ["", "-", " - "])
def test_a_window_with_no_bound_is_a_usage_error(demo: Path, window: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["metrics", str(demo), "--metric", "count", "--pair", PAIR, f"--window={window}"])
    assert info.value.code == 2
    assert "must be START-END" in capsys.readouterr().err


def test_a_metric_folder_given_twice_is_read_once(demo: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "gmin.sql").write_text("-- stats\nSELECT min(pred) AS lo FROM input;\n-- merge\n"
                                       "SELECT min(lo) AS lo FROM partials;\n"
                                       "-- final\nSELECT lo AS value FROM merged;\n")
    assert main(["metrics", str(demo), "--metric-dir", str(tmp_path), "--metric-dir", str(tmp_path),
                 "--metric", "gmin", "--pair", PAIR, "--format", "csv"]) == 0
    captured = capsys.readouterr()
    assert "Warning" not in captured.err and "gmin" in captured.out


@pytest.mark.parametrize("earlier", [False, True], ids=["new_folder", "over_an_earlier_demo"])
def test_an_interrupted_demo_leaves_the_folder_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         earlier: bool) -> None:
    import duckharness.demo as demo_mod

    out = tmp_path / "d"
    if earlier:
        write_demo_dataset(out, days=2, rows=300)
    before = {p.name: p.read_bytes() for p in out.iterdir()} if earlier else {}
    real, calls = demo_mod.pq.write_table, []

    def interrupted(*a: object, **kw: object) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(*a, **kw)

    monkeypatch.setattr(demo_mod.pq, "write_table", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_demo_dataset(out, days=4, rows=300, overwrite=earlier)
    if earlier:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier demo whole
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["d"] if earlier else [])  # nothing hidden beside it


def test_every_exception_and_the_warning_class_import_from_the_package_and_are_in_all() -> None:
    """Before, ``from duckharness import TransformError`` (the README's name) and
    ``DuckHarnessWarning`` raised ImportError."""
    import inspect

    import duckharness
    import duckharness.errors as errors

    classes = {n: c for n, c in vars(errors).items() if inspect.isclass(c) and c.__module__ == errors.__name__}
    assert {"TransformError", "DuckHarnessWarning", "HarnessClosedError", "DuckHarnessError"} <= set(classes)
    for name, cls in classes.items():
        assert getattr(duckharness, name) is cls, name
        assert name in duckharness.__all__, name
    namespace: dict[str, object] = {}
    exec("from duckharness import *", namespace)
    assert set(classes) <= set(namespace)
