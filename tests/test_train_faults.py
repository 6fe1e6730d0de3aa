"""Training under real faults and bad input: a SIGKILLed worker, a SIGKILLed job, corrupt shards, bad settings."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import small_config
from distill_llm.config import ConfigError
from distill_llm.corpus.shards import ShardError
from distill_llm.student.loop import epoch_position

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _fast(cfg, tmp: Path, **train):
    """The fixture's shards with outputs under ``tmp`` and a short LoRA run (48 rows and 12 batches a worker)."""
    cfg = cfg.model_copy(deep=True)
    cfg.data.shards = [cfg.output.dir]
    cfg.output.student_dir, cfg.train.storage_path = str(tmp / "student"), str(tmp / "train")
    cfg.student.lora = {"r": 8, "alpha": 16}
    cfg.train.batch_size, cfg.train.log_every, cfg.train.checkpoint_every = 4, 4, 4
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def _checkpoints(storage: Path) -> tuple[Path, list[str]]:
    (run,) = [p for p in storage.iterdir() if p.is_dir()]
    return run, sorted(p.name for p in run.glob("checkpoint_step*"))


def _read(ckpt: Path) -> tuple[dict, list[int]]:
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return state, [json.loads(line)["step"] for line in (ckpt / "metrics.jsonl").read_text().splitlines()]


