"""Experiments: condition and SELECT steps, chains, the SQL they render, errors, and files of them."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from conftest import SESSION, read_all, write_dataset

from duckharness import (
    DuplicateExperimentError,
    ExperimentCycleError,
    ExperimentError,
    ExperimentSQLError,
    Harness,
    UnknownColumnError,
    UnknownExperimentError,
)
from duckharness.demo import one_day, trading_days
from duckharness.experiments.steps import parse_experiments_file

EASTERN = zoneinfo.ZoneInfo("America/New_York")
PAIR = "pred_10s:target_10s"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four days x 1500 rows (2026-03-04..09, across the DST switch), 09:30-16:00 US/Eastern window."""
    rng = np.random.default_rng(7)
    folder = tmp_path_factory.mktemp("exp") / "bt"
    tables = {d.isoformat(): one_day(d, 1500, rng, symbols=10) for d in trading_days(dt.date(2026, 3, 4), 4)}
    write_dataset(folder, tables, SESSION)
    return folder


@pytest.fixture(scope="module")
def cols(data: Path) -> dict[str, np.ndarray]:
    """Every column as numpy, plus ``in_window``: the session window computed row by row in Python."""
    t: pa.Table = read_all(data)
    out = {name: t[name].to_numpy(zero_copy_only=False) for name in t.column_names if name != "ts"}
    local = [x.astimezone(EASTERN).time() for x in t["ts"].to_pylist()]
    out["in_window"] = np.array([dt.time(9, 30) <= x <= dt.time(16) for x in local])
    return out


@pytest.fixture
def h(data: Path) -> Harness:
    with Harness(data) as harness:
        yield harness


def count_of(h: Harness, name: str, pair: str = PAIR) -> float:
    df = h.metrics(["count"], pairs=[pair], experiments=[name])
    return df.filter(df["metric"] == "count")["value"][0]


def metric_of(h: Harness, name: str, metric: str, pair: str = PAIR) -> float:
    df = h.metrics([metric], pairs=[pair], experiments=[name])
    return df.filter(df["metric"] == metric)["value"][0]


# -- steps and chains ------------------------------------------------------------------------------

def test_condition_step_filters_baseline_rows(h: Harness, cols: dict[str, np.ndarray]) -> None:
    h.add_experiment("liquid", "volume > 1000")
    expected = np.sum(cols["in_window"] & (cols["volume"] > 1000))
    assert count_of(h, "liquid") == expected
    assert count_of(h, "baseline") == np.sum(cols["in_window"])
    assert 0 < expected < np.sum(cols["in_window"])


def test_select_step_filters_rows_like_the_equivalent_condition(h: Harness, cols: dict[str, np.ndarray]) -> None:
    h.add_experiment("tight", "SELECT * FROM baseline WHERE spread < 0.02")
    assert h.experiments.step("tight").base == "baseline"
    assert count_of(h, "tight") == np.sum(cols["in_window"] & (cols["spread"] < 0.02))


def test_chained_steps_apply_every_condition(h: Harness, cols: dict[str, np.ndarray]) -> None:
    h.add_experiment("liquid", "volume > 1000")
    h.add_experiment("tight", "SELECT * FROM liquid WHERE spread < 0.02")
    h.add_experiment("up", "pred_10s > 0", base="tight")
    mask = cols["in_window"] & (cols["volume"] > 1000) & (cols["spread"] < 0.02) & (cols["pred_10s"] > 0)
    assert count_of(h, "up") == np.sum(mask)
    p, t = cols["pred_10s"][mask], cols["target_10s"][mask]
    assert metric_of(h, "up", "mse") == pytest.approx(np.mean((p - t) ** 2), rel=1e-10)
    assert [s.name for s in h.experiments.chain("up")] == ["liquid", "tight", "up"]
    assert h.experiments.names == ["baseline", "liquid", "tight", "up"]


