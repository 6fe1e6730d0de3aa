"""A run that succeeded prints no resource-tracker ``KeyError`` (README "Bad input", issue 12 item 11).

When Ray ends an engine actor (released by Ray Data, or failing in ``__init__``) it kills the actor's child
processes, multiprocessing's resource tracker among them, while vLLM's engine-core and worker processes
(spawned, so they share the actor's tracker through its pipe) may live on and shut down after it. Their
semaphores (``/mp-*``) and shared memory (``/psm_*``) are then finalized with no tracker: each is unlinked,
then unregistered, and the unregister relaunches an empty tracker that prints a ``KeyError`` traceback for
a name it never saw. Unlinking is what frees a resource; a tracker that did not record it has nothing to
forget, so that unregister is skipped.

Standard library only: every process the engine starts imports this module first.
"""

from __future__ import annotations

from functools import partial


def guard_resource_tracker() -> None:
    """Install the guard in this process and in every process it starts from now on (their targets run
    through ``_run_guarded``, which installs it there before anything else). Idempotent."""
    from multiprocessing import resource_tracker
    from multiprocessing.process import BaseProcess

    if getattr(resource_tracker.unregister, "_distill_llm", False):
        return
    tracker = resource_tracker._resource_tracker
    register, unregister = resource_tracker.register, resource_tracker.unregister
    # A tracker is told apart by its pid and pipe: a spawned process knows only the pipe it inherited.
    before = (tracker._pid, tracker._fd)  # the tracker of names registered before this guard
    told: dict[tuple[str, str], tuple[int | None, int | None]] = {}

    def register_noting_tracker(name: str, rtype: str) -> None:
        register(name, rtype)
        told[(name, rtype)] = (tracker._pid, tracker._fd)

    def unregister_while_tracked(name: str, rtype: str) -> None:
        pid, fd = told.pop((name, rtype), before)
        if fd is not None and (tracker._pid, tracker._fd) == (pid, fd) and tracker._check_alive():
            unregister(name, rtype)

    unregister_while_tracked._distill_llm = True
    resource_tracker.register, resource_tracker.unregister = register_noting_tracker, unregister_while_tracked

    start = BaseProcess.start

    def start_guarded(self) -> None:
        if self._target is not None and not _is_guarded(self._target):
            self._target = partial(_run_guarded, self._target)
        start(self)

    BaseProcess.start = start_guarded


def _is_guarded(target) -> bool:
    return isinstance(target, partial) and target.func is _run_guarded


def _run_guarded(target, *args, **kwargs):
    """A started process's entry point: the guard, then its own target (pickled by name for spawn)."""
    guard_resource_tracker()
    return target(*args, **kwargs)
