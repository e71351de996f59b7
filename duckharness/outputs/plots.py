"""Charts of the research tables, saved as PNG (or, by the file's extension, PDF or SVG) files.

Each function takes the table a :class:`~duckharness.Harness` method returned, draws exactly its
values, saves the figure and returns it (so tests and notebooks can inspect the artists).
Matplotlib is optional (``pip install "duckharness[plot]"``) and imported only here, when a chart
is drawn; figures are made without ``pyplot``, on the Agg canvas, so no display is needed and the
user's pyplot state is left alone.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import polars as pl

from duckharness.errors import InputError, MissingDependencyError
from duckharness.outputs.paths import written_atomically

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from duckharness.engine.analysis import Comparison


def _figure(rows: int = 1, height: float = 4.0) -> tuple[Figure, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError(
            'Plotting needs matplotlib: pip install "duckharness[plot]"', package="matplotlib", extra="plot"
        ) from None
    fig = Figure(figsize=(10, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    return fig, axes


FORMATS = ("png", "pdf", "svg")


def check_plot_path(path: str | os.PathLike[str]) -> str:
    """The image format of ``path`` (by its extension), or an :class:`InputError` saying why it
    cannot be written; called before any data is read, so a bad path costs no scan.

    Example:
        >>> check_plot_path("ic.png"), check_plot_path("ic.PDF")
        ('png', 'pdf')
    """
    text = os.fspath(path)
    ext = os.path.splitext(text)[1].lstrip(".").lower()
    if os.path.isdir(text):
        raise InputError(
            f"Plot file {text!r} is a directory; give a file name such as {os.path.join(text, 'chart.png')!r}."
        )
    if ext not in FORMATS:
        raise InputError(f"Plot file {text!r}: name it with one of .png, .pdf or .svg.")
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise InputError(f"Plot file {text!r}: folder {folder!r} does not exist.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(
            f"Plot file {text!r}: folder {folder!r} is not writable (read-only file system or no permission)."
        )
    return ext


def _save(fig: Figure, path: str | os.PathLike[str]) -> Figure:
    """Save beside ``path`` and rename over it: a chart replaces an earlier one of that name (charts
    are redrawn as a study goes on), but an error or Ctrl-C while drawing leaves the old file whole."""
    fmt = check_plot_path(path)
    with written_atomically(os.path.abspath(os.fspath(path)), overwrite=True) as tmp:
        fig.savefig(tmp, format=fmt, dpi=100, bbox_inches="tight")  # legends beside
    return fig


def _no_data(ax: Any) -> None:
    ax.text(0.5, 0.5, "no defined values", transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.set_xticks([])


def plot_series(frame: pl.DataFrame, path: str | os.PathLike[str], *, rolling: int = 20) -> Figure:
    """Per-day metric series (one line per experiment and pair) with a ``rolling``-day mean,
    one panel per metric.

    Args:
        frame: a per-day tidy table (``experiment, pred, target, day, metric, value``), as from
            :meth:`Harness.series`.
        path: the PNG file to write.
        rolling: window of the rolling mean, in days (shorter series use what they have).

    Example:
        >>> fig = plot_series(h.series("corr", "pred_10s"), "ic.png")       # doctest: +SKIP
        >>> fig.axes[0].lines[0].get_ydata()                     # the table's values   # doctest: +SKIP
    """
    if rolling < 1:
        raise ValueError(f"rolling must be at least 1, got {rolling}")
    metrics = list(dict.fromkeys(frame["metric"].to_list())) or ["value"]
    fig, axes = _figure(len(metrics))
    for ax, metric in zip(axes, metrics, strict=True):
        part = frame.filter(pl.col("metric") == metric)
        if part["value"].drop_nulls().len() == 0:
            _no_data(ax)
        pos = _day_axis(ax, sorted(set(part["day"].to_list())))
        for key, group in part.group_by(["experiment", "pred", "target"], maintain_order=True):
            g = group.sort("day")
            label = f"{key[0]} {key[1]}:{key[2]}"
            values = g["value"].cast(pl.Float64)
            x = [pos[d] for d in g["day"].to_list()]
            (line,) = ax.plot(x, values.to_list(), marker=".", linewidth=1, label=label)
            mean = values.rolling_mean(window_size=rolling, min_samples=1)
            ax.plot(
                x,
                mean.to_list(),
                linestyle="--",
                color=line.get_color(),
                linewidth=1.5,
                label=f"{label} (trailing mean, up to {rolling} days)",
            )
        ax.axhline(0, color="grey", linewidth=0.6)
        ax.set_title(f"{metric} per day")
        ax.set_xlabel("day (local trading date)")
        ax.set_ylabel(f"{metric} (one value per day)")
        _legend(ax, 2 * len(part.select("experiment", "pred", "target").unique()))
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _day_axis(ax: Any, days: list[Any]) -> dict[Any, int]:
    """Days as evenly spaced positions, labelled with their dates (about ten labels): a trading
    calendar, so weekends and holidays are not drawn as gaps the lines cross."""
    pos = {d: i for i, d in enumerate(days)}
    step = max(1, -(-len(days) // 10))
    ax.set_xticks(range(0, len(days), step))
    ax.set_xticklabels([str(d) for d in days[::step]], rotation=30, ha="right", fontsize="small")
    return pos


def _legend(ax: Any, entries: int) -> None:
    """The legend inside the plot for a few entries; beside it, outside the axes, for many (it
    would cover the lines and the title)."""
    if entries <= 4:
        ax.legend(fontsize="small")
    else:
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def plot_deciles(frame: pl.DataFrame, path: str | os.PathLike[str]) -> Figure:
    """Mean target by prediction bucket (grouped bars: one colour per experiment and pair).

    Args:
        frame: a pooled bucket table (``experiment, pred, target, bucket, n, mean_pred,
            mean_target``), as from :meth:`Harness.deciles`.
        path: the PNG file to write.

    Example:
        >>> fig = plot_deciles(h.deciles("pred_10s"), "deciles.png")        # doctest: +SKIP
    """
    fig, (ax,) = _figure(1, height=5.0)
    groups = list(frame.group_by(["experiment", "pred", "target"], maintain_order=True))
    width = 0.8 / max(len(groups), 1)
    for i, (key, group) in enumerate(groups):
        g = group.sort("bucket")
        x = [b - 0.4 + width * (i + 0.5) for b in g["bucket"].to_list()]
        ax.bar(x, g["mean_target"].to_list(), width=width, label=f"{key[0]} {key[1]}:{key[2]}")
    buckets = sorted(set(frame["bucket"].to_list()))
    ax.set_xticks(buckets)
    ax.axhline(0, color="grey", linewidth=0.6)
    targets = list(dict.fromkeys(frame["target"].to_list())) or ["target"]
    target = targets[0] if len(targets) == 1 else "target"  # several targets: each bar's legend names its own
    ax.set_title(f"Mean {target} by prediction bucket ({len(buckets)} per-day quantile buckets, pooled over days)")
    ax.set_xlabel("prediction bucket (1 = lowest predictions of the day)")
    ax.set_ylabel(f"mean {target} ({'target units' if len(targets) == 1 else ', '.join(targets)})")
    _legend(ax, len(groups))
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_comparison(cmp: Comparison, path: str | os.PathLike[str], *, rolling: int = 20) -> Figure:
    """Two panels per pair: the per-day metric of both experiments, and their daily difference
    (bars) with its ``rolling``-day mean; the title gives the Diebold–Mariano test and the
    bootstrap interval of the pooled difference.

    Example:
        >>> fig = plot_comparison(h.compare("mse", "clipped", "baseline", "pred_10s"), "cmp.png")  # doctest: +SKIP
    """
    pairs = cmp.table.select("pred", "target").rows()
    fig, axes = _figure(2 * len(pairs), height=3.2)
    for k, (pred, target) in enumerate(pairs):
        d = cmp.daily.filter((pl.col("pred") == pred) & (pl.col("target") == target)).sort("day")
        row = cmp.table.filter((pl.col("pred") == pred) & (pl.col("target") == target)).row(0, named=True)
        top, bottom = axes[2 * k], axes[2 * k + 1]
        if d["diff"].drop_nulls().len() == 0:
            _no_data(top)
            _no_data(bottom)
        days = list(range(d.height))  # trading days, evenly spaced (see _day_axis)
        _day_axis(top, d["day"].to_list())
        _day_axis(bottom, d["day"].to_list())
        top.plot(days, d["value_a"].to_list(), marker=".", linewidth=1, label=cmp.a)
        top.plot(days, d["value_b"].to_list(), marker=".", linewidth=1, label=cmp.b)
        top.set_title(f"{cmp.metric} per day, {pred}:{target}: {cmp.a} vs {cmp.b}")
        top.set_ylabel(f"{cmp.metric} (one value per day)")
        top.legend(fontsize="small")
        top.grid(alpha=0.3)
        diff = d["diff"].cast(pl.Float64)
        bottom.bar(days, diff.fill_null(0.0).to_list(), color="tab:grey", label=f"{cmp.a} − {cmp.b}")
        bottom.plot(
            days,
            diff.rolling_mean(window_size=rolling, min_samples=1).to_list(),
            color="tab:red",
            label=f"trailing mean, up to {rolling} days",
        )
        bottom.axhline(0, color="black", linewidth=0.6)

        def fmt(v: Any) -> str:
            return "n/a" if v is None else f"{v:.4g}"

        bottom.set_title(
            f"daily difference; Diebold–Mariano: DM = {fmt(row['dm_stat'])}"
            f" (p = {fmt(row['p_value'])}, lag {row['lag']})\n"
            f"pooled difference {fmt(row['diff'])}, {row['level']:.0%} CI [{fmt(row['ci_low'])}, {fmt(row['ci_high'])}]"
        )
        bottom.set_xlabel("day (local trading date)")
        bottom.set_ylabel(f"Δ {cmp.metric}")
        bottom.legend(fontsize="small")
        bottom.grid(alpha=0.3)
    return _save(fig, path)
