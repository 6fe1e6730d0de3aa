"""The training loop's numerics on real Ray Train workers (gloo on CPU): a token-exact loss whatever the layout,
FSDP against DDP, fp32 master weights under bf16 compute, sharded checkpoints read on another worker count.

The rows are synthetic (random ids of unequal lengths with a random teacher top-k) so each test needs no
teacher stage; the student is the toy student.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from distill_llm.config import build_config
from distill_llm.student.batching import build_batch
from distill_llm.student.losses import KDSettings

pytestmark = pytest.mark.slow
K = 4
LENGTHS = [(3, 5), (9, 40), (2, 3), (5, 17), (7, 2), (4, 60), (6, 9), (3, 26)]  # (prompt, completion) per row


def rows_table(lengths=LENGTHS, seed: int = 0) -> pa.Table:
    """Rows with the columns the loop reads, ids inside the toy vocabulary, top-k rows of log-probs < 0."""
    rng = np.random.default_rng(seed)
    prompts, completions, ids, lps = [], [], [], []
    for n_p, n_c in lengths:
        prompts.append(rng.integers(3, 100, n_p).tolist())
        completions.append(rng.integers(3, 100, n_c).tolist())
        ids.append(rng.integers(3, 100, (n_c, K)).tolist())
        raw = np.sort(rng.normal(size=(n_c, K + 2)), axis=1)[:, ::-1]
        lps.append((raw - np.log(np.exp(raw).sum(1, keepdims=True)))[:, :K].tolist())
    return pa.table({"prompt_token_ids": pa.array(prompts, pa.list_(pa.int32())),
                     "completion_token_ids": pa.array(completions, pa.list_(pa.int32())),
                     "topk_token_ids": pa.array(ids, pa.list_(pa.list_(pa.int32(), K))),
                     "topk_logprobs": pa.array(lps, pa.list_(pa.list_(pa.float32(), K)))})


def _student_path() -> str:
    from distill_llm.paths import resolve_model

    return resolve_model("toy-student")


def _config(tmp: Path, **train) -> dict:
    train = {"alpha": 0.5, "temperature": 2.0, "lr": 1e-3, "warmup_steps": 0, "max_seq_len": 96,
             "storage_path": str(tmp / "train"), "num_workers": 2, "log_every": 1, **train}
    cfg = build_config({"student": {"model": _student_path(), "lora": None}, "train": train})
    return cfg.model_dump(mode="json")


def _micro(table: pa.Table, batch_size: int) -> list[dict]:
    return [build_batch(table.slice(i, batch_size), max_seq_len=96, pad_id=0, with_topk=True)[0]
            for i in range(0, table.num_rows, batch_size)]


def _gradients(student) -> dict[str, torch.Tensor]:
    """Full (unsharded) gradients by parameter name."""
    out = {}
    for name, p in student.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[name] = g.detach().clone()
    return out


def _one_step_gradients(strategy: str, micro: list[dict], world: int, lora: bool = False):
    """The loop's own placement and accumulation for one step; (full gradients, global means, tokens)."""
    from distill_llm.config import LoraSettings
    from distill_llm.student.loop import accumulate
    from distill_llm.student.model import add_lora, compute_context, load_student, place_model

    torch.manual_seed(0)
    student = load_student(_student_path(), torch.float32)
    if lora:
        student = add_lora(student, LoraSettings(r=4, alpha=8))
        torch.manual_seed(1)
        for name, p in student.named_parameters():  # LoRA B starts at 0: give it values so A gets gradients
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
    settings = KDSettings(alpha=0.5, temperature=2.0)
    device = torch.device("cpu")
    model = place_model(student, settings, strategy, torch.float32, device, world)
    means, tokens = accumulate(model, micro, device, compute_context(strategy, torch.float32, device))
    return _gradients(student), means, tokens


