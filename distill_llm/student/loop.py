"""The per-worker training loop: the only module that calls ``ray.train``.

Reads batches from its dataset shard (``stage.worker_datasets``), steps the student (DDP or FSDP2, fp32 master
weights, a token-exact loss over the whole step) and reports sharded checkpoints (checkpoint.py: trainable
weights and optimizer state from every worker; step, epoch position and the metrics so far from rank 0).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import faults
from ..config import build_config
from .losses import KDSettings, default_chunk_size
from .checkpoint import restore_state, save_state
from .model import add_lora, compute_context, count_parameters, load_student, place_model, use_packed_attention
from ..tokenizers import completion_ids, load_tokenizer, prompt_ids
from .batching import build_batch

STATE = "trainer_state.json"
METRICS = "metrics.jsonl"
EVENTS = "tensorboard"  # beside the checkpoints, in <storage_path>/<run>/


def kd_settings(t, vocab_size: int) -> KDSettings:
    """The loss settings of TrainConfig ``t`` for a student whose output layer has ``vocab_size`` rows;
    an unset train.loss_chunk_size is sized from it."""
    return KDSettings(alpha=t.alpha, temperature=t.temperature, divergence=t.divergence, jsd_beta=t.jsd_beta,
                      tail_bucket=t.tail_bucket, chunk_size=t.loss_chunk_size or default_chunk_size(vocab_size),
                      estimator=t.estimator)


@dataclass(frozen=True)
class LoopInputs:
    """What the driver (stage.py) hands every Ray Train worker, as ``train_loop_config={"inputs": ...}``
    (Ray Train wants a dict there)."""

    config: dict[str, Any]  # the validated Config, as JSON (rebuilt with build_config on the worker)
    student_path: str  # a local folder or hub id, already resolved on the driver
    retokenize: bool  # the student has another tokenizer: re-tokenise the teacher's text (sequence-level KD)
    total_steps: int
    batches_per_epoch: int  # per worker
    shared_stream: bool  # every worker reads all of "train" and takes its share of each step (a cached corpus)
                         # rather than the part Ray Train's split hands it (a streamed corpus)
    faults: str | None = None  # the driver's DISTILL_LLM_FAULTS, armed on the worker (faults.arm)
    system_prompt: str | None = None  # the teacher stage's (run.json prompts.system_prompt), for re-tokenised prompts
    route: dict[str, Any] | None = None  # tokenizers.TokenizerRoute.record(): how teacher ids reach the student


def _with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """The run's system prompt first unless the row has its own, as in generation."""
    if system_prompt and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _route_inputs(inputs: LoopInputs, tokenizer):
    """(teacher -> student id lookup or None, spare row, prompt renderer or None) from the driver's route."""
    from ..tokenizers import TokenizerRoute

    if not inputs.route:
        return None, None, None
    route = TokenizerRoute.from_record(inputs.route)
    if not route.token_level:
        return None, None, None
    # identical tokenizers over known rows read the ids as they are; otherwise every id goes through the map
    plain = route.case == "identical" and route.teacher_rows and route.student_rows \
        and route.teacher_rows <= route.student_rows
    reprompt = None
    if route.reprompt:
        def reprompt(row):
            return prompt_ids(tokenizer, _with_system_prompt(row["messages"], inputs.system_prompt))
    return (None if plain else route.lookup()), route.spare_row, reprompt


