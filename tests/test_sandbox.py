"""Hostile programs against the code sandbox: each must be contained, for the
right reason, without side effects on the host.

Skipped (with the reason) where bwrap or user namespaces are unavailable;
CI installs `bubblewrap`.
"""

import dataclasses
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from k15.rewards import _harness, isolation, sandbox

REASON = sandbox.unavailable_reason()
pytestmark = pytest.mark.skipif(bool(REASON), reason=f"no sandbox: {REASON}")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = sandbox.Limits(timeout_s=5.0)
SHORT = sandbox.Limits(timeout_s=1.0)


def run(program, mode="none", tests=(), limits=FAST, **kw):
  job = sandbox.Job(program, mode, tuple(tests), **kw)
  return sandbox.Sandbox().run(job, limits)


def assert_no_leak(res, secret):
  assert secret not in res.stdout and secret not in res.stderr
  assert all(secret not in str(t.output) for t in res.tests)


# -- the harness works ------------------------------------------------------


def test_assert_mode_pass_and_fail():
  prog = "def add(a, b):\n  return a + b\n"
  res = run(prog, "assert", ["assert add(1, 2) == 3", "assert add(2, 2) == 5"])
  assert [t.status for t in res.tests] == ["pass", "fail"]
  assert res.cause == "wrong_answer"
  res = run(prog, "assert", ["assert add(1, 2) == 3"])
  assert res.cause == "ok" and res.passed


def test_call_mode_compares_outside():
  prog = "def f(xs):\n  return sorted(xs), {'n': len(xs)}, 0.1 + 0.2\n"
  job = sandbox.Job(
    prog,
    "call",
    ([[3, 1, 2]], [[]]),
    entry_point="f",
    expected=(([1, 2, 3], {"n": 3}, 0.3), ([], {"n": 1}, 0.3)),
  )
  res = sandbox.Sandbox().run(job, FAST)
  assert [t.status for t in res.tests] == ["pass", "fail"]
  assert res.cause == "wrong_answer"
  collect = sandbox.Job(prog, "call", ([[2, 1]],), entry_point="f")
  res = sandbox.Sandbox().run(collect, FAST)
  assert res.cause == "ok" and res.tests[0].status == "ran"
  assert res.tests[0].output == [[1, 2], {"n": 2}, pytest.approx(0.3)]


def test_stdio_mode_is_token_wise_and_allows_exit():
  prog = "import sys\nn = int(input())\nprint(n * 2, '')\nsys.exit(0)\n"
  job = sandbox.Job(prog, "stdio", ("3\n", "5\n"), expected=("6", "11\n"))
  res = sandbox.Sandbox().run(job, FAST)
  assert [t.status for t in res.tests] == ["pass", "fail"]


def test_errors_and_syntax_errors():
  assert run("def f(:\n  pass").cause == "error"
  res = run("def f():\n  return 1 / 0", "assert", ["f()"])
  assert res.cause == "error" and "ZeroDivisionError" in res.tests[0].detail


def test_per_test_timeout_keeps_other_results():
  prog = "def f(x):\n  while x: pass\n  return x\n"
  limits = sandbox.Limits(timeout_s=5.0, test_timeout_s=0.3)
  job = sandbox.Job(prog, "call", ([0], [1], [0]), entry_point="f")
  res = sandbox.Sandbox().run(job, limits)
  assert [t.status for t in res.tests] == ["ran", "timeout", "ran"]
  assert res.cause == "timeout"


def test_run_many_is_ordered():
  jobs = [sandbox.Job(f"print({i})") for i in range(12)]
  res = sandbox.Sandbox().run_many(jobs, FAST, workers=4)
  assert [r.stdout.strip() for r in res] == [str(i) for i in range(12)]


def test_no_fd_or_process_leak():
  before = len(os.listdir("/proc/self/fd"))
  jobs = [sandbox.Job("print(1)"), sandbox.Job("import os\nos._exit(3)")] * 10
  sandbox.Sandbox().run_many(jobs, FAST, workers=4)
  assert len(os.listdir("/proc/self/fd")) == before
  children = subprocess.run(
    ["ps", "--ppid", str(os.getpid()), "-o", "pid="],
    capture_output=True,
    text=True,
  ).stdout.split()
  assert len(children) <= 1  # only the `ps` itself, if listed


