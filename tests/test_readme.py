"""The README's "Use it" snippet runs exactly as printed."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def use_it_snippet() -> str:
    text = README.read_text()
    section = text[text.index("## Use it"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md: no python block under '## Use it'"
    return match.group(1)


def test_use_it_snippet_runs_as_printed(capsys):
    namespace: dict = {}
    exec(compile(use_it_snippet(), "README.md (Use it)", "exec"), namespace)
    res, cell = namespace["res"], namespace["cell"]
    assert res.stats.backward_calls == 1 and res.stats.adjoint_stop in ("tol", "max_steps")
    assert all(p.grad is not None for p in cell.parameters())
    assert "channels=25, kernel_size=15" in capsys.readouterr().out
