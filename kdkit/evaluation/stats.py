"""Uncertainty of evaluation results: bootstrap over independent units, intervals over seeds and
paired differences between runs.

A *replicate* is a metric recomputed on one bootstrap resample of a test split. A resample draws
the split's independent units (subjects where known, else videos, else samples) with
replacement, and every sample of a drawn unit comes along (a cluster bootstrap). The draws depend
only on the sorted unit ids, the number of draws and the seed, so two runs evaluated on the same
test split are resampled identically: the difference of their replicates is a *paired* bootstrap
of their difference. Thresholds fixed on the dev split stay fixed; the interval covers the finite
test set, not the dev set's threshold estimate.

Over several seeds (`over_seeds`, `paired_difference`) each replicate also redraws the seeds with
replacement, so the interval covers both the seed-to-seed variation and the finite test set. With
few seeds (3) that outer level is coarse: the interval is a guide, read it beside mean ± std.

Fewer than `MIN_UNITS` independent test units give no interval at all: a percentile interval over
one unit is a point (`[+0.25, +0.25]`), and over a handful it is far narrower than the truth. The
interval and comparison functions then return ``None`` for its ends and for `excludes_zero`, with
the `n_units` that were resampled, so that no table marks such a difference.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdkit.utils.checkpoint import atomic_open

LEVEL = 0.95  # confidence level of every interval kdkit reports
DRAWS = 2000  # bootstrap resamples per evaluated run
SEED = 0  # the resampling seed: fixed, so that runs on one test split pair up
MIN_UNITS = 10  # fewer distinct test units than this: no interval is reported


def enough_units(n_units: int) -> bool:
    """Whether `n_units` distinct test units are enough for an interval (`MIN_UNITS`)."""
    return n_units >= MIN_UNITS


def unit_counts(units: Sequence[str], draws: int = DRAWS, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Resample distinct units with replacement: ``(counts, inverse)``.

    `counts` is a ``(draws, n_units)`` integer array (how often each sorted distinct unit is drawn in
    each resample) and `inverse` maps each sample to its unit, so ``counts[:, inverse]`` are the
    per-sample weights of every resample.
    """
    if draws < 1:
        raise ValueError(f"draws: expected at least 1, got {draws}")
    ids, inverse = np.unique(np.asarray(units, dtype=str), return_inverse=True)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(ids.size, np.full(ids.size, 1.0 / ids.size), size=draws)
    return counts.astype(np.int64), inverse


def fingerprint(units: Sequence[str], draws: int = DRAWS, seed: int = SEED) -> str:
    """A short hash of what fixes the resamples (distinct unit ids, draws, seed): equal fingerprints
    mean identical resamples, so replicates of two runs can be paired."""
    ids = np.unique(np.asarray(units, dtype=str)).tolist()
    text = json.dumps({"units": ids, "draws": draws, "seed": seed})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Replicates:
    """Bootstrap replicates of one evaluated run on one split.

    `values` maps a metric key (e.g. ``test/hter``) to its ``(draws,)`` replicates; NaN marks a
    resample where the metric is undefined (a class missing from it). `unit` names what was
    resampled ('subject', 'video', 'sample'), `n_units` how many distinct ones there were.
    """

    values: dict[str, np.ndarray]
    unit: str
    n_units: int
    fingerprint: str

    def interval(self, key: str, level: float = LEVEL) -> tuple[float, float]:
        """The percentile interval of metric `key`."""
        return percentile_interval(self.values[key], level)

    def save(self, path: Path) -> None:
        """Write the replicates to `path` (.npz), atomically."""
        info = {"unit": self.unit, "n_units": self.n_units, "fingerprint": self.fingerprint}
        with atomic_open(path, "wb") as handle:
            np.savez_compressed(handle, __info__=np.array(json.dumps(info)), **self.values)

    @classmethod
    def load(cls, path: Path) -> Replicates:
        """Read replicates written by `save`."""
        with np.load(Path(path), allow_pickle=False) as data:
            info = json.loads(str(data["__info__"]))
            values = {k: data[k] for k in data.files if k != "__info__"}
        return cls(values, info["unit"], int(info["n_units"]), info["fingerprint"])


