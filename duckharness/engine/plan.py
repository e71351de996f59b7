"""The scan plan: one aggregate query per file batch that answers every experiment, pair and
metric of a call.

Filter experiments become boolean *cell keys* of a GROUP BY (each experiment is a union of cells,
which is far cheaper than one FILTER clause per aggregate); the validity of each pred/target pair
(finite: not NULL, NaN or ±inf) is a key as well, so invalid rows drop out of that pair's statistics and are
counted. Every metric's stats are bound to each experiment's pred/target expressions, and
identical aggregates are computed once. The session window becomes per-day UTC bounds on the
time column, and the day label is a constant for a file that holds one day.
"""

from __future__ import annotations

import collections
import datetime as dt
import functools
import zoneinfo
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlglot import exp

from duckharness import sqlbuild as sb
from duckharness.data.metadata import SessionWindow, day_bounds
from duckharness.data.source import AWARE_TIMESTAMP_TYPES, Dataset, FileInfo
from duckharness.errors import InputError, UnknownColumnError
from duckharness.experiments.steps import Experiments, Inlined
from duckharness.metrics.library import Metric

DAY = "__day"
TOD = "tod"  # the output column of a ``by="tod:30min"`` grouping
_SLOT_DAY, _SLOT_FROM, _SLOT_WHERE = "__dh_slot_day__", "__dh_slot_from__", "__dh_slot_where__"
_SLOT_PART = "__dh_slot_part__"
ROWS = "__rows"
PART = "__part"  # the group key of a file's parts
ROW_NUMBER = "file_row_number"  # DuckDB's row number within a Parquet file (parts of a file)
# A one-file batch is computed in parts of whole row groups of about this many rows (computed in
# parallel, merged in a fixed order): one new day of an incremental run uses every worker.
PART_ROWS = 500_000
Part = tuple[int, int | None]


@dataclass(frozen=True)
class Pair:
    """A prediction column and the target it is scored against."""

    pred: str
    target: str

    @classmethod
    def parse(cls, text: str | tuple[str, str] | Pair) -> Pair:
        """``"pred_10s:target_10s"`` or a tuple; ``"pred_10s"`` alone pairs with ``target_10s``."""
        if isinstance(text, Pair):
            return text
        if isinstance(text, tuple):
            return cls(*text)
        if ":" in text:
            p, t = (x.strip() for x in text.split(":", 1))
            if not p or not t or ":" in t:
                raise InputError(f"Pair {text!r} must be written PRED:TARGET, e.g. pred_10s:target_10s.")
            return cls(p, t)
        if text.startswith("pred_"):
            return cls(text, "target_" + text[len("pred_") :])
        raise InputError(
            f"Pair {text!r} must be written PRED:TARGET (e.g. pred_10s:target_10s), or be a column named "
            f"pred_X, which pairs with target_X."
        )


@dataclass
class Target:
    """One (experiment, pair): the keys that select its cells and where each metric's stats are.

    ``checks`` are the sums of the shifted pred and target, ``inputs`` the source columns their
    expressions read, and ``fast`` whether those expressions can only be NULL or non-finite when an
    input is: then a batch whose inputs hold no NULL (per the footers) and whose check sums come
    out finite has no invalid row, and its query can skip the validity key.
    """

    experiment: str
    pair: Pair
    conds: tuple[str, ...]
    valid: str
    stats: dict[str, dict[str, str]] = field(default_factory=dict)  # metric -> stat -> column
    checks: tuple[str, ...] = ()
    inputs: frozenset[str] = frozenset()
    fast: bool = False
    roles: tuple[str, str] = ("", "")  # the SQL of its pred and target expressions
    shifts: tuple[float, float] = (0.0, 0.0)  # their shifts (where a ShiftTable has none)


# Functions that give NULL only for a NULL input and a non-finite value only for a non-finite
# input or an overflow (which the check sums catch).
_NULL_PRESERVING = (
    exp.Column,
    exp.Identifier,
    exp.Literal,
    exp.Paren,
    exp.Add,
    exp.Sub,
    exp.Mul,
    exp.Neg,
    exp.Abs,
    exp.Greatest,
    exp.Least,
    exp.Cast,
    exp.DataType,
    exp.Sign,
    exp.Round,
)


def null_preserving(node: exp.Expr) -> bool:
    # Exact types: subclasses such as TRY_CAST (a Cast) can turn a value into NULL.
    return all(type(n) in _NULL_PRESERVING for n in node.walk())


def _numeric(type_sql: str) -> bool:
    t = type_sql.upper()
    return (
        t in ("BOOLEAN", "FLOAT", "DOUBLE", "REAL", '"NULL"')  # "NULL": a column with no values (all missing)
        or t.startswith("DECIMAL")
        or t.endswith("INT")
        or t
        in (
            "TINYINT",
            "SMALLINT",
            "INTEGER",
            "BIGINT",
            "HUGEINT",
            "UTINYINT",
            "USMALLINT",
            "UINTEGER",
            "UBIGINT",
            "UHUGEINT",
        )
    )


def _as_double(node: exp.Expr, type_sql: str) -> exp.Expr:
    return node if type_sql.upper() == "DOUBLE" else sb.cast(node, "DOUBLE")


