"""A fake backend with a queue of behaviours, for coordinator and HTTP tests.

It records every start and stop and how many fakes are alive at once, so tests can check that
an old backend is gone before a new one starts. Each fake serves ``http://<model>.fake.test``,
which respx can stand in for.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from swapper.backends.contract import Backend, BackendHandle
from swapper.backends.hookspecs import hookimpl
from swapper.config import ModelEntry
from swapper.gpu import GpuStats

if TYPE_CHECKING:
    from swapper.scheduling.coordinator import SwapCoordinator


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class Behaviour(enum.Enum):
    """What the next start of a fake does."""

    READY = "ready at once"
    GATED = "ready when the test opens the model's gate"
    NEVER_READY = "never ready"
    FAIL_START = "start raises"
    EXIT_DURING_LOAD = "process exits while loading"


class FakeModel(ModelEntry, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A model entry with ``backend: fake``."""

    note: str = ""
    #: VRAM (MiB) the fake really takes on the fake GPU; default: its vram_mb estimate.
    actual_mb: float | None = None
    #: It can sleep (like vLLM's sleep mode), then holding ``sleep_mb``.
    sleepy: bool = False
    sleep_mb: float = 100.0
    #: What its args would declare: the GPUs it uses (``Backend.gpu_count``; 0: every GPU).
    declares_gpus: int | None = None
    #: Its files' size hint in MiB (``Backend.size_hint_mb``), like a GGUF's.
    file_mb: float | None = None
    #: Like vLLM: reserves this share of each GPU's total (the backend's estimate), never split.
    reserve_share: float | None = None
    #: Like a remote server: uses no GPU of this node.
    remote: bool = False


class FakeWorld:
    """The shared state of every fake backend in one test."""

    def __init__(self) -> None:
        self.behaviours: dict[str, collections.deque[Behaviour]] = collections.defaultdict(
            collections.deque
        )
        self.gates: dict[str, asyncio.Event] = collections.defaultdict(asyncio.Event)
        self.events: list[tuple[str, str]] = []
        self.alive: set[str] = set()
        self.max_alive = 0
        self.exits: dict[str, asyncio.Future[str]] = {}
        self.frozen: set[str] = set()
        self._next_pid = 1000
        #: VRAM each live fake holds; what stopped fakes held, as [MiB, first seen freed (None:
        #: not looked at yet)], until the lag passes; the lag (s) a FakeGpu applies to it.
        self.held: dict[str, float] = {}
        self.releasing: list[list[Any]] = []
        #: The GPUs each fake was last started on (placement's choice; GPU 0 when none was
        #: given), and the CUDA_VISIBLE_DEVICES its start would have set (None: none).
        self.placed: dict[str, tuple[int, ...]] = {}
        self.visible: dict[str, str | None] = {}
        self.release_lag = 0.0
        #: The GPU is read from worker threads (placement reads NVML off the event loop).
        self.gpu_lock = threading.Lock()
        self.max_held = 0.0
        self.pids: dict[int, str] = {}
        #: Fakes alive but asleep (they hold memory, and serve nothing).
        self.asleep: set[str] = set()
        self.max_awake = 0

    def hold(self, model_id: str, mb: float, *, died: bool = False) -> None:
        """Set what ``model_id`` holds on the fake GPU. A live process's change shows at once;
        what a process that ``died`` held shows free only after the lag (see :class:`FakeGpu`)."""
        with self.gpu_lock:
            freed = self.held.pop(model_id, 0.0) - mb
            if mb > 0:
                self.held[model_id] = mb
            self.max_held = max(self.max_held, sum(self.held.values()))
            if freed > 0 and died:
                self.releasing.append([freed, None, self.placed.get(model_id, (0,))])

    def queue(self, model_id: str, *behaviours: Behaviour) -> None:
        """Behaviours for the next starts of ``model_id`` (READY once they run out)."""
        self.behaviours[model_id].extend(behaviours)

    def starts(self, model_id: str) -> int:
        """How many times ``model_id`` was started."""
        return self.events.count(("start", model_id))

    def crash(self, model_id: str) -> None:
        """Make the running fake of ``model_id`` die (from any thread: test clients may run the
        app on a loop of their own)."""
        self.gone(model_id)
        self.events.append(("crash", model_id))
        exit_ = self.exits[model_id]
        if exit_.get_loop().is_running() and not _on_loop(exit_.get_loop()):
            exit_.get_loop().call_soon_threadsafe(exit_.set_result, "fake backend crashed")
        else:
            exit_.set_result("fake backend crashed")

    def gone(self, model_id: str, outcome: str | None = None) -> None:
        """The fake of ``model_id`` is no more: not alive, holding nothing; ``outcome`` ends a
        ``wait_exit`` (a stop or a kill on the fake's own loop)."""
        self.alive.discard(model_id)
        self.asleep.discard(model_id)
        self.hold(model_id, 0, died=True)
        exit_ = self.exits.get(model_id)
        if outcome is not None and exit_ is not None and not exit_.done():
            exit_.set_result(outcome)

    def freeze(self, model_id: str) -> None:
        """Make the running fake of ``model_id`` stop answering (like SIGSTOP)."""
        self.frozen.add(model_id)

    def pid(self) -> int:
        self._next_pid += 1
        return self._next_pid


