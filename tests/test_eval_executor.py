"""Code execution: HumanEval canonical solutions pass, wrong ones fail, hostile programs are contained."""

import math
import os
import socket
import time

import pytest

from megallama.eval import metrics
from megallama.eval.executor import Limits, humaneval_program, run_program
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
    start = time.monotonic()
    r = run_program("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n", FAST)
    assert r.passed and time.monotonic() - start < 2  # its program ran to the end; the child holds no pipe open
    time.sleep(0.2)
    assert "_megallama_main" not in os.popen("ps -eo args").read()  # and is gone


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


OUTSIDE = os.path.abspath("megallama-hostile-completion.txt")  # (its /tmp is its own working directory)
HOSTILE = {
    "infinite loop": "    while True:\n        pass\n",
    "fork bomb": "    import os\n    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass\n",
    "write outside": f"    open({OUTSIDE!r}, 'w').write('x')\n    return True\n",
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
    assert not os.path.exists(OUTSIDE)


# ---- every resource bounded; a pass only when the tests ran to their end --------------------------

FLOOD = "import os\nb = b'x' * (1 << 20)\nwhile True:\n    os.write(1, b)\n    os.write(2, b + b'\\n')\n"
RSS_PROBE = f"""
import json, resource, sys, time
from megallama.eval.executor import Limits, run_program
run_program("pass")  # everything imported
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.monotonic()
r = run_program({FLOOD!r}, Limits(timeout_s=3, cpu_s=3))
print(json.dumps({{"grew_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
                  "seconds": time.monotonic() - start, "status": r.status, "bytes": r.output_bytes,
                  "truncated": r.truncated}}))
"""


def test_output_flood_keeps_the_evaluator_small_and_on_time():
    import json
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", RSS_PROBE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    # the flood writes on the order of a GB in its 3 s; the evaluator keeps 64 KiB per stream
    assert got["grew_mb"] < 50 and got["status"] == "timeout" and got["truncated"], got
    assert got["bytes"] > 64 * 1024 * 4 and got["seconds"] < 4.5, got


def _humaneval_with(extra: str):
    """The canonical solution with ``extra`` at module level after it, or (indented) first in its body."""
    task = humaneval(humaneval_default_path())[0]
    solution = task.extra["canonical_solution"]
    return task, extra + solution if extra.startswith("    ") else solution + extra


EARLY_EXITS = {
    "exit()": "\nexit()\n",
    "quit(0)": "\nquit(0)\n",
    "sys.exit(0)": "\nimport sys\nsys.exit(0)\n",
    "raise SystemExit": "\nraise SystemExit\n",
    "os._exit(0)": "\nimport os\nos._exit(0)\n",
    "SIGKILL self": "\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "inside the function": "    import os\n    os._exit(0)\n",
    "exit from a thread": "\nimport os, threading\nthreading.Thread(target=os._exit, args=(0,)).start()\nimport time\ntime.sleep(5)\n",
    # write what a sentinel might look like everywhere, wake any waiting thread, then leave early
    "forged writes": ("\nimport os, time\nfor fd in range(3, 64):\n    for data in (b'g', b'0' * 64, b'PASSED\\n'):\n"
                      "        try:\n            os.write(fd, data)\n        except OSError:\n            pass\n"
                      "print('0' * 64, 'PASSED')\ntime.sleep(0.3)\nos._exit(0)\n"),
    # walk the interrupted frames from a signal handler into the loader, then try the same
    "frame walk": ("\nimport os, signal, time\nseen = []\ndef h(sig, frame):\n    while frame is not None:\n"
                   "        seen.append(dict(frame.f_locals))\n        frame = frame.f_back\n"
                   "signal.signal(signal.SIGALRM, h)\nsignal.setitimer(signal.ITIMER_REAL, 0.01)\ntime.sleep(0.1)\n"
                   "for d in seen:\n    for v in d.values():\n        if isinstance(v, int) and 2 < v < 64:\n"
                   "            try:\n                os.write(v, b'g')\n            except OSError:\n                pass\n"
                   "time.sleep(0.3)\nos._exit(0)\n"),
    "introspection": ("\nimport gc, sys, os\nfor f in (sys._current_frames, gc.get_objects, lambda: open('/proc/self/mem', 'rb'),\n"
                      "          lambda: __import__('ctypes')):\n    try:\n        f()\n    except Exception:\n        pass\nos._exit(0)\n"),
}


@pytest.mark.parametrize("name", list(EARLY_EXITS))
def test_an_early_exit_is_not_a_pass(name):
    task, completion = _humaneval_with(EARLY_EXITS[name])
    r = run_program(humaneval_program(task.context, completion, task.extra["test"], task.extra["entry_point"]), FAST)
    assert not r.passed and r.status != "passed", r


def test_the_tests_running_to_their_end_is_a_pass_whatever_the_exit_status():
    task, completion = _humaneval_with("")
    assert run_program(humaneval_program(task.context, completion, task.extra["test"], task.extra["entry_point"]), FAST).passed
    task, completion = _humaneval_with("\nimport atexit, os\natexit.register(os._exit, 3)\n")
    r = run_program(humaneval_program(task.context, completion, task.extra["test"], task.extra["entry_point"]), FAST)
    assert r.passed, r


DISK_FILLER = ("b = b'x' * (1 << 20)\ni = 0\ntry:\n    while True:\n        with open(f'f{i}', 'wb') as f:\n"
               "            f.write(b)\n        i += 1\nexcept OSError as e:\n    raise RuntimeError(f'wrote {i} MB') from e\n")
MANY_FILES = "i = 0\nwhile True:\n    open(f'e{i}', 'w').close()\n    i += 1\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="the tmpfs quota needs root")
def test_disk_use_is_bounded_by_a_tmpfs_as_root():
    limits = Limits(timeout_s=5, cpu_s=5, disk_mb=8, file_mb=4, max_inodes=256)
    r = run_program(DISK_FILLER, limits)
    assert not r.passed and r.detail.startswith("RuntimeError: wrote ")
    assert int(r.detail.split()[2]) <= 8, r  # ENOSPC at the quota, in its private tmpfs
    r = run_program(MANY_FILES, limits)
    assert not r.passed and "No space left on device" in r.detail, r


def test_disk_use_is_bounded_without_root():
    limits = Limits(timeout_s=5, cpu_s=5, disk_mb=8, file_mb=4, max_inodes=256)
    before = set(os.listdir("/tmp"))
    for program in (DISK_FILLER, MANY_FILES):
        r = run_program(program, limits, isolate=False)
        assert not r.passed and "disk quota exceeded" in r.detail and r.seconds < 2, r
    assert not {p for p in set(os.listdir("/tmp")) - before if p.startswith("megallama-exec-")}
