"""A picture of gradient health: one PNG from the records of `GradientTensorBoard`.

    python -m keras_trainop.report LOGDIR -o report.png [--max-layers N]

Reads the event files in `LOGDIR/train` (or `LOGDIR` itself when it has no
`train` folder) and draws three panels over the steps: the global gradient norm
before and after the transforms, the gradient norm of each layer (the largest
`N`), and the steps skipped by the skip policy. Needs matplotlib
(`pip install keras_trainop[report]`); no display and no TensorBoard server.

Where it stops: it plots the scalars the callback writes (`norms=True`), not
the histograms, and a layer is the variable path without its last component.
"""

import argparse
import dataclasses
import os
import sys
from typing import Dict, Optional

import numpy as np

GLOBAL_NORM = "global_norm/gradient_norm"
CLIPPED_NORM = "global_norm/clipped_gradient_norm"
SKIPPED = "skipped_steps/total"
NORM_SUFFIX = "/gradient_norm"


@dataclasses.dataclass(frozen=True)
class Series:
    """One plotted curve: steps and values (float64, non-finite values kept)."""

    steps: np.ndarray
    values: np.ndarray


@dataclasses.dataclass(frozen=True)
class Report:
    """What `render` plotted.

    Attributes:
        global_norm: the global norm before the transforms.
        clipped_norm: the global norm after them, or None without transforms.
        layers: layer name -> its gradient norm, the plotted layers only,
            in legend order (largest first).
        skipped: the cumulative count of skipped steps, or None without the
            skip policy.
    """

    global_norm: Series
    clipped_norm: Optional[Series]
    layers: Dict[str, Series]
    skipped: Optional[Series]


