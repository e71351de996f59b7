"""Experiments: named SQL steps chained from ``baseline`` or from each other.

A step is a WHERE condition over its base, or a full SELECT whose FROM clause names its base.
Each step is validated when it is added: it must parse, its base must exist, its name must be
new, the chain must not loop, and DuckDB must be able to bind it (so an unknown column is caught
at once, with the experiment named). Steps that only filter rows and compute columns row by row
are *inlined* into expressions over the baseline columns, which lets the engine answer every
experiment from one read of each file.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import duckdb
from sqlglot import exp

from duckharness import sqlbuild as sb
from duckharness.errors import (
    DuplicateExperimentError,
    ExperimentCycleError,
    ExperimentError,
    ExperimentSQLError,
    UnknownColumnError,
    UnknownExperimentError,
)

BASELINE = "baseline"
_VOLATILE = {"random", "uuid", "gen_random_uuid", "nextval", "currval", "setseed", "uuidv4", "uuidv7"}
_MARKER = re.compile(r"^\s*--\s*experiment\s*:\s*(.+?)\s*$", re.IGNORECASE)
_NAME = re.compile(r"^[^\x00\"]+$")


@dataclass(frozen=True, repr=False)
class Step:
    """One experiment: its name and base, and either SQL (the user's text and the normalised
    SELECT over the base) or a Python function on a Polars LazyFrame.

    A Python step runs on each file batch separately when ``per_batch`` is true (the default:
    right for row-by-row logic and for logic within a day), or once over all rows when false.
    """

    name: str
    base: str
    sql: str
    query: exp.Expr | None
    depends: tuple[str, ...] = ()
    fn: Callable[[Any], Any] | None = None
    per_batch: bool = True

    @property
    def is_python(self) -> bool:
        return self.fn is not None

    @property
    def label(self) -> str:
        """``SQL: ...`` or ``python: module.function``, for listings."""
        if self.fn is not None:
            mode = "per batch" if self.per_batch else "whole data"
            return f"python: {function_name(self.fn)} ({mode})"
        return "SQL: " + sb.one_line(self.sql)

    def __repr__(self) -> str:
        # The parsed tree's own repr runs to a dozen lines; the user's SQL on one line says it all.
        if self.fn is not None:
            what = f"fn={function_name(self.fn)!r}, per_batch={self.per_batch}"
        else:
            sql = sb.one_line(self.sql)
            what = f"sql={sql if len(sql) <= 80 else sql[:77] + '...'!r}"
        kind = "python" if self.fn is not None else "sql"
        return f"Step(name={self.name!r}, base={self.base!r}, kind={kind!r}, {what})"

    def render(self, *, pretty: bool = True) -> str:
        if self.query is None:
            return f"-- {self.label}"
        return sb.render(self.query, pretty=pretty)


def function_name(fn: Callable[..., Any]) -> str:
    mod = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return f"{mod}.{name}" if mod and mod != "__main__" else name


def pickle_error(fn: Callable[..., Any]) -> Exception | None:
    """Why cloudpickle cannot pickle ``fn`` (which the ``processes``, ``ray`` and ``dask``
    executors do to send a Python step to their workers), or None when it can.

    Example:
        >>> import threading
        >>> lock = threading.Lock()
        >>> pickle_error(lambda lf: lf) is None
        True
        >>> pickle_error(lambda lf: lock and lf)
        TypeError("cannot pickle '_thread.lock' object")
    """
    import cloudpickle

    try:
        cloudpickle.dumps(fn)
    except Exception as e:  # TypeError, PicklingError, AttributeError, RecursionError, ...
        return e
    return None


def python_step(name: str, fn: Callable[[Any], Any], base: str | None, *, per_batch: bool = True) -> Step:
    """A step that applies ``fn`` (Polars LazyFrame -> LazyFrame) to the rows of its base."""
    if not isinstance(name, str) or not name.strip() or not _NAME.match(name):
        raise ExperimentSQLError(f"Experiment name {name!r} is not valid.", experiment=str(name))
    if name.lower() == BASELINE:
        raise DuplicateExperimentError("'baseline' is the windowed source; choose another name.", experiment=name)
    if not callable(fn):
        raise ExperimentError(
            f"Experiment {name!r}: a step is SQL text or a callable, got {type(fn).__name__}.", experiment=name
        )
    parent = base or BASELINE
    return Step(name, parent, function_name(fn), None, (parent,), fn, per_batch)


@dataclass(frozen=True)
class Inlined:
    """An experiment as expressions over baseline columns: a WHERE list and a column mapping."""

    conditions: tuple[exp.Expr, ...]
    mapping: Mapping[str, exp.Expr] = field(default_factory=dict)


def _read_tables(tree: exp.Expr) -> Iterator[exp.Table]:
    """The tables ``tree`` reads by bare name (experiments), not its own CTEs or qualified ones."""
    ctes = {c.alias_or_name for c in tree.find_all(exp.CTE)}
    for t in tree.find_all(exp.Table):
        if t.name and t.name not in ctes and not t.args.get("db"):
            yield t


def _referenced_tables(tree: exp.Expr) -> list[str]:
    return list(dict.fromkeys(t.name for t in _read_tables(tree)))


def parse_step(name: str, sql: str, base: str | None) -> Step:
    """Turn the user's SQL for one experiment into a :class:`Step` (no binding yet)."""
    if not isinstance(name, str) or not name.strip() or not _NAME.match(name):
        raise ExperimentSQLError(f"Experiment name {name!r} is not valid.", experiment=str(name))
    if name.lower() == BASELINE:
        raise DuplicateExperimentError("'baseline' is the windowed source; choose another name.", experiment=name)
    text = sql.strip().rstrip(";").strip()
    if sb.is_blank(text):
        raise ExperimentSQLError(f"Experiment {name!r} has no SQL.", experiment=name)
    try:
        tree = sb.parse_statement(text)
    except sb.SQLParseError as e:
        raise ExperimentSQLError(f"Experiment {name!r}: SQL does not parse: {e}.", experiment=name) from None
    if isinstance(tree, exp.Query):
        tables = _referenced_tables(tree)
        if not tables:
            raise ExperimentSQLError(
                f"Experiment {name!r}: the SELECT must read FROM its base (e.g. FROM baseline).", experiment=name
            )
        if base is not None and base.lower() not in {t.lower() for t in tables}:
            raise ExperimentSQLError(
                f"Experiment {name!r}: base {base!r} was given but the SELECT reads from {', '.join(tables)}.",
                experiment=name,
            )
        return Step(name, base or tables[0], sql, tree, tuple(tables))
    if isinstance(tree, (exp.DDL, exp.DML, exp.Command)) or not isinstance(tree, exp.Condition):
        raise ExperimentSQLError(
            f"Experiment {name!r}: a step is a WHERE condition or a SELECT, got {type(tree).__name__}.", experiment=name
        )
    parent = base or BASELINE
    query = exp.select(exp.Star()).from_(exp.Table(this=sb.ident(parent))).where(tree)
    return Step(name, parent, sql, query, (parent,))


