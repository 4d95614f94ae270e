"""The sandbox's isolation layers and its child process (k15.rewards.sandbox
runs them; its docstring lists the layers and what each contains).

Setup: the host tools (`bwrap`, `setpriv`, `unshare`, `prlimit`), the
seccomp programs, the harness compiled once per interpreter, the read-only
root. The child: pumping its pipes under the output and wall-clock limits,
killing the run's PID namespace through its init, and reading `unshare`'s
exit status as the init's.
"""

import dataclasses
import errno
import functools
import os
import selectors
import shutil
import signal
import subprocess
import time

HARNESS = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "_harness.py"
)

class SandboxUnavailable(RuntimeError):
  """bwrap (or another isolation layer) is missing or unusable here."""


@functools.cache
def tools() -> dict[str, str]:
  tools = {}
  for name in ("bwrap", "prlimit", "setpriv", "unshare"):
    path = shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
    if path is None:
      pkg = "bubblewrap" if name == "bwrap" else "util-linux"
      raise SandboxUnavailable(
        f"`{name}` not found (apt-get install {pkg}); refusing to run "
        "untrusted code without a sandbox"
      )
    tools[name] = path
  return tools


BLOCKED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "bpf", "perf_event_open", "keyctl", "add_key",
    "request_key", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "reboot", "swapon", "swapoff", "acct", "quotactl",
    "syslog", "fanotify_init", "open_by_handle_at", "name_to_handle_at",
    "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick",
    "mount_setattr", "iopl", "ioperm", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "sethostname", "setdomainname", "kcmp",
    "vhangup", "pidfd_getfd", "personality", "lookup_dcookie",
)  # fmt: skip


@functools.cache
def seccomp_filters() -> dict[str, bytes]:
  """BPF programs: "base", loaded by bwrap; "base_fork", the same but
  allowing new processes (in "judge" mode the harness forks the program's
  process); "harness", loaded by the harness in every process before
  untrusted code runs: no execve, no new processes."""
  try:
    import pyseccomp as sc  # host-only dependency; needs libseccomp2
  except (ImportError, OSError) as e:
    raise SandboxUnavailable(
      f"pyseccomp/libseccomp unusable ({e}); pip install pyseccomp, "
      "apt-get install libseccomp2"
    ) from e

  eperm = sc.ERRNO(errno.EPERM)

  def no_processes(filt) -> None:
    # Processes only as threads: clone must carry CLONE_THREAD. clone3
    # passes its flags in memory seccomp cannot read; ENOSYS makes glibc
    # fall back to clone.
    clone_thread = 0x00010000
    filt.add_rule(eperm, "fork")
    filt.add_rule(eperm, "vfork")
    filt.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, clone_thread, 0))
    filt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")

  def base(processes: bool):
    filt = sc.SyscallFilter(sc.ALLOW)
    for name in BLOCKED_SYSCALLS:
      filt.add_rule(eperm, name)
    if not processes:
      no_processes(filt)
    af_unix = 1
    filt.add_rule(eperm, "socket", sc.Arg(0, sc.NE, af_unix))
    tiocsti = 0x5412
    filt.add_rule(eperm, "ioctl", sc.Arg(1, sc.EQ, tiocsti))
    return filt

  harness = sc.SyscallFilter(sc.ALLOW)
  harness.add_rule(eperm, "execve")
  harness.add_rule(eperm, "execveat")
  no_processes(harness)
  return dict(
    base=_export(base(False)),
    base_fork=_export(base(True)),
    harness=_export(harness),
  )


def _export(filt) -> bytes:
  fd = os.memfd_create("bpf")
  try:
    with open(fd, "wb+", closefd=False) as f:
      filt.export_bpf(f)
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
      chunks.append(chunk)
    return b"".join(chunks)
  finally:
    os.close(fd)


# Compiles stdin to a .pyc image for the interpreter that runs this.
_COMPILE = (
  "import importlib.util, marshal, sys\n"
  "code = compile(sys.stdin.buffer.read(), '/harness.py', 'exec')\n"
  "sys.stdout.buffer.write(importlib.util.MAGIC_NUMBER + bytes(12)"
  " + marshal.dumps(code))\n"
)


@functools.cache
def harness_pyc(python: str) -> bytes:
  """The harness compiled once by the sandbox's own interpreter: compiling
  its source took more time than starting that interpreter."""
  with open(HARNESS, "rb") as f:
    source = f.read()
  try:
    out = subprocess.run(
      [python, "-I", "-S", "-c", _COMPILE],
      input=source,
      capture_output=True,
      check=True,
      timeout=60,
      env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )
  except (OSError, subprocess.SubprocessError) as e:
    msg = f"{python} cannot compile the harness: {e}"
    raise SandboxUnavailable(msg) from e
  return out.stdout


