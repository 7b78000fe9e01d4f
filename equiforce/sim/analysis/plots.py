"""PNG plots through matplotlib's object API (no pyplot global state), written atomically."""

from __future__ import annotations

import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from equiforce.utils.atomic_io import atomic_write


def new_figure(width: float = 5.0, height: float = 3.6) -> tuple[Figure, object]:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def save_png(figure: Figure, path: str | os.PathLike, dpi: int = 150) -> None:
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=dpi))