def parse_experiments_file(text: str, *, path: str = "<experiments>", known: Iterable[str] = (BASELINE,)) -> list[Step]:
    """Split a file whose statements are each preceded by ``-- experiment: NAME``.

    Example:
        >>> [s.name for s in parse_experiments_file('''
        ... -- experiment: liquid
        ... SELECT * FROM baseline WHERE volume > 1000;
        ... -- experiment: tight
        ... SELECT * FROM liquid WHERE spread < 0.02;''')]
        ['liquid', 'tight']
    """
    chunks: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if m := _MARKER.match(line):
            chunks.append((m.group(1), []))
        elif chunks:
            chunks[-1][1].append(line)
        elif line.strip() and not line.strip().startswith("--"):
            raise ExperimentSQLError(f"{path}: SQL before the first '-- experiment: NAME' line.")
    if not chunks:
        raise ExperimentSQLError(f"{path}: no '-- experiment: NAME' lines found.")
    steps: list[Step] = []
    seen: dict[str, str] = {}  # lower-cased: names are case-insensitive, as DuckDB's are
    for name, lines in chunks:
        if name.lower() in seen:
            first = seen[name.lower()]
            same = "" if first == name else f" (as {first!r}: names are case-insensitive)"
            raise DuplicateExperimentError(f"{path}: experiment {name!r} is defined twice{same}.", experiment=name)
        seen[name.lower()] = name
        try:
            steps.append(parse_step(name, "\n".join(lines), None))
        except ExperimentSQLError as e:
            raise ExperimentSQLError(f"{path}: {e}", experiment=e.experiment) from None
    return order_steps(steps, known=set(known))


