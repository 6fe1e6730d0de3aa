"""Real faults in the teacher stage: a SIGKILLed driver, a killed engine, a prompt that always crashes the
engine, a shard writer killed after its commit, a full disk and a read-only output dir.

Every run generates the same 24 samples (batches of 4, shards of 4 rows) and is compared with one
uninterrupted reference run: same sample ids, none twice, none lost, and the same tokens and top-k
arrays (per-request seeds make a sample independent of its batch). Runs that need a real kill of a
driver, or fault injection in Ray workers (DISTILL_LLM_FAULTS reaches them only through ray.init),
run `python -m pipelines.generate_teacher` in their own session (the reference run too, as a user runs it),
and everything in that session is killed by pid afterwards, so no Ray or vLLM process leaks into later tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import small_config
from distill_llm.corpus.shards import ShardError, commit_records, shard_files

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# Two batches in flight, not the default's count: an engine death redoes every batch the engine held, and the
# drills count the restarts. The faults land in a fixed order at any count: the engine-core kill is armed as
# the actor's 1st batch starts, before any prompt reaches the engine, and the poison prompt waits for it.
SETTINGS = {"data": {"num_prompts": 24}, "teacher": {"batch_size": 4, "max_concurrent_batches": 2},
            "generate": {"samples_per_prompt": 1, "max_new_tokens": 32, "rows_per_shard": 4}}
SAMPLES = 24
POISON = 17  # the toy prompt that crashes the engine in the fault-injection run


def config(tmp: Path, **extra):
    sections = {name: {**values, **extra.get(name, {})} for name, values in SETTINGS.items()}
    sections.update({k: v for k, v in extra.items() if k not in sections})
    return small_config(tmp, **sections)


def overrides(cfg) -> list[str]:
    """The dotted overrides that rebuild ``cfg`` from configs/quickstart.yaml in a subprocess."""
    return [f"output.dir={cfg.output.dir}", f"data.num_prompts={cfg.data.num_prompts}",
            f"generate.top_k_logprobs={cfg.generate.top_k_logprobs}",
            f"generate.samples_per_prompt={cfg.generate.samples_per_prompt}",
            f"generate.max_new_tokens={cfg.generate.max_new_tokens}",
            f"generate.rows_per_shard={cfg.generate.rows_per_shard}", f"teacher.batch_size={cfg.teacher.batch_size}",
            f"teacher.max_concurrent_batches={cfg.teacher.max_concurrent_batches}",
            f"generate.max_row_attempts={cfg.generate.max_row_attempts}"]


def rows_by_id(shard_dir: str) -> dict[str, dict]:
    table = pa.concat_tables([pq.read_table(f) for f in shard_files(shard_dir, verify="sha256")])
    ids = table.column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)), "a sample was committed twice"
    return {r["sample_id"]: r for r in table.to_pylist()}


def assert_same_rows(got: dict[str, dict], want: dict[str, dict]) -> None:
    """The generated content of every sample equals the reference run's."""
    for sid, row in got.items():
        ref = want[sid]
        for col in ("completion_token_ids", "finish_reason", "topk_token_ids", "topk_logprobs"):
            assert row[col] == ref[col], f"{sid}: {col} differs from the uninterrupted run"


def session_pids(sid: int) -> list[int]:
    """Processes of a session (a driver started with start_new_session, and the local Ray it started)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # field 6 of stat: the session id
            pids.append(int(stat.parent.name))
    return pids


def kill_session(sid: int) -> list[int]:
    """SIGKILL every process of the session, by pid, until none is left; returns those it found."""
    found: set[int] = set()
    deadline = time.time() + 60
    while (pids := session_pids(sid)) and time.time() < deadline:
        found.update(pids)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    assert not session_pids(sid), f"processes of session {sid} survived SIGKILL"
    return sorted(found)


def engine_cores(sid: int) -> set[int]:
    """vLLM engine-core processes of a session (vLLM names them VLLM::EngineCore through setproctitle)."""
    cores = set()
    for pid in session_pids(sid):
        try:
            if b"EngineCore" in Path(f"/proc/{pid}/cmdline").read_bytes():
                cores.add(pid)
        except OSError:
            continue
    return cores


class CoreWatch(threading.Thread):
    """Samples a session's engine-core processes until stopped: how many lived at once, and which."""

    def __init__(self, sid: int):
        super().__init__(daemon=True)
        self.sid, self.most, self.seen, self.done = sid, 0, set(), threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            cores = engine_cores(self.sid)
            self.most, self.seen = max(self.most, len(cores)), self.seen | cores