def test_unshare_complaint_about_a_killed_init_reads_as_a_kill():
  # util-linux 2.38 cannot re-raise SIGKILL: it says so and exits 1.
  io_out = isolation.IO(stderr=b"out\n" + isolation.UNSHARE_KILLED)
  assert isolation.unshare_status(io_out, 1) == -9
  assert io_out.stderr == b"out\n"
  assert isolation.unshare_status(isolation.IO(stderr=b"x\n"), 1) == 1


def test_missing_bwrap_refuses(monkeypatch):
  isolation.tools.cache_clear()
  monkeypatch.setattr(isolation.shutil, "which", lambda *a, **k: None)
  try:
    with pytest.raises(sandbox.SandboxUnavailable, match="bubblewrap"):
      run("print(1)")
  finally:
    isolation.tools.cache_clear()


# -- hostile programs ---------------------------------------------------------


def test_tcp_connect_to_loopback_listener():
  srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  srv.bind(("127.0.0.1", 0))
  srv.listen(1)
  srv.settimeout(0.2)
  port = srv.getsockname()[1]
  try:
    prog = (
      "import socket\n"
      f"s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
      "s.sendall(b'pwned')\n"
    )
    res = run(prog)
    assert res.cause == "error" and "PermissionError" in res.detail
    with pytest.raises(TimeoutError):
      srv.accept()
  finally:
    srv.close()


def test_no_network_even_without_seccomp_socket_rule():
  # AF_UNIX sockets are allowed by seccomp; the net namespace is empty.
  res = run("print(open('/proc/net/dev').read())")
  assert res.cause == "ok"
  ifaces = [line.split(":")[0].strip() for line in res.stdout.splitlines()[2:]]
  assert [i for i in ifaces if i] == ["lo"]


def test_read_etc_shadow():
  res = run("print(open('/etc/shadow').read())")
  assert res.cause == "error" and "FileNotFoundError" in res.detail
  assert "root:" not in res.stdout


def test_read_repo_and_host_tmp_files():
  with tempfile.NamedTemporaryFile("w", dir="/tmp", delete=False) as f:
    f.write("k15-planted-secret")
  os.chmod(f.name, 0o644)
  try:
    for path in (f.name, os.path.join(REPO, "tests", "test_sandbox.py")):
      res = run(f"print(open({path!r}).read())")
      assert res.cause == "error" and "FileNotFoundError" in res.detail
      assert_no_leak(res, "k15-planted-secret")
    res = run("import os\nprint(os.listdir('/tmp'), os.listdir('/'))")
    assert res.cause == "ok"
    assert os.path.basename(f.name) not in res.stdout
    assert "work" not in res.stdout and "etc" not in res.stdout
  finally:
    os.unlink(f.name)


def test_write_outside_tmp():
  target = os.path.join(REPO, "k15_sandbox_pwned.txt")
  for path in ("/pwned", "/usr/pwned", "/dev/pwned", target):
    res = run(f"open({path!r}, 'w').write('x')")
    assert res.cause == "error", path
    assert ("Read-only" in res.detail) or ("No such file" in res.detail)
  assert not os.path.exists(target)
  assert run("open('/tmp/ok', 'w').write('x')").cause == "ok"


def test_tmp_is_small():
  prog = "for i in range(100):\n  open(f'/tmp/{i}', 'w').write('x' * (8 << 20))"
  res = run(prog)
  assert res.cause == "error" and "No space left" in res.detail


def test_fork_bomb():
  res = run("import os\nwhile True:\n  os.fork()\n")
  assert res.cause == "error" and "PermissionError" in res.detail


def test_memory_bomb():
  res = run("x = []\nwhile True:\n  x.append(bytearray(50 << 20))\n")
  assert res.cause == "memory"


def test_infinite_loop():
  t0 = time.monotonic()
  res = run("while True:\n  pass\n", limits=SHORT)
  assert res.cause == "timeout"
  assert time.monotonic() - t0 < 3


def test_cpu_limit_without_wall_clock():
  # Threads burning CPU hit RLIMIT_CPU before the (generous) wall clock.
  limits = sandbox.Limits(timeout_s=20.0, cpu_s=1)
  t0 = time.monotonic()
  res = run("while True:\n  pass\n", limits=limits)
  assert res.cause == "timeout"
  assert time.monotonic() - t0 < 5


def test_huge_stdout():
  res = run("while True:\n  print('x' * 4096)\n")
  assert res.cause == "output_limit"
  assert len(res.stdout) <= FAST.output_bytes


