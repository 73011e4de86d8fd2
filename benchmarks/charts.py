"""One PNG chart per growth curve (matplotlib, drawn without a display)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.harness import Curve


def draw(curve: Curve, folder: Path) -> Path:
    """Draw ``curve`` as ``folder/<name>.png`` on log-log axes; return the path.

    A series label is ``<engine> <measure>``: one colour per measure, solid lines for
    PostgreSQL and dashed for SQLite. Points at zero (a phase that did not run) are
    left out, since a log axis cannot show them.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(10, 5), dpi=100)
    measures = sorted({label.split(" ", 1)[-1] for label in curve.series})
    palette = pyplot.get_cmap("tab10")
    for label, points in sorted(curve.series.items()):
        shown = sorted((x, y) for x, y in points if y > 0)
        if not shown:
            continue
        engine, _, measure = label.partition(" ")
        axes.plot(
            [x for x, _ in shown],
            [y for _, y in shown],
            "--" if engine == "sqlite" else "-",
            color=palette(measures.index(measure) % 10),
            marker="o",
            markersize=4,
            label=label,
        )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel(curve.x_label)
    axes.set_ylabel(curve.y_label)
    axes.set_title(curve.title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    path = folder / f"{curve.name}.png"
    figure.savefig(path)
    pyplot.close(figure)
    return path
