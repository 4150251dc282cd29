"""deploy/'s replica variants (issue 12): compose with MinIO, two replicas and a load
balancer; Kubernetes with three replicas and the S3 settings from a Secret. Each
replica's config must pass the real config check and name the bucket the
deployment creates."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from proxy.config import build_config

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