def test_sleep_past_timeout():
  t0 = time.monotonic()
  res = run("import time\ntime.sleep(60)\n", limits=SHORT)
  assert res.cause == "timeout"
  assert time.monotonic() - t0 < 3


def test_silent_spinner_with_closed_pipes():
  prog = (
    "import os, sys\n"
    "for fd in (1, 2, int(sys.argv[2])):\n"
    "  os.close(fd)\n"
    "while True:\n"
    "  pass\n"
  )
  t0 = time.monotonic()
  assert run(prog, limits=SHORT).cause == "timeout"
  assert time.monotonic() - t0 < 3


@pytest.mark.parametrize(
  "prog",
  [
    "import subprocess\nsubprocess.run(['/usr/bin/true'], check=True)",
    "import os\nos.posix_spawn('/usr/bin/true', ['true'], {})",
    "import os\nos.execv('/usr/bin/true', ['true'])",
    "import os\nassert os.system('/usr/bin/true') == 0",
    "import pty\npty.fork()",
  ],
)
def test_spawning_subprocesses(prog):
  res = run(prog)
  assert res.cause == "error", res
  assert "PermissionError" in res.detail or "AssertionError" in res.detail


def test_killing_the_parent():
  me = os.getpid()
  prog = (
    "import os, signal\n"
    "os.kill(os.getppid(), signal.SIGKILL)\n"  # bwrap's init: immune
    f"os.kill({me}, signal.SIGKILL)\n"  # the host: not in our pid ns
  )
  res = run(prog)
  assert res.cause == "error" and "ProcessLookupError" in res.detail
  res = run("import os, signal\nos.kill(-1, signal.SIGKILL)\n")
  assert res.cause in ("error", "killed")
  assert os.getpid() == me  # we are still here


def test_proc_shows_only_the_sandbox(monkeypatch):
  monkeypatch.setenv("K15_SECRET_TOKEN", "hunter2-k15")
  sleeper = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(30)"],
    env={**os.environ},
  )
  try:
    prog = (
      "import os\n"
      "pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
      "print(pids)\n"
      "for p in pids:\n"
      "  for f in ('environ', 'cmdline'):\n"
      "    try:\n"
      "      print(open(f'/proc/{p}/{f}', 'rb').read())\n"
      "    except OSError as e:\n"
      "      print(e)\n"
      f"print(open('/proc/{sleeper.pid}/environ').read())\n"
    )
    res = run(prog)
    assert res.cause == "error" and "FileNotFoundError" in res.detail
    assert_no_leak(res, "hunter2-k15")
    pids = eval(res.stdout.splitlines()[0])  # noqa: S307 (our own output)
    assert sorted(pids, key=int) == ["1", "2"]  # bwrap init and the program
  finally:
    sleeper.kill()
    sleeper.wait()


def test_environment_secrets(monkeypatch):
  monkeypatch.setenv("K15_SECRET_TOKEN", "hunter2-k15")
  res = run("import os\nprint(dict(os.environ))\n")
  assert res.cause == "ok"
  assert_no_leak(res, "hunter2-k15")
  assert "K15_SECRET_TOKEN" not in res.stdout


def test_unprivileged_inside():
  res = run("import os\nprint(os.getuid(), os.geteuid(), os.getgroups())")
  uid, euid = (int(x) for x in res.stdout.split()[:2])
  assert uid != 0 and euid != 0
  res = run("import os\nos.setuid(0)\n")
  assert res.cause == "error"
  prog = "import resource as r\nr.setrlimit(r.RLIMIT_AS, (-1, -1))\n"
  assert run(prog).cause == "error"  # hard limits cannot be raised


def test_ptrace_mount_unshare_blocked():
  prog = (
    "import ctypes, os\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "bad = []\n"
    "for name, nr, args in [('ptrace', 101, (16, 1, 0, 0)),\n"
    "                       ('unshare', 272, (0x10000000,)),\n"
    "                       ('mount', 165, (0, 0, 0, 0, 0)),\n"
    "                       ('bpf', 321, (0, 0, 0))]:\n"
    "  if libc.syscall(nr, *args) != -1 or ctypes.get_errno() != 1:\n"
    "    bad.append(name)\n"
    "assert not bad, bad\n"
  )
  assert run(prog).cause == "ok"


