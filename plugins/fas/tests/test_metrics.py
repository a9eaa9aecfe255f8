"""Tests for kdkit_fas.metrics and the ``kdkit fas metrics`` command, cross-checked with scikit-learn."""

from __future__ import annotations

import json
import math
import re

import matplotlib.image
import numpy as np
import pytest
from kdkit_fas import layouts, synth
from kdkit_fas.metrics import (
    ScoreSet,
    apcer_bpcer,
    auc,
    bootstrap,
    bpcer_at_apcer,
    eer_threshold,
    evaluate_scores,
    far_frr,
    hter,
    mean_std_over_folds,
    plot_roc_det,
    resampled_metrics,
    species_of,
    tpr_at_fpr,
    video_level,
)
from sklearn.metrics import roc_auc_score, roc_curve

from kdkit.cli import main
from kdkit.evaluation.stats import unit_counts


def _tied_scores(seed: int, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping classes with scores rounded to 1 decimal, so many ties across classes."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(int)
    scores = np.round(rng.normal(labels * 1.0, 0.8), 1)
    return scores, labels


def _roc_rates(scores, labels):
    """FAR, FRR and thresholds from sklearn's ROC (live positive), without the +inf start point."""
    fpr, tpr, thr = roc_curve(labels, scores, drop_intermediate=False)
    return fpr[1:], 1 - tpr[1:], thr[1:]


@pytest.mark.parametrize("seed", range(5))
def test_eer_matches_roc_curve_with_ties(seed):
    scores, labels = _tied_scores(seed)
    far, frr, thr = _roc_rates(scores, labels)
    gap = np.abs(far - frr)
    best = np.flatnonzero(np.isclose(gap, gap.min(), rtol=0, atol=1e-12))
    i = best[np.argmin(thr[best])]  # documented tie-break: smallest threshold
    eer, t = eer_threshold(scores, labels)
    assert t == thr[i]
    assert eer == pytest.approx((far[i] + frr[i]) / 2, abs=1e-12)
    assert np.array_equal(np.sort(thr), np.unique(scores))  # candidates are exactly the unique scores


def test_eer_tie_break_and_unbounded_scores():
    # At 20: FAR 1/2, FRR 0; at 30: FAR 1/2, FRR 1. |FAR-FRR| = 1/2 at both: the smaller threshold wins.
    scores = np.array([-5.0, 20.0, 30.0])
    labels = np.array([0, 1, 0])
    eer, t = eer_threshold(scores, labels)
    assert t == 20.0
    assert eer == 0.25  # (1/2 + 0) / 2; the other tied point would give 0.75
    # Logits far outside [0, 1] work (a fixed [0, 1] grid would not find this threshold).
    eer, t = eer_threshold(np.array([-300.0, -200.0, 100.0, 250.0]), np.array([0, 0, 1, 1]))
    assert (eer, t) == (0.0, 100.0)


def test_far_frr_and_hter_by_hand_with_tie_at_threshold():
    live = [0.9, 0.8, 0.4, 0.5]
    attack = [0.1, 0.5, 0.6, 0.3]
    scores, labels = np.array(live + attack), np.array([1] * 4 + [0] * 4)
    # threshold 0.5: live 0.4 rejected (FRR 1/4); attacks 0.5 (tie -> accepted) and 0.6 accepted (FAR 2/4)
    assert far_frr(scores, labels, 0.5) == (0.5, 0.25)
    assert hter(scores, labels, 0.5) == 0.375
    fpr, tpr, thr = roc_curve(labels, scores, drop_intermediate=False)
    k = np.flatnonzero(thr == 0.5)[0]
    assert (fpr[k], 1 - tpr[k]) == (0.5, 0.25)


@pytest.mark.parametrize("seed", range(3))
def test_auc_matches_sklearn_with_ties(seed):
    scores, labels = _tied_scores(seed)
    assert auc(scores, labels) == roc_auc_score(labels, scores)
    assert auc(scores, labels) != pytest.approx(roc_auc_score(1 - labels, scores))  # live is the positive


def test_apcer_is_the_worst_species_not_the_worst_instrument():
    """The OULU-NPU case of the issue: half of the printer-1 attacks pass, none of the printer-2
    ones: the print species has APCER 25 % (ISO/IEC 30107-3 as Idiap applies it), not 50 %."""
    attacks = ["print/1"] * 4 + ["print/2"] * 4 + ["replay/1"] * 4 + ["replay/2"] * 4
    scores = [0.9, 0.9, 0.1, 0.1] + [0.1] * 4 + [0.1] * 8
    r = apcer_bpcer(scores + [0.9] * 4, [0] * 16 + [1] * 4, 0.5, attacks + [""] * 4)
    assert r["apcer_per_instrument"] == {"print/1": 0.5, "print/2": 0.0, "replay/1": 0.0, "replay/2": 0.0}
    assert r["apcer_per_species"] == {"print": 0.25, "replay": 0.0}
    assert r["apcer"] == 0.25 and r["acer"] == 0.125 and r["bpcer"] == 0.0
    assert (
        r["n_attack_per_species"] == {"print": 8, "replay": 8}
        and r["n_attack_per_instrument"]["print/1"] == 4
    )
    pooled = apcer_bpcer(scores + [0.9] * 4, [0] * 16 + [1] * 4, 0.5)
    assert pooled["apcer"] == pytest.approx(2 / 16) and pooled["apcer_pooled"] is True
    assert pooled["apcer_per_species"] == {} == pooled["apcer_per_instrument"]
    assert pooled["apcer"] == far_frr(scores + [0.9] * 4, [0] * 16 + [1] * 4, 0.5)[0]


# Per data set: the attack types its indexer writes, how many of each are accepted at threshold
# 0.5 (out of 4 each), and the species APCER computed by hand.
DATASET_CASES = {
    "oulu": (
        [layouts.OULU_ATTACKS[f] for f in "2345"],
        [3, 1, 0, 2],
        {"print": 4 / 8, "replay": 2 / 8},
    ),
    "casia": (
        sorted({t for t in layouts.CASIA_ATTACKS.values() if t != "live"}),  # print/cut, print/warped, replay
        [0, 2, 1],
        {"print": 2 / 8, "replay": 1 / 4},
    ),
    "replay": (
        [
            "print",
            "replay/highdef_photo",
            "replay/highdef_video",
            "replay/mobile_photo",
            "replay/mobile_video",
        ],
        [2, 1, 0, 0, 3],
        {"print": 2 / 4, "replay": 4 / 16},
    ),
    "msu": (sorted(layouts.MSU_ATTACKS.values()), [1, 4, 0], {"print": 1 / 4, "replay": 4 / 8}),
    "celeba_spoof": (
        [layouts.CELEBA_SPOOF_TYPES[k] for k in (1, 2, 4, 10, 7)],
        [4, 0, 1, 1, 2],
        {"print": 4 / 8, "mask": 2 / 8, "replay": 2 / 4},
    ),
    "synth": (
        [k for k in synth.VIDEOS_PER_SUBJECT if k != "live"],
        [1, 3],
        {"print": 1 / 4, "replay": 3 / 4},
    ),
}


@pytest.mark.parametrize("dataset", DATASET_CASES)
def test_species_apcer_of_each_data_sets_attack_types(dataset):
    types, accepted, species = DATASET_CASES[dataset]
    attack_types, scores = [], []
    for kind, n in zip(types, accepted, strict=True):
        attack_types += [kind] * 4
        scores += [0.9] * n + [0.1] * (4 - n)
    r = apcer_bpcer(scores + [0.9, 0.1], [0] * len(scores) + [1, 1], 0.5, attack_types + ["", ""])
    assert r["apcer_per_species"] == pytest.approx(species)
    assert r["apcer"] == pytest.approx(max(species.values())) and r["bpcer"] == 0.5
    assert r["apcer_per_instrument"] == pytest.approx(
        {k: n / 4 for k, n in zip(types, accepted, strict=True)}
    )


def test_species_of():
    assert [species_of(t) for t in ("print/1", "replay/highdef_photo", "print", "mask/3d")] == [
        "print",
        "replay",
        "print",
        "mask",
    ]


@pytest.mark.parametrize("seed", range(3))
def test_tpr_at_fpr_is_flips_live_positive_roc_point(seed):
    scores, labels = _tied_scores(seed, n=400)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    for target in (0.001, 0.01, 0.1):
        assert tpr_at_fpr(scores, labels, target) == pytest.approx(tpr[fpr <= target][-1])


@pytest.mark.parametrize("seed", range(5))
def test_bpcer_at_apcer_pooled_matches_roc(seed):
    scores, labels = _tied_scores(seed, n=400)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    for target in (0.0, 0.01, 0.05, 0.2):
        assert bpcer_at_apcer(scores, labels, target) == pytest.approx(1 - tpr[fpr <= target].max())


def test_bpcer_at_apcer_with_types_uses_worst_species():
    # 100 print attacks at low scores, 1 replay attack at 0.95; live spread over [0.5, 1).
    scores = np.concatenate([np.linspace(0.0, 0.4, 100), [0.95], np.linspace(0.5, 0.99, 50)])
    labels = np.array([0] * 101 + [1] * 50)
    types = ["print/1"] * 50 + ["print/2"] * 50 + ["replay/1"] + [""] * 50
    # pooled: 1/101 attacks accepted at 0.95 is <= 1%, so the threshold can sit at the lowest live score
    assert bpcer_at_apcer(scores, labels, 0.01) == 0.0
    # per species: replay's APCER is 100% unless the threshold is above 0.95
    live = scores[labels == 1]
    assert bpcer_at_apcer(scores, labels, 0.01, types) == pytest.approx(np.mean(live <= 0.95))
    # nothing feasible below +inf when a target of 0 meets an attack above every live score
    assert bpcer_at_apcer([0.1, 0.9], [1, 0], 0.0) == 1.0


def test_dev_threshold_is_applied_to_test():
    dev = ScoreSet([0.1, 0.2, 0.3, 0.6, 0.7, 0.8], [0, 0, 0, 1, 1, 1])
    test = ScoreSet([0.1, 0.35, 0.65, 0.4, 0.55, 0.9], [0, 0, 0, 1, 1, 1])
    dev_eer, dev_t = eer_threshold(dev.scores, dev.labels)
    test_eer, test_t = eer_threshold(test.scores, test.labels)
    assert dev_t != test_t
    r = evaluate_scores(test, dev)
    assert r["threshold_source"] == "dev"
    frame = r["frame"]
    assert frame["threshold"] == dev_t == 0.6
    assert frame["dev_eer"] == dev_eer == 0.0
    # at 0.6: attack 0.65 accepted (FAR 1/3); live 0.4, 0.55 rejected (FRR 2/3)
    assert frame["hter"] == pytest.approx(0.5) == hter(test.scores, test.labels, 0.6)
    # the test set's own EER point is 0.55 (FAR = FRR = 1/3), an optimistic 1/3
    assert (test_eer, test_t) == (pytest.approx(1 / 3), 0.55)
    assert frame["eer"] == test_eer and frame["hter"] != pytest.approx(test_eer)
    assert frame["optimistic_hter"] == test_eer  # the test set's own threshold: HTER = EER
    assert frame["apcer"] == pytest.approx(1 / 3) and frame["bpcer"] == pytest.approx(2 / 3)
    assert "video" not in r
    json.dumps(r)  # JSON-serialisable


def test_threshold_from_test_is_recorded():
    test = ScoreSet([0.1, 0.35, 0.5, 0.4, 0.55, 0.9], [0, 0, 0, 1, 1, 1])
    r = evaluate_scores(test)
    assert r["threshold_source"] == "test"
    assert r["frame"]["threshold"] == r["frame"]["eer_threshold"]
    assert r["frame"]["hter"] == r["frame"]["eer"]  # why a test-set threshold is optimistic
    assert "dev_eer" not in r["frame"]


def test_video_level_averages_frames():
    v = video_level(
        scores=[0.2, 0.4, 0.9, 0.7, 0.8, 0.3],
        labels=[0, 0, 1, 1, 1, 0],
        videos=["a", "a", "b", "b", "b", "c"],
        attack_types=["print", "print", "", "", "", "replay"],
    )
    assert list(v.videos) == ["a", "b", "c"]
    np.testing.assert_allclose(v.scores, [0.3, 0.8, 0.3])
    assert list(v.labels) == [0, 1, 0]
    assert list(v.attack_types) == ["print", "", "replay"]
    with_subjects = video_level([0.2, 0.4, 0.9], [0, 0, 1], ["a", "a", "b"], subjects=["s1", "s1", "s2"])
    assert list(with_subjects.subjects) == ["s1", "s2"]
    with pytest.raises(ValueError, match="'a'.*subject"):
        video_level([0.2, 0.4, 0.9], [0, 0, 1], ["a", "a", "b"], subjects=["s1", "s2", "s2"])


def test_video_level_metrics_in_evaluate_scores():
    test = ScoreSet(
        [0.1, 0.9, 0.45, 0.45, 0.6, 0.2], [0, 0, 1, 1, 1, 1], videos=["a1", "a1", "l1", "l1", "l2", "l2"]
    )
    r = evaluate_scores(test)
    # per video: a1 -> 0.5 (attack), l1 -> 0.45, l2 -> 0.4 (live): the attack out-scores every live video
    assert r["video"]["auc"] == 0.0
    assert r["video"]["n_bona_fide"] == 2 and r["video"]["n_attack"] == 1
    assert r["frame"]["n_bona_fide"] == 4
    with pytest.raises(ValueError, match="dev scores do not"):
        evaluate_scores(test, ScoreSet([0.1, 0.9], [0, 1]))


def test_video_level_rejects_mixed_labels_and_types():
    with pytest.raises(ValueError, match="'v'.*label"):
        video_level([0.1, 0.9, 0.5], [0, 1, 0], ["v", "v", "w"])
    with pytest.raises(ValueError, match="attack type"):
        video_level([0.1, 0.2, 0.9], [0, 0, 1], ["v", "v", "w"], ["print", "replay", ""])


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        ([0.1, float("nan")], [0, 1], "finite"),
        ([0.1, float("inf")], [0, 1], "finite"),
        ([0.1, 0.2], [0, 2], "0 \\(attack\\) or 1"),
        ([0.1, 0.2], [-1, 1], "0 \\(attack\\) or 1"),
        ([0.1, 0.2], [1, 1], "both classes"),
        ([0.1, 0.2, 0.3], [0, 1], "length mismatch"),
        ([], [], "empty"),
        ([[0.1, 0.9], [0.8, 0.2]], [0, 1], "1-D"),
        ([0.1, 0.2], ["0", "1"], "numeric"),
    ],
)
def test_bad_input_raises(scores, labels, match):
    for fn in (lambda: eer_threshold(scores, labels), lambda: ScoreSet(scores, labels)):
        with pytest.raises(ValueError, match=match):
            fn()


