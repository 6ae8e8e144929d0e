"""A Server-Sent Events reader for the tests: reads a stream in a thread and records
every frame (events, `id:`-only cursor lines, comments) with the time it arrived."""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Frame:
    at: float
    id: int | None = None
    event: str | None = None
    data: Any = None
    comment: str | None = None
    retry: int | None = None

    @property
    def is_event(self) -> bool:
        return self.data is not None


@dataclass
class SseReader:
    """Reads `url` until `close()`; `frames` fills as they arrive. `status` and `headers`
    are those of the answer; a non-200 answer's body is in `body`."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    status: int | None = None
    body: str = ""
    response_headers: dict[str, str] = field(default_factory=dict)
    frames: list[Frame] = field(default_factory=list)
    arrived: queue.Queue[Frame] = field(default_factory=queue.Queue)
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _started: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self, timeout: float = 10) -> SseReader:
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        assert self._started.wait(timeout), f"no answer from {self.url}"
        return self

    def _read(self) -> None:
        try:
            with httpx.Client(timeout=httpx.Timeout(10, read=None)) as http, http.stream(
                    "GET", self.url, headers=self.headers, params=self.params) as response:
                self.status = response.status_code
                self.response_headers = dict(response.headers)
                if response.status_code != 200:
                    self.body = response.read().decode()
                    self._started.set()
                    return
                self._started.set()
                block: list[str] = []
                for line in response.iter_lines():
                    if self._stop.is_set():
                        return
                    if line:
                        block.append(line)
                        continue
                    if block:
                        self._record(block)
                        block = []
        except BaseException as exc:  # the test closes the stream under the reader
            if not self._stop.is_set():
                self.error = exc
        finally:
            self._started.set()

    def _record(self, block: list[str]) -> None:
        frame = Frame(at=time.monotonic())
        for line in block:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "":
                frame.comment = value
            elif name == "id":
                frame.id = int(value)
            elif name == "event":
                frame.event = value
            elif name == "data":
                frame.data = json.loads(value)
            elif name == "retry":
                frame.retry = int(value)
        with self._lock:  # nothing is recorded once the test has "disconnected"
            if self._stop.is_set():
                return
            self.frames.append(frame)
            self.arrived.put(frame)

    def close(self) -> None:
        with self._lock:
            self._stop.set()

    # ---- what the tests read -------------------------------------------------------------
    def events(self) -> list[Frame]:
        return [f for f in self.frames if f.is_event]

    def last_id(self) -> int | None:
        """What an EventSource would send as Last-Event-ID: the last `id:` seen."""
        ids = [f.id for f in self.frames if f.id is not None]
        return ids[-1] if ids else None

    def wait_for(self, predicate: Any, timeout: float = 10) -> Frame:
        """The first frame (already arrived or arriving) that matches `predicate`."""
        for frame in list(self.frames):
            if predicate(frame):
                return frame
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no matching frame within {timeout} s: {self.frames[-5:]}"
            try:
                frame = self.arrived.get(timeout=left)
            except queue.Empty:
                continue
            if predicate(frame):
                return frame
