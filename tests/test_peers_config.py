"""The ``peers:`` section: what it accepts, what it refuses (one line naming the key), and the
seed's two node configs, each listing the other."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from swapper.backends.registry import load_backends
from swapper.config import PeerSettings, load_config, parse_config
from swapper.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = load_backends().schemas()
NODE_KEYS = {
    "NODE1_KEY": "k1-6d0f2a",
    "NODE1_ADMIN_KEY": "a1-93be11",
    "NODE2_KEY": "k2-1c7e55",
    "NODE2_ADMIN_KEY": "a2-40fa8d",
}


def parse(peers: Any) -> Any:
    return parse_config({"models": {}, "peers": peers}, "x.yaml", SCHEMAS)


def test_a_peer_with_defaults() -> None:
    config = parse({"node2": {"url": "http://node2.lan:8890"}})
    assert config.peers == {"node2": PeerSettings(url="http://node2.lan:8890")}
    peer = config.peers["node2"]
    assert (peer.api_key, peer.models, peer.timeout, peer.refresh) == (None, None, 5.0, 30.0)


def test_no_peers_by_default() -> None:
    assert parse_config({"models": {}}, "x.yaml", SCHEMAS).peers == {}


@pytest.mark.parametrize(
    ("peer", "message"),
    [
        ({}, "x.yaml: $.peers.n.url: required key is missing"),
        (
            {"url": "node2:8890"},
            "x.yaml: $.peers.n.url: must be an http:// or https:// URL with a host",
        ),
        ({"url": "ftp://node2"}, "url: must be an http:// or https:// URL with a host"),
        ({"url": "http://"}, "url: must be an http:// or https:// URL with a host"),
        ({"url": "http://u:p@node2"}, "url: must be the peer's root"),
        ({"url": "http://n", "timeout": 0}, "timeout: must be a number > 0"),
        ({"url": "http://n", "refresh": -1}, "refresh: must be a number > 0"),
        ({"url": "http://n", "api_key": ""}, "api_key: must not be empty"),
        ({"url": "http://n", "models": ["a b"]}, "models: a model id must be non-empty"),
        ({"url": "http://n", "models": "a"}, "x.yaml: $.peers.n.models: expected array, got str"),
        ({"url": "http://n", "key": "k"}, "x.yaml: $.peers.n.key: unknown key"),
    ],
)
def test_bad_peers_are_one_line_naming_the_key(peer: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse({"n": peer})
    assert message in caught.value.message
    assert "\n" not in caught.value.message


def test_a_peer_name_must_be_a_name() -> None:
    with pytest.raises(ConfigError, match=r"\$\.peers\.a b: a peer name must be"):
        parse({"a b": {"url": "http://n"}})


def test_the_key_is_never_in_the_repr() -> None:
    peer = PeerSettings(url="http://n", api_key="sekrit-123")
    assert "sekrit-123" not in repr(peer) and "<hidden>" in repr(peer)


def test_an_unset_key_variable_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_PEER_KEY", raising=False)
    with pytest.raises(ConfigError, match="NO_SUCH_PEER_KEY"):
        parse({"n": {"url": "http://n", "api_key": "${env:NO_SUCH_PEER_KEY}"}})


def test_the_seed_nodes_list_each_other(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in NODE_KEYS.items():
        monkeypatch.setenv(name, value)
    node1 = load_config(ROOT / "config/node1.yaml", SCHEMAS)
    node2 = load_config(ROOT / "config/node2.yaml", SCHEMAS)
    assert node1.swapper.default_model == "qwen3-8b" and list(node1.models) == ["qwen3-8b"]
    assert node2.swapper.default_model is None and list(node2.models) == ["qwen2.5-3b-instruct"]
    # Each sends the other the key the other accepts.
    assert node1.peers["node2"].api_key in node2.server.api_keys
    assert node2.peers["node1"].api_key in node1.server.api_keys
    assert node1.peers["node2"].url == "http://node2.lan:8890"
    assert node2.peers["node1"].url == "http://node1.lan:8890"


@pytest.mark.parametrize("node", ["node1", "node2"])
def test_check_config_accepts_the_seed_nodes(node: str) -> None:
    path = ROOT / "config" / f"{node}.yaml"
    run = subprocess.run(
        [sys.executable, "-m", "swapper", "check-config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **NODE_KEYS},
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"{path}: ok (1 models)"
    assert not any(key in run.stdout + run.stderr for key in NODE_KEYS.values())
    # Without the peer's key in the environment, it says which variable is missing.
    peer_key = "NODE2_KEY" if node == "node1" else "NODE1_KEY"
    missing = subprocess.run(
        [sys.executable, "-m", "swapper", "check-config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        env={k: v for k, v in {**os.environ, **NODE_KEYS}.items() if k != peer_key},
    )
    assert missing.returncode == 2
    assert peer_key in missing.stderr and "Traceback" not in missing.stderr