def test_experiment_sql_shows_the_whole_chain_and_runs_in_plain_duckdb(
        h: Harness, data: Path, cols: dict[str, np.ndarray]) -> None:
    h.add_experiment("liquid", "volume > 1000")
    h.add_experiment("tight", "SELECT * FROM liquid WHERE spread < 0.02")
    sql = h.experiment_sql("tight")
    # Every link of the chain, in order, from the Parquet files up.
    positions = [sql.upper().index("READ_PARQUET"), sql.index("liquid AS ("), sql.index("tight AS (")]
    assert positions == sorted(positions)
    for f in sorted(data.glob("*.parquet")):
        assert str(f) in sql
    assert "volume > 1000" in sql and "spread < 0.02" in sql
    rows = duckdb.connect().execute(sql).fetchall()
    expected = np.sum(cols["in_window"] & (cols["volume"] > 1000) & (cols["spread"] < 0.02))
    assert len(rows) == expected
    assert len(rows[0]) == len(h.columns)


def test_baseline_sql_applies_the_session_window(h: Harness, cols: dict[str, np.ndarray]) -> None:
    rows = duckdb.connect().execute(h.experiment_sql("baseline")).fetchall()
    assert len(rows) == np.sum(cols["in_window"])
    no_window = duckdb.connect().execute(h.experiment_sql("baseline", window=False)).fetchall()
    assert len(no_window) == len(cols["volume"])


def test_relation_gives_the_rows_of_an_experiment(h: Harness, cols: dict[str, np.ndarray]) -> None:
    h.add_experiment("liquid", "volume > 1000")
    got = h.relation("liquid").aggregate("count(*) AS n, sum(volume) AS v").fetchall()[0]
    mask = cols["in_window"] & (cols["volume"] > 1000)
    assert got == (np.sum(mask), np.sum(cols["volume"][mask]))


def test_column_changing_select_then_a_step_on_the_new_column(h: Harness, cols: dict[str, np.ndarray]) -> None:
    h.add_experiment("scaled", "SELECT *, pred_10s * 2 AS pred_2x, volume * spread AS notional FROM baseline")
    h.add_experiment("big", "notional > 20", base="scaled")
    assert h.experiments.columns("scaled")["pred_2x"] == "DOUBLE"
    assert "notional" in h.experiments.columns("big")
    mask = cols["in_window"] & (cols["volume"] * cols["spread"] > 20)
    assert 0 < np.sum(mask) < np.sum(cols["in_window"])
    assert count_of(h, "big", "pred_2x:target_10s") == np.sum(mask)
    p, t = 2 * cols["pred_10s"][mask], cols["target_10s"][mask]
    assert metric_of(h, "big", "mae", "pred_2x:target_10s") == pytest.approx(np.mean(np.abs(p - t)), rel=1e-10)
    rows = duckdb.connect().execute(h.experiment_sql("big")).fetchall()
    assert len(rows) == np.sum(mask)


def test_select_replace_changes_the_column_metrics_see(h: Harness, cols: dict[str, np.ndarray]) -> None:
    h.add_experiment("clipped", "SELECT * REPLACE (greatest(least(pred_10s, 0.1), -0.1) AS pred_10s) FROM baseline")
    m = cols["in_window"]
    p, t = np.clip(cols["pred_10s"][m], -0.1, 0.1), cols["target_10s"][m]
    assert metric_of(h, "clipped", "mse") == pytest.approx(np.mean((p - t) ** 2), rel=1e-10)


def test_step_that_is_not_row_by_row_still_gives_its_rows(h: Harness, cols: dict[str, np.ndarray]) -> None:
    # A subquery cannot be inlined; the experiment then runs as a whole query.
    h.add_experiment("busy_symbols", "symbol IN (SELECT symbol FROM baseline GROUP BY symbol HAVING sum(volume) > 0)")
    h.add_experiment("busy_liquid", "volume > 2500", base="busy_symbols")
    assert h.experiments.inline("busy_symbols") is None
    assert count_of(h, "busy_liquid") == np.sum(cols["in_window"] & (cols["volume"] > 2500))


def test_removing_a_step_that_others_use_is_refused(h: Harness) -> None:
    h.add_experiment("liquid", "volume > 1000")
    h.add_experiment("tight", "spread < 0.02", base="liquid")
    with pytest.raises(ExperimentError, match=r"'liquid' is the base of tight"):
        h.remove_experiment("liquid")
    h.remove_experiment("tight")
    h.remove_experiment("liquid")
    assert h.experiments.names == ["baseline"]
    h.add_experiment("liquid", "volume > 3000")  # the name is free again
    assert h.experiments.step("liquid").sql == "volume > 3000"


