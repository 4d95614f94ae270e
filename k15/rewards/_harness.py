"""Runs inside the sandbox: tighten seccomp, run untrusted code, report tests.

Executed by the sandbox's own interpreter (`/usr/bin/python3 -I -S`), so it
imports only the standard library and nothing from k15.

Protocol (file descriptor numbers come on argv; nothing secret is in argv or
in the environment):
  JOB   (memfd, read):  marshal {program, mode, tests, entry_point, bpf,
                        test_timeout_s}; read whole and closed first.
  RES   (pipe, write):  one record per line, free text hex-encoded. Before
                        the tests only untagged records: "error <kind>
                        <hex>" (top level failed) and "ready" (top level
                        finished). After "ready" the parent writes a fresh
                        random nonce to NONCE, and only "<nonce> test <i>
                        <status> <hex detail> <output>" (output: "-", "j:"
                        + JSON of the value, or "s:" + hex of stdout) and
                        "<nonce> done" count.
  NONCE (pipe, read):   one line, written by the parent only after "ready".

Why: untrusted code runs before any nonce exists, so `os._exit(0)`,
`sys.exit(0)` or printed fake verdicts before the tests can never produce a
tagged pass; a missing "done" is a failure. Untagged records can only make a
run fail. The program could still emulate this protocol or dig the nonce out
of this process's memory while a test calls into it; in "call" and "stdio"
modes that gains nothing, because the expected outputs never enter the
sandbox and are compared by the parent.

Start-up is paid on every execution, so: marshal rather than json (which
pulls in `re` and `enum`; only "call" tests import it), `_signal` rather
than `signal`.
"""

import _signal
import builtins
import ctypes
import io
import marshal
import os
import sys

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_MAX_OUTPUT_CHARS = 1 << 20


class _SockFprog(ctypes.Structure):
  _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _TestTimeout(BaseException):
  """Raised by SIGALRM; a BaseException so `except Exception` cannot eat it."""


def _install_filter(bpf: bytes) -> None:
  """Adds the in-harness seccomp layer (no execve from here on)."""
  if not bpf:
    return
  libc = ctypes.CDLL(None, use_errno=True)
  buf = ctypes.create_string_buffer(bpf, len(bpf))
  prog = _SockFprog(len(bpf) // 8, ctypes.addressof(buf))
  if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl(NO_NEW_PRIVS) failed")
  rc = libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog))
  if rc != 0:
    raise OSError(ctypes.get_errno(), "prctl(SECCOMP) failed")


def json_default(obj):
  """How values that JSON lacks leave the sandbox (the parent applies the
  same to expected values)."""
  if isinstance(obj, (set, frozenset)):
    try:
      return sorted(obj)
    except TypeError:
      return {"__repr__": repr(obj)}
  return {"__repr__": repr(obj)}


def _num_threads() -> int:
  """Threads of this process; joined threads may linger in the kernel for a
  moment after `join()` returns, so wait up to 0.2 s for them to go."""
  import time

  for _ in range(200):
    try:
      n = len(os.listdir("/proc/self/task"))
    except OSError:
      return 1
    if n == 1:
      return 1
    time.sleep(0.001)
  return n


def _hex(text: str) -> str:
  return text.encode("utf-8", "replace").hex() or "-"