def default_pairs(columns: Mapping[str, str]) -> list[Pair]:
    """Every ``pred_X`` with a matching ``target_X``."""
    return [Pair(c, "target_" + c[5:]) for c in columns if c.startswith("pred_") and "target_" + c[5:] in columns]


def round_shift(value: float | None) -> float:
    """``value`` to 8 significant digits: close enough to the data's centre that sums of squares
    keep their precision (the offset left is far below one standard deviation for any data whose
    spread is above 1e-8 of its level), short enough to read in the SQL."""
    if value is None or value != value or value in (float("inf"), float("-inf")):
        return 0.0
    return float(f"{value:.8g}")


SHIFT_ROWS, SHIFT_TABLE = "__dh_rows", "__dh_shift"


def shift_role(experiment: str, expression: str) -> str:
    """The name of a :class:`ShiftTable` role: one expression (its SQL) in one experiment (whose
    rows may lie elsewhere than another experiment's rows of the same expression)."""
    return f"{experiment}\x00{expression}"


@dataclass(frozen=True)
class ShiftTable:
    """Shifts of the pred/target expressions of some groups, for a pass over data whose groups lie
    far from the run's shift (say, symbols at very different price levels): each such group's
    sums of squares are taken around its own mean, so they keep their precision.

    ``keys`` are the group keys (``__day``, ``tod`` or columns) with their SQL types, ``roles``
    the expressions that have a shift here (per experiment: :func:`shift_role`), and each row is a
    group's key values and its shift of each role (None: the run's shift). The table joins the
    batch's rows on the keys, so a pass with it sees only the rows of its groups.
    """

    keys: tuple[str, ...]
    key_types: tuple[str, ...]
    roles: tuple[str, ...]
    rows: tuple[tuple[tuple[Any, ...], tuple[float | None, ...]], ...]

    def column(self, role: str) -> exp.Expr | None:
        """The shift column of ``role`` in the joined rows (None if it has no shift here)."""
        return sb.column(f"{SHIFT_TABLE}_{self.roles.index(role)}") if role in self.roles else None

    def join(self, relation: exp.Expr, key_exprs: Sequence[exp.Expr]) -> exp.Expr:
        """``(SELECT r.*, shift columns FROM relation r JOIN (VALUES ...) ON keys) AS rows``."""
        names = [f"{SHIFT_TABLE}_k{i}" for i in range(len(self.keys))]
        shift_names = [f"{SHIFT_TABLE}_{i}" for i in range(len(self.roles))]
        values = exp.Values(
            expressions=[
                exp.Tuple(
                    expressions=[_literal(v, t) for v, t in zip(key, self.key_types, strict=True)]
                    + [_literal(x, "DOUBLE") for x in shifts]
                )
                for key, shifts in self.rows
            ],
            alias=exp.TableAlias(this=sb.ident(SHIFT_TABLE), columns=[sb.ident(c) for c in names + shift_names]),
        )
        on = sb.and_all(
            exp.NullSafeEQ(this=e.copy(), expression=sb.column(n, SHIFT_TABLE))
            for e, n in zip(key_exprs, names, strict=True)
        )
        inner = (
            exp.select(
                exp.Column(this=exp.Star(), table=sb.ident(SHIFT_ROWS)),
                *[sb.column(c, SHIFT_TABLE) for c in shift_names],
            )
            .from_(_aliased(relation, SHIFT_ROWS))
            .join(values, on=on if on is not None else exp.true(), join_type="INNER")
        )
        return inner.subquery(SHIFT_ROWS)

    def may_hold(self, files: Sequence[FileInfo], tz: str, window: SessionWindow | None) -> bool:
        """Whether a batch can hold rows of the table's groups (by its files' days, when the
        groups are days)."""
        if DAY not in self.keys:
            return True
        at = self.keys.index(DAY)
        days = {key[at] for key, _ in self.rows}
        return any(f.time_min is None or days.intersection(file_days(f, tz, window)) for f in files)


def _aliased(relation: exp.Expr, name: str) -> exp.Expr:
    """``relation AS name`` in a FROM clause (a table, a table function or a query)."""
    alias = exp.TableAlias(this=sb.ident(name))
    if isinstance(relation, exp.Select | exp.Union):
        return relation.subquery(name)
    if isinstance(relation, exp.Table | exp.Subquery):
        out = relation.copy()
        out.set("alias", alias)
        return out
    return exp.Table(this=relation.copy(), alias=alias)


def _literal(value: Any, type_sql: str) -> exp.Expr:
    if value is None:
        return sb.cast(exp.Null(), type_sql)
    if isinstance(value, bool | int | float):
        return sb.cast(sb.number(value), type_sql)
    return sb.cast(sb.string(str(value)), type_sql)


# The tidy results' own columns: a group key may not take one of these names.
OUTPUT_COLUMNS = ("experiment", "pred", "target", "metric", "value")


