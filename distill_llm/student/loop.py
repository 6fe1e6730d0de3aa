"""The per-worker training loop: the only module that calls ``ray.train``.

Reads batches from its dataset shard (``stage.worker_datasets``), steps the student, and reports checkpoints
(weights or adapter, optimizer, step, epoch position and the metrics so far) from rank 0.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import faults
from ..config import build_config
from .losses import KDSettings
from .model import StudentWithLoss, add_lora, count_parameters, load_student
from ..tokenizers import completion_ids, load_tokenizer, prompt_ids
from .batching import build_batch

STATE = "trainer_state.json"
METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class LoopInputs:
    """What the driver (stage.py) hands every Ray Train worker, as ``train_loop_config={"inputs": ...}``
    (Ray Train wants a dict there)."""

    config: dict[str, Any]  # the validated Config, as JSON (rebuilt with build_config on the worker)
    student_path: str  # a local folder or hub id, already resolved on the driver
    retokenize: bool  # the student has another tokenizer: re-tokenise the teacher's text (sequence-level KD)
    total_steps: int
    batches_per_epoch: int  # per worker
    per_worker_datasets: bool  # datasets train_<rank> (a cached corpus) rather than one split "train"
    faults: str | None = None  # the driver's DISTILL_LLM_FAULTS, armed on the worker (faults.arm)
    system_prompt: str | None = None  # the teacher stage's (run.json prompts.system_prompt), for re-tokenised prompts


def lr_at(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at a (1-based) step."""
    if warmup and step <= warmup:
        return step / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def epoch_position(batches: int, per_epoch: int) -> tuple[int, int]:
    """(epoch, batches into it) after ``batches`` batches; a finished epoch is not rolled over."""
    if batches == 0:
        return 0, 0
    epoch = (batches - 1) // per_epoch
    return epoch, batches - epoch * per_epoch


def _save(model, optimizer, state: dict, metrics: list[dict], directory: Path) -> None:
    inner = model.module if hasattr(model, "module") else model
    student = inner.model
    if hasattr(student, "peft_config"):
        student.save_pretrained(str(directory / "adapter"), safe_serialization=True)
    else:
        student.save_pretrained(str(directory / "model"), safe_serialization=True)
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    (directory / STATE).write_text(json.dumps(state))
    (directory / METRICS).write_text("".join(json.dumps(m) + "\n" for m in metrics))


