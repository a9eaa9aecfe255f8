"""Loading recipes: YAML read safely, `--set KEY=VALUE` overrides applied, then checked.

A recipe is read with a `yaml.SafeLoader` (no tags that import or run code, no alias bombs),
overridden with `--set a.b=c` strings (an adapter changed by an override drops the old adapter's
options, with a note), then checked by `kdkit.config.validation.parse_recipe` *before any work*.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from kdkit.config.schema import DistillSpec, Recipe, RecipeError, canonical_keys, canonical_path
from kdkit.config.validation import parse_recipe
from kdkit.registry import did_you_mean


class _SafeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that also reads `1e-3` (no dot) as a number, as YAML 1.2 does."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
# What a malformed document can raise besides YAMLError (bad !!int/!!timestamp values, deep nesting).
_YAML_ERRORS = (yaml.YAMLError, ValueError, RecursionError)


class YamlTooLarge(ValueError):
    """A YAML document refused for its expanded size."""


# More values than any recipe has; anchors and aliases can make a tiny file expand beyond it (a
# "billion laughs" document), which would exhaust memory wherever the data is copied or printed.
MAX_YAML_VALUES = 100_000


def _safe_load(text: str) -> Any:
    data = yaml.load(text, Loader=_SafeLoader)  # a SafeLoader subclass: no code-running tags
    if _expanded_size(data, MAX_YAML_VALUES) > MAX_YAML_VALUES:
        raise YamlTooLarge(
            f"the document expands to more than {MAX_YAML_VALUES} values through its anchors and "
            "aliases (&name / *name); write the values out or use fewer nested aliases"
        )
    return data


def _expanded_size(data: Any, limit: int) -> int:
    """How many values `data` holds with every alias expanded, counting at most to `limit` + 1."""
    count, stack = 0, [data]
    while stack and count <= limit:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping safely; syntax errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([f"file not found: {path}"], str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([f"cannot read {path}: {exc}"], str(path)) from None
    try:
        data = _safe_load(text)
    except YamlTooLarge as exc:
        raise RecipeError([str(exc)], str(path)) from None
    except _YAML_ERRORS as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise RecipeError([f"malformed YAML at {where}{problem}"], str(path)) from None
    if not isinstance(data, dict):
        raise RecipeError([f"expected a YAML mapping at the top level, got {type(data).__name__}"], str(path))
    return data


def parse_override(text: str, flag: str = "--set") -> tuple[list[str], Any]:
    """Split 'a.b.c=value' into (['a', 'b', 'c'], value); the value is parsed as YAML. `flag` names
    the option the text came from in the error message."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip() or any(not p for p in parts):
        raise RecipeError([f"{flag} {text!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=0.001"])
    try:
        value = _safe_load(raw) if raw.strip() else ""
    except _YAML_ERRORS:
        value = raw  # not valid YAML: keep the text as a string
    return parts, value