def grouping_expression(
    column: str, experiments: Mapping[str, tuple[Inlined, Mapping[str, str]]], source_columns: Mapping[str, str]
) -> exp.Expr:
    """The group key of ``by=column`` over the source rows: each experiment's own value of the
    column (a column it computes or replaces, such as a symbol mapped to its sector). The fused
    experiments must agree on it (:func:`split_groupings` sends the others to their own scans)."""
    missing = [name for name, (inl, _) in experiments.items() if column not in inl.mapping]
    if missing or not experiments:
        raise UnknownColumnError(
            f"Cannot group by {column!r}: experiment {missing[0]!r} has no such column. Group the experiments that "
            f"have it (experiments=[...], --experiment) or add it to this one."
            if missing
            else f"Cannot group by {column!r}: no such column. Use 'day' or a column: {', '.join(source_columns)}.",
            column=column,
            experiment=missing[0] if missing else None,
        )
    exprs = {sb.render(inl.mapping[column]): inl.mapping[column] for inl, _ in experiments.values()}
    if len(exprs) > 1:  # split_groupings prevents this
        raise InputError(f"Cannot group by {column!r} in one scan: the experiments compute it differently.")
    return next(iter(exprs.values()))


def split_groupings(
    fused: Mapping[str, tuple[Inlined, Mapping[str, str]]], by: Sequence[str], source_columns: Mapping[str, str]
) -> tuple[dict[str, tuple[Inlined, Mapping[str, str]]], list[str]]:
    """The fused experiments that can share one scan for grouping ``by``, and those that must run
    as their own chains: experiments that compute a ``by`` column differently (``symbol`` as it is
    and ``symbol`` mapped to sectors) cannot share a group key. The one scan keeps those that
    group by the source column itself, or else the definition most of them share."""
    keep = dict(fused)
    apart: list[str] = []
    for b in by:
        if b == "day" or b.startswith("tod:"):
            continue
        texts = {n: sb.render(inl.mapping[b]) for n, (inl, _) in keep.items() if b in inl.mapping}
        if len(set(texts.values())) <= 1:
            continue
        plain = sb.render(sb.column(b))
        counts = collections.Counter(texts.values())
        chosen = plain if b in source_columns and plain in counts else counts.most_common(1)[0][0]
        for n, text in texts.items():
            if text != chosen:
                apart.append(n)
                del keep[n]
    return keep, apart


