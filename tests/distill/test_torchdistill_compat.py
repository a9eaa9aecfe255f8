"""Tests for kdkit.distill.torchdistill_compat: KDKitFeatureLoss inside torchdistill's loss machinery."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
import yaml
from torchdistill.common.main_util import import_dependencies
from torchdistill.core.forward_hook import ForwardHookManager
from torchdistill.losses.registry import MIDDLE_LEVEL_LOSS_DICT, get_high_level_loss, get_mid_level_loss

from kdkit.distill.adapters import build_adapter
from kdkit.distill.losses import build_feature_criterion
from kdkit.distill.torchdistill_compat import KDKitFeatureLoss

DOC = Path(__file__).resolve().parents[2] / "docs" / "adapters.md"


def tiny_vit(embed_dim: int) -> torch.nn.Module:
    torch.manual_seed(embed_dim)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=embed_dim,
        depth=2,
        num_heads=2,
        num_classes=2,
    ).eval()


def io_dicts(path: str = "blocks.1") -> tuple[dict, dict]:
    """Student and teacher io dicts captured by torchdistill's own hook manager, as DistillationBox does."""
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    dicts = []
    for model in (tiny_vit(32), tiny_vit(48)):
        manager = ForwardHookManager(torch.device("cpu"))
        manager.add_hook(model, path, requires_input=False, requires_output=True)
        with torch.no_grad():
            model(images)
        dicts.append(manager.pop_io_dict())
        manager.clear()
    return dicts[0], dicts[1]


def loss_kwargs(**overrides: object) -> dict:
    kwargs = {
        "student_module_path": "blocks.1",
        "student_module_io": "output",
        "teacher_module_path": "blocks.1",
        "teacher_module_io": "output",
        "adapter": "covariance",
        "student_dim": 32,
        "teacher_dim": 48,
        "criterion": "mse",
        "select": "all",
    }
    return {**kwargs, **overrides}


def test_registered_with_torchdistill():
    import_dependencies(["kdkit.distill.torchdistill_compat"])
    assert MIDDLE_LEVEL_LOSS_DICT["KDKitFeatureLoss"] is KDKitFeatureLoss


@pytest.mark.parametrize(
    ("adapter", "select"), [("covariance", "all"), ("covariance", "cls"), ("gram", "patch")]
)
def test_value_equals_adapter_and_criterion(adapter, select):
    s_io, t_io = io_dicts()
    loss = get_mid_level_loss(
        {"key": "KDKitFeatureLoss", "kwargs": loss_kwargs(adapter=adapter, select=select)}
    )
    s, t = s_io["blocks.1"]["output"], t_io["blocks.1"]["output"]
    if select == "cls":
        s, t = s[:, 0], t[:, 0]
    elif select == "patch":
        s, t = s[:, 1:], t[:, 1:]
    expected = build_feature_criterion("mse")(*build_adapter(adapter, 32, 48)(s, t))
    torch.testing.assert_close(loss(s_io, t_io, targets=None), expected)


def test_tuple_values_take_element_zero():
    s_io, t_io = io_dicts()
    plain = KDKitFeatureLoss(**loss_kwargs())(s_io, t_io)
    s_io["blocks.1"]["output"] = (s_io["blocks.1"]["output"], None)
    torch.testing.assert_close(KDKitFeatureLoss(**loss_kwargs())(s_io, t_io), plain)


def test_missing_io_entry_explains_the_yaml_fix():
    s_io, t_io = io_dicts()
    loss = KDKitFeatureLoss(**loss_kwargs(teacher_module_path="blocks.0"))
    with pytest.raises(ValueError, match=r"list 'blocks.0' under train.teacher.forward_hook.output"):
        loss(s_io, t_io)


def test_trainable_adapters_are_refused():
    with pytest.raises(ValueError, match="trainable parameters"):
        KDKitFeatureLoss(**loss_kwargs(adapter="projection"))


def test_bad_select_or_options_fail_at_construction():
    with pytest.raises(ValueError, match="unknown selector"):
        KDKitFeatureLoss(**loss_kwargs(select="clss"))
    with pytest.raises(ValueError, match="unknown options"):
        KDKitFeatureLoss(**loss_kwargs(adapter_options={"bogus": 1}))
    with pytest.raises(TypeError, match="adaptor"):
        KDKitFeatureLoss(**loss_kwargs(adaptor="gram"))


def test_doc_yaml_builds_a_working_torchdistill_criterion():
    yaml_blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)
    config = yaml.safe_load(next(block for block in yaml_blocks if "KDKitFeatureLoss" in block))
    import_dependencies(config["dependencies"])
    train = config["train"]
    assert "blocks.1" in train["student"]["forward_hook"]["output"]
    assert "blocks.1" in train["teacher"]["forward_hook"]["output"]
    criterion = get_high_level_loss(train["criterion"])
    s_io, t_io = io_dicts()
    total = criterion({"student": s_io, "teacher": t_io}, {}, None)
    term = train["criterion"]["kwargs"]["sub_terms"]["feat"]
    expected = term["weight"] * get_mid_level_loss(term["criterion"])(s_io, t_io)
    torch.testing.assert_close(total, expected)
    assert total > 0