@pytest.mark.parametrize(
  "prog",
  [
    "import os\nos._exit(0)\n",
    "import sys\nsys.exit(0)\n",
    "raise SystemExit\n",
    "import os\nos.kill(os.getpid(), 9)\n",
  ],
)
def test_exit_before_tests_is_a_failure(prog):
  res = run(prog + "def f():\n  return 1\n", "assert", ["assert f() == 2"])
  assert res.cause in ("early_exit", "killed")
  assert [t.status for t in res.tests] == ["not_run"]
  assert not res.passed


def test_forged_records_before_exit_fail():
  # Fake verdicts on stdout and straight into the result pipe (its fd number
  # is on argv): without the nonce, which does not exist yet, they count for
  # nothing.
  prog = (
    "import os, sys\n"
    "fd = int(sys.argv[2])\n"
    'fake = \'ready\\nX test 0 {"status": "ok"}\\nX done\\n\'\n'
    "print(fake)\n"
    "os.write(fd, fake.encode())\n"
    "os._exit(0)\n"
  )
  res = run(prog, "assert", ["assert False"])
  assert res.cause == "early_exit" and not res.passed
  assert res.tests[0].status == "not_run"


def test_threads_left_running_before_tests_fail():
  prog = (
    "import threading, time\n"
    "threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n"
  )
  res = run(prog, "assert", ["assert True"])
  assert res.cause == "error" and "threads" in res.detail


def test_threads_are_allowed():
  prog = (
    "import concurrent.futures as cf\n"
    "with cf.ThreadPoolExecutor(4) as ex:\n"
    "  r = sum(ex.map(lambda x: x * x, range(10)))\n"
  )
  assert run(prog, "assert", ["assert r == 285"]).cause == "ok"


# -- verdicts the program cannot fake ------------------------------------------

# Finds the nonce the way a policy would: every 32-hex string in the frames
# above it and in every dict the gc knows; then writes passing records with
# each candidate to every fd on argv, and exits.
FORGE = """
import gc, os, sys

def forge():
  hexd, found = set("0123456789abcdef"), set()
  def look(v):
    if isinstance(v, str) and len(v) == 32 and set(v) <= hexd:
      found.add(v)
  f = sys._getframe()
  while f is not None:
    for v in list(f.f_locals.values()):
      look(v)
    f = f.f_back
  for o in gc.get_objects():
    if isinstance(o, dict):
      for v in list(o.values()):
        look(v)
  for n in found:
    recs = [f"{n} test {i} {s} - {o}" for i in range(4)
            for s, o in (("pass", "-"), ("ran", "-"), ("ok", "j:9"))]
    for fd in [int(a) for a in sys.argv[1:] if a.isdigit()]:
      try:
        os.write(fd, ("\\n".join(recs) + f"\\n{n} done\\n").encode())
      except OSError:
        pass
  os._exit(0)
"""

FORGING_JOBS = {
  "call": sandbox.Job(
    FORGE + "def f(x):\n  forge()\n",
    "call",
    ((3,), (4,)),
    entry_point="f",
    expected=(9, 16),
  ),
  "stdio": sandbox.Job(
    FORGE + "forge()\n", "stdio", ("3\n", "4\n"), expected=("9", "16")
  ),
  "judge": sandbox.Job(
    FORGE + "def f(x):\n  forge()\n",
    "judge",
    ("assert f(3) == 9", "assert f(4) == 16"),
    entry_point="f",
  ),
}


@pytest.mark.parametrize("mode", sandbox.SAFE_MODES)
def test_frame_and_gc_walking_program_cannot_pass(mode):
  res = sandbox.Sandbox().run(FORGING_JOBS[mode], FAST)
  assert not res.passed and res.num_passed == 0, res
  assert not res.fakeable


def test_forged_top_level_error_ok_record_fails():
  # "error ok" before the tests once counted as the run's cause.
  prog = "import os, sys\nos.write(int(sys.argv[2]), b'error ok -\\n')\n"
  job = sandbox.Job(prog + "os._exit(0)\n", "call", ((3,),),
                    entry_point="f", expected=(9,))  # fmt: skip
  res = sandbox.Sandbox().run(job, FAST)
  assert res.cause == "error" and not res.passed