def lr_at(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at a (1-based) step.

    Warmup rises to 1 at step ``warmup``; the decay then starts at 1 on the first step after it and ends
    one step short of 0, so every step, the last one too, trains (``max_steps: 1`` is one full step).
    """
    if warmup and step <= warmup:
        return step / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup - 1) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def epoch_position(batches: int, per_epoch: int) -> tuple[int, int]:
    """(epoch, batches into it) after ``batches`` batches; a finished epoch is not rolled over."""
    if batches == 0:
        return 0, 0
    epoch = (batches - 1) // per_epoch
    return epoch, batches - epoch * per_epoch


def _save(student, optimizer, state: dict, metrics: list[dict], directory: Path, rank: int) -> None:
    """Every worker writes its shard of the weights and optimizer state; rank 0 the run's state and metrics."""
    save_state(student, optimizer, directory)
    if rank == 0:
        (directory / STATE).write_text(json.dumps(state))
        (directory / METRICS).write_text("".join(json.dumps(m) + "\n" for m in metrics))


def _restore(student, optimizer, directory: Path) -> tuple[dict, list[dict]]:
    """Weights and optimizer state into the placed student (checkpoint.restore_state); (state, metrics)."""
    restore_state(student, optimizer, directory)
    metrics = [json.loads(line) for line in (directory / METRICS).read_text().splitlines() if line]
    return json.loads((directory / STATE).read_text()), metrics


def compute_dtype(t) -> torch.dtype:
    """train.dtype: auto is bfloat16 on GPU and float32 on CPU."""
    if t.dtype == "auto":
        return torch.bfloat16 if t.use_gpu else torch.float32
    return getattr(torch, t.dtype)


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def _sync_gradients(model, on: bool):
    """DDP: reduce only on a step's last micro-batch (``no_sync`` before). FSDP reduce-scatters every
    micro-batch, so each worker accumulates only its shard of the gradients."""
    import contextlib

    if on or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def accumulate(model, batches: list[dict], device, context) -> tuple[torch.Tensor, int]:
    """Forward and backward every micro-batch of one optimizer step; returns the step's global mean
    (loss, ce, kd) as a [3] tensor and the step's completion tokens over all workers.

    The step's completion tokens are counted on every worker and summed (all-reduce) before any backward
    pass, so each token weighs 1 / (the step's tokens) whatever the batch size, grad_accum, worker count and
    sequence lengths. DDP and FSDP average gradients over the workers, so each divides its sums by the
    step's tokens / world size.
    """
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    tokens = _all_reduce_sum(torch.tensor([float(sum(b["targets"].numel() for b in batches))], dtype=torch.float64))
    normalizer = max(tokens.item(), 1.0) / world
    sums = torch.zeros(3, dtype=torch.float64)
    for i, batch in enumerate(batches):
        with _sync_gradients(model, i == len(batches) - 1):
            with context:
                out = model(**{k: v.to(device) for k, v in batch.items()}, normalizer=normalizer)
            out["loss"].backward()
        sums += torch.stack([out["loss"].detach(), out["ce"], out["kd"]]).double().cpu()
    return _all_reduce_sum(sums) / world, int(tokens.item())


def _micro_batches(shard, t, step: int):
    """(step after the group, its grad_accum tables) of this worker's split of a streamed corpus, from
    ``step`` on; a short last group (the data ran out) is dropped, as no step is taken on it."""
    group: list = []
    position = step * t.grad_accum  # batches this layout has read by then
    for index, table in enumerate(shard.iter_batches(batch_size=t.batch_size, batch_format="pyarrow",
                                                     prefetch_batches=2)):
        if index < position:  # resumed: the data position continues
            continue
        group.append(table)
        if len(group) == t.grad_accum:
            yield (index + 1) // t.grad_accum, group
            group = []


def step_rows(tables, rank: int, world: int, t, step: int):
    """(step after the group, its grad_accum tables) for worker ``rank`` from a stream every worker reads whole.

    Step s trains on the stream's rows [s*G, (s+1)*G), G = batch_size x grad_accum x world, and worker r on
    the r-th run of batch_size x grad_accum of them, cut into grad_accum micro-batches. So the rows of a step
    depend only on G: a run resumes on another worker count at the same rows. Resumed at ``step``, the rows
    before it are passed over without being cut. A short last step (the stream ran out) is dropped.
    """
    import pyarrow as pa

    mine = t.batch_size * t.grad_accum
    per_step = mine * world
    pending: list = []
    have, start = 0, 0  # this step's rows gathered so far; the stream position of the table in hand
    for table in tables:
        end = start + table.num_rows
        while True:
            at = step * per_step + rank * mine + have  # the next stream row this worker needs
            if at >= end:
                break
            take = min(mine - have, end - at)
            pending.append(table.slice(at - start, take))
            have += take
            if have < mine:
                break
            rows = pa.concat_tables(pending).combine_chunks()
            step, pending, have = step + 1, [], 0
            yield step, [rows.slice(i * t.batch_size, t.batch_size) for i in range(t.grad_accum)]
        start = end


def build_student(cfg, student_path: str):
    """The student a worker trains, in fp32: LoRA-wrapped, packed attention and fake-quantised as the config
    says. Returns it and how many linear layers train.qat fake-quantised (0: off)."""
    student = load_student(student_path, torch.float32, cfg.student.revision, cfg.student.trust_remote_code,
                           cfg.student.gradient_checkpointing, cfg.student.allow_pickle_weights,
                           cfg.student.max_position_embeddings)
    if cfg.student.lora is not None:
        student = add_lora(student, cfg.student.lora)
    if cfg.train.packing:
        use_packed_attention(student)
    if not cfg.train.qat:
        return student, 0
    from ..quantize.qat import prepare  # config.qat_problem refuses LoRA: the layers are plain nn.Linear

    return student, prepare(student, cfg.train.qat, cfg.quantize.group_size)


def train_loop_per_worker(loop_config: dict[str, LoopInputs]) -> None:
    import ray.train
    import ray.train.torch

    inputs = loop_config["inputs"]
    cfg = build_config(inputs.config)
    faults.arm(inputs.faults)
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(t.seed + rank)
    device = ray.train.torch.get_device()
    dtype = compute_dtype(t)
    if not t.use_gpu:
        torch.set_num_threads(max(1, int(t.cpus_per_worker)))

    tokenizer = load_tokenizer(inputs.student_path, cfg.student.revision, cfg.student.trust_remote_code)
    # fp32 master weights whatever the compute dtype: a bf16 update of ~1e-5 rounds away on most weights
    student, fake_quantised = build_student(cfg, inputs.student_path)
    if fake_quantised and rank == 0:
        say(f"train: train.qat={t.qat}: {fake_quantised} linear layers fake-quantised")
    settings = kd_settings(t, student.get_output_embeddings().weight.shape[0])
    model = place_model(student, settings, t.strategy, dtype, device, world)
    context = compute_context(t.strategy, dtype, device)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)

    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0}
    metrics: list[dict] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # after placement: the optimizer state lands on the parameters' device and shards
        with checkpoint.as_directory() as d:
            state, metrics = _restore(student, optimizer, Path(d))
        # Kept in trainer_state.json, so a run's restores can be audited (and tested) afterwards.
        state.setdefault("resumed", []).append({k: state[k] for k in ("step", "epoch", "batches_in_epoch")})
        if rank == 0:
            say(f"train: resumed from step {state['step']} (epoch {state['epoch']}, "
                f"batch {state['batches_in_epoch']})")

    retokenize = None
    if inputs.retokenize:
        def retokenize(row):
            messages = row["messages"]  # the system prompt goes first unless the row has its own, as in generation
            if inputs.system_prompt and not any(m["role"] == "system" for m in messages):
                messages = [{"role": "system", "content": inputs.system_prompt}, *messages]
            return prompt_ids(tokenizer, messages), completion_ids(tokenizer, row["completion_text"],
                                                                          row["finish_reason"])

    id_lookup, spare_row, reprompt = _route_inputs(inputs, tokenizer)
    total = inputs.total_steps
    shard = ray.train.get_dataset_shard("train")
    progress = events = None
    if rank == 0:
        trainable, all_params = count_parameters(student)
        say(f"train: {world} worker(s) on {device} ({t.strategy}, {str(dtype).removeprefix('torch.')} compute, "
            f"fp32 weights), {trainable:,} of {all_params:,} parameters trainable, {total} steps")
        progress = _Progress(total, state["step"], t.log_every)
        events = _Events(ctx)
    counts: dict[str, int] = {}
    t_step, wait = time.time(), 0.0
    model.train()
    per_epoch = inputs.batches_per_epoch
    t_wait = time.time()
    if inputs.shared_stream:
        # The stream lists each cached block once per epoch; Ray Data's prefetcher refuses repeated blocks in
        # one wait ("Error in prefetcher thread ... unique ray_waitables"), and the blocks are already in the
        # object store, so it is read without prefetching.
        blocks = shard.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)
        groups = step_rows(blocks, rank, world, t, state["step"])
    else:
        groups = _micro_batches(shard, t, state["step"])
    for step, tables in groups:
        wait += time.time() - t_wait
        batches = []
        for table in tables:
            batch, stats = build_batch(table, max_seq_len=t.max_seq_len, pad_id=tokenizer.pad_token_id,
                                       with_topk=settings.alpha > 0, retokenize=retokenize, pack=t.packing,
                                       id_lookup=id_lookup, spare_row=spare_row, reprompt=reprompt)
            batches.append(batch)
            for key, value in stats.items():
                counts[key] = counts.get(key, 0) + value
        means, tokens = accumulate(model, batches, device, context)
        state["step"] = step  # the data position: a resumed run restarts from it (step_rows, _micro_batches)
        state["epoch"], state["batches_in_epoch"] = epoch_position(step * t.grad_accum, per_epoch)
        row = _step(optimizer, params, state["step"], total, t, means)
        elapsed = max(time.time() - t_step, 1e-9)
        row.update(epoch=state["epoch"], tokens=tokens, tokens_per_s=tokens / elapsed, data_wait_frac=wait / elapsed)
        metrics.append(row)
        if progress is not None:
            progress.update(row)
            events.add(row)
        t_step, wait = time.time(), 0.0
        faults.point("train_step", state["step"], rank=rank)
        if state["step"] >= total:
            break
        if t.checkpoint_every and state["step"] % t.checkpoint_every == 0:
            _report(student, optimizer, state, metrics, counts, rank, events)
            faults.point("train_checkpoint", state["step"], rank=rank)
        t_wait = time.time()
    _report(student, optimizer, state, metrics, counts, rank, events)
    if events is not None:
        events.close()


