"""Charts: PNG files are written, and what they draw is exactly the tables' values."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest

from duckharness import DuckHarnessError, Harness, InputError, MissingDependencyError
from duckharness.outputs.plots import plot_comparison, plot_deciles, plot_series

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


@pytest.fixture(scope="module")
def panel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    from conftest import DST_START, panel_day, write_dataset

    from duckharness.demo import trading_days

    rng = np.random.default_rng(3)
    folder = tmp_path_factory.mktemp("plots") / "panel"
    write_dataset(folder, {d.isoformat(): panel_day(d, rng) for d in trading_days(DST_START, 6)},
                  {"timezone": "US/Eastern"})
    h = Harness(folder, cache=False)
    h.add_experiment("liquid", "volume > 1000")
    yield h
    h.close()


def test_series_plot_draws_the_table_and_its_rolling_mean(panel: Harness, tmp_path: Path) -> None:
    df = panel.series("rank_ic", "pred_10s", ["baseline", "liquid"])
    out = tmp_path / "series.png"
    fig = plot_series(df, out, rolling=3)
    assert is_png(out)
    ax = fig.axes[0]
    assert ax.get_title() == "rank_ic per day"
    assert ax.get_xlabel() and ax.get_ylabel()
    for k, name in enumerate(["baseline", "liquid"]):
        values = df.filter(pl.col("experiment") == name).sort("day")["value"].to_numpy()
        raw, mean = ax.lines[2 * k], ax.lines[2 * k + 1]
        assert np.asarray(raw.get_ydata(), dtype=float) == pytest.approx(values)
        assert np.asarray(mean.get_ydata(), dtype=float) == pytest.approx(
            pd.Series(values).rolling(3, min_periods=1).mean().to_numpy()
        )
        assert raw.get_label() == f"{name} pred_10s:target_10s"


def test_series_and_summary_write_a_png_from_the_facade(panel: Harness, tmp_path: Path) -> None:
    panel.series(["corr", "mse"], "pred_10s", plot=tmp_path / "a.png")
    panel.summary("rank_ic", "pred_1s", plot=tmp_path / "b.png", rolling=2)
    assert is_png(tmp_path / "a.png") and is_png(tmp_path / "b.png")


def test_decile_chart_bars_are_the_mean_targets(panel: Harness, tmp_path: Path) -> None:
    table = panel.deciles("pred_10s", "baseline", buckets=5, plot=tmp_path / "d.png")
    assert is_png(tmp_path / "d.png")
    fig = plot_deciles(table, tmp_path / "d2.png")
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == pytest.approx(table["mean_target"].to_list())
    assert "bucket" in fig.axes[0].get_xlabel()


def test_comparison_chart_draws_both_series_and_the_differences(panel: Harness, tmp_path: Path) -> None:
    c = panel.compare("mse", "liquid", "baseline", "pred_10s", n_boot=100, plot=tmp_path / "c.png")
    assert is_png(tmp_path / "c.png")
    fig = plot_comparison(c, tmp_path / "c2.png", rolling=2)
    top, bottom = fig.axes[0], fig.axes[1]
    assert np.asarray(top.lines[0].get_ydata(), dtype=float) == pytest.approx(c.daily["value_a"].to_numpy())
    assert np.asarray(top.lines[1].get_ydata(), dtype=float) == pytest.approx(c.daily["value_b"].to_numpy())
    assert [p.get_height() for p in bottom.patches] == pytest.approx(c.daily["diff"].to_list())
    assert "DM =" in bottom.get_title() and "CI" in bottom.get_title()


def test_missing_matplotlib_says_what_to_install(panel: Harness, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(MissingDependencyError, match=r'pip install "duckharness\[plot\]"') as info:
        panel.deciles("pred_10s", "baseline", plot=tmp_path / "x.png")
    assert isinstance(info.value, DuckHarnessError) and info.value.extra == "plot"
    assert not (tmp_path / "x.png").exists()


def test_cli_start_up_does_not_import_matplotlib() -> None:
    code = "import sys, duckharness.cli as c; c.build_parser(); print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_plot_series_rejects_a_bad_window(tmp_path: Path) -> None:
    df = pl.DataFrame({"experiment": ["a"], "pred": ["p"], "target": ["t"], "day": [None], "metric": ["m"],
                       "value": [1.0]})
    with pytest.raises(ValueError, match="rolling"):
        plot_series(df, tmp_path / "x.png", rolling=0)


def test_plot_format_follows_the_file_extension(panel: Harness, tmp_path: Path) -> None:
    df = panel.series("corr", "pred_10s", "baseline")
    plot_series(df, tmp_path / "s.pdf")
    plot_series(df, tmp_path / "s.svg")
    assert (tmp_path / "s.pdf").read_bytes()[:5] == b"%PDF-"
    assert b"<svg" in (tmp_path / "s.svg").read_bytes()[:2000]


@pytest.mark.parametrize(
    ("name", "why"),
    [("chart.txt", r"\.png, \.pdf or \.svg"), ("no/such/folder/chart.png", "does not exist"), (".", "directory")],
)
def test_unwritable_plot_path_is_refused_before_any_scan(panel: Harness, tmp_path: Path, name: str, why: str) -> None:
    target = tmp_path / name if name != "." else tmp_path
    statements: list[str] = []
    with panel.trace(statements.append):
        for call in (
            lambda: panel.series("corr", "pred_10s", plot=target),
            lambda: panel.compare("mse", "liquid", "baseline", "pred_10s", plot=target),
            lambda: panel.deciles("pred_10s", plot=target),
        ):
            with pytest.raises(InputError, match=why):
                call()
    assert statements == []


def test_a_plot_into_a_read_only_folder_is_refused_before_any_scan(panel: Harness, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a read-only mount (the run used to read everything, then fail writing the PNG)."""
    import os

    real_access = os.access
    monkeypatch.setattr(os, "access",
                        lambda p, mode, **kw: os.fspath(p) != str(tmp_path) and real_access(p, mode, **kw))
    statements: list[str] = []
    with panel.trace(statements.append), pytest.raises(InputError, match="is not writable"):
        panel.deciles("pred_10s", plot=tmp_path / "d.png")
    assert statements == []


