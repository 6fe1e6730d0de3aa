"""Names that plug-ins add: built-in models, answer checkers and prompt sources.

The core never imports a plug-in. A plug-in is a module named under the ``distill_llm.plugins`` entry
point group (pyproject.toml; the toy world is one) or in ``DISTILL_LLM_PLUGINS`` (comma-separated module
names, forwarded to Ray workers like every ``DISTILL_LLM_*`` variable). Plug-ins are imported the first
time a name is looked up, in whichever process looks it up (driver or Ray worker), and register their
names with the functions below.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable

Checker = Callable[[str, str], bool]
PLUGIN_GROUP = "distill_llm.plugins"
PLUGIN_ENV = "DISTILL_LLM_PLUGINS"


@dataclass(frozen=True)
class BuiltinModel:
    """A model known by name: ``path()`` gives (or builds) its folder; ``config()``, when given, its
    transformers config without building the weights (for ``plan``)."""

    path: Callable[[], str]
    config: Callable[[], Any] | None = None


MODELS: dict[str, BuiltinModel] = {}
CHECKERS: dict[str, Checker] = {}
# prefix -> fn(split, limit) -> list of {prompt|messages, answer} rows; ``data.prompts: PREFIX:SPLIT``
PROMPT_SOURCES: dict[str, Callable[[str, int | None], list[dict[str, Any]]]] = {}
_loaded = False


def register_model(name: str, path: Callable[[], str], config: Callable[[], Any] | None = None) -> None:
    MODELS[name] = BuiltinModel(path, config)


def register_checker(name: str, checker: Checker) -> None:
    CHECKERS[name] = checker


def register_prompt_source(prefix: str, make: Callable[[str, int | None], list[dict[str, Any]]]) -> None:
    PROMPT_SOURCES[prefix] = make


def load_plugins() -> None:
    """Import every plug-in once per process (entry points, then ``DISTILL_LLM_PLUGINS``)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from importlib.metadata import entry_points

    names = [ep.value for ep in entry_points(group=PLUGIN_GROUP)]
    names += [n.strip() for n in os.environ.get(PLUGIN_ENV, "").split(",") if n.strip()]
    for name in dict.fromkeys(names):
        importlib.import_module(name)


def model(name: str) -> BuiltinModel | None:
    load_plugins()
    return MODELS.get(name)


def checker(name: str) -> Checker | None:
    load_plugins()
    return CHECKERS.get(name)


def checker_names() -> list[str]:
    load_plugins()
    return sorted(CHECKERS)


def prompt_source(source: str) -> tuple[Callable[[str, int | None], list[dict[str, Any]]], str] | None:
    """(maker, split) when ``source`` is ``PREFIX:SPLIT`` of a registered prompt source, else None."""
    prefix, sep, split = source.partition(":")
    if not sep:
        return None
    load_plugins()
    make = PROMPT_SOURCES.get(prefix)
    return (make, split) if make else None
