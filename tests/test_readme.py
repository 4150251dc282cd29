"""The README's promises point at tests that exist.

The Guarantees table and the threat model name a test for every promise; a
renamed or deleted test would leave a promise with nothing behind it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def _defined_tests() -> tuple[set[str], set[str]]:
    """(test function names, test file paths relative to tests/) in the suite."""
    names: set[str] = set()
    files: set[str] = set()
    for path in (REPO / "tests").rglob("test_*.py"):
        files.add(path.relative_to(REPO / "tests").as_posix())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(node.name)
    return names, files


def test_every_test_the_readme_names_exists() -> None:
    text = README.read_text(encoding="utf-8")
    names, files = _defined_tests()
    cited = set(re.findall(r"::(test_\w+)", text))
    assert len(cited) > 50, "the README's guarantees should cite their tests"
    missing = sorted(cited - names)
    assert not missing, f"the README cites tests that do not exist: {missing}"
    cited_files = {
        f.removeprefix("tests/")
        for f in re.findall(r"`((?:tests/)?[\w/]*test_\w+\.py)", text)
    }
    assert not sorted(cited_files - files), f"no such test files: {sorted(cited_files - files)}"