def test_bad_threshold_and_missing_attack_type():
    with pytest.raises(ValueError, match="NaN"):
        hter([0.1, 0.9], [0, 1], float("nan"))
    with pytest.raises(ValueError, match="attack types missing at index 0"):
        apcer_bpcer([0.1, 0.9], [0, 1], 0.5, [None, "print"])


def _typed_scores(seed: int, n: int = 300) -> ScoreSet:
    scores, labels = _tied_scores(seed, n)
    rng = np.random.default_rng(seed)
    types = np.where(labels == 0, rng.choice(["print/1", "print/2", "replay/1", "replay/2"], n), "")
    subjects = rng.integers(0, 30, n).astype(str)
    return ScoreSet(scores, labels, types, subjects=subjects)


@pytest.mark.parametrize("seed", range(3))
def test_resampled_metrics_equal_the_point_metrics_on_every_resample(seed):
    test = _typed_scores(seed)
    s, y, types = test.scores, test.labels, test.attack_types
    units, kind = test.units()
    assert kind == "subject"
    counts, inverse = unit_counts(units, draws=12, seed=seed)
    counts[0] = 1  # the first "resample" is the test set itself
    got = resampled_metrics(test, 0.3, counts, inverse)
    for b in range(12):
        rows = np.repeat(np.arange(s.size), counts[b][inverse])  # the resample, written out
        point = apcer_bpcer(s[rows], y[rows], 0.3, types[rows])
        want = {
            "apcer": point["apcer"],
            "bpcer": point["bpcer"],
            "acer": point["acer"],
            "hter": hter(s[rows], y[rows], 0.3),
            "eer": eer_threshold(s[rows], y[rows])[0],
            "auc": auc(s[rows], y[rows]),
            "tpr_at_fpr_1pct": tpr_at_fpr(s[rows], y[rows], 0.01),
            "tpr_at_fpr_0.1pct": tpr_at_fpr(s[rows], y[rows], 0.001),
        }
        assert {k: got[k][b] for k in want} == pytest.approx(want, abs=1e-12), b