def test_replacing_a_step_reruns_what_is_built_on_it(h: Harness, cols: dict[str, np.ndarray]) -> None:
    """A notebook cell run again with another threshold: before, only remove-then-add (with no
    public remove) could change a step."""
    h.add_experiment("liquid", "volume > 1000")
    h.add_experiment("tight", "SELECT * FROM liquid WHERE spread < 0.02")
    h.add_experiment("other", "volume < 10")
    h.add_experiment("liquid", "SELECT * FROM other WHERE spread < 0.03", replace=True)  # reads a later step
    w, vol, spread = cols["in_window"], cols["volume"], cols["spread"]
    assert count_of(h, "liquid") == np.sum(w & (vol < 10) & (spread < 0.03))
    assert count_of(h, "tight") == np.sum(w & (vol < 10) & (spread < 0.02))
    names = h.experiments.names
    assert names.index("other") < names.index("liquid") < names.index("tight")  # each after what it reads


def test_a_replacement_that_breaks_a_step_built_on_it_changes_nothing(h: Harness,
                                                                      cols: dict[str, np.ndarray]) -> None:
    h.add_experiment("wide", "SELECT *, volume * 2 AS vol2 FROM baseline")
    h.add_experiment("big", "vol2 > 4000", base="wide")
    with pytest.raises(UnknownColumnError, match=r"'big' reads column 'vol2'"):
        h.add_experiment("wide", "volume > 1", replace=True)
    assert h.experiments.step("wide").sql == "SELECT *, volume * 2 AS vol2 FROM baseline"
    assert count_of(h, "big") == np.sum(cols["in_window"] & (cols["volume"] * 2 > 4000))
    with pytest.raises(ExperimentCycleError, match=r"'wide' reads from big, which is built on 'wide'"):
        h.add_experiment("wide", "SELECT * FROM big", replace=True)
    assert count_of(h, "big") == np.sum(cols["in_window"] & (cols["volume"] * 2 > 4000))


# -- errors ------------------------------------------------------------------------------------------

def test_unknown_column_error_names_experiment_and_column(h: Harness) -> None:
    with pytest.raises(UnknownColumnError, match=r"Experiment 'bad' reads column 'volumne'") as info:
        h.add_experiment("bad", "volumne > 1000")
    assert info.value.column == "volumne"
    assert info.value.experiment == "bad"
    assert "volume" in str(info.value)  # lists the columns that exist
    assert "bad" not in h.experiments


def test_unknown_column_in_a_select_names_its_base(h: Harness) -> None:
    h.add_experiment("narrow", "SELECT ts, pred_10s, target_10s FROM baseline")
    with pytest.raises(UnknownColumnError, match=r"'volume', which 'narrow' does not have") as info:
        h.add_experiment("after", "SELECT * FROM narrow WHERE volume > 10")
    assert (info.value.column, info.value.experiment) == ("volume", "after")


def test_unknown_qualified_column_is_unknown_column_error(h: Harness) -> None:
    with pytest.raises(UnknownColumnError, match="volumne") as info:
        h.add_experiment("qualified", "SELECT * FROM baseline WHERE baseline.volumne > 1000")
    assert (info.value.column, info.value.experiment) == ("volumne", "qualified")


def test_unknown_base_argument_is_unknown_experiment_error(h: Harness) -> None:
    with pytest.raises(UnknownExperimentError, match=r"Experiment 'x' reads from 'nope'") as info:
        h.add_experiment("x", "volume > 1", base="nope")
    assert info.value.experiment == "nope"
    assert "x" not in h.experiments


def test_unknown_table_in_select_is_unknown_experiment_error(h: Harness) -> None:
    with pytest.raises(UnknownExperimentError, match=r"'y' reads from 'liquidd'"):
        h.add_experiment("y", "SELECT * FROM liquidd WHERE volume > 1")


