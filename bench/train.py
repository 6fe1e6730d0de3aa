"""Student training throughput and peak memory: the project's loss path against a naive loop.

    PYTHONPATH=$PWD python bench/train.py                               # CPU: steps, loss grid, data wait
    PYTHONPATH=$PWD python bench/train.py --packing --batch 8 --seq 1024   # packing vs padding tokens/s
    PYTHONPATH=$PWD python bench/train.py --sharding                    # FSDP vs DDP memory per worker
    PYTHONPATH=$PWD python bench/train.py --device cuda --shape qwen2.5-1.5b --batch 8 --seq 2048 \
        --grad-ckpt --no-data-wait                                      # a GPU host

ours   ``StudentWithLoss`` (decoder without its head) + chunked ``distill_loss``: logits exist for
       ``--chunk`` completion positions at a time and are recomputed in backward.
naive  ``model(input_ids).logits.float()`` over the whole batch and vocabulary, ``log_softmax``, CE, and
       ``F.kl_div`` against the teacher's top-k renormalised and scattered into a full-vocabulary vector.
Both: the same random-weight model, batch, sequence length, AdamW, alpha 0.5, T = 1; LoRA (r 16,
all-linear, head frozen) and full fine-tuning. Every case runs in a fresh interpreter, so each memory
high-water mark is its own. Memory: CPU reports the process RSS (a 1 ms psutil sampler and the kernel's
ru_maxrss high-water mark, whichever is higher) minus the RSS after set-up (model, optimizer, batch);
CUDA reports ``torch.cuda.max_memory_allocated`` (absolute, and above the same set-up point). Set-up ends
after one warm-up step, so the optimizer state is in the baseline of both; glibc's mmap threshold is pinned
(MALLOC_MMAP_THRESHOLD_) so freed tensors leave the RSS instead of being cached in the heap.
tok/s counts batch x sequence tokens per optimizer step.

The loss grid runs the loss alone (hidden [N, H] and head [V, H] both trainable) forward and backward
as N (completion positions in a batch) and V grow: ours stays flat in N, naive grows with N x V.
``--data-wait`` trains the toy student with the real Ray Train loop and reads its ``data_wait_frac``.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from common import (QUICKSTART, append_results, current_rss_bytes, emit, header, load_average, machine, peak_rss_bytes,
                    qwen_config, run_case, table)

GIB = 2**30


# ---------------------------------------------------------------- measuring memory in a case process


class Peak:
    """Peak memory above a baseline taken at construction; call ``stop()`` for (peak_bytes, above_baseline)."""

    def __init__(self, device: str):
        import torch

        self.device, self.torch = device, torch
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        self.base, self.hw0, self.max = current_rss_bytes(), peak_rss_bytes(), 0
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while self.running:
            self.max = max(self.max, proc.memory_info().rss)
            time.sleep(0.001)

    def stop(self) -> tuple[int, int]:
        if self.device == "cuda":
            self.torch.cuda.synchronize()
            peak = self.torch.cuda.max_memory_allocated()
            return peak, peak - self.base
        self.running = False
        self.thread.join()
        hw = peak_rss_bytes()
        peak = max(self.max, hw if hw > self.hw0 else 0)
        return peak, peak - self.base


# ---------------------------------------------------------------- inputs


def make_model(shape: str, device: str, dtype, mode: str, grad_ckpt: bool):
    import torch
    from transformers import AutoModelForCausalLM

    from distill_llm.config import LoraSettings
    from distill_llm.student.model import add_lora

    if shape == "toy-student":
        from distill_llm.toy import STUDENT_SHAPE, build_tokenizer, qwen2_config

        conf = qwen2_config(STUDENT_SHAPE, build_tokenizer())
    else:
        conf = qwen_config(shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(conf, dtype=dtype)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if mode == "lora":
        model = add_lora(model, LoraSettings(r=16, alpha=32))
    return model, conf.vocab_size


def make_batch(batch: int, seq: int, prompt_len: int, vocab: int, k: int, device: str) -> dict:
    """Random sequences; completion positions after ``prompt_len``; a sorted, normalised-looking top-k."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    comp = seq - prompt_len
    index = torch.cat([b * seq + prompt_len - 1 + torch.arange(comp) for b in range(batch)])
    targets = ids[:, prompt_len:].reshape(-1)
    n = batch * comp
    topk_ids = torch.randint(0, vocab, (n, k), generator=g)
    topk_ids[:, 0] = targets  # the sampled token is usually the teacher's top-1
    lps = torch.log_softmax(torch.randn(n, k, generator=g) * 3, -1).sort(-1, descending=True).values
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "gather_index": index, "targets": targets,
           "topk_ids": topk_ids, "topk_logprobs": lps}
    return {key: v.to(device) for key, v in out.items()}


