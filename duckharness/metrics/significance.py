"""Pure statistics over per-day series: HAC (Newey–West) variances, t-statistics, the
Diebold–Mariano test and the day-block bootstrap.

Everything here works on numpy arrays and has no I/O: the engine computes per-day values and
sufficient statistics with SQL, and these functions turn them into the numbers researchers quote.

Conventions (T = number of days, u = the series minus its mean):

- autocovariance ``γ_j = (1/T) Σ_{t>j} u_t u_{t−j}``;
- Newey–West long-run variance with the Bartlett kernel
  ``S = γ_0 + 2 Σ_{j=1..L} (1 − j/(L+1)) γ_j``, so the variance of the mean is ``S / T``;
- default lag ``L = floor(4 (T/100)^(2/9))`` (Newey and West, 1994), at most floor(T/4),
  overridable by any lag below T (with L ≥ T the Bartlett weights no longer taper to zero
  within the series, and the variance, hence every t, is meaningless);
- Diebold–Mariano ``DM = d̄ / sqrt(S/T)`` on the loss differential d, with the
  Harvey–Leybourne–Newbold correction ``DM* = DM · sqrt((T + 1 − 2h + h(h−1)/T) / T)`` for
  horizon ``h = L + 1``, and a two-sided p-value from Student's t with T − 1 degrees of freedom;
- a spread below ``RESOLUTION`` times the largest magnitude in the series is rounding, not
  variation (per-day metrics are not computed that finely): it counts as zero, so days that are
  equal up to rounding give an undefined ICIR, t and DM (NaN), as exactly equal days do, instead
  of a t of 1e16.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

ArrayLike = Sequence[float] | np.ndarray

RESOLUTION = 1e-12
"""Relative size below which a series' spread is taken for rounding (see the module docstring)."""