def test_asking_for_an_unknown_experiment_names_it(h: Harness) -> None:
    with pytest.raises(UnknownExperimentError, match=r"Unknown experiment 'ghost'. Defined: baseline"):
        h.metrics(["count"], pairs=[PAIR], experiments=["ghost"])
    with pytest.raises(UnknownExperimentError, match="ghost"):
        h.experiment_sql("ghost")


def test_duplicate_name_is_refused(h: Harness) -> None:
    h.add_experiment("liquid", "volume > 1000")
    with pytest.raises(DuplicateExperimentError, match=r"'liquid' already exists. Use replace=True") as info:
        h.add_experiment("liquid", "volume > 2000")
    assert info.value.experiment == "liquid"
    assert h.experiments.step("liquid").sql == "volume > 1000"


def test_baseline_is_a_reserved_name(h: Harness) -> None:
    with pytest.raises(DuplicateExperimentError, match="baseline"):
        h.add_experiment("baseline", "volume > 1")


@pytest.mark.parametrize(("sql", "why"), [
    ("volume >", "does not parse"),
    ("SELECT * FROM baseline WHERE (volume > 1", "does not parse"),
    ("SELECT * FROM baseline; SELECT * FROM baseline", "does not parse"),
    ("SELECT * FROM baseline; -- the next one too\nSELECT * FROM baseline", "expected one SQL statement, found 2"),
    ("DROP TABLE baseline", "WHERE condition or a SELECT"),
    ("SELECT 1 AS x", "must read FROM its base"),
    ("   ", "has no SQL"),
    ("-- to do: a liquidity filter\n;", "has no SQL"),
    # Unclosed quotes and comments (a raw sqlglot TokenError before, not a DuckHarnessError):
    ("symbol = 'A", r"a quote .* is not closed .*, in: symbol = '"),
    ("SELECT * FROM baseline WHERE symbol = 'A;", r"is not closed"),
    ("SELECT * FROM baseline /* keep liquid", r"a /\* comment is not closed"),
])
def test_sql_that_is_not_a_step_is_experiment_sql_error(h: Harness, sql: str, why: str) -> None:
    with pytest.raises(ExperimentSQLError, match=why) as info:
        h.add_experiment("broken", sql)
    assert "'broken'" in str(info.value)
    assert info.value.experiment == "broken"
    assert "broken" not in h.experiments


def test_incomplete_condition_error_says_where_without_parser_internals(h: Harness) -> None:
    expected = r"'half'.*incomplete expression.*column \d+, after 'volume >>'"
    with pytest.raises(ExperimentSQLError, match=expected) as info:
        h.add_experiment("half", "volume >> ")
    assert "<class" not in str(info.value) and "sqlglot" not in str(info.value)


@pytest.mark.parametrize("sql", [
    "SELECT * FROM baseline WHERE volume > 1000;   -- trailing note",
    "SELECT * FROM baseline WHERE volume > 1000;\n-- a comment line after it\n",
    "SELECT * FROM baseline WHERE volume > 1000; /* a block\n comment */",
    "SELECT * FROM baseline WHERE volume > 1000;;",
    "volume > 1000; -- a condition with a note",
], ids=["line_comment", "comment_line", "block_comment", "extra_semicolon", "condition"])
def test_comments_and_semicolons_after_a_step_are_ignored(h: Harness, cols: dict[str, np.ndarray], sql: str) -> None:
    h.add_experiment("liquid", sql)
    assert count_of(h, "liquid") == np.sum(cols["in_window"] & (cols["volume"] > 1000))


def test_comment_markers_inside_strings_and_quoted_identifiers_are_sql(
        h: Harness, cols: dict[str, np.ndarray]) -> None:
    h.add_experiment("noted", "SELECT *, 'it''s -- not a comment' AS \"note /* kept */\" FROM baseline\n"
                              "WHERE volume > 1000 AND symbol <> 'x /* y'; -- a real comment, it's ignored")
    rel = h.relation("noted")
    assert "note /* kept */" in rel.columns
    notes = rel.select('"note /* kept */"').distinct().fetchall()
    assert notes == [("it's -- not a comment",)]
    assert count_of(h, "noted") == np.sum(cols["in_window"] & (cols["volume"] > 1000))