def naive_loss(logits, targets, topk_ids, topk_logprobs, alpha: float = 0.5):
    """Full-vocabulary fp32 log-softmax, CE, and KL to the top-k teacher scattered into the vocabulary."""
    import torch
    import torch.nn.functional as F

    s_logp = F.log_softmax(logits.float(), dim=-1)
    ce = F.nll_loss(s_logp, targets)
    t_probs = torch.zeros_like(s_logp).scatter_(1, topk_ids, torch.softmax(topk_logprobs.float(), -1))
    kl = F.kl_div(s_logp, t_probs, reduction="batchmean")
    return (1 - alpha) * ce + alpha * kl


# ---------------------------------------------------------------- cases (each in its own process)


def case_pack(c: dict) -> dict:
    """The loop's own steps (build_batch, accumulate, AdamW) over R1-like rows, packed or padded.

    Lengths are lognormal (sigma ``c["sigma"]``, so max/median is about 8 over a few hundred rows), capped at
    ``max_seq_len``; prompts are 1/8 of each row. tok/s counts real (non-padding) tokens.
    """
    import numpy as np
    import pyarrow as pa
    import torch

    from distill_llm.student.batching import build_batch
    from distill_llm.student.loop import accumulate
    from distill_llm.student.losses import KDSettings
    from distill_llm.student.model import StudentWithLoss

    torch.set_num_threads(os.cpu_count() or 1)
    model, vocab = make_model(c["shape"], "cpu", torch.float32, "full", False)
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(np.log(c["median"]), c["sigma"], c["rows"]).astype(int) + 8, c["max_seq_len"])
    prompts = [rng.integers(0, vocab, max(1, n // 8)).tolist() for n in lengths]
    table = pa.table({"prompt_token_ids": prompts,
                      "completion_token_ids": [rng.integers(0, vocab, n - len(p)).tolist()
                                               for n, p in zip(lengths, prompts)]})
    if c["packing"] and c.get("attention") == "per-sequence":
        from distill_llm.student.model import use_packed_attention

        assert use_packed_attention(model)
    wrapped = StudentWithLoss(model, KDSettings(alpha=0.0, chunk_size=512))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batches = [build_batch(table.slice(i, c["batch"]), max_seq_len=c["max_seq_len"], pad_id=0, with_topk=False,
                           pack=c["packing"])[0] for i in range(0, table.num_rows, c["batch"])]
    t0 = time.perf_counter()
    for batch in batches:
        accumulate(wrapped, [batch], "cpu", contextlib.nullcontext())
        opt.step()
        opt.zero_grad(set_to_none=True)
    sec = time.perf_counter() - t0
    cells = sum(b["input_ids"].numel() for b in batches)
    return {**c, "tok_s": int(lengths.sum()) / sec, "padding_frac": 1 - int(lengths.sum()) / cells,
            "max_over_median": float(lengths.max() / np.median(lengths)), "seconds": sec}


def _state_bytes(model, optimizer) -> dict[str, int]:
    """Bytes this worker holds of parameters, gradients and optimizer state (its shards under FSDP)."""
    def local(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = [p for p in model.parameters()]
    opt = sum(local(v) for st in optimizer.state.values() for v in st.values() if hasattr(v, "numel") and v.dim())
    return {"params": sum(local(p) for p in params), "grads": sum(local(p.grad) for p in params if p.grad is not None),
            "optimizer": opt}


def _shard_worker(rank: int, c: dict, init: str, out: str) -> None:
    """One of 2 gloo workers: place the model with the project's place_model, take steps, write figures."""
    import torch
    import torch.distributed as dist

    from distill_llm.student.losses import KDSettings
    from distill_llm.student.model import place_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=c["workers"])
    peak = Peak("cpu")  # baseline: the interpreter, torch and the process group, before the model
    model, vocab = make_model(c["shape"], "cpu", torch.float32, "full", False)
    placed = place_model(model, KDSettings(alpha=0.0, chunk_size=512), c["strategy"], torch.float32,
                         torch.device("cpu"), c["workers"])
    opt = torch.optim.AdamW([p for p in placed.parameters() if p.requires_grad], lr=1e-5)
    batch = make_batch(c["batch"], c["seq"], c["prompt_len"], vocab, 1, "cpu")
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "gather_index", "targets")}
    for _ in range(c["steps"]):
        placed(**batch)["loss"].backward()
        opt.step()
        state = _state_bytes(placed, opt)  # before zero_grad, when gradients exist
        opt.zero_grad(set_to_none=True)
    total, above = peak.stop()
    Path(out).write_text(json.dumps({"rank": rank, **state, "rss_peak_above_start": above,
                                     "params_total": sum(p.numel() for p in model.parameters())}))
    dist.destroy_process_group()


def case_shard(c: dict) -> dict:
    """DDP or FSDP2 on 2 gloo worker processes: per-worker state bytes and peak RSS (rank 0 and the max)."""
    import torch.multiprocessing as mp

    work = Path(tempfile.mkdtemp(prefix="bench-shard-"))
    try:
        outs = [str(work / f"rank{r}.json") for r in range(c["workers"])]
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_shard_worker, args=(r, c, f"file://{work / 'rendezvous'}", outs[r]))
                 for r in range(c["workers"])]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        ranks = [json.loads(Path(o).read_text()) for o in outs]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    worst = max(ranks, key=lambda r: r["rss_peak_above_start"])
    state = max(r["params"] + r["grads"] + r["optimizer"] for r in ranks)
    return {**c, "params_total": ranks[0]["params_total"], "state_gib": state / GIB,
            **{f"{k}_gib": max(r[k] for r in ranks) / GIB for k in ("params", "grads", "optimizer")},
            "rss_peak_gib": worst["rss_peak_above_start"] / GIB}


