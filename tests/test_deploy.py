"""Every Kubernetes manifest under deploy/ validates against the Kubernetes schemas (no cluster needed)."""

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from .conftest import REPO  # noqa: E402

MANIFESTS = sorted((REPO / "deploy" / "k8s").glob("*.yaml"))
K8S_VERSION = "1.33.0"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises ValidationError with the path


def test_servers_probe_health_and_mount_the_checkpoint():
    kinds = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            kinds.setdefault(doc["kind"], []).append(doc)
    assert {"Deployment", "StatefulSet", "Job", "PersistentVolumeClaim", "Secret", "Service"} <= set(kinds)
    servers = [c for d in kinds["Deployment"] + kinds["StatefulSet"] for c in d["spec"]["template"]["spec"]["containers"]
               if any(p.get("containerPort") == 8000 for p in c.get("ports", []))]
    assert len(servers) == 3
    for c in servers:
        assert c["readinessProbe"]["httpGet"]["path"] == "/health" == c["livenessProbe"]["httpGet"]["path"]
        assert c["resources"]["requests"]["nvidia.com/gpu"]
        assert any(m["mountPath"] == "/models" for m in c["volumeMounts"])
    assert len(MANIFESTS) == 5


def test_validator_catches_mistakes():
    doc = next(yaml.safe_load_all((REPO / "deploy/k8s/single-gpu.yaml").read_text()))
    doc["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    doc["spec"]["replicas"] = 1
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}  # misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_prune_job_always_resumes():
    """Every attempt of the prune Job passes --resume (safe with nothing to resume, and after completion), and its
    arguments are ones that bawa-export accepts."""
    from bawa_vllm.cli.export import build_parser

    job = next(yaml.safe_load_all((REPO / "deploy/k8s/prune-job.yaml").read_text()))
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["bawa-export"]
    args = build_parser().parse_args(container["args"])
    assert args.resume and not args.overwrite and args.out == "/models/Llama-3-70B-bawa-2of4"
