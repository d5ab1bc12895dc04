"""The dashboard at /ui in a real headless Chromium (Debian's), driven by Playwright."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from tests.conftest import (
    MESSAGES,
    SwapperProcess,
    fake_config,
    seconds,
    served_in_thread,
    tiny_model,
    wait_until,
)
from tests.fakes import Behaviour, FakeGpu, FakeWorld
from tests.gpu_snapshots import served_with_two_gpus

pytestmark = [pytest.mark.integration]

CHROMIUM = os.environ.get("SWAPPER_CHROMIUM", "/usr/bin/chromium")
# Nothing is downloaded or phoned home: the system browser, headless, on loopback only.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
API_KEY = "dash-user-key"
ADMIN_KEY = "dash-admin-key"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Every wait has a deadline; 30 s rather than Playwright's 5 s leaves room for a busy CI machine.
expect.set_options(timeout=30_000)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, launched once per module; missing, it is a failure, not a skip."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} not found: the dashboard test needs Debian's Chromium; install "
            "it with `apt-get update && apt-get install -y chromium` (or point "
            "$SWAPPER_CHROMIUM at a Chromium binary)"
        )
    with sync_playwright() as playwright:
        # executable_path: Playwright drives the system Chromium, so no browser is downloaded.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context (empty localStorage) whose page must raise no script error."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(30_000)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))

    def on_console(message: ConsoleMessage) -> None:
        # 401/403 answers are logged by Chromium as "Failed to load resource"; they are expected.
        if message.type == "error" and "Failed to load resource" not in message.text:
            problems.append(f"console: {message.text}")

    page.on("console", on_console)
    yield page
    context.close()
    assert not problems, "the page reported errors (a CSP violation?):\n" + "\n".join(problems)


def test_dashboard_loads_a_model(swapper_factory: Any, page: Page, tmp_path: Path) -> None:
    swapper = swapper_factory()
    response = page.goto(f"{swapper.url}/ui")
    assert response is not None and response.status == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "'sha256-" in csp
    for model in ("tiny-a", "tiny-b", "tiny-c"):
        expect(page.get_by_test_id(f"status-{model}")).to_have_text("UNLOADED")
    expect(page.get_by_test_id("vram")).to_contain_text("no GPU")
    expect(page.get_by_test_id("link")).to_have_text("events: live")

    page.get_by_test_id("load-tiny-b").click()
    expect(page.get_by_test_id("status-tiny-b")).to_have_text("LOADED")
    assert swapper.model("tiny-b")["status"] == "LOADED"
    expect(page.get_by_test_id("load-tiny-b")).to_have_text("Load")  # the request has ended
    expect(page.get_by_test_id("load-tiny-b")).to_be_enabled()
    expect(page.get_by_test_id("mode")).to_have_text("single-active · active: tiny-b")
    pid = str(swapper.model("tiny-b")["pid"])
    expect(page.locator('[data-model="tiny-b"]')).to_contain_text(pid)
    expect(page.get_by_test_id("swaps")).to_contain_text("– → tiny-b (manual) in")
    expect(page.get_by_test_id("events")).to_contain_text("tiny-b: LOADING → LOADED")

    page.get_by_test_id("load-tiny-c").click()  # a swap, seen live
    expect(page.get_by_test_id("status-tiny-c")).to_have_text("LOADED")
    expect(page.get_by_test_id("status-tiny-b")).to_have_text("UNLOADED")
    expect(page.get_by_test_id("swaps").locator("li").first).to_contain_text(
        "tiny-b → tiny-c (manual) in"
    )  # newest first
    expect(page.get_by_test_id("events")).to_contain_text("tiny-b stopped in")

    page.get_by_test_id("unload-tiny-c").click()
    expect(page.get_by_test_id("status-tiny-c")).to_have_text("UNLOADED")
    page.get_by_test_id("load-tiny-b").click()  # left loaded for the screenshot
    expect(page.get_by_test_id("status-tiny-b")).to_have_text("LOADED")
    assert swapper.model("tiny-b")["status"] == "LOADED"

    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_dashboard_asks_for_a_key_and_uses_the_admin_key(swapper_factory: Any, page: Page) -> None:
    swapper = swapper_factory(
        server={"api_keys": [API_KEY], "admin_api_keys": [ADMIN_KEY]},
        models={"tiny-a": tiny_model(swapper_factory.workdir, "a", ctx_size=512)},
    )
    response = page.goto(f"{swapper.url}/ui")  # the page itself is open, like /health
    assert response is not None and response.status == 200
    notice = page.get_by_test_id("notice")
    expect(notice).to_contain_text("401")  # no key yet
    expect(notice).to_contain_text("enter an API key")
    expect(page.get_by_test_id("link")).to_contain_text("needs a key (401)")

    page.get_by_test_id("key").fill(API_KEY)  # a plain key: may look, may not load
    page.get_by_test_id("save-key").click()
    expect(page.get_by_test_id("status-tiny-a")).to_have_text("UNLOADED")
    expect(notice).to_be_empty()
    expect(page.get_by_test_id("link")).to_have_text("events: live")
    page.get_by_test_id("load-tiny-a").click()
    expect(notice).to_contain_text("403")
    expect(notice).to_contain_text("admin_api_keys")
    assert (
        swapper.http.get("/status", headers={"x-api-key": API_KEY}).json()["models"]["tiny-a"][
            "status"
        ]
        == "UNLOADED"
    )

    page.get_by_test_id("key").fill(ADMIN_KEY)
    page.get_by_test_id("save-key").click()
    expect(notice).to_be_empty()
    page.get_by_test_id("load-tiny-a").click()
    expect(page.get_by_test_id("status-tiny-a")).to_have_text("LOADED")
    expect(notice).to_be_empty()
    assert (
        swapper.http.get("/status", headers={"x-api-key": ADMIN_KEY}).json()["models"]["tiny-a"][
            "status"
        ]
        == "LOADED"
    )
    # Kept in the browser's storage, never in the address.
    assert page.evaluate("localStorage.getItem('swapper-key')") == ADMIN_KEY
    assert ADMIN_KEY not in page.url and API_KEY not in page.url


@pytest.fixture
def fake_gpu_swapper(
    world: FakeWorld, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[str]:
    """swapper in-process on fake backends with a fake NVML view (no GPU here); its URL."""

    import swapper.http.app

    # A 20 GB card with 1 GiB used by other programs; qwen3-8b takes 5 GiB more once loaded.
    monkeypatch.setattr(
        swapper.http.app,
        "GpuMonitor",
        lambda: FakeGpu(world, 20480.0, extra_mb=1024.0, name="Fake RTX 4000"),
    )
    config, registry = fake_config(
        world,
        {"qwen3-8b": {"vram_mb": 5120}, "broken": {}},
        swapper={"max_start_failures": 1, "state_file": str(tmp_path / "state.json")},
        name="gpu.yaml",
    )
    with served_in_thread(swapper.http.app.create_app(config, registry)) as url:
        yield url


def test_dashboard_shows_progress_vram_and_failures(
    fake_gpu_swapper: str, page: Page, world: FakeWorld, tmp_path: Path
) -> None:
    world.queue("qwen3-8b", Behaviour.GATED)  # ready only when the test says so
    world.queue("broken", Behaviour.FAIL_START)
    page.goto(f"{fake_gpu_swapper}/ui")

    load = page.get_by_test_id("load-qwen3-8b")
    load.click()
    expect(page.get_by_test_id("status-qwen3-8b")).to_have_text("LOADING")
    expect(load).to_have_text("loading…")
    expect(load).to_be_disabled()
    expect(page.get_by_test_id("unload-qwen3-8b")).to_be_disabled()
    world.gates["qwen3-8b"].set()
    expect(page.get_by_test_id("status-qwen3-8b")).to_have_text("LOADED")
    expect(load).to_have_text("Load")
    expect(load).to_be_enabled()

    vram = page.get_by_test_id("vram")
    # The GPU's budget (its 20480 MiB less the default 512 MiB reserve), what qwen3-8b is
    # charged on it, and NVML's figures: placement accounts per GPU, even with one.
    expect(vram).to_contain_text("GPU 0 Fake RTX 4000: 5120 MiB of 19968 MiB committed")
    expect(vram).to_contain_text("NVML: 6144 MiB of 20480 MiB used")
    assert page.get_by_test_id("gpu-bar-0").evaluate("bar => bar.style.width") == "26%"
    expect(vram).to_contain_text("qwen3-8b: 5120 MiB")
    expect(page.locator('[data-model="qwen3-8b"]')).to_contain_text("5120 MiB")
    expect(page.get_by_test_id("vram-budget")).to_contain_text("MiB of 19968 MiB committed")
    expect(page.get_by_test_id("gpus-qwen3-8b")).to_have_text("0")

    page.get_by_test_id("load-broken").click()  # its start fails: 503, shown with the reason
    expect(page.get_by_test_id("status-broken")).to_have_text("FAILED")
    expect(page.get_by_test_id("notice")).to_contain_text("load broken failed: 503")
    expect(page.get_by_test_id("error-broken")).to_contain_text("fake start failed")
    expect(page.locator('[data-model="broken"]')).to_contain_text("1 failed start")
    expect(page.get_by_test_id("events")).to_contain_text("broken: LOADING → FAILED")

    shot = tmp_path / "dashboard-gpu.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture
def two_gpu_swapper(
    world: FakeWorld, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[str]:
    """swapper in-process on fake backends, its snapshots reporting two GPUs; its URL."""
    with served_with_two_gpus(world, monkeypatch, tmp_path) as url:
        yield url


def test_dashboard_shows_each_gpu_with_its_models(
    two_gpu_swapper: str, page: Page, tmp_path: Path
) -> None:
    page.goto(f"{two_gpu_swapper}/ui")
    expect(page.get_by_test_id("link")).to_have_text("events: live")
    first, second = page.get_by_test_id("gpu-0"), page.get_by_test_id("gpu-1")
    expect(first).to_contain_text("GPU 0 NVIDIA RTX 4090: 14336 MiB of 23040 MiB committed")
    expect(first).to_contain_text("NVML: 15101 MiB of 24564 MiB used")
    expect(page.get_by_test_id("gpu-models-0")).to_have_text("qwen-14b · big-70b")
    expect(second).to_contain_text("GPU 1 NVIDIA RTX 3090: 20480 MiB of 23040 MiB committed")
    expect(second).to_contain_text("NVML: 21001 MiB of 24576 MiB used")
    expect(page.get_by_test_id("gpu-models-1")).to_have_text("big-70b")
    # Each bar is what is committed of that GPU's budget.
    widths = [
        page.get_by_test_id(f"gpu-bar-{i}").evaluate("bar => bar.style.width") for i in (0, 1)
    ]
    assert widths == ["62%", "89%"]
    expect(page.get_by_test_id("vram-budget")).to_contain_text("34816 MiB of 46080 MiB committed")

    # The model table's GPU column: where each model holds memory; a model holding none shows
    # where it was last placed, as a hint.
    expect(page.get_by_test_id("gpus-qwen-14b")).to_have_text("0")
    expect(page.get_by_test_id("gpus-big-70b")).to_have_text("0, 1")
    embed = page.get_by_test_id("gpus-embed")
    expect(embed).to_have_text("(1)")
    expect(embed).to_have_class("num gpu-col hint")
    expect(embed).to_have_attribute("title", "holds no GPU memory; last placed on GPU 1")
    expect(page.locator("#models-table th", has_text="GPU")).to_be_visible()

    shot = tmp_path / "dashboard-two-gpus.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == PNG_MAGIC


def test_dashboard_polls_while_the_event_stream_is_down(fake_gpu_swapper: str, page: Page) -> None:
    import httpx

    page.route("**/events", lambda route: route.abort())  # as if /events were unreachable
    page.goto(f"{fake_gpu_swapper}/ui")
    expect(page.get_by_test_id("link")).to_contain_text("polling")
    expect(page.get_by_test_id("status-qwen3-8b")).to_have_text("UNLOADED")
    # Loaded behind the page's back: only polling /status can tell it.
    assert httpx.post(f"{fake_gpu_swapper}/models/qwen3-8b/load", timeout=30).status_code == 200
    expect(page.get_by_test_id("status-qwen3-8b")).to_have_text("LOADED")

    page.unroute("**/events")  # the stream comes back: the page reconnects by itself
    expect(page.get_by_test_id("link")).to_have_text("events: live")
    assert httpx.post(f"{fake_gpu_swapper}/models/qwen3-8b/unload", timeout=30).status_code == 200
    expect(page.get_by_test_id("events")).to_contain_text("qwen3-8b: UNLOADING → UNLOADED")


@pytest.fixture
def busy_swapper(swapper_factory: Any, llama_server: str) -> Iterator[SwapperProcess]:
    """swapper on tiny-a and tiny-b, one-second samples, after some traffic: two requests to
    tiny-a (one streamed), one to tiny-b (a swap) and one for a model that does not exist."""
    workdir: Path = swapper_factory.workdir
    config = {
        "swapper": {"gpu_enabled": False, "model_swap_timeout": 30, "stop_timeout": 5},
        "server": {"host": "127.0.0.1", "port": 1},
        "activity": {"sample_seconds": 1},
        "models": {
            "tiny-a": tiny_model(workdir, "a", ctx_size=512),
            "tiny-b": tiny_model(workdir, "b", ctx_size=512),
        },
    }
    swapper = SwapperProcess(config, workdir, llama_server)
    try:
        ask = {"messages": MESSAGES, "max_tokens": 8}
        for request_id, body in (
            ("dash-1", {"model": "tiny-a", **ask}),
            ("dash-2", {"model": "tiny-a", "stream": True, **ask}),
            ("dash-3", {"model": "tiny-b", **ask}),
            ("dash-4", {"model": "nope", **ask}),
        ):
            swapper.http.post(
                "/v1/chat/completions", json=body, headers={"X-Request-Id": request_id}
            )

        def counted() -> bool:
            samples = swapper.http.get("/activity").json()["samples"]
            return sum(sum(s["requests"].values()) for s in samples) == 3

        wait_until(counted, seconds(30), "the samples to count the three model requests")
        yield swapper
    finally:
        swapper.stop()


def test_dashboard_shows_the_history_after_traffic(
    busy_swapper: SwapperProcess, page: Page, tmp_path: Path
) -> None:
    swapper = busy_swapper
    page.set_viewport_size({"width": 1400, "height": 900})
    page.goto(f"{swapper.url}/ui")
    # What happened before the page was opened: replayed by /events, read from /activity.
    swaps = page.get_by_test_id("swaps")
    expect(swaps).to_contain_text("– → tiny-a (request) in")
    expect(swaps.locator("li").first).to_contain_text("tiny-a → tiny-b (request) in")
    expect(page.get_by_test_id("events")).to_contain_text("tiny-a: LOADING → LOADED")
    expect(page.get_by_test_id("status-tiny-b")).to_have_text("LOADED")
    expect(page.get_by_test_id("status-tiny-a")).to_have_text("UNLOADED")

    rows = page.get_by_test_id("activity-row")
    expect(rows).to_have_count(4)
    ids = [rows.nth(i).get_attribute("data-request-id") for i in range(4)]
    assert ids == ["dash-4", "dash-3", "dash-2", "dash-1"]  # latest first
    expect(rows.first).to_contain_text("404")
    page.get_by_test_id("activity-filter").select_option("tiny-a")
    expect(rows).to_have_count(2)
    rows.nth(1).click()  # dash-1: its whole record
    detail = page.get_by_test_id("activity-detail")
    expect(detail).to_contain_text('"request_id": "dash-1"')
    doc = swapper.http.get("/activity").json()
    record = next(r for r in doc["requests"] if r["request_id"] == "dash-1")
    expect(detail).to_contain_text(f'"completion_tokens": {record["completion_tokens"]}')
    # The stream's counts come from llama.cpp's last event (its timings: evaluated + cached).
    streamed = next(r for r in doc["requests"] if r["request_id"] == "dash-2")
    assert streamed["prompt_tokens"] == record["prompt_tokens"]
    assert streamed["completion_tokens"] and streamed["tokens_per_s"] > 0

    summary = doc["models"]["tiny-a"]
    expect(page.get_by_test_id("loads-today-tiny-a")).to_have_text("1")
    expect(page.get_by_test_id("mean-load-tiny-a")).to_have_text(f"{summary['mean_load_s']:.2f} s")
    expect(page.get_by_test_id("tokens-tiny-a")).to_have_text(f"{summary['tokens_per_s']:.1f}")
    expect(page.get_by_test_id("last-used-tiny-a")).not_to_have_text("–")

    # The plots draw /activity's own figures.
    expect(page.locator("#plot-requests canvas")).to_have_count(1)
    expect(page.locator("#plot-swaps canvas")).to_have_count(1)
    plotted = page.evaluate(
        "() => ({ requests: swapperPlots.requests.data, labels: "
        "swapperPlots.requests.series.slice(1).map(s => s.label), "
        "swaps: swapperPlots.swaps.data })"
    )
    later = swapper.http.get("/activity").json()  # samples only grow meanwhile
    by_time = {dt.datetime.fromisoformat(s["time"]).timestamp(): s for s in later["samples"]}
    assert plotted["labels"] == ["tiny-a", "tiny-b"]
    times, *series = plotted["requests"]
    assert times and all(t in by_time for t in times)
    for label, values in zip(plotted["labels"], series, strict=True):
        expected = [by_time[t]["requests"].get(label, 0) / by_time[t]["seconds"] for t in times]
        assert values == pytest.approx(expected)
    assert sum(series[0]) == pytest.approx(2.0) and sum(series[1]) == pytest.approx(1.0)
    swap_times, swap_seconds, load_seconds = plotted["swaps"]
    assert sorted(s for s in swap_seconds if s is not None) == sorted(
        s["seconds"] for s in later["swaps"]
    )
    assert len([s for s in load_seconds if s is not None]) == 2  # tiny-a, then tiny-b
    assert swap_times == sorted(swap_times) and len(swap_times) == len(later["swaps"]) + 2

    page.get_by_test_id("activity-filter").select_option("")
    shot = tmp_path / "dashboard-activity.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == PNG_MAGIC
    if os.environ.get("SWAPPER_DOCS_SCREENSHOT"):  # refresh the README's picture on request
        shutil.copyfile(shot, Path(__file__).resolve().parent.parent / "docs" / "dashboard.png")
