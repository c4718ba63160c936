"""The fault-injection suite runs only in the private namespaces of tests/faults/run (``make faults``); anywhere
else each of its tests skips with the reason."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from netns import isolation_problem


def pytest_configure(config: pytest.Config) -> None:
    """Hand the name ``conftest`` back to tests/conftest.py: pytest loaded this file under that name too (both are
    outside a package), and the suite imports the shared helpers (``from conftest import wait_until``, faultkit)
    from there."""
    root = config.pluginmanager.get_plugin(str(Path(__file__).resolve().parent.parent / "conftest.py"))
    if root is not None:
        sys.modules["conftest"] = root


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    problem = isolation_problem()
    if problem is None:
        return
    for item in items:
        if "tests/faults/" in str(item.path):
            item.add_marker(pytest.mark.skip(reason=f"fault suite: {problem}"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Every scenario's result line again at the end (scenarios.RESULT_LINES), visible even when output is captured."""
    from scenarios import RESULT_LINES

    if RESULT_LINES:
        terminalreporter.write_sep("-", "fault scenarios")
        for line in RESULT_LINES:
            terminalreporter.write_line(line)


@pytest.fixture
def _fault_repeat(request: pytest.FixtureRequest) -> int:
    """Which repetition of its test this is (``FAULT_REPEAT``)."""
    return int(request.param)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``FAULT_REPEAT=N``: run every test of the suite N times (ids ``[repeatK-...]``), to measure how often a
    scenario fails; ``FAULT_TRIALS`` is the reset scenario's own trial count (tests/faults/scenarios.py)."""
    repeat = int(os.environ.get("FAULT_REPEAT", "1"))
    if repeat > 1:
        metafunc.fixturenames.append("_fault_repeat")
        metafunc.parametrize("_fault_repeat", range(1, repeat + 1), indirect=True, ids=lambda n: f"repeat{n}")
