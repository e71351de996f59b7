"""Property tests: merging partial statistics is associative and commutative, and metrics do not
depend on how the rows are split into files."""

from __future__ import annotations

import datetime as dt
import itertools
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SESSION, write_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duckharness import Harness
from duckharness.demo import one_day, trading_days
from duckharness.metrics.merge import merge_partials

HOW = {"n": "sum", "s": "sum", "lo": "min", "hi": "max"}
SCHEMA = {"day": pl.Int64, "grp": pl.String, "n": pl.Int64, "s": pl.Float64, "lo": pl.Float64, "hi": pl.Float64}
KEY_SETS = [(), ("day",), ("day", "grp")]
REL = 1e-12

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
row = st.fixed_dictionaries({
    "day": st.sampled_from([1, 2, 3, None]),
    "grp": st.sampled_from(["a", "b", None]),
    "n": st.integers(min_value=0, max_value=10**9),
    "s": finite,
    "lo": st.one_of(st.none(), finite),
    "hi": st.one_of(st.none(), finite),
})
frames = st.lists(row, max_size=25).map(lambda rows: pl.DataFrame(rows, schema=SCHEMA))

PROPS = settings(max_examples=150, deadline=None, database=None)


def partials(df: pl.DataFrame, keys: tuple[str, ...]) -> pl.DataFrame:
    """The frame as partial stats for ``keys``: key columns first, then the stats."""
    return df.select(*keys, *HOW)