def _gradient_worker(config: dict) -> None:
    """On each of 2 workers: its half of the rows, DDP then FSDP (full, then LoRA); rank 0 saves the results."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    table = config["table"]
    half = table.slice(rank * 4, 4)
    torch.set_num_threads(1)
    results = {
        "ddp_1x4": _one_step_gradients("ddp", _micro(half, 1), 2),
        "fsdp_2x2": _one_step_gradients("fsdp", _micro(half, 2), 2),
        "ddp_lora": _one_step_gradients("ddp", _micro(half, 4), 2, lora=True),
        "fsdp_lora": _one_step_gradients("fsdp", _micro(half, 2), 2, lora=True),
    }
    if rank == 0:
        torch.save(results, config["out"])


def _fit(loop, config: dict, workers: int, datasets=None, storage: Path | None = None, name: str = "run"):
    import ray.train
    from ray.train.torch import TorchTrainer

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    trainer = TorchTrainer(loop, train_loop_config=config,
                           scaling_config=ray.train.ScalingConfig(num_workers=workers,
                                                                  resources_per_worker={"CPU": 0.5}),
                           run_config=ray.train.RunConfig(name=name, storage_path=str(storage)),
                           datasets=datasets or {}, dataset_config=ray.train.DataConfig(datasets_to_split=[]))
    return trainer.fit()


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        scale = a[name].abs().max().item()
        assert (a[name] - b[name]).abs().max().item() <= rtol * max(scale, 1e-12), name


def test_step_gradient_is_the_same_for_every_layout(ray_session, tmp_path):
    """8 rows of unequal lengths: one batch of 8, 8 batches of 1, and 2 workers (DDP 1 x 4, FSDP 2 x 2) give the
    same gradient (1e-5 relative) and the same logged loss: each completion token weighs 1 / the step's tokens."""
    table = rows_table()
    ref, ref_means, ref_tokens = _one_step_gradients("ddp", _micro(table, 8), 1)
    one_by_eight, means, tokens = _one_step_gradients("ddp", _micro(table, 1), 1)
    assert tokens == ref_tokens == sum(c for _, c in LENGTHS)
    _assert_same(ref, one_by_eight)
    torch.testing.assert_close(means, ref_means, rtol=1e-6, atol=0)

    out = tmp_path / "grads.pt"
    _fit(_gradient_worker, {"table": table, "out": str(out)}, 2, storage=tmp_path / "ray")
    results = torch.load(out, weights_only=False)
    for layout in ("ddp_1x4", "fsdp_2x2"):
        grads, means, tokens = results[layout]
        assert tokens == ref_tokens, layout
        _assert_same(ref, grads)
        torch.testing.assert_close(means, ref_means, rtol=1e-6, atol=0)

    lora_ref, _, _ = _one_step_gradients("ddp", _micro(table, 8), 1, lora=True)
    assert all("lora" in n for n in lora_ref)
    _assert_same(lora_ref, results["ddp_lora"][0])
    _assert_same(lora_ref, results["fsdp_lora"][0])


def test_per_sequence_mean_would_differ():
    """The equivalence above can fail: averaging per micro-batch (the old loss) weighs short rows more."""
    table = rows_table()
    ref, _, _ = _one_step_gradients("ddp", _micro(table, 8), 1)
    from distill_llm.student.model import StudentWithLoss, load_student

    torch.manual_seed(0)
    student = load_student(_student_path(), torch.float32)
    model = StudentWithLoss(student, KDSettings(alpha=0.5, temperature=2.0))
    for batch in _micro(table, 1):
        (model(**batch)["loss"] / 8).backward()
    old = _gradients(student)
    with pytest.raises(AssertionError):
        _assert_same(ref, old, rtol=1e-2)


def _stream(tables: list[pa.Table], rows: int = 4) -> pa.Table:
    """The tables' rows interleaved ``rows`` at a time: the stream whose steps give 2 workers of batch 2 x
    grad_accum 2 the rows they would each have read from their own table."""
    return pa.concat_tables([t.slice(i, rows) for i in range(0, tables[0].num_rows, rows) for t in tables])