def _step(optimizer, params, step: int, total: int, t, means: torch.Tensor) -> dict:
    """Set the scheduled learning rate, clip, step; returns the step's metrics row (global means)."""
    scale = lr_at(step, total, t.warmup_steps, t.lr_schedule)
    for group in optimizer.param_groups:
        group["lr"] = t.lr * scale
    if t.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss, ce, kd = (float(v) for v in means)
    return {"step": step, "loss": loss, "ce": ce, "kd": kd, "lr": t.lr * scale}


def say(line: str) -> None:
    """One line to the worker's stdout, which Ray relays to the driver once.

    Ray Train patches ``print`` in its workers to log through its own logger, whose console handler writes
    the line and which also calls the original ``print`` when ``sys.stdout`` is wrapped (as Ray wraps it):
    every ``print`` reached the driver twice.
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class _Progress:
    """One dense line every ``every`` steps (workers have no terminal, so no redrawn bar): rank 0 only."""

    def __init__(self, total: int, start: int, every: int):
        self.total, self.every, self.t0, self.start = total, every, time.time(), start

    def update(self, row: dict) -> None:
        step = row["step"]
        if step % self.every and step != self.total:
            return
        rate = (step - self.start) / max(time.time() - self.t0, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        say(f"train: step {step}/{self.total} ({step / self.total:4.0%}) loss {row['loss']:.4f} ce {row['ce']:.4f} "
            f"kd {row['kd']:.4f} lr {row['lr']:.2e} {row['tokens_per_s']:,.0f} tok/s "
            f"data-wait {row['data_wait_frac']:.0%} eta {eta:.0f}s")


class _Events:
    """TensorBoard events written as training goes (rank 0), so ``tensorboard --logdir`` shows a live run.

    They go to ``<storage_path>/<run>/tensorboard`` when the run's storage is a local folder; with remote
    storage they are written to a local folder and copied there at every checkpoint.
    """

    def __init__(self, ctx):
        import pyarrow.fs as pafs
        from torch.utils.tensorboard import SummaryWriter

        storage = ctx.get_storage()
        self.fs, self.remote = storage.storage_filesystem, f"{storage.experiment_fs_path}/{EVENTS}"
        self.local = Path(self.remote) if isinstance(self.fs, pafs.LocalFileSystem) else \
            Path(tempfile.mkdtemp(prefix="distill-llm-events-"))
        self.writer = SummaryWriter(str(self.local), flush_secs=10)

    def add(self, row: dict) -> None:
        for key in ("loss", "ce", "kd", "lr", "tokens_per_s"):
            self.writer.add_scalar(f"train/{key}", row[key], row["step"])

    def sync(self) -> None:
        import pyarrow.fs as pafs

        self.writer.flush()
        if str(self.local) != self.remote:
            pafs.copy_files(str(self.local), self.remote, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)

    def close(self) -> None:
        self.sync()
        self.writer.close()


def _report(student, optimizer, state: dict, metrics: list[dict], counts: dict, rank: int, events) -> None:
    """Every rank writes its part of the checkpoint and reports it; Ray Train gathers them in one folder."""
    import ray.train

    if events is not None:
        events.sync()
    last = metrics[-1] if metrics else {}
    report = {"step": state["step"], "epoch": state["epoch"], **{k: last.get(k) for k in ("loss", "ce", "kd")},
              **{f"rows_{k}": v for k, v in counts.items()}}
    with tempfile.TemporaryDirectory() as d:
        _save(student, optimizer, state, metrics, Path(d), rank)
        checkpoint = ray.train.Checkpoint.from_directory(d) if any(Path(d).rglob("*.*")) else None
        ray.train.report(report, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_step{state['step']:07d}")
