"""The ablation chart (`kdkit.run.ablation_report.bar_chart`) stays readable for any number of
variants: a bounded size, every text inside the figure, no two labels on top of each other."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from conftest import ABLATION_METHODS, ABLATION_METRIC, fake_ablation_variant, fake_ablation_variants
from matplotlib.text import Text
from PIL import Image

from kdkit.run.ablation_report import bar_chart, chart_figure, chart_labels


def _overlap(a: Any, b: Any) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _drawn_texts(fig: Any) -> list[Any]:
    """Every text drawn: titles, axis labels and the tick labels within the axes' limits (matplotlib
    keeps labels of ticks outside them, undrawn)."""
    ticks, drawn = set(), []
    for ax in fig.axes:
        for axis, limits in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            for tick in axis.get_major_ticks(len(axis.get_majorticklocs())):
                ticks.add(tick.label1)
                shown = min(limits) <= tick.get_loc() <= max(limits) and tick.label1.get_visible()
                drawn += [tick.label1] if shown else []
    others = [t for t in fig.findobj(Text) if t not in ticks and t.get_visible()]
    return [t for t in [*others, *drawn] if t.get_text()]


@pytest.mark.parametrize("variants", [2, 5, 13, 30])
def test_the_chart_is_bounded_and_every_label_fits(variants: int) -> None:
    summary = fake_ablation_variants(variants)
    title = "student_kd: test/accuracy (mean ± sample std over seeds 0, 1, 2)"
    fig = chart_figure(summary, ABLATION_METRIC, "max", title)
    width, height = fig.get_size_inches() * fig.dpi
    assert width <= 2000 and height <= 2000  # the 13-method chart was 3,720 px wide
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    texts = [(t.get_text(), t.get_window_extent(renderer)) for t in _drawn_texts(fig)]
    inside = fig.bbox
    for text, box in texts:
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, (
            text
        )
    for (a, box_a), (b, box_b) in itertools.combinations(texts, 2):
        assert not _overlap(box_a, box_b), f"{a!r} overlaps {b!r}"
    shown = {text for text, _ in texts}
    assert set(chart_labels(summary)) <= shown and title in shown  # every group has its label


def test_long_names_are_shortened_and_stay_distinct() -> None:
    summary = fake_ablation_variants(13)
    labels = chart_labels(summary)
    assert labels[0] == "baseline for kl, kl-standardize…"  # the table has the full name
    assert labels[1] == "baseline for vitkd" and labels[2:] == ABLATION_METHODS.split()
    alike = [
        fake_ablation_variant("distill.adapter=projection,train.lr=0.001", 0.8),
        fake_ablation_variant("distill.adapter=projection,train.lr=0.01", 0.8),
    ]
    cut = chart_labels(alike)
    assert len(set(cut)) == 2 and all(len(label) <= 36 for label in cut)


def test_the_chart_file_has_the_figures_size(tmp_path: Path) -> None:
    bar_chart(fake_ablation_variants(13), ABLATION_METRIC, "max", tmp_path / "ablation.png", "title")
    with Image.open(tmp_path / "ablation.png") as image:
        assert image.size[0] <= 2000 and image.size[1] <= 2000
    assert [p.name for p in tmp_path.iterdir()] == ["ablation.png"]  # written through a temporary file
