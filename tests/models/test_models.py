"""Tests for kdkit.models.factory: timm models by name, local weight files, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm.models._builder
import torch
from conftest import tiny_vit, vit_options
from safetensors.torch import save_file
from torch import nn

from kdkit.config.schema import ModelSpec
from kdkit.models import hub
from kdkit.models.factory import (
    ModelError,
    build_model,
    count_parameters,
    load_state_dict_checked,
    num_classes_of,
    state_dict_from,
)
from kdkit.registry import MODELS

VIT = "vit_tiny_patch16_224"


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_timm_model_by_name_with_options() -> None:
    model = build_model(ModelSpec(VIT, vit_options(embed_dim=32, depth=3)))
    assert model.embed_dim == 32 and len(model.blocks) == 3 and num_classes_of(model) == 10
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    model.head.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - 330


def test_unknown_model_lists_close_names() -> None:
    with pytest.raises(ModelError) as info:
        build_model(ModelSpec("vit_tiny_patch16_22"), where="models.student")
    message = str(info.value)
    assert message.startswith("models.student.name: unknown model 'vit_tiny_patch16_22'")
    assert "Close names:" in message and VIT in message


def test_bad_options_name_the_options() -> None:
    with pytest.raises(ModelError, match=r"models.s.options: .*options given: \['not_an_option'\]"):
        build_model(ModelSpec(VIT, {"not_an_option": 1}), where="models.s")


@pytest.mark.parametrize(
    ("options", "error"), [({"depth": -1}, "RuntimeError"), ({"num_heads": 5}, "AssertionError")]
)
def test_impossible_option_values_name_the_options(options: dict, error: str) -> None:
    """A negative depth (torch refuses it) or a width that the heads do not divide (timm asserts)
    is a recipe error naming the options, not a traceback."""
    spec = ModelSpec(VIT, vit_options(**options))
    with pytest.raises(ModelError, match=rf"models.s.options: .*cannot be built with these values \({error}"):
        build_model(spec, where="models.s")


@pytest.mark.parametrize("layout", ["bare.pth", "wrapped.pth", "ddp.pt", "kdkit.pt", "file.safetensors"])
def test_local_weights_load_exactly(tmp_path: Path, layout: str) -> None:
    source = tiny_vit(seed=1)
    state = source.state_dict()
    path = tmp_path / layout
    if layout == "bare.pth":
        torch.save(state, path)
    elif layout == "wrapped.pth":
        torch.save({"model": state, "epoch": 3}, path)
    elif layout == "ddp.pt":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif layout == "kdkit.pt":
        torch.save({"kdkit": 1, "kind": "model", "model": state, "metrics": {"val/accuracy": 0.5}}, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = build_model(ModelSpec(VIT, vit_options(), weights=str(path)))
    # Every tensor, the 10-class head included, comes from the file (timm would re-initialise the
    # head because its pretrained_cfg says 1000 classes).
    assert same_weights(model, source)


def test_hub_style_weights_are_adapted_to_another_class_count(tmp_path: Path) -> None:
    hub = tiny_vit(seed=2, num_classes=1000)  # like timm's ImageNet files
    path = tmp_path / "hub.safetensors"
    save_file({k: v.contiguous() for k, v in hub.state_dict().items()}, str(path))
    model = build_model(ModelSpec(VIT, vit_options(num_classes=2), weights=str(path)))
    assert model.head.weight.shape == (2, 32)
    assert torch.equal(model.blocks[1].mlp.fc1.weight, hub.blocks[1].mlp.fc1.weight)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (vit_options(embed_dim=64), "shape mismatch: cls_token (1, 1, 32) vs (1, 1, 64)"),
        (vit_options(depth=3), "missing: blocks.2.norm1.weight"),
        (vit_options(depth=1), "unexpected: blocks.1.norm1.weight"),
    ],
)
def test_weights_of_another_architecture_list_the_keys(tmp_path: Path, options: dict, expected: str) -> None:
    path = tmp_path / "w.pth"
    torch.save(tiny_vit().state_dict(), path)
    with pytest.raises(ModelError) as info:
        build_model(ModelSpec(VIT, options, weights=str(path)), where="models.student")
    message = str(info.value)
    assert message.startswith(f"models.student.weights: {path}: the weights do not fit VisionTransformer")
    assert expected in message


def test_weight_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="models.t.weights: weight file not found: .*nope.pth"):
        build_model(ModelSpec(VIT, vit_options(), weights=str(tmp_path / "nope.pth")), where="models.t")
    path = tmp_path / "notes.pt"
    torch.save({"epoch": 1, "notes": "no tensors"}, path)
    with pytest.raises(ModelError, match="holds no state dict"):
        build_model(ModelSpec(VIT, vit_options(), weights=str(path)))


def test_pretrained_without_network_says_to_set_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)
    # the host answers (kdkit.models.hub's quick check passes), then the download itself fails
    monkeypatch.setattr(hub, "unreachable", lambda url: None)
    with pytest.raises(ModelError) as info:
        build_model(ModelSpec(VIT, vit_options(), pretrained=True), where="models.teacher")
    message = str(info.value)
    assert message.startswith("models.teacher.pretrained: could not get pretrained weights")
    assert "OSError" in message and "couldn't connect" in message
    assert "models.teacher.weights=/path/to/file" in message and "models.teacher.pretrained=false" in message


def test_registered_models_and_their_weights(tmp_path: Path) -> None:
    name = "tests_tiny_mlp"
    if name not in MODELS:
        MODELS.add(
            name, lambda hidden=4: nn.Sequential(nn.Flatten(), nn.Linear(256, hidden), nn.Linear(hidden, 10))
        )
    model = build_model(ModelSpec(name, {"hidden": 5}))
    assert model[1].out_features == 5
    path = tmp_path / "mlp.pt"
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}}, path)
    assert same_weights(build_model(ModelSpec(name, {"hidden": 5}, weights=str(path))), model)
    with pytest.raises(ModelError, match="shape mismatch: 1.weight"):
        build_model(ModelSpec(name, {"hidden": 6}, weights=str(path)))
    with pytest.raises(ModelError, match="models.m.pretrained: .* give a local file in models.m.weights"):
        build_model(ModelSpec(name, pretrained=True), where="models.m")


def test_state_dict_helpers() -> None:
    w = torch.ones(2)
    assert state_dict_from({"model_state_dict": {"module._orig_mod.a": w}}) == {"a": w}
    with pytest.raises(ModelError):
        state_dict_from([w])
    model = nn.Linear(2, 1)
    with pytest.raises(ModelError, match=r"src: the weights do not fit Linear — missing: bias"):
        load_state_dict_checked(model, {"weight": torch.zeros(1, 2)}, "src")
