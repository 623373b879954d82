"""Progress of long flows: a Prefect progress artifact, and local listeners.

A listener is any callable taking a `Progress`; the command line registers one to
draw its progress bar. Listeners run in the flow's thread, in this process only.
"""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from prefect.artifacts import create_progress_artifact, update_progress_artifact


@dataclass(frozen=True)
class Progress:
    done_bytes: int
    total_bytes: int
    done_items: int
    total_items: int
    seconds: float


_listeners: list[Callable[[Progress], None]] = []
_listeners_lock = threading.Lock()


def add_listener(listener: Callable[[Progress], None]) -> None:
    with _listeners_lock:
        _listeners.append(listener)


def remove_listener(listener: Callable[[Progress], None]) -> None:
    with _listeners_lock:
        if listener in _listeners:
            _listeners.remove(listener)


class ProgressTracker:
    """Counts finished items and bytes, and reports them.

    The Prefect artifact is updated at most once per `artifact_interval` seconds
    (each update is a request to the server); local listeners on every step.
    """

    def __init__(
        self,
        total_bytes: int,
        total_items: int,
        description: str,
        artifact_interval: float = 2.0,
    ):
        self.total_bytes = total_bytes
        self.total_items = total_items
        self.done_bytes = 0
        self.done_items = 0
        self._description = description
        self._interval = artifact_interval
        self._started = time.perf_counter()
        self._artifact_id = create_progress_artifact(0.0, description=description)
        self._last_update = time.perf_counter()
        self._notify()

    def advance(self, items: int, size: int) -> None:
        self.done_items += items
        self.done_bytes += size
        now = time.perf_counter()
        if now - self._last_update >= self._interval:
            self._update_artifact()
            self._last_update = now
        self._notify()

    def finish(self) -> None:
        self._update_artifact()
        self._notify()

    def _percent(self) -> float:
        if self.total_bytes:
            return 100.0 * self.done_bytes / self.total_bytes
        if self.total_items:
            return 100.0 * self.done_items / self.total_items
        return 100.0

    def _update_artifact(self) -> None:
        update_progress_artifact(self._artifact_id, min(self._percent(), 100.0))

    def _notify(self) -> None:
        snapshot = Progress(
            self.done_bytes,
            self.total_bytes,
            self.done_items,
            self.total_items,
            time.perf_counter() - self._started,
        )
        with _listeners_lock:
            listeners = list(_listeners)
        for listener in listeners:
            listener(snapshot)