def spelled_as_defined(step: Step, names: Iterable[str]) -> Step:
    """``step`` with each experiment it reads spelled as that experiment was named: DuckDB names
    are case-insensitive, so ``FROM LIQUID`` reads ``liquid`` (as the exported views do too)."""
    spelled = {n.lower(): n for n in names}
    rename = {d: spelled[d.lower()] for d in step.depends if spelled.get(d.lower(), d) != d}
    if not rename:
        return step
    query = step.query
    if query is not None:
        query = query.copy()
        for t in list(_read_tables(query)):
            if t.name in rename:
                t.set("this", sb.ident(rename[t.name]))
    depends = tuple(dict.fromkeys(rename.get(d, d) for d in step.depends))
    return dataclasses.replace(step, base=rename.get(step.base, step.base), query=query, depends=depends)


def order_steps(steps: Iterable[Step], known: Iterable[str]) -> list[Step]:
    """Order steps so each comes after its bases; name unknown bases and cycles."""
    steps = list(steps)
    done = set(known)
    names = [*done, *(s.name for s in steps)]
    pending = {s.name: spelled_as_defined(s, names) for s in steps}
    out: list[Step] = []
    for s in pending.values():
        for dep in s.depends:
            if dep not in pending and dep not in done:
                raise UnknownExperimentError(
                    f"Experiment {s.name!r} reads from {dep!r}, which is not an experiment "
                    f"(known: {', '.join(sorted(done | set(pending)))}).",
                    experiment=dep,
                )
    while pending:
        # Keep the file's order where the dependencies allow it.
        ready = next((s for s in pending.values() if all(d in done for d in s.depends)), None)
        if ready is None:
            cycle = _find_cycle(pending)
            raise ExperimentCycleError("Experiments form a cycle: " + " -> ".join(cycle) + ".", cycle=cycle)
        out.append(ready)
        done.add(ready.name)
        del pending[ready.name]
    return out


def _find_cycle(pending: Mapping[str, Step]) -> list[str]:
    start = next(iter(pending))
    path: list[str] = []
    node = start
    while node not in path:
        path.append(node)
        node = next(d for d in pending[node].depends if d in pending)
    return [*path[path.index(node) :], node]


_COLUMN_ERR = re.compile(
    r'(?:[Cc]olumn\s+(?:with name\s+)?"?([^"\s]+)"?\s+(?:not found|does not exist))'
    r'|(?:does not have a column named\s+"([^"]+)")'
)


