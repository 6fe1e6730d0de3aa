"""Answer checkers, chosen by name from the config (``data.checker``)."""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Callable

from .. import registry
from ..config import ConfigError

Checker = Callable[[str, str], bool]


def _exact(completion: str, answer: str) -> bool:
    """The text after the think block, stripped, equals the answer."""
    return completion.rsplit("</think>", 1)[-1].strip() == answer.strip()


class CheckerUnavailable(RuntimeError):
    """The checker itself could not run (not: the answer was wrong); never counted as a wrong answer."""


def _math_verify(completion: str, answer: str) -> bool:
    """Symbolic equivalence with math-verify (handles \\boxed{}, LaTeX, fractions...).

    math-verify bounds each parse and verify with ``signal.alarm``, which works on a main thread only;
    elsewhere it logs an error and returns "no answer". So this runs on a main thread: the caller's, or
    the helper process's of ``_math``.
    """
    from math_verify import parse, verify

    tail = completion.rsplit("</think>", 1)[-1]
    gold = parse(answer if "$" in answer or "\\" in answer else f"${answer}$", raise_on_error=True)
    return bool(gold) and bool(verify(gold, parse(tail, raise_on_error=True), raise_on_error=True))


# Off the main thread (Ray Data runs an actor's batches in a worker thread: the teacher and evaluation
# engines) a check goes to a helper process, one per process, that runs it on its own main thread, so
# math-verify's own time limits hold; MATH_TIMEOUT_S bounds a check whose helper stops answering. The
# helper is a plain subprocess speaking JSON lines: multiprocessing's spawn would re-run the parent's
# __main__ (a Ray worker's script) in it.
MATH_TIMEOUT_S = 60.0


class _MathHelper:
    def __init__(self):
        import subprocess

        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from distill_llm.evaluation.checkers import serve_math; serve_math()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)

    def check(self, completion: str, answer: str) -> bool | None:
        """The verdict, or None when the helper did not answer in time."""
        import select

        self.proc.stdin.write(json.dumps([completion, answer]) + "\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], MATH_TIMEOUT_S)[0]:
            return None
        line = self.proc.stdout.readline()
        if not line:
            raise CheckerUnavailable(f"the math checker's helper process exited (code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def serve_math() -> None:
    """The helper's loop: one ``[completion, answer]`` JSON line in, one verdict line out."""
    for line in sys.stdin:
        completion, answer = json.loads(line)
        try:
            verdict = _math_verify(completion, answer)
        except Exception:  # as check() does on the main thread: a malformed answer is wrong
            verdict = False
        print(json.dumps(verdict), flush=True)


_helper: _MathHelper | None = None
_helper_lock = threading.Lock()


def _math(completion: str, answer: str) -> bool:
    global _helper
    if threading.current_thread() is threading.main_thread():
        return _math_verify(completion, answer)
    with _helper_lock:  # one check at a time per helper
        if _helper is None:
            _helper = _MathHelper()
        try:
            verdict = _helper.check(completion, answer)
        except (OSError, CheckerUnavailable):
            _helper.close()
            _helper = None
            raise
        if verdict is None:  # stuck on an expression math-verify could not bound: wrong; a fresh helper next
            _helper.close()
            _helper = None
            return False
        return verdict


registry.register_checker("exact", _exact)
registry.register_checker("math", _math)


def get_checker(name: str) -> Checker | None:
    """The named checker, or None for 'none'."""
    if name == "none":
        return None
    found = registry.checker(name)
    if found is None:
        raise ConfigError(f"data.checker: unknown checker {name!r}; choose one of {registry.checker_names() + ['none']}")
    return found


def check(checker: Checker | None, completion: str, answer: str | None) -> bool | None:
    """True/False when there is a reference answer and a checker, else None; never raises."""
    if checker is None or answer is None or answer == "":
        return None
    try:
        return checker(completion, answer)
    except (CheckerUnavailable, OSError):  # the checker could not run: an error, not a wrong answer
        raise
    except Exception:  # a malformed answer counts as wrong, not as a crash mid-run
        return False