def test_bootstrap_resamples_subjects_and_is_paired_across_runs():
    test = _typed_scores(0)
    one = bootstrap(test, 0.3, draws=300)
    other = bootstrap(
        ScoreSet(test.scores * 0.5, test.labels, test.attack_types, subjects=test.subjects), 0.15, 300
    )
    assert (one.unit, one.n_units) == ("subject", 30) and one.fingerprint == other.fingerprint
    low, high = one.interval("hter")
    assert low < hter(test.scores, test.labels, 0.3) < high
    # halving every score and the threshold changes nothing: the same resamples give the same values
    assert np.array_equal(one.values["hter"], other.values["hter"])
    videos = ScoreSet(test.scores, test.labels, videos=[f"v{i // 3}" for i in range(test.scores.size)])
    assert videos.units()[1] == "video" and ScoreSet(test.scores, test.labels).units()[1] == "sample"


def test_mean_std_over_folds_uses_sample_std():
    folds = [{"acer": a, "per": {"print": a / 2}, "src": "dev"} for a in (0.1, 0.2, 0.6)]
    r = mean_std_over_folds(folds)
    assert r["n_folds"] == 3 and "ddof=1" in r["std_estimator"]
    assert r["metrics"]["acer"]["mean"] == pytest.approx(0.3)
    assert r["metrics"]["acer"]["std"] == pytest.approx(np.std([0.1, 0.2, 0.6], ddof=1))
    assert r["metrics"]["per"]["print"]["std"] == pytest.approx(np.std([0.05, 0.1, 0.3], ddof=1))
    assert r["metrics"]["src"] == "dev"
    with pytest.raises(ValueError, match="at least 2"):
        mean_std_over_folds(folds[:1])
    with pytest.raises(ValueError, match="keys"):
        mean_std_over_folds([{"acer": 0.1}, {"bpcer": 0.1}])


