"""A run and a teacher cache written by kdkit 0.2.0 stay valid (issue 27): today's `kdkit run
--resume` keeps the stages 0.2.0 finished, continues the one it stopped in from 0.2.0's `last.pt`,
and reads the teacher outputs 0.2.0 cached; today's stage-cache keys are 0.2.0's.

The fixture (tests/fixtures/kdkit-0.2.0, written by its make.py with kdkit 0.2.0): recipe.yaml, the
run 0.2.0 wrote for it, stopped by a Ctrl-C at step 2 of 3 in epoch 2 of `student_kd_tau2`, the
teacher cache that `student_kd` filled, and 0.2.0's stage-cache keys (stage-keys.json).
"""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

from kdkit.cli import main

FIXTURE = REPO / "tests" / "fixtures" / "kdkit-0.2.0"  # wherever this test file moves
FINISHED = ("teacher", "student_alone", "student_kd")  # done.json written by 0.2.0
RESUMED = "student_kd_tau2"  # 0.2.0 stopped at step 2/3 of epoch 2: 1 + 3 batches of 32 are left
CACHE_KEY = next((FIXTURE / "teacher-cache").iterdir()).name  # the one entry 0.2.0 wrote


@dataclass
class Resumed:
    """The fixture's copy after today's `kdkit run --resume`: its folder, the command's stderr (its
    words, one space apart) and each file's (bytes, mtime) before the command ran, by path relative
    to the folder."""

    folder: Path
    err: str
    before: dict[str, tuple[bytes, int]]

    def after(self, relative: str) -> tuple[bytes, int]:
        """A file's (bytes, mtime) now."""
        return snapshot(self.folder / relative)


def snapshot(path: Path) -> tuple[bytes, int]:
    """A file's bytes and modification time (ns)."""
    return path.read_bytes(), path.stat().st_mtime_ns


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> Resumed:
    """Copy the fixture and resume its run with today's `kdkit run` (once for all the tests here)."""
    folder = tmp_path_factory.mktemp("compat-020") / "kdkit-0.2.0"
    shutil.copytree(FIXTURE, folder)
    before = {str(p.relative_to(folder)): snapshot(p) for p in folder.rglob("*") if p.is_file()}
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stderr(err), redirect_stdout(io.StringIO()):
        patch.chdir(folder)
        patch.setenv("KDKIT_CACHE_DIR", str(folder / "teacher-cache"))
        status = main(["run", "recipe.yaml", "--out", "run", "--resume"])
    assert status == 0, f"kdkit run --resume of 0.2.0's run exited {status}:\n{err.getvalue()}"
    # one space for every run of white space: the console wraps long lines at its width
    return Resumed(folder, " ".join(err.getvalue().split()), before)


def test_the_stages_0_2_0_finished_are_kept_unchanged(resumed: Resumed) -> None:
    for stage in FINISHED:
        assert f"[{stage}] complete, skipped (resume)" in resumed.err
        assert f"stage {stage}:" not in resumed.err  # no stage rule: it did not run
        for name in ("model.pt", "last.pt", "done.json"):
            relative = f"run/{stage}/{name}"
            assert resumed.after(relative) == resumed.before[relative], f"{relative} was rewritten"


def test_the_interrupted_stage_continues_from_0_2_0s_checkpoint(resumed: Resumed) -> None:
    assert f"[{RESUMED}] resumed from run/{RESUMED}/last.pt at step 2 of epoch 2" in resumed.err
    assert (resumed.folder / "run" / RESUMED / "done.json").exists()
    summary = json.loads((resumed.folder / "run" / "summary.json").read_text())
    assert list(summary) == [*FINISHED, RESUMED, "test"]
    assert summary[RESUMED]["epochs"] == 3
    # the evaluate stage read the models 0.2.0 saved beside the one trained now
    assert list(summary["test"]["results"]) == ["teacher", "student_kd", RESUMED, "student_alone"]
    written = json.loads((FIXTURE / "run" / "summary.json").read_text())
    assert {stage: summary[stage] for stage in FINISHED} == written  # 0.2.0's results, as written


def test_the_teacher_cache_0_2_0_wrote_is_reused(resumed: Resumed) -> None:
    cache = resumed.folder / "teacher-cache"
    entries = sorted(p.name for p in cache.iterdir())
    if entries != [CACHE_KEY]:
        pytest.fail(f"today's teacher-cache key differs from 0.2.0's: {key_changes(cache)}")
    assert f"teacher cache {cache / CACHE_KEY}: 128/128 samples served from the cache (100 %)" in resumed.err
    for path in sorted((cache / CACHE_KEY).iterdir()):
        relative = str(path.relative_to(resumed.folder))
        assert resumed.after(relative) == resumed.before[relative], f"{relative} was rewritten"


def key_changes(cache: Path) -> str:
    """What differs between the key.json of 0.2.0's cache entry and those today's code added."""
    old = json.loads((cache / CACHE_KEY / "key.json").read_text())
    changes = []
    for entry in cache.iterdir():
        if entry.name != CACHE_KEY and (entry / "key.json").exists():
            new = json.loads((entry / "key.json").read_text())
            changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            changes += [f"{k}: {old.get(k)!r} (0.2.0) -> {new.get(k)!r} (now)" for k in changed]
    return "; ".join(changes) or "no new entry with a key.json"


def test_the_stage_cache_keys_are_0_2_0s() -> None:
    from kdkit import load_recipe
    from kdkit.run.stage_cache import train_stage_key

    recipe = load_recipe(FIXTURE / "recipe.yaml")
    written = json.loads((FIXTURE / "stage-keys.json").read_text())
    now = {s.name: train_stage_key(recipe, s) for s in recipe.pipeline if s.name in written}
    assert now == written, (
        "the stage-cache key derivation changed (it hashes the stage's inputs, its initial weights and "
        "kdkit's version): `kdkit ablate` would train again the stages 0.2.0 cached"
    )
