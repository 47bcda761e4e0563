"""The loader's background machinery (internal): tasks of pipeline stages on worker threads, commits
handed to the next claim, and the lease heartbeat. :mod:`pr_loader.dataloader` composes them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from pr_loader.errors import LeaseLost, StepStateError

if TYPE_CHECKING:
    from pr_loader.dataset import RedisBatchDataset

__all__ = ["Background", "DeferredCommit", "Heartbeat", "no_op"]

logger = logging.getLogger(__name__)


def no_op() -> None:
    """A task that does nothing: run last on a one-thread pool, it marks that every earlier task is done."""


class Heartbeat:
    """Renews the leases of this consumer's in-flight steps until stopped."""

    def __init__(self, source: RedisBatchDataset, threaded: bool) -> None:
        self.source = source
        self.stopped = threading.Event()
        if threaded:  # an in-process store has no other process that could take a lease over
            threading.Thread(target=self._run, name="pr_loader-heartbeat", daemon=True).start()

    def _run(self) -> None:
        interval = self.source.lease_seconds / 3
        while not self.stopped.wait(interval):
            try:
                store = self.source.shard().store
                for step in self.source.inflight_mine():
                    store.renew(step, self.source.consumer_id, self.source.lease_seconds)
            except LeaseLost as exc:
                logger.warning("heartbeat: %s", exc)
            except StepStateError as exc:  # committed between listing and renewing it: nothing to keep
                logger.debug("heartbeat: %s", exc)
            except Exception:  # the loop must survive a passing Redis outage; the next beat retries
                logger.exception("heartbeat of consumer %s failed", self.source.consumer_id)

    def stop(self) -> None:
        self.stopped.set()


class Background:
    """One background task at a time of one pipeline stage; stages share the worker thread of ``pool`` (their
    tasks run in submission order). Runs tasks inline when ``pool`` is None (the in-process fakeredis store
    is not safe for concurrent scripts)."""

    def __init__(self, pool: ThreadPoolExecutor | None) -> None:
        self.pool = pool
        self.future: Future[Any] | None = None

    def start(self, fn: Callable[..., Any], *args: Any) -> None:
        if self.pool is not None:
            self.future = self.pool.submit(fn, *args)
            return
        self.future = Future()
        try:
            self.future.set_result(fn(*args))
        except BaseException as exc:  # handed to wait(), like the pool does
            self.future.set_exception(exc)

    def adopt(self, future: Future[Any]) -> None:
        """Let :meth:`wait` wait for ``future``, a task that is completed elsewhere."""
        self.future = future

    def wait(self) -> Any:
        future, self.future = self.future, None
        return None if future is None else future.result()


class DeferredCommit:
    """A commit the claim ahead sends once its payloads are read, unless someone needs it sent sooner
    (``state_dict()``, ``close()``): sent once, by whoever asks first."""

    def __init__(self, send: Callable[[], None]) -> None:
        self._send: Callable[[], None] | None = send
        self._lock = threading.Lock()

    def send(self) -> None:
        with self._lock:
            send, self._send = self._send, None
        if send is not None:
            send()