def newey_west_lag(n: int) -> int:
    """The default Newey–West lag ``floor(4 (T/100)^(2/9))`` for a series of ``n`` values, at
    most ``floor(T/4)``: at least four values per lag, so a series of a few days gets lag 0 (on
    2 days lag 1 gave t = 23, p = 0.03 out of two numbers).

    Example:
        >>> newey_west_lag(2), newey_west_lag(5), newey_west_lag(20), newey_west_lag(100), newey_west_lag(250)
        (0, 1, 2, 4, 4)
    """
    if n < 1:
        return 0
    return min(math.floor(4 * (n / 100) ** (2 / 9)), n // 4)


def check_lag(lag: int | None, n: int) -> None:
    """Raise ValueError unless ``lag`` is None (the default) or ``0 <= lag < n`` (for n ≥ 1)."""
    if lag is None:
        return
    if lag < 0:
        raise ValueError(f"lag must be at least 0, got {lag}")
    if n >= 1 and lag >= n:
        raise ValueError(f"lag {lag} needs more than {lag} values, got {n}")


def _clean(x: ArrayLike) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    return a[np.isfinite(a)]


def _mean(a: np.ndarray) -> float:
    """The mean, computed around the first value, so that equal values give exactly that value
    (``np.mean`` of twenty 0.1 is 0.10000000000000002)."""
    return float(a[0] + (a - a[0]).mean())


def _noise_floor(a: np.ndarray) -> float:
    """The spread (a standard deviation) at or below which ``a`` counts as constant."""
    return RESOLUTION * float(np.abs(a).max())


def long_run_variance(x: ArrayLike, lag: int | None = None) -> float:
    """Newey–West (Bartlett kernel) long-run variance ``γ_0 + 2 Σ_j (1 − j/(L+1)) γ_j``.

    Non-finite values are dropped first. ``lag`` defaults to :func:`newey_west_lag`; with
    ``lag=0`` this is the (biased, 1/T) variance of the series.

    Example:
        >>> round(long_run_variance([1.0, 2.0, 3.0, 4.0], lag=0), 6)
        1.25
    """
    a = _clean(x)
    n = len(a)
    if n == 0:
        return math.nan
    check_lag(lag, n)
    lag = newey_west_lag(n) if lag is None else lag
    u = a - _mean(a)
    s = float(u @ u) / n
    for j in range(1, min(lag, n - 1) + 1):
        s += 2 * (1 - j / (lag + 1)) * float(u[j:] @ u[:-j]) / n
    return s


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta (modified Lentz method)."""
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)``."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def student_t_sf(t: float, df: float) -> float:
    """``P(T > t)`` for Student's t with ``df`` degrees of freedom (the upper tail).

    Example:
        >>> round(student_t_sf(2.0, 10), 6), student_t_sf(0.0, 5)
        (0.036694, 0.5)
    """
    if not math.isfinite(t):
        return math.nan if math.isnan(t) else (0.0 if t > 0 else 1.0)
    if df <= 0 or not math.isfinite(df):
        return math.nan
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return tail if t > 0 else 1 - tail


def two_sided_p(t: float, df: float) -> float:
    """Two-sided p-value ``2 P(T > |t|)`` from Student's t with ``df`` degrees of freedom."""
    if math.isnan(t) or df <= 0:
        return math.nan
    return min(1.0, 2 * student_t_sf(abs(t), df))


@dataclass(frozen=True)
class SeriesSummary:
    """Statistics of one per-day series (see :func:`summarize_series`)."""

    n_days: int
    mean: float
    std: float
    icir: float
    t_stat: float
    p_value: float
    lag: int
    frac_positive: float


def summarize_series(x: ArrayLike, lag: int | None = None) -> SeriesSummary:
    """Mean, standard deviation (ddof 1), ICIR = mean/std, Newey–West t-statistic of the mean
    (``mean / sqrt(S/T)``, two-sided p-value from Student's t with T − 1 df) and the fraction of
    days above zero. Non-finite values (days with no defined value) are dropped.

    Example:
        >>> s = summarize_series([0.02, 0.05, -0.01, 0.04, 0.03], lag=0)
        >>> round(s.mean, 4), round(s.icir, 3), s.frac_positive, s.lag
        (0.026, 1.129, 0.8, 0)
    """
    a = _clean(x)
    n = len(a)
    check_lag(lag, n)
    lag = newey_west_lag(n) if lag is None else lag
    if n == 0:
        return SeriesSummary(0, math.nan, math.nan, math.nan, math.nan, math.nan, lag, math.nan)
    mean = _mean(a)
    floor = _noise_floor(a)
    std = float(np.sqrt(((a - mean) ** 2).sum() / (n - 1))) if n > 1 else math.nan
    if std <= floor:
        std = 0.0
    icir = mean / std if n > 1 and std > 0 else math.nan
    s = long_run_variance(a, lag) if n > 1 else math.nan
    t = mean / math.sqrt(s / n) if n > 1 and s > 0 and math.sqrt(s) > floor else math.nan
    return SeriesSummary(n, mean, std, icir, t, two_sided_p(t, n - 1), lag, float((a > 0).mean()))


@dataclass(frozen=True)
class DieboldMariano:
    """The Diebold–Mariano test of a loss differential (see :func:`diebold_mariano`)."""

    n_days: int
    mean_diff: float
    statistic: float
    p_value: float
    lag: int


def diebold_mariano(d: ArrayLike, lag: int | None = None) -> DieboldMariano:
    """Diebold–Mariano test that the mean of the loss differential ``d`` is zero.

    ``DM = d̄ / sqrt(S/T)`` with ``S`` the Newey–West long-run variance of ``d`` (Bartlett
    kernel, ``lag`` L, default :func:`newey_west_lag`), times the Harvey–Leybourne–Newbold
    factor ``sqrt((T + 1 − 2h + h(h−1)/T) / T)`` with ``h = L + 1``; the p-value is two-sided
    from Student's t with T − 1 degrees of freedom. Non-finite values are dropped.

    Example:
        >>> r = diebold_mariano([0.1, 0.3, -0.1, 0.2, 0.4, 0.0], lag=0)
        >>> round(r.statistic, 4), round(r.p_value, 4)
        (1.964, 0.1067)
    """
    a = _clean(d)
    n = len(a)
    check_lag(lag, n)
    lag = newey_west_lag(n) if lag is None else lag
    if n < 2:
        return DieboldMariano(n, _mean(a) if n else math.nan, math.nan, math.nan, lag)
    mean = _mean(a)
    s = long_run_variance(a, lag)
    if not s > 0 or math.sqrt(s) <= _noise_floor(a):
        return DieboldMariano(n, mean, math.nan, math.nan, lag)
    h = lag + 1
    correction = (n + 1 - 2 * h + h * (h - 1) / n) / n
    if not correction > 0:  # too few days for this lag (T = 2, lag 1, say): no test
        return DieboldMariano(n, mean, math.nan, math.nan, lag)
    stat = math.sqrt(correction) * mean / math.sqrt(s / n)
    return DieboldMariano(n, mean, stat, two_sided_p(stat, n - 1), lag)


def bootstrap_counts(n_days: int, n_boot: int, seed: int | None) -> np.ndarray:
    """How often each day is drawn in each of ``n_boot`` resamples of ``n_days`` days with
    replacement: an ``(n_boot, n_days)`` integer matrix whose rows sum to ``n_days``.

    Example:
        >>> c = bootstrap_counts(5, 3, seed=1)
        >>> c.shape, c.sum(axis=1).tolist()
        ((3, 5), [5, 5, 5])
    """
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_days, size=(n_boot, n_days))
    counts = np.zeros((n_boot, n_days), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(n_boot), n_days), draws.ravel()), 1)
    return counts


