"""Tests for kdkit.registry: registration, duplicates and helpful unknown-name errors."""

from __future__ import annotations

import pytest

from kdkit.registry import ADAPTERS, Registries, Registry, RegistryError, did_you_mean


def make_registry() -> Registry:
    reg: Registry = Registry("adapter")

    @reg.register("covariance")
    class Covariance: ...

    @reg.register()
    def projection() -> None: ...

    reg.add("identity", object())
    return reg


def test_register_by_name_and_by_dunder_name() -> None:
    reg = make_registry()
    assert reg.get("covariance").__name__ == "Covariance"
    assert reg.get("projection").__name__ == "projection"
    assert reg.names() == ["covariance", "identity", "projection"]
    assert list(reg) == reg.names() and len(reg) == 3 and "identity" in reg and "gram" not in reg


def test_duplicate_name_is_an_error_and_keeps_the_first_entry() -> None:
    reg = make_registry()
    first = reg.get("identity")
    with pytest.raises(RegistryError, match="adapter 'identity' is already registered"):
        reg.add("identity", object())
    assert reg.get("identity") is first


def test_unknown_name_lists_valid_names_and_suggests_the_closest() -> None:
    reg = make_registry()
    with pytest.raises(RegistryError) as info:
        reg.get("covarience")
    message = str(info.value)
    assert "unknown adapter 'covarience'" in message
    assert "Did you mean 'covariance'?" in message
    assert "covariance, identity, projection" in message
    assert not message.startswith("'")  # not wrapped in KeyError's quotes
    assert isinstance(info.value, KeyError)  # callers catching KeyError still work


def test_unknown_name_without_close_match_has_no_suggestion() -> None:
    reg = make_registry()
    with pytest.raises(RegistryError) as info:
        reg.get("zzz")
    assert "Did you mean" not in str(info.value)
    with pytest.raises(RegistryError, match=r"\(none\)"):
        Registry("model").get("vit")


def test_did_you_mean() -> None:
    assert did_you_mean("distil", ["distill", "train"]) == " Did you mean 'distill'?"
    assert did_you_mean("qqq", ["distill", "train"]) == ""


def test_registries_share_the_global_registries() -> None:
    assert Registries().adapters is ADAPTERS
