"""Where outputs go: sink folders, sample files and exported scripts/databases follow one set of
rules. Every output path is checked before anything is written; an error is one ``Error: ...``
line naming the user's path (never a temporary name) and saying what to do; nothing is left
behind; an existing output is replaced only with --overwrite; two writers to one new output never
silently replace each other.

Conditions that cannot be produced for real here (tests run as root: no permission errors, and no
small disk to fill) are simulated by making the OS call fail with the errno the OS gives, or, for a
full disk, by letting Polars and DuckDB write to ``/dev/full`` and raise their real errors.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import SESSION, write_dataset

import duckharness.outputs.sink
from duckharness import Harness
from duckharness.cli import main
from duckharness.demo import DEMO_EXPERIMENTS, one_day, trading_days
from duckharness.errors import InputError
from duckharness.outputs.export import export

DAYS = trading_days(dt.date(2026, 3, 4), 3)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("outputs") / "bt"
    rng = np.random.default_rng(5)
    write_dataset(out, {d.isoformat(): one_day(d, 800, rng, symbols=4) for d in DAYS}, SESSION, row_group_size=400)
    (out.parent / "experiments.sql").write_text(DEMO_EXPERIMENTS)
    return out


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """An empty folder for outputs (the tests check that it stays empty after a failure)."""
    w = tmp_path / "work"
    w.mkdir()
    return w


def run(src: Path, *args: str) -> tuple[int, str, str]:
    """``main([...])`` with the source and experiments filled in; (exit code, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    command, *rest = args
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([command, str(src), "--experiments", str(src.parent / "experiments.sql"), "-q", *rest])
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str, *parts: str) -> None:
    assert err.startswith("Error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and ".tmp-" not in err, err
    for p in parts:
        assert p in err, (p, err)


# --- a missing or impossible folder ---------------------------------------------------------------


@pytest.mark.parametrize("command", ["sink", "sample", "export-sql", "export-db"])
def test_a_missing_parent_folder_is_refused_the_same_way_by_every_command(src: Path, work: Path,
                                                                          command: str) -> None:
    target = work / "missing" / ("x.parquet" if command == "sample" else "x")
    args = {"sink": ["sink", "--experiment", "tight", "-o", str(target)],
            "sample": ["sample", "-o", str(target)],
            "export-sql": ["export", "--sql", str(target)],
            "export-db": ["export", "--db", str(target)]}[command]
    code, out, err = run(src, *args)
    assert code == 1 and out == ""
    one_error_line(err, f"Cannot write {target}: folder {work / 'missing'} does not exist", "Create it first")
    assert list(work.iterdir()) == []  # the missing folder was not created


@pytest.mark.parametrize("command", ["sink", "sample", "export"])
def test_an_output_under_a_regular_file_names_that_file(src: Path, work: Path, command: str) -> None:
    afile = work / "afile"
    afile.write_text("x")
    target = afile / "sub" / "x"
    flag = {"sink": ["sink", "--experiment", "tight", "-o"], "sample": ["sample", "-o"], "export": ["export", "--sql"]}
    code, _, err = run(src, *flag[command], str(target))
    assert code == 1
    one_error_line(err, f"Cannot write {target}: {afile} is a file, not a folder")
    assert sorted(p.name for p in work.iterdir()) == ["afile"]


def test_export_checks_every_output_before_writing_any(src: Path, work: Path) -> None:
    ok = work / "ok_before.sql"
    missing = work / "nonexist" / "x.duckdb"
    code, _, err = run(src, "export", "--sql", str(ok), "--db", str(missing))
    assert code == 1
    one_error_line(err, f"Cannot write {missing}: folder {missing.parent} does not exist")
    assert list(work.iterdir()) == []  # ok_before.sql was not written


def test_export_to_a_database_path_that_is_a_folder_writes_nothing(src: Path, work: Path) -> None:
    folder = work / "somefolder"
    folder.mkdir()
    code, _, err = run(src, "export", "--sql", str(work / "x.sql"), "--db", str(folder))
    assert code == 1
    one_error_line(err, f"Output {folder} is a folder; give a file path")
    assert sorted(p.name for p in work.iterdir()) == ["somefolder"] and list(folder.iterdir()) == []


def test_sample_to_a_folder_is_refused_before_sampling(src: Path, work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sampled = []
    monkeypatch.setattr(Harness, "sample", lambda *a, **kw: sampled.append(1))
    code, _, err = run(src, "sample", "-o", str(work))
    assert code == 1 and sampled == []
    one_error_line(err, f"Output {work} is a folder; give a file path")


def test_a_sample_is_written_in_the_format_its_extension_names(src: Path, work: Path) -> None:
    """Before, ``-o s.csv`` silently wrote Parquet."""
    for name in ("s.csv", "s.parquet"):
        code, _, err = run(src, "sample", "--experiment", "baseline", "--strategy", "head", "--n", "50",
                           "-o", str(work / name))
        assert code == 0, err
    csv, parquet = pl.read_csv(work / "s.csv", try_parse_dates=True), pl.read_parquet(work / "s.parquet")
    assert (work / "s.csv").read_bytes()[:4] != b"PAR1" and csv.height == parquet.height == 50
    assert csv.columns == parquet.columns
    assert np.allclose(csv["pred_10s"].to_numpy(), parquet["pred_10s"].to_numpy(), rtol=1e-15, atol=0)


def test_a_sample_to_another_extension_is_refused_before_sampling(src: Path, work: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    sampled = []
    monkeypatch.setattr(Harness, "sample", lambda *a, **kw: sampled.append(1))
    code, _, err = run(src, "sample", "-o", str(work / "s.txt"))
    assert code == 1 and sampled == []
    one_error_line(err, f"Cannot write {work / 's.txt'}: a sample is written as Parquet (.parquet, .pq) or CSV")
    assert list(work.iterdir()) == []


# --- the file system refuses while writing ----------------------------------------------------------


def test_sink_on_a_read_only_file_system_names_the_output(src: Path, work: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real_mkdir = os.mkdir

    def read_only(path: str, *a: object, **kw: object) -> None:
        if str(path).startswith(str(work)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        real_mkdir(path, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "mkdir", read_only)
    out = work / "out"
    code, _, err = run(src, "sink", "--experiment", "tight", "-o", str(out))
    assert code == 1
    one_error_line(err, f"Cannot write {out}: the file system is read-only; write elsewhere")
    assert list(work.iterdir()) == []


def test_read_only_output_folder_is_refused_before_any_work(src: Path, work: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: p != str(work) and real_access(p, mode, **kw))
    code, _, err = run(src, "sample", "-o", str(work / "s.parquet"))
    assert code == 1
    one_error_line(err, f"folder {work} is not writable")


@pytest.mark.parametrize("command", ["sample", "export"])
def test_a_remote_output_path_for_a_local_only_output_is_refused(src: Path, command: str) -> None:
    """``-o s3://...`` was taken as a local relative path ("folder .../s3:/bkt does not exist")."""
    args = ("sample", "-o", "s3://bkt/s.parquet") if command == "sample" else ("export", "--sql", "s3://bkt/x.sql")
    code, _, err = run(src, *args)
    assert code == 1
    one_error_line(err, f"Cannot write {args[-1]}: this output is written to a local path only")


def _partly_then_full(path: str) -> None:
    """Write a few bytes at ``path`` (a half-written file), then fail as a full disk does."""
    with open(path, "wb") as f:
        f.write(b"PAR1 half")


def test_sample_on_a_full_disk_names_the_output_and_leaves_nothing(src: Path, work: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = pl.DataFrame.write_parquet

    def full_disk(self: pl.DataFrame, path: str, *a: object, **kw: object) -> None:
        _partly_then_full(path)
        real_write(self, "/dev/full", *a, **kw)  # raises Polars' own "No space left on device (os error 28)"

    monkeypatch.setattr(pl.DataFrame, "write_parquet", full_disk)
    out = work / "s8.parquet"
    code, _, err = run(src, "sample", "--days", "2", "-o", str(out))  # of 3 days: no warning beside the error
    assert code == 1
    one_error_line(err, f"Cannot write {out}: no space left on the device")
    assert list(work.iterdir()) == []


def test_sink_on_a_full_disk_names_the_output_and_leaves_nothing(src: Path, work: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real_copy = duckharness.outputs.sink._copy
    calls = []

    def full_disk(con: object, query: object, target: str, tracer: object, partition: str | None = None) -> int:
        calls.append(target)
        if len(calls) == 1:
            return real_copy(con, query, target, tracer, partition)  # type: ignore[arg-type]
        _partly_then_full(target)
        return real_copy(con, query, "/dev/full", tracer, partition)  # type: ignore[arg-type]  # DuckDB's IO error

    monkeypatch.setattr(duckharness.outputs.sink, "_copy", full_disk)
    out = work / "out"
    code, _, err = run(src, "sink", "--experiment", "tight", "-o", str(out))
    assert code == 1 and len(calls) == 2
    one_error_line(err, f"Cannot write {out}: no space left on the device")
    assert list(work.iterdir()) == []


# --- existing outputs -------------------------------------------------------------------------------


def test_export_refuses_to_replace_existing_files_without_overwrite(src: Path, work: Path) -> None:
    sql, db = work / "chain.sql", work / "chain.duckdb"
    sql.write_text("-- mine")
    db.write_bytes(b"mine")
    for args in (["--sql", str(sql)], ["--db", str(db)], ["--sql", str(work / "new.sql"), "--db", str(db)]):
        code, _, err = run(src, "export", *args)
        assert code == 1
        one_error_line(err, "already exists", "--overwrite")
    assert (sql.read_text(), db.read_bytes()) == ("-- mine", b"mine")
    assert sorted(p.name for p in work.iterdir()) == ["chain.duckdb", "chain.sql"]
    code, out, err = run(src, "export", "--sql", str(sql), "--db", str(db), "--overwrite")
    assert code == 0, err
    assert f"Wrote {sql}" in out and sql.read_text().startswith("-- duckharness export")
    assert db.read_bytes()[8:12] == b"DUCK"
    assert sorted(p.name for p in work.iterdir()) == ["chain.duckdb", "chain.sql"]


def test_harness_export_refuses_an_existing_file_and_the_export_function_replaces_it_when_asked(
        src: Path, work: Path) -> None:
    sql = work / "chain.sql"
    sql.write_text("-- mine")
    with Harness(src) as h:
        with pytest.raises(InputError, match=r"already exists\. Use overwrite=True"):
            h.export(sql)
        assert sql.read_text() == "-- mine"
        result = export(h, sql, None, window=h.session_window, overwrite=True)
    assert result.sql_path == str(sql) and "CREATE" in sql.read_text()


# --- two writers at once --------------------------------------------------------------------------


def test_sink_does_not_replace_an_output_that_appeared_while_it_was_writing(
        src: Path, work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = work / "out"
    real = duckharness.outputs.sink._write_metadata

    def another_sink_finishes_first(*a: object, **kw: object) -> None:
        if not out.exists():
            out.mkdir()
            (out / "metadata.json").write_text(json.dumps({"duckharness_sink": {"experiment": "other"}}))
        real(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(duckharness.outputs.sink, "_write_metadata", another_sink_finishes_first)
    with Harness(src) as h:
        h.load_experiments(src.parent / "experiments.sql")
        with pytest.raises(InputError, match=rf"Output {out} appeared while this sink was being written.*overwrite"):
            h.sink("tight", out)
        assert os.listdir(work) == ["out"] and os.listdir(out) == ["metadata.json"]  # the other's, alone
        # With overwrite, an earlier sink that appeared meanwhile is replaced ...
        result = h.sink("tight", out, overwrite=True)
        assert json.loads((out / "metadata.json").read_text())["duckharness_sink"]["experiment"] == "tight"
        assert sorted(os.listdir(out)) == sorted([*(Path(f).name for f in result.files), "metadata.json"])
        # ... but files that are not a sink are not, even though the folder was empty at the start.
        other = work / "other"
        monkeypatch.setattr(duckharness.outputs.sink, "_write_metadata", lambda *a, **kw: (
            other.mkdir(), (other / "notes.txt").write_text("mine"), real(*a, **kw)))
        with pytest.raises(InputError, match="not an earlier duckharness sink"):
            h.sink("tight", other, overwrite=True)
    assert os.listdir(other) == ["notes.txt"]
    assert sorted(os.listdir(work)) == ["other", "out"]


def test_two_concurrent_sinks_to_one_new_folder_one_succeeds_and_the_other_refuses(src: Path, work: Path) -> None:
    out = work / "OUT"
    exps = str(src.parent / "experiments.sql")
    procs = {name: subprocess.Popen([sys.executable, "-m", "duckharness", "sink", str(src), "--experiments", exps,
                                     "--experiment", name, "-o", str(out), "-q"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("clipped", "tight")}
    done = {name: (p.wait(timeout=120), p.stderr.read() if p.stderr else "") for name, p in procs.items()}
    winners = [name for name, (rc, _) in done.items() if rc == 0]
    assert len(winners) == 1, done
    (loser,) = set(done) - set(winners)
    rc, err = done[loser]
    assert rc == 1
    one_error_line(err, f"Output {out}")
    assert "already exists" in err or "appeared while this sink was being written" in err
    assert json.loads((out / "metadata.json").read_text())["duckharness_sink"]["experiment"] == winners[0]
    assert os.listdir(work) == ["OUT"]  # no temporary folder of the loser
