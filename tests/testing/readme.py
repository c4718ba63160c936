"""The two examples of README "Testing your consumer", as the tests that run them read them."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def consumer_examples() -> list[str]:
    """The ```python blocks of the section, in order: the plugin example, then the testcontainers one."""
    text = README.read_text()
    section = text.split("\n## Testing your consumer\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 2, "README 'Testing your consumer' has one plugin and one testcontainers example"
    return blocks
