"""The README's library example runs as printed."""
import re

from tests.conftest import ROOT


def test_library_example_runs():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- example: library -->\n```python\n(.*?)```", text, re.S)
    assert block, "README lost its library example"
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)  # noqa: S102
    assert set(namespace["criterion"].last_terms) == {"ce", "cmi"}