class FakeGpu:
    """One GPU in process, with everything swapper reads of :class:`swapper.gpu.GpuMonitor`.

    Its used memory is ``extra_mb`` (other programs) plus what the live fakes hold. What a
    stopped fake held still counts until ``release_lag`` seconds (default: the world's) after a
    reader first sees it gone, as ``tests/fake_servers/fakegpu.py`` does for dead holders and as
    CUDA's free figure lags an unload; a lag of 0 shows it free at once. ``devices``: that many
    GPUs of ``total_mb`` each (or ``sizes``: one total per GPU); a fake holds its memory on the GPUs
    placement started it on. ``host_pids``: NVML
    lists only pids of another PID namespace (a container), so per-process memory is unknown.
    """

    available = True

    def __init__(
        self,
        world: FakeWorld,
        total_mb: float = 16384.0,
        *,
        extra_mb: float = 0.0,
        name: str = "Fake GPU",
        release_lag: float | None = None,
        host_pids: bool = False,
        devices: int = 1,
        sizes: list[float] | None = None,
    ) -> None:
        self.world = world
        #: Each GPU's total (``sizes``: GPUs of different sizes), else ``devices`` x ``total_mb``.
        self.sizes = sizes or [total_mb] * devices
        self.devices = len(self.sizes)
        self.host_pids = host_pids
        self.total_mb = total_mb
        self.extra_mb = extra_mb
        self.name = name
        self.release_lag = release_lag

    def used_mb(self, device: int | None = None) -> float:
        """MiB in use now, on every GPU or on ``device``; this read starts the lag of releases
        no one had seen yet. A fake split over several GPUs holds an even share on each."""
        world = self.world
        lag = world.release_lag if self.release_lag is None else self.release_lag
        now = time.monotonic()

        def on(devices: tuple[int, ...]) -> float:
            if device is None:
                return 1.0
            return 1.0 / len(devices) if device in devices else 0.0

        with world.gpu_lock:
            for release in world.releasing:
                if release[1] is None:
                    release[1] = now
            world.releasing = [r for r in world.releasing if now - r[1] < lag]
            held = sum(mb * on(world.placed.get(m, (0,))) for m, mb in world.held.items())
            releasing = sum(r[0] * on(r[2]) for r in world.releasing)
            extra = self.extra_mb * (self.devices if device is None else 1)
            return extra + held + releasing

    def gpus(self) -> list[GpuStats]:
        """Each GPU's memory (``extra_mb`` is on each)."""
        stats = []
        for index in range(self.devices):
            used = self.used_mb(index)
            name = self.name if index == 0 else f"{self.name} #{index}"
            total = self.sizes[index]
            free = max(0.0, total - used)
            stats.append(GpuStats(index, name, total, used, free, f"GPU-fake-{index}"))
        return stats

    def totals_mb(self) -> tuple[float, float, float]:
        """Total, used and free MiB over every GPU."""
        gpus = self.gpus()
        return (
            sum(g.total_mb for g in gpus),
            sum(g.used_mb for g in gpus),
            sum(g.free_mb for g in gpus),
        )

    def process_memory_mb(self, pid: int) -> float | None:
        """What the fake started as ``pid`` holds (0 once it is gone, or for a stranger; None
        with ``host_pids``)."""
        if self.host_pids:
            return None
        model_id = self.world.pids.get(pid)
        with self.world.gpu_lock:
            return self.world.held.get(model_id, 0.0) if model_id else 0.0


