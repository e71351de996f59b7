"""Progress bars move with the run: one step per file batch (``metrics``) or day group (``rank_ic``,
``deciles`` and the ``summary``, ``series`` and ``compare`` built on them), drawn as each one
finishes, on a terminal or when asked, never on a pipe or file unless asked.

A user saw ``metrics`` stand at ``0/8`` for a whole 20 s run and then jump to ``8/8``, and no bar
at all from ``summary`` and ``deciles``. The tests below hold one batch until the bar has drawn
another batch's step: a bar drawn only when every batch is back makes them fail (after their
20 s wait), however fast or slow the machine.
"""

from __future__ import annotations

import datetime as dt
import io
import re
import sys
import threading
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import SESSION, write_dataset

from duckharness import Harness
from duckharness.cli import main
from duckharness.demo import one_day, trading_days
from duckharness.errors import TransformError

DAYS = trading_days(dt.date(2026, 3, 4), 6)
FRAME = re.compile(r"(?P<label>[^\r\n]+?) \[[#.]{30}\] (?P<done>\d+)/(?P<total>\d+) +\d+\.\ds")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("progress") / "bt"
    rng = np.random.default_rng(5)
    write_dataset(out, {d.isoformat(): one_day(d, 800, rng, symbols=6) for d in DAYS}, SESSION, row_group_size=400)
    return out


def steps(text: str, label: str) -> list[tuple[int, int]]:
    """The ``(done, total)`` of each frame the bar called ``label`` drew, in order."""
    return [(int(m["done"]), int(m["total"])) for m in FRAME.finditer(text) if m["label"] == label]


class Terminal(io.StringIO):
    """A captured stream that says it is a terminal, as stderr does in an interactive shell."""

    def isatty(self) -> bool:
        return True


# --- the bar moves while batches still run -------------------------------------------------------------

BAR_MOVED = threading.Event()  # set by WatchedTerminal: the bar has drawn a step past its threshold
HELD_DAY = DAYS[1]


class WatchedTerminal(Terminal):
    """A terminal that sets ``BAR_MOVED`` once a frame shows at least ``threshold`` steps done."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold = threshold

    def write(self, text: str) -> int:
        if any(int(m["done"]) >= self.threshold for m in FRAME.finditer(text)):
            BAR_MOVED.set()
        return super().write(text)


def hold_second_day(lf: pl.LazyFrame) -> pl.LazyFrame:
    """A per-batch Python step that keeps the second day's batch running until the bar has moved."""
    df = lf.collect()
    days = df["ts"].dt.convert_time_zone("US/Eastern").dt.date().unique().to_list() if df.height else []
    if HELD_DAY in days and not BAR_MOVED.wait(timeout=20):
        raise RuntimeError("the progress bar did not move while this day's batch ran")
    return df.lazy()


@pytest.mark.parametrize(
    ("call", "label", "threshold"),
    [
        # rank_ic and deciles run every day group on the executor: two workers take days 1 and 2,
        # so the first step drawn is another day than the held one.
        ("rank_ic", "rank_ic", 1),
        ("deciles", "deciles", 1),
        # metrics runs a Python step's first batch on the driver (step 1 of 6, drawn before the
        # others start), then the rest on the executor: step 2 is another batch than the held one.
        ("metrics", "metrics", 2),
    ],
)
def test_the_bar_advances_for_a_finished_batch_while_another_batch_still_runs(
        folder: Path, call: str, label: str, threshold: int, monkeypatch: pytest.MonkeyPatch) -> None:
    BAR_MOVED.clear()
    stream = WatchedTerminal(threshold)
    monkeypatch.setattr(sys, "stderr", stream)
    with Harness(folder, workers=2, cache=False) as h:
        h.add_experiment("held", hold_second_day)
        calls = {
            "rank_ic": lambda: h.rank_ic("pred_10s", experiments=["held"]),
            "deciles": lambda: h.deciles("pred_10s", experiments=["held"]),
            "metrics": lambda: h.metrics(["count"], pairs="pred_10s", experiments=["held"]),
        }
        try:
            assert calls[call]().height > 0
        except TransformError as e:  # what a bar drawn only at the end of the run gives
            pytest.fail(f"{label}: {e}")
    drawn = steps(stream.getvalue(), label)
    assert drawn[-1] == (len(DAYS), len(DAYS))
    assert [d for d, _ in drawn] == sorted(d for d, _ in drawn)  # never backwards
    assert stream.getvalue().endswith("\n")  # the line is ended for what is printed next