class Driver:
    """`python -m pipelines.generate_teacher` in its own session, output in a log file."""

    def __init__(self, cfg, log: Path, env: dict[str, str] | None = None):
        child_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local Ray
        child_env.update(PYTHONPATH=str(ROOT), **(env or {}))
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.generate_teacher", "configs/quickstart.yaml", *overrides(cfg)],
            cwd=ROOT, env=child_env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 1500, grace: float = 0) -> int:
        """The exit code; afterwards every process left in the session is killed and listed in
        ``leftovers`` (after ``grace`` seconds for a driver that ended on its own to finish its cleanup)."""
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            deadline = time.time() + grace
            while session_pids(self.proc.pid) and time.time() < deadline:
                time.sleep(1)
            self.leftovers = kill_session(self.proc.pid)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def clean_run(ray_session, tmp_path_factory):
    """The uninterrupted run every faulty run is compared with: `python -m pipelines.generate_teacher` as a
    user runs it, in its own session."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = config(tmp)
    driver = Driver(cfg, tmp / "driver.log")
    rc = driver.wait(grace=30)
    log = driver.output()
    assert rc == 0, log[-5000:]
    return cfg, log, driver


@pytest.fixture(scope="module")
def reference(clean_run):
    from distill_llm.corpus.shards import read_manifest

    cfg = clean_run[0]
    manifest = read_manifest(cfg.output.dir)
    assert manifest["totals"]["rows"] == SAMPLES and len(manifest["shards"]) >= 4, "several shards per run"
    return rows_by_id(cfg.output.dir)


def test_a_run_of_its_own_says_what_it_read_and_leaves_nothing_running(clean_run):
    """The prompts line, exit 0 (clean_run), no process left, and no alarm after success (vLLM's "engine core
    exited unexpectedly" ended most runs, a resource-tracker KeyError traceback some)."""
    _, log, driver = clean_run
    assert "generate: 24 prompts from toy:train (0 skipped)" in log
    assert not driver.leftovers, f"processes outlived the finished run: {driver.leftovers}"
    assert "exited unexpectedly" not in log, log[-5000:]
    assert "resource_tracker" not in log, log[-5000:]  # a relaunched tracker's KeyError traceback (issue 12 item 11)


def test_sigkilled_driver_resumes_without_loss_or_duplicates(reference, tmp_path):
    from distill_llm.teacher.stage import generate

    cfg = config(tmp_path)
    commits = Path(cfg.output.dir) / "_commits"
    driver = Driver(cfg, tmp_path / "driver.log")
    try:
        while not list(commits.glob("*.json")):
            assert driver.proc.poll() is None, "the driver ended before its first commit:\n" + driver.output()[-3000:]
            time.sleep(0.2)
        driver.proc.send_signal(signal.SIGKILL)
    finally:
        driver.wait()
    assert driver.leftovers, "the killed driver's Ray and vLLM processes were found and killed"
    done = commit_records(cfg.output.dir)
    assert 1 <= sum(r["rows"] for r in done) < SAMPLES and not (Path(cfg.output.dir) / "manifest.json").exists()

    manifest = generate(cfg)  # the same command again: resumes
    rows = rows_by_id(cfg.output.dir)
    assert manifest["totals"]["rows"] == SAMPLES and set(rows) == set(reference)
    assert {r["file"] for r in done} <= {s["file"] for s in manifest["shards"]}, "committed shards were kept"
    assert_same_rows(rows, reference)


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    """One run with three injected faults: the engine-core process SIGKILLed in the middle of the 1st
    batch, a prompt that kills its engine actor on every try, and the first shard writer SIGKILLed right
    after its commit record lands (so Ray retries a write task that already committed)."""
    from distill_llm.toy import make_problems

    from distill_llm.corpus.prompts import prompt_id

    tmp = tmp_path_factory.mktemp("faulty")
    cfg = config(tmp, generate={"max_row_attempts": 1})
    poison = make_problems("train", SAMPLES)[POISON]["prompt"]
    env = {"DISTILL_LLM_FAULTS": f"kill_engine:batch=1,delay=0.3;crash_on_prompt:{poison};kill_writer:shard=1",
           "DISTILL_LLM_FAULTS_DIR": str(tmp / "markers")}
    driver = Driver(cfg, tmp / "driver.log", env)
    driver.cores = CoreWatch(driver.proc.pid)
    driver.cores.start()
    try:
        rc = driver.wait(grace=30)
    finally:
        driver.cores.done.set()
        driver.cores.join()
    log = driver.output()
    assert rc == 0, log[-5000:]
    return cfg, log, tmp / "markers", driver, prompt_id([{"role": "user", "content": poison}]) + "-0"


def test_killed_engine_is_restarted_and_its_batch_retried(faulty_run, reference):
    cfg, log, markers, driver, poisoned = faulty_run
    assert (markers / "kill_engine.fired").exists() and "SIGKILL engine-core process" in log
    assert "exiting engine actor" in log, "EngineDeadError made the actor exit, so Ray restarted it"
    assert "running its rows one at a time" in log, "the restarted actor retried the batch"
    rows = rows_by_id(cfg.output.dir)
    assert set(rows) == set(reference) - {poisoned}, "every sample but the poisoned one"
    assert_same_rows(rows, reference)
    assert not driver.leftovers, f"processes outlived the finished run: {driver.leftovers}"


def test_no_engine_core_outlives_its_killed_actor(faulty_run):
    """A SIGKILLed engine actor (crash_on_prompt) takes its engine-core child along: with one replica no
    two engine cores ever live at once, so a restarted engine finds its device memory free again."""
    cfg, log, _, driver, _ = faulty_run
    assert "SIGKILL this engine actor" in log, "the drill killed an engine actor"
    assert len(driver.cores.seen) >= 3, f"the first core and the restarted ones were seen: {driver.cores.seen}"
    assert driver.cores.most == cfg.teacher.replicas == 1, f"{driver.cores.most} engine cores alive at once"


def test_prompt_that_always_crashes_is_quarantined(faulty_run, reference):
    from distill_llm.teacher.stage import generate
    from distill_llm.corpus.shards import read_manifest

    cfg, log, _, _, poisoned = faulty_run
    manifest = read_manifest(cfg.output.dir)
    assert manifest["rejected"] == {"engine_crash": 1} and manifest["totals"]["rows"] == SAMPLES - 1
    rejects = pa.concat_tables([pq.read_table(p) for p in (Path(cfg.output.dir) / "rejects").glob("*.parquet")])
    assert rejects["sample_id"].to_pylist() == [poisoned] and rejects["reason"][0].as_py() == "engine_crash"
    assert "died on each of 1 tries" in rejects["detail"][0].as_py()
    assert not (Path(cfg.output.dir) / "_attempts").exists(), "attempt records are scratch, gone with the manifest"

    # A rerun neither retries the quarantined row (it is accounted for) nor counts it twice; a budget it
    # exceeds fails the run and leaves no manifest.
    rerun = generate(cfg)
    assert rerun["rejected"] == {"engine_crash": 1} and rerun["totals"]["rows"] == SAMPLES - 1
    strict = config(Path(cfg.output.dir).parent, generate={"max_row_attempts": 1, "max_errored_rows": 0})
    with pytest.raises(ShardError, match="max_errored_rows=0"):
        generate(strict)
    assert not (Path(cfg.output.dir) / "manifest.json").exists()


def test_write_task_retried_after_its_commit_commits_once(faulty_run, reference):
    cfg, log, markers, _, _ = faulty_run
    assert (markers / "kill_writer.fired").exists() and "SIGKILL this shard writer" in log
    assert "the task will be retried" in log, "Ray retried the killed write task"
    files = [f for r in commit_records(cfg.output.dir) for f in (r["file"], r.get("rejects_file")) if f]
    ids = [sid for f in files for sid in pq.read_table(Path(cfg.output.dir) / f).column("sample_id").to_pylist()]
    assert sorted(ids) == sorted(reference), "every sample committed exactly once (rows or rejects)"


# ---------------------------------------------------------------- storage that fails under the run


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {done.stderr.strip()}")


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def assert_commits_verify(out_dir: str) -> list[dict]:
    """Every committed shard still has the size and sha256 its commit record says."""
    from distill_llm.corpus.shards import _sha256
    import pyarrow.fs as pafs

    records = commit_records(out_dir)
    fs = pafs.LocalFileSystem()
    for r in records:
        path = f"{out_dir}/{r['file']}"
        assert fs.get_file_info(path).size == r["bytes"] and _sha256(fs, path) == r["sha256"], path
    return records


def test_full_disk_then_read_only_dir_stop_cleanly_and_resume(reference, tmp_path):
    from distill_llm.teacher.stage import generate

    mnt = tmp_path / "mnt"
    mount_tmpfs(mnt, "40k")  # 10 pages: run.json, an attempt record, two to four shards: full mid-run
    try:
        cfg = config(tmp_path)
        cfg.output.dir = str(mnt / "shards")
        with pytest.raises(ShardError) as err:
            generate(cfg)
        message = str(err.value)
        assert cfg.output.dir in message and "No space left on device" in message, message
        assert "committed so far" in message and "are intact" in message and "rerun" in message
        committed = assert_commits_verify(cfg.output.dir)
        assert committed and sum(r["rows"] for r in committed) < SAMPLES
        assert not (mnt / "shards" / "manifest.json").exists()

        remount(mnt, "ro")  # read-only: refused before any engine starts, nothing touched
        with pytest.raises(ShardError, match="Read-only file system") as err:
            generate(cfg)
        assert cfg.output.dir in str(err.value)
        assert assert_commits_verify(cfg.output.dir) == committed

        remount(mnt, "rw,size=16m")  # space freed: the same command resumes and completes
        manifest = generate(cfg)
        rows = rows_by_id(cfg.output.dir)
        assert manifest["totals"]["rows"] == SAMPLES and set(rows) == set(reference)
        assert_same_rows(rows, reference)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
