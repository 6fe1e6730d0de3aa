"""The student stage on the driver: check shards and tokenizers, run TorchTrainer, export the student."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from ..config import ONE_BUCKET_KD, Config, ConfigError
from ..faults import ENV as FAULTS_ENV
from ..paths import absolute, check_location, check_weights_format, filesystem, is_url, join, makedirs, resolve_model
from ..corpus.shards import read_json, check_compatible, identity_diff, read_manifest, shard_files, write_json
from ..tokenizers import TokenizerRoute, classify, load_tokenizer, model_rows, refusal, tokenizer_fingerprint

# Settings that change how a run is operated, not what it learns: changing them on a rerun keeps the run
# (so raising max_failures after a crash resumes instead of starting over).
OPERATIONAL_KEYS = {"storage_path", "resume", "log_every", "run_name", "max_failures", "keep_checkpoints",
                    "checkpoint_every", "verify_shards"}
# How a step's rows are spread over workers and micro-batches: the loss is token-exact and a cached corpus's
# steps take the same rows for any of these with the same rows per step (stage.worker_datasets), so a run
# resumes with other values of them; the run's identity keeps their product instead.
LAYOUT_KEYS = {"num_workers", "batch_size", "grad_accum", "cpus_per_worker", "resources_per_worker"}
RUN_RECORD = "distill_llm_run.json"  # beside Ray Train's files in <storage_path>/<run name>/
TRAIN_COLUMNS = ["sample_id", "messages", "prompt_token_ids", "completion_token_ids", "completion_text",
                 "finish_reason", "answer_correct"]


def route_tokenizers(cfg: Config, run: dict[str, Any], student_tok, student_path: str | None = None) -> TokenizerRoute:
    """How the shards' token ids reach the student (tokenizers.classify); a ConfigError when KD cannot work.

    The shards' recorded tokenizer fingerprint decides when the teacher's tokenizer cannot be loaded here.
    """
    teacher_ref = run["teacher"].get("resolved") or run["teacher"]["model"]
    student_path = student_path or getattr(student_tok, "name_or_path", None)
    student_rows = model_rows(student_path, cfg.student.revision, cfg.student.trust_remote_code) if student_path \
        else None
    try:
        teacher_path = resolve_model(teacher_ref)
        teacher_rows = model_rows(teacher_path, run["teacher"].get("revision"))
    except Exception:  # noqa: BLE001 - an unreachable teacher: its rows stay unknown
        teacher_path, teacher_rows = None, None
    if tokenizer_fingerprint(student_tok) == run["tokenizer_fingerprint"]:
        route = classify(student_tok, student_tok, teacher_rows, student_rows, teacher_ref, cfg.student.model)
    else:
        try:
            teacher_tok = load_tokenizer(teacher_path, run["teacher"].get("revision"))
        except Exception:  # noqa: BLE001 - teacher tokenizer not reachable from here: the fingerprint is all we have
            teacher_tok = None
        if teacher_tok is not None and tokenizer_fingerprint(teacher_tok) == run["tokenizer_fingerprint"]:
            route = classify(teacher_tok, student_tok, teacher_rows, student_rows, teacher_ref, cfg.student.model)
        else:
            route = TokenizerRoute("different", teacher_ref, cfg.student.model, 0, len(student_tok.get_vocab()),
                                   teacher_rows, student_rows, detail="tokenizer fingerprints differ and the "
                                   "teacher's tokenizer that wrote the shards could not be loaded to compare")
    why = refusal(route, cfg.train.alpha)
    if why:
        raise ConfigError(why)
    return route


def check_tokenizers(cfg: Config, run: dict[str, Any], student_tok) -> bool:
    """True when completions must be re-tokenised for the student (different tokenizers, sequence-level KD)."""
    return not route_tokenizers(cfg, run, student_tok).token_level


def run_identity(cfg: Config, shard_fp: str) -> dict[str, Any]:
    """What decides the weights a run produces: its shards, its student and its learning settings."""
    identity = {"shards": shard_fp, "student": cfg.student.model_dump(mode="json"),
                "train": {**cfg.train.model_dump(mode="json", exclude=OPERATIONAL_KEYS | LAYOUT_KEYS),
                          "rows_per_step": rows_per_step(cfg.train)}}
    if cfg.train.qat == "w4a16":  # the group size shapes the fake quantisation, so the weights
        identity["qat_group_size"] = cfg.quantize.group_size
    return identity


def rows_per_step(t) -> int:
    """Rows one optimizer step trains on: batch_size x grad_accum x num_workers."""
    return t.batch_size * t.grad_accum * t.num_workers


def check_qat(cfg: Config, student_path: str) -> None:
    """train.qat: quantize.group_size must divide the student's layers (as `quantize` will ask), and torchao
    must be installed; both before any training."""
    from ..quantize.schemes import check_group_size
    from ..quantize.stage import probe_widths

    try:
        import torchao.quantization.qat  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"train.qat={cfg.train.qat} needs torchao ({err}): the cpu and gpu extras install it "
                          "(pip install -c constraints-cpu.txt torchao==0.18.0)") from None
    check_group_size(cfg.train.qat, cfg.quantize.group_size, probe_widths(student_path, cfg.student.trust_remote_code))


def run_name(cfg: Config, identity: dict[str, Any]) -> str:
    """Same shards, student and training settings -> same name, so a rerun resumes instead of restarting."""
    if cfg.train.run_name:
        return cfg.train.run_name
    name = f"student-{hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]}"
    return name if cfg.train.resume else f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def claim_run(storage: str, name: str, identity: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Record the run's identity (and ``extra``, not compared) in its folder; refuse a folder holding another
    run's checkpoints.

    Ray Train resumes whatever checkpoint sits under <storage>/<name>, so an explicit
    ``train.run_name`` reused with other shards or settings would silently continue someone else's run.
    """
    fs, root = filesystem(join(storage, name))
    old = read_json(fs, join(root, RUN_RECORD))
    if old is None:
        makedirs(fs, root)
        write_json(fs, join(root, RUN_RECORD), {**identity, **(extra or {})})
        return
    diffs = identity_diff(old, identity, keys=identity.keys())
    if diffs:
        hint = ""
        if old.get("train", {}).get("rows_per_step") not in (None, identity["train"]["rows_per_step"]):
            hint = (f"\nto resume it on another worker count keep train.batch_size x train.grad_accum x "
                    f"train.num_workers = {old['train']['rows_per_step']} rows per step")
        raise ConfigError(f"train.run_name={name}: {join(storage, name)} holds checkpoints of a different run:\n  "
                          + "\n  ".join(diffs) + hint + "\nor choose another train.run_name or train.storage_path")


