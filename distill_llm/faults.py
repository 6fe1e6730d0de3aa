"""Fault injection for drills and tests: real failures at named points, off unless asked for.

``DISTILL_LLM_FAULTS`` arms faults: ``name:key=value,...`` entries separated by ``;`` (or ``,``; a token
holding ``name:`` starts a new entry). cluster/runtime.py forwards DISTILL_LLM_* to Ray workers::

    kill_engine:batch=2[,delay=0.5]        SIGKILL the vLLM engine-core child of the engine actor
                                           ``delay`` seconds into its 2nd batch (once)
    crash_on_prompt:<substring>            SIGKILL the engine actor whenever it is about to generate a prompt
                                           containing <substring> (every time: a prompt that always crashes;
                                           the substring holds no ``;`` ``,`` or ``=``). An engine kill
                                           already armed in the same actor lands first: see _on_engine_prompts
    kill_writer:shard=1                    SIGKILL a shard writer right after its 1st commit record lands,
                                           before its task returns (once)
    slow_engine_exit:seconds=S             hold every engine actor S seconds at its exit, its engine still up
                                           (a GPU engine slow to release its memory; every time)
    kill_train_worker:step=N[,rank=1][,delay=S]   SIGKILL a Ray Train worker after optimizer step N (once)
    stall_train_worker:step=N[,rank=0][,seconds=S] hold a worker still after step N's checkpoint (once)
    kill_rounds:round=R,after=STEP             SIGKILL `distill-llm rounds` after STEP (samples, scored) of
                                           round R, between the stages (once)

A one-shot fault first creates its marker file (``marker=PATH``, else ``$DISTILL_LLM_FAULTS_DIR/<name>.fired``)
and fires only if it made it, so a restarted actor, worker or task goes on normally. Put markers on shared
storage when a restart may land on another node. Nothing here runs unless the variable is set.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

ENV = "DISTILL_LLM_FAULTS"
DIR_ENV = "DISTILL_LLM_FAULTS_DIR"
_ENTRY = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*:(.*)$")


def parse(spec: str | None) -> dict[str, dict[str, str]]:
    """``"a:x=1,y=2;b:z=3;c:text"`` -> ``{"a": {"x": "1", "y": "2"}, "b": {"z": "3"}, "c": {"text": "text"}}``."""
    faults: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for token in re.split(r"[;,]", spec or ""):
        entry = _ENTRY.match(token)
        starts = bool(entry and "=" not in entry.group(1))
        if starts:
            current = faults.setdefault(entry.group(1), {})
            token = entry.group(2)
        key, sep, value = token.partition("=")
        if not key.strip():
            continue
        if current is not None and starts and not sep:  # a bare argument: crash_on_prompt:<substring>
            current["text"] = token.strip()
            continue
        if current is None or not sep:
            raise ValueError(f"{ENV}={spec!r}: expected name:key=value entries, got {token.strip()!r}")
        current[key.strip()] = value.strip()
    return faults


def active(name: str, spec: str | None = None) -> dict[str, str] | None:
    """The settings of fault ``name`` when armed (in ``spec``, default the environment), else None."""
    return parse(os.environ.get(ENV) if spec is None else spec).get(name)


def _claim(name: str, params: dict[str, str]) -> bool:
    """True the first time only: the marker file is created atomically, so a restart does not fire again."""
    marker = params.get("marker")
    if not marker:
        folder = os.environ.get(DIR_ENV)
        if not folder:  # no silent default: a stale marker from an earlier drill would disarm this one
            raise RuntimeError(f"{ENV} arms the one-shot fault {name!r}: give it marker=PATH or set {DIR_ENV}")
        Path(folder).mkdir(parents=True, exist_ok=True)
        marker = str(Path(folder) / f"{name}.fired")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _announce(message: str) -> None:
    print(f"distill-llm fault injection (pid {os.getpid()}): {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- generation faults (teacher/engine.py, corpus/shards.py)


def _engine_core_children() -> list[int]:
    import psutil

    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:  # children exit or linger as zombies while we look
            if "EngineCore" in proc.name() or "EngineCore" in " ".join(proc.cmdline()[:1]):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


_pending_engine_kill: threading.Timer | None = None  # kill_engine's timer in this actor, once armed


def _kill_engine_core(delay: float) -> None:
    global _pending_engine_kill

    def kill() -> None:
        pids = _engine_core_children() or [os.getpid()]  # an in-process engine: the actor is the engine
        _announce(f"SIGKILL engine-core process(es) {pids}")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    if delay > 0:  # mid-batch: the engine is busy with the batch's requests when it dies
        _pending_engine_kill = threading.Timer(delay, kill)
        _pending_engine_kill.start()
    else:
        kill()


def _on_engine_batch(n: int, rank: int, prompts: list[str] | None) -> None:
    """``kill_engine``: an engine actor starts its ``n``-th batch (1-based, per process)."""
    params = active("kill_engine")
    if params and n == int(params.get("batch", 1)) and _claim("kill_engine", params):
        _kill_engine_core(float(params.get("delay", 0.5)))


def _on_engine_prompts(n: int, rank: int, prompts: list[str] | None) -> None:
    """``crash_on_prompt``: an engine actor is about to hand ``prompts`` (their text) to the engine."""
    needle = (active("crash_on_prompt") or {}).get("text")
    if needle and any(needle in p for p in prompts or ()):
        if _pending_engine_kill is not None and _pending_engine_kill.is_alive():
            # Two faults in one actor land in the order they were armed: the engine kill fires, the engine
            # refuses this batch with EngineDeadError, the actor exits for its restart, and the retried
            # batch meets this fault in the new actor. A kill of this actor first would lose the other.
            _pending_engine_kill.join()
            return
        _announce(f"SIGKILL this engine actor: a prompt contains {needle!r}")
        os.kill(os.getpid(), signal.SIGKILL)


def _on_engine_close(n: int, rank: int, prompts: list[str] | None) -> None:
    """``slow_engine_exit``: an engine actor is about to shut its engine down (Ray Data released it)."""
    params = active("slow_engine_exit")
    if params:
        seconds = float(params.get("seconds", 5))
        _announce(f"holding this engine actor {seconds:g}s before its engine shuts down")
        time.sleep(seconds)


def _on_shard_commit(n: int, rank: int, prompts: list[str] | None) -> None:
    """``kill_writer``: a shard writer's ``n``-th commit record (1-based, per process) has landed."""
    params = active("kill_writer")
    if params and n == int(params.get("shard", 1)) and _claim("kill_writer", params):
        _announce("SIGKILL this shard writer after its commit, before its task returns")
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- training faults (student/loop.py)


