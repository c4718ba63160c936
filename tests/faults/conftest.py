"""The fault-injection suite runs only in the private namespaces of tests/faults/run (``make faults``); anywhere
else each of its tests skips with the reason."""

from __future__ import annotations

import pytest
from netns import isolation_problem


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    problem = isolation_problem()
    if problem is None:
        return
    for item in items:
        if "tests/faults/" in str(item.path):
            item.add_marker(pytest.mark.skip(reason=f"fault suite: {problem}"))