def bootstrap(
    units: Sequence[str],
    unit: str,
    statistic: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]],
    draws: int = DRAWS,
    seed: int = SEED,
) -> Replicates:
    """Replicates of `statistic(counts, inverse)` (metric name → ``(draws,)`` values) under the
    resamples of `unit_counts(units, draws, seed)`; `unit` names what the units are."""
    counts, inverse = unit_counts(units, draws, seed)
    return Replicates(statistic(counts, inverse), unit, int(counts.shape[1]), fingerprint(units, draws, seed))


def percentile_interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central `level` percentile interval of the finite replicates (NaN, NaN when none are)."""
    finite = np.asarray(replicates, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def _seed_resampled_means(rows: np.ndarray, seed: int) -> np.ndarray:
    """Per replicate b, the mean of ``rows[s, b]`` over seeds s redrawn with replacement."""
    n_seeds, draws = rows.shape
    if n_seeds == 1:
        return rows[0]
    picks = np.random.default_rng(seed + 1).integers(n_seeds, size=(draws, n_seeds))
    return rows[picks, np.arange(draws)[:, None]].mean(axis=1)


def _check_paired(replicates: Sequence[Replicates], key: str) -> np.ndarray:
    prints = {r.fingerprint for r in replicates}
    if len(prints) > 1:
        raise ValueError(
            f"{key}: the runs were resampled differently (fingerprints {sorted(prints)}); "
            "they were not evaluated on the same test units"
        )
    return np.stack([r.values[key] for r in replicates])


def _interval_over_seeds(rows: np.ndarray, replicates: Sequence[Replicates]) -> dict[str, Any]:
    """`low`, `high` of the seed-resampled means of `rows` and the fewest `n_units` among the
    runs; both ends are None when those are too few (`enough_units`)."""
    n_units = min(r.n_units for r in replicates)
    if not enough_units(n_units):
        return {"low": None, "high": None, "n_units": n_units}
    low, high = percentile_interval(_seed_resampled_means(rows, SEED))
    return {"low": low, "high": high, "n_units": n_units}


def over_seeds(points: Sequence[float], replicates: Sequence[Replicates], key: str) -> dict[str, Any]:
    """Mean, sample std and the two-level bootstrap interval of metric `key` over seeds.

    `points[i]` is seed i's value and `replicates[i]` its bootstrap replicates (same test units).
    `low` and `high` are None with fewer than `MIN_UNITS` test units.
    """
    values = np.asarray(points, dtype=np.float64)
    rows = _check_paired(replicates, key)
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if values.size > 1 else None,
        **_interval_over_seeds(rows, replicates),
        "n": int(values.size),
    }


def paired_difference(
    points: Sequence[float],
    baseline_points: Sequence[float],
    replicates: Sequence[Replicates],
    baseline_replicates: Sequence[Replicates],
    key: str,
) -> dict[str, Any]:
    """Difference of metric `key` between runs and their baselines (same seed, same test units).

    Returns the mean difference over seeds, its two-level bootstrap interval, whether the interval
    excludes 0, the fewest test units of the runs and the per-seed differences. With fewer than
    `MIN_UNITS` test units there is no interval: `low`, `high` and `excludes_zero` are None.
    """
    differences = np.asarray(points, dtype=np.float64) - np.asarray(baseline_points, dtype=np.float64)
    paired = [*replicates, *baseline_replicates]
    rows = _check_paired(paired, key)
    n = len(replicates)
    interval = _interval_over_seeds(rows[:n] - rows[n:], paired)
    low, high = interval["low"], interval["high"]
    return {
        "mean": float(differences.mean()),
        **interval,
        "excludes_zero": None if low is None else bool(low > 0 or high < 0),
        "per_seed": differences.tolist(),
    }
