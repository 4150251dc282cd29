"""The operations kit: deploy/ and grafana/ agree with each other and with the proxy.

Static checks only (PyYAML, json, stdlib; no network, no Docker): every file parses;
port, health path, metrics path, data and config paths agree across the Dockerfile,
compose, Kubernetes, systemd and Prometheus files; every metric the dashboard queries
is one proxy/metrics.py exports. Where promtool or systemd-analyze is installed, the
Prometheus config, the dashboard's PromQL and the unit file are checked with them too.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.support_dashboard import DASHBOARD, dashboard_exprs, dashboard_targets, iter_panels

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
GRAFANA = REPO / "grafana"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS = DEPLOY / "prometheus.yml"
CONTAINER_CONFIG = DEPLOY / "config.yaml"
SYSTEMD_UNIT = DEPLOY / "indexguard.service"
KUBERNETES = DEPLOY / "kubernetes.yaml"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER = GRAFANA / "provisioning" / "dashboards" / "indexguard.yml"
METRICS_PY = REPO / "proxy" / "metrics.py"

# The facts every deployment file must agree on.
PORT = 8080
HEALTH_PATH = "/-/health"
METRICS_PATH = "/metrics"
DATA_DIR = "/var/lib/indexguard"
CONFIG_PATH = "/etc/indexguard/config.yaml"
SERVE_ARGS = ["serve", "--config", CONFIG_PATH]
DATASOURCE_UID = "prometheus"
GRAFANA_PROVISIONING = "/etc/grafana/provisioning"
GRAFANA_DASHBOARDS = "/var/lib/grafana/dashboards"

# ---------------------------------------------------------------- proxy/metrics.py


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # Counter | Gauge | Histogram | Summary
    labels: tuple[str, ...]

    @property
    def series(self) -> tuple[str, ...]:
        """The sample names prometheus_client exposes for this metric."""
        if self.kind == "Counter":
            base = self.name.removesuffix("_total")
            return (base + "_total",)
        if self.kind == "Histogram":
            return tuple(self.name + s for s in ("_bucket", "_sum", "_count"))
        if self.kind == "Summary":
            return tuple(self.name + s for s in ("_sum", "_count"))
        return (self.name,)

    def labels_of(self, series: str) -> set[str]:
        return set(self.labels) | ({"le"} if series.endswith("_bucket") else set())


def _str_list(node: ast.expr | None) -> tuple[str, ...]:
    if isinstance(node, ast.List | ast.Tuple):
        return tuple(e.value for e in node.elts
                     if isinstance(e, ast.Constant) and isinstance(e.value, str))
    return ()


def load_metrics(path: Path = METRICS_PY) -> dict[str, Metric]:
    """Metrics declared in proxy/metrics.py, parsed with ast (nothing is imported)."""
    metrics: dict[str, Metric] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        kind = func.id if isinstance(func, ast.Name) else (
            func.attr if isinstance(func, ast.Attribute) else "")
        if kind not in ("Counter", "Gauge", "Histogram", "Summary"):
            continue
        first = node.args[0] if node.args else None
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            continue
        labels_node = node.args[2] if len(node.args) > 2 else None
        for kw in node.keywords:
            if kw.arg == "labelnames":
                labels_node = kw.value
        metrics[first.value] = Metric(first.value, kind, _str_list(labels_node))
    return metrics


METRICS = load_metrics()
SERIES: dict[str, Metric] = {s: m for m in METRICS.values() for s in m.series}


def test_metrics_py_parses_to_metrics() -> None:
    assert len(METRICS) >= 10, f"found only {sorted(METRICS)} in {METRICS_PY}"
    assert METRICS["indexguard_http_requests"].kind == "Counter"
    assert "indexguard_http_requests_total" in SERIES
    assert "indexguard_http_request_duration_seconds_bucket" in SERIES
    assert set(METRICS["indexguard_http_requests"].labels) == {"route", "method", "status"}


# ---------------------------------------------------------------- small parsers


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_yaml_all(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


@dataclass
class Instruction:
    keyword: str
    args: str
    stage: int

    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form's argv, or None for the shell form."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
        return value


def parse_dockerfile(path: Path = DOCKERFILE) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped."""
    out: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments may also sit between continuation lines
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), stage))
    assert not pending, f"{path}: dangling line continuation"
    return out


