"""``metadata.json`` beside the data, and the session window it defines.

The session window is local wall-clock time on each day. It is turned into one pair of absolute
(UTC) bounds per day, so that a day on either side of a daylight-saving switch keeps exactly the
local window, and so that DuckDB compares plain timestamps (which lets Parquet row-group
statistics skip data) instead of converting every row to local time.
"""

from __future__ import annotations

import datetime as dt
import difflib
import functools
import itertools
import json
import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from duckharness.errors import MetadataError, warn

DEFAULT_TIMEZONE = "US/Eastern"
KNOWN_KEYS = ("start_time", "end_time", "timezone", "time_column")
# Keys users write for the known ones (compared without case, spaces, dashes or underscores).
_ALIASES = {
    "start": "start_time",
    "sessionstart": "start_time",
    "end": "end_time",
    "sessionend": "end_time",
    "tz": "timezone",
    "zone": "timezone",
    "timecol": "time_column",
    "timestampcolumn": "time_column",
}
_TIME_RE = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?$")


def parse_wall_time(text: Any, *, key: str, path: str | None = None, label: str | None = None) -> dt.time:
    """Parse a local wall-clock time written ``HH:MM`` or ``HH:MM:SS[.ffffff]``.

    ``key`` names the metadata key (and ``path`` its file) in errors; ``label`` replaces
    "Key 'start_time'" for a time that did not come from a file (a window given per call).

    Example:
        >>> parse_wall_time("09:30", key="start_time")
        datetime.time(9, 30)
    """
    subject = label or (f"Key {key!r} in {path}" if path else f"Key {key!r}")
    if not isinstance(text, str) or not (m := _TIME_RE.match(text.strip())):
        raise MetadataError(
            f"{subject} must be a wall-clock time 'HH:MM' or 'HH:MM:SS', got {text!r}.",
            path=path,
            key=key,
        )
    hh, mm, ss, frac = m.groups()
    try:
        return dt.time(int(hh), int(mm), int(ss or 0), int((frac or "0").ljust(6, "0")))
    except ValueError:
        raise MetadataError(f"{subject} is not a valid time of day: {text!r}.", path=path, key=key) from None


def load_timezone(
    name: Any, *, key: str = "timezone", path: str | None = None, label: str | None = None
) -> zoneinfo.ZoneInfo:
    """Return the IANA time zone called ``name``, or a :class:`MetadataError` naming the key
    (``label``, e.g. "the window's timezone", names a zone that did not come from a file)."""
    where = f" in {path}" if path else ""
    subject = label or f"key {key!r}{where}"
    if not isinstance(name, str) or not name:
        raise MetadataError(
            f"{subject[0].upper()}{subject[1:]} must be an IANA time zone name such as 'America/New_York', "
            f"got {name!r}.",
            path=path,
            key=key,
        )
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise MetadataError(
            f"Unknown time zone {name!r} for {subject}; use an IANA name such as "
            f"'America/New_York' or 'Europe/London'.",
            path=path,
            key=key,
        ) from None


def parse_window_text(text: str, *, prefix: str = "") -> tuple[dt.time | None, dt.time | None]:
    """The bounds of a window written ``START-END`` (``--window`` on the command line,
    ``window="10:00-11:00"`` in Python): ``HH:MM[:SS]`` times, either of which may be left out
    for an open end (``10:00-``, ``-15:00``), not both; two equal times are refused. ``prefix``
    starts each error message (e.g. ``"Window "``).

    Example:
        >>> parse_window_text("10:00-11:30"), parse_window_text("-15:00")
        ((datetime.time(10, 0), datetime.time(11, 30)), (None, datetime.time(15, 0)))
    """
    start, dash, end = text.strip().partition("-")
    start, end = start.strip(), end.strip()
    if not dash or not (start or end):
        raise MetadataError(
            f"{prefix}{text!r} must be START-END, e.g. 09:30-16:00 (or 10:00- / -15:00 for one bound).",
            key="window",
        )
    lo, hi = (parse_wall_time(b, key="window", label=f"{prefix}{text!r}: {b!r}") if b else None for b in (start, end))
    if lo is not None and lo == hi:
        raise MetadataError(
            f"{prefix}{text!r}: starts and ends at one time; a window needs two (an end before the start "
            f"runs overnight; leave one out for an open end).",
            key="window",
        )
    return lo, hi


