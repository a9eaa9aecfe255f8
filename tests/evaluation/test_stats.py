"""kdkit.evaluation.stats: the cluster bootstrap, its intervals, and paired differences over seeds."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from rich.table import Table

from kdkit.evaluation.comparison import NO_INTERVAL, differences, differences_table, results_table
from kdkit.evaluation.stats import (
    MIN_UNITS,
    Replicates,
    fingerprint,
    over_seeds,
    paired_difference,
    percentile_interval,
    unit_counts,
)
from kdkit.run.ablation_report import Group, Measured, markdown_tables, rich_table, summarise


def test_unit_counts_resample_whole_units_and_depend_only_on_the_unit_set() -> None:
    units = ["s2", "s1", "s1", "s3", "s2", "s1"]
    counts, inverse = unit_counts(units, draws=500, seed=0)
    assert counts.shape == (500, 3) and (counts.sum(axis=1) == 3).all()  # 3 distinct units per draw
    weights = counts[:, inverse]
    assert (weights[:, 1] == weights[:, 2]).all() and (weights[:, 0] == weights[:, 4]).all()
    assert not (weights[:, 0] == weights[:, 1]).all()
    again, _ = unit_counts(list(reversed(units)), draws=500, seed=0)
    assert (again == counts).all()  # a unit's draws depend on its id, not on the sample order
    assert fingerprint(units, 500) == fingerprint(list(reversed(units)), 500) != fingerprint(units, 501)
    with pytest.raises(ValueError, match="draws"):
        unit_counts(units, draws=0)


def _coverage(cluster_level: bool, trials: int = 200) -> float:
    """How often the 95 % bootstrap interval of a mean covers the true mean 0, on data whose 40
    clusters of 5 samples share a random effect (samples within a cluster are not independent)."""
    rng = np.random.default_rng(1)
    covered = 0
    for _ in range(trials):
        values = np.repeat(rng.normal(size=40), 5) + rng.normal(scale=0.1, size=200)
        clusters = np.repeat(np.arange(40), 5).astype(str)
        units = clusters if cluster_level else np.arange(200).astype(str)
        counts, inverse = unit_counts(units, draws=400, seed=int(rng.integers(1 << 30)))
        weights = counts[:, inverse]
        low, high = percentile_interval(weights @ values / weights.sum(axis=1))
        covered += low <= 0 <= high
    return covered / trials


def test_the_cluster_bootstrap_covers_the_truth_where_resampling_samples_would_not() -> None:
    assert 0.88 <= _coverage(cluster_level=True) <= 0.99
    assert _coverage(cluster_level=False) < 0.7  # why the unit is the subject, not the frame or video


def test_percentile_interval_ignores_undefined_replicates() -> None:
    values = np.r_[np.linspace(0, 1, 1001), np.nan, np.nan]
    assert percentile_interval(values) == pytest.approx((0.025, 0.975))
    assert np.isnan(percentile_interval(np.array([np.nan]))).all()


def _replicates(values: np.ndarray, mark: str = "same") -> Replicates:
    return Replicates({"test/hter": values}, "subject", 20, mark)


def test_over_seeds_reports_mean_std_and_an_interval_wider_than_one_seeds() -> None:
    rng = np.random.default_rng(0)
    noise = rng.normal(scale=0.01, size=2000)  # the same test resamples for every seed
    points = [0.10, 0.20, 0.15]
    result = over_seeds(points, [_replicates(p + noise) for p in points], "test/hter")
    assert result["mean"] == pytest.approx(0.15) and result["std"] == pytest.approx(0.05)
    single = percentile_interval(0.15 + noise)
    assert result["low"] < single[0] and result["high"] > single[1]  # seed variation is included
    one = over_seeds([0.1], [_replicates(0.1 + noise)], "test/hter")
    assert one["std"] is None and (one["low"], one["high"]) == pytest.approx(percentile_interval(0.1 + noise))


def test_paired_difference_cancels_what_the_runs_share() -> None:
    rng = np.random.default_rng(0)
    shared = rng.normal(scale=0.05, size=2000)  # test-set luck common to both runs
    own = rng.normal(scale=0.002, size=2000)
    run, base = _replicates(0.10 + shared + own), _replicates(0.12 + shared)
    diff = paired_difference([0.10], [0.12], [run], [base], "test/hter")
    assert diff["mean"] == pytest.approx(-0.02) and diff["per_seed"] == pytest.approx([-0.02])
    assert diff["excludes_zero"] and diff["high"] < 0  # unpaired, the 0.05 spread would hide it
    assert diff["high"] - diff["low"] < 0.02
    with pytest.raises(ValueError, match="resampled differently"):
        paired_difference([0.1], [0.1], [run], [_replicates(0.1 + shared, "other")], "test/hter")


def test_replicates_round_trip_through_a_file(tmp_path: Path) -> None:
    original = Replicates({"test/hter": np.arange(5.0), "test/auc": np.ones(5)}, "video", 7, "abc")
    original.save(tmp_path / "r.npz")
    loaded = Replicates.load(tmp_path / "r.npz")
    assert (loaded.unit, loaded.n_units, loaded.fingerprint) == ("video", 7, "abc")
    assert (
        set(loaded.values) == {"test/hter", "test/auc"} and (loaded.values["test/hter"] == np.arange(5)).all()
    )
    assert [p.name for p in tmp_path.iterdir()] == ["r.npz"]  # written through a temporary file


# ------------------------------------------------------------------------------------ too few units
KEY = "test/accuracy"


def _one_unit(value: float) -> Replicates:
    """The issue's case: one test unit, so every resample is the same and the 'interval' a point."""
    return Replicates({KEY: np.full(200, value)}, "video", 1, "one")


