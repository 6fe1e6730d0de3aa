"""Fault injection for tests and drills: real kills at chosen points, driven by an environment variable.

``DISTILL_LLM_FAULTS`` holds ``;``-separated faults (runtime.py forwards DISTILL_LLM_* to Ray workers)::

    kill_engine:batch=2[,delay=0.5]   SIGKILL the vLLM engine-core child process of the engine actor
                                      ``delay`` seconds into its 2nd batch (once per run)
    crash_on_prompt:<substring>       SIGKILL the engine actor whenever it is about to generate a prompt
                                      containing <substring> (every time: a prompt that always crashes)
    kill_writer:shard=1               SIGKILL a shard-writing worker right after its task's 1st commit record
                                      lands, before the task returns (once per run)

One-shot faults leave a marker in ``DISTILL_LLM_FAULTS_DIR`` when they fire, so a restarted actor or a
retried task does not fire them again. Nothing here runs unless the variable is set.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

ENV = "DISTILL_LLM_FAULTS"
DIR_ENV = "DISTILL_LLM_FAULTS_DIR"


def _faults() -> dict[str, str]:
    spec = os.environ.get(ENV, "").strip()
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        name, _, arg = item.partition(":")
        out[name.strip()] = arg
    return out


def _options(arg: str) -> dict[str, float]:
    return {k.strip(): float(v) for k, _, v in (p.partition("=") for p in arg.split(",") if p.strip())}


def _claim(name: str) -> bool:
    """True the first time a one-shot fault fires in this run (an exclusive marker file)."""
    folder = os.environ.get(DIR_ENV)
    if not folder:
        raise RuntimeError(f"{ENV} sets the one-shot fault {name!r}: set {DIR_ENV} to a folder for its marker")
    Path(folder).mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(Path(folder) / f"{name}.fired", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _announce(message: str) -> None:
    print(f"distill-llm fault injection (pid {os.getpid()}): {message}", file=sys.stderr, flush=True)


def _engine_core_children() -> list[int]:
    import psutil

    procs = psutil.Process().children(recursive=True)
    return [p.pid for p in procs if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()[:1])]


def _kill_engine_core(delay: float) -> None:
    def kill() -> None:
        pids = _engine_core_children()
        if not pids:  # an engine running in-process: the actor itself is the engine
            pids = [os.getpid()]
        _announce(f"SIGKILL engine-core process(es) {pids}")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    if delay > 0:  # mid-batch: the engine is busy with the batch's requests when it dies
        threading.Timer(delay, kill).start()
    else:
        kill()


def on_engine_batch(batch_number: int) -> None:
    """Called by an engine actor as it starts its ``batch_number``-th batch (1-based, per process)."""
    arg = _faults().get("kill_engine")
    if arg is None:
        return
    opts = _options(arg)
    if batch_number == int(opts.get("batch", 1)) and _claim("kill_engine"):
        _kill_engine_core(opts.get("delay", 0.5))


def before_generate(prompts: list[str]) -> None:
    """Called by an engine actor just before it hands ``prompts`` (their text) to the engine."""
    needle = _faults().get("crash_on_prompt")
    if needle and any(needle in p for p in prompts):
        _announce(f"SIGKILL this engine actor: a prompt contains {needle!r}")
        os.kill(os.getpid(), signal.SIGKILL)


def after_commit(shard_number: int) -> None:
    """Called by a shard writer after its ``shard_number``-th commit record (1-based, per process) lands."""
    arg = _faults().get("kill_writer")
    if arg is not None and shard_number == int(_options(arg).get("shard", 1)) and _claim("kill_writer"):
        _announce("SIGKILL this shard writer after its commit, before its task returns")
        os.kill(os.getpid(), signal.SIGKILL)
