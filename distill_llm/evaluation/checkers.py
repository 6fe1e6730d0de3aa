"""Answer checkers, chosen by name from the config (``data.checker``)."""

from __future__ import annotations

from typing import Callable

from .. import registry
from ..config import ConfigError

Checker = Callable[[str, str], bool]


def _exact(completion: str, answer: str) -> bool:
    """The text after the think block, stripped, equals the answer."""
    return completion.rsplit("</think>", 1)[-1].strip() == answer.strip()


def _math(completion: str, answer: str) -> bool:
    """Symbolic equivalence with math-verify (handles \\boxed{}, LaTeX, fractions...)."""
    from math_verify import parse, verify

    tail = completion.rsplit("</think>", 1)[-1]
    gold = parse(answer if "$" in answer or "\\" in answer else f"${answer}$")
    return bool(gold) and bool(verify(gold, parse(tail)))


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
    except Exception:  # a malformed answer counts as wrong, not as a crash mid-run
        return False