def _window_bound(value: Any, which: str) -> dt.time | None:
    """A window bound given as a ``datetime.time`` or an ``HH:MM[:SS]`` string (None: open)."""
    label = f"Window {which}"
    if value is None:
        return None
    if isinstance(value, str):
        return parse_wall_time(value, key=which, label=label)
    if not isinstance(value, dt.time):
        raise MetadataError(
            f"{label} must be a datetime.time or a wall-clock time 'HH:MM' or 'HH:MM:SS' (None for an open end), "
            f"got {value!r}.",
            key=which,
        )
    if value.tzinfo is not None:
        raise MetadataError(
            f"{label} {value.isoformat()} carries a time zone; give a wall-clock time and the window's "
            f"timezone= (an IANA name) instead.",
            key=which,
        )
    return value


@dataclass(frozen=True, init=False)
class SessionWindow:
    """A local wall-clock window applied on every day, e.g. 09:30–16:00 US/Eastern.

    ``start`` and ``end`` are ``datetime.time`` values or ``HH:MM[:SS]`` strings; either may be
    None (open on that side). When ``end`` is before ``start`` the window runs overnight and ends
    on the next day; equal times are refused. Both bounds are inclusive, as in the reference
    harness. ``timezone`` is an IANA name. A bad bound or zone is a :class:`MetadataError` naming it.

    Example:
        >>> SessionWindow("10:00", "11:00") == SessionWindow(dt.time(10), dt.time(11), "US/Eastern")
        True
        >>> SessionWindow("22:00", None, "Europe/London").describe()
        '22:00:00–end of day Europe/London'
    """

    start: dt.time | None
    end: dt.time | None
    timezone: str = DEFAULT_TIMEZONE

    def __init__(
        self, start: dt.time | str | None, end: dt.time | str | None, timezone: str = DEFAULT_TIMEZONE
    ) -> None:
        lo, hi = _window_bound(start, "start"), _window_bound(end, "end")
        if lo is not None and lo == hi:
            raise MetadataError(
                f"Window {lo.isoformat()}-{hi.isoformat()} starts and ends at the same time: give two different "
                f"times (an end before the start runs overnight; None for an open end).",
                key="end",
            )
        load_timezone(timezone, label="the window's timezone")
        object.__setattr__(self, "start", lo)  # frozen: set once, here
        object.__setattr__(self, "end", hi)
        object.__setattr__(self, "timezone", timezone)

    @property
    def tz(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)

    @property
    def overnight(self) -> bool:
        return self.start is not None and self.end is not None and self.end <= self.start

    def intervals(self, day: dt.date) -> tuple[tuple[dt.datetime, dt.datetime, bool], ...]:
        """The UTC intervals ``(lo, hi, hi_inclusive)`` whose instants read, on the local clock,
        a wall-clock time inside the window of ``day``; ``lo`` is always inclusive.

        Usually one interval. When a daylight-saving change falls inside the window's edge
        (a start of 01:30 on a night when 01:00–02:00 happens twice, say), the instants that show
        an inside wall-clock time form two intervals, and both are returned.

        Example:
            >>> w = SessionWindow(dt.time(9, 30), dt.time(16), "US/Eastern")
            >>> [(a.isoformat(), b.isoformat()) for a, b, _ in w.intervals(dt.date(2026, 3, 9))]
            [('2026-03-09T13:30:00+00:00', '2026-03-09T20:00:00+00:00')]
            >>> w = SessionWindow(dt.time(1, 30), dt.time(3), "Europe/London")
            >>> [(a.time().isoformat(), b.time().isoformat()) for a, b, _ in w.intervals(dt.date(2026, 10, 25))]
            [('00:30:00', '01:00:00'), ('01:30:00', '03:00:00')]
        """
        return _window_intervals(self, day)

    def bounds(self, day: dt.date) -> tuple[dt.datetime, dt.datetime, bool]:
        """The envelope ``(lo, hi, hi_inclusive)`` of :meth:`intervals` for ``day``, in UTC.

        Example:
            >>> w = SessionWindow(dt.time(9, 30), dt.time(16), "US/Eastern")
            >>> [b.isoformat() for b in w.bounds(dt.date(2026, 3, 6))[:2]]
            ['2026-03-06T14:30:00+00:00', '2026-03-06T21:00:00+00:00']
            >>> [b.isoformat() for b in w.bounds(dt.date(2026, 3, 9))[:2]]
            ['2026-03-09T13:30:00+00:00', '2026-03-09T20:00:00+00:00']
        """
        parts = self.intervals(day)
        return parts[0][0], parts[-1][1], parts[-1][2]

    def describe(self) -> str:
        s = self.start.isoformat() if self.start else "start of day"
        e = self.end.isoformat() if self.end else "end of day"
        return f"{s}–{e} {self.timezone}"


