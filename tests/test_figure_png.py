from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest

from trustregion.plots import figure_png
from trustregion.plots.drawing import COLORS, new_figure


def two_colour_figure():
    fig = new_figure(2, 1)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color=COLORS["blue"])
    ax.plot([0, 1], [1, 0], color=COLORS["red"])
    return fig


def decoded(png: bytes) -> PIL.Image.Image:
    image = PIL.Image.open(io.BytesIO(png))
    image.load()
    return image


def test_size_in_pixels_is_inches_times_dpi():
    # 2 × 1 inches at 50 dpi → 100 × 50 pixels; at 80 dpi → 160 × 80
    assert decoded(figure_png(two_colour_figure(), dpi=50)).size == (100, 50)
    assert decoded(figure_png(two_colour_figure(), dpi=80)).size == (160, 80)


def test_full_colour_by_default_and_a_palette_on_request():
    fig = two_colour_figure()
    assert decoded(figure_png(fig, dpi=50)).mode == "RGBA"
    paletted = decoded(figure_png(fig, dpi=50, colors=4))
    assert paletted.mode == "P"
    assert len(paletted.getcolors()) <= 4  # pixels use at most the 4 palette entries


def test_palette_keeps_the_picture():
    # A chart of a few flat colours survives a 64-colour palette: only anti-aliased edge pixels
    # change, so the mean change per channel stays below 2 levels of 255 (measured: 1.1).
    fig = two_colour_figure()
    full = np.asarray(decoded(figure_png(fig, dpi=50)).convert("RGB"), dtype=float)
    paletted = np.asarray(decoded(figure_png(fig, dpi=50, colors=64)).convert("RGB"),
                          dtype=float)
    assert full.shape == paletted.shape == (50, 100, 3)
    assert np.abs(full - paletted).mean() < 2.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dpi": 0}, "dpi must be a finite number in (0.0, inf)"),
    ({"dpi": "high"}, "dpi must be a finite number"),
    ({"colors": 1}, "colors must be an integer ≥ 2"),
    ({"colors": 300}, "colors must be 2 to 256"),
    ({"colors": 2.5}, "colors must be an integer"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        figure_png(two_colour_figure(), **kwargs)