def test_series_without_defined_values_says_so_on_the_chart(panel: Harness, tmp_path: Path) -> None:
    df = panel.series("corr", "pred_10s", "baseline").with_columns(pl.lit(None, dtype=pl.Float64).alias("value"))
    fig = plot_series(df, tmp_path / "empty.png")
    assert is_png(tmp_path / "empty.png")
    assert [t.get_text() for t in fig.axes[0].texts] == ["no defined values"]


def test_a_chart_whose_write_fails_leaves_the_earlier_file_whole(panel: Harness, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from matplotlib.figure import Figure

    out = tmp_path / "series.png"
    panel.series("corr", "pred_10s", ["baseline"], plot=out)
    before = out.read_bytes()
    assert before[:8] == PNG

    def disk_full(self: Figure, fname: str, **kwargs: object) -> None:  # a write that stops halfway
        with open(fname, "wb") as f:
            f.write(PNG)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", disk_full)
    with pytest.raises(InputError, match=r"series\.png: no space left"):
        panel.series(["corr", "mse"], "pred_10s", ["baseline"], plot=out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series.png"]  # no temporary left


def test_a_new_chart_replaces_an_earlier_one_of_that_name(panel: Harness, tmp_path: Path) -> None:
    out = tmp_path / "s.png"
    panel.series("corr", "pred_10s", ["baseline"], plot=out)
    first = out.read_bytes()
    panel.series(["corr", "mse"], "pred_10s", ["baseline", "liquid"], plot=out)
    assert is_png(out) and out.read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png"]
