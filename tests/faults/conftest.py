"""Fixtures of the fault suite, and the figures it reports at the end of a run.

Tests record figures (kills survived, fuzz cases, peak RSS...) with the
`figures` fixture; pytest prints them in its terminal summary.
"""

from __future__ import annotations

from typing import Any

import pytest

FIGURES = pytest.StashKey[dict[str, Any]]()


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> dict[str, Any]:
    return request.config.stash.setdefault(FIGURES, {})


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    found = config.stash.get(FIGURES, {})
    if found:
        terminalreporter.section("fault suite figures")
        for key, value in found.items():
            terminalreporter.write_line(f"{key}: {value}")