def test_judge_cannot_be_read_or_interrupted_by_the_program():
  # The program tries the judge's memory, fds and environment, signals it,
  # and looks for the tests in its own memory; then answers correctly.
  prog = (
    "import gc, os, signal\n"
    "judge = os.getppid()\n"
    "for what in ('mem', 'environ', 'fd/3', 'fd'):\n"
    "  try:\n"
    "    p = f'/proc/{judge}/{what}'\n"
    "    os.listdir(p) if what == 'fd' else open(p, 'rb').read(1)\n"
    "    print(what, 'read')\n"
    "  except OSError as e:\n"
    "    print(what, type(e).__name__)\n"
    "for sig in ('SIGALRM', 'SIGINT', 'SIGTERM', 'SIGUSR1', 'SIGPIPE'):\n"
    "  os.kill(judge, getattr(signal, sig))\n"
    "def seen():\n"
    "  mark = '-'.join(['k15', 'hidden'])\n"
    "  return sum(mark in repr(o)[:10000] for o in gc.get_objects())\n"
    "print('tests seen', seen())\n"
    "def f(x):\n"
    "  return x * x\n"
  )
  job = sandbox.Job(prog, "judge", ("assert f(3) == 9  # k15-hidden",),
                    entry_point="f")  # fmt: skip
  res = sandbox.Sandbox().run(job, FAST)
  assert res.passed, res
  lines = res.stdout.splitlines()
  assert "read" not in res.stdout and len(lines) == 5, lines
  assert lines[-1] == "tests seen 0"
  # ... where in assert mode the tests are right there.
  res = sandbox.Sandbox().run(dataclasses.replace(job, mode="assert"), FAST)
  assert res.stdout.splitlines()[-1] != "tests seen 0"


def test_judge_mode_values_errors_and_setup():
  prog = (
    "def f(kind):\n"
    "  if kind == 'raise':\n"
    "    raise ValueError('no')\n"
    "  return {'t': (1, [2.5, None]), 's': {3}, 'b': b'x', 'big': 10**30,\n"
    "          'inf': float('inf'), 'ok': True, 1: 'int key', 'c': 1j}[kind]\n"
  )
  tests = [
    "assert f('t') == (1, [2.5, None]) and f('t') != [1, [2.5, None]]",
    "assert f('s') == {3} and f('b') == b'x' and f('big') == 10**30",
    "assert f('inf') == INF and f('ok') is True and f(1) == 'int key'",
    "assert f('c') == 1j",
    "try:\n  f('raise')\nexcept ValueError as e:\n  assert str(e) == 'no'",
    "assert f('t') == (1, [2.5])",
    "f('missing')",
  ]
  job = sandbox.Job(prog, "judge", tuple(tests), entry_point="f",
                    setup="INF = float('inf')\n")  # fmt: skip
  res = sandbox.Sandbox().run(job, FAST)
  assert [t.status for t in res.tests] == ["pass"] * 5 + ["fail", "error"]
  assert "KeyError" in res.tests[-1].detail


def test_judge_mode_deaths_and_timeouts():
  limits = sandbox.Limits(timeout_s=5.0, test_timeout_s=0.5)
  prog = (
    "import os\n"
    "def f(x):\n"
    "  if x == 'spin':\n"
    "    while True: pass\n"
    "  if x == 'exit':\n"
    "    os._exit(0)\n"
    "  return x\n"
  )
  job = sandbox.Job(prog, "judge", ("f('spin')", "f(1)"), entry_point="f")
  res = sandbox.Sandbox().run(job, limits)
  assert [t.status for t in res.tests] == ["timeout", "error"]
  assert res.cause == "timeout"
  job = sandbox.Job(prog, "judge", ("f('exit')", "f(1)"), entry_point="f")
  res = sandbox.Sandbox().run(job, limits)
  assert [t.status for t in res.tests] == ["error", "error"]
  for top, cause in [("import os\nos._exit(0)\n", "early_exit"),
                     ("while True: pass\n", "timeout"),
                     ("g = 1\n", "error")]:  # fmt: skip
    job = sandbox.Job(top, "judge", ("f(1)",), entry_point="f")
    res = sandbox.Sandbox().run(job, limits)
    assert res.cause == cause and res.tests[0].status == "not_run"
  with pytest.raises(ValueError, match="entry_point"):
    sandbox.Sandbox().run(sandbox.Job("", "judge", ("f(1)",)))