class FusedScan:
    """The aggregate query shared by all inlinable experiments of one call."""

    def __init__(
        self,
        dataset: Dataset,
        experiments: Mapping[str, tuple[Inlined, Mapping[str, str]]],
        pairs: Sequence[Pair],
        metrics: Sequence[Metric],
        by: Sequence[str],
        columns: Mapping[str, str] | None = None,
    ):
        self.dataset = dataset
        self.metrics = list(metrics)
        self.keys: dict[str, exp.Expr] = {}
        self.aggregates: dict[str, exp.Expr] = {ROWS: exp.Count(this=exp.Star())}
        self._agg_by_text: dict[str, str] = {sb.render(self.aggregates[ROWS]): ROWS}
        self._key_by_text: dict[str, str] = {}
        self._skeletons: dict[tuple[bool, bool], str] = {}
        self.valid_keys: set[str] = set()
        self._fragments: dict[tuple[tuple[str, ...], SessionWindow | None, int | None], sb.RenderedSlots] = {}
        self.need_day = "day" in by
        self.shift_table: ShiftTable | None = None
        self.by: list[tuple[str, exp.Expr]] = []
        source_columns = columns if columns is not None else dataset.columns
        if sum(1 for b in by if b.startswith("tod:")) > 1:
            raise InputError("Group by at most one time-of-day bucket (e.g. by=['day', 'tod:30min']).")
        for b in by:
            if b == "day":
                continue
            if b.startswith("tod:"):
                tcol = dataset.time_column
                if tcol is None:
                    raise UnknownColumnError(
                        f"Cannot group by {b!r}: the source has no time column (set 'time_column' in metadata.json "
                        f"to a TIMESTAMP column).",
                        column=b,
                    )
                if tcol not in source_columns:
                    raise UnknownColumnError(f"Cannot group by {b!r}: there is no time column {tcol!r}.", column=tcol)
                self.by.append((TOD, time_of_day_bucket(dataset, parse_bucket(b), type_sql=source_columns[tcol])))
                continue
            if b in OUTPUT_COLUMNS or b.startswith("__"):
                raise InputError(
                    f"Cannot group by column {b!r}: the results have columns {', '.join(OUTPUT_COLUMNS)} of their "
                    f"own, and names starting with '__' are the engine's. Rename it (in the source files, or "
                    f"with an experiment's AS)."
                )
            self.by.append((b, grouping_expression(b, experiments, source_columns)))
        self.bound: list[tuple[str, Pair, Inlined, exp.Expr, exp.Expr, str, str]] = []
        for name, (inl, cols) in experiments.items():
            for pair in pairs:
                for c in (pair.pred, pair.target):
                    if c not in inl.mapping:
                        raise UnknownColumnError(
                            f"Experiment {name!r} has no column {c!r} (pair {pair.pred}:{pair.target}). Pairs "
                            f"are scored in every experiment asked for: choose the experiments that have it "
                            f"(experiments=[...], --experiment).",
                            column=c,
                            experiment=name,
                        )
                for c in (pair.pred, pair.target):
                    if not _numeric(cols[c]):
                        # A source column whose files disagree reads as their common type: say which
                        # files made it so.
                        odd = [f for f in dataset.files if c in f.columns and not _numeric(f.columns[c])]
                        where = ""
                        if odd and len(odd) < len(dataset.files):
                            more = f" and {len(odd) - 1} more file(s)" if len(odd) > 1 else ""
                            where = f" (the files' common type: it is {odd[0].columns[c]} in {odd[0].path}{more})"
                        raise InputError(
                            f"Column {c!r} of experiment {name!r} is {cols[c]}, not numeric{where}; "
                            f"pairs are numeric PRED:TARGET columns."
                        )
                self.bound.append(
                    (
                        name,
                        pair,
                        inl,
                        inl.mapping[pair.pred],
                        inl.mapping[pair.target],
                        cols[pair.pred],
                        cols[pair.target],
                    )
                )

    def shift_expressions(self) -> list[exp.Expr]:
        """Distinct pred/target expressions whose typical value sets the shift of ``*_c`` roles."""
        seen: dict[str, exp.Expr] = {}
        for _, _, _, p, t, _, _ in self.bound:
            seen.setdefault(sb.render(p), p)
            seen.setdefault(sb.render(t), t)
        return list(seen.values())

    def build(self, shifts: Mapping[str, float], table: ShiftTable | None = None) -> list[Target]:
        """Bind every metric to every (experiment, pair); returns the targets. With a ``table``,
        its groups' rows are shifted by its values instead (see :class:`ShiftTable`)."""
        self.shift_table = table
        targets = []

        def centred(node: exp.Expr, text: str, experiment: str) -> exp.Expr:
            shift: exp.Expr = sb.number(shifts.get(text, 0.0))
            column = table.column(shift_role(experiment, text)) if table is not None else None
            if column is not None:
                shift = exp.Coalesce(this=column, expressions=[shift])
            return exp.Sub(this=exp.paren(node.copy()), expression=shift)

        # A bound aggregate is fixed by the SQL of its statistic and of its roles, so it is built
        # and rendered once per distinct pair of those (metrics sharing a statistic share it).
        bound_agg: dict[tuple[str, ...], str] = {}
        stat_text: dict[tuple[str, str], str] = {}  # (metric, stat) -> its aggregate's SQL
        for name, pair, inl, p, t, ptype, ttype in self.bound:
            role_text = (sb.render(p), sb.render(t))
            conds = tuple(self._key(c) for c in inl.conditions)
            valid = self._key(exp.and_(sb.is_valid_number(p, ptype), sb.is_valid_number(t, ttype)))
            # Metric SQL computes in DOUBLE whatever the columns' type: integers would overflow in
            # their own type (an INT16 target squared) and FLOAT arithmetic would round to single
            # precision. The cast is exact for FLOAT and for integers up to 2**53.
            p, t = _as_double(p, ptype), _as_double(t, ttype)
            roles = {
                "pred": p,
                "target": t,
                "pred_c": centred(p, role_text[0], name),
                "target_c": centred(t, role_text[1], name),
            }
            # Experiments share an aggregate when its roles have the same SQL, shifts included.
            bound_text = (*role_text, sb.render(roles["pred_c"]), sb.render(roles["target_c"]))

            def bind(
                metric: str, stat: str, agg: exp.Expr, roles: dict[str, exp.Expr] = roles, texts: tuple = bound_text
            ) -> str:
                if (metric, stat) not in stat_text:
                    stat_text[metric, stat] = sb.render(agg)
                key = (stat_text[metric, stat], *texts)
                if key not in bound_agg:
                    bound_agg[key] = self._aggregate(sb.cast(sb.substitute_columns(agg, roles), "DOUBLE"))
                return bound_agg[key]

            self.valid_keys.add(valid)
            checks = tuple(bind("", role, exp.Sum(this=sb.column(role))) for role in ("pred_c", "target_c"))
            inputs = frozenset(sb.column_names(p)) | frozenset(sb.column_names(t))
            fast = null_preserving(p) and null_preserving(t)
            target = Target(
                name,
                pair,
                conds,
                valid,
                checks=checks,
                inputs=inputs,
                fast=fast,
                roles=role_text,
                shifts=(shifts.get(role_text[0], 0.0), shifts.get(role_text[1], 0.0)),
            )
            for m in self.metrics:
                target.stats[m.name] = {stat: bind(m.name, stat, agg) for stat, agg in m.stats}
            targets.append(target)
        return targets

    def _key(self, node: exp.Expr) -> str:
        return _intern(node, self.keys, self._key_by_text, "__k")

    def _aggregate(self, node: exp.Expr) -> str:
        return _intern(node, self.aggregates, self._agg_by_text, "__s")

    def _projections(self, day: exp.Expr, *, skip_valid: bool = False) -> list[exp.Expr]:
        proj = [sb.alias(day, DAY)]
        proj += [sb.alias(e, n) for n, e in self.by]
        # The interned keys and aggregates go into the tree uncopied: query trees are only rendered,
        # never rewritten, and a node may sit under the aliases of several of them.
        proj += [sb.alias(e, n, copy=False) for n, e in self.keys.items() if not (skip_valid and n in self.valid_keys)]
        proj += [sb.alias(e, n, copy=False) for n, e in self.aggregates.items()]
        return proj

    def batch_query(
        self,
        files: Sequence[FileInfo],
        window: SessionWindow | None,
        *,
        fast: bool = False,
        part: int | None = None,
    ) -> str:
        """The SQL text of the fused query for one batch of files, or of part ``part`` of it.

        A one-file batch of several parts (:meth:`parts`) groups its rows by part too (key
        ``__part``, from DuckDB's ``file_row_number``), so each part's cells are their own rows
        of partials. Part ``i`` alone is the same query restricted to that part's rows (which
        row-group statistics prune): with one thread per query, its rows are the same sums in the
        same order, so computing a file whole or in parts gives the same bits.

        The aggregate list is the same for every batch, so it is rendered once; only the day
        label, the FROM and the WHERE are built per batch (each still as a sqlglot tree).
        """
        ranges = self.parts(files)
        split = len(ranges) > 1
        if (fast, split) not in self._skeletons:
            proj = self._projections(sb.column(_SLOT_DAY), skip_valid=fast)
            if split:
                proj.insert(1 + len(self.by), sb.alias(sb.column(_SLOT_PART), PART))
            skeleton = sb.select(proj, sb.column(_SLOT_FROM), where=sb.column(_SLOT_WHERE), group_by_all=True)
            self._skeletons[fast, split] = sb.render(skeleton, copy=False)
        key = (tuple(f.path for f in files), window, part)
        if key not in self._fragments:  # the fast and the full query of a batch share these
            where, day = window_and_day(self.dataset, files, window, need_day=self.need_day)
            relation = batch_relation(self.dataset, files, row_numbers=split)
            if self.shift_table is not None:
                relation = self.shift_table.join(relation, self._group_exprs(day))
            slots = {_SLOT_DAY: day, _SLOT_FROM: relation}
            if split:
                rows = sb.column(ROW_NUMBER)
                starts = [exp.Literal.number(lo) for lo, _ in ranges[1:]]
                # The part of a row: how many part starts it is at or past.
                slots[_SLOT_PART] = functools.reduce(
                    lambda acc, term: exp.Add(this=acc, expression=term),
                    [sb.cast(exp.GTE(this=rows.copy(), expression=lo), "INTEGER") for lo in starts],
                )
                if part is not None:
                    lo, hi = ranges[part]
                    bounds: list[exp.Expr] = (
                        [exp.GTE(this=rows.copy(), expression=exp.Literal.number(lo))] if lo else []
                    )
                    if hi is not None:
                        bounds.append(exp.LT(this=rows.copy(), expression=exp.Literal.number(hi)))
                    where = sb.and_all([*([where] if where is not None else []), *bounds])
            slots[_SLOT_WHERE] = where if where is not None else exp.true()
            self._fragments = {key: sb.render_slots(slots)}
        return sb.fill_slots(self._skeletons[fast, split], self._fragments[key])

    def parts(self, files: Sequence[FileInfo]) -> list[Part]:
        """The parts of a batch: one (the whole batch) or, for one file of more than ``PART_ROWS``
        rows in several row groups, row ranges ``(first, end)`` of whole row groups of about
        ``PART_ROWS`` rows each. They depend only on the file's footer and the grouping: grouped by
        a column (say ``symbol``), a part key would multiply many groups, so files stay whole."""
        by_column = any(name != TOD for name, _ in self.by)
        if len(files) != 1 or by_column or ROW_NUMBER in self.dataset.columns:
            return [(0, None)]
        return row_group_parts(files[0].row_groups, PART_ROWS)

    def fast_eligible(self, targets: Sequence[Target], files: Sequence[FileInfo]) -> bool:
        """Whether the batch may skip validity keys: every target's expressions are
        NULL-preserving and every input column is NULL-free in every file of the batch."""
        return all(t.fast and all(t.inputs <= f.null_free for f in files) for t in targets)

    def whole_query(self, relation: exp.Expr, day: exp.Expr) -> exp.Expr:
        """The same aggregates over one relation (an experiment that must see all rows at once)."""
        if self.shift_table is not None:
            relation = self.shift_table.join(relation, self._group_exprs(day))
        return sb.select(self._projections(day), relation, group_by_all=True)

    def _group_exprs(self, day: exp.Expr) -> list[exp.Expr]:
        assert self.shift_table is not None
        by = dict(self.by)
        return [day if k == DAY else by[k] for k in self.shift_table.keys]

    def shift_query(self, relation: exp.Expr, sample_rows: int = 10_000) -> exp.Expr | None:
        """Medians of each pred/target expression over the first rows of ``relation``, then the
        count of its NaN or infinite values there."""
        exprs = self.shift_expressions()
        if not exprs:
            return None
        sample = sb.select([exp.Star()], relation).limit(sample_rows)
        proj = []
        for i, e in enumerate(exprs):
            x = sb.cast(e.copy(), "DOUBLE")
            proj.append(
                sb.alias(
                    exp.Filter(this=sb.func("median", x), expression=exp.Where(this=sb.func("isfinite", x.copy()))),
                    f"m{i}",
                )
            )
        # And how many sampled values are NaN or infinite: if any, NaN is how this data marks
        # missing values, and batch queries carry their validity keys from the start.
        for i, e in enumerate(exprs):
            x = sb.cast(e.copy(), "DOUBLE")
            bad = exp.Not(this=sb.func("isfinite", x))
            proj.append(sb.alias(exp.Filter(this=exp.Count(this=exp.Star()), expression=exp.Where(this=bad)), f"f{i}"))
        return sb.select(proj, sample.subquery("sample"))


