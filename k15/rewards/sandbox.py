"""Isolated execution of untrusted Python programs against tests.

Layers, outermost first (each one alone should contain a hostile program):

1. `setpriv`: when we are root, drop to a fresh unprivileged uid/gid (random
   per run, so concurrent runs never share an RLIMIT_NPROC count or signal
   each other; with one fixed uid we once saw bwrap fail "Can't fork" under
   load, probably tasks of just-finished runs still being counted) with no
   supplementary groups; always: die with us (SIGKILL as parent-death
   signal).
2. `unshare --pid --fork`: a PID namespace per run, whose init is the outer
   bwrap. When that init dies the kernel kills and reaps everything in the
   namespace before `unshare` (our child) can reap the init and exit, so
   once `run()` has waited for its child no process of the run exists, not
   even a zombie, also when k15 is PID 1 and reaps nobody (bwrap alone
   orphans its inner init: it exits as soon as its child reports).
3. `prlimit`: address space, CPU seconds, processes, file size, open files.
4. `bwrap`: new user, mount, pid, net, ipc, uts and cgroup namespaces; a root
   that holds only read-only /usr (plus the host's /bin, /lib, /lib64
   symlinks), a fresh /proc of the sandbox's own pid namespace, a minimal
   /dev and a small tmpfs /tmp; cleared environment, new session, killed with
   its parent, no further user namespaces; then `--remount-ro /`.
5. seccomp (built here with `pyseccomp`, loaded by bwrap from a memfd): no
   sockets but AF_UNIX, no fork/vfork/clone of processes (threads are fine;
   in "judge" mode the harness may fork once, see `Job`), no ptrace, mount,
   unshare, setns, bpf, keyctl, io_uring, ... The harness adds a second
   filter forbidding execve and new processes before any program runs.
6. A wall-clock deadline that SIGKILLs the run's PID namespace (its init),
   and capped stdout/stderr (a run that prints more than the cap is
   killed).

Requirements (all Debian packages): `bubblewrap` (bwrap), `util-linux`
(setpriv, unshare, prlimit), `libseccomp2`, and the system `python3` under
/usr; PyPI `pyseccomp`. Running as root needs nothing else: `unshare` and
bwrap are then started by an unprivileged uid and create their user
namespaces themselves, so the kernel must allow unprivileged user
namespaces: `user.max_user_namespaces` > 0, on older Debian kernels
`kernel.unprivileged_userns_clone=1`, on Ubuntu 24.04+
`kernel.apparmor_restrict_unprivileged_userns=0`; inside Docker, a seccomp
profile that allows `unshare`/`clone` of namespaces (e.g. `--security-opt
seccomp=unconfined`). Our CI machines (Debian 12, root, kernel 6.x) need only
`apt-get install bubblewrap`. When bwrap is missing or cannot create its
namespaces, `check_available()` / `CodeReward()` raise `SandboxUnavailable`
and tests skip with the reason; there is no unsandboxed fallback.

The sandbox is spawned with plain `subprocess` (no `preexec_fn`), so it is
safe to call from threads of a process that has JAX loaded.
"""

import concurrent.futures
import dataclasses
import functools
import json
import marshal
import math
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from k15.rewards import isolation
from k15.rewards.isolation import HARNESS, SandboxUnavailable  # noqa: F401

CAUSES = (
  "ok",  # every test passed (or, without expectations, ran)
  "wrong_answer",  # a test failed: assertion or output mismatch
  "error",  # exception, syntax error, forbidden operation
  "timeout",  # wall clock, CPU seconds or per-test time limit
  "memory",  # MemoryError under the address-space limit
  "output_limit",  # printed more than the cap; killed
  "early_exit",  # exited (0 or not) before all tests reported
  "killed",  # died by a signal without reporting
  "sandbox_error",  # the sandbox itself failed to start
)


