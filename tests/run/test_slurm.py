"""`--launcher slurm` against a real SLURM cluster (`.ci/start-slurm` starts a one-node one): an
ablation submitted, run, collected and equal to the same ablation run here; a run cancelled with
`scancel` and resubmitted resumes from its `last.pt`. Without a running SLURM these tests skip,
saying why; with KDKIT_REQUIRE_SLURM=1 (set by .ci/run) that is a failure. The launcher section's
schema and the multi-node environment need no cluster."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import small_ablation_recipe_dict, tiny_recipe_dict

from kdkit.cli import main
from kdkit.config.schema import RecipeError
from kdkit.config.validation import parse_recipe
from kdkit.run.slurm import SlurmJob, job_states, wait_for
from kdkit.utils.runlog import console

REPO = Path(__file__).resolve().parents[2]
GRID = ["--vary", "distill.alpha=0.5", "--seeds", "0"]


def slurm_missing() -> str | None:
    """Why no SLURM job can run here, or None."""
    if shutil.which("sinfo") is None:
        return "no SLURM here (no sinfo; .ci/start-slurm starts a one-node cluster)"
    try:
        import submitit  # noqa: F401
    except ImportError:
        return "submitit is not installed: pip install 'kdkit[slurm]'"
    states = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True).stdout
    if not {"idle", "mix"} & set(states.split()):
        return f"no idle SLURM node (sinfo: {states.strip() or 'no answer'}); run .ci/start-slurm"
    return None


@pytest.fixture(scope="module")
def cluster() -> None:
    """A SLURM cluster with an idle node: else skip, or fail under KDKIT_REQUIRE_SLURM=1."""
    why = slurm_missing()
    if why and os.environ.get("KDKIT_REQUIRE_SLURM") == "1":
        pytest.fail(f"KDKIT_REQUIRE_SLURM=1 but {why}")
    if why:
        pytest.skip(why)


@pytest.fixture(autouse=True)
def job_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs inherit this environment (sbatch --export=ALL): this checkout's kdkit and plugin."""
    paths = [str(REPO), str(REPO / "plugins" / "fas"), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    monkeypatch.setattr(console, "_width", 250)


def report_numbers(folder: Path) -> list[dict]:
    """What an ablation report says about each variant's metrics (not its times and memory)."""
    report = json.loads((folder / "ablation.json").read_text())
    return [
        {
            **{k: v[k] for k in ("variant", "interval", "difference", "per_seed")},
            "mean": {k: m for k, m in v["mean"].items() if "/" in k},  # val/..., test/...
        }
        for v in report["variants"]
    ]


@pytest.mark.slow
def test_ablation_on_slurm_equals_the_local_one(
    cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("tiny.yaml").write_text(yaml.safe_dump(small_ablation_recipe_dict()))
    assert main(["ablate", "tiny.yaml", *GRID, "--out", "slurm", "--launcher", "slurm"]) == 0
    runs = json.loads(Path("slurm/slurm.json").read_text())["runs"]
    assert list(runs) == ["alpha-0.5__seed0"]
    # the run waits for its teacher's job: collecting now names it, queued, and writes no report
    assert main(["ablate", "--collect", "slurm"]) == 1
    assert f"alpha-0.5__seed0 (alpha=0.5, seed 0): SLURM job {runs['alpha-0.5__seed0']} is PENDING" in (
        capsys.readouterr().err
    )
    assert not Path("slurm/ablation.json").exists()
    assert main(["ablate", "tiny.yaml", *GRID, "--out", "local"]) == 0  # meanwhile, here
    states = wait_for(list(runs.values()), poll_s=0.5)
    assert set(states.values()) == {"COMPLETED"}, states
    assert main(["ablate", "--collect", "slurm"]) == 0
    assert report_numbers(Path("slurm")) == report_numbers(Path("local"))
    assert job_states(["999999999"]) == {}  # squeue refuses an id it does not know: not queued
    queue = subprocess.run(
        ["squeue", "--states=all", f"--jobs={','.join(runs.values())}"], capture_output=True
    )
    print(queue.stdout.decode())  # for the CI log: the jobs as SLURM saw them


EPOCHS = 40


def long_run_recipe() -> dict:
    """One train stage of many one-step epochs: a `last.pt` after each, time to cancel between."""
    data = tiny_recipe_dict()
    data["pipeline"] = [{"name": "teacher", "do": "train", "model": "teacher"}]
    data["train"].update(epochs=EPOCHS, max_steps_per_epoch=1, eval_every=1000)
    return data


@pytest.mark.slow
def test_a_cancelled_run_resubmitted_resumes(
    cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("long.yaml").write_text(yaml.safe_dump(long_run_recipe()))
    on_slurm = ["--launcher", "slurm", "--slurm-folder", "jobs"]
    assert main(["run", "long.yaml", "--out", "run", *on_slurm]) == 0
    (first,) = (p.name.split("_")[0] for p in Path("run/jobs").glob("*_submitted.pkl"))
    deadline = time.monotonic() + 120
    while not Path("run/teacher/last.pt").exists():
        assert time.monotonic() < deadline and job_states([first]).get(first) in ("PENDING", "RUNNING")
        time.sleep(0.1)
    subprocess.run(["scancel", first], check=True)
    assert wait_for([first], poll_s=0.5)[first] == "CANCELLED"
    assert not Path("run/teacher/done.json").exists()
    assert main(["run", "long.yaml", "--out", "run", "--resume", *on_slurm, "--wait"]) == 0
    assert Path("run/teacher/done.json").exists()
    (log,) = (p for p in Path("run/jobs").glob("*_0_log.err") if not p.name.startswith(f"{first}_"))
    resumed = re.search(r"\[teacher\] resumed from run/teacher/last.pt after epoch (\d+)", log.read_text())
    assert resumed and 1 <= int(resumed[1]) < EPOCHS, log.read_text()[-2000:]


def test_launcher_section_errors_name_their_keys() -> None:
    data = tiny_recipe_dict()
    data["launcher"] = {"kind": "pbs", "time": 0, "mem": "lots", "sbatch": {"Bad Key": 1, "qos": [1]}}
    with pytest.raises(RecipeError) as caught:
        parse_recipe(data)
    text = "\n".join(caught.value.problems)
    assert "launcher.kind" in text and "'slurm'" in text
    data["launcher"]["kind"] = "slurm"
    with pytest.raises(RecipeError) as caught:
        parse_recipe(data)
    problems = "\n".join(caught.value.problems)
    for key in ("launcher.time", "launcher.mem", "launcher.sbatch.Bad Key", "launcher.sbatch.qos"):
        assert key in problems


def test_the_launcher_changes_no_stage_cache_key() -> None:
    from kdkit.run.stage_cache import train_stage_key

    plain = parse_recipe(tiny_recipe_dict())
    data = tiny_recipe_dict()
    data["launcher"] = {"kind": "slurm", "partition": "gpu", "gpus_per_node": 8, "time": 600}
    launched = parse_recipe(data)
    stages = [s for s in plain.pipeline if s.do == "train"]
    assert [train_stage_key(plain, s) for s in stages] == [train_stage_key(launched, s) for s in stages]


def test_flags_override_the_section_and_a_bad_one_exits_2(tmp_path: Path, capsys) -> None:
    data = tiny_recipe_dict()
    data["launcher"] = {"kind": "slurm", "time": 5}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    assert main(["run", str(tmp_path / "r.yaml"), "--launcher", "slurm", "--time", "0"]) == 2
    assert "launcher.time: expected at least 1, got 0" in capsys.readouterr().err
    ablate = ["ablate", str(tmp_path / "r.yaml"), *GRID, "--out", str(tmp_path / "abl")]
    assert main([*ablate, "--gpus", "0"]) == 2  # this machine's GPUs mean nothing to the jobs
    assert "with --launcher slurm each run's job asks SLURM for its GPUs: use --gpus-per-node" in (
        capsys.readouterr().err
    )


def test_without_submitit_the_launcher_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "submitit", None)  # what `import submitit` finds when it is missing
    monkeypatch.chdir(tmp_path)
    Path("r.yaml").write_text(yaml.safe_dump(small_ablation_recipe_dict()))
    assert main(["run", "r.yaml", "--launcher", "slurm"]) == 2
    assert main(["ablate", "r.yaml", *GRID, "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err
    assert err.count("--launcher slurm needs submitit: pip install 'kdkit[slurm]'") == 2, err
    assert not Path("runs").exists()


def test_a_multi_node_job_takes_rank_and_world_from_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 3 of 2 nodes × 2 tasks, as SLURM's environment says inside the job."""
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",  # as submitit's sbatch script exports it
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "4",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_NTASKS_PER_NODE": "2",
    }
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]
    for key in keys:  # set, then deleted: monkeypatch removes what the job sets when the test ends
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    seen = SlurmJob(lambda names: {k: os.environ[k] for k in names}, keys, 1)()
    port = seen.pop("MASTER_PORT")
    assert seen == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07"}
    # every task of the job derives the same port from the job id
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.delenv("MASTER_PORT")
    assert SlurmJob(lambda names: {k: os.environ[k] for k in names}, keys, 1)()["MASTER_PORT"] == port