def case_train(c: dict) -> dict:
    import torch

    from distill_llm.student.losses import KDSettings
    from distill_llm.student.model import StudentWithLoss

    device = c["device"]
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, vocab = make_model(c["shape"], device, dtype, c["mode"], c["grad_ckpt"])
    batch = make_batch(c["batch"], c["seq"], c["prompt_len"], vocab, c["k"], device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ours = StudentWithLoss(model, KDSettings(alpha=0.5, temperature=1.0, chunk_size=c["chunk"]))
    ours.train()

    def step() -> None:
        if c["impl"] == "ours":
            loss = ours(**batch)["loss"]
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            flat = logits.reshape(-1, logits.shape[-1]).index_select(0, batch["gather_index"])
            loss = naive_loss(flat, batch["targets"], batch["topk_ids"], batch["topk_logprobs"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: first-call code paths and the optimizer state (both pay it) stay out of the peak
    peak = Peak(device)
    times = []
    for _ in range(c["steps"]):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    total, above = peak.stop()
    sec = statistics.median(times)
    return {**c, "step_s": sec, "tok_s": c["batch"] * c["seq"] / sec, "peak_gib": total / GIB,
            "above_setup_gib": above / GIB,
            "trainable": sum(p.numel() for p in params), "params": sum(p.numel() for p in model.parameters())}


def case_loss(c: dict) -> dict:
    import torch

    from distill_llm.student.losses import KDSettings, distill_loss

    device, n, v, h, k = c["device"], c["n"], c["vocab"], c["hidden"], c["k"]
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hidden = (torch.randn(n, h, generator=g) * 0.1).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.1).to(device, dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    ids = torch.randint(0, v, (n, k), generator=g).to(device)
    lps = torch.log_softmax(torch.randn(n, k, generator=g) * 3, -1).sort(-1, descending=True).values.to(device)
    settings = KDSettings(alpha=0.5, chunk_size=c["chunk"])

    def once() -> None:
        if c["impl"] == "ours":
            loss = distill_loss(hidden, weight, targets, ids, lps, settings)["loss"]
        else:
            loss = naive_loss(hidden @ weight.t(), targets, ids, lps)
        loss.backward()
        hidden.grad = weight.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    once()  # warm-up: first-call code paths stay out of the peak
    peak = Peak(device)
    t = time.perf_counter()
    once()
    sec = time.perf_counter() - t
    total, above = peak.stop()
    return {**c, "loss_s": sec, "above_inputs_mib": above / 2**20, "logits_mib": n * v * 4 / 2**20}


# ---------------------------------------------------------------- the data-wait run (real Ray Train loop)


def data_wait(args, work: Path) -> str:
    from distill_llm.config import load_config
    from distill_llm.teacher.stage import generate
    from distill_llm.student.stage import train

    shards = args.shards
    over = [f"output.dir={work / 'dw-shards'}", f"output.student_dir={work / 'dw-student'}",
            f"train.storage_path={work / 'dw-train'}", f"train.max_steps={args.dw_steps}", "train.log_every=50",
            f"data.num_prompts={args.dw_prompts}"]
    if shards:
        over.append(f"data.shards=[{shards}]")
    cfg = load_config(QUICKSTART, over)
    if not shards:
        generate(cfg)
    t = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - t
    files = sorted(glob.glob(str(work / "dw-train" / "**" / "metrics.jsonl"), recursive=True), key=os.path.getmtime)
    rows = [json.loads(line) for line in Path(files[-1]).read_text().splitlines() if line]
    steady = [r for r in rows if r["step"] > 1]  # step 1 waits for the pipeline to start
    waits = sorted(r["data_wait_frac"] for r in steady)
    p95 = waits[min(len(waits) - 1, int(0.95 * len(waits)))]
    # The first step of each epoch: before 2026-11-24 it opened a new iterator and waited for the pipeline.
    first = [r["data_wait_frac"] for prev, r in zip(rows, rows[1:]) if r["epoch"] != prev["epoch"]]
    inner = [r["data_wait_frac"] for prev, r in zip(rows, rows[1:]) if r["epoch"] == prev["epoch"]]
    res = {"steps": len(rows), "median data_wait_frac": statistics.median(waits),
           "mean data_wait_frac": statistics.fmean(waits), "p95 data_wait_frac": p95,
           "step 1 data_wait_frac": rows[0]["data_wait_frac"],
           "epoch-first steps": len(first), "their mean": statistics.fmean(first) if first else None,
           "mean of the other steps": statistics.fmean(inner) if inner else None,
           "median tok/s": statistics.median(r["tokens_per_s"] for r in steady), "train() s": seconds}
    return (f"Real Ray Train loop, quickstart settings (toy student, full FT, 2 workers x batch 16, "
            f"{args.dw_steps} steps, shards {'given' if shards else f'of {args.dw_prompts} toy prompts'}); "
            f"target: data wait <= 2% of step time.\n\n"
            + table([res], list(res)) + "\n")


# ---------------------------------------------------------------- driver


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--shape", default="tiny-qwen",
                   choices=["toy-student", "tiny-qwen", "qwen-82m", "qwen2.5-0.5b", "qwen2.5-1.5b",
                            "qwen2.5-7b"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--chunk", type=int, default=1024, help="train.loss_chunk_size of ours")
    p.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up step")
    p.add_argument("--modes", default="lora,full")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in the decoder (both)")
    p.add_argument("--loss-n", default="256,1024,4096", help="loss grid: completion positions per batch")
    p.add_argument("--loss-vocab", default="16384,151936", help="loss grid: vocabulary sizes")
    p.add_argument("--loss-chunk", type=int, default=256)
    p.add_argument("--naive-limit-gb", type=float, default=4.0, help="skip naive loss points needing more")
    p.add_argument("--packing", action="store_true", help="only: packing vs padding tok/s (uses --batch, --seq)")
    p.add_argument("--sharding", action="store_true", help="only: FSDP vs DDP memory per worker (2 workers)")
    p.add_argument("--shard-shape", default="qwen-82m")
    p.add_argument("--pack-rows", type=int, default=128)
    p.add_argument("--pack-median", type=int, default=64)
    p.add_argument("--pack-sigma", type=float, default=1.15, help="lognormal sigma (max/median about 8 over 128 rows)")
    p.add_argument("--no-steps", action="store_true")
    p.add_argument("--no-loss-grid", action="store_true")
    p.add_argument("--no-data-wait", action="store_true")
    p.add_argument("--dw-steps", type=int, default=150)
    p.add_argument("--dw-prompts", type=int, default=256)
    p.add_argument("--shards", default=None, help="data-wait run: train on this shard set instead of generating")
    p.add_argument("--results", default=None)
    args = p.parse_args()
    if args.case:
        c = json.loads(args.case)
        emit({"train": case_train, "loss": case_loss, "pack": case_pack, "shard": case_shard}[c["kind"]](c))
        return
    if args.sharding:
        info = machine()
        rows = [run_case("train.py", dict(kind="shard", strategy=strategy, shape=args.shard_shape, workers=2,
                                          batch=2, seq=128, prompt_len=32, steps=2)) for strategy in ("ddp", "fsdp")]
        if all("error" not in r for r in rows):
            for key in ("state_gib", "rss_peak_gib"):
                rows[1][f"{key.removesuffix('_gib')} vs ddp"] = rows[1][key] / rows[0][key]
        append_results(args.results, header(f"Training: FSDP vs DDP memory per worker, {args.shard_shape}, cpu", info)
                       + "\n2 gloo workers (processes), full fine-tuning, fp32, AdamW, 2 steps of batch 2 x 128 "
                       "through place_model. state: bytes of this worker's parameters + gradients + AdamW state "
                       "(local shards under FSDP), the larger worker; rss_peak: process RSS high-water mark above "
                       "the interpreter + torch + process group, the larger worker (gathered layers and "
                       f"activations included); load average now {load_average()}.\n\n"
                       + table(rows, ["strategy", "params_total", "params_gib", "grads_gib", "optimizer_gib",
                                      "state_gib", "rss_peak_gib", "state vs ddp", "rss_peak vs ddp", "error"]) + "\n")
        return
    if args.packing:
        info = machine()
        rows = [run_case("train.py", dict(kind="pack", packing=packing, attention=attention, shape=args.shape,
                                          rows=args.pack_rows, batch=args.batch, median=args.pack_median, sigma=args.pack_sigma,
                                          max_seq_len=args.seq))
                for packing, attention in ((False, "sdpa"), (True, "dense-mask"), (True, "per-sequence"))]
        for r in rows[1:]:
            if "error" not in r and "error" not in rows[0]:
                r["tok/s vs padded"] = r["tok_s"] / rows[0]["tok_s"]
        append_results(args.results, header(f"Training: packing vs padding, {args.shape}, cpu", info) + "\n"
                       f"Full fine-tuning, sequence-level loss, batch {args.batch} rows, {args.pack_rows} rows of "
                       f"lognormal length (median {args.pack_median}, sigma {args.pack_sigma}) capped at {args.seq}; attention: "
                       "padded rows use SDPA with the padding mask; packed rows either a dense block-diagonal mask "
                       "(transformers' SDPA, before) or causal SDPA per sequence (use_packed_attention, what "
                       f"train.packing uses); load average now {load_average()}.\n\n"
                       + table(rows, ["packing", "attention", "tok_s", "padding_frac", "max_over_median", "seconds",
                                      "tok/s vs padded", "error"]) + "\n")
        return

    info = machine()
    title = "data wait (toy student)" if args.no_steps and args.no_loss_grid else f"{args.shape}, {args.device}"
    sections = [header(f"Training: {title}", info)]
    if not args.no_steps:
        rows = []
        for mode in args.modes.split(","):
            for impl in ("ours", "naive"):  # interleaved: ours, naive, ours, naive
                rows.append(run_case("train.py", dict(
                    kind="train", impl=impl, mode=mode, shape=args.shape, device=args.device, batch=args.batch,
                    seq=args.seq, prompt_len=args.prompt_len, k=args.k, chunk=args.chunk, steps=args.steps,
                    grad_ckpt=args.grad_ckpt)))
                print(rows[-1], flush=True)
        for r in rows:
            other = next((o for o in rows if o["mode"] == r["mode"] and o["impl"] == "naive"), None)
            if other and "error" not in r and "error" not in other:
                r["tok/s vs naive"] = r["tok_s"] / other["tok_s"]
                r["memory vs naive"] = r["above_setup_gib"] / max(other["above_setup_gib"], 1e-9)
        sections.append(
            f"Steps: batch {args.batch} x seq {args.seq} (prompt {args.prompt_len}), k {args.k}, ours chunk "
            f"{args.chunk}, gradient checkpointing {args.grad_ckpt}; median of {args.steps} steps after a warm-up; "
            f"load average now {load_average()}.\n\n"
            + table(rows, ["mode", "impl", "trainable", "step_s", "tok_s", "peak_gib", "above_setup_gib",
                           "tok/s vs naive", "memory vs naive", "error"]) + "\n")
    if not args.no_loss_grid:
        h = 64 if args.device == "cpu" else qwen_config(args.shape).hidden_size
        rows = []
        for v in (int(x) for x in args.loss_vocab.split(",")):
            for n in (int(x) for x in args.loss_n.split(",")):
                for impl in ("ours", "naive"):
                    need = n * v * 4 * 5 / GIB  # fp32 logits, log-softmax, teacher, two grads
                    if impl == "naive" and need > args.naive_limit_gb:
                        rows.append(dict(impl=impl, vocab=v, n=n, error=f"skipped: needs ~{need:.0f} GiB"))
                        continue
                    rows.append(run_case("train.py", dict(kind="loss", impl=impl, vocab=v, n=n, hidden=h, k=args.k,
                                                          chunk=args.loss_chunk, device=args.device)))
                    print(rows[-1], flush=True)
        sections.append(
            f"Loss only, forward + backward (hidden {h}, k {args.k}, ours chunk {args.loss_chunk}); memory above the "
            f"inputs; 'logits' is one fp32 N x V tensor for scale; load average now {load_average()}.\n\n"
            + table(rows, ["vocab", "n", "impl", "loss_s", "above_inputs_mib", "logits_mib", "error"]) + "\n")
    if not args.no_data_wait:
        work = Path(tempfile.mkdtemp(prefix="bench-train-"))
        try:
            sections.append(data_wait(args, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        sections[-1] += f"\nload average at end {load_average()}\n"
    append_results(args.results, "\n".join(sections))


if __name__ == "__main__":
    main()
