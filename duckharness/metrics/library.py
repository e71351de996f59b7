"""Metric files: plain SQL with a small header, one file per metric.

A metric file has up to three queries, each after a marker line::

    -- metric: r2
    -- description: 1 - SSE/SST, SST about the target's own mean
    -- stats
    SELECT count(*) AS n, sum((target - pred) * (target - pred)) AS sse,
           sum(target_c) AS st, sum(target_c * target_c) AS stt
    FROM input;
    -- merge            (optional; default: sum of each column)
    SELECT sum(n) AS n, sum(sse) AS sse, sum(st) AS st, sum(stt) AS stt FROM partials;
    -- final
    SELECT 1 - sse / nullif(stt - st * st / n, 0) AS value FROM merged;

*stats* aggregates rows of ``input`` into mergeable columns. ``input`` has the columns ``pred``
and ``target`` (bound by the engine to e.g. ``pred_10s``/``target_10s``), and ``pred_c`` and
``target_c``: the same values minus a constant the engine picks close to each column's mean, so
that sums of squares keep their precision. Any constant (0 included) gives the same metric in
exact arithmetic, so a final formula must not depend on it. *merge* combines a table
``partials`` of stats rows with ``sum``, ``min`` or ``max`` of each column. *final* turns the
merged row into the metric, one column named ``value``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from sqlglot import exp

from duckharness import sqlbuild as sb
from duckharness.errors import MetricError, UnknownMetricError, warn

ROLES = ("pred", "target", "pred_c", "target_c")
MERGE_FUNCTIONS = {"sum": "sum", "min": "min", "max": "max"}
_MARKER = re.compile(r"^\s*--\s*(stats|merge|final)\s*:?\s*$", re.IGNORECASE)
_HEADER = re.compile(r"^\s*--\s*([A-Za-z_][\w-]*)\s*:\s*(.*?)\s*$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Metric:
    """A parsed metric file."""

    name: str
    description: str
    stats: tuple[tuple[str, exp.Expr], ...]  # (stat name, aggregate over input roles)
    merge: Mapping[str, str]  # stat name -> sum | min | max
    final: exp.Expr  # scalar over stat names
    path: str
    source: str  # the file's text

    @property
    def stat_names(self) -> list[str]:
        return [n for n, _ in self.stats]


def _fail(path: str, what: str) -> MetricError:
    return MetricError(f"Metric file {path}: {what}", path=path)


def _single_select(sql: str, *, section: str, table: str, path: str) -> exp.Select:
    try:
        tree = sb.parse_statement(sql)
    except sb.SQLParseError as e:
        raise _fail(path, f"the {section} query does not parse: {e}.") from None
    if not isinstance(tree, exp.Select):
        raise _fail(path, f"the {section} query must be one SELECT, got {type(tree).__name__}.")
    for arg in ("joins", "group", "having", "qualify", "order", "limit", "offset", "distinct", "with_"):
        if tree.args.get(arg):
            raise _fail(
                path, f"the {section} query may not use {arg.upper().rstrip('_')} (the engine adds grouping itself)."
            )
    if section != "stats" and tree.args.get("where"):
        raise _fail(path, f"the {section} query may not have a WHERE clause.")
    if tree.args.get("where"):
        raise _fail(path, "the stats query may not have a WHERE clause; use FILTER (WHERE ...) on an aggregate.")
    from_ = tree.args.get("from_") or tree.args.get("from")
    tables = list(from_.find_all(exp.Table)) if from_ else []
    if len(tables) != 1 or tables[0].name != table or tables[0].args.get("db"):
        raise _fail(path, f"the {section} query must read FROM {table}.")
    if any(isinstance(s, exp.Select) for s in tree.find_all(exp.Select) if s is not tree):
        raise _fail(path, f"the {section} query may not contain subqueries.")
    return tree


def _projections(tree: exp.Select, *, section: str, path: str) -> list[tuple[str, exp.Expr]]:
    out: list[tuple[str, exp.Expr]] = []
    for p in tree.expressions:
        if not isinstance(p, exp.Alias) or not p.alias:
            raise _fail(path, f"every column of the {section} query needs a name: write `{sb.render(p)} AS name`.")
        if p.alias in {n for n, _ in out}:
            raise _fail(path, f"the {section} query names column {p.alias!r} twice.")
        out.append((p.alias, p.this))
    return out


# The aggregates whose partials merge by each rule: a stats column merged by sum must be a sum of
# rows (SUM, COUNT, COUNT_IF, or such terms added, subtracted or scaled by constants), one merged
# by min or max a MIN or MAX; ``avg(x)`` or ``median(x)`` of each batch cannot be combined into
# the value over all rows by any of them.
_MERGEABLE: dict[str, tuple[type[exp.Expr], ...]] = {
    "sum": (exp.Sum, exp.Count, exp.CountIf),
    "min": (exp.Min,),
    "max": (exp.Max,),
}


# DuckDB's other sums (compensated, or without the overflow check), which sqlglot does not know.
_SUMS = frozenset({"fsum", "kahan_sum", "sumkahan", "sum_no_overflow"})


def _is_aggregate(node: exp.Expr) -> bool:
    return isinstance(node, exp.AggFunc) or (isinstance(node, exp.Anonymous) and node.name.lower() in _SUMS)


def _is_constant(node: exp.Expr) -> bool:
    return not any(_is_aggregate(n) or isinstance(n, (exp.Column, exp.Star)) for n in node.walk())


def _mergeable(node: exp.Expr, rule: str) -> bool:
    """Whether ``node`` (a stats column) merges by ``rule`` across any split of the rows."""
    if isinstance(node, (exp.Paren, exp.Cast, exp.TryCast)):
        return _mergeable(node.this, rule)
    if isinstance(node, exp.Filter):  # sum(x) FILTER (WHERE ...)
        return _mergeable(node.this, rule)
    if _is_aggregate(node):
        inner = any(_is_aggregate(n) for n in node.walk() if n is not node)
        args = node.expressions if isinstance(node, exp.Anonymous) else [node.this]
        distinct = any(isinstance(a, exp.Distinct) for a in args)  # count(DISTINCT x) of batches does not add up
        kind = isinstance(node, _MERGEABLE[rule]) or (isinstance(node, exp.Anonymous) and rule == "sum")
        return kind and not inner and not (distinct and rule == "sum")
    if rule != "sum":
        return False
    if isinstance(node, exp.Neg):
        return _mergeable(node.this, rule)
    if isinstance(node, (exp.Add, exp.Sub)):
        return _mergeable(node.this, rule) and _mergeable(node.expression, rule)
    if isinstance(node, exp.Mul):
        a, b = node.this, node.expression
        return (_is_constant(a) and _mergeable(b, rule)) or (_is_constant(b) and _mergeable(a, rule))
    if isinstance(node, exp.Div):
        return _is_constant(node.expression) and _mergeable(node.this, rule)
    return False


def _check_mergeable(stat: str, node: exp.Expr, rule: str, path: str) -> None:
    if _mergeable(node, rule):
        return
    if rule == "sum":
        need = (
            "a sum over rows: sum(...), count(...), count_if(...) or fsum(...) (not DISTINCT), or such "
            "terms added, subtracted or multiplied by constants"
        )
    else:
        need = f"{rule}(...)"
    raise _fail(
        path,
        f"stats column {stat!r} ({sb.render(node)}) cannot be merged by {rule} (its merge rule): the "
        f"partials of the batches of rows are combined with {rule}(), so it must be {need}. Compute "
        f"e.g. a mean as a sum and a count in the stats and divide in the final query; a median or "
        f"quantile is not a metric of this kind.",
    )


def parse_metric(text: str, *, path: str) -> Metric:
    """Parse and validate the text of a metric file.

    Example:
        >>> m = parse_metric('''-- metric: mean_error
        ... -- stats
        ... SELECT count(*) AS n, sum(pred - target) AS se FROM input;
        ... -- final
        ... SELECT se / n AS value FROM merged;''', path="mean_error.sql")
        >>> m.name, m.stat_names, dict(m.merge)
        ('mean_error', ['n', 'se'], {'n': 'sum', 'se': 'sum'})
    """
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        if m := _MARKER.match(line):
            current = m.group(1).lower()
            if current in sections:
                raise _fail(path, f"section '-- {current}' appears twice.")
            sections[current] = []
        elif current is None:
            if h := _HEADER.match(line):
                header[h.group(1).lower()] = h.group(2)
            elif line.strip() and not line.strip().startswith("--"):
                raise _fail(
                    path,
                    "SQL before the first '-- stats' marker; a metric file has a header of "
                    "'-- key: value' lines, then '-- stats', optional '-- merge', and '-- final'.",
                )
        else:
            sections[current].append(line)
    for required in ("stats", "final"):
        if sb.is_blank("\n".join(sections.get(required, []))):
            raise _fail(path, f"missing the '-- {required}' section.")
    name = header.get("metric") or Path(path).stem
    if not _NAME.match(name):
        raise _fail(path, f"metric name {name!r} must be a plain identifier.")

    stats_tree = _single_select("\n".join(sections["stats"]), section="stats", table="input", path=path)
    stats = _projections(stats_tree, section="stats", path=path)
    for stat, node in stats:
        if not any(_is_aggregate(n) for n in node.walk()):
            raise _fail(path, f"stats column {stat!r} is not an aggregate (write e.g. sum(...) or count(*)).")
        if any(isinstance(n, exp.Window) for n in node.walk()):
            raise _fail(path, f"stats column {stat!r} may not use a window function.")
        for col in sb.column_names(node):
            if col not in ROLES:
                raise _fail(path, f"stats column {stat!r} reads column {col!r}; input has only {', '.join(ROLES)}.")
    names = [n for n, _ in stats]

    merge = {n: "sum" for n in names}
    if not sb.is_blank("\n".join(sections.get("merge", []))):
        merge_tree = _single_select("\n".join(sections["merge"]), section="merge", table="partials", path=path)
        for out, node in _projections(merge_tree, section="merge", path=path):
            fn = node.key if isinstance(node, exp.AggFunc) else None
            arg = node.this if isinstance(node, exp.AggFunc) else None
            if fn not in MERGE_FUNCTIONS or not isinstance(arg, exp.Column) or arg.name != out:
                raise _fail(path, f"merge column {out!r} must be sum({out}), min({out}) or max({out}).")
            if out not in merge:
                raise _fail(path, f"merge column {out!r} is not a stats column ({', '.join(names)}).")
            merge[out] = MERGE_FUNCTIONS[fn]

    for stat, node in stats:
        _check_mergeable(stat, node, merge[stat], path)

    final_tree = _single_select("\n".join(sections["final"]), section="final", table="merged", path=path)
    finals = _projections(final_tree, section="final", path=path)
    if len(finals) != 1 or finals[0][0].lower() != "value":
        raise _fail(path, "the final query must return exactly one column named value.")
    final = finals[0][1]
    if any(isinstance(n, exp.AggFunc) for n in final.walk()):
        raise _fail(path, "the final query works on one merged row; it may not aggregate.")
    for col in sb.column_names(final):
        if col not in names:
            raise _fail(path, f"the final query reads {col!r}, which is not a stats column ({', '.join(names)}).")
    return Metric(name, header.get("description", ""), tuple(stats), merge, final, path, text)


def load_metric_file(path: str | os.PathLike[str]) -> Metric:
    p = os.fspath(path)
    try:
        text = Path(p).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MetricError(f"Cannot read metric file {p}: {e}", path=p) from None
    return parse_metric(text, path=p)


def builtin_metric_dir() -> Path:
    """The packaged ``sql/metrics`` folder (inside the wheel, or the repo's in a source checkout)."""
    packaged = resources.files("duckharness") / "sql" / "metrics"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "sql" / "metrics"


class MetricLibrary:
    """The metrics available by name: the packaged ones, then users' folders. A user's file with
    the name of a metric already known (shipped, or from an earlier folder) replaces it, with a
    :class:`~duckharness.errors.DuckHarnessWarning` naming both files."""

    def __init__(self, dirs: Iterable[str | os.PathLike[str]] = ()) -> None:
        self._metrics: dict[str, Metric] = {}
        self._origin: dict[str, str] = {}
        self._dirs: set[str] = set()  # folders read, symlinks resolved: one given twice is read once
        self.add_dir(builtin_metric_dir(), shipped=True)
        for d in dirs:
            self.add_dir(d)

    def add_dir(self, folder: str | os.PathLike[str], *, shipped: bool = False) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            what = "is a file; give the folder that holds metric .sql files" if folder.exists() else "does not exist"
            raise MetricError(f"Metric folder {folder} {what}.", path=str(folder))
        if os.path.realpath(folder) in self._dirs:
            return
        self._dirs.add(os.path.realpath(folder))
        seen: dict[str, str] = {}
        for f in sorted(folder.glob("*.sql")):
            m = load_metric_file(f)
            if m.name in seen:
                raise MetricError(
                    f"Metric {m.name!r} is defined twice in {folder}: {seen[m.name]} and {f}.",
                    metric=m.name,
                    path=str(f),
                )
            seen[m.name] = str(f)
            if m.name in self._origin:
                warn(
                    f"Metric {m.name!r} from {f} replaces the one from {self._origin[m.name]}; "
                    f"rename its '-- metric:' header to keep both."
                )
            self._metrics[m.name] = m
            self._origin[m.name] = "the shipped metrics" if shipped else str(f)

    def add(self, metric: Metric) -> None:
        self._metrics[metric.name] = metric
        self._origin[metric.name] = metric.path

    @property
    def names(self) -> list[str]:
        return sorted(self._metrics)

    def get(self, name: str) -> Metric:
        try:
            return self._metrics[name]
        except KeyError:
            raise UnknownMetricError(
                f"Unknown metric {name!r}. Available: {', '.join(self.names)}.", metric=name
            ) from None

    def resolve(self, names: Sequence[str | Metric] | str | None) -> list[Metric]:
        if names is None:
            return [self.get(n) for n in DEFAULT_METRICS if n in self._metrics]
        if isinstance(names, str):
            names = [names]
        out: dict[str, Metric] = {}
        for n in names:  # a metric named twice is one
            m = n if isinstance(n, Metric) else self.get(n)
            out.setdefault(m.name, m)
        return list(out.values())


DEFAULT_METRICS = ("count", "r2", "mse", "mae", "corr", "hit_rate")
