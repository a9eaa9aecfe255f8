"""Plugin discovery through the entry-point group `kdkit.plugins`.

A plugin package declares, in its pyproject.toml::

    [project.entry-points."kdkit.plugins"]
    fas = "kdkit_fas.plugin:register"

and `register(registries)` adds its models, datasets, evaluators and CLI commands.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points

from kdkit.registry import Registries

GROUP = "kdkit.plugins"


@dataclass
class PluginInfo:
    """One discovered plugin."""

    name: str
    target: str  # "module:function"
    distribution: str
    version: str
    error: str | None = None


_loaded: dict[str, PluginInfo] = {}


def load_plugins() -> dict[str, PluginInfo]:
    """Import every installed plugin once and let it register its entries.

    A plugin that fails to load is reported in its `PluginInfo.error` instead of breaking kdkit.
    """
    if _loaded:
        return _loaded
    for ep in entry_points(group=GROUP):
        dist = ep.dist
        info = PluginInfo(ep.name, ep.value, dist.name if dist else "?", dist.version if dist else "?")
        try:
            ep.load()(Registries())
        except Exception as exc:  # a broken plugin must not take the core down
            info.error = f"{type(exc).__name__}: {exc}"
        _loaded[ep.name] = info
    return _loaded