_UNITS = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "hour": 3600}


def parse_bucket(spec: str) -> int:
    """The length in seconds of a time-of-day grouping such as ``"tod:30min"``.

    Units: ``s``/``sec``, ``m``/``min``, ``h``/``hour``. The length must divide a day, so that
    buckets start at the same wall-clock times every day (09:30, 10:00, ... for 30min).

    Example:
        >>> parse_bucket("tod:30min"), parse_bucket("tod:1h"), parse_bucket("tod:90s")
        (1800, 3600, 90)
    """
    text = spec.split(":", 1)[1].strip().lower() if spec.lower().startswith("tod:") else spec.strip().lower()
    num = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(num) :]
    if not num.isdigit() or unit not in _UNITS or int(num) == 0:  # a bare number has no unit: refused
        raise InputError(f"Time-of-day bucket {spec!r} must look like 'tod:30min', 'tod:1h' or 'tod:300s'.")
    seconds = int(num) * _UNITS[unit]
    if 86_400 % seconds:
        raise InputError(f"Time-of-day bucket {spec!r} must divide 24 hours (e.g. 5min, 15min, 30min, 1h).")
    return seconds


def time_of_day_bucket(dataset: Dataset, seconds: int, *, type_sql: str | None = None) -> exp.Expr:
    """The local wall-clock start of each row's ``seconds``-long bucket, as a TIME.

    The time column is converted to the data's time zone per row (naive times are read as UTC),
    so buckets follow local time across daylight-saving switches. ``type_sql`` is the time
    column's type in the rows bucketed, when an experiment gave it another than the source's.
    """
    assert dataset.time_column is not None
    ts = sb.column(dataset.time_column)
    type_sql = type_sql or dataset.columns[dataset.time_column]
    instant = ts if type_sql in AWARE_TIMESTAMP_TYPES else sb.func("timezone", sb.string("UTC"), ts)
    local: exp.Expr = sb.func("timezone", sb.string(dataset.metadata.timezone), instant)
    if "_NS" in type_sql.upper():
        # Nanosecond instants: truncated to the microsecond (a cast would round 23:59:59.9999999995
        # into the next bucket), as time_bucket needs.
        local = sb.func("make_timestamp", sb.func("epoch_us", local))
    else:
        local = sb.cast(local, "TIMESTAMP")
    width = exp.Interval(this=sb.string(str(seconds)), unit=exp.var("SECOND"))
    return sb.cast(sb.func("time_bucket", width, local), "TIME")


