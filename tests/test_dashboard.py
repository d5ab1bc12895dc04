"""The dashboard at /ui in a real headless Chromium (Debian's), driven by Playwright."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import SwapperProcess, wait_until
from tests.fakes import FakePlugin, FakeWorld

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("SWAPPER_CHROMIUM", "/usr/bin/chromium")
ADMIN_KEY = "dash-admin-key"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")
    with sync_playwright() as playwright:
        # Playwright drives the system Chromium: no browser is downloaded.
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


def test_dashboard_loads_a_model(swapper_factory: Any, page: Page, tmp_path: Path) -> None:
    swapper = swapper_factory()
    response = page.goto(f"{swapper.url}/ui")
    assert response is not None and response.status == 200
    assert "default-src 'self'" in response.headers["content-security-policy"]
    for model in ("tiny-a", "tiny-b", "tiny-c"):
        expect(page.get_by_test_id(f"status-{model}")).to_have_text("UNLOADED")
    expect(page.get_by_test_id("vram")).to_contain_text("no GPU")
    expect(page.get_by_test_id("link")).to_have_text("events: live")

    page.get_by_test_id("load-tiny-b").click()
    expect(page.get_by_test_id("status-tiny-b")).to_have_text("LOADED")
    assert swapper.model("tiny-b")["status"] == "LOADED"
    expect(page.get_by_test_id("swaps")).to_contain_text("tiny-b (manual)")
    expect(page.get_by_test_id("events")).to_contain_text("tiny-b: LOADING → LOADED")

    page.get_by_test_id("load-tiny-c").click()  # a swap, seen live
    expect(page.get_by_test_id("status-tiny-c")).to_have_text("LOADED")
    expect(page.get_by_test_id("status-tiny-b")).to_have_text("UNLOADED")
    expect(page.get_by_test_id("swaps")).to_contain_text("tiny-b → tiny-c (manual)")

    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_dashboard_uses_the_admin_key(swapper_factory: Any, page: Page, llama_server: str) -> None:
    workdir = swapper_factory.workdir
    config = {"swapper": {"gpu_enabled": False, "stop_timeout": 5},
              "server": {"admin_api_keys": [ADMIN_KEY]},
              "models": {"tiny-a": {"backend": "llamacpp", "ctx_size": 512,
                                    "model_path": str(workdir / "tiny-a.gguf")}}}
    swapper = SwapperProcess(config, workdir, llama_server)
    try:
        page.goto(f"{swapper.url}/ui")
        expect(page.get_by_test_id("notice")).to_contain_text("401")  # no key yet
        page.get_by_test_id("key").fill(ADMIN_KEY)
        page.get_by_test_id("save-key").click()
        expect(page.get_by_test_id("status-tiny-a")).to_have_text("UNLOADED")
        page.get_by_test_id("load-tiny-a").click()
        expect(page.get_by_test_id("status-tiny-a")).to_have_text("LOADED")
        assert swapper.http.get("/status", headers={"x-api-key": ADMIN_KEY}).json()[
            "models"]["tiny-a"]["status"] == "LOADED"
    finally:
        swapper.stop()


class _FakeGpu:
    """One 20 GB GPU, with 6 GiB used by whatever backend runs."""

    available = True

    def gpus(self) -> list[Any]:
        from swapper.gpu import GpuStats

        return [GpuStats(0, "Fake RTX 4000", 20480.0, 6144.0, 14336.0)]

    def process_memory_mb(self, pid: int) -> float:
        return 5120.0

    def snapshot(self) -> dict[str, Any]:
        return {"available": True, "gpus": [{"index": 0, "name": "Fake RTX 4000",
                                             "total_mb": 20480, "used_mb": 6144,
                                             "free_mb": 14336}]}


def test_dashboard_draws_vram_as_a_bar(page: Page, world: FakeWorld,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here: the app runs in-process with a fake NVML view and fake backends."""
    import socket
    import threading

    import uvicorn

    import swapper.app
    from swapper.config import parse_config
    from swapper.plugins import load_backends

    monkeypatch.setattr(swapper.app, "GpuMonitor", _FakeGpu)
    registry = load_backends(FakePlugin(world))
    config = parse_config({"swapper": {"stop_timeout": 1},
                           "models": {"qwen3-8b": {"backend": "fake"}}}, "gpu.yaml",
                          registry.schemas())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(swapper.app.create_app(config, registry),
                                           host="127.0.0.1", port=port, log_config=None,
                                           lifespan="on"))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        wait_until(lambda: server.started, 10, "the in-process server")
        page.goto(f"http://127.0.0.1:{port}/ui")
        page.get_by_test_id("load-qwen3-8b").click()
        expect(page.get_by_test_id("status-qwen3-8b")).to_have_text("LOADED")
        vram = page.get_by_test_id("vram")
        expect(vram).to_contain_text("GPU 0 Fake RTX 4000: 6144 / 20480 MiB")
        width = vram.locator(".bar > div").evaluate("bar => bar.style.width")
        assert width == "30%"
        expect(page.locator('[data-model="qwen3-8b"]')).to_contain_text("5120 MiB")
    finally:
        server.should_exit = True
        thread.join(timeout=30)