# --- one step per batch, on a terminal or when asked -----------------------------------------------------

def every_step(n: int) -> list[tuple[int, int]]:
    return [(k, n) for k in range(n + 1)]


def test_rank_ic_and_deciles_draw_one_step_per_day_group_when_asked(
        folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Harness(folder, workers=2, cache=False) as h:
        h.rank_ic("pred_10s", progress=True)
        assert steps(capsys.readouterr().err, "rank_ic") == every_step(len(DAYS))
        h.deciles("pred_10s", experiments=["baseline"], progress=True)
        assert steps(capsys.readouterr().err, "deciles") == every_step(len(DAYS))
        # Two experiments: a step per (experiment, day group).
        h.add_experiment("liquid", "volume > 1000")
        h.rank_ic("pred_10s", experiments=["baseline", "liquid"], progress=True)
        assert steps(capsys.readouterr().err, "rank_ic") == every_step(2 * len(DAYS))


def test_metrics_draws_one_step_per_batch_for_chained_experiments_too(
        folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An experiment the fused scan cannot answer (run through its own chain per batch) used to
    add all its batches in one step at its end."""
    with Harness(folder, workers=2, cache=False) as h:
        h.add_experiment("liquid", "volume > 1000")  # fused into the one scan
        h.add_experiment("renamed", "SELECT * RENAME (spread AS spr) FROM liquid")  # SQL, not inlinable
        h.metrics(["count"], pairs="pred_10s", experiments=["liquid", "renamed"], progress=True)
    assert steps(capsys.readouterr().err, "metrics") == every_step(2 * len(DAYS))


def test_summary_series_and_compare_draw_the_bars_of_their_scans_when_asked(
        folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Two experiments: rank IC steps through each one's day groups; the metrics scan reads each
    # batch once for both (they are fused into one query).
    n = len(DAYS)
    with Harness(folder, workers=2, cache=False) as h:
        h.add_experiment("liquid", "volume > 1000")
        h.summary(["rank_ic", "corr"], "pred_10s", progress=True)
        err = capsys.readouterr().err
        assert (steps(err, "rank_ic"), steps(err, "metrics")) == (every_step(2 * n), every_step(n))
        h.series("rank_ic", "pred_10s", experiments=["liquid"], progress=True)
        assert steps(capsys.readouterr().err, "rank_ic") == every_step(n)
        for metric, label, total in (("rank_ic", "rank_ic", 2 * n), ("corr", "metrics", n)):
            h.compare(metric, "liquid", "baseline", "pred_10s", n_boot=10, progress=True)
            assert steps(capsys.readouterr().err, label) == every_step(total)


def test_the_harness_progress_setting_holds_for_the_per_day_scans(
        folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Harness(folder, workers=2, cache=False, progress=True) as shown:
        shown.deciles("pred_10s")
        shown.summary("rank_ic", "pred_10s")
        err = capsys.readouterr().err
        assert steps(err, "deciles")[-1] == steps(err, "rank_ic")[-1] == (len(DAYS), len(DAYS))
        shown.rank_ic("pred_10s", progress=False)  # a call can still say no
        assert capsys.readouterr().err == ""
    # By default the bar is drawn only on a terminal, and the captured stderr is not one.
    with Harness(folder, workers=2, cache=False) as default:
        default.add_experiment("liquid", "volume > 1000")
        default.rank_ic("pred_10s")
        default.deciles("pred_10s")
        default.summary(["rank_ic", "corr"], "pred_10s")
        default.compare("rank_ic", "liquid", "baseline", "pred_10s", n_boot=10)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command", ["deciles", "summary"])
def test_cli_draws_the_per_day_bar_on_a_terminal_and_not_with_quiet_or_on_a_pipe(
        folder: Path, command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    args = [command, str(folder), "--pair", "pred_10s", "--no-cache", "--workers", "2", "--format", "csv"]
    label = {"deciles": "deciles", "summary": "rank_ic"}[command]
    terminal = Terminal()
    with monkeypatch.context() as m:
        m.setattr(sys, "stderr", terminal)
        assert main(args) == 0
    assert steps(terminal.getvalue(), label) == every_step(len(DAYS))
    quiet = Terminal()
    with monkeypatch.context() as m:
        m.setattr(sys, "stderr", quiet)
        assert main([*args, "-q"]) == 0
    assert quiet.getvalue() == ""
    capsys.readouterr()
    assert main(args) == 0  # stderr a pipe (captured): no bar
    assert capsys.readouterr().err == ""