def _train(tmp: Path, strategy: str, workers: int, total: int, stream: pa.Table, name: str,
           faults: str | None = None, **train):
    """The real train_loop_per_worker on a shared stream (a cached corpus: every worker reads it whole and
    takes its share of each step); returns the run folder. With ``faults`` (a DISTILL_LLM_FAULTS spec armed on
    the workers) the run is expected to fail."""
    import ray.data

    from distill_llm.student.loop import LoopInputs

    train = {"batch_size": 2, "grad_accum": 2, "checkpoint_every": 2, "keep_checkpoints": 4,
             "lr_schedule": "constant", **train}
    config = _config(tmp, strategy=strategy, num_workers=workers, **train)
    inputs = LoopInputs(config=config, student_path=_student_path(), retokenize=False, total_steps=total,
                        batches_per_epoch=stream.num_rows // workers // train["batch_size"], shared_stream=True,
                        faults=faults)
    datasets = {"train": ray.data.from_arrow(stream)}
    datasets["train"].context.enable_progress_bars = False
    try:
        error = _fit(_real_loop, {"inputs": inputs}, workers, datasets, tmp / "train", name).error
    except Exception as err:  # noqa: BLE001 - a failed run raises or returns its error, depending on Ray Train
        error = err
    assert (error is not None) == (faults is not None), error
    return tmp / "train" / name


def _real_loop(config):
    from distill_llm.student.loop import train_loop_per_worker

    train_loop_per_worker(config)