def test_killed_worker_restarts_from_the_last_checkpoint(generated, tmp_path, monkeypatch):
    from distill_llm.student.stage import train

    cfg, manifest = generated
    cfg = _fast(cfg, tmp_path, max_steps=16, keep_checkpoints=2, max_failures=1)
    marker = tmp_path / "killed"
    monkeypatch.setenv("DISTILL_LLM_FAULTS", f"kill_train_worker:step=10,rank=1,delay=6,marker={marker}")
    out = train(cfg)
    assert marker.exists(), "the fault fired: rank 1 was SIGKILLed after step 10"
    run, ckpts = _checkpoints(tmp_path / "train")
    assert ckpts == ["checkpoint_step0000012", "checkpoint_step0000016"], "retention keeps the last 2"
    state, steps = _read(run / ckpts[-1])
    assert steps == list(range(1, 17)), "steps 9-10 were recomputed after the restore but logged once"
    batches = -(-manifest["totals"]["rows"] // 2 // 4)
    assert state["resumed"] == [{"step": 8, "epoch": 0, "batches_in_epoch": 8}], "restored the step-8 checkpoint"
    assert (state["step"], state["epoch"], state["batches_in_epoch"]) == (16, *epoch_position(16, batches))
    assert json.loads((Path(out) / "distill_llm.json").read_text())["steps"] == 16


def _kill_tree(proc: subprocess.Popen) -> int:
    """SIGKILL a driver and everything it started (its local Ray too), by process id only; its exit code."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.kill()
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=30)
    return proc.wait(timeout=30)


def _wait_for(predicate, proc, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the driver ended early:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(1)


def test_rerun_after_the_whole_job_died_resumes_from_its_checkpoint(generated, tmp_path, monkeypatch, capfd):
    """`python -m pipelines.train_student` on its own local Ray (a laptop run) is SIGKILLed with that Ray after
    Ray Train registered its step-8 checkpoint; the same command run again resumes there. The rerun is the
    command's own entry point in this process, on the session's Ray: that Ray never saw the dead job, and what
    it resumes from is only what the dead job left on disk."""
    from distill_llm.cli import main

    cfg, manifest = generated
    storage = tmp_path / "train"
    args = [str(ROOT / "configs" / "quickstart.yaml"),
            f"data.shards={cfg.output.dir}", f"output.student_dir={tmp_path / 'student'}",
            f"train.storage_path={storage}", "student.lora={r: 8, alpha: 16}",
            "train.max_steps=12", "train.checkpoint_every=4", "train.batch_size=4", "train.log_every=4"]
    command = [sys.executable, "-m", "pipelines.train_student", *args]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, like a laptop run
    env["PYTHONPATH"] = str(ROOT)
    marker = tmp_path / "stalled"
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(command, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**env, "DISTILL_LLM_FAULTS": f"stall_train_worker:step=8,marker={marker}"})
    try:
        def step8_registered() -> bool:  # Ray Train's own record of the run's checkpoints names step 8
            return marker.exists() and any("checkpoint_step0000008" in p.read_text()
                                           for p in storage.glob("*/checkpoint_manager_snapshot.json"))
        _wait_for(step8_registered, proc, log, timeout=400)
        assert _kill_tree(proc) == -signal.SIGKILL
    finally:
        _kill_tree(proc)
    assert not (tmp_path / "student" / "distill_llm.json").exists(), "nothing exported by the killed run"

    monkeypatch.chdir(tmp_path)  # where the command ran
    capfd.readouterr()
    rc = main(["train", *args])
    out = capfd.readouterr()
    assert rc == 0, out.out[-3000:] + out.err[-3000:]
    assert "resumed from step 8" in out.out
    info = json.loads((tmp_path / "student" / "distill_llm.json").read_text())
    assert info["steps"] == 12 and info["resumed"] == [{"step": 8, "epoch": 0, "batches_in_epoch": 8}]
    run, ckpts = _checkpoints(storage)
    state, steps = _read(run / ckpts[-1])
    assert steps == list(range(1, 13)) and state["step"] == 12


def _shard_set_copy(generated, tmp_path: Path) -> tuple[Path, Path]:
    cfg, manifest = generated
    shards = tmp_path / "shards"
    shutil.copytree(cfg.output.dir, shards)
    return shards, shards / manifest["shards"][0]["file"]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (_truncate, "is .* bytes, the manifest says .*: it was truncated or altered"),
    (_flip_middle, "does not match its sha256 in the manifest: it was altered"),
    (Path.unlink, "listed in the manifest is missing"),
])
def test_damaged_shard_is_named_before_training(generated, tmp_path, damage, message):
    from distill_llm.student.stage import train

    shards, victim = _shard_set_copy(generated, tmp_path)
    size = victim.stat().st_size
    damage(victim)
    if damage is _flip_middle:
        assert victim.stat().st_size == size
    cfg = small_config(tmp_path, data={"shards": str(shards)})
    with pytest.raises(ShardError, match=message) as err:
        train(cfg)
    assert str(victim) in str(err.value) and "rerun `distill-llm generate`" in str(err.value)
    assert not (tmp_path / "train").exists(), "refused before any training started"


def test_same_size_alteration_passes_a_size_only_check(generated, tmp_path):
    from distill_llm.student.stage import verified_files

    shards, victim = _shard_set_copy(generated, tmp_path)
    _flip_middle(victim)
    cfg = small_config(tmp_path, data={"shards": str(shards)}, train={"verify_shards": "size"})
    files = verified_files([str(shards)], cfg.train.verify_shards)
    assert sum(map(len, files.values())) == len(generated[1]["shards"]), "train.verify_shards=size trades safety for time"


def _student_without_tokenizer(tmp_path: Path) -> str:
    from distill_llm.paths import resolve_model

    student = tmp_path / "bare-student"
    shutil.copytree(resolve_model("toy-student"), student)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (student / name).unlink()
    return str(student)


@pytest.mark.parametrize("settings, message", [
    ({"train": {"max_seq_len": 8}}, "train.max_seq_len=8 leaves no room for a completion: the shortest prompt has"),
    ({"train": {"num_workers": 64}}, r"train.num_workers=64 x \(train.cpus_per_worker=1\) does not fit: CPU: 64 "
                                     r"needed, \d+ in the cluster; lower train.num_workers"),
    ({"train": {"storage_path": "{tmp}/a-file/train"}}, "train.storage_path=.*/a-file/train is not writable"),
    ({"student": {"model": "{bare}"}}, "student.model=.*bare-student: .* has no usable tokenizer"),
])
def test_bad_training_settings_fail_before_training(generated, tmp_path, settings, message):
    from distill_llm.student.stage import train

    cfg, _ = generated
    (tmp_path / "a-file").write_text("not a folder")
    fill = {"tmp": tmp_path, "bare": _student_without_tokenizer(tmp_path) if "student" in settings else ""}
    settings = {section: {k: str(v).format(**fill) for k, v in values.items()} for section, values in settings.items()}
    bad = small_config(tmp_path, data={"shards": cfg.output.dir}, **settings)
    start = time.time()
    with pytest.raises(ConfigError, match=message):
        train(bad)
    assert time.time() - start < 60, "no wait for resources that never come"
    assert not list((tmp_path / "train").glob("*/checkpoint_*")), "no training step ran"
