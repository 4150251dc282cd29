"""deploy/'s replica variants (issue 12): compose with MinIO, two replicas and a load
balancer; Kubernetes with three replicas and the S3 settings from a Secret. Each
replica's config must pass the real config check and name the bucket the
deployment creates."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import build_config
from tests.conftest import MakeProxy
from tests.faults.helpers import auth_config, call, eventually, upload
from tests.support.artifacts import build_wheel
from tests.support.clients import pip_install
from tests.support.s3 import Bucket
from tests.support.server import free_port
from tests.support.upstream import FakeUpstream

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
COMPOSE = DEPLOY / "docker-compose.replicas.yml"
CONFIG = DEPLOY / "config.replicas.yaml"
NGINX = DEPLOY / "nginx-replicas.conf"
KUBERNETES = DEPLOY / "kubernetes.replicas.yaml"


def _k8s() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(KUBERNETES.read_text()) if d}


def test_compose_runs_replicas_over_one_bucket_behind_a_balancer() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    replicas = [name for name in services if name.startswith("indexguard-")]
    assert len(replicas) >= 2
    for name in replicas:
        service = services[name]
        assert "./config.replicas.yaml:/etc/indexguard/config.yaml:ro" in service["volumes"]
        env = service["environment"]
        assert set(env) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        # No secret in the file: the password must come from the environment.
        assert env["AWS_SECRET_ACCESS_KEY"].startswith("${MINIO_ROOT_PASSWORD:?")
        assert service["depends_on"]["bucket"]["condition"] == "service_completed_successfully"
    config = build_config(yaml.safe_load(CONFIG.read_text()))
    assert config.storage.backend == "s3"
    assert config.storage.s3.endpoint_url == "http://minio:9000"
    made = " ".join(services["bucket"]["command"])
    assert re.search(rf"mc mb --ignore-existing store/{config.storage.s3.bucket}\b", made)
    assert config.limits.max_upload <= 5 * 10**9  # one PUT per upload
    nginx = NGINX.read_text()
    for name in replicas:
        assert f"server {name}:{config.listen.port}" in nginx
    assert "proxy_request_buffering off;" in nginx
    assert services["lb"]["ports"] == [f"{config.listen.port}:{config.listen.port}"]


def test_kubernetes_replicas_take_the_bucket_from_a_secret() -> None:
    docs = _k8s()
    assert set(docs) == {"Secret", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    spec = docs["Deployment"]["spec"]
    assert spec["replicas"] >= 2 and spec["strategy"]["type"] == "RollingUpdate"
    assert docs["PodDisruptionBudget"]["spec"]["minAvailable"] < spec["replicas"]
    pod = spec["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert all("persistentVolumeClaim" not in v for v in volumes.values())  # stateless
    container = pod["containers"][0]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/var/lib/indexguard"]]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]}
    assert env == {"AWS_ACCESS_KEY_ID": "indexguard-s3", "AWS_SECRET_ACCESS_KEY": "indexguard-s3"}
    # The config the init container assembles: the ConfigMap's, then the Secret's storage.
    secret = docs["Secret"]["stringData"]
    assembled = docs["ConfigMap"]["data"]["config.yaml"] + secret["storage.yaml"]
    init = pod["initContainers"][0]["command"][-1]
    assert init == "cat /config/config.yaml /s3/storage.yaml > /etc/indexguard/config.yaml"
    config = build_config(yaml.safe_load(assembled))
    assert config.storage.backend == "s3" and config.data_dir == Path("/var/lib/indexguard")
    assert "storage" not in docs["ConfigMap"]["data"]["config.yaml"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True


# ---------------------------------------------------------------- the balancer, for real

Balancer = Callable[[list[int]], str]


@pytest.fixture
def balancer(tmp_path: Path) -> Iterator[Balancer]:
    """Real nginx running deploy/nginx-replicas.conf, its replicas pointed at loopback ports."""
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (.ci/run installs nginx-light)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(ports: list[int]) -> str:
        targets = iter(ports)
        conf = re.sub(r"server indexguard-\d+:8080",
                      lambda _m: f"server 127.0.0.1:{next(targets)}", NGINX.read_text())
        listen = free_port()
        conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{listen};")
        prefix = tmp_path / "nginx"
        (prefix / "logs").mkdir(parents=True)
        # The file is an http-level snippet (conf.d/), as the nginx image includes it.
        (prefix / "nginx.conf").write_text(
            f"daemon off;\nuser root;\npid {prefix / 'nginx.pid'};\n"
            f"events {{ worker_connections 1024; }}\nhttp {{\n{conf}\n}}\n")
        proc = subprocess.Popen(
            ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
             "-e", str(prefix / "logs" / "error.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        url = f"http://127.0.0.1:{listen}"
        assert eventually(lambda: _answers(url), timeout=10), (
            (prefix / "logs" / "error.log").read_text(errors="replace"))
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
    make_proxy: MakeProxy, s3_bucket: Bucket, upstream: FakeUpstream, balancer: Balancer,
    artifacts_dir: Path, tmp_path: Path,
) -> None:
    config: dict[str, Any] = auth_config()
    config["storage"] = s3_bucket.storage_config()
    config["upstream"] = {"url": upstream.url}
    config["listen"] = {"trusted_proxies": ["127.0.0.1/32"]}
    replicas = [make_proxy(config, env=s3_bucket.env()) for _ in range(2)]
    url = balancer([r.port for r in replicas])
    versions = ("1.0", "1.1", "1.2", "1.3")
    for version in versions:
        wheel = build_wheel(artifacts_dir / version, "behind-lb", version)
        answer = upload(url, wheel, "behind-lb", version)
        assert answer.status == 200, answer.body
    # Both replicas took uploads (least connections alternates on a fresh pool).
    took = [sum('"method": "POST"' in line or '"method":"POST"' in line
                for line in r.log_text().splitlines()) for r in replicas]
    assert all(took), took
    # Every version installs through the balancer, whichever replica took it.
    target = tmp_path / "target"
    for version in versions:
        assert eventually(lambda v=version: pip_install(
            url + "/simple/", target / v, f"behind-lb=={v}").returncode == 0, timeout=10)
