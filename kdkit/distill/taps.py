"""Taps: capture intermediate features of a model with forward hooks.

A `Tap` names a submodule by its dotted path (`blocks.7`), whether to take its input or output, and a
selector that turns the captured tensor into the feature to distil (`cls` token, `mean` of patch
tokens, ...). A `TapRecorder` attaches the hooks to one model and `pop()` returns the selected features
of the last forward. Presets (`vit`, `resnet`, `convnext`, `efficientnet`) turn "after block k"
into paths.

Rules that keep feature losses honest:
- one recorder per model: student and teacher taps on the same path must not share a buffer;
- create recorders before `torch.compile` runs (hooks added afterwards never fire);
- `pop()` fails loudly when a tap did not fire, since a missing feature would make its loss 0.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchdistill.core.forward_hook import ForwardHookManager

from kdkit.registry import TAP_PRESETS

SELECTORS = ("cls", "patch", "mean", "tokens", "grid", "grid:S", "index:K", "all")
# the selectors that take a number after the colon, and what the number is called
_NUMBERED = {"index": "K", "grid": "S"}


class TapError(ValueError):
    """A tap that names no module, did not fire, or captured something unusable."""


def _parse_select(select: str) -> tuple[str, int | None]:
    """Split `index:K` / `grid:S` into ('index', K) / ('grid', S); validate every other selector name."""
    name, colon, number = select.partition(":")
    if colon and name in _NUMBERED:
        letter = _NUMBERED[name]
        try:
            value = int(number)
        except ValueError:
            problem = f"{letter} in '{name}:{letter}' must be an integer"
            raise ValueError(f"selector {select!r}: {problem}") from None
        if name == "grid" and value < 1:
            raise ValueError(f"selector {select!r}: S in 'grid:S' (the side of the grid) must be >= 1")
        return name, value
    if select not in SELECTORS:
        raise ValueError(f"unknown selector {select!r}; valid selectors: {', '.join(SELECTORS)}")
    return select, None


@dataclass(frozen=True)
class Tap:
    """What to capture: the `io` ('output' or 'input') of the submodule at `path`, reduced by `select`."""

    path: str
    io: str = "output"
    select: str = "cls"

    def __post_init__(self) -> None:
        if self.io not in ("output", "input"):
            raise ValueError(f"tap {self.path!r}: io must be 'output' or 'input', got {self.io!r}")
        _parse_select(self.select)


def select_features(x: Tensor, select: str, num_prefix_tokens: int = 1) -> Tensor:
    """Reduce a captured tensor to the feature to distil.

    Token tensors (B, N, D), where the first `num_prefix_tokens` tokens are class/register tokens:
    `cls` -> x[:, 0]; `patch` and `grid` -> x[:, num_prefix_tokens:]; `mean` -> mean of the patch
    tokens; `tokens` -> x; `index:K` -> x[:, K]; `all` -> x.
    CNN maps (B, C, H, W): `mean` -> (B, C) global average; `tokens` and `grid` -> (B, H*W, C), one
    token per position, row by row; `all` -> x.
    `grid:S` -> (B, S*S, D or C): the positions of either resampled to an S x S grid (see
    `resample_grid`), so that a CNN map and a ViT's patch tokens line up position by position.
    Any other rank, e.g. already pooled (B, D) features: only `all`. Selectors that do not fit the shape
    raise ValueError rather than silently passing the tensor through.
    """
    name, number = _parse_select(select)
    if name == "all":
        return x
    shape = tuple(x.shape)
    if x.ndim == 4:
        return _select_from_map(x, select, name, number)
    if x.ndim != 3:
        raise ValueError(
            f"selector {select!r} needs (B, N, D) tokens or a (B, C, H, W) map; got shape "
            f"{shape}. Use 'all' for features that are already pooled."
        )
    if name == "tokens":
        return x
    if name == "index":
        assert number is not None  # _parse_select gives index its K
        if not -x.shape[1] <= number < x.shape[1]:
            raise ValueError(f"selector {select!r}: index out of range for {x.shape[1]} tokens {shape}")
        return x[:, number]
    if name == "cls":
        if num_prefix_tokens < 1:
            raise ValueError(
                f"selector 'cls' on a model without prefix tokens (shape {shape}); "
                "use 'mean', 'patch' or 'tokens'"
            )
        return x[:, 0]
    if x.shape[1] <= num_prefix_tokens:
        raise ValueError(
            f"selector {select!r}: shape {shape} has no tokens after the {num_prefix_tokens} prefix tokens"
        )
    patch = x[:, num_prefix_tokens:]
    if name == "mean":
        return patch.mean(dim=1)
    if number is None:  # patch, grid
        return patch
    return _map_as_tokens(resample_grid(_tokens_as_map(patch, select, shape), number))


def _select_from_map(x: Tensor, select: str, name: str, number: int | None) -> Tensor:
    """`select_features` of a CNN map (B, C, H, W); `name`, `number`: the parsed `select`."""
    if name == "mean":
        return x.mean(dim=(2, 3))
    if name in ("tokens", "grid"):
        return _map_as_tokens(x if number is None else resample_grid(x, number))
    raise ValueError(
        f"selector {select!r} needs (B, N, D) tokens; got a (B, C, H, W) map {tuple(x.shape)}, which has "
        "no class or patch tokens. Use 'mean' (its global average: a vector, like a ViT's 'cls'), "
        "'grid' or 'grid:S' (one token per position, like a ViT's patch tokens), 'tokens' or 'all'. "
        "Leave select unset in a CNN-ViT pair for each model's own default (ViT 'cls', CNN 'mean')."
    )


def resample_grid(maps: Tensor, side: int) -> Tensor:
    """Maps (B, C, H, W) resampled to (B, C, side, side), without parameters: by area (each new cell
    the mean of the cells it covers; `F.adaptive_avg_pool2d`) when the grid shrinks or keeps its
    size on both axes, else by bilinear interpolation (`align_corners=False`), which invents no
    detail but blurs."""
    if side <= min(maps.shape[-2:]):
        return F.adaptive_avg_pool2d(maps, side)
    return F.interpolate(maps, size=(side, side), mode="bilinear", align_corners=False)


def _tokens_as_map(patch: Tensor, select: str, shape: tuple[int, ...]) -> Tensor:
    """Patch tokens (B, N, D) laid out on their square grid as a map (B, D, √N, √N), row by row
    (timm's patch order)."""
    count = patch.shape[1]
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(
            f"selector {select!r}: the {count} patch tokens of {shape} form no square grid, so their "
            "positions are unknown; use 'grid' (no resampling) or 'mean'"
        )
    return patch.transpose(1, 2).reshape(patch.shape[0], patch.shape[2], side, side)


def _map_as_tokens(maps: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H*W, C): one token per position, row by row."""
    return maps.flatten(2).transpose(1, 2)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the model inside DDP/DataParallel (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def prefix_tokens(model: nn.Module) -> int:
    """How many class/register tokens lead the model's token sequences (timm's `num_prefix_tokens`;
    1 when the model does not say): what the `patch` and `mean` selectors skip."""
    return getattr(unwrap_model(model), "num_prefix_tokens", 1)


def _first(value: object) -> object:
    """Tuple or list input/output: element 0 (e.g. the hidden state of (hidden, attn))."""
    if isinstance(value, (tuple, list)):
        return value[0] if value else None
    return value


class TapRecorder:
    """Forward hooks on one model that capture the features its taps name.

    >>> rec = TapRecorder(student, {"s3": Tap("blocks.2", select="cls")})
    >>> logits = student(images)
    >>> feats = rec.pop()            # {"s3": (B, D)}; raises TapError if a tap did not fire
    >>> rec.remove()                 # or use `with TapRecorder(...) as rec:`

    Built on torchdistill's `ForwardHookManager` (one manager per recorder, so a student and a teacher
    tap on the same path never overwrite each other). Tensors are held only from the forward until
    `pop()`; the student's tensors keep their autograd graph so a feature loss can backpropagate.
    `nn.DataParallel` is not supported (its replicas write separate entries); use DDP.
    """

    def __init__(self, model: nn.Module, taps: dict[str, Tap], num_prefix_tokens: int | None = None) -> None:
        root = unwrap_model(model)
        self.taps = dict(taps)
        self.num_prefix_tokens = prefix_tokens(root) if num_prefix_tokens is None else num_prefix_tokens
        modules = dict(root.named_modules())
        for name, tap in self.taps.items():
            if tap.path not in modules:
                close = difflib.get_close_matches(tap.path, [p for p in modules if p], n=5, cutoff=0)
                raise TapError(
                    f"tap {name!r}: no module at path {tap.path!r} in {type(root).__name__}; "
                    f"closest paths: {', '.join(close)}"
                )
        # One hook per path, capturing input and/or output as the taps on that path need.
        ios: dict[str, set[str]] = {}
        for tap in self.taps.values():
            ios.setdefault(tap.path, set()).add(tap.io)
        self._manager = ForwardHookManager(torch.device("cpu"))  # cpu: never gather across DP replicas
        for path, wanted in ios.items():
            self._manager.add_hook(
                root, path, requires_input="input" in wanted, requires_output="output" in wanted
            )
        self._removed = False
        # each tap's tensor as captured, before its selector (what `kdkit validate` shows beside
        # the selected feature), as of the last pop()
        self.captured_shapes: dict[str, tuple[int, ...]] = {}

    def pop(self) -> dict[str, Tensor]:
        """Return {tap name: selected feature} of the last forward and clear the buffers.

        Raises TapError naming the taps that did not fire since the last `pop()`.
        """
        if self._removed:
            raise TapError("this TapRecorder was removed; create a new one")
        replicated = [
            p for p, by_io in self._manager.io_dict.items() if any(len(d) > 1 for d in by_io.values())
        ]
        io_dict = self._manager.pop_io_dict()
        if replicated:
            raise TapError(f"tap paths {replicated} fired on several devices (nn.DataParallel?); use DDP")
        missing = [
            f"{name} ({tap.path}, {tap.io})"
            for name, tap in self.taps.items()
            if tap.io not in io_dict[tap.path]
        ]
        if missing:
            raise TapError(
                f"taps did not fire in the last forward: {', '.join(missing)}. Did the model run "
                "since the last pop()? Hooks added after a compiled model first ran never fire: "
                "create the recorder before that."
            )
        features = {}
        for name, tap in self.taps.items():
            value = _first(io_dict[tap.path][tap.io])
            if not isinstance(value, Tensor):
                raise TapError(
                    f"tap {name!r}: the {tap.io} of {tap.path!r} is {type(value).__name__}, not a "
                    "tensor (keyword-only inputs are not captured; tap the output instead)"
                )
            self.captured_shapes[name] = tuple(value.shape)
            try:
                features[name] = select_features(value, tap.select, self.num_prefix_tokens)
            except ValueError as exc:
                raise TapError(f"tap {name!r} ({tap.path}, {tap.io}): {exc}") from None
        return features

    def remove(self) -> None:
        """Remove every hook and drop captured tensors."""
        self._manager.clear()
        self._removed = True

    def __enter__(self) -> TapRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def list_taps(model: nn.Module, example_input: Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """Every named submodule path with its output shape (element 0 of tuples) for one forward.

    Runs in eval mode under no_grad and restores each module's mode afterwards. Modules that do not run
    or return no tensor are left out. Uses plain hooks that keep only shapes, not a hook manager
    that would hold every module's output tensor at once.
    """
    root = unwrap_model(model)
    shapes: dict[str, tuple[int, ...]] = {}

    def hook_for(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            value = _first(output)
            if isinstance(value, Tensor):
                shapes[path] = tuple(value.shape)

        return hook

    named = [(path, module) for path, module in root.named_modules() if path]
    handles = [module.register_forward_hook(hook_for(path)) for path, module in named]
    modes = {module: module.training for module in root.modules()}
    try:
        root.eval()
        with torch.no_grad():
            root(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return [(path, shapes[path]) for path, _ in named if path in shapes]


@dataclass(frozen=True)
class TapPreset:
    """Layer-hook paths for one architecture family.

    `stages(model)` lists the path of every block/stage in order; `points` maps a point name to the
    suffix appended to a stage path (`"attn": ".attn"`); index k (1-based) means "after block k".
    """

    name: str
    stages: Callable[[nn.Module], list[str]]
    default_select: str
    points: dict[str, str] = field(default_factory=lambda: {"block": ""})

    def matches(self, model: nn.Module) -> bool:
        """Whether this preset understands `model` (wrappers are unwrapped)."""
        return bool(self.stages(unwrap_model(model)))

    def depth(self, model: nn.Module) -> int:
        """Number of blocks/stages."""
        return len(self.stages(unwrap_model(model)))

    def path(self, model: nn.Module, index: int, point: str = "block") -> str:
        """Module path of `point` in block `index` (1-based)."""
        stages = self.stages(unwrap_model(model))
        name = type(unwrap_model(model)).__name__
        if index > len(stages):
            raise ValueError(f"block {index} is beyond the depth {len(stages)} of {name}")
        if index < 1:
            raise ValueError(
                f"block {index} is below 1 (block numbers are 1-based, 1..{len(stages)}) for {name}"
            )
        if point not in self.points:
            raise ValueError(f"preset {self.name!r} has no point {point!r}; points: {', '.join(self.points)}")
        return stages[index - 1] + self.points[point]


def _vit_stages(model: nn.Module) -> list[str]:
    blocks = getattr(model, "blocks", None)
    # The attn check keeps CNNs with a `blocks` container (timm EfficientNet) out.
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) and hasattr(blocks[0], "attn"):
        return [f"blocks.{i}" for i in range(len(blocks))]
    return []


def _resnet_stages(model: nn.Module) -> list[str]:
    names = ["layer1", "layer2", "layer3", "layer4"]
    return names if all(isinstance(getattr(model, n, None), nn.Module) for n in names) else []


def _convnext_stages(model: nn.Module) -> list[str]:
    stages = getattr(model, "stages", None)
    if type(model).__name__ == "ConvNeXt" and isinstance(stages, (nn.Sequential, nn.ModuleList)):
        return [f"stages.{i}" for i in range(len(stages))]
    return []


def _efficientnet_stages(model: nn.Module) -> list[str]:
    """timm's EfficientNet and MobileNetV3 classes: `blocks` holds one Sequential per stage."""
    blocks = getattr(model, "blocks", None)
    if type(model).__name__ in ("EfficientNet", "MobileNetV3") and isinstance(blocks, nn.Sequential):
        return [f"blocks.{i}" for i in range(len(blocks))]
    return []