def fake_backend_class(world: FakeWorld) -> type[Backend]:
    """A Backend subclass bound to ``world``."""

    class FakeBackend(Backend):
        """Pretends to run a model; its behaviour comes from the world's queue."""

        name = "fake"
        entry_type = FakeModel

        @property
        def spec(self) -> FakeModel:
            assert isinstance(self.entry, FakeModel)
            return self.entry

        @property
        def can_sleep(self) -> bool:  # type: ignore[override]
            return self.spec.sleepy

        @property
        def splits(self) -> bool:  # type: ignore[override]
            return self.spec.reserve_share is None

        @classmethod
        def uses_local_gpu(cls, entry: ModelEntry) -> bool:
            return not (isinstance(entry, FakeModel) and entry.remote)

        def gpu_count(self) -> int | None:
            return self.spec.declares_gpus

        def size_hint_mb(self) -> float | None:
            return self.spec.file_mb

        def estimate_vram_mb(self, total_mb: float | None) -> float | None:
            share = self.spec.reserve_share
            return None if share is None or total_mb is None else share * total_mb

        @property
        def sleep_residual_mb(self) -> float:  # type: ignore[override]
            return self.spec.sleep_mb

        def actual_mb(self) -> float:
            spec = self.spec
            if spec.actual_mb is not None:
                return spec.actual_mb
            return spec.vram_mb or spec.file_mb or 0.0

        async def sleep(self, handle: BackendHandle) -> None:
            """Free all but the residual; the fake stays alive."""
            world.events.append(("sleep", self.model_id))
            world.asleep.add(self.model_id)
            world.hold(self.model_id, self.spec.sleep_mb)

        async def wake(self, handle: BackendHandle) -> None:
            """Take the full size again."""
            world.events.append(("wake", self.model_id))
            world.asleep.discard(self.model_id)
            world.max_awake = max(world.max_awake, len(world.alive - world.asleep))
            world.hold(self.model_id, self.actual_mb())

        async def start(self) -> BackendHandle:
            """Start, or fail to, as the queued behaviour says."""
            queue = world.behaviours[self.model_id]
            self.behaviour = queue.popleft() if queue else Behaviour.READY
            world.events.append(("start", self.model_id))
            if self.behaviour is Behaviour.FAIL_START:
                raise RuntimeError("fake start failed")
            assert self.model_id not in world.alive
            world.alive.add(self.model_id)
            world.max_alive = max(world.max_alive, len(world.alive))
            world.max_awake = max(world.max_awake, len(world.alive - world.asleep))
            world.exits[self.model_id] = asyncio.get_running_loop().create_future()
            if self.behaviour is Behaviour.EXIT_DURING_LOAD:
                world.crash(self.model_id)
            pid = world.pid()
            world.pids[pid] = self.model_id
            world.placed[self.model_id] = tuple(self.gpus) if self.gpus else (0,)
            visible = self.gpu_environment().get("CUDA_VISIBLE_DEVICES")
            world.visible[self.model_id] = visible
            own = self.entry.env.get("CUDA_VISIBLE_DEVICES", visible)
            # As CUDA: a process told to see no device (-1, empty) holds nothing on any.
            no_device = self.gpus == [] or (own is not None and own.strip() in ("", "-1"))
            world.hold(self.model_id, 0.0 if no_device else self.actual_mb())
            return BackendHandle(base_url=f"http://{self.model_id}.fake.test", pid=pid)

        async def ready(self, handle: BackendHandle) -> bool:
            """Ready per behaviour; a frozen fake never answers."""
            if self.model_id in world.frozen:
                await asyncio.Event().wait()
            if self.behaviour is Behaviour.GATED:
                return world.gates[self.model_id].is_set()
            return self.behaviour is Behaviour.READY

        async def stop(self, handle: BackendHandle) -> None:
            """Stop and record it."""
            world.events.append(("stop", self.model_id))
            world.gone(self.model_id, "stopped")

        async def kill(self, handle: BackendHandle) -> None:
            """Kill without grace and record it."""
            world.events.append(("kill", self.model_id))
            world.frozen.discard(self.model_id)
            world.gone(self.model_id, "killed")

        async def alive(self, handle: BackendHandle) -> bool:
            """Alive until stopped or crashed."""
            return self.model_id in world.alive

        async def wait_exit(self, handle: BackendHandle) -> str:
            """Wait for a crash or a stop."""
            return await asyncio.shield(world.exits[self.model_id])

    return FakeBackend


class FakePlugin:
    """A pluggy plugin registering the fake backend, as a third-party package would."""

    def __init__(self, world: FakeWorld) -> None:
        self.backend = fake_backend_class(world)

    @hookimpl
    def register_backends(self, register: Callable[[type[Backend]], None]) -> None:
        """Provide the ``fake`` backend."""
        register(self.backend)


async def until(
    coordinator: SwapCoordinator, predicate: Callable[[], bool], what: str, timeout: float = 30.0
) -> None:
    """Return once ``predicate()`` holds, checking after each of the coordinator's events
    (status, swap, load, unload, queue); fail after ``timeout`` seconds."""
    with coordinator.events.subscribe() as events:  # subscribed: queue changes are sent too
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    await events.get()
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


def queued(coordinator: SwapCoordinator, model_id: str) -> int:
    """How many requests wait for ``model_id``."""
    return int(coordinator.status().models[model_id].queued)


async def finished(coordinator: SwapCoordinator, name: str) -> None:
    """Await the coordinator's background tasks called ``name`` (``probe:a``, ``measure:a``)."""
    await asyncio.gather(*(t for t in coordinator.background_tasks() if t.get_name() == name))
