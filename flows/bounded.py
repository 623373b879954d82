"""Running many task submissions with a bound on how many are in flight."""

import queue
from collections.abc import Callable, Iterable
from typing import Any


def run_bounded(
    items: Iterable[Any],
    submit: Callable[[Any], Any],
    limit: int,
    on_result: Callable[[Any, Any], None],
    on_error: Callable[[Any, Exception], None] | None = None,
) -> None:
    """Submit `submit(item)` for each item, keeping at most `limit` unfinished.

    `on_result(item, result)` is called in this thread as each finishes. After the
    first failure nothing new is submitted; the ones in flight are waited for (so
    no write is still running when the caller reports), then the failure is raised.
    With `on_error`, a failure is handed to `on_error(item, error)` instead and
    the remaining items still run.

    Bounding here rather than in the task runner works the same on threads and on
    Dask, and with a runner fixed at deployment time.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, found {limit}")
    finished: queue.SimpleQueue = queue.SimpleQueue()
    remaining = iter(items)
    in_flight = 0
    first_error: BaseException | None = None

    def submit_next() -> bool:
        nonlocal in_flight
        item = next(remaining, _END)
        if item is _END:
            return False
        future = submit(item)
        future.add_done_callback(lambda done: finished.put((item, done)))
        in_flight += 1
        return True

    for _ in range(limit):
        if not submit_next():
            break

    while in_flight:
        item, future = finished.get()
        in_flight -= 1
        try:
            result = future.result()
        except Exception as error:
            if on_error is not None:
                on_error(item, error)
                submit_next()
            elif first_error is None:
                first_error = error
            continue
        on_result(item, result)
        if first_error is None:
            submit_next()

    if first_error is not None:
        raise first_error


_END = object()
