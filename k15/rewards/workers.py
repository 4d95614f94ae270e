"""A process pool with a hard per-item timeout.

`concurrent.futures.ProcessPoolExecutor` cannot stop one stuck call (sympy
can spin in C for minutes), and thread pools break libraries that rely on
`signal.alarm` (math-verify). Here each item runs in the main thread of a
worker process; a worker past its deadline is SIGKILLed and replaced, and the
item scores a "timeout" instead of stalling the batch. A worker that dies
scores a "crash".

Workers are fresh interpreters (`python -m k15.rewards.workers`, the
equivalent of multiprocessing's 'spawn'), started with plain `subprocess`:
the JAX process is never forked, and unlike multiprocessing nothing
re-imports the parent's `__main__` (which for `python -m k15.main` would
load JAX into every worker). Items and results travel pickled over pipes
(`multiprocessing.connection.Connection`). A worker kills itself when its
parent dies (PR_SET_PDEATHSIG, set in the worker).
"""

import ctypes
import dataclasses
import importlib
import multiprocessing.connection
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

Connection = multiprocessing.connection.Connection


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


def _serve(inbox: Connection, outbox: Connection, parent: int) -> None:
  """Worker loop: the first message is (fn, preload); then (idx, arg)."""
  try:  # die with the parent even while stuck in C code
    libc = ctypes.CDLL(None)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass
  if os.getppid() != parent:
    return
  fn, preload = inbox.recv()
  for name in preload:
    importlib.import_module(name)
  outbox.send("ready")
  while True:
    try:
      msg = inbox.recv()
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
      outbox.send((idx, out))
    except Exception as e:  # noqa: BLE001 (e.g. an unpicklable result)
      outbox.send((idx, ("error", None, f"unsendable result: {e}")))


class _Worker:
  def __init__(self, fn, preload):
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    self.proc = subprocess.Popen(
      [
        sys.executable,
        "-m",
        "k15.rewards.workers",
        str(to_child_r),
        str(to_parent_w),
        str(os.getpid()),
      ],
      pass_fds=(to_child_r, to_parent_w),
      stdin=subprocess.DEVNULL,
      env=env,
    )
    os.close(to_child_r)
    os.close(to_parent_w)
    self.send = Connection(to_child_w, readable=False)
    self.conn = Connection(to_parent_r, writable=False)
    self.send.send((fn, tuple(preload)))
    self.ready = False
    self.idx = -1  # item in flight
    self.deadline = 0.0

  def kill(self) -> None:
    try:
      self.proc.kill()
    except OSError:
      pass
    self.proc.wait()
    self.send.close()
    self.conn.close()


class WorkerPool:
  """Runs a picklable, module-level `fn(arg)` over items in worker processes.

  `map` is blocking and serialized by a lock (one batch at a time); call it
  from a thread to overlap with other work. `preload`: modules the workers
  import before their first item (start-up is not charged to an item's
  timeout).
  """

  def __init__(
    self,
    fn: Callable[[Any], Any],
    num_workers: int | None = None,
    *,
    preload: Sequence[str] = (),
    start_timeout_s: float = 120.0,
  ):
    pickle.dumps(fn)  # fail here, not in a worker
    self.fn = fn
    self.num_workers = num_workers or max(1, os.cpu_count() or 1)
    self.preload = tuple(preload)
    self.start_timeout_s = start_timeout_s
    self._workers: list[_Worker] = []
    self._lock = threading.Lock()
    self.restarts = 0

  def _ensure(self, n: int) -> None:
    while len(self._workers) < n:
      self._workers.append(_Worker(self.fn, self.preload))

  def map(self, args: Sequence[Any], timeout_s: float) -> list[Outcome]:
    """One `Outcome` per arg, in order; each item gets `timeout_s` seconds
    from the moment its worker starts on it (worker start-up, e.g. after a
    replacement, is not charged to any item)."""
    outcomes: list[Outcome | None] = [None] * len(args)
    if not args:
      return []
    with self._lock:
      self._ensure(min(self.num_workers, len(args)))
      pending = list(range(len(args)))[::-1]
      idle = [w for w in self._workers if w.ready]
      starting = {w.conn: w for w in self._workers if not w.ready}
      for w in starting.values():
        w.deadline = time.monotonic() + self.start_timeout_s
      busy: dict[Any, _Worker] = {}

      def replace(w: _Worker) -> None:
        w.kill()
        self._workers.remove(w)
        self.restarts += 1
        nw = _Worker(self.fn, self.preload)
        nw.deadline = time.monotonic() + self.start_timeout_s
        self._workers.append(nw)
        starting[nw.conn] = nw

      def start(w: _Worker, i: int) -> None:
        try:
          w.send.send((i, args[i]))
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

      while pending or busy:
        while pending and idle:
          start(idle.pop(), pending.pop())
        waiting = {**busy, **starting}
        left = min(w.deadline for w in waiting.values()) - time.monotonic()
        ready = multiprocessing.connection.wait(list(waiting), max(0.0, left))
        for conn in ready:
          if conn in starting:
            w = starting.pop(conn)
            try:
              msg = conn.recv()
            except (EOFError, OSError):
              msg = None
            if msg != "ready":
              w.kill()
              self._workers.remove(w)
              raise RuntimeError(
                f"WorkerPool: a worker died at start-up (exit code "
                f"{w.proc.returncode}); see its stderr above"
              )
            w.ready = True
            idle.append(w)
            continue
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
          if w.deadline <= now and not conn.poll(0):
            del busy[conn]
            outcomes[w.idx] = Outcome("timeout", detail=f"> {timeout_s}s")
            replace(w)
        for w in starting.values():
          if w.deadline <= now:
            raise RuntimeError(
              f"WorkerPool: a worker did not start in {self.start_timeout_s}s"
            )
    return outcomes  # type: ignore[return-value]

  def close(self) -> None:
    with self._lock:
      for w in self._workers:
        try:
          w.send.send(None)
        except (OSError, ValueError):
          pass
      for w in self._workers:
        try:
          w.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
          pass
        w.kill()
      self._workers = []

  def __del__(self):
    try:
      for w in self._workers:
        w.proc.kill()
    except Exception:  # noqa: BLE001 (interpreter shutdown)
      pass

  def __enter__(self) -> "WorkerPool":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


if __name__ == "__main__":
  _serve(
    Connection(int(sys.argv[1]), writable=False),
    Connection(int(sys.argv[2]), readable=False),
    int(sys.argv[3]),
  )