def test_step_repr_is_one_line_with_name_base_kind_and_sql(h: Harness) -> None:
    step = h.add_experiment("liquid", "-- why\nSELECT *\n  FROM baseline\n  WHERE volume > 1000; -- note")
    assert repr(step) == ("Step(name='liquid', base='baseline', kind='sql', "
                          "sql='SELECT * FROM baseline WHERE volume > 1000;')")
    long = h.add_experiment("wide", "SELECT * FROM baseline WHERE " + " AND ".join(["volume > 1"] * 20))
    assert "\n" not in repr(long) and len(repr(long)) < 160 and repr(long).endswith("...')")


def test_experiment_tree_shows_each_steps_sql_without_its_comments(h: Harness) -> None:
    h.add_experiment("clipped", "-- (clip the predictions: least/greatest skip NULLs)\n"
                                "SELECT * REPLACE (greatest(least(pred_10s, 0.5), -0.5) AS pred_10s)\n"
                                "FROM baseline; -- done")
    assert h.experiment_tree().splitlines() == [
        "baseline",
        "└── clipped  SQL: SELECT * REPLACE (greatest(least(pred_10s, 0.5), -0.5) AS pred_10s) FROM baseline;",
    ]


def test_experiment_tree_names_the_other_experiments_a_step_reads(h: Harness) -> None:
    # Drawn under its base only, a UNION of two experiments showed no sign of the second.
    h.add_experiment("a1", "volume > 100")
    h.add_experiment("a2", "volume < 50")
    h.add_experiment("u", "SELECT * FROM a1 UNION ALL SELECT * FROM a2")
    assert h.experiment_tree().splitlines() == [
        "baseline",
        "├── a1  SQL: volume > 100",
        "│   └── u  (also reads a2)  SQL: SELECT * FROM a1 UNION ALL SELECT * FROM a2",
        "└── a2  SQL: volume < 50",
    ]


def test_sql_duckdb_cannot_bind_is_experiment_sql_error(h: Harness) -> None:
    with pytest.raises(ExperimentSQLError, match=r"'agg'.*aggregate"):
        h.add_experiment("agg", "sum(volume) > 1")


def test_select_from_other_table_than_given_base_is_refused(h: Harness) -> None:
    h.add_experiment("liquid", "volume > 1000")
    with pytest.raises(ExperimentSQLError, match=r"base 'baseline' was given but the SELECT reads from liquid"):
        h.add_experiment("z", "SELECT * FROM liquid", base="baseline")


def test_step_reading_itself_is_a_cycle(h: Harness) -> None:
    with pytest.raises(ExperimentCycleError, match="itself") as info:
        h.add_experiment("loop", "SELECT * FROM loop")
    assert info.value.cycle == ["loop", "loop"]


def test_cycle_in_experiments_file_names_the_cycle(h: Harness, tmp_path: Path) -> None:
    f = tmp_path / "exp.sql"
    f.write_text("-- experiment: ok\nvolume > 1\n"
                 "-- experiment: a\nSELECT * FROM c WHERE volume > 1;\n"
                 "-- experiment: b\nSELECT * FROM a;\n"
                 "-- experiment: c\nSELECT * FROM b;\n")
    with pytest.raises(ExperimentCycleError, match="cycle") as info:
        h.load_experiments(f)
    cycle = info.value.cycle
    assert cycle[0] == cycle[-1]
    assert sorted(cycle[:-1]) == ["a", "b", "c"]
    for name in ("a", "b", "c"):
        assert name in str(info.value)
    assert info.value.experiment == cycle[0]


def test_two_step_cycle_in_file_is_detected_before_anything_is_added(h: Harness, tmp_path: Path) -> None:
    f = tmp_path / "exp.sql"
    f.write_text("-- experiment: a\nSELECT * FROM b\n-- experiment: b\nSELECT * FROM a\n")
    with pytest.raises(ExperimentCycleError) as info:
        h.load_experiments(f)
    cycle = info.value.cycle
    assert len(cycle) == 3 and cycle[0] == cycle[-1] and set(cycle) == {"a", "b"}
    assert h.experiments.names == ["baseline"]


# -- experiments files -------------------------------------------------------------------------------