def dockerfile_args(instructions: list[Instruction]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            defaults[name.strip()] = value.strip()
    return defaults


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def parse_unit(path: Path = SYSTEMD_UNIT) -> dict[str, list[tuple[str, str]]]:
    """systemd unit file: section -> [(key, value)] in order (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not key=value: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def unit_value(section: list[tuple[str, str]], key: str) -> str:
    values = unit_values(section, key)
    assert values, f"{SYSTEMD_UNIT.name}: {key}= is missing"
    return values[-1]


def split_volume(spec: str) -> tuple[str, str]:
    """Compose short volume syntax 'source:target[:mode]' -> (source, target)."""
    parts = spec.split(":")
    assert len(parts) >= 2, f"volume without a target: {spec!r}"
    return parts[0], parts[1]


def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def compose_mounts(service: str) -> dict[str, str]:
    """Container path -> host source (resolved when it is a path) for one service."""
    mounts: dict[str, str] = {}
    for spec in compose()["services"][service].get("volumes", []):
        if isinstance(spec, dict):
            source, target = str(spec.get("source", "")), str(spec["target"])
        else:
            source, target = split_volume(str(spec))
        if source.startswith((".", "/")):
            source = str((DEPLOY / source).resolve())
        mounts[target] = source
    return mounts


def compose_ports(service: str) -> list[tuple[int, int]]:
    """(host, container) port pairs."""
    pairs = []
    for spec in compose()["services"][service].get("ports", []):
        parts = str(spec).split(":")
        pairs.append((int(parts[-2]) if len(parts) > 1 else int(parts[-1]), int(parts[-1])))
    return pairs


def k8s_docs() -> dict[str, dict[str, Any]]:
    docs = load_yaml_all(KUBERNETES)
    by_kind: dict[str, dict[str, Any]] = {}
    for doc in docs:
        assert isinstance(doc, dict) and "kind" in doc and "apiVersion" in doc, doc
        assert doc["kind"] not in by_kind, f"two {doc['kind']} documents"
        by_kind[doc["kind"]] = doc
    return by_kind


def k8s_container() -> dict[str, Any]:
    containers = k8s_docs()["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def dockerfile_uid() -> int:
    """The uid the Dockerfile's useradd gives the indexguard user."""
    for ins in parse_dockerfile():
        if ins.keyword != "RUN" or "useradd" not in ins.args:
            continue
        for command in re.split(r"&&|;", ins.args):
            words = shlex.split(command)
            if words and words[0] == "useradd" and words[-1] == "indexguard":
                assert "--uid" in words, "useradd indexguard without a fixed --uid"
                return int(words[words.index("--uid") + 1])
    raise AssertionError("deploy/Dockerfile never creates the user indexguard (useradd)")


# ---------------------------------------------------------------- the files parse


@pytest.mark.parametrize("path", [
    DOCKERFILE, DOCKERIGNORE, COMPOSE, PROMETHEUS, CONTAINER_CONFIG, SYSTEMD_UNIT, KUBERNETES,
    DATASOURCES, DASHBOARD_PROVIDER, DASHBOARD,
], ids=lambda p: str(p.relative_to(REPO)))
def test_file_parses(path: Path) -> None:
    assert path.is_file(), f"{path.relative_to(REPO)} is missing"
    if path.suffix in (".yml", ".yaml"):
        assert load_yaml_all(path), f"{path} is empty"
    elif path.suffix == ".json":
        assert isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    elif path == DOCKERFILE:
        assert parse_dockerfile()
    elif path == SYSTEMD_UNIT:
        assert {"Unit", "Service", "Install"} <= set(parse_unit())


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_base_image_and_install() -> None:
    instructions = parse_dockerfile()
    args = dockerfile_args(instructions)
    stage_names = set()
    for ins in instructions:
        if ins.keyword != "FROM":
            continue
        words = ins.args.split()
        image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], words[0])
        if image not in stage_names:
            assert image.startswith("python:3.11-slim"), f"FROM {image}: expected python:3.11-slim"
        if len(words) == 3 and words[1].upper() == "AS":
            stage_names.add(words[2])
    runs = [i.args for i in instructions if i.keyword == "RUN"]
    assert any(re.search(r"\bpip install\b.*--no-cache-dir\b.*\s\.(\s|$)", r) for r in runs), (
        "expected `pip install --no-cache-dir .` in deploy/Dockerfile")


