"""Hostile snippets: each is contained and reported correctly, and the host is never harmed."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from rewards import sandbox

STRONG = sandbox.isolation_mode().startswith("namespaces")
needs_namespaces = pytest.mark.skipif(not STRONG, reason="needs root and unshare (namespaces + uid drop)")


def test_isolation_is_reported() -> None:
    result = sandbox.run("print(1)")
    assert result.isolation.endswith("rlimits") and result.isolation.startswith(sandbox.isolation_mode())


def test_passing_program_with_stdin() -> None:
    result = sandbox.run("print(input()[::-1])", stdin="abc\n", timeout_s=5)
    assert (result.status, result.stdout, result.exit_code) == ("passed", "cba\n", 0)


def test_exception_is_failed_with_the_error() -> None:
    result = sandbox.run("raise ValueError('boom')")
    assert result.status == "failed" and result.exit_code == 1 and "ValueError: boom" in result.stderr


def test_infinite_loop_times_out() -> None:
    start = time.monotonic()
    result = sandbox.run("while True: pass", timeout_s=1)
    assert result.status == "timeout" and result.exit_code is None
    assert time.monotonic() - start < 5


@needs_namespaces
def test_fork_bomb_is_contained() -> None:
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    before = _process_count()
    result = sandbox.run(bomb, timeout_s=2, max_processes=16)
    assert result.status == "timeout"
    time.sleep(0.2)
    assert _process_count() <= before + 2  # every forked child died with the namespace


def _process_count() -> int:
    return sum(1 for p in Path("/proc").iterdir() if p.name.isdigit())


def test_memory_bomb_is_reported_as_memory() -> None:
    result = sandbox.run("x = bytearray(8 * 1024 ** 3)", memory_mb=256)
    assert result.status == "memory" and "MemoryError" in result.stderr
    result = sandbox.run("x = []\nwhile True:\n    x.append(' ' * 10 ** 6)", memory_mb=256, timeout_s=10)
    assert result.status == "memory"


def test_huge_output_is_capped() -> None:
    result = sandbox.run("while True:\n    print('x' * 1000)", max_output_bytes=10_000, timeout_s=5)
    assert result.status == "output_limit" and result.truncated
    assert len(result.stdout) == 10_000


def test_crash_is_a_crash() -> None:
    result = sandbox.run("import ctypes\nctypes.string_at(0)")
    assert result.status == "crash"


@needs_namespaces
def test_no_writes_outside_the_working_directory() -> None:
    marker = f"retort-escape-{uuid.uuid4().hex}"
    targets = [f"/tmp/{marker}", f"/var/tmp/{marker}", f"/dev/shm/{marker}", f"/work/{marker}",
               str(Path.home() / marker), f"{Path(__file__).parent}/{marker}"]
    code = (f"for path in {targets!r}:\n    try:\n        open(path, 'w').write('x')\n"
            "        print('wrote', path)\n    except OSError as e:\n        print('denied', path, e.errno)\n"
            "open('inside.txt', 'w').write('fine')\nprint(open('inside.txt').read())\n")
    result = sandbox.run(code)
    assert result.status == "passed" and result.stdout.rstrip().endswith("fine")
    for target in targets:
        assert not Path(target).exists(), f"the snippet wrote {target} on the host"


@needs_namespaces
def test_no_network() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(3)
    port = server.getsockname()[1]
    accepted = []
    listener = threading.Thread(target=lambda: _accept(server, accepted), daemon=True)
    listener.start()
    code = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "    print('connected')\nexcept OSError as e:\n    print('refused', e.errno)\n"
            "try:\n    socket.getaddrinfo('pypi.org', 443)\n    print('resolved')\nexcept OSError as e:\n"
            "    print('no dns')\n")
    result = sandbox.run(code, timeout_s=5)
    listener.join()
    server.close()
    assert "connected" not in result.stdout and "resolved" not in result.stdout
    assert accepted == []  # nothing reached the host's loopback


def _accept(server: socket.socket, accepted: list) -> None:
    with contextlib.suppress(OSError):  # the timeout: nobody connected, as it should be
        accepted.append(server.accept())


@needs_namespaces
def test_cannot_kill_the_parent_or_other_host_processes() -> None:
    sentinel = subprocess.Popen(["sleep", "30"])
    try:
        code = (f"import os, signal\nfor pid in (os.getppid(), {os.getpid()}, {sentinel.pid}, 1):\n"
                "    try:\n        os.kill(pid, signal.SIGKILL)\n        print('killed', pid)\n"
                "    except OSError as e:\n        print('denied', pid, e.errno)\n"
                "try:\n    os.killpg(0, signal.SIGKILL)\nexcept OSError as e:\n    print('pg denied', e.errno)\n")
        result = sandbox.run(code)
        assert sentinel.poll() is None  # the host process survived
        assert f"killed {sentinel.pid}" not in result.stdout
    finally:
        sentinel.kill()


def test_environment_secrets_do_not_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETORT_TEST_SECRET", "hunter2-secret")
    code = ("import os, glob\nprint(dict(os.environ))\nfor path in glob.glob('/proc/*/environ'):\n"
            "    try:\n        print(open(path, 'rb').read())\n    except OSError:\n        pass\n")
    result = sandbox.run(code)
    assert "hunter2-secret" not in result.stdout + result.stderr
    assert "RETORT_TEST_SECRET" not in result.stdout


def test_many_snippets_run_concurrently_and_correctly() -> None:
    snippets = [f"print(sum(range({n})))" for n in range(24)]
    results = sandbox.run_many(snippets, timeout_s=10)
    assert [r.stdout.strip() for r in results] == [str(sum(range(n))) for n in range(24)]
    mixed = sandbox.run_many(["while True: pass", "print('ok')", "raise SystemExit(3)"], timeout_s=1)
    assert [r.status for r in mixed] == ["timeout", "passed", "failed"]