def _restore(student, optimizer, directory: Path) -> tuple[Any, dict, list[dict]]:
    if (directory / "adapter").is_dir():
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(student, load_file(str(directory / "adapter" / "adapter_model.safetensors")))
    else:
        from safetensors.torch import load_file

        weights = {}
        for f in sorted((directory / "model").glob("*.safetensors")):
            weights.update(load_file(str(f)))
        student.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
    metrics = [json.loads(line) for line in (directory / METRICS).read_text().splitlines() if line]
    return student, json.loads((directory / STATE).read_text()), metrics


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
    dtype = torch.bfloat16 if t.use_gpu else torch.float32
    if not t.use_gpu:
        torch.set_num_threads(max(1, int(t.cpus_per_worker)))

    tokenizer = load_tokenizer(inputs.student_path, cfg.student.revision, cfg.student.trust_remote_code)
    student = load_student(inputs.student_path, dtype, cfg.student.revision, cfg.student.trust_remote_code,
                           cfg.student.gradient_checkpointing, cfg.student.allow_pickle_weights)
    if cfg.student.lora is not None:
        student = add_lora(student, cfg.student.lora)
    settings = KDSettings(alpha=t.alpha, temperature=t.temperature, divergence=t.divergence, jsd_beta=t.jsd_beta,
                          tail_bucket=t.tail_bucket, chunk_size=t.loss_chunk_size)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)

    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0}
    metrics: list[dict] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            student, state, metrics = _restore(student, optimizer, Path(d))
        # Kept in trainer_state.json, so a run's restores can be audited (and tested) afterwards.
        state.setdefault("resumed", []).append({k: state[k] for k in ("step", "epoch", "batches_in_epoch")})
        if rank == 0:
            print(f"train: resumed from step {state['step']} (epoch {state['epoch']}, "
                  f"batch {state['batches_in_epoch']})", flush=True)
    model = ray.train.torch.prepare_model(StudentWithLoss(student, settings), parallel_strategy_kwargs=None) \
        if world > 1 else StudentWithLoss(student, settings).to(device)

    retokenize = None
    if inputs.retokenize:
        def retokenize(row):
            messages = row["messages"]  # the system prompt goes first unless the row has its own, as in generation
            if inputs.system_prompt and not any(m["role"] == "system" for m in messages):
                messages = [{"role": "system", "content": inputs.system_prompt}, *messages]
            return prompt_ids(tokenizer, messages), completion_ids(tokenizer, row["completion_text"],
                                                                          row["finish_reason"])

    total = inputs.total_steps
    shard = ray.train.get_dataset_shard(f"train_{rank}" if inputs.per_worker_datasets else "train")
    progress = None
    if rank == 0:
        trainable, all_params = count_parameters(student)
        print(f"train: {world} worker(s) on {device}, {trainable:,} of {all_params:,} parameters trainable, "
              f"{total} steps", flush=True)
        progress = _Progress(total, state["step"], t.log_every)
    counts: dict[str, int] = {}
    step_tokens, t_step, wait, micro = 0, time.time(), 0.0, 0
    model.train()
    per_epoch = inputs.batches_per_epoch
    # checkpoints from before "batches" was recorded kept only the position inside an epoch
    position = state.get("batches", state["epoch"] * per_epoch + state["batches_in_epoch"])
    t_wait = time.time()
    # One iterator for the whole run: the dataset already holds every epoch (stage.worker_datasets).
    for index, table in enumerate(shard.iter_batches(batch_size=t.batch_size, batch_format="pyarrow",
                                                     prefetch_batches=2)):
        if index < position:  # resumed: the data position continues
            continue
        wait += time.time() - t_wait
        batch, stats = build_batch(table, max_seq_len=t.max_seq_len, pad_id=tokenizer.pad_token_id,
                                   with_topk=settings.alpha > 0, retokenize=retokenize)
        for key, value in stats.items():
            counts[key] = counts.get(key, 0) + value
        out = model(**{k: v.to(device) for k, v in batch.items()})
        (out["loss"] / t.grad_accum).backward()
        step_tokens += int(batch["targets"].numel())
        micro += 1
        state["batches"] = index + 1
        state["epoch"], state["batches_in_epoch"] = epoch_position(index + 1, per_epoch)
        if micro % t.grad_accum == 0:
            state["step"] += 1
            row = _step(optimizer, params, state["step"], total, t, out)
            elapsed = max(time.time() - t_step, 1e-9)
            row.update(epoch=state["epoch"], tokens=step_tokens, tokens_per_s=step_tokens * world / elapsed,
                       data_wait_frac=wait / elapsed)
            metrics.append(row)
            if progress is not None:
                progress.update(row)
            step_tokens, t_step, wait = 0, time.time(), 0.0
            faults.point("train_step", state["step"], rank=rank)
            if state["step"] >= total:
                break
            if t.checkpoint_every and state["step"] % t.checkpoint_every == 0:
                _report(model, optimizer, state, metrics, counts, rank)
                faults.point("train_checkpoint", state["step"], rank=rank)
        t_wait = time.time()
    _report(model, optimizer, state, metrics, counts, rank)


def _step(optimizer, params, step: int, total: int, t, out: dict) -> dict:
    """Set the scheduled learning rate, clip, step; returns the step's metrics row."""
    scale = lr_at(step, total, t.warmup_steps, t.lr_schedule)
    for group in optimizer.param_groups:
        group["lr"] = t.lr * scale
    if t.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"step": step, "loss": out["loss"].item(), "ce": out["ce"].item(), "kd": out["kd"].item(),
            "lr": t.lr * scale}


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
        print(f"train: step {step}/{self.total} ({step / self.total:4.0%}) loss {row['loss']:.4f} ce {row['ce']:.4f} "
              f"kd {row['kd']:.4f} lr {row['lr']:.2e} {row['tokens_per_s']:,.0f} tok/s "
              f"data-wait {row['data_wait_frac']:.0%} eta {eta:.0f}s", flush=True)


def _report(model, optimizer, state: dict, metrics: list[dict], counts: dict, rank: int) -> None:
    """Every rank reports; rank 0 attaches the checkpoint."""
    import ray.train

    last = metrics[-1] if metrics else {}
    report = {"step": state["step"], "epoch": state["epoch"], **{k: last.get(k) for k in ("loss", "ce", "kd")},
              **{f"rows_{k}": v for k, v in counts.items()}}
    if rank == 0:
        with tempfile.TemporaryDirectory() as d:
            _save(model, optimizer, state, metrics, Path(d))
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"checkpoint_step{state['step']:07d}")
    else:
        ray.train.report(report)