@dataclasses.dataclass(frozen=True)
class Limits:
  """Resource limits of one execution (all tests of one program)."""

  timeout_s: float = 10.0  # wall clock, whole run
  test_timeout_s: float = 0.0  # per test, 0: none (SIGALRM in the harness)
  cpu_s: int = 0  # RLIMIT_CPU; 0: ceil(timeout_s)
  memory_mb: int = 512  # RLIMIT_AS
  nproc: int = 64  # RLIMIT_NPROC (threads count; fork is blocked anyway)
  fsize_mb: int = 16  # RLIMIT_FSIZE
  nofile: int = 64  # RLIMIT_NOFILE
  tmpfs_mb: int = 64  # size of the sandbox's /tmp
  output_bytes: int = 1 << 20  # cap on stdout + stderr; more is killed
  result_bytes: int = 64 << 20  # cap on the result channel


@dataclasses.dataclass(frozen=True)
class TestResult:
  """One test. status: pass | fail | error | timeout | memory | not_run, or
  `ran` when no expected output was given (`output` then holds it)."""

  status: str
  detail: str = ""
  output: Any = None  # call mode: the returned value (JSON); stdio: stdout

  @property
  def passed(self) -> bool:
    return self.status == "pass"


@dataclasses.dataclass(frozen=True)
class ExecResult:
  """Outcome of one sandboxed run; `cause` is one of `CAUSES`."""

  cause: str
  tests: tuple[TestResult, ...]
  stdout: str
  stderr: str
  returncode: int | None
  wall_s: float
  detail: str = ""
  fakeable: bool = False  # "assert" mode: the program could forge a pass

  @property
  def passed(self) -> bool:
    return self.cause == "ok"

  @property
  def num_passed(self) -> int:
    return sum(t.passed for t in self.tests)


_MISSING = object()


MODES = ("none", "judge", "call", "stdio", "assert")
# Modes whose verdict the program cannot fake by reading the harness's state
# (frames, gc, fds, /proc/self): the expected outputs never enter the
# sandbox ("call", "stdio"), or the tests run in a process the program
# cannot reach ("judge"). "assert" runs tests inside the program's process:
# for evaluation only, its results are marked `fakeable`.
SAFE_MODES = ("judge", "call", "stdio")


@dataclasses.dataclass(frozen=True)
class Job:
  """A program and its tests.

  mode "judge": tests are code strings (HumanEval's `check(candidate)`,
    MBPP's `assert f(1) == 2`) run by the harness after `setup` (trusted
    code such as HumanEval's prompt, for its helper functions), in its own
    process; the program runs in a child process, and `entry_point` in the
    tests calls into it. Arguments and return values cross as plain data
    (None, bool, int, float, complex, str, bytes, list, tuple, dict, set);
    the tests see nothing else of the program. pass = no exception.
  mode "call": tests are argument lists for `entry_point`; the returned
    value is compared outside the sandbox with `expected[i]`.
  mode "stdio": tests are stdin strings; the program runs once per test as
    `__main__` and its stdout is compared (token-wise) with `expected[i]`.
  mode "assert": tests are code strings run after the program in its own
    namespace and process. The program can fake a pass (walk the frames to
    the harness's nonce and write records), so results are `fakeable`;
    never for training (see `k15.rewards.code`).
  mode "none": just run the program's top level.
  `expected` is None (or shorter than tests) to only collect outputs.
  """

  program: str
  mode: str = "none"
  tests: tuple = ()
  entry_point: str = ""
  expected: tuple | None = None
  setup: str = ""  # "judge" mode: trusted code run before the tests


