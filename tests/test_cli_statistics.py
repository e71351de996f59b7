"""The statistics commands (summary, compare, deciles) through ``duckharness.cli.main`` and one
real subprocess: values equal the facade's, ``--plot`` writes a PNG, errors name the culprit."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from duckharness import Harness
from duckharness.cli import main
from duckharness.demo import write_demo_dataset

PAIR = "pred_10s:target_10s"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli_stats") / "demo"
    write_demo_dataset(folder, days=4, rows=800)
    return folder


def source(demo: Path) -> list[str]:
    return [str(demo), "--experiments", str(demo / "experiments.sql"), "-q"]


def rows_of(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_compare_prints_the_facade_values_and_writes_a_plot(demo: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp.png"
    code = main(["compare", *source(demo), "--a", "clipped", "--b", "baseline", "--metric", "mse", "--pair", PAIR,
                 "--seed", "5", "--n-boot", "300", "--plot", str(out), "--format", "csv"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    (row,) = rows_of(captured.out)
    with Harness(demo, cache=False) as h:
        h.load_experiments(demo / "experiments.sql")
        want = h.compare("mse", "clipped", "baseline", PAIR, seed=5, n_boot=300).table.row(0, named=True)
    for key in ("diff", "dm_stat", "p_value", "ci_low", "ci_high"):
        assert float(row[key]) == pytest.approx(want[key], rel=1e-12)
    assert (row["a"], row["b"], row["seed"], row["n_days"]) == ("clipped", "baseline", "5", "4")
    assert out.read_bytes()[:8] == PNG and f"Wrote {out}" in captured.err


def test_compare_records_output_reads_as_a_report(demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", *source(demo), "--a", "liquid", "--b", "baseline", "--metric", "rank_ic",
                 "--pair", PAIR, "--n-boot", "100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    fields = {line.split()[0] for line in lines if line.strip()}
    assert {"metric", "a", "b", "dm_stat", "p_value", "ci_low", "ci_high", "lag"} <= fields


def test_compare_daily_prints_the_per_day_differences(demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", *source(demo), "--a", "clipped", "--b", "baseline", "--metric", "mae",
                 "--pair", PAIR, "--n-boot", "50", "--daily", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) == 4 and set(data[0]) == {"pred", "target", "day", "value_a", "value_b", "diff"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--a", "nosuch", "--b", "baseline", "--metric", "mse"], "Unknown experiment 'nosuch'"),
        (["--a", "clipped", "--b", "baseline", "--metric", "msx"], "Unknown metric 'msx'. Available: rank_ic, "),
    ],
)
def test_compare_errors_name_the_culprit(demo: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                         message: str) -> None:
    assert main(["compare", *source(demo), *args, "--pair", PAIR]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and message in err and "Traceback" not in err


def test_summary_of_an_unknown_metric_lists_rank_ic_too(demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", *source(demo), "--metric", "nosuch", "--pair", PAIR]) == 1
    err = capsys.readouterr().err
    assert "Unknown metric 'nosuch'. Available: rank_ic, bias, corr" in err and "Traceback" not in err


def test_deciles_needs_at_least_two_buckets_on_the_command_line(
        demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["deciles", *source(demo), "--pair", PAIR, "--buckets", "1"])
    assert info.value.code == 2 and "must be at least 2, got 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["deciles", *source(demo), "--pair", PAIR, "--buckets", "x"])
    assert "--buckets: must be a whole number, got 'x'" in capsys.readouterr().err


def test_summary_command_matches_the_facade(demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "series.png"
    assert main(["summary", *source(demo), "--metric", "rank_ic", "--metric", "corr", "--pair", PAIR,
                 "--experiment", "baseline", "--lag", "1", "--format", "csv", "--plot", str(out)]) == 0
    rows = rows_of(capsys.readouterr().out)
    with Harness(demo, cache=False) as h:
        want = h.summary(["rank_ic", "corr"], PAIR, "baseline", lag=1)
    assert [r["metric"] for r in rows] == want["metric"].to_list()
    assert [float(r["t_stat"]) for r in rows] == pytest.approx(want["t_stat"].to_list(), rel=1e-12)
    assert out.read_bytes()[:8] == PNG


def test_deciles_command_prints_buckets_and_plots(demo: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dec.png"
    assert main(["deciles", *source(demo), "--pair", PAIR, "--experiment", "tight", "--buckets", "4",
                 "--plot", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["experiment", "pred", "target", "bucket", "n", "mean_pred", "mean_target"]
    assert [line.split()[3] for line in lines[2:]] == ["1", "2", "3", "4"]
    assert out.read_bytes()[:8] == PNG


def test_compare_in_a_real_subprocess(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub.png"
    proc = subprocess.run(
        [sys.executable, "-m", "duckharness", "compare", *source(demo), "--a", "clipped", "--b", "baseline",
         "--metric", "mse", "--pair", PAIR, "--n-boot", "100", "--plot", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "dm_stat" in proc.stdout and out.read_bytes()[:8] == PNG