def test_judge_wire_format():
  values = [None, True, 0, -(10**40), 2.5, float("-inf"), 1 - 2j, "é\n;",
            b"\x00;", [1, (2, "3")], {(1, 2): {"a": [frozenset({4})]}},
            set()]  # fmt: skip
  for v in values:
    out = []
    _harness.encode(v, out)
    assert "\n" not in "".join(out)
    back = _harness.decode("".join(out))
    assert back == v and type(back) is type(v)
  for bad in ["", "l2;i1;", "i1;i2;", "x1;", "d1;l0;i1;", "i1", "l-1;"]:
    with pytest.raises((ValueError, TypeError)):
      _harness.decode(bad)
  with pytest.raises(TypeError, match="plain data"):
    _harness.encode(object(), [])


# -- no process outlives its run ---------------------------------------------

# Runs programs as PID 1 of a new PID namespace (as k15 does in a container
# without an init): nothing reaps orphans for us there. After each run it
# lists every other process of the namespace, zombies included.
_AS_PID1 = """
import json, os, sys
from k15.rewards import _harness, isolation, sandbox

def others():
  out = []
  for pid in os.listdir("/proc"):
    if pid.isdigit() and int(pid) != os.getpid():
      try:
        with open(f"/proc/{pid}/stat") as f:
          stat = f.read()
      except OSError:
        continue
      comm = stat[stat.index("(") + 1 : stat.rindex(")")]
      state = stat[stat.rindex(")") + 2]
      out.append([int(pid), comm, state])
  return out

assert os.getpid() == 1, os.getpid()
limits = sandbox.Limits(timeout_s=float(sys.argv[2]))
for prog in json.loads(sys.argv[1]):
  res = sandbox.Sandbox().run(sandbox.Job(prog), limits)
  print(json.dumps([res.cause, others()]), flush=True)
"""


def run_as_pid1(programs, timeout_s):
  """[(cause, other processes)] per program, from a PID 1 k15."""
  if os.geteuid() != 0:
    pytest.skip("a new PID namespace needs root here")
  cmd = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable]
  cmd += ["-c", _AS_PID1, json.dumps(programs), str(timeout_s)]
  env = {**os.environ, "PYTHONPATH": REPO}
  out = subprocess.run(cmd, capture_output=True, text=True, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  return [json.loads(line) for line in out.stdout.splitlines()]


SPIN = "while True:\n  pass\n"
SLEEP = "import time\ntime.sleep(60)\n"
FORK_BOMB = "import os\nwhile True:\n  os.fork()\n"


def test_no_process_or_zombie_outlives_a_run_under_pid1():
  progs = {
    "pass": "ok",
    SPIN: "timeout",
    SLEEP: "timeout",
    FORK_BOMB: "error",
    "import os\nos._exit(3)\n": "early_exit",
    "import os\nos.kill(os.getpid(), 9)\n": "killed",
    "while True:\n  print('x' * 4096)\n": "output_limit",
  }
  order = list(progs) * 5
  order = order[:30]
  # 1 s: a run must start and finish "pass" within it on a loaded machine
  runs = run_as_pid1(order, timeout_s=1.0)
  assert [cause for cause, _ in runs] == [progs[p] for p in order]
  assert [left for _, left in runs] == [[]] * len(order)


def test_nothing_of_a_run_is_alive_right_after_a_timeout():
  # A spinner with threads and a sleeper name themselves; right after run()
  # reports the timeout no process (or thread) of that name may exist.
  tag = "k15" + secrets.token_hex(6)
  name = (
    "import ctypes, threading, time\n"
    f"ctypes.CDLL(None).prctl(15, b'{tag}', 0, 0, 0)\n"
  )
  spin = (
    "for _ in range(3):\n"
    "  threading.Thread(target=lambda: [0 for _ in iter(int, 1)]).start()\n"
    "print('named', flush=True)\n"
    "while True:\n  pass\n"
  )
  sleep = "print('named', flush=True)\ntime.sleep(60)\n"
  for prog in [spin, sleep] * 2:
    res = run(name + prog, limits=sandbox.Limits(timeout_s=2.0))
    assert res.cause == "timeout" and "named" in res.stdout
    assert tagged_tasks(tag) == []


def tagged_tasks(tag):
  found = []
  for pid in os.listdir("/proc"):
    if not pid.isdigit():
      continue
    try:
      tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
      continue
    for tid in tids:
      try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
          if f.read().strip() == tag:
            found.append(tid)
      except OSError:
        pass
  return found