def memfd(name: str, data: bytes) -> int:
  fd = os.memfd_create(name)
  view = memoryview(data)
  while view:
    view = view[os.write(fd, view) :]
  os.lseek(fd, 0, os.SEEK_SET)
  return fd


def root_binds() -> list[str]:
  """Read-only /usr plus the host's /bin, /lib*, /sbin as they are."""
  args = ["--ro-bind", "/usr", "/usr"]
  for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
    path = "/" + name
    if os.path.islink(path):
      args += ["--symlink", os.readlink(path), path]
    elif os.path.isdir(path):
      args += ["--ro-bind", path, path]
  return args


@dataclasses.dataclass
class IO:
  stdout: bytes = b""
  stderr: bytes = b""
  records: list = dataclasses.field(default_factory=list)
  killed_for: str = ""


def communicate(proc, res_r, nonce_w, nonce, limits, start) -> IO:
  """Pumps stdout/stderr/results until exit or a limit; sends the nonce on
  "ready"."""
  out = IO()
  bufs = {"stdout": bytearray(), "stderr": bytearray(), "res": bytearray()}
  sel = selectors.DefaultSelector()
  sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
  sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
  sel.register(res_r, selectors.EVENT_READ, "res")
  deadline = start + limits.timeout_s
  printed = 0
  sent_nonce = False
  try:
    while sel.get_map():
      left = deadline - time.monotonic()
      if left <= 0:
        out.killed_for = "timeout"
        break
      for key, _ in sel.select(left):
        fd = key.fd if isinstance(key.fileobj, int) else key.fileobj.fileno()
        data = os.read(fd, 1 << 16)
        if not data:
          sel.unregister(key.fileobj)
          continue
        name = key.data
        if name == "res":
          bufs["res"] += data
          if len(bufs["res"]) > limits.result_bytes:
            out.killed_for = "output_limit"
            break
          if not sent_nonce and b"\n" in bufs["res"]:
            first = bytes(bufs["res"]).split(b"\n", 1)[0]
            if first == b"ready":
              sent_nonce = True
              try:
                os.write(nonce_w, (nonce + "\n").encode())
              except OSError:
                pass
        else:
          printed += len(data)
          room = limits.output_bytes - len(bufs[name])
          if room > 0:
            bufs[name] += data[:room]
          if printed > limits.output_bytes:
            out.killed_for = "output_limit"
            break
      if out.killed_for:
        break
  except BaseException:
    kill(proc)
    raise
  finally:
    sel.close()
    if out.killed_for:
      kill(proc)
    try:
      # All pipes closed: `unshare` (which holds them) is exiting; it gets
      # the rest of the wall-clock budget, never a premature kill.
      proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      out.killed_for = out.killed_for or "timeout"
      kill(proc)
      proc.wait()
    proc.stdout.close()
    proc.stderr.close()
  out.stdout = bytes(bufs["stdout"])
  out.stderr = bytes(bufs["stderr"])
  out.records = bytes(bufs["res"]).decode("utf-8", "replace").split("\n")
  return out


# util-linux 2.38 `unshare` says this (and exits 1) when its child died by
# SIGKILL: it cannot re-raise SIGKILL on itself.
UNSHARE_KILLED = b"unshare: sigprocmask unblock failed: Invalid argument\n"


def unshare_status(io_out: IO, returncode: int | None) -> int | None:
  """The init's fate rather than `unshare`'s complaint about it."""
  if returncode == 1 and io_out.stderr.endswith(UNSHARE_KILLED):
    io_out.stderr = io_out.stderr[: -len(UNSHARE_KILLED)]
    return -signal.SIGKILL
  return returncode


def kill(proc) -> None:
  """SIGKILLs the run's PID namespace through its init, the child of
  `unshare`: the kernel then kills every process in it, and `unshare` exits
  once the init is reaped. Killing `unshare` itself would orphan the init.
  (Only `unshare` reaps that init, and exits right after: for the pid we
  read to name another process by the time we signal it, the pid space
  would have to wrap around within that moment.)"""
  while proc.poll() is None:
    kids = children(proc.pid)
    for pid in kids:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    if kids:
      return
    time.sleep(0.001)  # not forked yet, or exiting


def children(pid: int) -> list[int]:
  try:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
      return [int(x) for x in f.read().split()]
  except FileNotFoundError:  # a kernel without CONFIG_PROC_CHILDREN
    pass
  except OSError:
    return []
  kids = []
  for name in os.listdir("/proc"):
    if name.isdigit():
      try:
        with open(f"/proc/{name}/stat") as f:
          ppid = int(f.read().rsplit(")", 1)[1].split()[1])
      except (OSError, IndexError, ValueError):
        continue
      if ppid == pid:
        kids.append(int(name))
  return kids