def check_writable(path: str, key: str) -> None:
    """Create the folder and write a probe file: a read-only or misspelt location fails now, not after training."""
    fs, root = filesystem(path)
    probe = join(root, f".distill-llm-probe-{uuid.uuid4().hex[:8]}")
    try:
        makedirs(fs, root)
        with fs.open_output_stream(probe) as f:
            f.write(b"")
        fs.delete_file(probe)
    except OSError as err:
        raise ConfigError(f"{key}={path} is not writable: {err}") from None


def verified_files(shard_dirs: list[str], verify: str) -> dict[str, list[str]]:
    """Every shard set's files, checked against its manifest (train.verify_shards) before any work."""
    return {d: shard_files(d, verify=verify) for d in shard_dirs}


def check_prompts_fit(files: dict[str, list[str]], max_seq_len: int) -> None:
    """Refuse a max_seq_len that no prompt fits in: every row would be skipped and nothing learned.

    Reads only the prompt-length column, shard by shard, and stops at the first shard with a prompt that fits.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    lows = []
    for fs, path in ((filesystem(d)[0], f) for d, paths in files.items() for f in paths):
        column = pq.read_table(path, columns=["prompt_token_ids"], filesystem=fs).column("prompt_token_ids")
        low = pc.min(pc.list_value_length(column)).as_py()
        if low is not None and low < max_seq_len:
            return
        lows += [low] if low is not None else []
    if lows:
        shortest = min(lows)
        raise ConfigError(f"train.max_seq_len={max_seq_len} leaves no room for a completion: the shortest prompt "
                          f"has {shortest} tokens, so every row would be skipped; raise train.max_seq_len above "
                          f"{shortest} (prompts plus completions should fit)")


def check_cluster_fits(cfg: Config) -> None:
    """Train workers the cluster can never place make Ray Train retry forever: say so before starting.

    A local Ray (no ray.address / RAY_ADDRESS) cannot grow, so that is an error; a cluster may autoscale.
    """
    import ray

    t = cfg.train
    need = {"CPU": t.num_workers * t.cpus_per_worker, **({"GPU": float(t.num_workers)} if t.use_gpu else {}),
            **{k: v * t.num_workers for k, v in t.resources_per_worker.items()}}
    have = ray.cluster_resources()
    short = [f"{k}: {v:g} needed, {have.get(k, 0):g} in the cluster" for k, v in need.items() if v > have.get(k, 0)]
    if not short:
        return
    what = (f"train.num_workers={t.num_workers} x (train.cpus_per_worker={t.cpus_per_worker:g}"
            + (", 1 GPU" if t.use_gpu else "") + (f", {t.resources_per_worker}" if t.resources_per_worker else "")
            + ") does not fit: " + "; ".join(short))
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        print(f"train: warning: {what}; waiting for the cluster to scale up", flush=True)
        return
    raise ConfigError(f"{what}; lower train.num_workers or the per-worker resources"
                      + (", or raise ray.num_cpus" if "CPU" in "".join(short) else ""))


def training_dataset(cfg: Config, files: dict[str, list[str]], with_topk: bool, order_seed: int | None = None):
    """Shard rows streamed from Parquet (never loaded whole into one process), optionally only answer-checked ones.

    Each file system is read once over all its shard sets' files (one set may be local, another in S3);
    the file system object travels to the read tasks with its endpoint, credentials are found there.
    With ``order_seed`` the files come in a seeded order, across shard sets.
    """
    import random

    import pyarrow.compute as pc
    import ray.data

    # (file system, has kd_weight, its files): sets on one file system with the same columns merged
    groups: list[tuple[Any, bool, list[str]]] = []
    for d, paths in files.items():
        fs = filesystem(d)[0]
        weighted = with_topk and has_kd_weight(fs, paths)
        same = next((g for g in groups if g[0].equals(fs) and g[1] == weighted), None)
        if same is None:
            groups.append((fs, weighted, list(paths)))
        else:
            same[2].extend(paths)
    if order_seed is not None:
        for _, _, paths in groups:
            random.Random(order_seed).shuffle(paths)
    columns = TRAIN_COLUMNS + (["topk_token_ids", "topk_logprobs"] if with_topk else [])
    any_weighted = any(g[1] for g in groups)
    parts = [with_kd_weight(ray.data.read_parquet(paths, filesystem=fs).select_columns(
        columns + (["kd_weight"] if weighted else [])), any_weighted and not weighted) for fs, weighted, paths in groups]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if cfg.train.filter_correct:
        ds = ds.map_batches(lambda t: t.filter(pc.fill_null(t["answer_correct"], False)), batch_format="pyarrow")
    return ds


def has_kd_weight(fs, paths: list[str]) -> bool:
    """Whether a shard set's files carry per-sample KD weights (curated sets do): its first file's schema."""
    import pyarrow.parquet as pq

    return bool(paths) and "kd_weight" in pq.read_schema(paths[0], filesystem=fs).names


def with_kd_weight(ds, add: bool):
    """A dataset of an unweighted set given a kd_weight column of 1 (KD as usual), when another set in the
    same training has weights (the parts' columns must agree)."""
    if not add:
        return ds

    def ones(table):
        import pyarrow as pa

        return table.append_column("kd_weight", pa.array([1.0] * table.num_rows, pa.float32()))

    return ds.map_batches(ones, batch_format="pyarrow")


# A streamed corpus is shuffled by row inside windows of about this many shard bytes (one Ray Data task
# holds a window), of at least SHUFFLE_WINDOW_ROWS[0] and at most SHUFFLE_WINDOW_ROWS[1] rows.
SHUFFLE_WINDOW_BYTES = 512 * 2**20
SHUFFLE_WINDOW_ROWS = (64, 8192)


def shuffle_window_rows(manifests: dict[str, dict[str, Any]]) -> int:
    """Rows per shuffle window of a streamed corpus, from the shards' mean bytes per row."""
    rows = sum(m["totals"]["rows"] for m in manifests.values())
    per_row = sum(m["totals"]["bytes"] for m in manifests.values()) / max(rows, 1)
    low, high = SHUFFLE_WINDOW_ROWS
    return int(min(high, max(low, SHUFFLE_WINDOW_BYTES // max(per_row, 1))))


def shuffle_window(table, seed: int):
    """One window's rows in a random order, fixed by the epoch's seed and the window's first sample id."""
    import numpy as np

    if table.num_rows < 2:
        return table
    key = f"{seed}:{table.column('sample_id')[0].as_py()}".encode()
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
    return table.take(rng.permutation(table.num_rows))


def streamed_epoch(cfg: Config, files: dict[str, list[str]], with_topk: bool, seed: int, window_rows: int):
    """One epoch of a corpus too large to cache, shuffled by row without a global shuffle.

    The files come in an order drawn from ``seed`` and rows are permuted inside windows of ``window_rows``
    consecutive rows, so the samples of one prompt (neighbours in their shard) are spread out, and each
    epoch (its own seed) differs.
    """
    ds = training_dataset(cfg, files, with_topk, order_seed=seed)
    return ds.map_batches(shuffle_window, batch_size=window_rows, batch_format="pyarrow", fn_kwargs={"seed": seed})


def plan_steps(rows: int, cfg: Config, streamed: bool = False) -> tuple[int, int, int]:
    """(total optimizer steps, epochs to iterate, batches per epoch and worker) for ``rows`` rows.

    A cached corpus is one stream of every epoch that each step takes its rows from in turn (see
    ``worker_datasets``): ``epochs x rows // rows per step`` steps, the same for every layout of one rows per
    step. A streamed corpus is split by Ray Train, ``rows // num_workers`` rows a worker an epoch; an
    epoch's last partial batch runs on into the next epoch instead of being a short batch of its own.
    """
    t = cfg.train
    per_worker = rows // t.num_workers
    if per_worker == 0:
        raise ConfigError(f"{rows} training rows cannot feed {t.num_workers} workers; lower train.num_workers")
    batches = math.ceil(per_worker / t.batch_size)
    if batches < t.grad_accum:  # an epoch would end before the first optimizer step: nothing learned
        raise ConfigError(f"train.grad_accum={t.grad_accum} needs {t.grad_accum} batches per step, but each of the "
                          f"{t.num_workers} workers gets {per_worker} rows = {batches} batch(es) of "
                          f"train.batch_size={t.batch_size} per epoch; lower train.grad_accum or train.batch_size")

    def steps(epochs: int) -> int:
        if streamed:  # equal splits: each worker gets rows // num_workers rows an epoch
            return math.ceil(epochs * per_worker / t.batch_size) // t.grad_accum
        return epochs * rows // rows_per_step(t)

    if t.max_steps:
        epochs = 1
        while steps(epochs) < t.max_steps:
            epochs += 1
        return t.max_steps, epochs, batches
    if steps(t.epochs) == 0:
        raise ConfigError(f"train.epochs={t.epochs} over {rows} rows is less than one step of {rows_per_step(t)} rows "
                          "(train.batch_size x train.grad_accum x train.num_workers); raise train.epochs or lower those")
    return steps(t.epochs), t.epochs, batches


@contextlib.contextmanager
def ordered_data():
    """Inside the block Ray Data yields blocks in input order, not task completion order: reproducible blocks."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = before


def epochs_dataset(epoch_data, epochs: int):
    """Every epoch in one dataset (``epoch_data(epoch)`` gives one), so a worker opens one iterator per run.

    A new ``iter_batches`` per epoch waits at Ray Data's streaming-split barrier for the slowest worker
    and starts a new executor (bench/RESULTS.md has the cost). Ray Data may interleave the copies at
    their seams; this is the path for corpora too large to cache, where epochs are few.
    """
    copies = [epoch_data(epoch) for epoch in range(epochs)]
    return copies[0].union(*copies[1:]) if epochs > 1 else copies[0]


# A cached corpus is cut into blocks of about this many rows; each epoch is its blocks in a seeded order.
BLOCK_ROWS = 16
MAX_BLOCKS = 4096  # a large cached corpus gets larger blocks rather than millions of objects


def worker_datasets(ds, epochs: int, seed: int, epoch_data=None) -> tuple[dict[str, Any], Any]:
    """(Ray Train datasets, their DataConfig): the "train" stream of every epoch, in one order fixed by the seed
    when the corpus is cached.

    A cached (materialised) corpus is first put in one canonical order (sorted by sample_id), so the order
    does not depend on how the teacher stage happened to lay its rows out in files, then cut into blocks of
    about BLOCK_ROWS rows (Ray Data reads a small shard set as a single block, where a block order would
    shuffle nothing); every epoch takes its own seeded block order. Every worker reads that stream whole and
    trains on its own share of each step's rows (loop.step_rows), so which rows a step takes depends only on
    the rows per step, not on the worker count, batch size or grad_accum: a run resumes on another worker
    count. (A cached corpus is at most train.cache_max_gb, so each worker passing over the others' rows is
    cheap: zero-copy reads from the object store.) A corpus too large to cache streams through Ray Train's split instead, which is not reproducible:
    ``epoch_data(epoch)`` gives each epoch's rows (``streamed_epoch``).
    """
    import ray.data
    import ray.train
    from ray.data.dataset import MaterializedDataset

    if not isinstance(ds, MaterializedDataset):
        return {"train": epochs_dataset(epoch_data, epochs)}, ray.train.DataConfig()
    ds = ds.sort("sample_id").repartition(max(1, min(ds.count() // BLOCK_ROWS, MAX_BLOCKS))).materialize()
    refs: list = []
    for epoch in range(epochs):
        refs += ds.randomize_block_order(seed=seed + epoch).to_arrow_refs()
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    # Block references in epoch order: a union of the epochs' datasets would interleave them.
    stream = ray.data.from_arrow_refs(refs)
    # The train loop prints its own progress; a Ray Data bar per worker, relayed through the driver's log,
    # repeated itself ~200 times in a quickstart log and went on after the eval table.
    stream.context.enable_progress_bars = False
    return {"train": stream}, ray.train.DataConfig(datasets_to_split=[], execution_options=options)


def cache_small(ds, manifests: dict[str, dict[str, Any]], max_gb: float):
    """Materialise a corpus that fits in ``max_gb`` into the object store (spread over nodes, not one process).

    Re-reading Parquet every epoch starts fresh read tasks, whose worker start-up dominates a small
    corpus's epoch; a large corpus keeps streaming from storage instead.
    """
    size = sum(m["totals"]["bytes"] for m in manifests.values())
    return ds.materialize() if size <= max_gb * 2**30 else ds


def train(cfg: Config) -> str:
    """Run the student stage; returns the exported student folder."""
    import ray.train
    from ray.data.dataset import MaterializedDataset
    from ray.train.torch import TorchTrainer

    from ..cluster.runtime import init_ray
    from .loop import LoopInputs, train_loop_per_worker

    start = time.time()
    shard_dirs = [absolute(d) for d in cfg.shard_dirs]
    for key, location in [*(("data.shards", d) for d in shard_dirs), ("train.storage_path", cfg.train.storage_path),
                          ("output.student_dir", cfg.output.student_dir)]:
        check_location(location, key)  # before hours of training, not at the export after them
    student_path = resolve_model(cfg.student.model)
    check_weights_format(student_path, cfg.student.allow_pickle_weights, "student.allow_pickle_weights")
    manifests = {d: read_manifest(d) for d in shard_dirs}
    run = check_compatible(manifests)
    files = verified_files(shard_dirs, cfg.train.verify_shards)
    with_topk = cfg.train.alpha > 0
    if with_topk and not run.get("top_k_logprobs"):
        raise ConfigError(f"train.alpha={cfg.train.alpha} needs top-k logprobs, but the shards were generated "
                          "with generate.top_k_logprobs=0; set train.alpha=0 or regenerate")
    if with_topk and run.get("top_k_logprobs") == 1 and not cfg.train.tail_bucket:
        raise ConfigError(ONE_BUCKET_KD.format(alpha=cfg.train.alpha, k="shards of top_k_logprobs=1 "
                                               f"({', '.join(shard_dirs)})"))
    if cfg.student.lora is not None:
        from .model import check_lora_targets

        check_lora_targets(student_path, cfg.student.lora, cfg.student.revision, cfg.student.trust_remote_code)
    if cfg.train.qat:
        check_qat(cfg, student_path)
    try:
        student_tok = load_tokenizer(student_path, cfg.student.revision, cfg.student.trust_remote_code)
    except ConfigError as err:
        raise ConfigError(f"student.model={cfg.student.model}: {err}") from None
    route = route_tokenizers(cfg, run, student_tok, student_path)
    print(f"train: {route.describe()}", flush=True)
    retokenize = not route.token_level
    if not retokenize:  # re-tokenised prompts have other lengths; the run-end check covers that case
        check_prompts_fit(files, cfg.train.max_seq_len)
    storage = absolute(cfg.train.storage_path)
    identity = run_identity(cfg, shard_fingerprint(manifests))
    name = run_name(cfg, identity)
    check_writable(storage, "train.storage_path")
    check_writable(absolute(cfg.output.student_dir), "output.student_dir")
    claim_run(storage, name, identity, extra={"tokenizers": route.record()})
    init_ray(cfg.ray)
    check_cluster_fits(cfg)
    check_export_fits(cfg, export_memory(student_path, cfg, student_dtype(student_path, cfg)))
    with ordered_data():  # the cached blocks and their per-worker splits in one order, run after run
        ds = cache_small(training_dataset(cfg, files, with_topk), manifests, cfg.train.cache_max_gb)
    rows = ((sum(m["totals"]["correct"] for m in manifests.values())  # passing rows counted at commit
             if all("correct" in m["totals"] for m in manifests.values()) else ds.count())  # older sets: read
            if cfg.train.filter_correct else sum(m["totals"]["rows"] for m in manifests.values()))
    if rows == 0:
        raise ConfigError("the training set is empty" + (" after train.filter_correct kept only rows whose answer "
                                                         "check passed" if cfg.train.filter_correct else ""))
    cached = isinstance(ds, MaterializedDataset)
    total_steps, epochs, batches_per_epoch = plan_steps(rows, cfg, streamed=not cached)
    with ordered_data():
        window = shuffle_window_rows(manifests)
        datasets, data_config = worker_datasets(
            ds, epochs, cfg.train.seed,
            epoch_data=lambda epoch: streamed_epoch(cfg, files, with_topk, cfg.train.seed + epoch, window))
    del ds  # a cached corpus now lives in the workers' re-cut blocks; holding this copy too would double it
    # Ray Train gets the same file system as every other stage (endpoint from AWS_ENDPOINT_URL, small
    # checkpoint files as single PUTs) rather than resolving the URL again on its own.
    storage_fs, storage_fs_path = filesystem(storage)
    t = cfg.train
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"inputs": LoopInputs(
            config=cfg.model_dump(mode="json"), student_path=student_path, retokenize=retokenize,
            total_steps=total_steps, batches_per_epoch=batches_per_epoch, shared_stream=cached,
            faults=os.environ.get(FAULTS_ENV), system_prompt=run_system_prompt(run), route=route.record())},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": t.cpus_per_worker,
                                                                     **t.resources_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_fs_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures)),
        datasets=datasets, dataset_config=data_config,
    )
    print(f"train: {rows:,} rows, {total_steps} steps on {t.num_workers} worker(s), run {storage}/{name}")
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training ended without a checkpoint: {result.error}")
    metrics = result.metrics or {}
    if metrics.get("rows_rows") == 0:  # every row was skipped: the "student" would be the untrained base
        skipped = {k: v for k, v in metrics.items() if k.startswith("rows_skipped") and v}
        raise ConfigError(f"no training row was usable ({skipped}); check train.max_seq_len and the shards. "
                          f"Nothing was exported")
    counted = {k.removeprefix("rows_"): metrics[k] for k in ("rows_topk_ids_dropped", "rows_skipped_unmapped_token")
               if k in metrics}  # what the route dropped (rank 0's rows)
    if any(counted.values()):
        print(f"train: tokenizers: {counted}", flush=True)
    out = export_student(cfg, result.checkpoint, student_path, run, manifests, name,
                         tokenizers={**route.record(), "counted": counted})
    print(f"train: {metrics.get('step')} steps, final loss {metrics.get('loss'):.4f} (ce {metrics.get('ce'):.4f}, "
          f"kd {metrics.get('kd'):.4f}) in {time.time() - start:.1f}s -> {out}")
    return out


def shard_fingerprint(manifests: dict[str, dict[str, Any]]) -> str:
    digests = sorted(s["sha256"] for m in manifests.values() for s in m["shards"])
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


# The dtypes an export keeps from the student's base; any other (int8, float8: a quantized base) exports fp32.
EXPORT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def student_dtype(student_path: str, cfg: Config) -> str:
    """The dtype the student's base is saved in (checkpoint.base_dtype), by name: the export's dtype.

    The export is written in this dtype, whatever the training compute dtype: a bf16 base gives a bf16 folder.
    """
    from .checkpoint import base_dtype

    name = str(base_dtype(student_path, cfg.student.revision, cfg.student.trust_remote_code)).removeprefix("torch.")
    return name if name in EXPORT_DTYPES else "float32"


def student_parameters(student_path: str, cfg: Config) -> int:
    """The student's parameter count, from a weightless (meta-device) copy built from its config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.from_pretrained(student_path, revision=cfg.student.revision,
                                      trust_remote_code=cfg.student.trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(conf, trust_remote_code=cfg.student.trust_remote_code)
    return sum(p.numel() for p in skeleton.parameters())


def export_memory(student_path: str, cfg: Config, dtype: str) -> int:
    """Bytes of memory the export task asks Ray for: student.export_memory_gb, or twice the weights + 1 GiB.

    The task holds the student in its dtype, the adapter merged in place, while save_pretrained writes it.
    Bytes per parameter come from torch's own dtype (``itemsize``), not from a table of names.
    """
    import torch

    if cfg.student.export_memory_gb is not None:
        return int(cfg.student.export_memory_gb * 2**30)
    return 2 * student_parameters(student_path, cfg) * getattr(torch, dtype).itemsize + 2**30


def export_on_driver_node(cfg: Config) -> bool:
    """A local output.student_dir or train.storage_path names the driver's disk: the export must run there."""
    return not (is_url(cfg.output.student_dir) and is_url(cfg.train.storage_path))


def export_options(cfg: Config, memory: int) -> dict[str, Any]:
    """Ray options of the export task: 1 CPU and its memory; pinned to the driver's node when paths are local."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options: dict[str, Any] = {"num_cpus": 1, "memory": memory, "max_retries": 1}
    if export_on_driver_node(cfg):
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                        soft=False)
    return options


def check_export_fits(cfg: Config, memory: int) -> None:
    """An export task no node can hold would wait forever after training: say so before training starts."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if export_on_driver_node(cfg):
        here = ray.get_runtime_context().get_node_id()
        nodes = [n for n in nodes if n["NodeID"] == here]
        where = "the driver's node (output.student_dir or train.storage_path is a local path)"
    else:
        where = "any node"
    most = max((n["Resources"].get("memory", 0) for n in nodes), default=0)
    if memory <= most:
        return
    what = (f"the export needs {memory / 2**30:.1f} GiB of Ray memory on one node (student.export_memory_gb, "
            f"default twice the student's weights + 1 GiB), but {where} offers {most / 2**30:.1f} GiB")
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        print(f"train: warning: {what}; the export will wait for the cluster to scale up", flush=True)
        return
    raise ConfigError(f"{what}; set student.export_memory_gb or give Ray more memory")



def export_student(cfg: Config, checkpoint, student_path: str, run: dict[str, Any],
                   manifests: dict[str, dict[str, Any]], name: str, tokenizers: dict[str, Any] | None = None) -> str:
    """Checkpoint -> a Hugging Face folder at output.student_dir, written by a Ray task (see write_export).

    The driver only describes the run; loading, merging and saving the student happen in a task with the
    memory for it, so a large student never passes through the job's driver.
    """
    import ray

    dtype = student_dtype(student_path, cfg)
    info = {"teacher": run["teacher"], "shards": cfg.shard_dirs, "shard_fingerprint": shard_fingerprint(manifests),
            "rows": sum(m["totals"]["rows"] for m in manifests.values()), "student_base": cfg.student.model,
            "student_base_resolved": student_path, "system_prompt": run_system_prompt(run),
            "train": cfg.train.model_dump(mode="json"), "lora": cfg.student.lora.model_dump() if cfg.student.lora
            else None, "run": name, "tokenizers": tokenizers}
    out = cfg.output.student_dir if is_url(cfg.output.student_dir) else absolute(cfg.output.student_dir)
    task = ray.remote(write_export).options(**export_options(cfg, export_memory(student_path, cfg, dtype)))
    info = ray.get(task.remote(cfg.model_dump(mode="json"), checkpoint, student_path, info, dtype, out))
    for r in info["resumed"]:
        print(f"train: run {name} resumed from step {r['step']} (epoch {r['epoch']}, "
              f"batch {r['batches_in_epoch']})", flush=True)
    return out


def write_export(config: dict[str, Any], checkpoint, student_path: str, info: dict[str, Any], dtype: str,
                 out: str) -> dict[str, Any]:
    """The export task: load the checkpoint in the student's dtype, write the folder (local or uploaded).

    ``student.merge_lora: false`` writes an adapter folder (adapter_config.json naming the base) that
    transformers with peft and vLLM's LoRA support load; otherwise merged weights. Returns the run's info.
    """
    import socket

    from ..config import build_config
    from ..plots import plot_curves, write_tensorboard
    from .checkpoint import checkpoint_model
    from .model import save_hf_folder

    cfg = build_config(config)
    tokenizer = load_tokenizer(student_path, cfg.student.revision, cfg.student.trust_remote_code)
    with checkpoint.as_directory() as d, tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(d)
        model = checkpoint_model(ckpt, student_path, cfg.student)  # any strategy's checkpoint, in the base's dtype
        adapter = hasattr(model, "peft_config") and not cfg.student.merge_lora
        if adapter:  # loaders find the base here: the resolved folder or hub id, at the configured revision
            model.peft_config["default"].base_model_name_or_path = student_path
            model.peft_config["default"].revision = cfg.student.revision
        metrics = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines() if line]
        state = json.loads((ckpt / "trainer_state.json").read_text())
        info = {**info, "steps": state["step"], "resumed": state.get("resumed", []),
                "final": {k: metrics[-1][k] for k in ("loss", "ce", "kd")} if metrics else {},
                "export": {"format": "adapter" if adapter else "merged", "dtype": dtype,
                           "host": socket.gethostname(), "pid": os.getpid()}}
        local = Path(tmp) / "student" if is_url(out) else Path(out)
        if local.exists():
            shutil.rmtree(local)
        save_hf_folder(model, tokenizer, local, merge_lora=cfg.student.merge_lora, card=model_card(info),
                       extra_files={"distill_llm.json": info})
        write_tensorboard(metrics, local / "logs")
        plot_curves(metrics, local / "training_curves.png")
        if is_url(out):
            import pyarrow.fs as pafs

            fs, dest = filesystem(out)
            fs.delete_dir_contents(dest, missing_dir_ok=True)  # no stale files of an earlier export stay beside
            pafs.copy_files(str(local), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return info


def run_system_prompt(run: dict[str, Any]) -> str | None:
    """The system prompt the teacher stage put before every prompt (``prompts.system_prompt`` of run.json)."""
    return (run.get("prompts") or {}).get("system_prompt")


def export_format(info: dict[str, Any]) -> str:
    """The model card's sentence on what the folder holds and how to load it."""
    export = info.get("export") or {}
    if export.get("format") == "adapter":
        return (f"a LoRA adapter (not merged), {export['dtype']} base `{info['student_base_resolved']}` named in "
                "`adapter_config.json`: `AutoModelForCausalLM.from_pretrained(folder)` with peft installed, "
                "`PeftModel.from_pretrained(base, folder)`, or vLLM with `enable_lora` and a `LoRARequest`")
    return f"merged weights in {export.get('dtype', 'float32')}, loadable as is by transformers and vLLM"


def model_card(info: dict[str, Any], evaluation: str | None = None) -> str:
    t = info["train"]
    lines = [
        "---", "library_name: transformers", "tags: [distill-llm, distillation]", "---", "",
        "# Student distilled with distill-llm", "",
        f"- teacher: `{info['teacher'].get('model')}` (revision {info['teacher'].get('revision')})",
        f"- student base: `{info['student_base']}`, " + (f"LoRA r={info['lora']['r']}" if info["lora"]
                                                         else "full fine-tuning"),
        f"- this folder: {export_format(info)}",
        f"- data: {info['rows']:,} teacher samples from {', '.join(info['shards'])} "
        f"(shard fingerprint `{info['shard_fingerprint']}`)",
        f"- loss: (1 - {t['alpha']}) * CE + {t['alpha']} * T^2 * {t['divergence']} at T={t['temperature']}"
        + (" with a tail bucket" if t["tail_bucket"] else ""),
        f"- steps: {info['steps']}, batch {t['batch_size']} x {t['num_workers']} workers x accum {t['grad_accum']}, "
        f"lr {t['lr']} ({t['lr_schedule']}), max_seq_len {t['max_seq_len']}",
        "- final loss: " + (", ".join(f"{k} {v:.4f}" for k, v in info["final"].items()) or "n/a"),
        *([f"- quantisation-aware: linear layers fake-quantised as `{t['qat']}` during training (train.qat); "
           "these are the unrounded weights, for `distill-llm quantize` with that scheme"] if t.get("qat") else []),
        *([f"- {TokenizerRoute.from_record(info['tokenizers']).describe()}"
           + (f" (counted: {info['tokenizers']['counted']})" if info["tokenizers"].get("counted") else "")]
          if info.get("tokenizers") else []), "",
        "Training curves: `training_curves.png`; TensorBoard events: `logs/`; settings: `distill_llm.json`.", "",
    ]
    if evaluation:
        lines += ["## Evaluation", "", evaluation, ""]
    return "\n".join(lines)