def _due(params: dict[str, str], step: int, rank: int, default_rank: int) -> bool:
    return step == int(params["step"]) and rank == int(params.get("rank", default_rank))


def _on_train_step(n: int, rank: int, prompts: list[str] | None) -> None:
    """``kill_train_worker``: SIGKILL this worker after optimizer step N.

    ``delay`` waits first: Ray Train registers a reported checkpoint only when its controller next polls
    the workers (every 2 s), so a kill right after a report may lose that checkpoint.
    """
    params = active("kill_train_worker")
    if params and _due(params, n, rank, 1) and _claim("kill_train_worker", params):
        time.sleep(float(params.get("delay", 0)))
        _announce(f"killing train worker rank {rank} at step {n}")
        os.kill(os.getpid(), signal.SIGKILL)


def _on_train_checkpoint(n: int, rank: int, prompts: list[str] | None) -> None:
    """``stall_train_worker``: sleep after step N's checkpoint, so a drill can kill the whole job there."""
    params = active("stall_train_worker")
    if params and _due(params, n, rank, 0) and _claim("stall_train_worker", params):
        _announce(f"stalling train worker rank {rank} at step {n}")
        time.sleep(float(params.get("seconds", 3600)))


def _on_rounds_step(n: int, rank: int, prompts: list[str] | None) -> None:
    """``kill_rounds``: round ``n`` finished the step named in ``prompts`` (rounds/stage.py)."""
    params = active("kill_rounds")
    if (params and n == int(params.get("round", 1)) and prompts == [params.get("after", "scored")]
            and _claim("kill_rounds", params)):
        _announce(f"SIGKILL distill-llm rounds after round {n}'s {prompts[0]}")
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- the hook production code calls

_POINTS = {"engine_batch": _on_engine_batch, "engine_prompts": _on_engine_prompts, "engine_close": _on_engine_close,
           "shard_commit": _on_shard_commit, "train_step": _on_train_step, "train_checkpoint": _on_train_checkpoint,
           "rounds_step": _on_rounds_step}


def point(where: str, n: int = 0, *, rank: int = 0, prompts: list[str] | None = None) -> None:
    """A named drill point: fires the fault ``DISTILL_LLM_FAULTS`` arms there, else does nothing.

    ``n`` counts what the point counts (batch, commit, optimizer step), ``rank`` is a Train worker's rank,
    ``prompts`` the texts an engine is about to generate (at ``rounds_step``: the step a round finished).
    """
    if where not in _POINTS:
        raise ValueError(f"unknown fault point {where!r}; known: {sorted(_POINTS)}")
    if os.environ.get(ENV):
        _POINTS[where](n, rank, prompts)


def arm(spec: str | None) -> None:
    """Arm ``spec`` in this process: Train workers get the driver's drills even when Ray was started earlier."""
    if spec:
        os.environ[ENV] = spec
