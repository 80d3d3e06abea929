"""The agent's tool-call format (strict parsing, malformed calls as turns) and its tools (sandboxed python, a
calculator), hostile calls included: each is contained and comes back as a failed call."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pydantic
import pytest

from rewards import sandbox
from rewards.tools import ToolBox, ToolRef, calculator_tool
from rollout.agent import ToolCall, ToolResult, parse_turn, render_call, tool_message

needs_namespaces = pytest.mark.skipif(not sandbox.isolation_mode().startswith("namespaces"),
                                      reason="needs root and unshare (namespaces + uid drop)")


def test_a_turn_without_a_call_is_a_final_answer() -> None:
    assert parse_turn("The answer is 42.").call is None


@pytest.mark.parametrize("text, name, body", [
    ('<tool_call name="python">print(6 * 7)</tool_call>', "python", "print(6 * 7)"),
    ('I compute it.\n<tool_call name="calculator">4821 * 7713</tool_call>\n  ', "calculator", "4821 * 7713"),
    ('<tool_call name="python">s = "<b>&amp;</b>"\nprint(s < "z")</tool_call>', "python",
     's = "<b>&amp;</b>"\nprint(s < "z")'),  # the body is raw text: nothing to escape
])
def test_a_well_formed_call(text: str, name: str, body: str) -> None:
    turn = parse_turn(text)
    assert turn.call == ToolCall(name, body) and not turn.call.malformed
    assert render_call(name, body) in text


@pytest.mark.parametrize("text, error", [
    ('<tool_call name="python">print(1)', "has no </tool_call>"),
    ("<tool_call name='python'>print(1)</tool_call>", "expected <tool_call name=\"TOOL\">"),
    ("<tool_call>print(1)</tool_call>", "expected <tool_call name=\"TOOL\">"),
    ('<tool_call name="py thon">x</tool_call>', "expected <tool_call name=\"TOOL\">"),
    ('<tool_call name="python">print(1)</tool_call> so it is 1', "text after </tool_call>: 'so it is 1'"),
    ('<tool_call name="python">1</tool_call><tool_call name="python">2</tool_call>', "one tool call per turn"),
    ('<tool_call name="python"><tool_call name="python">1</tool_call>', "a tool call inside a tool call"),
    ("print(1)</tool_call>", "</tool_call> without an opening"),
])
def test_a_malformed_call_is_a_turn_not_a_crash(text: str, error: str) -> None:
    call = parse_turn(text).call
    assert call is not None and call.malformed and error in call.error
    [result] = ToolBox([ToolRef(name="calculator")]).run([call])
    assert result.status == "malformed" and error in result.output  # what the model reads back


def test_render_call_refuses_what_cannot_be_parsed_back() -> None:
    with pytest.raises(ValueError):
        render_call("python", "print('</tool_call>')")
    with pytest.raises(ValueError):
        render_call("no such", "1")


def test_calculator_computes_and_executes_nothing() -> None:
    calc = calculator_tool()
    assert calc("4821 * 7713").output == str(4821 * 7713)
    assert calc(" (17 + 5) * -3 ").output == "-66" and calc("7 / 2").output == "3.5" and calc("10/2").output == "5"
    assert calc("2 ** 10 % 1000 // 3").output == str(2 ** 10 % 1000 // 3)
    for hostile, error in [("__import__('os').system('id')", "not arithmetic"), ("1 / 0", "ZeroDivisionError"),
                           ("9 ** 9 ** 9", "exponent"), ("(10 ** 99) ** 99", "digits"), ("1 +", "SyntaxError"),
                           ("'a' * 3", "not arithmetic")]:
        result = calc(hostile)
        assert result.status == "error" and error in result.output, (hostile, result)


def test_python_runs_in_the_sandbox_with_its_limits() -> None:
    # 3 s: a Python start in the sandbox on a loaded two-core machine has taken over 1 s
    box = ToolBox([ToolRef(name="python", args={"timeout_s": 3.0, "memory_mb": 128})])
    ok, failed, slow = box.run([ToolCall("python", "print(4821 * 7713)"), ToolCall("python", "print(1 / 0)"),
                                ToolCall("python", "while True:\n    pass")])
    assert ok.ok and ok.output == str(4821 * 7713) and ok.exit_code == 0
    assert ok.limits["timeout_s"] == 3.0 and ok.limits["memory_mb"] == 128 and ok.limits["isolation"]
    assert failed.status == "error" and "ZeroDivisionError" in failed.output and failed.exit_code == 1
    assert slow.status == "timeout" and slow.exit_code is None and "3 s" in slow.output
    assert tool_message(ok) == {"role": "tool", "content": str(4821 * 7713)}
    assert tool_message(slow)["content"].startswith("[timeout] ")


def test_unknown_tool_and_results_in_call_order() -> None:
    box = ToolBox([ToolRef(name="calculator"), ToolRef(name="python")], max_concurrency=3)
    results = box.run([ToolCall("python", f"print({i} * 3)") if i % 2 else ToolCall("calculator", f"{i} * 3")
                       for i in range(6)] + [ToolCall("shell", "ls")])
    assert [r.output for r in results[:6]] == [str(i * 3) for i in range(6)]
    assert results[6] == ToolResult("no tool 'shell'; the tools are: calculator, python", "unknown_tool")
    told: dict[int, ToolResult] = {}  # each answer as it comes (the trajectory log writes it then)
    again = box.run([ToolCall("python", "import time; time.sleep(1); print(1)"), ToolCall("calculator", "2 + 2")],
                    on_result=lambda i, result: told.setdefault(i, result))
    assert list(told) == [1, 0] and [told[0], told[1]] == again and again[1].output == "4"


def test_tool_refs_are_checked_like_rewards() -> None:
    with pytest.raises(pydantic.ValidationError, match="unknown tool 'shell'; known tools: calculator, python"):
        ToolRef(name="shell")
    with pytest.raises(pydantic.ValidationError, match=r"tool 'python': .*timeout.*it accepts: timeout_s"):
        ToolRef(name="python", args={"timeout": 3})
    with pytest.raises(pydantic.ValidationError, match="tool 'python': timeout_s='two': Input should be a valid"):
        ToolRef(name="python", args={"timeout_s": "two"})


@needs_namespaces
def test_hostile_calls_are_contained_and_fail() -> None:
    """Fork bomb, network, a write outside its directory, killing its parent: the host is untouched and each
    comes back as a failed call (not ok), with the limits it ran under."""
    marker = Path(__file__).parent / f"retort-tool-{uuid.uuid4().hex}"  # /tmp is the sandbox's own tmpfs
    sentinel = subprocess.Popen(["sleep", "30"])
    box = ToolBox([ToolRef(name="python", args={"timeout_s": 2.0, "max_processes": 16})])
    try:
        results = box.run([
            ToolCall("python", "import os\nwhile True:\n    os.fork()"),
            ToolCall("python", "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)"),
            ToolCall("python", f"open({str(marker)!r}, 'w').write('x')"),
            ToolCall("python", f"import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
                               f"os.kill({os.getpid()}, signal.SIGKILL)\nos.kill({sentinel.pid}, signal.SIGKILL)\n"
                               "import time\ntime.sleep(5)\nprint('still here')"),
        ])
        assert sentinel.poll() is None and not marker.exists()  # this process answered: it was not killed
    finally:
        sentinel.kill()
    for result in results:
        assert not result.ok and result.status in {"error", "timeout", "limit"}, result
        assert "still here" not in result.output and result.limits["timeout_s"] == 2.0