class Experiments:
    """The set of experiments of one harness, validated against the baseline's columns.

    ``binder`` is given each new step, creates it over zero-row relations (a view for SQL, the
    function applied to an empty LazyFrame for Python) and returns its output columns; it raises
    :class:`duckdb.Error` on a binding error.
    """

    def __init__(self, baseline_columns: Mapping[str, str], binder: Callable[[Step], dict[str, str]]):
        self._bind: Callable[[Step], dict[str, str]] | None = binder
        self._steps: dict[str, Step] = {}
        self._columns: dict[str, dict[str, str]] = {BASELINE: dict(baseline_columns)}

    # -- registry ---------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [BASELINE, *self._steps]

    def __contains__(self, name: object) -> bool:
        return name == BASELINE or name in self._steps

    def step(self, name: str) -> Step:
        self._check_known(name)
        return self._steps[name]

    def _check_known(self, name: str) -> None:
        if name not in self:
            raise UnknownExperimentError(
                f"Unknown experiment {name!r}. Defined: {', '.join(self.names)}.", experiment=name
            )

    def columns(self, name: str) -> dict[str, str]:
        self._check_known(name)
        return dict(self._columns[name])

    def add(
        self,
        name: str,
        sql: str | Callable[[Any], Any],
        base: str | None = None,
        *,
        per_batch: bool = True,
        replace: bool = False,
    ) -> Step:
        """Parse, validate and register one step: SQL (see :func:`parse_step`) or a Python function
        on a Polars LazyFrame (see :func:`python_step`). With ``replace``, a step of that name is
        replaced and the experiments built on it are validated again on the new one (if any of
        them no longer binds, nothing changes)."""
        step = (
            parse_step(name, sql, base) if isinstance(sql, str) else python_step(name, sql, base, per_batch=per_batch)
        )
        step = spelled_as_defined(step, [BASELINE, *self._steps, name])
        # DuckDB names are case-insensitive: "Liquid" and "liquid" would be the same view.
        clash = next((n for n in self._steps if n.lower() == name.lower()), None)
        if clash is not None and not (replace and clash == name):
            same = "already exists" if clash == name else f"clashes with {clash!r} (names are case-insensitive)"
            hint = "Use replace=True to replace it" if clash == name else "Remove it first"
            raise DuplicateExperimentError(
                f"Experiment {name!r} {same}. {hint} (remove_experiment), or choose another name.", experiment=name
            )
        users = self._built_on(name) if clash is not None else []
        for dep in step.depends:
            if dep == name or dep in users:
                cycle = [name, name] if dep == name else [name, dep, name]
                raise ExperimentCycleError(
                    f"Experiment {name!r} reads from {'itself' if dep == name else dep}"
                    + ("." if dep == name else f", which is built on {name!r}."),
                    cycle=cycle,
                )
            if dep not in self:
                raise UnknownExperimentError(
                    f"Experiment {name!r} reads from {dep!r}, which is not an experiment "
                    f"(defined: {', '.join(self.names)}).",
                    experiment=dep,
                )
        if clash is None:
            self._columns[name] = self._bind_step(step)
            self._steps[name] = step
            return step
        # Replace: the step, then the experiments built on it, in order, after everything they
        # read (the new step may read an experiment defined after the old one).
        before, columns = dict(self._steps), dict(self._columns)
        try:
            self._columns[name] = self._bind_step(step)
            for n in users:
                self._columns[n] = self._bind_step(before[n])
        except BaseException:
            self._columns = columns
            for s in [before[name], *(before[n] for n in users)]:  # the views as they were
                self._bind_step(s)
            raise
        order = [s for n, s in before.items() if n != name and n not in users] + [step]
        self._steps = {s.name: s for s in [*order, *(before[n] for n in users)]}
        return step

    def _built_on(self, name: str) -> list[str]:
        """The experiments whose chains read ``name``, in definition order."""
        out: list[str] = []
        for n, s in self._steps.items():
            if any(d == name or d in out for d in s.depends):
                out.append(n)
        return out

    def add_all(self, steps: Iterable[Step]) -> None:
        for s in order_steps(steps, known=self.names):
            self.add(s.name, s.sql, s.base if s.base != BASELINE or isinstance(s.query, exp.Query) else None)

    def has_python(self, name: str) -> bool:
        """Whether any step of the chain to ``name`` is a Python function."""
        return any(s.is_python for s in self.chain(name))

    def batchable(self, name: str) -> bool:
        """Whether running the chain on each file batch gives the same rows as running it on all
        the data: every SQL step works row by row, and every Python step is per batch."""
        return all((s.per_batch if s.is_python else _row_local(s.query)) for s in self.chain(name))

    def tree(self) -> str:
        """The experiments as a tree from baseline, each with its step's SQL or Python name."""
        children: dict[str, list[str]] = {}
        for s in self._steps.values():
            children.setdefault(s.base, []).append(s.name)
        lines = [BASELINE]

        def walk(node: str, prefix: str) -> None:
            kids = children.get(node, [])
            for i, kid in enumerate(kids):
                last = i == len(kids) - 1
                step = self._steps[kid]
                label = step.label
                if len(label) > 100:
                    label = label[:97] + "..."
                others = [d for d in step.depends if d != step.base]  # drawn under its base only
                also = f"  (also reads {', '.join(others)})" if others else ""
                lines.append(f"{prefix}{'└── ' if last else '├── '}{kid}{also}  {label}")
                walk(kid, prefix + ("    " if last else "│   "))

        walk(BASELINE, "")
        return "\n".join(lines)

    def remove(self, name: str) -> None:
        self._check_known(name)
        users = [s.name for s in self._steps.values() if name in s.depends]
        if users:
            raise ExperimentError(
                f"Experiment {name!r} is the base of {', '.join(users)}; remove those first.", experiment=name
            )
        del self._steps[name]
        del self._columns[name]

    def __getstate__(self) -> dict[str, Any]:
        # Shipped to workers without the binder (it holds the harness's connection); a worker
        # only reads chains, it never adds steps.
        return {**self.__dict__, "_bind": None}

    def _bind_step(self, step: Step) -> dict[str, str]:
        if self._bind is None:
            raise ExperimentError("Experiments shipped to a worker cannot take new steps.", experiment=step.name)
        try:
            return self._bind(step)
        except duckdb.Error as e:
            msg = str(e).strip().splitlines()[0]
            if m := _COLUMN_ERR.search(msg):
                col = m.group(1) or m.group(2)
                raise UnknownColumnError(
                    f"Experiment {step.name!r} reads column {col!r}, which {step.base!r} does not have. "
                    f"Columns of {step.base!r}: {', '.join(self._columns[step.base])}.",
                    column=col,
                    experiment=step.name,
                ) from None
            raise ExperimentSQLError(
                f"Experiment {step.name!r} is not valid SQL for DuckDB: {msg}", experiment=step.name
            ) from None

    def for_chain(self, name: str) -> Experiments:
        """A copy holding only the steps of ``name``'s chain, without the binder: what a worker
        needs to build it. A run ships no other experiment's step (one that does not pickle, say,
        must not stop the runs of the others)."""
        keep = {s.name for s in self.chain(name)}
        out = Experiments.__new__(Experiments)
        out._bind = None
        out._steps = {n: s for n, s in self._steps.items() if n in keep}
        out._columns = {n: c for n, c in self._columns.items() if n in keep or n == BASELINE}
        return out

    def unpicklable_step(self, name: str) -> tuple[Step, Exception] | None:
        """The first Python step of ``name``'s chain whose function does not pickle, with the
        error, or None (see :func:`pickle_error`)."""
        for s in self.chain(name):
            if s.fn is not None and (error := pickle_error(s.fn)) is not None:
                return s, error
        return None

    # -- views --------------------------------------------------------------------------------
    def chain(self, name: str) -> list[Step]:
        """The steps from baseline to ``name`` (dependencies first)."""
        self._check_known(name)
        out: list[Step] = []

        def visit(n: str) -> None:
            if n == BASELINE or any(s.name == n for s in out):
                return
            for d in self._steps[n].depends:
                visit(d)
            out.append(self._steps[n])

        visit(name)
        return out

    def query(self, name: str, baseline: exp.Expr) -> exp.Expr:
        """One self-contained query for ``name``: ``WITH baseline AS (...), step AS (...) SELECT *``."""
        q = exp.select(exp.Star()).from_(exp.Table(this=sb.ident(name)))
        q = q.with_(sb.ident(BASELINE), as_=baseline.copy(), copy=False)
        for s in self.chain(name):
            if s.query is None:
                raise ExperimentError(
                    f"Experiment {name!r} has a Python step ({s.name}: {s.label}); it has no single SQL query.",
                    experiment=name,
                )
            q = q.with_(sb.ident(s.name), as_=s.query.copy(), copy=False)  # (copying q each time: N² nodes)
        return q

    # -- inlining -----------------------------------------------------------------------------
    def inline(self, name: str) -> Inlined | None:
        """``name`` as conditions and column expressions over baseline columns, or None when a
        step aggregates, uses windows, joins, limits or anything else that is not row-by-row."""
        self._check_known(name)
        if name == BASELINE:
            return Inlined((), {c: sb.column(c) for c in self._columns[BASELINE]})
        step = self._steps[name]
        if step.query is None:
            return None
        parent = self.inline(step.base)
        if parent is None:
            return None
        return _inline_select(step.query, parent, list(self._columns[name]))