def diff_keys(a: object, b: object, path: str = "") -> list[str]:
    """The dotted key paths at which two recipe mappings differ (e.g. a saved and a resolved
    recipe); old key names count as their current ones (a run saved with `stages` has `pairs`)."""
    if not path:
        a, b = canonical_keys(a), canonical_keys(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            k
            for key in a.keys() | b.keys()
            for k in diff_keys(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
        ]
    return [] if a == b else [path or "(root)"]


def recipe_changes(saved: dict[str, Any], resolved: dict[str, Any]) -> list[str]:
    """The key paths at which a resolved recipe differs from one a run saved, with the saved one
    read as this version reads it: a key added since (at its default) is no change."""
    with contextlib.suppress(RecipeError):  # not readable any more: compared as written
        saved = parse_recipe(saved).to_dict()
    return sorted(diff_keys(saved, resolved))


def parse_options(texts: list[str], flag: str) -> dict[str, Any]:
    """`['a=1', 'b.c=x']` (repeated `flag KEY=VALUE` options) → `{'a': 1, 'b.c': 'x'}`, values as YAML."""
    options = {}
    for text in texts:
        parts, value = parse_override(text, flag)
        options[".".join(parts)] = value
    return options


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each 'a.b=c' override applied.

    List items are addressed by index (`pipeline.0.train.epochs=2`) or, for lists of mappings
    with a `name`, by that name (`pipeline.teacher.train.epochs=2`). Old key names, in the data
    and in the overrides, are read as their current ones (`distill.stages` is `distill.pairs`).
    Adapter options stay with their adapter: an override that changes a distill section's adapter
    without setting its `adapter_options` drops the old adapter's options, with a note
    (`_keep_options_with_their_adapter`); one that sets a section's `teacher` or `teachers` replaces
    the other form (`_keep_one_teacher_form`).
    """
    data = copy.deepcopy(canonical_keys(data))
    before = _adapter_settings(data)
    changed = [_set_value(data, text) for text in overrides]
    _keep_options_with_their_adapter(data, before, changed)
    _keep_one_teacher_form(data, changed)
    return data


def _set_value(data: dict[str, Any], text: str) -> tuple[str | int, ...]:
    """Apply one 'a.b=c' override to `data` in place; return the key path it set, list items as
    their index."""
    parts, value = parse_override(text)
    parts = canonical_path(parts)
    node: Any = data
    path: list[str | int] = []
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            index = _list_index(node, part, where, text) % len(node)
            path.append(index)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            path.append(part)
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise RecipeError([f"--set {text!r}: {'.'.join(parts[:depth])} is {node!r}, not a mapping"])
    return tuple(path)


Section = tuple[str | int, ...]  # the key path of a distill section: ('distill',), ('pipeline', i, 'distill')


def _distill_sections(data: dict[str, Any]) -> dict[Section, dict[str, Any]]:
    """The top-level distill section and each stage's own, by key path (a missing top one as {})."""
    top = data.get("distill")
    sections: dict[Section, dict[str, Any]] = {("distill",): top if isinstance(top, dict) else {}}
    for i, stage in enumerate(_stages(data)):
        if isinstance(stage, dict) and isinstance(stage.get("distill"), dict):
            sections[("pipeline", i, "distill")] = stage["distill"]
    return sections


def _stages(data: dict[str, Any]) -> list[Any]:
    stages = data.get("pipeline")
    return stages if isinstance(stages, list) else []


def _adapter_settings(data: dict[str, Any]) -> dict[Section, tuple[Any, dict[str, Any], bool]]:
    """Per distill section, every stage's included (one it has not got inherits everything): the
    adapter and adapter options it uses (its own, else the top-level section's), and whether the
    options are its own."""
    sections = _distill_sections(data)
    top = sections[("distill",)]
    inherited = (top.get("adapter", DistillSpec.adapter), top.get("adapter_options") or {})
    settings = {}
    for path in [("distill",), *(("pipeline", i, "distill") for i in range(len(_stages(data))))]:
        own = sections.get(path, {})
        options = (own["adapter_options"] or {}) if "adapter_options" in own else inherited[1]
        settings[path] = (own.get("adapter", inherited[0]), options, "adapter_options" in own)
    return settings


def _keep_options_with_their_adapter(
    data: dict[str, Any], before: dict[Section, tuple[Any, dict[str, Any], bool]], changed: list[Section]
) -> None:
    """Where the overrides (`changed`: the key paths they set) changed a section's adapter, drop the
    old adapter's options that they did not set themselves, with a note: the new adapter would
    refuse them, or read them as something else. A stage that keeps its adapter keeps the options
    it had from the top-level section."""
    for path in _distill_sections(data):  # the top-level section first: stages inherit from it
        adapter, options, own = _adapter_settings(data)[path]
        old_adapter, old_options, _ = before.get(path, (adapter, options, own))
        keys = [(*path, "adapter_options")] + ([] if own else [("distill", "adapter_options")])
        if any(c == key[: len(c)] for key in keys for c in changed):
            continue  # the overrides gave these options (or everything around them) themselves
        given = {c[len(key)] for key in keys for c in changed if c[: len(key)] == key and len(c) > len(key)}
        dropped = {k: v for k, v in options.items() if k not in given}
        section = _distill_sections(data)[path]
        if adapter != old_adapter and dropped:
            section["adapter_options"] = {k: v for k, v in options.items() if k in given}
            where = _section_name(data, path)
            _note_once(
                f"note: {where}.adapter is now {adapter!r} (was {old_adapter!r}): dropped "
                f"{where}.adapter_options {dropped}, options of {old_adapter!r}; set "
                f"{where}.adapter_options to give the new adapter options"
            )
        elif adapter == old_adapter and options != old_options and not own:
            section["adapter_options"] = copy.deepcopy(old_options)


def _keep_one_teacher_form(data: dict[str, Any], changed: list[Section]) -> None:
    """Where an override set a distill section's `teacher` (or `teachers`) and not the other form,
    drop the other form the section had, with a note: they name the same thing, and a section may
    give only one (`--set distill.teachers=[...]` on a recipe that names its `teacher`)."""
    sections = _distill_sections(data)
    for path in changed:
        section, key = path[:-1], path[-1]
        other = {"teacher": "teachers", "teachers": "teacher"}.get(str(key))
        if other and other in sections.get(section, {}) and (*section, other) not in changed:
            del sections[section][other]
            _note_once(f"note: {_section_name(data, section)}.{key} replaces its {other}")


def _section_name(data: dict[str, Any], path: Section) -> str:
    """A distill section's key as a recipe names it: `distill` or `pipeline.<stage>.distill`."""
    if path == ("distill",):
        return "distill"
    stage = data["pipeline"][path[1]]
    return f"pipeline.{stage.get('name', path[1])}.distill"


@functools.cache
def _note_once(text: str) -> None:
    """Print a note on stderr, once per process (an ablation applies a variant's overrides per seed).
    Plain `print`: kdkit.utils.runlog's console imports this module, and no progress bar runs yet."""
    print(text, file=sys.stderr)


def _list_index(node: list[Any], part: str, where: str, text: str) -> int:
    if re.fullmatch(r"-?[0-9]+", part):
        index = int(part)
        if -len(node) <= index < len(node):
            return index
        raise RecipeError([f"--set {text!r}: {where}: index out of range (the list has {len(node)} items)"])
    names = [item.get("name") if isinstance(item, dict) else None for item in node]  # aligned with node
    if part in names:
        return names.index(part)
    hint = did_you_mean(part, [n for n in names if isinstance(n, str)])
    raise RecipeError([f"--set {text!r}: {where}: no list item named {part!r}.{hint}"])


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file."""
    data = apply_overrides(read_yaml(path), overrides or [])
    return parse_recipe(data, str(path))
