"""Code execution: HumanEval canonical solutions pass, wrong ones fail, hostile programs are contained."""

import math
import os
import socket
import time

import pytest

from megallama.eval import metrics
from megallama.eval.executor import Limits, run_program
from megallama.eval.formats import humaneval, humaneval_default_path, mbpp
from megallama.eval.harness import score_code

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "eval")
FAST = Limits(timeout_s=2.0, cpu_s=2)


def test_pass_at_k_matches_closed_form():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                want = 1.0 - math.comb(n - c, k) / math.comb(n, k)
                assert metrics.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError):
        metrics.pass_at_k(3, 1, 4)


@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    tasks = humaneval(humaneval_default_path())
    assert len(tasks) == 164
    good, records = score_code(tasks, [[t.extra["canonical_solution"]] for t in tasks], [1], Limits(timeout_s=20))
    assert good["pass@1"] == 1.0, [r for r in records if not r["passed"]][:2]
    bad, _ = score_code(tasks[:20], [["    raise NotImplementedError\n"] for _ in tasks[:20]], [1], FAST)
    assert bad["pass@1"] == 0.0


def test_pass_at_k_over_mixed_samples():
    tasks = humaneval(humaneval_default_path())[:2]
    samples = [[t.extra["canonical_solution"], "    return None\n", "    pass\n"] for t in tasks]
    scores, records = score_code(tasks, samples, [1, 2, 3], FAST)
    assert [r["passed"] for r in records] == [1, 1]
    assert scores["pass@1"] == pytest.approx(1 / 3) and scores["pass@2"] == pytest.approx(2 / 3)
    assert scores["pass@3"] == 1.0


def test_mbpp_reference_code_passes():
    tasks = mbpp(os.path.join(FIX, "mbpp.jsonl"))
    scores, _ = score_code(tasks, [[t.extra["canonical_solution"]] for t in tasks], [1], FAST)
    assert scores["pass@1"] == 1.0
    scores, _ = score_code(tasks, [["def min_of_two(a, b):\n  return b"]] * 2, [1], FAST)
    assert scores["pass@1"] == 0.0


def test_infinite_loop_is_killed():
    start = time.monotonic()
    r = run_program("while True:\n    pass\n", FAST)
    # whichever comes first: the wall-clock timeout or the CPU limit (SIGXCPU)
    assert not r.passed and (r.status == "timeout" or r.detail == "killed by SIGXCPU"), r
    assert time.monotonic() - start < 6


def test_fork_bomb_is_contained():
    start = time.monotonic()
    r = run_program("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n", FAST)
    assert not r.passed and time.monotonic() - start < 8
    time.sleep(0.2)
    assert "program.py" not in os.popen("ps -eo args").read()


def test_escaped_child_is_killed():
    r = run_program("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n", FAST)
    assert not r.passed


def test_writing_outside_the_working_directory_fails(tmp_path):
    targets = [str(tmp_path / "escaped.txt"), "/tmp/megallama-sandbox-escape.txt", os.path.abspath("escaped.txt")]
    for t in targets:
        if os.path.exists(t):
            os.remove(t)
    r = run_program("".join(f"open({t!r}, 'w').write('x')\n" for t in targets), FAST)
    assert not r.passed
    for t in targets:
        assert not os.path.exists(t)
    assert run_program("open('inside.txt', 'w').write('ok')\nassert open('inside.txt').read() == 'ok'\n", FAST).passed


@pytest.mark.parametrize("code", [
    "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n",
    "import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n",
])
def test_opening_a_socket_fails(code):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    try:
        r = run_program(code.format(port=server.getsockname()[1]), FAST)
        assert not r.passed
        with pytest.raises(socket.timeout):
            server.accept()  # nothing reached the host
    finally:
        server.close()


def test_memory_limit():
    r = run_program("x = bytearray(8 * 1024 ** 3)\n", FAST)
    assert not r.passed and "MemoryError" in r.detail


def test_answer_metrics():
    assert metrics.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert metrics.exact_match(" the Paris.", ["Paris", "City of Light"])
    assert not metrics.exact_match("Lyon", ["Paris"])
    assert metrics.gsm8k_answer("so 48+24 = 72.\n#### 72") == "72"
    assert metrics.gsm8k_answer("She earned $1,010.00 in total.") == "1010"
    assert metrics.math_answer("thus $\\boxed{\\dfrac{1}{2}}$.") == "\\frac{1}{2}"
    assert metrics.last_boxed("\\boxed{a{b}c} and \\boxed{x}") == "x"
    assert metrics.majority_vote(["3", None, "4", "4", "3"]) == "3"
    assert metrics.majority_vote([None, ""]) is None


HOSTILE = {
    "infinite loop": "    while True:\n        pass\n",
    "fork bomb": "    import os\n    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass\n",
    "write outside": "    open('/tmp/megallama-hostile-completion.txt', 'w').write('x')\n    return True\n",
    "socket": "    import socket\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n    return True\n",
}


def test_hostile_completions_score_as_failed():
    task = humaneval(humaneval_default_path())[0]
    # 8 s of wall clock: on a loaded CI machine the socket completion was once killed by FAST's 2 s
    # before it reached its connect (the loop still stops at the 2 s CPU limit)
    scores, records = score_code([task], [list(HOSTILE.values())], [1, 4], Limits(timeout_s=8.0, cpu_s=2))
    assert scores == {"pass@1": 0.0, "pass@4": 0.0}
    assert "passed" not in records[0]["status"]
    assert records[0]["detail"][2].startswith("PermissionError") and "network" in records[0]["detail"][3]
    assert not os.path.exists("/tmp/megallama-hostile-completion.txt")