def test_mean_std_over_folds_of_evaluate_scores():
    folds = [evaluate_scores(ScoreSet(*_tied_scores(seed))) for seed in range(3)]
    r = mean_std_over_folds(folds)
    hters = [f["frame"]["hter"] for f in folds]
    assert r["metrics"]["frame"]["hter"]["mean"] == pytest.approx(np.mean(hters))
    assert r["metrics"]["threshold_source"] == "test"


def _png_ok(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_roc_det_writes_png(tmp_path):
    test = ScoreSet(*_tied_scores(0))
    dev = ScoreSet(*_tied_scores(1))
    species = np.where(np.arange(test.labels.size) % 2, "print", "replay")
    test.attack_types = np.where(test.labels == 0, species, "")
    out = plot_roc_det(test, dev, tmp_path / "curves.png")
    assert _png_ok(out)
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temp file left behind
    assert matplotlib.image.imread(out).ndim == 3


# ---------------------------------------------------------------- CLI


def _write_csv(path, scores, labels, types=None, videos=None, extra=True):
    header = ["score", "label"] + (["attack_type"] if types is not None else [])
    header += (["video"] if videos is not None else []) + (["note"] if extra else [])
    lines = [",".join(header)]
    for i, (s, y) in enumerate(zip(scores, labels, strict=True)):
        row = [repr(float(s)), str(int(y))]
        row += [types[i]] if types is not None else []
        row += [videos[i]] if videos is not None else []
        row += ["x"] if extra else []
        lines.append(",".join(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def _cli(*argv: str) -> int:
    """`kdkit fas metrics ARGV` through kdkit's entry point (which decides the exit status)."""
    return main(["fas", "metrics", *argv])


def test_cli_json_matches_library(tmp_path, capsys):
    ts, tl = _tied_scores(0)
    ds, dl = _tied_scores(1)
    types = ["print" if (i // 4) % 2 else "replay" for i in range(tl.size)]  # one type per video
    videos = [f"v{i // 4}_{tl[i]}" for i in range(tl.size)]  # a video never mixes labels
    test_csv = _write_csv(tmp_path / "test.csv", ts, tl, types, videos)
    dev_videos = [f"d{i // 4}_{dl[i]}" for i in range(dl.size)]
    dev_csv = _write_csv(tmp_path / "dev.csv", ds, dl, videos=dev_videos)
    assert _cli("--scores", str(test_csv), "--dev", str(dev_csv), "--json") == 0
    out, err = capsys.readouterr()
    got = json.loads(out)
    want = evaluate_scores(
        ScoreSet(ts, tl, np.where(tl == 0, types, ""), videos), ScoreSet(ds, dl, videos=dev_videos)
    )
    intervals = got.pop("intervals")
    assert got == want
    assert set(got["frame"]["apcer_per_species"]) == {"print", "replay"}
    assert "notice" not in err
    # Video level, with no subject column: videos are resampled; the interval holds the value.
    assert (intervals["level"], intervals["unit"], intervals["draws"]) == ("video", "video", 2000)
    low, high = intervals["metrics"]["hter"]
    assert low <= want["video"]["hter"] <= high


def test_cli_table_and_notice_without_dev(tmp_path, capsys):
    ts, tl = _tied_scores(2)
    test_csv = _write_csv(tmp_path / "test.csv", ts, tl)
    plot = tmp_path / "out" / "curves.png"
    assert _cli("--scores", str(test_csv), "--plot", str(plot)) == 0
    out, err = capsys.readouterr()
    assert "threshold" in err and "test set" in err and "optimistic" in err
    rows = ("APCER (all attacks pooled", "BPCER", "ACER", "HTER", "EER (test)", "AUC", "BPCER@APCER=1%")
    for row in (*rows, "TPR@FPR=1% (live positive)", "optimistic: HTER at the test EER threshold"):
        assert row in out
    assert re.search(r"HTER +│ +\d+\.\d\d% \[\d+\.\d\d%, \d+\.\d\d%\]", out), out
    assert "95% bootstrap intervals (2000 resamples of the 200 test samples" in out
    assert _png_ok(plot)


def test_cli_species_rows_subject_column_and_no_intervals(tmp_path, capsys):
    ts, tl = _tied_scores(3)
    types = [("print/1", "print/2", "replay/1")[i % 3] for i in range(tl.size)]
    subjects = [f"s{i % 20}" for i in range(tl.size)]
    test_csv = tmp_path / "test.csv"
    lines = ["score,label,attack_type,subject"]
    lines += [
        f"{s},{y},{t if y == 0 else 'live'},{u}" for s, y, t, u in zip(ts, tl, types, subjects, strict=True)
    ]
    test_csv.write_text("\n".join(lines) + "\n")
    assert _cli("--scores", str(test_csv)) == 0
    out = capsys.readouterr().out
    assert (
        "APCER (worst species)" in out and "APCER species print" in out and "APCER instrument print/2" in out
    )
    assert "resamples of the 20 test subjects" in out
    assert _cli("--scores", str(test_csv), "--json", "--draws", "0") == 0
    assert "intervals" not in json.loads(capsys.readouterr().out)
    assert _cli("--scores", str(test_csv), "--draws", "-1") == 2
    assert "--draws" in capsys.readouterr().err


def test_cli_gives_no_interval_over_fewer_than_ten_subjects(tmp_path, capsys):
    ts, tl = _tied_scores(4)
    test_csv = tmp_path / "test.csv"
    rows = [f"{s},{y},s{i % 3}" for i, (s, y) in enumerate(zip(ts, tl, strict=True))]
    test_csv.write_text("score,label,subject\n" + "\n".join(rows) + "\n")
    assert _cli("--scores", str(test_csv)) == 0
    out = capsys.readouterr().out
    assert "No intervals: 3 test subject(s), fewer than the 10 an interval needs." in out
    assert not re.search(r"HTER +│ +\d+\.\d\d% \[", out), out  # a value, no interval after it
    assert _cli("--scores", str(test_csv), "--json") == 0
    intervals = json.loads(capsys.readouterr().out)["intervals"]
    assert (intervals["n_units"], intervals["metrics"]) == (3, {})


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("score,label\n0.1,0\n0.x,1\n", r"bad\.csv, line 3, column 'score'"),
        ("score,label\n0.1,0\n0.9,yes\n", r"bad\.csv, line 3, column 'label'"),
        ("score,label\n0.1,0\nnan,1\n", r"line 3, column 'score': must be finite"),
        ("score,label\n0.1,0\n0.9\n", r"line 3, column 'label': empty"),
        ("0.1,0\n0.9,1\n", r"bad\.csv, line 1: missing column"),
        ("score,label,attack_type\n0.1,0,\n0.9,1,\n", r"line 2, column 'attack_type'"),
        ("score,label\n0.1,1\n0.9,1\n", r"bad\.csv: both classes"),
        ("", r"missing column"),
    ],
)
def test_cli_bad_csv_exits_2(tmp_path, capsys, text, match):
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    assert _cli("--scores", str(bad), "--json") == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    assert re.search(match, err), err


def test_cli_missing_file_exits_2(tmp_path, capsys):
    assert _cli("--scores", str(tmp_path / "nope.csv")) == 2
    assert "nope.csv" in capsys.readouterr().err


def test_result_has_no_nan():
    r = evaluate_scores(ScoreSet(*_tied_scores(4)))
    assert all(math.isfinite(v) for v in r["frame"].values() if isinstance(v, float))