def main(argv: list[str]) -> None:
  job_fd, res_fd, nonce_fd = (int(a) for a in argv[1:4])
  with os.fdopen(job_fd, "rb") as f:
    job = marshal.loads(f.read())
  _install_filter(job.get("bpf", b""))
  dumps = None
  if job["mode"] == "call":
    import json

    dumps = json.dumps

  # Bind everything the test loop needs before untrusted code can patch
  # builtins or modules.
  write, read, close = os.write, os.read, os.close
  exc_name = lambda e: type(e).__name__
  _exec, _compile, _repr, _len, _str = exec, compile, repr, len, str
  _isinstance, _range, _enumerate = isinstance, range, enumerate
  setitimer, itimer_real = _signal.setitimer, _signal.ITIMER_REAL
  bytes_io, text_wrapper = io.BytesIO, io.TextIOWrapper
  _sys, real_stdin, real_stdout = sys, sys.stdin, sys.stdout
  timeout_exc, memory_exc, exit_exc = _TestTimeout, MemoryError, SystemExit
  assertion_exc = AssertionError
  num_threads, default, hexa = _num_threads, json_default, _hex
  max_chars = _MAX_OUTPUT_CHARS

  def emit(line: str) -> None:
    data = (line + "\n").encode("utf-8", "replace")
    while data:
      n = write(res_fd, data)
      data = data[n:]

  def on_alarm(signum, frame):
    raise timeout_exc()

  _signal.signal(_signal.SIGALRM, on_alarm)
  test_timeout = float(job.get("test_timeout_s") or 0)

  def arm() -> None:
    if test_timeout > 0:
      setitimer(itimer_real, test_timeout)

  def disarm() -> None:
    setitimer(itimer_real, 0)

  def status_of(e: BaseException) -> str:
    if _isinstance(e, timeout_exc):
      return "timeout"
    if _isinstance(e, memory_exc):
      return "memory"
    if _isinstance(e, assertion_exc):
      return "fail"
    return "error"

  mode = job["mode"]
  tests = job.get("tests", [])
  try:
    code = _compile(job["program"], "<program>", "exec")
  except BaseException as e:  # SyntaxError, MemoryError, ...
    emit(f"error error {hexa(f'{exc_name(e)}: {e}')}")
    return

  ns: dict = {"__name__": "__solution__", "__builtins__": builtins}
  if mode != "stdio":
    try:
      arm()
      _exec(code, ns)
      disarm()
    except exit_exc as e:
      disarm()
      emit(f"error exit {hexa(f'SystemExit({e})')}")
      return
    except BaseException as e:
      disarm()
      kind = status_of(e)
      kind = "error" if kind == "fail" else kind
      emit(f"error {kind} {hexa(f'{exc_name(e)}: {e}')}")
      return
    if num_threads() > 1:
      emit(f"error error {hexa('threads left running')}")
      return

  emit("ready")
  nonce = read(nonce_fd, 256).decode().strip()
  close(nonce_fd)
  if not nonce:
    return

  for i, test in _enumerate(tests):
    status, detail, output = "ok", "", None
    try:
      if mode == "assert":
        arm()
        _exec(_compile(test, f"<test {i}>", "exec"), ns)
        disarm()
      elif mode == "call":
        fn = ns[job["entry_point"]]
        arm()
        value = fn(*test)
        disarm()
        output = "j:" + dumps(value, default=default)
      elif mode == "stdio":
        stdin = text_wrapper(bytes_io(test.encode()), encoding="utf-8")
        out_buf = bytes_io()
        stdout = text_wrapper(out_buf, encoding="utf-8", write_through=True)
        _sys.stdin, _sys.stdout = stdin, stdout
        run_ns = {"__name__": "__main__", "__builtins__": builtins}
        try:
          arm()
          _exec(code, run_ns)
          disarm()
        except exit_exc as e:
          disarm()
          if e.code not in (None, 0):
            status, detail = "error", f"SystemExit({e.code})"
        finally:
          _sys.stdin, _sys.stdout = real_stdin, real_stdout
        stdout.flush()
        output = "s:" + (out_buf.getvalue().hex() or "-")
    except BaseException as e:
      disarm()
      status, detail, output = status_of(e), f"{exc_name(e)}: {e}", None
    if output is not None and _len(output) > max_chars:
      status, detail, output = "error", "output too large", None
    detail = hexa(_str(detail)[:2000])
    emit(f"{nonce} test {i} {status} {detail} {output or '-'}")
  emit(f"{nonce} done")


if __name__ == "__main__":
  main(sys.argv)