def _text(table: Table) -> str:
    console = Console(file=io.StringIO(), width=250)
    console.print(table)
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_fewer_than_min_units_give_no_interval_and_no_mark() -> None:
    diff = paired_difference([0.75], [0.5], [_one_unit(0.75)], [_one_unit(0.5)], KEY)
    assert diff["mean"] == pytest.approx(0.25) and diff["n_units"] == 1
    assert (diff["low"], diff["high"], diff["excludes_zero"]) == (None, None, None)
    spread = over_seeds([0.75], [_one_unit(0.75)], KEY)
    assert (spread["low"], spread["high"], spread["n_units"]) == (None, None, 1)
    enough = [Replicates({KEY: np.full(200, v)}, "video", MIN_UNITS, "one") for v in (0.75, 0.5)]
    # The run with the fewest units decides.
    assert paired_difference([0.75], [0.5], enough[:1], [_one_unit(0.5)], KEY)["low"] is None
    assert paired_difference([0.75], [0.5], enough[:1], enough[1:], KEY)["excludes_zero"] is True


def test_the_evaluate_stage_tables_say_n_a_over_too_few_units() -> None:
    resampling = {"unit": "video", "n_units": 1}
    results = {
        run: {  # as kdkit.evaluation.scoring records them: no `intervals` over too few units
            KEY: value,
            "resampling": resampling,
            "params_M": 1,
            "MiB": 1,
        }
        for run, value in (("alone", 0.5), ("kd", 0.75))
    }
    diffs = differences(results, {"alone": _one_unit(0.5), "kd": _one_unit(0.75)}, "alone", [KEY])
    shown = _text(differences_table(diffs, "alone"))
    assert "+0.2500" in shown and NO_INTERVAL in shown and "✓" not in shown.split("excludes 0")[-1]
    assert "[+0.2500, +0.2500]" not in shown
    values = _text(results_table(results, "test", [KEY]))
    assert NO_INTERVAL in values and "[0.7500, 0.7500]" not in values


def test_the_ablation_report_says_n_a_over_too_few_units() -> None:
    base = [Measured({"split": "test", KEY: 0.5}, _one_unit(0.5))]
    group = Group("kd", [0], [Measured({"split": "test", KEY: 0.75}, _one_unit(0.75))], baseline=base)
    summary = summarise(group, [KEY], [KEY])
    assert summary["interval"][KEY] == [None, None] and summary["difference"][KEY]["excludes_zero"] is None
    markdown = markdown_tables([summary], [KEY], [], "max")
    assert f"| kd | 0.7500 {NO_INTERVAL} |" in markdown and f"| kd | +0.2500 {NO_INTERVAL} |" in markdown
    assert "✓" not in markdown
    terminal = _text(rich_table([summary], [KEY], [], "max", "ablation"))
    assert NO_INTERVAL in terminal and "✓" not in terminal
