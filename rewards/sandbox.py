"""Run untrusted, model-written Python without letting it touch the host.

    result = run("print(input()[::-1])", stdin="abc", timeout_s=2, memory_mb=256)
    result.status, result.stdout, result.isolation   # "passed", "cba\\n", "namespaces(net,pid,mount)+uid+rlimits"

Layers, strongest available first (the result's `isolation` says which held):

1. ``namespaces(net,pid,mount)+uid`` (root, as on CI): `unshare` gives the snippet
   a network namespace with only a downed loopback (no network at all), a PID
   namespace (it sees and can signal only its own processes; all die with the
   namespace's init), and a mount namespace where /tmp, /var/tmp and /dev/shm
   are small private tmpfs. It then runs as a throwaway unprivileged uid, so it
   can write only its working directory and RLIMIT_NPROC bounds fork bombs
   (root ignores that limit).
2. ``userns(net,pid,mount)``: the same namespaces through a user namespace,
   for non-root users where the kernel allows it.
3. ``rlimits``: resource limits and a process group only (no network isolation).

Always: a fresh working directory, a scrubbed environment (no secrets leak in),
limits on address space, CPU time, file size, open files and processes, a
wall-clock timeout that kills the whole process tree, output capped at
`max_output_bytes`, `nice` so the trainer is not starved, and a semaphore
bounding how many snippets run at once in this process.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["passed", "failed", "timeout", "memory", "crash", "output_limit"]
SANDBOX_PYTHON = "/usr/bin/python3"  # readable by any uid, unlike a venv under /root
SANDBOX_ROOT = Path(os.environ.get("RETORT_SANDBOX_DIR", "/run/retort-sandbox"))
_SLOTS = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))


@dataclass(frozen=True)
class SandboxResult:
    status: Status
    stdout: str
    stderr: str
    exit_code: int | None  # None when killed by us (timeout, output limit)
    isolation: str
    duration_s: float
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "passed"


def _works(command: list[str]) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.cache
def isolation_mode() -> str:
    """The strongest isolation this machine allows, probed once per process."""
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("setpriv") and _works(
        ["unshare", "--net", "--pid", "--mount-proc", "--kill-child", "sh", "-c",
         "mount -t tmpfs tmpfs /tmp && setpriv --reuid=65534 --regid=65534 --clear-groups true"]
    ) and os.access(SANDBOX_PYTHON, os.X_OK):
        return "namespaces(net,pid,mount)+uid"
    if shutil.which("unshare") and _works(
        ["unshare", "--user", "--map-root-user", "--net", "--pid", "--mount-proc", "--kill-child", "true"]
    ):
        return "userns(net,pid,mount)"
    return "rlimits"


def _limits(memory_mb: int, cpu_s: int, max_processes: int, max_file_mb: int) -> list[str]:
    return ["prlimit", f"--as={memory_mb << 20}", f"--cpu={cpu_s}", f"--nproc={max_processes}",
            f"--fsize={max_file_mb << 20}", "--nofile=256", "--core=0", "--"]


def _command(mode: str, uid: int, python: str) -> list[str]:
    private_tmp = " && ".join(f"mount -t tmpfs -o size=16m,mode=1777 tmpfs {d}" for d in ("/tmp", "/var/tmp",
                                                                                            "/dev/shm"))
    if mode.startswith("namespaces"):
        # sh stays as the namespace's root-owned init (not exec'd), so the snippet cannot signal it,
        # and its parent-death signal tears the namespace down if we kill `unshare`.
        drop = (f"setpriv --reuid={uid} --regid={uid} --clear-groups --inh-caps=-all --bounding-set=-all "
                f"--no-new-privs -- {python} -I -S main.py")
        return ["unshare", "--net", "--pid", "--mount-proc", "--kill-child", "sh", "-c", f"{private_tmp} && {drop}"]
    if mode.startswith("userns"):
        return ["unshare", "--user", "--map-root-user", "--net", "--pid", "--mount-proc", "--kill-child", "sh", "-c",
                f"{private_tmp}; {python} -I -S main.py"]
    return [python, "-I", "-S", "main.py"]


class _CappedReader(threading.Thread):
    """Drain a pipe, keeping at most `cap` bytes; calls `on_overflow` once when the cap is passed."""

    def __init__(self, stream, cap: int, on_overflow):
        super().__init__(daemon=True)
        self.stream, self.cap, self.on_overflow = stream, cap, on_overflow
        self.data = bytearray()
        self.overflowed = False

    def run(self) -> None:
        while chunk := self.stream.read1(65536):
            room = self.cap - len(self.data)
            if len(chunk) > room:
                self.data += chunk[:max(room, 0)]
                if not self.overflowed:
                    self.overflowed = True
                    self.on_overflow()
            else:
                self.data += chunk


def _kill_tree(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the whole group, namespace init included


def _classify(exit_code: int | None, stderr: str, timed_out: bool, overflowed: bool, cpu_limited: bool) -> Status:
    if overflowed:
        return "output_limit"
    if timed_out or cpu_limited:
        return "timeout"
    if exit_code == 0:
        return "passed"
    if "MemoryError" in stderr[-2000:]:
        return "memory"
    killed = exit_code in (-signal.SIGKILL, 128 + signal.SIGKILL)
    if killed and not stderr:  # killed without a word: the kernel's OOM killer
        return "memory"
    if exit_code is not None and (exit_code < 0 or exit_code > 128):
        return "crash"
    return "failed"


def run(
    code: str,
    *,
    stdin: str = "",
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_processes: int = 32,
    max_output_bytes: int = 64 * 1024,
    max_file_mb: int = 16,
    python: str | None = None,
) -> SandboxResult:
    """Run `code` as a Python program in the sandbox; never raises for anything the code does."""
    mode = isolation_mode()
    python = python or (SANDBOX_PYTHON if mode != "rlimits" else sys.executable)
    uid = random.randint(200_000, 299_999)  # a fresh uid: RLIMIT_NPROC counts only this sandbox
    cpu_s = max(1, math.ceil(timeout_s)) + 1
    with _SLOTS:
        base = SANDBOX_ROOT if mode.startswith("namespaces") else Path(tempfile.gettempdir())
        base.mkdir(mode=0o711, parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="snippet-", dir=base))
        try:
            (workdir / "main.py").write_text(code)
            if mode.startswith("namespaces"):
                os.chown(workdir, uid, uid)
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(workdir), "PYTHONDONTWRITEBYTECODE": "1"}
            command = ["nice", "-n", "10", *_limits(memory_mb, cpu_s, max_processes, max_file_mb),
                       *_command(mode, uid, python)]
            start = time.monotonic()
            proc = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
            readers = [_CappedReader(s, max_output_bytes, lambda: _kill_tree(proc)) for s in (proc.stdout,
                                                                                             proc.stderr)]
            for reader in readers:
                reader.start()
            try:
                proc.stdin.write(stdin.encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_tree(proc)
                proc.wait()
            _kill_tree(proc)  # stragglers the snippet left behind in its group
            for reader in readers:
                reader.join(timeout=5)
            duration = time.monotonic() - start
            stdout, stderr = (r.data.decode(errors="replace") for r in readers)
            overflowed = any(r.overflowed for r in readers)
            code_ = None if (timed_out or overflowed) else proc.returncode
            cpu_limited = proc.returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU)
            status = _classify(code_, stderr, timed_out, overflowed, cpu_limited)
            return SandboxResult(status, stdout, stderr, code_, f"{mode}+rlimits" if mode != "rlimits" else mode,
                                 duration, truncated=overflowed)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def run_many(snippets: Sequence[str], *, stdins: Sequence[str] | None = None, max_workers: int | None = None,
             **limits) -> list[SandboxResult]:
    """Run several snippets concurrently (bounded by the machine's cores); results in input order."""
    stdins = stdins or [""] * len(snippets)
    workers = max_workers or max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda pair: run(pair[0], stdin=pair[1], **limits), zip(snippets, stdins, strict=True)))
