"""The Python examples in the docs run as written (each in a fresh process, as a user would paste them)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = [
    pytest.param(doc, index, code, id=f"{doc}-{index}")
    for doc in ("README.md", "docs/models.md", "docs/training.md", "docs/layer_ahead.md")
    for index, code in enumerate(re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), re.S))
]


def test_the_docs_have_examples():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("doc, index, code", EXAMPLES)
def test_example_runs(doc, index, code, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the example sets its own
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300, check=False)
    assert done.returncode == 0, f"{doc} example {index} failed:\n{done.stderr[-3000:]}"
