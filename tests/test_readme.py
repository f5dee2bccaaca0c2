"""The README's Python example runs as written and does what the README says it does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_readme_example_fuses_above_each_base_model(capsys):
    text = README.read_text()
    example = python_blocks(text[text.index("## Python") :])[0]
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    from neurofuse.evaluate import evaluate

    data, fused, models = namespace["data"], namespace["fused"], namespace["models"]
    fused_acc = evaluate(fused, data.x_test, data.y_test).accuracy
    base = [evaluate(m, data.x_test, data.y_test).accuracy for m in models]
    assert fused_acc > max(base) + 0.2  # sharded halves: each model knows 5 of the 10 digits
    assert "accuracy" in capsys.readouterr().out