def merge_resampled(stats: np.ndarray, how: Sequence[str], counts: np.ndarray) -> np.ndarray:
    """Merge per-day sufficient statistics for each resample: a day drawn k times counts k times.

    ``stats`` is ``(n_days, n_stats)``, ``how`` gives ``sum``, ``min`` or ``max`` per column and
    ``counts`` comes from :func:`bootstrap_counts`. Sums are ``counts @ stats``; minima and maxima
    are taken over the days drawn at least once. Missing (NaN) stats count as 0 in sums.

    Example:
        >>> s = np.array([[1.0, 5.0], [2.0, 7.0]])
        >>> merge_resampled(s, ["sum", "max"], np.array([[2, 0], [1, 1]])).tolist()
        [[2.0, 5.0], [3.0, 7.0]]
    """
    stats = np.asarray(stats, dtype=np.float64)
    out = np.empty((counts.shape[0], stats.shape[1]))
    drawn = counts > 0
    for k, fn in enumerate(how):
        col = stats[:, k]
        if fn == "sum":
            out[:, k] = counts @ np.nan_to_num(col, nan=0.0)
        elif fn in ("min", "max"):
            fill = np.inf if fn == "min" else -np.inf
            masked = np.where(drawn & ~np.isnan(col)[None, :], col[None, :], fill)
            red = masked.min(axis=1) if fn == "min" else masked.max(axis=1)
            out[:, k] = np.where(np.isinf(red) & (red == fill), np.nan, red)
        else:
            raise ValueError(f"unknown merge function {fn!r}")
    return out


@dataclass(frozen=True)
class BootstrapInterval:
    """A percentile bootstrap interval of a difference (see :func:`bootstrap_difference`)."""

    estimate: float
    low: float
    high: float
    level: float
    n_boot: int
    seed: int | None


def bootstrap_difference(
    stats_a: np.ndarray,
    stats_b: np.ndarray,
    how: Sequence[str],
    finalize: Callable[[np.ndarray], np.ndarray],
    *,
    n_boot: int = 2000,
    seed: int | None = 0,
    level: float = 0.95,
) -> BootstrapInterval:
    """Day-block bootstrap interval for ``metric(a) − metric(b)`` of a pooled metric.

    Rows of ``stats_a`` and ``stats_b`` are the per-day sufficient statistics of the same days
    (paired: one resample draws the same days for both). Each resample merges them exactly
    (:func:`merge_resampled`) and ``finalize`` maps an ``(m, n_stats)`` matrix of merged stats to
    ``m`` metric values. The interval is the percentile interval at ``level``; the estimate is the
    difference on all days. Resamples whose difference is undefined are left out.

    Example:
        >>> a = np.array([[10, 5.0], [10, 7.0], [10, 6.0]])   # (n, sum of squared errors) per day
        >>> b = np.array([[10, 4.0], [10, 6.0], [10, 4.0]])
        >>> mse = lambda s: s[:, 1] / s[:, 0]
        >>> r = bootstrap_difference(a, b, ["sum", "sum"], mse, n_boot=200, seed=3)
        >>> round(r.estimate, 4), r.low <= r.estimate <= r.high
        (0.1333, True)
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    stats_a, stats_b = np.asarray(stats_a, dtype=np.float64), np.asarray(stats_b, dtype=np.float64)
    n_days = stats_a.shape[0]
    ones = np.ones((1, n_days), dtype=np.int64)
    estimate = float((finalize(merge_resampled(stats_a, how, ones)) - finalize(merge_resampled(stats_b, how, ones)))[0])
    if n_days == 0:
        return BootstrapInterval(math.nan, math.nan, math.nan, level, n_boot, seed)
    counts = bootstrap_counts(n_days, n_boot, seed)
    diff = np.asarray(finalize(merge_resampled(stats_a, how, counts)), dtype=np.float64) - np.asarray(
        finalize(merge_resampled(stats_b, how, counts)), dtype=np.float64
    )
    diff = diff[np.isfinite(diff)]
    if len(diff) == 0:
        return BootstrapInterval(estimate, math.nan, math.nan, level, n_boot, seed)
    alpha = (1 - level) / 2
    low, high = np.quantile(diff, [alpha, 1 - alpha])
    return BootstrapInterval(estimate, float(low), float(high), level, n_boot, seed)
