"""Models: build them from recipe specs, load local weights, where pretrained weights come from, their cost.

The names below were `kdkit.models`'s in 0.2 and stay importable from here."""

from kdkit.models.factory import (
    ModelError,
    build_model,
    count_parameters,
    load_state_dict_checked,
    load_weights,
    num_classes_of,
    state_dict_from,
)

__all__ = [
    "ModelError",
    "build_model",
    "count_parameters",
    "load_state_dict_checked",
    "load_weights",
    "num_classes_of",
    "state_dict_from",
]