def test_experiments_file_with_forward_reference(h: Harness, tmp_path: Path, cols: dict[str, np.ndarray]) -> None:
    f = tmp_path / "exp.sql"
    f.write_text("""\
-- comments before the first marker are fine
-- experiment: tight
-- (tight is defined before its base)
SELECT * FROM liquid WHERE spread < 0.02;

-- experiment: liquid
volume > 1000;
--experiment:up
SELECT * FROM tight WHERE pred_10s > 0
""")
    names = h.load_experiments(f)
    assert set(names) == {"tight", "liquid", "up"}
    assert h.experiments.names == ["baseline", "liquid", "tight", "up"]
    assert h.experiments.step("tight").base == "liquid"
    assert h.experiments.step("liquid").base == "baseline"
    mask = cols["in_window"] & (cols["volume"] > 1000) & (cols["spread"] < 0.02)
    assert count_of(h, "tight") == np.sum(mask)
    assert count_of(h, "up") == np.sum(mask & (cols["pred_10s"] > 0))


def test_experiments_file_with_comments_after_and_between_statements(
        h: Harness, tmp_path: Path, cols: dict[str, np.ndarray]) -> None:
    f = tmp_path / "exp.sql"
    f.write_text("""\
-- experiment: liquid
SELECT * FROM baseline WHERE volume > 1000;   -- trailing note
-- a comment line between two experiments
/* and a block
   comment */
-- experiment: tight
SELECT * FROM liquid WHERE spread < 0.02 AND symbol <> 'a -- b'; /* it's tight */
""")
    assert h.load_experiments(f) == ["liquid", "tight"]
    mask = cols["in_window"] & (cols["volume"] > 1000)
    assert count_of(h, "liquid") == np.sum(mask)
    assert count_of(h, "tight") == np.sum(mask & (cols["spread"] < 0.02))


def test_experiments_file_steps_may_build_on_existing_experiments(h: Harness, tmp_path: Path) -> None:
    h.add_experiment("liquid", "volume > 1000")
    f = tmp_path / "exp.sql"
    f.write_text("-- experiment: tight\nSELECT * FROM liquid WHERE spread < 0.02\n")
    assert h.load_experiments(f) == ["tight"]
    assert h.experiments.chain("tight")[0].name == "liquid"


def test_markers_are_case_and_space_insensitive() -> None:
    steps = parse_experiments_file("--   Experiment :  first  \nvolume > 1\n-- EXPERIMENT: second\nspread < 1\n")
    assert [s.name for s in steps] == ["first", "second"]


@pytest.mark.parametrize(("text", "error", "match"), [
    ("volume > 1\n-- experiment: a\nvolume > 2\n", ExperimentSQLError, "SQL before the first"),
    ("-- just a comment\n", ExperimentSQLError, "no '-- experiment: NAME' lines"),
    ("-- experiment: a\nvolume > 1\n-- experiment: a\nvolume > 2\n", DuplicateExperimentError, "'a' is defined twice"),
    ("-- experiment: a\nvolume > 1\n-- experiment: A\nvolume > 2\n", DuplicateExperimentError,
     r"exp\.sql: experiment 'A' is defined twice \(as 'a': names are case-insensitive\)"),
    ("-- experiment: a\nSELECT * FROM nowhere\n", UnknownExperimentError, "'a' reads from 'nowhere'"),
    ("-- experiment: a\n\n-- experiment: b\nvolume > 1\n", ExperimentSQLError, "'a' has no SQL"),
])
def test_bad_experiments_file_errors(h: Harness, tmp_path: Path, text: str, error: type[Exception],
                                     match: str) -> None:
    f = tmp_path / "exp.sql"
    f.write_text(text)
    with pytest.raises(error, match=match):
        h.load_experiments(f)