def _row_local(q: exp.Expr | None) -> bool:
    """Whether a step's SELECT works row by row over a single base (no aggregate, window, join,
    LIMIT, DISTINCT, subquery or volatile function), so it can run on any subset of the rows."""
    if not isinstance(q, exp.Select):
        return False
    for arg in (
        "joins",
        "group",
        "having",
        "qualify",
        "limit",
        "offset",
        "distinct",
        "with_",
        "laterals",
        "pivots",
        "windows",
        "sample",
        "prewhere",
        "connect",
        "match",
    ):
        if q.args.get(arg):
            return False
    from_ = q.args.get("from_") or q.args.get("from")
    if from_ is None or not isinstance(from_.this, exp.Table):
        return False
    for node in q.walk():
        if isinstance(node, (exp.AggFunc, exp.Window, exp.Subquery, exp.Unnest, exp.Lambda)):
            return False
        if isinstance(node, exp.Select) and node is not q:
            return False
        if isinstance(node, exp.Func) and (
            node.sql_name().lower() in _VOLATILE
            or (isinstance(node, exp.Anonymous) and str(node.this).lower() in _VOLATILE)
        ):
            return False
        if isinstance(node, exp.Rand):
            return False
    return True


def _inline_select(q: exp.Expr, parent: Inlined, out_names: list[str]) -> Inlined | None:
    if not _row_local(q):
        return None
    assert isinstance(q, exp.Select)
    env = dict(parent.mapping)
    items: list[tuple[str | None, exp.Expr]] = []
    for proj in q.expressions:
        star = (
            proj
            if isinstance(proj, exp.Star)
            else (proj.this if isinstance(proj, exp.Column) and isinstance(proj.this, exp.Star) else None)
        )
        if star is not None:
            excluded = {c.name for c in (star.args.get("except_") or star.args.get("except") or [])}
            replaced = {r.alias: r.this for r in (star.args.get("replace") or [])}
            if star.args.get("rename"):
                return None
            for c in parent.mapping:
                if c in excluded:
                    continue
                node = sb.substitute_columns(replaced[c], env) if c in replaced else env[c]
                items.append((c, node))
            continue
        name = proj.alias if isinstance(proj, exp.Alias) else None
        body = proj.this if isinstance(proj, exp.Alias) else proj
        if any(isinstance(n, exp.Star) for n in body.walk()):
            return None
        # Columns resolve against the base first, then against earlier aliases (DuckDB's rules).
        scope = {**{n: e for n, e in items if n is not None}, **env}
        missing = [c for c in sb.column_names(body) if c not in scope]
        if missing:
            return None
        items.append((name, sb.substitute_columns(body, scope)))
    if len(items) != len(out_names):
        return None
    mapping = dict(zip(out_names, (e for _, e in items), strict=True))
    conditions = list(parent.conditions)
    where = q.args.get("where")
    if where is not None:
        scope = {**mapping, **env}
        if any(c not in scope for c in sb.column_names(where.this)):
            return None
        conditions.append(sb.substitute_columns(where.this, scope))
    return Inlined(tuple(conditions), mapping)
