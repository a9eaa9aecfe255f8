"""Tests for kdkit.utils.checkpoint: atomic writes, refusing malicious pickles, RNG round trips."""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kdkit.utils import checkpoint
from kdkit.utils.checkpoint import (
    CheckpointError,
    atomic_save,
    atomic_write_text,
    file_sha256,
    load_file,
    rng_state,
    seed_everything,
    set_rng_state,
)


def test_atomic_save_round_trip_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "last.pt"
    atomic_save({"w": torch.arange(3), "epoch": 2}, path)
    atomic_save({"w": torch.arange(4), "epoch": 3}, path)  # replacing an existing file
    loaded = load_file(path)
    assert loaded["epoch"] == 3 and torch.equal(loaded["w"], torch.arange(4))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_a_failed_save_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    atomic_save({"epoch": 1}, path)
    before = path.read_bytes()

    def half_written(obj: object, handle: object) -> None:
        handle.write(b"PK\x03\x04 half a checkpoint")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", half_written)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"epoch": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # the temp file is gone
    monkeypatch.undo()
    assert load_file(path) == {"epoch": 1}


def test_atomic_write_text(tmp_path: Path) -> None:
    path = tmp_path / "a" / "summary.json"
    atomic_write_text("{}", path)
    atomic_write_text('{"x": 1}', path)
    assert path.read_text() == '{"x": 1}' and len(list(path.parent.iterdir())) == 1


class _Exploit:
    """Unpickling this runs a shell command (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle"])
def test_a_malicious_pickle_is_refused_not_run(tmp_path: Path, container: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"model": {"w": torch.zeros(1)}, "x": _Exploit(marker)}
    if container == "torch_zip":
        torch.save(payload, path)  # a genuine torch zip archive whose data.pkl runs code
        assert zipfile.is_zipfile(path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_file(path)
    assert not marker.exists()


def test_load_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="file not found"):
        load_file(tmp_path / "missing.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"not a PyTorch checkpoint .*starts with b'not a checkpoint'"):
        load_file(broken)
    truncated = tmp_path / "truncated.pt"
    torch.save({"w": torch.zeros(64)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])  # a zip cut short: the format is right, not the file
    with pytest.raises(CheckpointError, match="not a loadable checkpoint .*RuntimeError"):
        load_file(truncated)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_file(bad_st)


def test_safetensors_loading(tmp_path: Path) -> None:
    tensors = {"a.weight": torch.randn(3, 2), "b": torch.arange(5)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert file_sha256(path, chunk=2) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def _draws() -> tuple:
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1)],
        np.random.rand(3).tolist() + np.random.randn(3).tolist(),
        torch.rand(3).tolist() + torch.randn(2).tolist(),
    )


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    seed_everything(123)
    random.gauss(0, 1)  # leave a cached Gaussian in Python's generator
    np.random.randn()  # ... and in NumPy's legacy generator
    atomic_save({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = _draws()
    seed_everything(999)
    _draws()
    set_rng_state(load_file(tmp_path / "rng.pt")["rng"])
    assert _draws() == expected


def test_seed_everything_is_reproducible() -> None:
    seed_everything(7)
    first = _draws()
    seed_everything(7)
    assert _draws() == first
