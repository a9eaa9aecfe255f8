"""Building models from recipe specs, and loading weights from local files.

A model name is looked up in kdkit's `MODELS` registry first (plugins add entries there), then
in timm. Weights come from a local `.pth`/`.pt`/`.safetensors` file (timm's key remapping applies
to timm models) or, with `pretrained: true`, from timm's hub download (offline: from the local
cache, decided in seconds by `kdkit.models.hub`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from kdkit.config.schema import ModelSpec
from kdkit.models import hub
from kdkit.registry import MODELS
from kdkit.utils.checkpoint import CheckpointError, load_file


class ModelError(ValueError):
    """A model that cannot be built or whose weights do not fit it."""


def build_model(spec: ModelSpec, where: str = "model") -> nn.Module:
    """Create the model described by `spec` and load its weights (if any)."""
    if spec.name in MODELS:
        model = _call_factory(MODELS.get(spec.name), spec, where)
        if spec.pretrained:
            raise ModelError(
                f"{where}.pretrained: {spec.name!r} is a kdkit model without hub weights; "
                f"give a local file in {where}.weights instead"
            )
        if spec.weights:
            load_weights(model, spec.weights, where=f"{where}.weights")
        return model
    if not timm.is_model(spec.name):
        close = difflib.get_close_matches(spec.name, MODELS.names() + timm.list_models(), n=5, cutoff=0.6)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ModelError(
            f"{where}.name: unknown model {spec.name!r} (neither a registered kdkit model "
            f"nor a timm model).{hint}"
        )
    if spec.weights:
        return _timm_with_weights(spec, where)
    if spec.pretrained:
        local = _offline_weights(spec, where)
        overlay = {"pretrained_cfg_overlay": {"file": str(local)}} if local else {}
        try:
            return _call_factory(timm.create_model, spec, where, spec.name, pretrained=True, **overlay)
        except ModelError:
            raise
        except Exception as exc:  # hub download failures come in many types
            raise ModelError(
                f"{where}.pretrained: could not get pretrained weights for {spec.name!r} "
                f"({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}). Without network access, download "
                f"the weights elsewhere (e.g. the timm/{spec.name} model page on the Hugging Face hub), copy "
                f"the .safetensors/.pth file here and set {where}.weights=/path/to/file "
                f"(and {where}.pretrained=false)."
            ) from None
    return _call_factory(timm.create_model, spec, where, spec.name, pretrained=False)


def _offline_weights(spec: ModelSpec, where: str) -> Path | None:
    """None when timm may download `spec`'s pretrained weights; when the download host cannot be
    reached (or offline mode is set), their local copy, or a ModelError saying what to do."""
    try:
        source = hub.weight_source(spec.name, spec.options.get("cache_dir"))
    except RuntimeError as exc:  # timm: an unknown pretrained tag
        raise ModelError(f"{where}.name: {exc}") from None
    reason = None if source is None else hub.unreachable(source.url)
    if source is None or reason is None:
        return None
    if source.cached is None:
        raise ModelError(
            f"{where}.pretrained: cannot download the weights of {spec.name!r} ({reason}), and they are "
            f"not in the local cache {source.cache} (looked for {' or '.join(source.files)} of "
            f"{source.url}). Download that file where there is network access, copy it to this machine "
            f"and set {where}.weights: path/to/file.safetensors (or .pth) and {where}.pretrained: false."
        )
    return source.cached


def _timm_with_weights(spec: ModelSpec, where: str) -> nn.Module:
    """A timm model initialised from a local file: loaded as is when it fits exactly, else adapted by timm."""
    path = _existing(str(spec.weights), f"{where}.weights")
    source = f"{where}.weights: {path}"
    model = _call_factory(timm.create_model, spec, where, spec.name, pretrained=False)
    try:
        state = state_dict_from(load_file(path))
    except CheckpointError as exc:  # names the file already
        raise ModelError(f"{where}.weights: {exc}") from None
    except ModelError as exc:
        raise ModelError(f"{source}: {exc}") from None
    problem = _mismatch(model, state)
    if not problem:  # saved from this very architecture (kdkit checkpoints, fine-tuned weights)
        model.load_state_dict(state)
        return model
    # Another layout (e.g. timm hub files): timm remaps keys, resizes position embeddings and drops
    # the classifier only when the *file's* class count differs from `num_classes` (timm compares
    # with its pretrained_cfg instead, and then loads everything else non-strictly).
    overlay: dict[str, Any] = {"file": str(path)}
    head = getattr(model, "pretrained_cfg", {}).get("classifier")
    if isinstance(head, str) and f"{head}.weight" in state:
        overlay["num_classes"] = state[f"{head}.weight"].shape[0]
    try:
        return _call_factory(
            timm.create_model, spec, where, spec.name, pretrained=True, pretrained_cfg_overlay=overlay
        )
    except RuntimeError:  # timm's strict load or its adaptation failed: say which keys do not fit
        raise ModelError(f"{source}: the weights do not fit {type(model).__name__} — {problem}") from None


def _call_factory(factory: Any, spec: ModelSpec, where: str, *args: Any, **kwargs: Any) -> nn.Module:
    # Bad option values: timm asserts its options' arithmetic, torch refuses negative sizes. With
    # pretrained weights a RuntimeError is the weights' load failing, which the caller names.
    bad_values = (AssertionError, ArithmeticError)
    if not kwargs.get("pretrained"):
        bad_values += (RuntimeError, ValueError)
    try:
        return factory(*args, **kwargs, **spec.options)
    except TypeError as exc:
        raise ModelError(
            f"{where}.options: {spec.name!r} does not accept these options "
            f"({exc}); options given: {sorted(spec.options)}"
        ) from None
    except bad_values as exc:
        raise ModelError(
            f"{where}.options: {spec.name!r} cannot be built with these values ({type(exc).__name__}: "
            f"{exc or 'no detail'}); options given: {spec.options}. Check that widths divide by the "
            "number of heads and that counts (depth, num_heads) are positive"
        ) from None


def _existing(path: str | Path, where: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"{where}: weight file not found: {path}")
    return path


def state_dict_from(obj: Any) -> dict[str, torch.Tensor]:
    """Extract a state dict from a loaded file: a kdkit checkpoint, a {'model'|'state_dict': ...}
    wrapper, or a bare state dict; strips `module.` (DDP) and `_orig_mod.` (compile) prefixes."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError("the file holds no state dict (expected tensors by parameter name)")
    out = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def load_weights(model: nn.Module, path: str | Path, where: str = "weights") -> None:
    """Load a local weight file into `model` strictly; mismatches are listed by key."""
    path = _existing(path, where)
    try:
        state = state_dict_from(load_file(path))
    except CheckpointError as exc:  # names the file already
        raise ModelError(f"{where}: {exc}") from None
    except ModelError as exc:
        raise ModelError(f"{where}: {path}: {exc}") from None
    load_state_dict_checked(model, state, f"{where}: {path}")


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`model.load_state_dict(state)` with an error that lists missing, unexpected and
    shape-mismatched keys (e.g. a checkpoint of another architecture)."""
    problem = _mismatch(model, state)
    if problem:
        raise ModelError(f"{source}: the weights do not fit {type(model).__name__} — {problem}")
    model.load_state_dict(state)


def _mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """'' when `state` fits `model` exactly, else its missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
            parts.append(f"{label}: {', '.join(keys[:8])}{more}")
    return "; ".join(parts)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with requires_grad)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def num_classes_of(model: nn.Module) -> int | None:
    """The classifier's output count, when the model says (timm's `num_classes`)."""
    value = getattr(model, "num_classes", None)
    return int(value) if isinstance(value, int) else None
