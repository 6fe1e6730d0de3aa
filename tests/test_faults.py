"""Fault injection itself (distill_llm/faults.py: real kills, fired once per run) and the training-side
guards that need no Ray. No engine needed."""

import shutil
import subprocess
from contextlib import contextmanager

import pytest

from conftest import small_config
from distill_llm import faults
from distill_llm.config import ConfigError
from distill_llm.faults import active, parse, point


def test_nothing_happens_without_the_variable(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.point("engine_batch", 1)
    faults.point("engine_prompts", prompts=["anything"])
    faults.point("shard_commit", 1)


ENGINE_CORES = faults._engine_core_children  # the search itself, before engine_drill narrows it


def _fake_engine_core() -> subprocess.Popen:
    """A child named like vLLM's engine core from its first instant.

    Popen returns only after the exec, and argv[0] is set by that exec itself; the earlier
    ``bash -c "exec -a ..."`` left a moment in which the child was still called bash, and a fault
    firing then found no engine core and fell back to SIGKILLing its own process: pytest (CI, exit 137).
    """
    core = subprocess.Popen(["VLLM::EngineCore", "120"], executable=shutil.which("sleep"))
    assert core.pid in ENGINE_CORES(), "found by its name"
    return core


@contextmanager
def engine_drill(monkeypatch, tmp_path, spec: str):
    """``spec`` armed (markers in ``tmp_path``) over a fake engine core, the only one the drill may kill: an
    engine of an earlier test may still be up under pytest. The core is killed afterwards."""
    monkeypatch.setenv(faults.ENV, spec)
    monkeypatch.setenv(faults.DIR_ENV, str(tmp_path))
    core = _fake_engine_core()
    monkeypatch.setattr(faults, "_engine_core_children", lambda: [p for p in ENGINE_CORES() if p == core.pid])
    try:
        yield core
    finally:
        core.kill()
        core.wait()
        faults._pending_engine_kill = None


def test_kill_engine_kills_the_engine_core_child_once(monkeypatch, tmp_path):
    with engine_drill(monkeypatch, tmp_path, "kill_engine:batch=2,delay=0") as core:
        faults.point("engine_batch", 1)
        assert core.poll() is None, "not at batch 1"
        faults.point("engine_batch", 2)
        assert core.wait(timeout=10) == -9, "SIGKILL at batch 2"
        assert (tmp_path / "kill_engine.fired").exists()
        again = _fake_engine_core()
        faults.point("engine_batch", 2)  # a restarted actor: the marker says it already fired
        assert again.poll() is None
        again.kill()
        again.wait()


def test_a_poison_prompt_waits_for_an_engine_kill_armed_in_its_actor(monkeypatch, tmp_path):
    """Both drills armed in one actor: the engine-core kill, armed first, lands first; the poison prompt then
    returns (its batch meets a dead engine and is retried in the restarted actor) instead of killing the
    actor while the engine kill is pending, which lost that kill in a loaded CI run."""
    import os

    kills = []
    real_kill = os.kill

    def kill(pid, sig):  # this process's own SIGKILL is recorded, not sent (it would end pytest)
        kills.append(pid)
        if pid != os.getpid():
            real_kill(pid, sig)

    monkeypatch.setattr(faults.os, "kill", kill)
    with engine_drill(monkeypatch, tmp_path, "kill_engine:batch=1,delay=0.5;crash_on_prompt:poison") as core:
        faults.point("engine_batch", 1)
        assert core.poll() is None and kills == [], "the engine kill waits its delay"
        faults.point("engine_prompts", prompts=["a poison prompt"])
        assert kills == [core.pid], "the engine kill landed first, and the actor was not killed under it"
        assert core.wait(timeout=10) == -9
        faults.point("engine_prompts", prompts=["a poison prompt"])  # the restarted actor: nothing pending
        assert kills == [core.pid, os.getpid()]


def test_one_shot_faults_need_a_marker_folder(monkeypatch):
    monkeypatch.setenv(faults.ENV, "kill_writer:shard=1")
    monkeypatch.delenv(faults.DIR_ENV, raising=False)
    with pytest.raises(RuntimeError, match=faults.DIR_ENV):
        faults.point("shard_commit", 1)


def test_fault_spec_parses_entries_with_their_settings():
    spec = "kill_train_worker:step=12,rank=1; stall_train_worker:step=8,seconds=0.1,marker=/tmp/m"
    assert parse(spec) == {"kill_train_worker": {"step": "12", "rank": "1"},
                           "stall_train_worker": {"step": "8", "seconds": "0.1", "marker": "/tmp/m"}}
    assert parse("a:x=1,b:y=2") == {"a": {"x": "1"}, "b": {"y": "2"}}
    assert parse("") == {} and parse(None) == {}
    assert parse("crash_on_prompt:What is 1+2?;kill_writer:shard=1") == {
        "crash_on_prompt": {"text": "What is 1+2?"}, "kill_writer": {"shard": "1"}}
    assert active("kill_train_worker", spec) == {"step": "12", "rank": "1"}
    assert active("other", spec) is None
    with pytest.raises(ValueError, match="name:key=value"):
        parse("step=12")


def test_fault_fires_once_per_marker(tmp_path, monkeypatch):
    marker = tmp_path / "stalled"
    monkeypatch.setenv("DISTILL_LLM_FAULTS", f"stall_train_worker:step=3,rank=0,seconds=0,marker={marker}")
    point("train_checkpoint", 2, rank=0)
    point("train_checkpoint", 3, rank=1)
    point("train_step", 3, rank=0)
    assert not marker.exists(), "other steps, ranks and points do not fire"
    point("train_checkpoint", 3, rank=0)
    assert marker.exists()
    # armed kill whose marker exists: a restarted worker goes on instead of killing itself again
    (tmp_path / "killed").touch()
    monkeypatch.setenv("DISTILL_LLM_FAULTS", f"kill_train_worker:step=1,rank=0,marker={tmp_path / 'killed'}")
    point("train_step", 1, rank=0)
    with pytest.raises(ValueError, match="unknown fault point"):
        point("nowhere")


def test_grad_accum_beyond_an_epoch_is_refused(tmp_path):
    from distill_llm.student.stage import plan_steps

    cfg = small_config(tmp_path, train={"batch_size": 16, "grad_accum": 4, "num_workers": 2})
    with pytest.raises(ConfigError, match="train.grad_accum=4 needs 4 batches per step, but each of the 2 workers "
                                          "gets 48 rows = 3 batch"):
        plan_steps(96, cfg)
    assert plan_steps(96, small_config(tmp_path, train={"batch_size": 16, "grad_accum": 3, "max_steps": "null"})) \
        == (1, 1, 3)
    few = small_config(tmp_path, train={"batch_size": 16, "num_workers": 2, "epochs": 1, "max_steps": "null"})
    with pytest.raises(ConfigError, match="train.epochs=1 over 10 rows is less than one step of 32 rows"):
        plan_steps(10, few)  # would train nothing


def test_epochs_are_one_stream_split_evenly(tmp_path):
    from distill_llm.student.loop import epoch_position
    from distill_llm.student.stage import plan_steps

    # 100 rows on 3 workers, batches of 8: 33 rows = 5 batches a worker per epoch. Cached, 3 epochs are one
    # stream of 300 rows = 12 steps of 24 rows; streamed, each worker's split is 3 x 33 rows = 13 batches
    # (the partial batches run on into the next epoch)
    cfg = small_config(tmp_path, train={"batch_size": 8, "num_workers": 3, "epochs": 3, "max_steps": "null"})
    assert plan_steps(100, cfg) == (12, 3, 5)
    assert plan_steps(100, cfg, streamed=True) == (13, 3, 5)
    cfg.train.grad_accum = 2
    assert plan_steps(100, cfg) == plan_steps(100, cfg, streamed=True) == (6, 3, 5)
    # max_steps reads as many epochs as it needs: 13 steps of 48 rows = 624 rows (cached), 13 x 2 batches of
    # 8 = 208 rows a worker (streamed)
    cfg.train.max_steps = 13
    assert plan_steps(100, cfg) == plan_steps(100, cfg, streamed=True) == (13, 7, 5)
    assert [epoch_position(b, 5) for b in (0, 1, 5, 6, 13)] == [(0, 0), (0, 1), (0, 5), (1, 1), (2, 3)]


def test_run_name_follows_what_is_learned_not_how_it_is_operated(tmp_path):
    from distill_llm.student.stage import run_identity, run_name

    base = small_config(tmp_path)
    name = run_name(base, run_identity(base, "shards-a"))
    assert run_name(base, run_identity(base, "shards-b")) != name, "other shards: another run"
    lr = small_config(tmp_path, train={"lr": 0.5})
    assert run_name(lr, run_identity(lr, "shards-a")) != name, "other settings: another run"
    ops = small_config(tmp_path, train={"max_failures": 3, "keep_checkpoints": 5, "checkpoint_every": 7,
                                        "verify_shards": "size", "log_every": 1})
    assert run_name(ops, run_identity(ops, "shards-a")) == name, "operational settings keep the run (and resume it)"
    b, w = base.train.batch_size, base.train.num_workers
    layout = small_config(tmp_path, train={"num_workers": 1, "grad_accum": w * base.train.grad_accum,
                                           "cpus_per_worker": 2})
    assert run_name(layout, run_identity(layout, "shards-a")) == name, "another worker count, same rows a step"
    bigger = small_config(tmp_path, train={"batch_size": 2 * b})
    assert run_name(bigger, run_identity(bigger, "shards-a")) != name, "more rows a step: another run"


def test_reused_run_name_with_other_shards_is_refused(tmp_path):
    from distill_llm.student.stage import claim_run, run_identity

    cfg = small_config(tmp_path, train={"run_name": "mine"})
    storage = str(tmp_path / "train")
    claim_run(storage, "mine", run_identity(cfg, "shards-a"))
    claim_run(storage, "mine", run_identity(cfg, "shards-a"))  # the same run again: resumes
    with pytest.raises(ConfigError, match="train.run_name=mine: .* holds checkpoints of a different run:\n"
                                          "  shards: 'shards-a' -> 'shards-b'"):
        claim_run(storage, "mine", run_identity(cfg, "shards-b"))
    other = small_config(tmp_path, train={"run_name": "mine", "alpha": 0.25})
    with pytest.raises(ConfigError, match="train.alpha: 0.5 -> 0.25"):
        claim_run(storage, "mine", run_identity(other, "shards-a"))
    fewer = small_config(tmp_path, train={"run_name": "mine", "num_workers": 1})
    rows = cfg.train.batch_size * cfg.train.grad_accum * cfg.train.num_workers
    with pytest.raises(ConfigError, match=f"keep train.batch_size x train.grad_accum x train.num_workers = {rows} rows"):
        claim_run(storage, "mine", run_identity(fewer, "shards-a"))


def test_unwritable_location_is_named(tmp_path):
    from distill_llm.student.stage import check_writable

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match=r"train.storage_path=.*a-file/train is not writable"):
        check_writable(str(tmp_path / "a-file" / "train"), "train.storage_path")
    check_writable(str(tmp_path / "ok" / "train"), "train.storage_path")
    assert list((tmp_path / "ok" / "train").iterdir()) == [], "the probe file is removed"