def _metrics(run: Path, step: int) -> list[dict]:
    lines = (run / f"checkpoint_step{step:07d}" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


class _Tee:
    """A stream that writes to ``target`` and keeps a copy."""

    def __init__(self, target, copy: list[str]):
        self.target, self.copy = target, copy

    def write(self, text: str) -> int:
        self.copy.append(text)
        return self.target.write(text)

    def __getattr__(self, name):
        return getattr(self.target, name)


@pytest.fixture(scope="module")
def fsdp_runs(ray_session, tmp_path_factory):
    """The three Ray Train runs both FSDP tests read: 2 DDP workers for 6 steps; the same 6 steps on 2 FSDP
    workers with rank 1 SIGKILLed after step 5 (Ray Train may not restart it, so the run fails with the step-4
    checkpoint, sharded by 2 workers, its last); that run resumed on 1 worker with grad_accum 4 (the same 8 rows
    a step). Also what Ray relayed to the driver's stdout and stderr during the runs."""
    import time

    tmp = tmp_path_factory.mktemp("fsdp")
    stream = _stream([rows_table(LENGTHS * 3, seed=r) for r in range(2)])  # 48 rows = 6 steps of 8
    marker = tmp / "killed"
    relayed: list[str] = []
    with pytest.MonkeyPatch.context() as mp:  # Ray's log relay prints to sys.stdout / sys.stderr as they are then
        mp.setattr(sys, "stdout", _Tee(sys.stdout, relayed))
        mp.setattr(sys, "stderr", _Tee(sys.stderr, relayed))
        ddp = _train(tmp, "ddp", 2, 6, stream, "ddp")
        killed = _train(tmp, "fsdp", 2, 6, stream, "fsdp",
                        faults=f"kill_train_worker:step=5,rank=1,delay=3,marker={marker}")
        time.sleep(3)  # Ray relays worker output asynchronously
    checkpoints = sorted(p.name for p in killed.glob("checkpoint_step*"))
    before = _metrics(killed, 4)
    resumed = _train(tmp, "fsdp", 1, 6, stream, "fsdp", grad_accum=4)
    return SimpleNamespace(tmp=tmp, ddp=ddp, killed=killed, marker=marker, checkpoints=checkpoints, before=before,
                           resumed=resumed, relayed="".join(relayed))


def test_fsdp_trains_the_same_student_as_ddp_and_resumes_on_one_worker(fsdp_runs):
    """2 FSDP workers and 2 DDP workers: equal losses over 4 steps and equal exported weights; the FSDP run's
    sharded checkpoint then resumes on 1 worker. TensorBoard events are written during the run and each
    progress line reaches the driver once. (The FSDP run is fsdp_runs' killed one, up to its step-4 checkpoint;
    test_fsdp_worker_killed_mid_run_resumes_on_one_worker checks the kill and the resumed run's log.)"""
    from distill_llm.student.checkpoint import checkpoint_model

    ddp, fsdp = fsdp_runs.ddp, fsdp_runs.killed
    a, b = _metrics(ddp, 4)[:4], fsdp_runs.before
    assert [m["step"] for m in a] == [1, 2, 3, 4] and [m["step"] for m in b] == [1, 2, 3, 4]
    for key in ("loss", "ce", "kd"):
        np.testing.assert_allclose([m[key] for m in b], [m[key] for m in a], rtol=1e-5)
    assert a[0]["tokens"] == 2 * sum(c for _, c in LENGTHS[:4]), "the step's tokens over both workers"

    student_cfg = build_config(_config(fsdp_runs.tmp)).student
    weights = [checkpoint_model(run / "checkpoint_step0000004", _student_path(), student_cfg).state_dict()
               for run in (ddp, fsdp)]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-5, atol=1e-6)

    events = list((fsdp / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "TensorBoard events in the run folder"
    lines = [line for line in fsdp_runs.relayed.splitlines() if "train: step 3/" in line]
    assert len(lines) == 2, lines  # once per run (ddp, fsdp), not twice each

    # The FSDP run resumes on 1 worker with grad_accum 4 (the same 8 rows a step): steps 5-6 take the rows
    # the 2 workers would have, and train as the uninterrupted 2-worker DDP run did.
    resumed = fsdp_runs.resumed
    state = json.loads((resumed / "checkpoint_step0000006" / "trainer_state.json").read_text())
    assert state["resumed"] == [{"step": 4, "epoch": 0, "batches_in_epoch": 8}]
    steps = _metrics(resumed, 6)
    assert [m["step"] for m in steps] == list(range(1, 7)) and steps[:4] == b
    for key in ("loss", "ce", "kd", "tokens"):
        np.testing.assert_allclose([m[key] for m in steps[4:]], [m[key] for m in _metrics(ddp, 6)[4:]], rtol=1e-5)


def test_fsdp_worker_killed_mid_run_resumes_on_one_worker(fsdp_runs):
    """FSDP on 2 workers; rank 1 is SIGKILLed after step 5 and Ray Train may not restart it, so the run fails
    with the step-4 checkpoint (sharded by 2 workers) its last. The same run on 1 worker resumes from it:
    steps 1-4 are kept as logged, steps 5-6 train, the losses stay finite. (The runs are fsdp_runs', shared
    with test_fsdp_trains_the_same_student_as_ddp_and_resumes_on_one_worker, which checks their numbers against
    the DDP run.)"""
    run = fsdp_runs.killed
    assert fsdp_runs.marker.exists(), "rank 1 was SIGKILLed after step 5"
    assert fsdp_runs.checkpoints == ["checkpoint_step0000002", "checkpoint_step0000004"]
    shards = list((run / "checkpoint_step0000004").rglob("*.distcp"))
    assert len(shards) == 2, "each of the 2 workers wrote its shard"

    state = json.loads((fsdp_runs.resumed / "checkpoint_step0000006" / "trainer_state.json").read_text())
    assert state["resumed"] == [{"step": 4, "epoch": 0, "batches_in_epoch": 8}]
    steps = _metrics(fsdp_runs.resumed, 6)
    assert [m["step"] for m in steps] == list(range(1, 7)) and steps[:4] == fsdp_runs.before
    assert all(np.isfinite(m["loss"]) for m in steps)
