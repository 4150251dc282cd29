"""Imports point down only: cli -> app -> web_* -> services -> storage -> leaves."""

from __future__ import annotations

import ast
from pathlib import Path

PROXY = Path(__file__).resolve().parents[1] / "proxy"
# Top to bottom, the way a request travels; a module may import only later ones.
ORDER = [
    "__main__", "cli", "app", "backends", "web_ui", "web_simple", "web_upload", "web_admin",
    "web_ops", "web_oidc", "state", "logs", "catalog", "ui_model", "description", "reader",
    "mirror", "page_memory", "answers", "publish", "guard", "resolve",
    "upstream_names", "auth", "trust", "jwks", "replay", "minted", "oidc", "login_limit",
    "shared_sqlite",
    "cache", "pagecache", "follow", "sink",
    "download", "upstream", "metrics", "store", "storage_local", "storage_s3", "s3_bucket",
    "storage", "generation", "hashlock", "fsutil", "config",
    "registry", "patterns", "simple_api", "distcheck", "dists", "model", "errors",
]
WEB_ALLOWED = {"cli", "app", "state", "logs", "web_ui", "web_simple", "web_upload", "web_admin",
               "web_ops", "web_oidc"}


def _runtime_nodes(node: ast.AST) -> list[ast.AST]:
    """Every node except those under `if TYPE_CHECKING:` (never imported at run time)."""
    if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
        return []
    found = [node]
    for child in ast.iter_child_nodes(node):
        found.extend(_runtime_nodes(child))
    return found


def _imports(module: str) -> tuple[set[str], bool]:
    tree = ast.parse((PROXY / f"{module}.py").read_text())
    internal: set[str] = set()
    uses_web = False
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                if node.module:
                    internal.add(node.module.split(".")[0])
                else:
                    internal.update(a.name for a in node.names)
            if node.module == "aiohttp" and any(a.name == "web" for a in node.names):
                uses_web = True
            if node.module and node.module.startswith("aiohttp.web"):
                uses_web = True
    return internal, uses_web


def test_every_module_is_placed() -> None:
    on_disk = {p.stem for p in PROXY.glob("*.py")} - {"__init__"}
    assert on_disk == set(ORDER)


def test_imports_point_down_only() -> None:
    upward = []
    for position, module in enumerate(ORDER):
        internal, _ = _imports(module)
        for target in internal - {"__version__"}:
            if target in ORDER and ORDER.index(target) <= position:
                upward.append(f"{module} -> {target}")
    assert not upward


def test_only_the_web_layer_imports_aiohttp_web() -> None:
    offenders = [m for m in ORDER if _imports(m)[1] and m not in WEB_ALLOWED]
    assert not offenders


# The one-host mechanisms (flock, byte-range locks, a mapped counter) stay in the
# local backend's modules; everything above them goes through storage.py.
ONE_HOST = {"storage_local", "generation", "hashlock", "upstream_names"}


def test_fcntl_and_mmap_stay_in_the_local_backend() -> None:
    offenders = []
    for module in ORDER:
        tree = ast.parse((PROXY / f"{module}.py").read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in ("fcntl", "mmap") for n in names) and module not in ONE_HOST:
                offenders.append(module)
    assert not offenders
