"""The one place where user input becomes SQL text.

Everything is built as sqlglot trees: identifiers go through :func:`ident` (quoted only when
needed), strings and paths through :func:`string` (quotes escaped), and trees are rendered in the
DuckDB dialect by :func:`render`. Other modules never paste user input into SQL strings.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import sqlglot
from sqlglot import exp
from sqlglot.dialects.dialect import Dialect
from sqlglot.errors import ParseError, TokenError

DIALECT = "duckdb"


class SQLParseError(ValueError):
    """Raised by the parse helpers; callers turn it into an error naming their own culprit."""


def ident(name: str) -> exp.Identifier:
    """A quoted-if-needed identifier.

    Example:
        >>> render(ident("exp 1")), render(ident("volume"))
        ('"exp 1"', 'volume')
    """
    return exp.to_identifier(name)  # type: ignore[return-value]


def column(name: str, table: str | None = None) -> exp.Column:
    return exp.column(ident(name), table=ident(table) if table else None)


def string(value: str) -> exp.Literal:
    """A SQL string literal with quotes escaped.

    Example:
        >>> render(string("data/o'brien/*.parquet"))
        "'data/o''brien/*.parquet'"
    """
    return exp.Literal.string(value)


def number(value: float | int) -> exp.Expr:
    """A numeric literal that round-trips the Python value exactly (negative values included)."""
    if isinstance(value, bool):
        return exp.Boolean(this=value)
    text = repr(float(value)) if isinstance(value, float) else str(value)
    if text in ("nan", "inf", "-inf"):
        return exp.cast(string(text), "DOUBLE")
    lit = exp.Literal.number(text.lstrip("-"))
    return exp.Neg(this=lit) if text.startswith("-") else lit


def render(node: exp.Expr, *, pretty: bool = False, copy: bool = True) -> str:
    """Render a tree as DuckDB SQL.

    sqlglot's generator may rewrite the tree it renders, so it renders a copy; ``copy=False``
    skips that deep copy (the costly half of rendering) for trees the engine built itself and
    renders only to text, such as the fused scan's aggregates and per-batch fragments.
    """
    return node.sql(dialect=DIALECT, pretty=pretty, copy=copy)


def timestamp(value: dt.datetime, *, with_tz: bool) -> exp.Expr:
    """A TIMESTAMPTZ literal of an aware UTC instant, or a naive TIMESTAMP of its UTC wall time."""
    utc = value.astimezone(dt.UTC)
    if with_tz:
        return exp.cast(string(utc.strftime("%Y-%m-%d %H:%M:%S.%f+00")), "TIMESTAMPTZ")
    return exp.cast(string(utc.strftime("%Y-%m-%d %H:%M:%S.%f")), "TIMESTAMP")


def date(value: dt.date) -> exp.Expr:
    return exp.cast(string(value.isoformat()), "DATE")


def read_parquet(
    paths: Sequence[str], *, union_by_name: bool = True, file_row_number: bool = False, filename: str | None = None
) -> exp.Expr:
    """``read_parquet([...], union_by_name = true)`` over the given files or globs (with
    ``file_row_number``, also each row's number within its file, as column ``file_row_number``;
    with ``filename``, each row's file path as a column of that name)."""
    args: list[exp.Expr] = [exp.Array(expressions=[string(p) for p in paths])]
    if union_by_name:
        args.append(exp.EQ(this=exp.var("union_by_name"), expression=exp.true()))
    if file_row_number:
        args.append(exp.EQ(this=exp.var("file_row_number"), expression=exp.true()))
    if filename is not None:
        args.append(exp.EQ(this=exp.var("filename"), expression=string(filename)))
    return exp.Anonymous(this="read_parquet", expressions=args)


def and_all(conditions: Iterable[exp.Expr]) -> exp.Expr | None:
    conds = [exp.paren(c.copy(), copy=False) for c in conditions]
    if not conds:
        return None
    return exp.and_(*conds, copy=False) if len(conds) > 1 else conds[0]


def or_all(conditions: Iterable[exp.Expr]) -> exp.Expr | None:
    conds = [exp.paren(c.copy(), copy=False) for c in conditions]
    if not conds:
        return None
    return exp.or_(*conds, copy=False) if len(conds) > 1 else conds[0]


def between(col: exp.Expr, lo: exp.Expr, hi: exp.Expr, *, hi_inclusive: bool) -> exp.Expr:
    if hi_inclusive:
        return exp.Between(this=col.copy(), low=lo, high=hi)
    return exp.and_(exp.GTE(this=col.copy(), expression=lo), exp.LT(this=col.copy(), expression=hi))


@functools.lru_cache(maxsize=256)
def _data_type(type_sql: str) -> exp.DataType:
    """A parsed type (parsing ``DOUBLE`` is most of the cost of building a cast); callers copy it.

    DuckDB names some types that sqlglot does not parse (``TIMESTAMPTZ_NS``, a Parquet column of
    type ``"NULL"``): those are kept as written, which DuckDB reads back."""
    try:
        return exp.DataType.build(type_sql, dialect=DIALECT)
    except ParseError:
        return exp.DataType.build(type_sql, dialect=DIALECT, udt=True)


def data_type(type_sql: str) -> exp.DataType:
    return _data_type(type_sql).copy()


def cast(node: exp.Expr, type_sql: str) -> exp.Expr:
    return exp.Cast(this=node, to=data_type(type_sql))


def is_valid_number(node: exp.Expr, type_sql: str) -> exp.Expr:
    """``x IS NOT NULL`` and, for floating-point columns, ``isfinite(x)`` (no NaN, no ±inf).

    ``isnan`` is not used: DuckDB folds it to false when a Parquet column's min/max statistics
    (which leave NaN out) are finite, so NaN rows would slip through (duckdb/duckdb#7803).
    """
    cond: exp.Expr = exp.Not(this=exp.Is(this=node.copy(), expression=exp.Null()))
    if type_sql.upper() in ("DOUBLE", "FLOAT", "REAL", "FLOAT4", "FLOAT8"):
        cond = exp.and_(cond, exp.Anonymous(this="isfinite", expressions=[node.copy()]))
    return cond


# --- parsing user SQL -------------------------------------------------------------------------


def parse_statement(sql: str) -> exp.Expr:
    """Parse exactly one SQL statement; raise :class:`SQLParseError` with the parser's message.

    Whitespace, comments and extra semicolons around the statement are not statements: sqlglot
    gives an empty statement (``;;``) as None and comments after a ``;`` as an ``exp.Semicolon``
    holding them, and both are left out of the count. The tokenizer decides what is a comment,
    so ``--`` or ``/*`` inside a string literal or a quoted identifier stays part of the SQL.

    Example:
        >>> render(parse_statement("SELECT * FROM t WHERE note = 'a -- b'; -- why"))
        "SELECT * FROM t WHERE note = 'a -- b'"
    """
    try:
        parsed = sqlglot.parse(sql, dialect=DIALECT)
    except ParseError as e:
        raise SQLParseError(_first_error(e)) from None
    except TokenError:
        raise SQLParseError(_token_error(sql)) from None
    trees = [t for t in parsed if t is not None and not isinstance(t, exp.Semicolon)]
    if len(trees) != 1:
        raise SQLParseError(f"expected one SQL statement, found {len(trees)}")
    return trees[0]


def parse_expression(sql: str) -> exp.Expr:
    """Parse a scalar SQL expression such as a WHERE condition."""
    try:
        return sqlglot.parse_one(sql, dialect=DIALECT, into=exp.Condition)
    except ParseError as e:
        raise SQLParseError(_first_error(e)) from None
    except TokenError:
        raise SQLParseError(_token_error(sql)) from None


def _token_error(sql: str) -> str:
    """The tokenizer's complaint in user terms: it stops at a quote or comment left open.

    Example:
        >>> try:
        ...     parse_statement("SELECT * FROM t WHERE s = 'A")
        ... except SQLParseError as err:
        ...     print(err)
        a quote ('...', "...") or a /* comment is not closed (the SQL ends inside it), in: SELECT * FROM t WHERE s = 'A
    """
    text = one_line(sql)  # (the tokenizer's own excerpt stops short of the end, where the open quote runs to)
    where = text if len(text) <= 80 else "…" + text[-79:]
    return f"a quote ('...', \"...\") or a /* comment is not closed (the SQL ends inside it), in: {where}"


def one_line(sql: str) -> str:
    """The user's SQL text without its comments, on one line (runs of whitespace made one space),
    for listings and reprs. Comments are found by the tokenizer, so a ``--`` or ``/*`` inside a
    string literal or a quoted identifier is kept.

    Example:
        >>> one_line("-- keep liquid names\\nSELECT *  /* all */ FROM baseline\\n  WHERE note <> 'a -- b'; -- end")
        "SELECT * FROM baseline WHERE note <> 'a -- b';"
    """
    try:
        tokens = Dialect.get_or_raise(DIALECT).tokenize(sql)
    except TokenError:  # not SQL the tokenizer accepts: shown as it is
        return " ".join(sql.split())
    parts: list[str] = []
    end = -1
    for token in tokens:
        # What lies between two tokens is whitespace and comments: one space if anything.
        if parts and token.start > end + 1:
            parts.append(" ")
        parts.append(sql[token.start : token.end + 1])
        end = token.end
    return " ".join("".join(parts).split())


def is_blank(sql: str) -> bool:
    """Whether SQL text holds nothing but whitespace, comments and semicolons.

    Example:
        >>> is_blank("-- to do\\n;"), is_blank("SELECT '-- not a comment'")
        (True, False)
    """
    return not one_line(sql).strip(" ;")


def _first_error(e: ParseError) -> str:
    """The parser's first complaint in user terms, with where it is and the text just before it.

    Example:
        >>> try:
        ...     parse_expression("volume >> ")
        ... except SQLParseError as err:
        ...     print(err)
        incomplete expression (an operand is missing) at line 1, column 9, after 'volume >>'
    """
    if not e.errors:
        return str(e)
    err = e.errors[0]
    description = str(err.get("description") or "syntax error")
    if re.match(r"Required keyword: '\w+' missing for <class ", description):
        # sqlglot names its own node class here, which means nothing to a user.
        description = "incomplete expression (an operand is missing)"
    before = f"{err.get('start_context') or ''}{err.get('highlight') or ''}".strip()
    near = f", after {before[-40:]!r}" if before else ""
    return f"{description} at line {err.get('line')}, column {err.get('col')}{near}"


def column_names(node: exp.Expr) -> list[str]:
    """Unqualified names of the columns a tree reads, in order of first appearance."""
    seen: dict[str, None] = {}
    for c in node.find_all(exp.Column):
        seen.setdefault(c.name, None)
    return list(seen)


def substitute_columns(node: exp.Expr, mapping: Mapping[str, exp.Expr]) -> exp.Expr:
    """Replace every column reference by its expression in ``mapping`` (parenthesised)."""

    def swap(n: exp.Expr) -> exp.Expr:
        if isinstance(n, exp.Column) and not isinstance(n.this, exp.Star) and n.name in mapping:
            new = mapping[n.name].copy()
            atomic = isinstance(new, (exp.Column, exp.Literal, exp.Paren, exp.Null, exp.Boolean))
            return new if atomic else exp.paren(new, copy=False)
        return n

    return node.copy().transform(swap, copy=False)


def select(
    projections: Sequence[exp.Expr], from_: exp.Expr | str, *, where: exp.Expr | None = None, group_by_all: bool = False
) -> exp.Select:
    # The new SELECT is the builder's own: no defensive copy of it (and its projections) for FROM.
    q = exp.select(*projections).from_(from_ if isinstance(from_, exp.Expr) else exp.to_table(from_), copy=False)
    if where is not None:
        q = q.where(where, copy=False)
    if group_by_all:
        q.set("group", exp.Group(all=True))
    return q


def alias(node: exp.Expr, name: str, *, copy: bool = True) -> exp.Expr:
    """``node AS name``; ``copy=False`` puts ``node`` itself under the alias (for trees that are
    built only to be rendered)."""
    return exp.alias_(node, ident(name), copy=copy)


def create_view(name: str, query: exp.Expr, *, temp: bool = False) -> exp.Create:
    props = exp.Properties(expressions=[exp.TemporaryProperty()]) if temp else None
    return exp.Create(this=exp.Table(this=ident(name)), kind="VIEW", replace=True, expression=query, properties=props)


def func(name: str, *args: exp.Expr) -> exp.Expr:
    return exp.Anonymous(this=name, expressions=list(args))


def try_cast(node: exp.Expr, type_sql: str) -> exp.Expr:
    return exp.TryCast(this=node, to=data_type(type_sql))


def is_null(node: exp.Expr) -> exp.Expr:
    return exp.Is(this=node, expression=exp.Null())


def eq(a: exp.Expr, b: exp.Expr) -> exp.Expr:
    return exp.EQ(this=a, expression=b)


def string_array(values: Sequence[str]) -> exp.Expr:
    return exp.Array(expressions=[string(v) for v in values])


def table_function(name: str, paths: Sequence[str]) -> exp.Expr:
    """``name(['a', 'b'])``, e.g. ``parquet_metadata`` over a list of files."""
    return func(name, string_array(paths))


def common_type_query(a: str, b: str) -> str:
    """A query whose one value is the type DuckDB unifies ``a`` and ``b`` to."""

    def side(t: str) -> exp.Select:
        return exp.select(alias(cast(exp.Null(), t), "x"))

    union = exp.Union(this=side(a), expression=side(b), distinct=False, by_name=True)
    return render(exp.select(func("typeof", column("x"))).from_(union.subquery()).limit(1))


@dataclass(frozen=True)
class RenderedSlots:
    """Slot fragments rendered once, to fill several skeletons (see :func:`fill_slots`)."""

    text: Mapping[str, str]


def render_slots(fragments: Mapping[str, exp.Expr]) -> RenderedSlots:
    return RenderedSlots({slot: render(node, copy=False) for slot, node in fragments.items()})


def fill_slots(skeleton: str, fragments: Mapping[str, exp.Expr] | RenderedSlots) -> str:
    """Put rendered trees into a rendered skeleton in place of slot identifiers.

    Rendering a large tree is the costly part of building a query; a skeleton rendered once with
    identifiers such as ``__dh_slot_from__`` can be filled for each batch with small trees.
    """
    rendered = fragments if isinstance(fragments, RenderedSlots) else render_slots(fragments)
    out = skeleton
    for slot, text in rendered.text.items():
        if slot not in out:
            raise KeyError(slot)
        out = out.replace(slot, text)
    return out


def create_macro(name: str, params: Sequence[str], body: exp.Expr) -> exp.Create:
    """``CREATE OR REPLACE MACRO name(params) AS body``."""
    fn = exp.UserDefinedFunction(this=exp.Table(this=ident(name)), expressions=[ident(p) for p in params], wrapped=True)
    return exp.Create(this=fn, kind="MACRO", replace=True, expression=body)


def values_table(rows: Sequence[Sequence[str]], alias_name: str, columns: Sequence[str]) -> exp.Expr:
    """``(VALUES ('a', 'b'), ...) AS alias(col, ...)`` of string literals."""
    values = exp.Values(
        expressions=[exp.Tuple(expressions=[string(v) for v in row]) for row in rows],
        alias=exp.TableAlias(this=ident(alias_name), columns=[ident(c) for c in columns]),
    )
    return values


def attach(path: str, alias_name: str, storage_version: str) -> exp.Expr:
    """``ATTACH 'path' AS alias (STORAGE_VERSION 'v')``."""
    return exp.Attach(
        this=exp.alias_(string(path), ident(alias_name)),
        expressions=[exp.AttachOption(this=exp.var("STORAGE_VERSION"), expression=string(storage_version))],
    )


def window(fn: exp.Expr, partition_by: Sequence[exp.Expr], order_by: Sequence[exp.Expr] = ()) -> exp.Expr:
    """``fn OVER (PARTITION BY ... ORDER BY ...)``."""
    order = exp.Order(expressions=[exp.Ordered(this=o, nulls_first=False) for o in order_by]) if order_by else None
    return exp.Window(this=fn, partition_by=list(partition_by) or None, order=order, over="OVER")


def union_all(queries: Sequence[exp.Expr]) -> exp.Expr:
    """``q1 UNION ALL q2 UNION ALL ...`` (one query: itself)."""
    out = queries[0]
    for q in queries[1:]:
        out = exp.Union(this=out, expression=q, distinct=False)
    return out


def with_ctes(query: exp.Select, ctes: Sequence[tuple[str, exp.Expr]]) -> exp.Select:
    """``WITH name AS (...), ... <query>``."""
    for name, cte in ctes:
        query = query.with_(ident(name), as_=cte, copy=False)
    return query
