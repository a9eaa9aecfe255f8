"""Tests for kdkit.distill.taps: recorders, selectors, presets and list_taps."""

from __future__ import annotations

import gc
import weakref

import pytest
import timm
import torch
import torchvision
from torch import nn

from kdkit.distill.taps import Tap, TapError, TapRecorder, block_taps, find_preset, list_taps, select_features
from kdkit.registry import TAP_PRESETS


def tiny_vit(embed_dim: int = 32, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=embed_dim,
        depth=3,
        num_heads=2,
        num_classes=2,
        **kwargs,
    ).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def manual_blocks(model: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """The output of block k (1-based), computed without hooks."""
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    return model.blocks[:k](h)


def test_block_output_matches_manual_forward(images):
    model = tiny_vit()
    taps = {
        "tok": Tap("blocks.1", select="tokens"),
        "cls": Tap("blocks.1"),
        "in": Tap("blocks.1", "input", "tokens"),
    }
    with TapRecorder(model, taps) as rec, torch.no_grad():
        model(images)
        feats = rec.pop()
        expected = manual_blocks(model, images, 2)
        assert feats["tok"].shape == (2, 17, 32)  # 16 patches + cls
        torch.testing.assert_close(feats["tok"], expected)
        torch.testing.assert_close(feats["cls"], expected[:, 0])
        torch.testing.assert_close(feats["in"], manual_blocks(model, images, 1))


def test_student_and_teacher_on_same_path_do_not_collide(images):
    student, teacher = tiny_vit(32), tiny_vit(48)
    s_rec = TapRecorder(student, {"f": Tap("blocks.2")})
    t_rec = TapRecorder(teacher, {"f": Tap("blocks.2")})
    with torch.no_grad():
        student(images)
        teacher(images)
    s, t = s_rec.pop()["f"], t_rec.pop()["f"]
    assert s.shape == (2, 32) and t.shape == (2, 48)
    with torch.no_grad():
        torch.testing.assert_close(t, manual_blocks(teacher, images, 3)[:, 0])


def test_student_features_keep_their_graph(images):
    model = tiny_vit().train()
    rec = TapRecorder(model, {"f": Tap("blocks.0")})
    model(images)
    rec.pop()["f"].pow(2).sum().backward()
    assert model.blocks[0].mlp.fc1.weight.grad is not None


def test_missing_path_lists_close_names():
    with pytest.raises(TapError, match="blocks.30") as info:
        TapRecorder(tiny_vit(), {"s": Tap("blocks.30")})
    assert isinstance(info.value, ValueError)
    assert "closest paths:" in str(info.value)
    assert "blocks.0" in str(info.value).split("closest paths:")[1]


class TwoBranches(nn.Module):
    """A model whose `unused` branch never runs, and whose `pair` returns a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_tap_that_did_not_fire_raises_and_names_it():
    model = TwoBranches()
    rec = TapRecorder(model, {"ok": Tap("used", select="all"), "dead": Tap("unused", select="all")})
    model(torch.randn(2, 4))
    with pytest.raises(TapError, match="dead") as info:
        rec.pop()
    assert "ok (" not in str(info.value)


def test_pop_clears_buffers(images):
    model = tiny_vit()
    rec = TapRecorder(model, {"f": Tap("blocks.0")})
    with torch.no_grad():
        model(images)
    rec.pop()
    with pytest.raises(TapError, match="did not fire"):
        rec.pop()


def test_recorder_holds_no_tensor_after_pop(images):
    model = tiny_vit()
    rec = TapRecorder(model, {"f": Tap("blocks.0", select="tokens")})
    refs = []
    for _ in range(3):
        with torch.no_grad():
            model(images)
        feats = rec.pop()
        refs.append(weakref.ref(feats["f"]))
        del feats
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_remove_leaves_no_hooks(images):
    model = tiny_vit()
    before = [dict(m._forward_hooks) for m in model.modules()]
    rec = TapRecorder(model, {"a": Tap("blocks.0"), "b": Tap("blocks.1.attn")})
    assert model.blocks[0]._forward_hooks
    rec.remove()
    assert not model.blocks[0]._forward_hooks and not model.blocks[1].attn._forward_hooks
    assert [dict(m._forward_hooks) for m in model.modules()] == before
    with torch.no_grad():
        model(images)
    with pytest.raises(TapError, match="removed"):
        rec.pop()


def test_context_manager_removes_hooks(images):
    model = tiny_vit()
    with TapRecorder(model, {"a": Tap("blocks.0")}):
        assert model.blocks[0]._forward_hooks
    assert not model.blocks[0]._forward_hooks


class TupleModel(nn.Module):
    """`pair` takes two inputs and returns (hidden, extra), like attention layers that return weights."""

    class Pair(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return a + b, a - b

    def __init__(self) -> None:
        super().__init__()
        self.pair = self.Pair()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pair(x, 2 * x)[0]


def test_tuple_inputs_and_outputs_take_element_zero():
    x = torch.randn(2, 5)
    model = TupleModel()
    rec = TapRecorder(model, {"in": Tap("pair", "input", "all"), "out": Tap("pair", "output", "all")})
    model(x)
    feats = rec.pop()
    torch.testing.assert_close(feats["in"], x)
    torch.testing.assert_close(feats["out"], 3 * x)


def test_unwraps_compiled_model(images):
    model = tiny_vit()
    compiled = torch.compile(model, backend="eager")
    rec = TapRecorder(compiled, {"f": Tap("blocks.0")})
    with torch.no_grad():
        compiled(images)
        expected = manual_blocks(model, images, 1)[:, 0]
    torch.testing.assert_close(rec.pop()["f"], expected)
    # A recorder added after the compiled model ran may not fire (torch decides); it must never be silent.
    late = TapRecorder(compiled, {"g": Tap("blocks.1")})
    with torch.no_grad():
        compiled(images)
        expected = manual_blocks(model, images, 2)[:, 0]
    try:
        torch.testing.assert_close(late.pop()["g"], expected)
    except TapError as error:
        assert "compiled" in str(error)


def test_unwraps_ddp(tmp_path, images):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_vit()
        ddp = nn.parallel.DistributedDataParallel(model)
        rec = TapRecorder(ddp, {"f": Tap("blocks.2", select="patch")})
        with torch.no_grad():
            ddp(images)
        assert rec.pop()["f"].shape == (2, 16, 32)
        assert find_preset(ddp).name == "vit"
    finally:
        dist.destroy_process_group()


def test_num_prefix_tokens_defaults_to_the_model(images):
    model = tiny_vit(reg_tokens=2)
    assert model.num_prefix_tokens == 3
    rec = TapRecorder(model, {"p": Tap("blocks.0", select="patch"), "m": Tap("blocks.0", select="mean")})
    with torch.no_grad():
        model(images)
    feats = rec.pop()
    assert feats["p"].shape == (2, 16, 32)
    torch.testing.assert_close(feats["m"], feats["p"].mean(dim=1))


# ---- selectors -------------------------------------------------------------------------------------


def test_token_selectors():
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(select_features(x, "cls"), x[:, 0])
    torch.testing.assert_close(select_features(x, "patch", num_prefix_tokens=2), x[:, 2:])
    torch.testing.assert_close(select_features(x, "mean"), x[:, 1:].mean(1))
    torch.testing.assert_close(select_features(x, "mean", num_prefix_tokens=0), x.mean(1))
    torch.testing.assert_close(select_features(x, "index:3"), x[:, 3])
    torch.testing.assert_close(select_features(x, "index:-1"), x[:, -1])
    assert select_features(x, "tokens") is x and select_features(x, "all") is x


def test_map_selectors():
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(select_features(x, "mean"), x.mean(dim=(2, 3)))
    tokens = select_features(x, "tokens")
    assert tokens.shape == (2, 20, 3)
    torch.testing.assert_close(tokens[:, 6], x[:, :, 1, 1])  # row-major: token 6 = (h=1, w=1)
    assert select_features(x, "all") is x
    for bad in ("cls", "patch", "index:0"):
        with pytest.raises(ValueError, match=r"\(2, 3, 4, 5\)"):
            select_features(x, bad)


def test_pooled_features_accept_only_all():
    x = torch.randn(2, 7)
    assert select_features(x, "all") is x
    for bad in ("cls", "mean", "patch", "tokens", "index:0"):
        with pytest.raises(ValueError, match=r"\(2, 7\)"):
            select_features(x, bad)


def test_bad_selectors():
    valid = "valid selectors: cls, patch, mean, tokens, grid, grid:S, index:K, all"
    with pytest.raises(ValueError, match=valid):
        select_features(torch.randn(2, 3, 4), "grids")
    with pytest.raises(ValueError, match="out of range"):
        select_features(torch.randn(2, 3, 4), "index:3")
    with pytest.raises(ValueError, match="integer"):
        Tap("blocks.0", select="index:x")
    with pytest.raises(ValueError, match="without prefix tokens"):
        select_features(torch.randn(2, 3, 4), "cls", num_prefix_tokens=0)
    with pytest.raises(ValueError, match="no tokens after"):
        select_features(torch.randn(2, 1, 4), "patch")
    with pytest.raises(ValueError, match="unknown selector"):
        Tap("blocks.0", select="clss")
    with pytest.raises(ValueError, match="'output' or 'input'"):
        Tap("blocks.0", io="outputs")


# ---- presets ---------------------------------------------------------------------------------------


def test_presets_are_registered():
    assert {"vit", "resnet", "convnext"} <= set(TAP_PRESETS)


def test_vit_preset(images):
    model = tiny_vit()
    preset = find_preset(model)
    assert preset.name == "vit" and preset.depth(model) == 3
    assert preset.path(model, 2, "attn") == "blocks.1.attn"
    assert preset.path(model, 3, "mlp") == "blocks.2.mlp"
    taps = block_taps(model, [1, 3])
    assert taps == [Tap("blocks.0", select="cls"), Tap("blocks.2", select="cls")]
    with pytest.raises(ValueError, match="block 4 is beyond the depth 3 of VisionTransformer"):
        block_taps(model, [4])
    with pytest.raises(ValueError, match="block 0 is below 1"):
        block_taps(model, [0])
    with pytest.raises(ValueError, match="points: block, attn, mlp"):
        block_taps(model, [1], point="norm")


def test_resnet_preset(images):
    model = torchvision.models.resnet18(num_classes=2).eval()
    taps = block_taps(model, [1, 4])
    assert [t.path for t in taps] == ["layer1", "layer4"] and {t.select for t in taps} == {"mean"}
    rec = TapRecorder(model, {"a": taps[0], "b": taps[1]})
    with torch.no_grad():
        model(images)
    feats = rec.pop()
    assert feats["a"].shape == (2, 64) and feats["b"].shape == (2, 512)
    with pytest.raises(ValueError, match="beyond the depth 4 of ResNet"):
        block_taps(model, [5])


def test_convnext_preset(images):
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=2).eval()
    preset = find_preset(model)
    assert preset.name == "convnext" and preset.depth(model) == 4
    rec = TapRecorder(model, {"last": block_taps(model, [4])[0]})
    with torch.no_grad():
        model(images)
    assert rec.pop()["last"].shape == (2, 320)


def test_no_preset_for_unknown_model():
    presets = "convnext, efficientnet, resnet, vit"
    with pytest.raises(ValueError, match=f"no tap preset matches Sequential; presets: {presets}"):
        find_preset(nn.Sequential(nn.Linear(2, 2)))
    efficientnet = timm.create_model("efficientnet_b0", pretrained=False, num_classes=2)
    assert find_preset(efficientnet).name == "efficientnet"  # its `blocks` are CNN stages, not ViT blocks


# ---- list_taps -------------------------------------------------------------------------------------


def test_list_taps(images):
    model = tiny_vit().train()
    listed = dict(list_taps(model, images))
    assert listed["blocks.0"] == (2, 17, 32)
    assert listed["blocks.2.attn.qkv"] == (2, 17, 96)
    assert listed["head"] == (2, 2)
    assert "" not in listed
    assert model.training and model.blocks[0].training  # modes restored
    assert not any(m._forward_hooks for m in model.modules())
