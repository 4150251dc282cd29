"""The replica deploy kit (compose over MinIO, Kubernetes with 3 replicas, nginx
as the balancer) agrees with the proxy, and the balancer's config really works:
a real nginx with deploy/nginx.replicas.conf in front of two real replicas on
one moto bucket takes an upload and serves it to pip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import MakeProxy
from tests.faults.helpers import auth_config, call, eventually, upload
from tests.support.artifacts import build_wheel
from tests.support.clients import pip_install
from tests.support.s3 import Bucket
from tests.support.server import free_port
from tests.support.upstream import FakeUpstream

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.replicas.yml"
KUBERNETES = DEPLOY / "kubernetes.replicas.yaml"
CONFIG = DEPLOY / "config.replicas.yaml"
NGINX = DEPLOY / "nginx.replicas.conf"


def _k8s() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(KUBERNETES.read_text()) if d}


def _check(raw: dict[str, Any], where: str) -> Any:
    from proxy.config import build_config

    config = build_config(raw, source=where)
    assert config.storage.backend == "s3", where
    return config


def test_replica_config_is_valid_and_on_s3() -> None:
    config = _check(yaml.safe_load(CONFIG.read_text()), str(CONFIG))
    assert config.storage.s3.bucket == "indexguard"
    # Credentials never live in the config file.
    assert "secret" not in CONFIG.read_text().lower().replace("aws_secret_access_key", "")


def test_compose_runs_replicas_over_minio_behind_the_balancer() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    replicas = [s for s in services if s.startswith("indexguard-")]
    assert len(replicas) >= 2
    nginx = NGINX.read_text()
    for name in replicas:
        svc = services[name]
        mounts = svc["volumes"]
        assert "./config.replicas.yaml:/etc/indexguard/config.yaml:ro" in mounts
        # Each replica has its own working area; none is shared.
        data = [m for m in mounts if m.endswith(":/var/lib/indexguard")]
        assert len(data) == 1 and data[0].startswith(f"{name}-data:")
        assert f"server {name}:8080" in nginx, f"{name} is not behind the balancer"
        assert "AWS_SECRET_ACCESS_KEY" in svc["environment"]
    assert "minio" in services and "balancer" in services
    assert "./nginx.replicas.conf:/etc/nginx/nginx.conf:ro" in services["balancer"]["volumes"]
    bucket = yaml.safe_load(CONFIG.read_text())["storage"]["s3"]["bucket"]
    assert f"store/{bucket}" in services["bucket"]["entrypoint"]


def test_kubernetes_replicas_share_only_the_bucket() -> None:
    docs = _k8s()
    assert set(docs) == {"Secret", "ConfigMap", "Deployment", "PodDisruptionBudget", "Service"}
    dep = docs["Deployment"]["spec"]
    assert dep["replicas"] >= 3
    assert dep["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = dep["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert not [v for v in volumes.values() if "persistentVolumeClaim" in v]
    container = pod["containers"][0]
    assert {"secretRef": {"name": docs["Secret"]["metadata"]["name"]}} in container["envFrom"]
    assert docs["PodDisruptionBudget"]["spec"]["minAvailable"] < dep["replicas"]
    _check(yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"]), "ConfigMap config.yaml")


@pytest.fixture
def balancer(tmp_path: Path) -> Iterator[Any]:
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (.ci/run installs nginx-light)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(ports: list[int]) -> str:
        conf = NGINX.read_text()
        targets = iter(ports)
        conf = re.sub(r"server indexguard-\d+:8080",
                      lambda _m: f"server 127.0.0.1:{next(targets)}", conf)
        listen = free_port()
        conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{listen};")
        prefix = tmp_path / "nginx"
        (prefix / "logs").mkdir(parents=True)
        (prefix / "nginx.conf").write_text(conf)
        proc = subprocess.Popen(
            ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
             "-e", str(prefix / "logs" / "error.log"),
             "-g", f"daemon off; user root; pid {prefix / 'nginx.pid'};"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        url = f"http://127.0.0.1:{listen}"
        assert eventually(lambda: _answers(url), timeout=10), (prefix / "logs").glob("*")
        return url

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        return call(url + "/-/health", timeout=2).status == 200
    except OSError:
        return False


def test_the_balancer_config_serves_two_replicas_on_one_bucket(
    make_proxy: MakeProxy, s3_bucket: Bucket, upstream: FakeUpstream, balancer: Any,
    artifacts_dir: Path, tmp_path: Path,
) -> None:
    config: dict[str, Any] = auth_config()
    config["storage"] = s3_bucket.storage_config()
    config["upstream"] = {"url": upstream.url}
    replicas = [make_proxy(config, env=s3_bucket.env()) for _ in range(2)]
    url = balancer([r.port for r in replicas])
    for version in ("1.0", "1.1", "1.2"):
        wheel = build_wheel(artifacts_dir / version, "behind-lb", version)
        answer = upload(url, wheel, "behind-lb", version)
        assert answer.status == 200, answer.body
    # Every version installs through the balancer, whichever replica took it.
    for version in ("1.0", "1.1", "1.2"):
        target = tmp_path / f"t{version}"
        result = pip_install(url + "/simple/", target, f"behind-lb=={version}")
        assert result.returncode == 0, result.stderr