def test_dockerfile_runs_as_non_root_indexguard_user() -> None:
    final = final_stage(parse_dockerfile())
    users = [i.args.split(":")[0].strip() for i in final if i.keyword == "USER"]
    assert users, "the final stage has no USER: the server would run as root"
    user = users[-1]
    assert user not in ("root", "0"), "USER must not be root"
    assert user in ("indexguard", str(dockerfile_uid())), (
        f"USER {user} is neither indexguard nor its uid {dockerfile_uid()}")
    # The last USER comes before CMD, so the server runs as that user.
    keywords = [i.keyword for i in final]
    assert len(keywords) - 1 - keywords[::-1].index("USER") < keywords.index("CMD")


def test_dockerfile_healthcheck_probes_health_with_stdlib() -> None:
    final = final_stage(parse_dockerfile())
    checks = [i for i in final if i.keyword == "HEALTHCHECK"]
    assert len(checks) == 1, "expected one HEALTHCHECK in the final stage"
    text = checks[0].args
    assert "CMD" in text.split(), text
    urls = re.findall(r"https?://[^\s'\"]+", text)
    assert urls == [f"http://127.0.0.1:{PORT}{HEALTH_PATH}"], urls
    assert "urllib" in text and "curl" not in text and "wget" not in text, (
        "python:3.11-slim has no curl or wget; probe with urllib")


def test_dockerfile_port_volume_and_command() -> None:
    final = final_stage(parse_dockerfile())
    exposed = [w for i in final if i.keyword == "EXPOSE" for w in i.args.split()]
    assert exposed == [str(PORT)] or exposed == [f"{PORT}/tcp"], exposed
    volumes: list[str] = []
    for ins in final:
        if ins.keyword == "VOLUME":
            volumes += ins.exec_form() or ins.args.split()
    assert volumes == [DATA_DIR], volumes
    cmds = [i for i in final if i.keyword == "CMD"]
    assert len(cmds) == 1
    argv = cmds[0].exec_form()
    assert argv is not None, "CMD must use the exec form so SIGTERM reaches the server"
    assert argv == ["indexguard", *SERVE_ARGS], argv
    assert not [i for i in final if i.keyword == "ENTRYPOINT"], "CMD alone is the command"


def dockerignore_patterns() -> list[str]:
    return [line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.strip().startswith("#")]


def ignored(relpath: str, patterns: list[str]) -> bool:
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        parts = PurePosixPath(relpath).parts
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.removeprefix("**/"))
               for p in prefixes):
            verdict = not negate
    return verdict


def test_dockerignore_excludes_junk_but_not_sources() -> None:
    patterns = dockerignore_patterns()
    for junk in (".git", "data", "bench/.cache", ".venv"):
        assert ignored(junk, patterns), f"{DOCKERIGNORE.name} does not exclude {junk}"
    copied: list[str] = []
    for ins in parse_dockerfile():
        if ins.keyword != "COPY":
            continue
        words = ins.exec_form() or ins.args.split()
        if any(w.startswith("--from") for w in words):
            continue
        sources = [w for w in words[:-1] if not w.startswith("--")]
        matched = []
        for source in sources:
            hits = sorted(REPO.glob(source.rstrip("/"))) if any(c in source for c in "*?[") \
                else [REPO / source.rstrip("/")]
            for hit in hits:
                if hit.exists():
                    matched.append(hit)
                else:
                    pytest.fail(f"COPY {source}: {hit.relative_to(REPO)} is not in the repo")
        assert matched, f"COPY {ins.args}: no source exists"
        copied += [str(m.relative_to(REPO)) for m in matched]
    for path in copied:
        assert not ignored(path, patterns), f"{DOCKERIGNORE.name} excludes COPY source {path}"
    assert {"pyproject.toml", "proxy", "deploy/config.yaml"} <= set(copied), copied


# ---------------------------------------------------------------- container config