def group_key(by: str) -> str:
    """The partial-stats column of a ``by`` entry: the day label, ``tod`` or the column itself."""
    if by == "day":
        return DAY
    return TOD if by.startswith("tod:") else by


def _intern(node: exp.Expr, table: dict[str, exp.Expr], by_text: dict[str, str], prefix: str) -> str:
    """The column name of ``node`` in ``table``, adding it once per distinct SQL text."""
    text = sb.render(node, copy=False)
    if text not in by_text:
        by_text[text] = f"{prefix}{len(by_text)}"
        table[by_text[text]] = node
    return by_text[text]


def batch_relation(
    dataset: Dataset, files: Sequence[FileInfo], *, row_numbers: bool = False, filename: str | None = None
) -> exp.Expr:
    """``read_parquet`` of the batch, with columns the batch lacks added as typed NULLs and
    columns whose type differs cast to the dataset's union type, so every batch has one schema
    (and, with ``row_numbers``, DuckDB's ``file_row_number`` column; with ``filename``, each
    row's file path as a column of that name)."""
    rp = sb.read_parquet([f.path for f in files], file_row_number=row_numbers, filename=filename)
    present: dict[str, None] = {}
    for f in files:
        present.update(dict.fromkeys(f.columns))
    missing = [c for c in dataset.columns if c not in present]
    retype = [c for c in present if any(f.columns.get(c) not in (None, dataset.columns[c]) for f in files)]
    if not missing and not retype:
        return rp
    star = exp.Star(replace=[sb.alias(sb.cast(sb.column(c), dataset.columns[c]), c) for c in retype] or None)
    proj: list[exp.Expr] = [star]
    proj += [sb.alias(sb.cast(exp.Null(), dataset.columns[c]), c) for c in missing]
    return sb.select(proj, rp).subquery("src")


def row_group_parts(row_groups: Sequence[int], part_rows: int) -> list[Part]:
    """Row ranges ``(first, end)`` of consecutive whole row groups, each closed once it holds at
    least ``part_rows`` rows; a remainder of less than half that joins the last range, and the
    last range is open (``end`` None).

    Example:
        >>> row_group_parts([4, 4, 4, 4, 2], 8)
        [(0, 8), (8, None)]
        >>> row_group_parts([4, 4, 4, 4, 4], 8)
        [(0, 8), (8, 16), (16, None)]
        >>> row_group_parts([4, 4, 4, 4, 2], 100)
        [(0, None)]
    """
    ends: list[int] = []
    offset = held = 0
    for n in row_groups:
        offset += n
        held += n
        if held >= part_rows:
            ends.append(offset)
            held = 0
    if ends and held * 2 < part_rows:
        ends.pop()  # the last range runs to the end of the file (with a small remainder, if any)
    return list(zip([0, *ends], [*ends, None], strict=True))