@functools.lru_cache(maxsize=4096)
def _window_intervals(window: SessionWindow, day: dt.date) -> tuple[tuple[dt.datetime, dt.datetime, bool], ...]:
    tz = window.tz
    first = dt.datetime.combine(day, window.start or dt.time(0))  # naive local wall-clock
    if window.end is None:
        last, last_inclusive = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(0)), False
    else:
        last = dt.datetime.combine(day + dt.timedelta(days=1) if window.overnight else day, window.end)
        last_inclusive = True

    def utc(local: dt.datetime, fold: int = 0) -> dt.datetime:
        return local.replace(tzinfo=tz, fold=fold).astimezone(dt.UTC)

    lo0, hi0 = utc(first) - dt.timedelta(days=1), utc(last) + dt.timedelta(days=1)
    if lo0.astimezone(tz).utcoffset() == hi0.astimezone(tz).utcoffset():
        return ((utc(first), utc(last), last_inclusive),)  # no clock change anywhere near

    def wall(t: dt.datetime) -> dt.datetime:
        return t.astimezone(tz).replace(tzinfo=None)

    def inside(t: dt.datetime) -> bool:
        w = wall(t)
        return first <= w and (w <= last if last_inclusive else w < last)

    # Break points: every reading of the two edges, and each instant the offset changes.
    points = {lo0, hi0, utc(first, 0), utc(first, 1), utc(last, 0), utc(last, 1)}
    t = lo0
    while t < hi0:
        nxt = min(t + dt.timedelta(hours=1), hi0)
        if t.astimezone(tz).utcoffset() != nxt.astimezone(tz).utcoffset():
            a, b = t, nxt  # offset(a) is old, offset(b) new: bisect to the first new instant
            while b - a > dt.timedelta(seconds=1):
                mid = a + (b - a) / 2
                a, b = (mid, b) if mid.astimezone(tz).utcoffset() == t.astimezone(tz).utcoffset() else (a, mid)
            points.add(b.replace(microsecond=0) if b.microsecond else b)
        t = nxt
    ordered = sorted(p for p in points if lo0 <= p <= hi0)
    out: list[list[Any]] = []
    for a, b in itertools.pairwise(ordered):
        if not inside(a + (b - a) / 2):
            continue
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return tuple((a, b, inside(b)) for a, b in out)


