"""The Kubernetes manifests under deploy/kubernetes/: valid against Kubernetes' own schemas
(kubernetes-validate ships them, so this runs offline), and consistent with each other and
with swapper's config schema. No cluster runs them here (docs/scaling.md says so)."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from swapper.backends.registry import load_backends
from swapper.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
#: The Kubernetes version the manifests are checked against (the newest the package knows).
VERSION = "1.37"


def resources() -> list[dict[str, Any]]:
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        found.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return found


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [
        r
        for r in resources()
        if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)
    ]
    assert len(matches) == 1, f"{kind} {name}: {len(matches)} found"
    return matches[0]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """The schemas come with the package: any attempt to connect anywhere fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_every_manifest_is_valid_against_the_kubernetes_schemas() -> None:
    kinds = set()
    for resource in resources():
        # strict: a misspelt or misplaced field is an error, not ignored
        kubernetes_validate.validate(resource, VERSION, strict=True)
        kinds.add(resource["kind"])
    assert kinds >= {"Namespace", "ConfigMap", "Secret", "DaemonSet", "Service", "EndpointSlice"}


def test_the_validator_refuses_a_misplaced_field() -> None:
    daemonset = one("DaemonSet")
    broken = {**daemonset, "spec": {**daemonset["spec"], "replicas": 2}}  # not a DaemonSet's
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSION, strict=True)


def test_the_daemonset_takes_each_gpu_node_and_its_gpu() -> None:
    pod = one("DaemonSet")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["args"] == ["--config", "/etc/swapper/$(NODE_NAME).yaml"]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in (
        container["env"]
    )
    assert container["envFrom"] == [{"secretRef": {"name": "swapper-keys"}}]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["config"] == "/etc/swapper"
    assert volumes["config"]["configMap"]["name"] == "swapper-config"
    # Longer than swapper's own shutdown_timeout (30 s): in-flight requests get to finish.
    assert pod["terminationGracePeriodSeconds"] > 30


def test_each_node_config_is_valid_and_its_peers_are_the_other_nodes_services(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = one("Secret", "swapper-keys")["stringData"]
    configs = one("ConfigMap", "swapper-config")["data"]
    services = {r["metadata"]["name"] for r in resources() if r["kind"] == "Service"}
    slices = {
        r["metadata"]["labels"]["kubernetes.io/service-name"]: r["endpoints"][0]["nodeName"]
        for r in resources()
        if r["kind"] == "EndpointSlice"
    }
    # Only the Secret's variables: a config naming any other would fail to load.
    for name in [*secret, "SWAPPER_API_KEY", "SWAPPER_ADMIN_KEY"]:
        monkeypatch.delenv(name, raising=False)
    for name, value in secret.items():
        monkeypatch.setenv(name, value)
    schemas = load_backends().schemas()
    assert sorted(configs) == ["node1.yaml", "node2.yaml"]
    for filename, text in configs.items():
        node = filename.removesuffix(".yaml")
        config = parse_config(yaml.safe_load(text), f"configmap:{filename}", schemas)
        assert config.peers, f"{node} has no peers"
        for peer_name, peer in config.peers.items():
            assert peer_name != node
            match = re.fullmatch(
                r"http://([a-z0-9-]+)\.swapper\.svc\.cluster\.local:8890", peer.url
            )
            assert match, peer.url
            assert match[1] in services
            # The per-node Service of that peer addresses that peer's node.
            assert slices[match[1]] == peer_name
            # The key sent to the peer is one the peer accepts.
            theirs = parse_config(yaml.safe_load(configs[f"{peer_name}.yaml"]), peer_name, schemas)
            assert peer.api_key in theirs.server.api_keys