@dataclasses.dataclass(frozen=True)
class Sandbox:
  """Runs `Job`s; thread-safe, every run is a fresh sandbox.

  python: the interpreter inside the sandbox; it must live under /usr (the
  only host tree bound in), so the system python, not a venv or pyenv one.
  """

  python: str = "/usr/bin/python3"
  limits: Limits = Limits()

  def command(
    self,
    limits: Limits,
    seccomp_fd: int,
    harness_fd: int,
    fds: Sequence[int],
  ) -> list[str]:
    tools = isolation.tools()
    cpu = limits.cpu_s or math.ceil(limits.timeout_s)
    mb = 1 << 20
    cmd = [tools["setpriv"], "--pdeathsig", "KILL", "--no-new-privs"]
    if os.geteuid() == 0:
      uid = 1_000_000 + secrets.randbelow(1 << 30)
      cmd += [f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    cmd += [
      tools["unshare"],
      "--map-current-user",  # a user namespace, to own the PID namespace
      "--pid",
      "--fork",
      "--kill-child",
      "--mount-proc",  # bwrap reads /proc/<its child's pid>
      tools["prlimit"],
      f"--as={limits.memory_mb * mb}",
      f"--cpu={cpu}:{cpu + 1}",
      f"--nproc={limits.nproc}",
      f"--fsize={limits.fsize_mb * mb}",
      f"--nofile={limits.nofile}",
      "--core=0",
    ]
    cmd += [
        tools["bwrap"],
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--setenv", "PATH", "/usr/bin:/bin",
        "--setenv", "HOME", "/tmp",
        "--setenv", "LANG", "C.UTF-8",
        "--setenv", "PYTHONIOENCODING", "utf-8",
        "--hostname", "sandbox",
        *isolation.root_binds(),
        "--proc", "/proc",
        "--dev", "/dev",
        "--remount-ro", "/dev",
        "--size", str(limits.tmpfs_mb * mb), "--tmpfs", "/tmp",
        # Copied in from a memfd: the package may sit where the sandbox
        # uid cannot read (e.g. under /root).
        "--ro-bind-data", str(harness_fd), "/harness.pyc",
        "--chdir", "/tmp",
        "--seccomp", str(seccomp_fd),
        "--remount-ro", "/",
        "--",
        self.python, "-I", "-S", "-B", "/harness.pyc",
        *(str(fd) for fd in fds),
    ]  # fmt: skip
    return cmd

  def run(self, job: Job, limits: Limits | None = None) -> ExecResult:
    """Runs one job to completion (or to its limits); never raises for
    anything the program does."""
    limits = limits or self.limits
    bpf = isolation.seccomp_filters()
    payload, judge_payload = _job_payload(job, bpf["harness"], limits)
    job_fd = isolation.memfd("job", payload)
    base = bpf["base_fork" if job.mode == "judge" else "base"]
    seccomp_fd = isolation.memfd("seccomp", base)
    harness_fd = isolation.memfd("harness", isolation.harness_pyc(self.python))
    res_r, res_w = os.pipe()
    nonce_r, nonce_w = os.pipe()
    child_fds = (job_fd, res_w, nonce_r)
    if judge_payload is not None:
      child_fds += (isolation.memfd("tests", judge_payload),)
    start = time.monotonic()
    try:
      proc = subprocess.Popen(
        self.command(limits, seccomp_fd, harness_fd, child_fds),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(*child_fds, seccomp_fd, harness_fd),
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        start_new_session=True,
      )
    except BaseException:
      os.close(res_r)
      os.close(nonce_w)
      raise
    finally:
      for fd in (*child_fds, seccomp_fd, harness_fd):
        os.close(fd)
    nonce = secrets.token_hex(16)
    try:
      io_out = isolation.communicate(proc, res_r, nonce_w, nonce, limits, start)
    finally:
      os.close(res_r)
      os.close(nonce_w)
    wall = time.monotonic() - start
    returncode = isolation.unshare_status(io_out, proc.returncode)
    return _verdict(job, nonce, io_out, returncode, wall, limits)

  def run_many(
    self,
    jobs: Iterable[Job],
    limits: Limits | None = None,
    workers: int | None = None,
  ) -> list[ExecResult]:
    """Runs jobs in parallel (threads waiting on sandboxed processes)."""
    jobs = list(jobs)
    if not jobs:
      return []
    if workers is None:
      workers = default_workers()
    if workers <= 1 or len(jobs) == 1:
      return [self.run(j, limits) for j in jobs]
    with concurrent.futures.ThreadPoolExecutor(min(workers, len(jobs))) as ex:
      return list(ex.map(lambda j: self.run(j, limits), jobs))


def default_workers() -> int:
  """Sandboxes in flight: about 3 per core keeps the cores busy while each
  run waits on process start-up and pipes (see `python -m k15.bench
  sandbox`)."""
  return 3 * (os.cpu_count() or 1)


def _job_payload(
  job: Job, bpf: bytes, limits: Limits
) -> tuple[bytes, bytes | None]:
  """(JOB, TESTS): in "judge" mode the tests and setup travel apart, so the
  program's process, forked before the judge reads them, never holds them."""
  if job.mode not in MODES:
    raise ValueError(f"sandbox: unknown job mode {job.mode!r}; {MODES}")
  if job.mode == "judge" and not job.entry_point:
    raise ValueError("sandbox: judge mode needs the entry_point to call")
  if job.mode == "call":
    tests = [list(t) for t in job.tests]
  else:
    tests = [str(t) for t in job.tests]
  payload = dict(
    program=job.program,
    mode=job.mode,
    tests=[] if job.mode == "judge" else tests,
    entry_point=job.entry_point,
    bpf=bpf,
    test_timeout_s=float(limits.test_timeout_s),
  )
  judge = None
  if job.mode == "judge":
    judge = marshal.dumps(dict(setup=str(job.setup), tests=tests))
  try:
    return marshal.dumps(payload), judge
  except ValueError as e:
    raise ValueError(
      f"sandbox: test arguments must be plain data (lists, dicts, str, "
      f"numbers, None): {e}"
    ) from e


def _verdict(job, nonce, io_out: isolation.IO, returncode, wall, limits
             ) -> ExecResult:
  """Turns the records of one run into per-test results and a cause."""
  top_error = None
  ready = False
  done = False
  results: dict[int, dict] = {}
  tag = nonce + " "
  for line in io_out.records:
    if not ready:
      if line == "ready":
        ready = True
      elif line.startswith("error ") and top_error is None:
        _, kind, detail = (line.split(" ", 2) + ["", ""])[:3]
        top_error = {"kind": kind, "detail": _unhex(detail)}
      continue
    if not line.startswith(tag):
      continue  # untagged after ready: printed by the program, ignored
    body = line[len(tag) :]
    if body == "done":
      done = True
    elif body.startswith("test "):
      parts = body.split(" ", 4)
      if len(parts) != 5 or not parts[1].isdigit():
        continue
      idx = int(parts[1])
      if idx < len(job.tests):
        rec = {"status": parts[2], "detail": _unhex(parts[3])}
        out = parts[4]
        if out.startswith("j:"):
          rec["output"] = _loads(out[2:])
        elif out.startswith("s:"):
          rec["output"] = _unhex(out[2:])
        results.setdefault(idx, rec)
  tests = []
  for i in range(len(job.tests)):
    rec = results.get(i)
    if rec is None:
      tests.append(TestResult("not_run"))
      continue
    tests.append(_test_result(job, i, rec))
  tests = tuple(tests)
  stdout = io_out.stdout.decode("utf-8", "replace")
  stderr = io_out.stderr.decode("utf-8", "replace")

  detail = ""
  if io_out.killed_for:
    cause = io_out.killed_for
    if cause == "timeout":
      detail = f"killed after the {limits.timeout_s}s wall-clock limit"
    else:
      detail = f"killed after more than {limits.output_bytes} bytes of output"
  elif top_error is not None:
    kind = top_error.get("kind", "error")
    cause = {"exit": "early_exit"}.get(kind, kind)
    if cause not in CAUSES or cause == "ok":  # a record can only fail a run
      cause = "error"
    detail = str(top_error.get("detail", ""))
  elif not ready and returncode not in (0, None) and _bwrap_failed(stderr):
    cause, detail = "sandbox_error", stderr[-2000:]
  elif not done or len(results) < len(job.tests):
    cause = _cause_of_death(returncode)
    detail = f"no complete report (returncode {returncode})"
  else:
    cause = "ok"
    for t in tests:
      if t.status in ("pass", "ran"):
        continue
      cause = {"fail": "wrong_answer"}.get(t.status, t.status)
      detail = t.detail
      break
  if cause == "ok" and returncode not in (0, None):
    cause, detail = _cause_of_death(returncode), f"returncode {returncode}"
  fakeable = job.mode == "assert"
  return ExecResult(
    cause, tests, stdout, stderr, returncode, wall, detail, fakeable
  )


def _bwrap_failed(stderr: str) -> bool:
  head = stderr[:200]
  return stderr.startswith("bwrap:") or any(
    f"{tool}:" in head for tool in ("prlimit", "setpriv", "unshare")
  )


def _cause_of_death(returncode) -> str:
  """bwrap exits 128+N when the program dies by signal N (or -N itself)."""
  if returncode is None:
    return "killed"
  sig = -returncode if returncode < 0 else returncode - 128
  if sig in (signal.SIGXCPU, signal.SIGKILL) and returncode != 0:
    # SIGKILL also comes from the CPU hard limit; both mean time ran out
    # unless someone else killed it (then `killed` is the honest answer).
    return "timeout" if sig == signal.SIGXCPU else "killed"
  if returncode == 0 or 0 < returncode < 128:
    return "early_exit"
  return "killed"


def _loads(text: str):
  try:
    return json.loads(text)
  except (ValueError, RecursionError):
    return None


def _unhex(text: str) -> str:
  if text == "-":
    return ""
  try:
    return bytes.fromhex(text).decode("utf-8", "replace")
  except ValueError:
    return text


def _test_result(job: Job, i: int, rec: dict) -> TestResult:
  status = str(rec.get("status", "error"))
  detail = str(rec.get("detail", ""))
  if status != "ok":
    # Only failures come from inside: in call and stdio modes the program
    # may have found the nonce and written records itself; a "pass" or
    # "ran" from there would skip the comparison made here.
    return TestResult(status if status in _FAILED else "error", detail)
  if job.mode in ("assert", "judge", "none"):
    return TestResult("pass")
  output = rec.get("output")
  expected = _MISSING
  if job.expected is not None and i < len(job.expected):
    expected = job.expected[i]
  if expected is _MISSING:
    return TestResult("ran", output=output)
  if job.mode == "stdio":
    same = _same_stdout(output, expected)
  else:
    same = outputs_equal(output, normalize(expected))
  if same:
    return TestResult("pass", output=output)
  return TestResult("fail", f"got {str(output)[:200]!r}", output)


_FAILED = ("fail", "error", "timeout", "memory")


def normalize(value: Any) -> Any:
  """The JSON form a value takes on its way out of the sandbox."""
  from k15.rewards import _harness

  return json.loads(json.dumps(value, default=_harness.json_default))


def outputs_equal(a: Any, b: Any, tol: float = 1e-9) -> bool:
  """Structural equality of JSON values; floats within `tol`."""
  if isinstance(a, bool) or isinstance(b, bool):
    return type(a) is type(b) and a == b
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    if isinstance(a, int) and isinstance(b, int):
      return a == b
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)
  if isinstance(a, list) and isinstance(b, list):
    return len(a) == len(b) and all(map(outputs_equal, a, b))
  if isinstance(a, dict) and isinstance(b, dict):
    return a.keys() == b.keys() and all(outputs_equal(a[k], b[k]) for k in a)
  return type(a) is type(b) and a == b


def _same_stdout(got: Any, expected: Any) -> bool:
  """Token-wise comparison, as judges do (whitespace is not significant)."""
  return isinstance(got, str) and got.split() == str(expected).split()


@functools.cache
def _probe() -> str:
  """'' when sandboxing works here, else why not (cached per process)."""
  try:
    isolation.tools()
    import pyseccomp  # noqa: F401
  except (SandboxUnavailable, ImportError, OSError) as e:
    return str(e)
  res = Sandbox(limits=Limits(timeout_s=20)).run(Job("print('ok')"))
  if res.cause != "ok" or res.stdout.strip() != "ok":
    return f"sandbox self-test failed ({res.cause}): {res.stderr[-500:]}"
  return ""


_probe_lock = threading.Lock()


def unavailable_reason() -> str:
  """'' when the sandbox works on this machine, else a reason to skip."""
  with _probe_lock:
    return _probe()


def check_available() -> None:
  """Raises `SandboxUnavailable` unless sandboxed execution works here."""
  reason = unavailable_reason()
  if reason:
    raise SandboxUnavailable(reason)