for _preset in (
    TapPreset("vit", _vit_stages, "cls", {"block": "", "attn": ".attn", "mlp": ".mlp"}),
    TapPreset("resnet", _resnet_stages, "mean"),
    TapPreset("convnext", _convnext_stages, "mean"),
    TapPreset("efficientnet", _efficientnet_stages, "mean"),
):
    TAP_PRESETS.add(_preset.name, _preset)


def _is_empty_container(module: object) -> bool:
    return isinstance(module, (nn.Sequential, nn.ModuleList)) and len(module) == 0


def find_preset(model: nn.Module) -> TapPreset:
    """The registered preset that matches `model`; ValueError if none (or several) do."""
    found = [TAP_PRESETS.get(name) for name in TAP_PRESETS if TAP_PRESETS.get(name).matches(model)]
    name = type(unwrap_model(model)).__name__
    empty = [n for n in ("blocks", "stages") if _is_empty_container(getattr(unwrap_model(model), n, None))]
    if not found and empty:
        raise ValueError(
            f"{name} has no {empty[0]} (an empty `{empty[0]}`: depth 0?), so it has no features to "
            "distil; give the model at least one block"
        )
    if not found:
        raise ValueError(
            f"no tap preset matches {name}; presets: {', '.join(TAP_PRESETS)}. "
            "Name module paths explicitly instead (see `kdkit taps MODEL` for the paths)."
        )
    if len(found) > 1:
        raise ValueError(
            f"several tap presets match {name}: {', '.join(p.name for p in found)}; "
            "name module paths explicitly instead"
        )
    return found[0]


def block_taps(
    model: nn.Module, indices: list[int], point: str = "block", select: str | None = None
) -> list[Tap]:
    """Taps after the 1-based blocks `indices` of `model`, using its preset's paths and default selector."""
    preset = find_preset(model)
    chosen = preset.default_select if select is None else select
    return [Tap(preset.path(model, index, point), select=chosen) for index in indices]