def render(logdir, output, *, width=1200, height=1200, dpi=100, max_layers=10):
    """Renders the gradient records under `logdir` into one PNG at `output`.

    Args:
        logdir: the `log_dir` of `kt.GradientTensorBoard` (its `train` folder
            is read), or a folder of event files.
        output: the path of the PNG to write.
        width: the image width in pixels, a positive int.
        height: the image height in pixels, a positive int.
        dpi: dots per inch (the size of the text and lines), a positive int.
        max_layers: plot the gradient norms of at most this many layers: those
            with non-finite norms first, then by mean norm, largest first.

    Returns:
        A `Report` with the series that were plotted.

    Raises:
        ValueError: `logdir` holds no records of `GradientTensorBoard`, or an
            argument is invalid.
        ImportError: matplotlib is not installed.
    """
    for name, value in (("width", width), ("height", height), ("dpi", dpi), ("max_layers", max_layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int. Received: {name}={value!r}")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as error:
        raise ImportError(
            "keras_trainop.report needs matplotlib: pip install keras_trainop[report]"
        ) from error
    report = read(logdir, max_layers=max_layers)

    # A Figure on the Agg canvas: no pyplot, no display, no global state.
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    top, middle, bottom = figure.subplots(3, 1, sharex=True)
    figure.suptitle(f"Gradient health: {os.path.abspath(os.fspath(logdir))}", fontsize="medium")

    if report.clipped_norm is None:
        _plot(top, report.global_norm, "global norm (no transforms)")
        shown = [report.global_norm]
    else:
        _plot(top, report.global_norm, "before the transforms")
        _plot(top, report.clipped_norm, "after the transforms")
        shown = [report.global_norm, report.clipped_norm]
    _finish(top, shown, "global gradient norm")

    for name, series in report.layers.items():
        _plot(middle, series, name)
    _finish(middle, list(report.layers.values()), f"gradient norm per layer (largest {len(report.layers)})")

    if report.skipped is None:
        bottom.text(0.5, 0.5, "no skip policy", ha="center", va="center", transform=bottom.transAxes)
        bottom.set_yticks([])
        bottom.set_title("skipped steps", loc="left", fontsize="medium")
    else:
        steps, totals = report.skipped.steps, report.skipped.values
        bottom.step(steps, totals, where="post", color="tab:red")
        bottom.yaxis.set_major_locator(MaxNLocator(integer=True))
        last = int(totals[-1]) if totals.size and np.isfinite(totals[-1]) else 0
        bottom.set_title(f"skipped steps, cumulative ({last} in all)", loc="left", fontsize="medium")
    bottom.set_xlabel("step (optimizer updates)")
    figure.savefig(output, format="png")
    return report


def read(logdir, max_layers=10):
    """Reads the records of `GradientTensorBoard` under `logdir` (see `render`): a `Report`."""
    from tensorboard.backend.event_processing import event_accumulator

    logdir = os.fspath(logdir)
    if not os.path.isdir(logdir):
        raise ValueError(
            f"no GradientTensorBoard records under {logdir!r}: it is not a directory. "
            "Expected the `log_dir` of kt.GradientTensorBoard."
        )
    train = os.path.join(logdir, "train")
    path = train if os.path.isdir(train) else logdir
    accumulator = event_accumulator.EventAccumulator(path, size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()[event_accumulator.TENSORS])
    if GLOBAL_NORM not in tags:
        raise ValueError(
            f"no GradientTensorBoard records under {path!r}: expected event files with "
            f"the scalar {GLOBAL_NORM!r}, as kt.GradientTensorBoard(log_dir, norms=True) "
            "writes into <log_dir>/train."
        )

    def series(tag):
        events = accumulator.Tensors(tag)
        steps = np.array([e.step for e in events], np.int64)
        values = np.array([_scalar(e.tensor_proto) for e in events], np.float64)
        return Series(steps, values)

    per_layer = {}
    for tag in sorted(tags):
        if tag.endswith(NORM_SUFFIX) and not tag.startswith("global_norm/"):
            variable = tag[: -len(NORM_SUFFIX)]
            layer = variable.rsplit("/", 1)[0]
            squares = per_layer.setdefault(layer, {})
            s = series(tag)
            for step, value in zip(s.steps.tolist(), s.values.tolist()):
                squares[step] = squares.get(step, 0.0) + value * value
    layers = {}
    for layer, squares in per_layer.items():
        steps = np.array(sorted(squares), np.int64)
        layers[layer] = Series(steps, np.sqrt(np.array([squares[s] for s in steps.tolist()], np.float64)))
    ranked = sorted(layers, key=lambda name: _rank(layers[name].values), reverse=True)
    return Report(
        global_norm=series(GLOBAL_NORM),
        clipped_norm=series(CLIPPED_NORM) if CLIPPED_NORM in tags else None,
        layers={name: layers[name] for name in ranked[:max_layers]},
        skipped=series(SKIPPED) if SKIPPED in tags else None,
    )


def _scalar(tensor_proto):
    from tensorboard.util import tensor_util

    return float(np.asarray(tensor_util.make_ndarray(tensor_proto)).reshape(()))


def _rank(values):
    finite = values[np.isfinite(values)]
    return (finite.size < values.size, float(finite.mean()) if finite.size else 0.0)


def _plot(ax, series, label):
    """A curve with gaps at non-finite values, which are marked at the top of the panel."""
    finite = np.isfinite(series.values)
    marker = "." if series.steps.size <= 60 else None
    (line,) = ax.plot(series.steps, np.where(finite, series.values, np.nan), marker=marker, label=label)
    if not finite.all():
        ax.plot(
            series.steps[~finite],
            np.full(int((~finite).sum()), 0.97),
            linestyle="none",
            marker="v",
            color=line.get_color(),
            transform=ax.get_xaxis_transform(),
            clip_on=False,
            label=f"{label}: non-finite",
        )


def _finish(ax, shown, title):
    values = np.concatenate([s.values for s in shown]) if shown else np.zeros(0)
    finite = values[np.isfinite(values)]
    # A log axis when the values span two decades or more.
    if finite.size and finite.min() > 0 and finite.max() / finite.min() >= 100:
        ax.set_yscale("log")
    ax.set_title(title, loc="left", fontsize="medium")
    if shown:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    else:
        ax.text(0.5, 0.5, "no per-variable norms", ha="center", va="center", transform=ax.transAxes)


def main(argv=None):
    """The command line: `python -m keras_trainop.report LOGDIR -o report.png`."""
    parser = argparse.ArgumentParser(
        prog="python -m keras_trainop.report",
        description="Renders the records of kt.GradientTensorBoard under LOGDIR into one PNG: "
        "global gradient norm before and after the transforms, per-layer gradient norms, "
        "skipped steps.",
    )
    parser.add_argument("logdir", metavar="LOGDIR", help="the log_dir of kt.GradientTensorBoard")
    parser.add_argument("-o", "--output", default="report.png", help="the PNG to write (default: report.png)")
    parser.add_argument("--max-layers", type=int, default=10, metavar="N", help="plot at most N layers (default: 10)")
    parser.add_argument("--width", type=int, default=1200, help="in pixels (default: 1200)")
    parser.add_argument("--height", type=int, default=1200, help="in pixels (default: 1200)")
    parser.add_argument("--dpi", type=int, default=100, help="(default: 100)")
    args = parser.parse_args(argv)
    try:
        render(
            args.logdir,
            args.output,
            width=args.width,
            height=args.height,
            dpi=args.dpi,
            max_layers=args.max_layers,
        )
    except (ValueError, ImportError) as error:
        raise SystemExit(f"{parser.prog}: error: {error}") from None
    print(f"wrote {args.output}")


if __name__ == "__main__":
    sys.exit(main())
