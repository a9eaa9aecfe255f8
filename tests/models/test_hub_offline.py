"""`pretrained: true` without network: refused in seconds with what to do, or read from the cache.

No test here touches the real network: every one replaces `socket.create_connection`.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import yaml
from conftest import tiny_recipe_dict, vit_options
from huggingface_hub import constants
from safetensors.torch import save_file

from kdkit.cli import main
from kdkit.config.schema import ModelSpec
from kdkit.models import hub
from kdkit.models.factory import ModelError, build_model

REPO_ID = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # timm's default weights of the name


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[str, int]]:
    """Every connection attempt fails (and is recorded); an empty hub cache; no offline settings."""
    tried: list[tuple[str, int]] = []

    def refuse(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        tried.append(address)
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for variable in (*hub.OFFLINE_VARIABLES, "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    return tried


def _pretrained_recipe(tmp_path: Path) -> Path:
    data = tiny_recipe_dict()
    data["models"]["teacher"]["pretrained"] = True
    path = tmp_path / "pretrained.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _validate_quickly(recipe: Path, capsys: pytest.CaptureFixture[str]) -> str:
    start = time.monotonic()
    assert main(["validate", str(recipe)]) == 2
    assert time.monotonic() - start < 8  # was about a minute of hub retries
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for words in ("models.teacher.pretrained", "'vit_tiny_patch16_224'", REPO_ID, "model.safetensors"):
        assert words in err, f"{words!r} not in:\n{err}"
    # the remedy: a local file instead of the download, and where the cache was looked for
    assert "models.teacher.weights: path/to/file.safetensors (or .pth)" in err
    assert "models.teacher.pretrained: false" in err and constants.HF_HUB_CACHE in err
    return err


def test_hf_hub_offline_is_refused_without_trying_the_network(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_network: list[tuple[str, int]],
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _validate_quickly(_pretrained_recipe(tmp_path), capsys)
    assert "HF_HUB_OFFLINE=1 is set" in err
    assert no_network == []  # offline means no connection attempt at all


def test_no_network_is_found_in_seconds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_network: list[tuple[str, int]]
) -> None:
    err = _validate_quickly(_pretrained_recipe(tmp_path), capsys)
    assert "no network: cannot connect to huggingface.co:443" in err and "Network is unreachable" in err
    assert no_network == [("huggingface.co", 443)]  # one quick check, no retries


def test_a_connection_that_hangs_is_given_up_after_connect_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def stuck(*args: Any, **kwargs: Any) -> socket.socket:  # like a name lookup that never answers
        release.wait(10)
        raise OSError("gave up")

    monkeypatch.setattr(socket, "create_connection", stuck)
    monkeypatch.setattr(hub, "CONNECT_SECONDS", 0.2)
    for variable in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    start = time.monotonic()
    try:
        reason = hub.unreachable("https://huggingface.co/timm/x")
    finally:
        release.set()
    assert time.monotonic() - start < 1.5
    assert reason == "no network: cannot connect to huggingface.co:443 (no answer within 0.2 s)"


def test_the_check_goes_through_the_https_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    tried: list[tuple[str, int]] = []

    class Connection:
        def close(self) -> None:
            pass

    def connect(address: tuple[str, int], *args: Any, **kwargs: Any) -> Connection:
        tried.append(address)
        return Connection()

    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for variable in (*hub.OFFLINE_VARIABLES, "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub.unreachable("https://huggingface.co/timm/x") is None
    assert tried == [("proxy.example", 3128)]


def test_offline_weights_in_the_hub_cache_are_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[tuple[str, int]]
) -> None:
    """What timm would have read after a minute of retries is read at once, without the hub."""
    torch.manual_seed(3)
    saved = timm.create_model("vit_tiny_patch16_224", **vit_options(embed_dim=48)).state_dict()
    repo = Path(constants.HF_HUB_CACHE) / f"models--{REPO_ID.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(saved, repo / "snapshots" / ("0" * 40) / "model.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    spec = ModelSpec("vit_tiny_patch16_224", vit_options(embed_dim=48), pretrained=True)
    loaded = build_model(spec, where="models.teacher").state_dict()
    assert no_network == []
    for key in ("patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "pos_embed"):
        assert torch.equal(loaded[key], saved[key]), key


def test_an_unknown_pretrained_tag_names_the_key() -> None:
    with pytest.raises(ModelError, match=r"models\.teacher\.name: Invalid pretrained tag \(nope\)"):
        build_model(ModelSpec("vit_tiny_patch16_224.nope", pretrained=True), where="models.teacher")
