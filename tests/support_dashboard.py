"""The Grafana dashboard's PromQL, for tests that check or run it.

dashboard_exprs() lists every query in grafana/dashboards/indexguard.json in panel
order. The queries use literal ranges ([5m], [1h]) and no Grafana variables, so
they can be sent as they are to Prometheus's /api/v1/query.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = REPO_ROOT / "grafana" / "dashboards" / "indexguard.json"


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from iter_panels(panel)


def dashboard_targets(
    dashboard: Mapping[str, Any] | None = None,
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every query target on the dashboard."""
    dash = load_dashboard() if dashboard is None else dashboard
    return [(panel, target) for panel in iter_panels(dash) for target in panel.get("targets", [])]


def dashboard_exprs(dashboard: Mapping[str, Any] | None = None) -> list[str]:
    """Every PromQL expression on the dashboard, in panel order (duplicates kept)."""
    return [str(target.get("expr", "")) for _, target in dashboard_targets(dashboard)]
