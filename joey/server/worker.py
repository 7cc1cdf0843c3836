"""The thread that decodes: it owns the ``ContinuousBatch`` and hands each step's events to the
requests waiting for them on the server's event loop.

PyTorch's kernels release the GIL, so decoding in one thread leaves the event loop free to accept,
validate and stream requests. Requests and cancellations reach the worker through an inbox it
drains between steps, which is why a cancellation takes effect within one step. Admission is
bounded: at most ``max_batch`` rows decode and ``max_queue`` more wait; past that ``submit``
refuses at once (the server answers 429) instead of queueing without end.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field

from joey.config import SamplingParams
from joey.continuous import ContinuousBatch
from joey.request import StreamEvent
from joey.server.metrics import ServerMetrics


class Overloaded(Exception):
    """The batch and the queue are full."""


@dataclass
class Handle:
    """One request's end of the pipe: its events arrive on ``events`` in the event loop's thread."""

    key: int
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None


class BatchWorker:
    """Runs ``batch.step()`` in a thread for as long as there is work; sleeps when there is none."""

    def __init__(self, batch: ContinuousBatch, max_queue: int, metrics: ServerMetrics) -> None:
        if batch.max_batch is None:
            raise ValueError("the server's batch needs a max_batch")
        self.batch = batch
        self.capacity = batch.max_batch + max_queue
        self.metrics = metrics
        self._handles: dict[int, Handle] = {}  # requests not yet finished (added, waiting or running)
        self._inbox: list[tuple[str, int, list[int] | None, SamplingParams | None]] = []
        self._wake = threading.Condition()
        self._keys = itertools.count()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="joey-decode", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        """Whether the decoding thread runs (a replica whose thread died must be replaced)."""
        return self._thread.is_alive()

    @property
    def in_flight(self) -> int:
        return len(self._handles)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Handle:
        """Queue a request (call from the event loop). Raises ``Overloaded`` when batch and queue are full."""
        with self._wake:
            if len(self._handles) >= self.capacity:
                raise Overloaded
            handle = Handle(next(self._keys), asyncio.Queue(), asyncio.get_running_loop())
            self._handles[handle.key] = handle
            self._inbox.append(("add", handle.key, prompt_ids, params))
            self._wake.notify()
        return handle

    def cancel(self, key: int) -> None:
        """Stop a request at the next step (a client went away); harmless once it has finished."""
        with self._wake:
            if key in self._handles:
                self._inbox.append(("cancel", key, None, None))
                self._wake.notify()

    def _run(self) -> None:
        batch = self.batch
        while True:
            with self._wake:
                while not self._inbox and not batch.busy and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                inbox, self._inbox = self._inbox, []
            events: list[StreamEvent] = []
            for kind, key, ids, params in inbox:
                if kind == "cancel":
                    batch.cancel(key)
                    continue
                try:
                    batch.add(ids, params, key=key)
                except Exception as exc:  # validated already; if it still fails, only this request does
                    events.append(StreamEvent(key, "", (), None, exc))
            try:
                events += batch.step()
            except Exception as exc:  # step() isolates rows itself; this is the net under it
                events += batch.abort(exc)
            self.metrics.set_load(len(batch.active), len(batch.waiting))
            now = time.perf_counter()
            for event in events:
                self._deliver(event, now)

    def _deliver(self, event: StreamEvent, now: float) -> None:
        handle = self._handles.get(event.row)
        if handle is None:
            return
        self.metrics.observe(event, handle.arrived, handle.last_token_at, now)
        if event.token_ids:
            handle.last_token_at = now
        if event.last:
            with self._wake:
                del self._handles[event.row]
        try:
            handle.loop.call_soon_threadsafe(handle.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            pass