def example_keys(data: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield f"{prefix}{key}"
            yield from example_keys(value, f"{prefix}{key}.")


def check_server_config(raw: Any, where: str) -> None:
    assert isinstance(raw, dict), where
    assert raw["listen"]["port"] == PORT, f"{where}: listen.port"
    assert raw["listen"]["host"] in ("0.0.0.0", "::"), f"{where}: must listen on all interfaces"
    assert raw["data_dir"] == DATA_DIR, f"{where}: data_dir"
    known = set(example_keys(load_yaml(REPO / "config.example.yaml")))
    unknown = set(example_keys(raw)) - known
    assert not unknown, f"{where}: keys not in config.example.yaml: {sorted(unknown)}"
    # The proxy's own validation (proxy.config needs only PyYAML).
    from proxy.config import build_config

    config = build_config(raw, source=where)
    assert config.listen.port == PORT
    assert str(config.data_dir) == DATA_DIR


def test_container_config() -> None:
    raw = load_yaml(CONTAINER_CONFIG)
    check_server_config(raw, "deploy/config.yaml")
    assert raw["auth"]["anonymous_read"] is True
    # The choice is explained next to it.
    text = CONTAINER_CONFIG.read_text(encoding="utf-8")
    auth_block = text[text.index("auth:"):text.index("anonymous_read:")]
    assert "#" in auth_block, "explain anonymous_read: true in a comment"


def test_kubernetes_configmap_config() -> None:
    cm = k8s_docs()["ConfigMap"]
    assert set(cm["data"]) == {"config.yaml"}
    check_server_config(yaml.safe_load(cm["data"]["config.yaml"]), "ConfigMap config.yaml")


# ---------------------------------------------------------------- docker compose


def test_compose_indexguard_service() -> None:
    svc = compose()["services"]["indexguard"]
    build = svc["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == REPO, f"build context {build['context']} is not the repo root"
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert (PORT, PORT) in compose_ports("indexguard")
    mounts = compose_mounts("indexguard")
    assert DATA_DIR in mounts, f"no volume at {DATA_DIR}: {mounts}"
    assert mounts.get(CONFIG_PATH) == str(CONTAINER_CONFIG), (
        f"{CONFIG_PATH} should be deploy/config.yaml: {mounts}")
    if "command" in svc:
        command = svc["command"]
        argv = shlex.split(command) if isinstance(command, str) else command
        assert argv[-len(SERVE_ARGS):] == SERVE_ARGS
    if "healthcheck" in svc:
        assert HEALTH_PATH in json.dumps(svc["healthcheck"])
    named = {src for src in mounts.values() if not src.startswith("/")}
    assert named <= set(compose().get("volumes") or {}), "named volumes must be declared"


def test_compose_prometheus_and_grafana_services() -> None:
    services = compose()["services"]
    assert str(services["prometheus"]["image"]).startswith("prom/prometheus")
    assert str(services["grafana"]["image"]).startswith("grafana/grafana")
    prom_mounts = compose_mounts("prometheus")
    config_targets = [t for t, s in prom_mounts.items() if s == str(PROMETHEUS)]
    assert config_targets, f"prometheus does not mount deploy/prometheus.yml: {prom_mounts}"
    command = services["prometheus"].get("command")
    if command:
        argv = shlex.split(command) if isinstance(command, str) else command
        flags = [a.split("=", 1)[1] for a in argv if a.startswith("--config.file=")]
        assert flags == config_targets, (flags, config_targets)
    else:
        assert config_targets == ["/etc/prometheus/prometheus.yml"]
    graf = compose_mounts("grafana")
    assert graf.get(GRAFANA_PROVISIONING) == str(GRAFANA / "provisioning"), graf
    assert graf.get(GRAFANA_DASHBOARDS) == str(GRAFANA / "dashboards"), graf
    assert (3000, 3000) in compose_ports("grafana")


# ---------------------------------------------------------------- prometheus.yml


def test_prometheus_scrapes_indexguard() -> None:
    cfg = load_yaml(PROMETHEUS)
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    job = jobs["indexguard"]
    assert job.get("metrics_path", "/metrics") == METRICS_PATH
    assert job.get("scheme", "http") == "http"
    assert job.get("scrape_interval", cfg.get("global", {}).get("scrape_interval")) == "15s"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"indexguard:{PORT}"], targets
    host = targets[0].split(":")[0]
    assert host in compose()["services"], f"{host} is not a compose service"


def test_prometheus_shows_the_scrape_with_a_metrics_token() -> None:
    """With auth.anonymous_read off /metrics needs a token with the metrics scope;
    the commented basic_auth block is what to uncomment, at the right place."""
    text = PROMETHEUS.read_text(encoding="utf-8")
    assert "--scopes metrics" in text
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# basic_auth:")
    indent = lines[start].index("#")
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith(" " * indent + "#   "):
            break
        block.append(line)
    uncommented = [line[:indent] + line[indent + 2:] for line in block]
    edited = lines[:start] + uncommented + lines[start + len(block):]
    job = {j["job_name"]: j for j in yaml.safe_load("\n".join(edited))["scrape_configs"]}
    auth = job["indexguard"]["basic_auth"]
    assert set(auth) == {"username", "password_file"}, auth
    assert auth["password_file"].startswith("/etc/prometheus/")


def test_promtool_check_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus` provides it)")
    result = subprocess.run([promtool, "check", "config", str(PROMETHEUS)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- Grafana provisioning


def test_grafana_datasource_provisioning() -> None:
    cfg = load_yaml(DATASOURCES)
    assert cfg["apiVersion"] == 1
    (ds,) = [d for d in cfg["datasources"] if d["uid"] == DATASOURCE_UID]
    assert ds["type"] == "prometheus"
    match = re.fullmatch(r"http://([\w.-]+):(\d+)/?", ds["url"])
    assert match, ds["url"]
    assert match.group(1) in compose()["services"], f"{match.group(1)} is not a compose service"
    assert match.group(2) == "9090"


def test_grafana_dashboard_provisioning() -> None:
    cfg = load_yaml(DASHBOARD_PROVIDER)
    assert cfg["apiVersion"] == 1
    (provider,) = cfg["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    assert path == GRAFANA_DASHBOARDS
    host_dir = Path(compose_mounts("grafana")[path])
    assert (host_dir / DASHBOARD.name).resolve() == DASHBOARD
    # Grafana reads <provisioning>/datasources and <provisioning>/dashboards.
    provisioning = Path(compose_mounts("grafana")[GRAFANA_PROVISIONING])
    assert DATASOURCES.parent == provisioning / "datasources"
    assert DASHBOARD_PROVIDER.parent == provisioning / "dashboards"


# ---------------------------------------------------------------- dashboard


PROMQL_WORDS = {
    # aggregations, functions and keywords the dashboard may use
    "sum", "min", "max", "avg", "count", "topk", "bottomk", "quantile", "stddev", "group",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "rate", "irate", "increase", "delta", "idelta", "deriv",
    "histogram_quantile", "clamp_min", "clamp_max", "clamp", "vector", "scalar", "abs",
    "absent", "label_replace", "label_join", "sort", "sort_desc", "time", "changes",
    "resets", "round", "ceil", "floor", "max_over_time", "min_over_time", "avg_over_time",
    "sum_over_time", "last_over_time", "count_over_time", "e", "inf", "nan",
}
ALWAYS_LABELS = {"job", "instance"}


def _strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)


def expr_metrics(expr: str) -> set[str]:
    """Metric names selected in a PromQL expression."""
    bare = _strip_strings(expr)
    bare = re.sub(r"\{[^}]*\}", "{}", bare)  # matchers
    bare = re.sub(r"\[[^\]]*\]", "[]", bare)  # ranges
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(?![\w:])(\s*\()?", bare):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in PROMQL_WORDS:
            continue
        if re.fullmatch(r"\d+(e\d+)?", word):
            continue
        names.add(word)
    return names


def expr_labels(expr: str) -> tuple[set[str], set[str]]:
    """(labels in grouping clauses, labels in matchers)."""
    bare = _strip_strings(expr)
    grouping = {
        label.strip()
        for m in re.finditer(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)",
                             bare)
        for label in m.group(1).split(",") if label.strip()
    }
    matchers = {
        m.group(1)
        for block in re.findall(r"\{([^}]*)\}", bare)
        for m in re.finditer(r"(\w+)\s*(?:=~|!~|!=|=)", block)
    }
    return grouping, matchers


def test_dashboard_identity() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dash["uid"] == "indexguard"
    assert dash["title"]
    assert 36 <= dash["schemaVersion"] <= 41
    ids = [p["id"] for p in iter_panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in iter_panels(dash):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
    assert not dash.get("templating", {}).get("list"), (
        "no template variables: the exprs must run against Prometheus as they are")


def test_every_panel_has_prometheus_targets_with_expr() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for panel in iter_panels(dash):
        if panel["type"] == "row":
            assert not panel.get("targets"), panel["title"]
            continue
        assert panel.get("targets"), f"panel {panel['title']!r} has no targets"
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}
            assert isinstance(target.get("expr"), str) and target["expr"].strip(), (
                f"panel {panel['title']!r} target {target['refId']} has no expr")


def test_dashboard_exprs_helper() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) == len(dashboard_targets()) >= 20
    assert all(isinstance(e, str) and e for e in exprs)


def test_dashboard_exprs_run_as_is() -> None:
    for expr in dashboard_exprs():
        assert "$" not in expr, f"Grafana variable in {expr!r}: use literal ranges"
        assert expr.count("(") == expr.count(")"), expr
        for rng in re.findall(r"\[([^\]]*)\]", expr):
            assert re.fullmatch(r"\d+[smhd]", rng), f"range [{rng}] in {expr!r}"


def test_dashboard_metrics_exist_in_metrics_py() -> None:
    for expr in dashboard_exprs():
        names = expr_metrics(expr)
        assert names, f"no metric in {expr!r}"
        unknown = names - set(SERIES)
        assert not unknown, (
            f"{sorted(unknown)} in {expr!r} are not exported by proxy/metrics.py "
            f"(known: {sorted(SERIES)})")


def test_dashboard_labels_exist() -> None:
    for panel, target in dashboard_targets():
        expr = target["expr"]
        allowed = set(ALWAYS_LABELS)
        for name in expr_metrics(expr):
            allowed |= SERIES[name].labels_of(name)
        grouping, matchers = expr_labels(expr)
        assert grouping <= allowed, f"{panel['title']}: {sorted(grouping - allowed)} in {expr!r}"
        assert matchers <= allowed, f"{panel['title']}: {sorted(matchers - allowed)} in {expr!r}"
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
        by = {label.strip() for m in re.finditer(r"\bby\s*\(([^)]*)\)", expr)
              for label in m.group(1).split(",") if label.strip()} - {"le"}
        assert legend <= by, f"{panel['title']}: legend {sorted(legend)} not kept by {expr!r}"


def test_dashboard_shows_every_metric() -> None:
    used = {SERIES[n].name for e in dashboard_exprs() for n in expr_metrics(e)}
    missing = set(METRICS) - used
    assert not missing, f"metrics in proxy/metrics.py with no dashboard panel: {sorted(missing)}"


def test_dashboard_has_the_operational_views() -> None:
    wants = [
        (r"indexguard_index_cache_total\{result=\"hit\"\}.*/", "index cache hit ratio"),
        (r"indexguard_file_cache_total\{result=\"hit\"\}.*/", "file cache hit ratio"),
        (r"by \(route, status\).*indexguard_http_requests_total", "requests by route+status"),
        (r"histogram_quantile\(0\.5,.*indexguard_http_request_duration_seconds_bucket",
         "p50 latency"),
        (r"histogram_quantile\(0\.99,.*indexguard_http_request_duration_seconds_bucket",
         "p99 latency"),
        (r"histogram_quantile\(0\.99,.*indexguard_upstream_request_duration_seconds_bucket",
         "upstream p99"),
        (r"by \([^)]*outcome[^)]*\).*indexguard_upstream_requests_total", "upstream outcomes"),
        (r"by \(rule\).*indexguard_blocked_collisions_total", "blocked by rule"),
        (r"topk\(\d+, sum by \(project\).*indexguard_blocked_collisions_total",
         "top blocked names"),
        (r"by \(outcome\).*indexguard_uploads_total", "uploads by outcome"),
        (r"by \(source\).*indexguard_bytes_served_total", "bytes by source"),
    ]
    exprs = dashboard_exprs()
    for pattern, why in wants:
        assert any(re.search(pattern, e) for e in exprs), f"no panel for {why}"


def test_dashboard_promql_parses_with_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus` provides it)")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"indexguard:dashboard_expr_{i}", "expr": expr}
        for i, expr in enumerate(dashboard_exprs())
    ]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = subprocess.run([promtool, "check", "rules", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- systemd


def test_systemd_unit() -> None:
    unit = parse_unit()
    svc = unit["Service"]
    assert unit_value(svc, "Type") == "exec"
    assert unit_value(svc, "User") == "indexguard"
    exec_start = shlex.split(unit_value(svc, "ExecStart"))
    assert exec_start == ["/usr/local/bin/indexguard", *SERVE_ARGS], exec_start
    assert unit_value(svc, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert unit_value(svc, "KillSignal") == "SIGTERM"
    assert int(re.sub(r"s$", "", unit_value(svc, "TimeoutStopSec"))) >= 30
    assert unit_value(svc, "Restart") == "on-failure"
    assert unit_value(svc, "StateDirectory") == "indexguard"  # i.e. /var/lib/indexguard
    assert DATA_DIR in unit_value(svc, "ReadWritePaths").split()
    assert int(unit_value(svc, "LimitNOFILE")) >= 4096
    hardening = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes", "RestrictNamespaces": "yes",
        "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
        "SystemCallFilter": "@system-service", "CapabilityBoundingSet": "",
    }
    for key, value in hardening.items():
        assert unit_values(svc, key)[:1] == [value], f"{key}={value} expected"
    assert set(unit_value(svc, "RestrictAddressFamilies").split()) == {
        "AF_INET", "AF_INET6", "AF_UNIX"}
    assert unit_value(unit["Install"], "WantedBy") == "multi-user.target"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    text = SYSTEMD_UNIT.read_text(encoding="utf-8")
    if not Path("/usr/local/bin/indexguard").exists():
        # verify insists that the binaries exist; stand in for the install.
        text = text.replace("/usr/local/bin/indexguard", "/bin/true")
    unit = tmp_path / SYSTEMD_UNIT.name
    unit.write_text(text, encoding="utf-8")
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            timeout=60, check=False, cwd=tmp_path)
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 and "Failed to" in output and "indexguard.service" not in output:
        pytest.skip(f"systemd-analyze cannot run here: {output}")
    assert result.returncode == 0 and "indexguard.service" not in output, output


# ---------------------------------------------------------------- Kubernetes


def test_kubernetes_documents() -> None:
    docs = k8s_docs()
    assert set(docs) == {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service"}
    pvc = docs["PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    dep = docs["Deployment"]["spec"]
    assert dep["replicas"] == 1
    assert dep["strategy"]["type"] == "Recreate", "an RWO volume needs Recreate"
    labels = dep["template"]["metadata"]["labels"]
    assert dep["selector"]["matchLabels"].items() <= labels.items()
    svc = docs["Service"]["spec"]
    assert svc["selector"].items() <= labels.items()
    assert [(p["port"], p["targetPort"]) for p in svc["ports"]] == [(PORT, PORT)]


def test_kubernetes_pod_security() -> None:
    pod = k8s_docs()["Deployment"]["spec"]["template"]["spec"]
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True
    if "runAsUser" in sc:
        assert sc["runAsUser"] == dockerfile_uid()
    csc = k8s_container()["securityContext"]
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert pod.get("terminationGracePeriodSeconds", 30) >= 30


def test_kubernetes_probes_ports_and_resources() -> None:
    c = k8s_container()
    for probe in ("livenessProbe", "readinessProbe"):
        http = c[probe]["httpGet"]
        assert http["path"] == HEALTH_PATH, probe
        assert http["port"] == PORT, probe
    assert [p["containerPort"] for p in c["ports"]] == [PORT]
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert "memory" in c["resources"]["limits"]
    if "command" in c or "args" in c:
        argv = [*c.get("command", []), *c.get("args", [])]
        assert argv[-len(SERVE_ARGS):] == SERVE_ARGS, argv
    ann = k8s_docs()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == str(PORT)
    assert ann["prometheus.io/path"] == METRICS_PATH


def test_kubernetes_volume_mounts() -> None:
    docs = k8s_docs()
    c = k8s_container()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    config_dir = str(PurePosixPath(CONFIG_PATH).parent)
    config_vol = volumes[mounts[config_dir]["name"]]
    assert config_vol["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert mounts[config_dir].get("readOnly") is True
    assert PurePosixPath(CONFIG_PATH).name in docs["ConfigMap"]["data"]
    data_vol = volumes[mounts[DATA_DIR]["name"]]
    assert data_vol["persistentVolumeClaim"]["claimName"] == (
        docs["PersistentVolumeClaim"]["metadata"]["name"])


# ---------------------------------------------------------------- across files


def test_deploy_files_agree() -> None:
    """One table of the shared facts as each file states them; each column has one value."""
    final = final_stage(parse_dockerfile())
    health = next(i.args for i in final if i.keyword == "HEALTHCHECK")
    health_url = re.findall(r"https?://[^\s'\"]+", health)[0]
    cmd = next(i for i in final if i.keyword == "CMD").exec_form() or []
    c = k8s_container()
    k8s_cm = yaml.safe_load(k8s_docs()["ConfigMap"]["data"]["config.yaml"])
    svc = parse_unit()["Service"]
    prom_job = {j["job_name"]: j for j in load_yaml(PROMETHEUS)["scrape_configs"]}["indexguard"]
    prom_target = prom_job["static_configs"][0]["targets"][0]
    ann = k8s_docs()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    k8s_mounts = {m["mountPath"] for m in c["volumeMounts"]}

    facts: dict[str, dict[str, object]] = {
        "port": {
            "Dockerfile EXPOSE": int(next(i.args for i in final if i.keyword == "EXPOSE")
                                     .split("/")[0]),
            "Dockerfile HEALTHCHECK": int(re.findall(r":(\d+)/", health_url)[0]),
            "deploy/config.yaml": load_yaml(CONTAINER_CONFIG)["listen"]["port"],
            "compose ports": compose_ports("indexguard")[0][1],
            "prometheus target": int(prom_target.rsplit(":", 1)[1]),
            "k8s ConfigMap": k8s_cm["listen"]["port"],
            "k8s containerPort": c["ports"][0]["containerPort"],
            "k8s liveness": c["livenessProbe"]["httpGet"]["port"],
            "k8s readiness": c["readinessProbe"]["httpGet"]["port"],
            "k8s Service": k8s_docs()["Service"]["spec"]["ports"][0]["targetPort"],
            "k8s annotation": int(ann["prometheus.io/port"]),
        },
        "health path": {
            "Dockerfile HEALTHCHECK": "/" + health_url.split("/", 3)[3],
            "k8s liveness": c["livenessProbe"]["httpGet"]["path"],
            "k8s readiness": c["readinessProbe"]["httpGet"]["path"],
        },
        "metrics path": {
            "prometheus.yml": prom_job.get("metrics_path", "/metrics"),
            "k8s annotation": ann["prometheus.io/path"],
        },
        "data dir": {
            "Dockerfile VOLUME": next(i.exec_form() or i.args.split()
                                  for i in final if i.keyword == "VOLUME")[0],
            "deploy/config.yaml": load_yaml(CONTAINER_CONFIG)["data_dir"],
            "compose volume": next(t for t in compose_mounts("indexguard") if "lib" in t),
            "k8s ConfigMap": k8s_cm["data_dir"],
            "k8s mount": next(m for m in k8s_mounts if "lib" in m),
            "systemd": "/var/lib/" + unit_value(svc, "StateDirectory"),
        },
        "config path": {
            "Dockerfile CMD": cmd[-1],
            "compose mount": next(t for t in compose_mounts("indexguard") if "etc" in t),
            "k8s command": [*c.get("command", []), *c.get("args", [])][-1],
            "systemd ExecStart": shlex.split(unit_value(svc, "ExecStart"))[-1],
        },
    }
    expected = {"port": PORT, "health path": HEALTH_PATH, "metrics path": METRICS_PATH,
                "data dir": DATA_DIR, "config path": CONFIG_PATH}
    for fact, stated in facts.items():
        assert set(stated.values()) == {expected[fact]}, f"{fact} disagrees: {stated}"
