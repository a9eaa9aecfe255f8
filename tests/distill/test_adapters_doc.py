"""The example in docs/adapters.md runs as written and the student learns."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "adapters.md"


def test_first_python_example_runs_and_the_loss_decreases(capsys):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    losses = namespace["losses"]
    assert len(losses) == 100
    assert losses[-1] < 0.8 * losses[0]
    assert not list(namespace["adapter"].parameters())  # the example's point: nothing extra to train
    assert "feature loss" in capsys.readouterr().out
