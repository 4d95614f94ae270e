"""A process pool with a hard per-item timeout.

`concurrent.futures.ProcessPoolExecutor` cannot stop one stuck call (sympy
can spin in C for minutes), and thread pools break libraries that rely on
`signal.alarm` (math-verify). Here each item runs in the main thread of a
worker process; a worker past its deadline is SIGKILLed and replaced, and the
item scores a "timeout" instead of stalling the batch. A worker that dies
scores a "crash".

Workers come from the 'forkserver' context by default (a fresh interpreter
that never shares the JAX process's memory; replacing a killed worker is a
cheap fork of the server, with `preload` modules already imported), or from
'spawn'. Never 'fork': forking a process with JAX threads can deadlock.
"""

import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Outcome:
  """cause: "ok" (value holds the result), "error" (fn raised; detail holds
  the exception), "timeout" or "crash" (the worker was killed / died)."""

  cause: str
  value: Any = None
  detail: str = ""

  @property
  def ok(self) -> bool:
    return self.cause == "ok"


def _worker_main(conn, fn) -> None:
  while True:
    try:
      msg = conn.recv()
    except (EOFError, OSError):
      return
    if msg is None:
      return
    idx, arg = msg
    try:
      out = ("ok", fn(arg), "")
    except Exception as e:  # noqa: BLE001 (reported to the caller)
      out = ("error", None, f"{type(e).__name__}: {e}"[:2000])
    try:
      conn.send((idx, out))
    except Exception as e:  # noqa: BLE001 (e.g. an unpicklable result)
      conn.send((idx, ("error", None, f"unsendable result: {e}")))


class _Worker:
  def __init__(self, ctx, fn):
    self.conn, child = ctx.Pipe()
    self.proc = ctx.Process(target=_worker_main, args=(child, fn), daemon=True)
    self.proc.start()
    child.close()
    self.idx = -1  # item in flight
    self.deadline = 0.0

  def kill(self) -> None:
    try:
      self.proc.kill()
    except (OSError, ValueError):
      pass
    self.proc.join(timeout=5)
    self.conn.close()


class WorkerPool:
  """Runs a picklable, module-level `fn(arg)` over items in worker processes.

  `map` is blocking and serialized by a lock (one batch at a time); call it
  from a thread to overlap with other work.
  """

  def __init__(
    self,
    fn: Callable[[Any], Any],
    num_workers: int | None = None,
    *,
    context: str = "forkserver",
    preload: Sequence[str] = (),
  ):
    if context == "fork":
      raise ValueError("WorkerPool: never fork the (JAX) parent process")
    self.fn = fn
    self.num_workers = num_workers or max(1, os.cpu_count() or 1)
    self.ctx = multiprocessing.get_context(context)
    if context == "forkserver" and preload:
      self.ctx.set_forkserver_preload(list(preload))
    self._workers: list[_Worker] = []
    self._lock = threading.Lock()
    self.restarts = 0

  def _ensure(self, n: int) -> None:
    while len(self._workers) < n:
      self._workers.append(_Worker(self.ctx, self.fn))

  def map(self, args: Sequence[Any], timeout_s: float) -> list[Outcome]:
    """One `Outcome` per arg, in order; each item gets `timeout_s` seconds
    from the moment its worker starts on it."""
    outcomes: list[Outcome | None] = [None] * len(args)
    if not args:
      return []
    with self._lock:
      self._ensure(min(self.num_workers, len(args)))
      pending = list(range(len(args)))[::-1]
      busy: dict[Any, _Worker] = {}
      idle = list(self._workers)

      def start(w: _Worker, i: int) -> None:
        try:
          w.conn.send((i, args[i]))
        except (OSError, ValueError) as e:  # broken pipe: a dead worker
          outcomes[i] = Outcome("crash", detail=f"cannot send item: {e}")
          replace(w)
          return
        except Exception as e:  # noqa: BLE001 (unpicklable: nothing sent)
          outcomes[i] = Outcome("error", detail=f"cannot send item: {e}")
          idle.append(w)
          return
        w.idx, w.deadline = i, time.monotonic() + timeout_s
        busy[w.conn] = w

      def replace(w: _Worker) -> None:
        w.kill()
        self._workers.remove(w)
        self.restarts += 1
        nw = _Worker(self.ctx, self.fn)
        self._workers.append(nw)
        idle.append(nw)

      while pending or busy:
        while pending and idle:
          start(idle.pop(), pending.pop())
        if not busy:
          continue
        left = min(w.deadline for w in busy.values()) - time.monotonic()
        ready = multiprocessing.connection.wait(list(busy), max(0.0, left))
        for conn in ready:
          w = busy.pop(conn)
          try:
            idx, (cause, value, detail) = conn.recv()
          except (EOFError, OSError):
            outcomes[w.idx] = Outcome("crash", detail="worker died")
            replace(w)
            continue
          outcomes[idx] = Outcome(cause, value, detail)
          idle.append(w)
        now = time.monotonic()
        for conn, w in list(busy.items()):
          if w.deadline <= now:
            del busy[conn]
            outcomes[w.idx] = Outcome("timeout", detail=f"> {timeout_s}s")
            replace(w)
    return outcomes  # type: ignore[return-value]

  def close(self) -> None:
    with self._lock:
      for w in self._workers:
        try:
          w.conn.send(None)
        except (OSError, ValueError):
          pass
      for w in self._workers:
        w.proc.join(timeout=2)
        if w.proc.is_alive():
          w.kill()
        else:
          w.conn.close()
      self._workers = []

  def __enter__(self) -> "WorkerPool":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