def local_dates(lo: dt.datetime, hi: dt.datetime, tz: str) -> list[dt.date]:
    z = zoneinfo.ZoneInfo(tz)

    def local(x: dt.datetime) -> dt.date:
        return (x if x.tzinfo else x.replace(tzinfo=dt.UTC)).astimezone(z).date()

    a, b = local(lo), local(hi)
    return [a + dt.timedelta(days=i) for i in range((b - a).days + 1)]


def range_days(lo: dt.datetime, hi: dt.datetime, tz: str, window: SessionWindow | None) -> list[dt.date]:
    """The session days rows timed from ``lo`` to ``hi`` can belong to: their local dates, and the
    day before the first for an overnight window (whose session starts the evening before)."""
    days = local_dates(lo, hi, tz)
    return [days[0] - dt.timedelta(days=1), *days] if window is not None and window.overnight else days


def file_days(f: FileInfo, tz: str, window: SessionWindow | None) -> list[dt.date]:
    """The session days a file with time statistics can hold rows of (:func:`range_days`)."""
    assert f.time_min is not None and f.time_max is not None
    return range_days(f.time_min, f.time_max, tz, window)


def day_intervals(
    day: dt.date, tz: str, window: SessionWindow | None
) -> tuple[tuple[dt.datetime, dt.datetime, bool], ...]:
    """The UTC intervals ``(lo, hi, hi_inclusive)`` of the instants whose rows are ``day``'s:
    its session window (:meth:`SessionWindow.intervals`), or without one its local day. These
    are the ranges :func:`window_and_day` tests, so a row inside one is labelled ``day``.

    Example:
        >>> [(a.isoformat(), b.isoformat(), i) for a, b, i in day_intervals(dt.date(2026, 3, 8), "US/Eastern", None)]
        [('2026-03-08T05:00:00+00:00', '2026-03-09T04:00:00+00:00', False)]
    """
    if window is not None:
        return window.intervals(day)
    lo, hi = day_bounds(day, tz)
    return ((lo, hi, False),)


def day_groups(
    dataset: Dataset, window: SessionWindow | None, files: Sequence[FileInfo] | None = None
) -> list[list[FileInfo]]:
    """``files`` (default: the dataset's) grouped so that every session day's rows are in one
    group, in file order: a day split over two files puts them in one group, a file of several
    days is one group with the files sharing any of them. Files whose footers give no time range
    cannot be placed: then all files form one group.

    Example:
        >>> day_groups(dataset, None)                                     # doctest: +SKIP
        [[<2026-03-04.parquet>], [<2026-03-05.parquet>], ...]
    """
    files = list(dataset.files if files is None else files)
    if any(f.time_min is None or f.time_max is None for f in files):
        return [files] if files else []
    tz = window.timezone if window is not None else dataset.metadata.timezone
    groups: list[tuple[set[dt.date], list[FileInfo]]] = []
    for f in files:
        days = set(file_days(f, tz, window))
        joined = [g for g in groups if g[0] & days]
        for g in joined:
            groups.remove(g)
            days |= g[0]
        groups.append((days, [m for g in joined for m in g[1]] + [f]))
    order = {f.path: i for i, f in enumerate(files)}
    out = [sorted(m, key=lambda f: order[f.path]) for _, m in groups]
    return sorted(out, key=lambda g: order[g[0].path])


# Beyond this many days in one batch, per-day constants cost more than converting each row.
MAX_DAY_BRANCHES = 8
# Beyond this many days in one query, the window is written as a per-row local-time test: a file
# that spans a year gains nothing from 365 ranges. Views over many daily files use a larger limit.
MAX_WINDOW_DAYS = 31
MAX_VIEW_WINDOW_DAYS = 1000