def test_missing_experiments_file_is_an_input_error(h: Harness, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Cannot read experiments file"):
        h.load_experiments(tmp_path / "missing.sql")


def test_unknown_column_in_file_names_the_step(h: Harness, tmp_path: Path) -> None:
    f = tmp_path / "exp.sql"
    f.write_text("-- experiment: liquid\nvolume > 1000\n-- experiment: oops\nSELECT * FROM liquid WHERE sprd < 1\n")
    with pytest.raises(UnknownColumnError, match="'oops'") as info:
        h.load_experiments(f)
    assert info.value.column == "sprd"


# -- quoting -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["my liquid", "o'brien", "liquid -- not a comment", "Δ spread"])
def test_experiment_names_that_need_quoting(h: Harness, cols: dict[str, np.ndarray], name: str) -> None:
    h.add_experiment(name, "volume > 1000")
    quoted = '"' + name + '"'
    h.add_experiment("child", f"SELECT * FROM {quoted} WHERE spread < 0.02")
    assert h.experiments.step("child").base == name
    mask = cols["in_window"] & (cols["volume"] > 1000)
    assert count_of(h, name) == np.sum(mask)
    df = h.metrics(["count"], pairs=[PAIR], experiments=[name, "child"])
    assert df["experiment"].unique(maintain_order=True).to_list() == [name, "child"]
    sql = h.experiment_sql("child")
    assert quoted in sql
    assert len(duckdb.connect().execute(sql).fetchall()) == np.sum(mask & (cols["spread"] < 0.02))


def test_quoted_names_in_an_experiments_file(h: Harness, tmp_path: Path, cols: dict[str, np.ndarray]) -> None:
    f = tmp_path / "exp.sql"
    f.write_text("-- experiment: it's tight\nSELECT * FROM \"my liquid\" WHERE spread < 0.02\n"
                 "-- experiment: my liquid\nvolume > 1000\n")
    h.load_experiments(f)
    mask = cols["in_window"] & (cols["volume"] > 1000) & (cols["spread"] < 0.02)
    assert count_of(h, "it's tight") == np.sum(mask)


def test_double_quote_in_a_name_is_refused_cleanly(h: Harness) -> None:
    with pytest.raises(ExperimentSQLError, match="not valid") as info:
        h.add_experiment('say "hi"', "volume > 1")
    assert info.value.experiment == 'say "hi"'


def test_names_differing_only_in_case_do_not_clobber_each_other(h: Harness) -> None:
    # DuckDB identifiers are case-insensitive: 'Liquid' and 'liquid' are the same view to it.
    h.add_experiment("liquid", "SELECT *, 1 AS extra FROM baseline WHERE volume > 1000")
    try:
        h.add_experiment("Liquid", "volume > 4000")
    except DuplicateExperimentError:
        return  # refusing the second name is a fine answer
    # Otherwise both must stay usable: a step on 'liquid' still sees its 'extra' column.
    h.add_experiment("uses_extra", "extra = 1", base="liquid")
    assert count_of(h, "uses_extra") == count_of(h, "liquid")


def test_an_experiment_read_in_another_case_is_that_experiment(
        h: Harness, cols: dict[str, np.ndarray], tmp_path: Path) -> None:
    # As in DuckDB (and the exported views), FROM LIQUID reads liquid; it was "not an experiment".
    (tmp_path / "exp.sql").write_text(
        "-- experiment: liquid\nSELECT * FROM BASELINE WHERE volume > 1000;\n"
        "-- experiment: tight\nSELECT * FROM LIQUID WHERE spread < 0.02;\n")
    h.load_experiments(tmp_path / "exp.sql")
    h.add_experiment("narrow", "spread < 0.015", base="Liquid")
    h.add_experiment("same", lambda lf: lf, base="TIGHT")
    liquid = cols["in_window"] & (cols["volume"] > 1000)
    assert count_of(h, "tight") == np.sum(liquid & (cols["spread"] < 0.02))
    assert count_of(h, "narrow") == np.sum(liquid & (cols["spread"] < 0.015))
    assert count_of(h, "same") == count_of(h, "tight")
    assert [s.name for s in h.experiments.chain("same")] == ["liquid", "tight", "same"]
    assert h.experiments.step("narrow").base == "liquid"


def test_a_long_chain_with_python_steps_is_built_as_a_few_views_and_gives_the_references_rows(
        h: Harness, cols: dict[str, np.ndarray], data: Path) -> None:
    """A view per step made DuckDB bind the whole stack again for each view (N²: seconds per file
    for 100 steps); the SQL steps between Python steps now go into the views that are read,
    as CTEs, including steps read by a later step other than through its base."""
    import re

    import polars as pl

    h.add_experiment("a", "volume > 100")
    prev = "a"
    for i in range(1, 41):
        h.add_experiment(f"s{i}", f"SELECT * REPLACE (pred_10s + 0.001 AS pred_10s) FROM {prev}")
        prev = f"s{i}"
    h.add_experiment("d", "SELECT * FROM s40 WHERE volume IN (SELECT volume FROM a WHERE volume > 2000)")
    h.add_experiment("p", lambda lf: lf.with_columns(pl.col("pred_10s") * 2), base="d")
    h.add_experiment("e", "SELECT * FROM p WHERE volume IN (SELECT volume FROM s20 WHERE volume > 3000)")
    lines: list[str] = []
    with h.trace(lines.append):
        got = h.lazyframe("e").collect().sort("ts")
    views = [m.group(1) for line in lines if (m := re.match(r"CREATE OR REPLACE TEMPORARY VIEW (\w+)", line))]
    assert views == ["baseline", "s20", "d", "e"]  # was 44 views
    assert any("AS NOT MATERIALIZED" in line for line in lines)
    # Reference: the same additions one by one in float64, then the Python step's doubling.
    t = read_all(data).to_pandas()
    keep = cols["in_window"] & (cols["volume"] > 3000)
    pred = cols["pred_10s"][keep].astype(np.float64)
    for _ in range(40):
        pred = pred + 0.001
    want = pd.DataFrame({"ts": t["ts"][keep], "pred_10s": pred * 2}).sort_values("ts")
    assert got.height == keep.sum() > 0
    np.testing.assert_array_equal(got["pred_10s"].to_numpy(), want["pred_10s"].to_numpy())
    assert count_of(h, "d") == np.sum(cols["in_window"] & (cols["volume"] > 2000))


# -- a check of the helper itself --------------------------------------------------------------------

def test_window_reference_is_not_trivial(cols: dict[str, np.ndarray]) -> None:
    inside = np.sum(cols["in_window"])
    assert 0.6 * len(cols["volume"]) < inside < 0.8 * len(cols["volume"])  # 6.5 of 9 hours


def test_grouping_by_a_column_an_experiment_computes_counts_its_own_groups(
        h: Harness, cols: dict[str, np.ndarray]) -> None:
    """Before: refused ("'big': it is a column of experiment 'flagged', not of the source")."""
    h.add_experiment("flagged", "SELECT *, volume > 1000 AS big FROM baseline")
    df = h.metrics(["count"], pairs="pred_10s:target_10s", by="big", experiments=["flagged"])
    got = {r["big"]: r["value"] for r in df.filter(metric="count").iter_rows(named=True)}
    w, big = cols["in_window"], cols["volume"] > 1000
    assert got == {True: float((w & big).sum()), False: float((w & ~big).sum())}


def test_default_pairs_leave_out_a_pair_an_experiment_drops_with_a_warning(
        h: Harness, cols: dict[str, np.ndarray]) -> None:
    """Before, the default pairs failed the whole run: "Experiment 'slim' has no column 'pred_60s'"."""
    from duckharness.errors import DuckHarnessWarning

    h.add_experiment("slim", "SELECT * EXCLUDE (pred_60s, target_60s) FROM baseline WHERE volume > 1000")
    with pytest.warns(DuckHarnessWarning, match=r"Pair pred_60s:target_60s is left out .* 'slim' has no column "
                                                r"'pred_60s'") as caught:
        df = h.metrics(["count"], experiments=["baseline", "slim"])
    assert {w.filename for w in caught} == {__file__}
    got = {(r["experiment"], r["pred"]): r["value"] for r in df.filter(metric="count").iter_rows(named=True)}
    w, liquid = cols["in_window"], cols["volume"] > 1000
    assert got == {("baseline", "pred_1s"): w.sum(), ("baseline", "pred_10s"): w.sum(),
                   ("slim", "pred_1s"): (w & liquid).sum(), ("slim", "pred_10s"): (w & liquid).sum()}
    with pytest.raises(UnknownColumnError, match="'slim' has no column 'pred_60s'"):  # named: still an error
        h.metrics(["count"], pairs=["pred_60s"], experiments=["slim"])
