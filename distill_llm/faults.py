"""Fault injection for drills and tests: real failures at named points, off unless asked for.

``DISTILL_LLM_FAULTS="kill_train_worker:step=12,rank=1; stall_train_worker:step=8"`` arms faults; entries
are ``name:key=value,...`` separated by ``;`` or ``,`` (a token holding ``name:`` starts a new entry).
A fault fires once: it first creates its marker file (``marker=PATH``, default in the temp dir), and a
restarted process that finds the marker goes on normally. Put the marker on shared storage when a
restarted worker may land on another node.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import tempfile
import time

ENV = "DISTILL_LLM_FAULTS"
_ENTRY = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*:(.*)$")


def parse(spec: str | None) -> dict[str, dict[str, str]]:
    """``"a:x=1,y=2;b:z=3"`` -> ``{"a": {"x": "1", "y": "2"}, "b": {"z": "3"}}``."""
    faults: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for token in re.split(r"[;,]", spec or ""):
        entry = _ENTRY.match(token)
        if entry and "=" not in entry.group(1):
            current = faults.setdefault(entry.group(1), {})
            token = entry.group(2)
        key, sep, value = token.partition("=")
        if not key.strip():
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
    default = f"distill_llm_fault-{name}-{hashlib.sha256(repr(sorted(params.items())).encode()).hexdigest()[:12]}"
    marker = params.get("marker") or os.path.join(tempfile.gettempdir(), default)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _due(params: dict[str, str], step: int, rank: int, default_rank: int) -> bool:
    return step == int(params["step"]) and rank == int(params.get("rank", default_rank))


# ---------------------------------------------------------------- training faults (called from train_loop)


def maybe_kill_train_worker(step: int, rank: int, spec: str | None = None) -> None:
    """``kill_train_worker:step=N[,rank=R][,delay=S][,marker=PATH]``: SIGKILL this worker after optimizer step N.

    ``delay`` waits first: Ray Train registers a reported checkpoint only when its controller next polls
    the workers (every 2 s), so a kill right after a report may lose that checkpoint.
    """
    params = active("kill_train_worker", spec)
    if params and _due(params, step, rank, 1) and _claim("kill_train_worker", params):
        time.sleep(float(params.get("delay", 0)))
        print(f"faults: killing train worker rank {rank} (pid {os.getpid()}) at step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_stall_train_worker(step: int, rank: int, spec: str | None = None) -> None:
    """``stall_train_worker:step=N[,rank=R][,seconds=S][,marker=PATH]``: sleep after step N's checkpoint.

    Holds a run still so a drill can kill the whole job at a known point (the marker is written first).
    """
    params = active("stall_train_worker", spec)
    if params and _due(params, step, rank, 0) and _claim("stall_train_worker", params):
        print(f"faults: stalling train worker rank {rank} at step {step}", flush=True)
        time.sleep(float(params.get("seconds", 3600)))