def window_and_day(
    dataset: Dataset,
    files: Sequence[FileInfo],
    window: SessionWindow | None,
    *,
    need_day: bool = True,
    max_window_days: int = MAX_WINDOW_DAYS,
    day_per_row: bool = False,
    rows_aware: bool | None = None,
) -> tuple[exp.Expr | None, exp.Expr]:
    """The WHERE condition of the session window and the day label for a batch of files.

    For files with time statistics the window is one ``BETWEEN`` of UTC bounds per local day
    (so row-group statistics can skip data) and the day label is a constant when the batch holds
    one day. Batches that span many days, or files without statistics, convert rows to local time;
    so does ``day_per_row`` (for an experiment whose rows' times are not their files', see
    :func:`moves_time`). ``rows_aware`` says whether the time column of the rows labelled has a
    time zone, when an experiment changed that from the source's (naive times are UTC).
    """
    no_day = sb.cast(exp.Null(), "DATE")
    tcol = dataset.time_column
    if tcol is None:
        if window is not None:
            raise InputError("A session window needs a time column; set 'time_column' in metadata.json.")
        return None, no_day
    ts = sb.column(tcol)
    aware = dataset.time_is_aware
    labels_aware = aware if rows_aware is None else rows_aware
    tz = window.timezone if window is not None else dataset.metadata.timezone
    if any(f.time_min is None or f.time_max is None for f in files):
        where = per_row_window(ts, aware, tz, window)[0]
        return where, per_row_window(ts, labels_aware, tz, window)[1] if need_day else no_day
    ordered = sorted({d for f in files for d in file_days(f, tz, window)})
    branches: list[tuple[exp.Expr, dt.date]] = []
    if window is None:
        where = None
        for d in ordered[:-1]:
            _, nxt = day_bounds(d, tz)
            branches.append((exp.LT(this=ts.copy(), expression=sb.timestamp(nxt, with_tz=aware)), d))
    elif len(ordered) > max_window_days:
        where = per_row_window(ts, aware, tz, window)[0]
    else:
        for d in ordered:
            parts = [
                sb.between(ts, sb.timestamp(lo, with_tz=aware), sb.timestamp(hi, with_tz=aware), hi_inclusive=incl)
                for lo, hi, incl in window.intervals(d)
            ]
            cond = sb.or_all(parts)
            if cond is not None:  # None: the window lies in a clock change's gap, no instant that day
                branches.append((cond, d))
        ordered = [d for _, d in branches]
        where = sb.or_all(c for c, _ in branches) or exp.false()
        if not ordered:
            return where, no_day
    if not need_day:
        return where, no_day
    if day_per_row:
        return where, per_row_window(ts, labels_aware, tz, window)[1]
    if len(ordered) == 1:
        return where, sb.date(ordered[0])
    if len(ordered) > MAX_DAY_BRANCHES:
        return where, per_row_window(ts, labels_aware, tz, window)[1]
    if window is None:
        return where, exp.Case(ifs=[exp.If(this=c, true=sb.date(d)) for c, d in branches], default=sb.date(ordered[-1]))
    # Rows of the batch's files are all inside one of the windows; rows an experiment run on all
    # data at once gives another time (``date_trunc('hour', ts)`` moves 09:30 to 09:00) fall
    # through to the label written per row, which is what a batch of more days gives them too.
    fallback = per_row_window(ts, labels_aware, tz, window)[1]
    return where, exp.Case(ifs=[exp.If(this=c, true=sb.date(d)) for c, d in branches], default=fallback)


def aware_in(dataset: Dataset, columns: Mapping[str, str]) -> bool | None:
    """Whether the time column has a time zone in rows of these ``columns`` (an experiment's),
    or None when they have no time column."""
    tcol = dataset.time_column
    return None if tcol is None or tcol not in columns else columns[tcol] in AWARE_TIMESTAMP_TYPES


def replaces_time(dataset: Dataset, experiments: Experiments, name: str) -> bool:
    """Whether experiment ``name`` is row by row (inlined) and gives its rows other times than
    their source rows' (``SELECT * REPLACE (ts + INTERVAL 1 HOUR AS ts) ...``): a row may then
    land on another day than its file's, so per-day work on it reads all files in one pass."""
    tcol = dataset.time_column
    inl = experiments.inline(name) if tcol is not None else None
    if inl is None or tcol is None:
        return False
    mapped = inl.mapping.get(tcol)
    return mapped is not None and not (isinstance(mapped, exp.Column) and mapped.name == tcol and not mapped.table)


def moves_time(dataset: Dataset, experiments: Experiments, name: str) -> bool:
    """Whether experiment ``name`` may give rows another time than their source row's: it
    replaces the time column, or it runs as views whose output times cannot be read off (GROUP BY,
    window functions, Python steps). Its rows' days are then labelled from its own time column,
    per row, like its time-of-day buckets, instead of by the file they came from."""
    if dataset.time_column is None:
        return False
    return experiments.inline(name) is None or replaces_time(dataset, experiments, name)


def per_row_window(
    ts: exp.Expr, aware: bool, tz: str, window: SessionWindow | None
) -> tuple[exp.Expr | None, exp.Expr]:
    """The window and day label written per row, in local time (for files without time statistics,
    for batches spanning many days, and for exported day macros). Naive times are read as UTC
    whatever the session's zone."""
    instant = ts if aware else sb.func("timezone", sb.string("UTC"), ts)
    local = sb.func("timezone", sb.string(tz), instant)
    local_time, local_date = sb.cast(local, "TIME"), sb.cast(local.copy(), "DATE")
    if window is None:
        return None, local_date

    def t(v: dt.time) -> exp.Expr:
        return sb.cast(sb.string(v.isoformat()), "TIME")

    parts: list[exp.Expr] = []
    if window.start is not None:
        parts.append(exp.GTE(this=local_time.copy(), expression=t(window.start)))
    if window.end is not None:
        parts.append(exp.LTE(this=local_time.copy(), expression=t(window.end)))
    if window.overnight:
        where = sb.or_all(parts)
        assert window.start is not None
        # From the start on, the session of that date; up to the end, the one that began the day
        # before; in between (only rows an experiment moves there: hourly bars put 18:30 at 18:00),
        # the session that begins later that day.
        before = exp.Sub(this=local_date.copy(), expression=exp.Interval(this=sb.string("1"), unit=exp.var("DAY")))
        ifs = [exp.If(this=exp.GTE(this=local_time.copy(), expression=t(window.start)), true=local_date)]
        if window.end is not None:
            ifs.append(exp.If(this=exp.LTE(this=local_time.copy(), expression=t(window.end)), true=before))
        day: exp.Expr = exp.Case(ifs=ifs, default=local_date.copy() if window.end is not None else before)
        return where, sb.cast(day, "DATE")
    return sb.and_all(parts), local_date