def reference(df: pl.DataFrame, keys: tuple[str, ...]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The merge computed in plain Python, with exact sums (``math.fsum``) and |s| totals."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in df.iter_rows(named=True):
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    if not keys and not groups:
        groups[()] = []
    out = {}
    for k, rows in groups.items():
        los = [r["lo"] for r in rows if r["lo"] is not None]
        his = [r["hi"] for r in rows if r["hi"] is not None]
        out[k] = {"n": sum(r["n"] for r in rows), "s": math.fsum(r["s"] for r in rows),
                  "abs_s": math.fsum(abs(r["s"]) for r in rows),
                  "lo": min(los) if los else None, "hi": max(his) if his else None}
    return out


def assert_merged_equal(a: pl.DataFrame, b: pl.DataFrame, keys: tuple[str, ...], scale: dict) -> None:
    """Same groups in the same order; counts, min and max exact; sums within REL of their size."""
    assert a.columns == b.columns == [*keys, *HOW]
    assert a.height == b.height
    for ra, rb in zip(a.iter_rows(named=True), b.iter_rows(named=True), strict=True):
        key = tuple(ra[k] for k in keys)
        assert key == tuple(rb[k] for k in keys)
        assert ra["n"] == rb["n"]
        assert ra["lo"] == rb["lo"] and ra["hi"] == rb["hi"]
        tol = REL * scale[key]["abs_s"] + 1e-300
        assert abs(ra["s"] - rb["s"]) <= tol, (ra["s"], rb["s"])


def key_order(key: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((v is None, v if v is not None else 0) for v in key)


# -- merge_partials ------------------------------------------------------------------------------------

@PROPS
@given(df=frames, keys=st.sampled_from(KEY_SETS))
def test_merge_equals_python_reference(df: pl.DataFrame, keys: tuple[str, ...]) -> None:
    got = merge_partials(partials(df, keys), list(keys), HOW)
    ref = reference(df, keys)
    assert [tuple(r[k] for k in keys) for r in got.iter_rows(named=True)] == sorted(ref, key=key_order)
    for r in got.iter_rows(named=True):
        want = ref[tuple(r[k] for k in keys)]
        assert r["n"] == want["n"]
        assert r["lo"] == want["lo"] and r["hi"] == want["hi"]
        assert abs(r["s"] - want["s"]) <= REL * want["abs_s"] + 1e-300


@PROPS
@given(left=frames, right=frames, keys=st.sampled_from(KEY_SETS))
def test_merge_is_associative(left: pl.DataFrame, right: pl.DataFrame, keys: tuple[str, ...]) -> None:
    keys_l = list(keys)
    whole = merge_partials(partials(pl.concat([left, right]), keys), keys_l, HOW)
    halves = pl.concat([merge_partials(partials(left, keys), keys_l, HOW),
                        merge_partials(partials(right, keys), keys_l, HOW)])
    of_halves = merge_partials(halves, keys_l, HOW)
    assert_merged_equal(whole, of_halves, keys, reference(pl.concat([left, right]), keys))


@PROPS
@given(a=frames, b=frames, c=frames, keys=st.sampled_from(KEY_SETS))
def test_merge_grouping_order_does_not_matter(a: pl.DataFrame, b: pl.DataFrame, c: pl.DataFrame,
                                              keys: tuple[str, ...]) -> None:
    k = list(keys)
    def m(df: pl.DataFrame) -> pl.DataFrame:
        return merge_partials(df, k, HOW)
    ab_c = m(pl.concat([m(pl.concat([partials(a, keys), partials(b, keys)])), m(partials(c, keys))]))
    a_bc = m(pl.concat([m(partials(a, keys)), m(pl.concat([partials(b, keys), partials(c, keys)]))]))
    assert_merged_equal(ab_c, a_bc, keys, reference(pl.concat([a, b, c]), keys))


@PROPS
@given(data=st.data(), df=frames, keys=st.sampled_from(KEY_SETS))
def test_merge_is_invariant_under_permutation(data: st.DataObject, df: pl.DataFrame, keys: tuple[str, ...]) -> None:
    perm = data.draw(st.permutations(list(range(df.height))))
    shuffled = df[perm] if perm else df
    a = merge_partials(partials(df, keys), list(keys), HOW)
    b = merge_partials(partials(shuffled, keys), list(keys), HOW)
    assert_merged_equal(a, b, keys, reference(df, keys))


def test_merge_of_nothing_without_keys_is_one_row_of_zero_sums() -> None:
    got = merge_partials(pl.DataFrame(schema=SCHEMA).select(*HOW), [], HOW)
    assert got.rows() == [(0, 0.0, None, None)]


def test_merge_keeps_null_keys_as_their_own_group_last() -> None:
    df = pl.DataFrame({"day": [None, 2, 1, None, 2], "n": [1, 2, 3, 4, 5]}, schema={"day": pl.Int64, "n": pl.Int64})
    assert merge_partials(df, ["day"], {"n": "sum"}).rows() == [(1, 3), (2, 7), (None, 5)]


# -- end to end: splitting the rows into files does not change any metric ---------------------------------

METRICS = ["count", "r2", "mse", "mae", "corr", "hit_rate", "bias", "rmse"]
PAIRS = ["pred_10s:target_10s", "pred_1s:target_1s"]
EXACT = {"count", "n_excluded"}


@pytest.fixture(scope="module")
def rows() -> pa.Table:
    """Three days across the 2026-03-08 DST switch, 90 rows each, some NULL predictions."""
    rng = np.random.default_rng(21)
    t = pa.concat_tables([one_day(d, 90, rng, symbols=6) for d in trading_days(dt.date(2026, 3, 6), 3)])
    pred = t["pred_10s"].to_numpy()
    valid = rng.random(t.num_rows) > 0.05
    t = t.set_column(t.schema.get_field_index("pred_10s"), "pred_10s", pa.array(pred, mask=~valid))
    return t


def run(folder: Path, batch_size: int = 1) -> dict[str, pl.DataFrame]:
    with Harness(folder, batch_size=batch_size) as h:
        h.add_experiment("liquid", "volume > 1000")
        h.add_experiment("busy", "symbol IN (SELECT symbol FROM baseline WHERE volume > 4500)")  # not inlinable
        return {"pooled": h.metrics(METRICS, pairs=PAIRS),
                "by_day": h.metrics(METRICS, pairs=PAIRS, by="day")}


@pytest.fixture(scope="module")
def one_file(rows: pa.Table, tmp_path_factory: pytest.TempPathFactory) -> dict[str, pl.DataFrame]:
    folder = tmp_path_factory.mktemp("one")
    write_dataset(folder, {"all": rows}, SESSION)
    return run(folder)


def assert_frames_match(got: pl.DataFrame, want: pl.DataFrame) -> None:
    labels = [c for c in want.columns if c != "value"]
    assert got.columns == want.columns
    assert got.select(labels).rows() == want.select(labels).rows()
    for r, g, w in zip(want.iter_rows(named=True), got["value"].to_list(), want["value"].to_list(), strict=True):
        if w is None or g is None:
            assert g is None and w is None, r
        elif r["metric"] in EXACT:
            assert g == w, r
        else:
            assert g == pytest.approx(w, rel=1e-9, abs=1e-12), r


def test_reference_run_is_not_degenerate(one_file: dict[str, pl.DataFrame]) -> None:
    pooled = one_file["pooled"]
    excluded = pooled.filter((pl.col("metric") == "n_excluded") & (pl.col("pred") == "pred_10s"))
    assert excluded["value"].min() > 0  # the NULL predictions are there
    assert set(one_file["by_day"]["day"].to_list()) == {dt.date(2026, 3, 6), dt.date(2026, 3, 9),
                                                         dt.date(2026, 3, 10)}
    assert pooled["value"].null_count() == 0


@settings(max_examples=12, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_metrics_do_not_depend_on_how_rows_are_split_into_files(
        data: st.DataObject, rows: pa.Table, one_file: dict[str, pl.DataFrame]) -> None:
    n = rows.num_rows
    shuffle = data.draw(st.booleans(), label="shuffle")
    order = data.draw(st.permutations(list(range(n))), label="order") if shuffle else list(range(n))
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=5), label="cuts"))
    batch_size = data.draw(st.integers(1, 3), label="batch_size")
    table = rows.take(pa.array(order))
    bounds = [0, *cuts, n]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_dataset(folder, {}, SESSION)
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            pq.write_table(table.slice(a, b - a), folder / f"part{i:03d}.parquet")  # may be empty
        got = run(folder, batch_size=batch_size)
    assert_frames_match(got["pooled"], one_file["pooled"])
    assert_frames_match(got["by_day"], one_file["by_day"])