def day_bounds(day: dt.date, timezone: str) -> tuple[dt.datetime, dt.datetime]:
    """UTC instants of local midnight starting ``day`` and the next day (DST-correct)."""
    tz = zoneinfo.ZoneInfo(timezone)
    lo = dt.datetime.combine(day, dt.time(0), tz)
    hi = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(0), tz)
    return lo.astimezone(dt.UTC), hi.astimezone(dt.UTC)


@dataclass(frozen=True)
class Metadata:
    """The validated content of ``metadata.json``; unknown keys are kept in ``extra``."""

    start_time: dt.time | None = None
    end_time: dt.time | None = None
    timezone: str = DEFAULT_TIMEZONE
    time_column: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    path: str | None = None
    timezone_set: bool = True  # False: no 'timezone' key, the zone is the default

    @property
    def session_window(self) -> SessionWindow | None:
        if self.start_time is None and self.end_time is None:
            return None
        return SessionWindow(self.start_time, self.end_time, self.timezone)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.start_time is not None:
            out["start_time"] = self.start_time.isoformat()
        if self.end_time is not None:
            out["end_time"] = self.end_time.isoformat()
        out["timezone"] = self.timezone
        if self.time_column is not None:
            out["time_column"] = self.time_column
        out.update(self.extra)
        return out


def parse_metadata(raw: Any, *, path: str | None = None) -> Metadata:
    """Validate the decoded JSON of a metadata file.

    Example:
        >>> parse_metadata({"start_time": "09:30", "end_time": "16:00"}).session_window.describe()
        '09:30:00–16:00:00 US/Eastern'
    """
    where = f" {path}" if path else ""
    if not isinstance(raw, dict):
        raise MetadataError(f"Metadata file{where} must hold a JSON object.", path=path)
    start = end = None
    if raw.get("start_time") is not None:
        start = parse_wall_time(raw["start_time"], key="start_time", path=path)
    if raw.get("end_time") is not None:
        end = parse_wall_time(raw["end_time"], key="end_time", path=path)
    if start is not None and start == end:
        raise MetadataError(
            f"Keys 'start_time' and 'end_time' in{where} are both {start.isoformat()}: a window needs two "
            f"different times (an end before the start runs overnight; leave one out for an open end).",
            path=path,
            key="end_time",
        )
    tz_name = raw.get("timezone", DEFAULT_TIMEZONE)
    load_timezone(tz_name, path=path)
    time_column = raw.get("time_column")
    if time_column is not None and (not isinstance(time_column, str) or not time_column):
        raise MetadataError(f"Key 'time_column' in{where} must be a column name.", path=path, key="time_column")
    extra = {k: v for k, v in raw.items() if k not in KNOWN_KEYS}
    for key in extra:
        meant = meant_key(key)
        if meant is not None and meant not in raw:
            warn(
                f"Key {key!r} in{where or ' the metadata'} is not one duckharness reads (did you mean {meant!r}?): "
                f"it is kept with the other keys and has no effect."
            )
    return Metadata(start, end, tz_name, time_column, extra, path, timezone_set="timezone" in raw)


def meant_key(key: str) -> str | None:
    """The known key that ``key`` looks like a misspelling of, or None.

    Example:
        >>> meant_key("Start_Time"), meant_key("start"), meant_key("timezon"), meant_key("start_date")
        ('start_time', 'start_time', 'timezone', None)
    """

    def norm(k: str) -> str:
        return re.sub(r"[\s_\-]", "", k.lower())

    known = {norm(k): k for k in KNOWN_KEYS}
    n = norm(key)
    if n in known:
        return known[n]
    if n in _ALIASES:
        return _ALIASES[n]
    close = difflib.get_close_matches(n, list(known), n=1, cutoff=0.85)
    return known[close[0]] if close else None


def parse_metadata_text(text: str | bytes, *, path: str) -> Metadata:
    """Decode and validate the text of ``metadata.json`` found at ``path``."""
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MetadataError(f"Metadata file {path} is not valid JSON: {e}.", path=path) from None
    return parse_metadata(raw, path=path)
