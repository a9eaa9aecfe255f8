"""The test suite's own order: files with a slow test first (pytest-xdist hands them out first), and
every file's tests together (its module fixtures are made once)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import pytest_collection_modifyitems


@dataclass
class _Item:
    """What the ordering hook reads of a collected test."""

    path: Path
    name: str
    slow: bool = False

    def get_closest_marker(self, name: str) -> pytest.Mark | None:
        return pytest.mark.slow.mark if name == "slow" and self.slow else None


def test_files_with_a_slow_test_go_first_each_with_all_its_tests_in_order() -> None:
    a, b, c = Path("tests/test_a.py"), Path("tests/test_b.py"), Path("tests/test_c.py")
    items = [
        _Item(a, "a1"),
        _Item(a, "a2"),
        _Item(b, "b1"),
        _Item(b, "b2", slow=True),
        _Item(b, "b3"),
        _Item(c, "c1", slow=True),
    ]
    pytest_collection_modifyitems(items)  # type: ignore[arg-type]
    assert [item.name for item in items] == ["b1", "b2", "b3", "c1", "a1", "a2"]
