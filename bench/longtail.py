"""Long-tail generation: the engine kept full across batches against one batch at a time and raw vLLM.

    PYTHONPATH=$PWD python bench/longtail.py --results bench/RESULTS.md      # toy teacher, CPU, a few minutes

Workload: every request's length is drawn from a lognormal (median ``--median``, the longest ``--max-new-tokens``)
and runs to it (``ignore_eos``), the spread of R1 traces in miniature; top-k logprobs k on every token; the
same per-request seeds in every case. One ``TeacherEngine`` (one vLLM engine, ``teacher.max_num_seqs``) serves
every case, so engine settings are identical. Cases, interleaved per repetition and reported as medians:
  raw one call      ``engine.llm.generate`` with every prompt at once: the ceiling (the engine never drains early)
  raw per batch     ``engine.llm.generate`` on one batch of ``teacher.batch_size`` after another
  ours per batch    ``TeacherEngine`` on one batch after another, each one ``LLM.generate`` call (its path at
                    teacher.max_concurrent_batches=1: no feeder)
  ours continuous   ``TeacherEngine`` called from C threads at once, as Ray Data calls an actor with
                    teacher.max_concurrent_batches=C (C = ``--concurrent``, each value a row)
This process calls the engine class directly (no Ray Data, no shard writing): what is compared is how the
engine is fed, not the rest of the stage. "paired" is the median over repetitions of raw one call's time
divided by the case's time in the same repetition: on a machine whose load drifts it is steadier than the
ratio of medians. ``--no-per-batch`` leaves out the two one-batch-at-a-time cases (to spend the time on more
repetitions of the others).
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

from common import QUICKSTART, append_results, header, load_average, machine, median, table


def lengths(n: int, median_len: int, longest: int, seed: int = 0) -> list[int]:
    """Lognormal lengths with the given median, scaled so that the longest of ``n`` is ``longest``."""
    import numpy as np

    z = np.random.default_rng(seed).standard_normal(n)
    sigma = np.log(longest / median_len) / max(z.max(), 1e-6)
    return [int(x) for x in np.clip(np.round(median_len * np.exp(sigma * z)), 4, longest)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=384)
    p.add_argument("--median", type=int, default=27)
    p.add_argument("--max-new-tokens", type=int, default=224)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--concurrent", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-per-batch", action="store_true", help="leave out raw per batch and ours per batch")
    p.add_argument("--results", default=None, help="append the Markdown section to this file")
    args = p.parse_args()
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    info = machine()

    import pyarrow as pa

    from distill_llm.config import load_config
    from distill_llm.paths import resolve_model
    from distill_llm.teacher.engine import TeacherEngine
    from distill_llm.teacher.stage import engine_spec, sampling_spec

    cfg = load_config(QUICKSTART, [f"generate.top_k_logprobs={args.k}", f"generate.max_new_tokens={args.max_new_tokens}",
                                   f"teacher.max_num_seqs={args.max_num_seqs}", f"teacher.batch_size={args.batch_size}",
                                   "teacher.use_gpu=false", "generate.samples_per_prompt=1"])
    budget = dict(zip((f"s{i}" for i in range(args.prompts)), lengths(args.prompts, args.median, args.max_new_tokens)))

    class LongTail(TeacherEngine):
        """TeacherEngine whose requests run to a drawn length (the bench's workload, nothing else changes)."""

        def _params(self, sample_id, n_prompt):
            params = super()._params(sample_id, n_prompt)
            params.max_tokens, params.ignore_eos = budget[sample_id], True
            return params

    t0 = time.perf_counter()
    engine = LongTail(engine_spec(cfg, resolve_model(cfg.teacher.model), False, cfg.generate.seed), sampling_spec(cfg),
                      concurrent_batches=max(args.concurrent))
    startup = time.perf_counter() - t0
    rows = [{"sample_id": f"s{i}", "prompt_id": f"p{i}", "sample_index": 0, "answer": None,
             "messages": [{"role": "user", "content": f"What is {100 + i % 900}+{(37 * i) % 999}?"}],
             "skip_reason": None, "skip_detail": None} for i in range(args.prompts)]
    tables = [pa.Table.from_pylist(rows[i:i + args.batch_size]) for i in range(0, len(rows), args.batch_size)]
    prompts = [{"prompt_token_ids": engine._prompt_ids(r["messages"])} for r in rows]
    params = [engine._params(r["sample_id"], len(x["prompt_token_ids"])) for r, x in zip(rows, prompts)]
    engine.llm.generate(prompts[:8], params[:8], use_tqdm=False)  # warm-up (first-call paths)

    def raw_one():
        return sum(len(o.outputs[0].token_ids) for o in engine.llm.generate(prompts, params, use_tqdm=False))

    def raw_batches():
        b = args.batch_size
        return sum(len(o.outputs[0].token_ids) for i in range(0, len(prompts), b)
                   for o in engine.llm.generate(prompts[i:i + b], params[i:i + b], use_tqdm=False))

    feeder = engine.feeder

    def ours(threads):
        def go():
            engine.feeder = feeder if threads > 1 else None  # one at a time: the plain LLM.generate path
            with ThreadPoolExecutor(threads) as pool:
                out = list(pool.map(engine, tables))
            return sum(len(x) for t in out for x in t.column("completion_token_ids").to_pylist())
        return go

    per_batch = {} if args.no_per_batch else {"raw per batch": raw_batches, "ours per batch": ours(1)}
    cases = {"raw one call": raw_one, **per_batch, **{f"ours continuous, {c} batches": ours(c) for c in args.concurrent}}
    times: dict[str, list[float]] = {c: [] for c in cases}
    tokens: dict[str, int] = {}
    for rep in range(args.reps):
        for name, fn in cases.items():
            t = time.perf_counter()
            tokens[name] = fn()
            times[name].append(time.perf_counter() - t)
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{c} {v[-1]:.1f}s" for c, v in times.items())
              + f" (load {load_average()})", flush=True)
    load_end = load_average()
    ceiling = tokens["raw one call"] / median(times["raw one call"])
    out = [{"case": c, "median s": median(v), "runs": len(v), "tokens": tokens[c],
            "tok/s": tokens[c] / median(v), "vs raw one call": tokens[c] / median(v) / ceiling,
            "paired": median([r / t for r, t in zip(times["raw one call"], v)]),
            "paired range": f"{min(r / t for r, t in zip(times['raw one call'], v)):.2f}-"
                            f"{max(r / t for r, t in zip(times['raw one call'], v)):.2f}"}
           for c, v in times.items()]
    sched = engine.llm.llm_engine.vllm_config.scheduler_config
    text = "\n".join([
        header("Long-tail generation: the engine fed across batches (toy teacher, cpu)", info),
        f"{args.prompts} requests, lengths lognormal (median {args.median}, longest {max(budget.values())}, mean "
        f"{sum(budget.values()) / len(budget):.1f} tokens; ignore_eos), k={args.k}, teacher.batch_size "
        f"{args.batch_size}, engine max_num_seqs {sched.max_num_seqs}, max_num_batched_tokens "
        f"{sched.max_num_batched_tokens}; one engine for every case (start-up {startup:.1f} s, in no figure); "
        f"medians of {args.reps} interleaved repetitions; load average at end {load_end}.\n",
        table(out, ["case", "median s", "runs", "tokens", "tok/s", "vs raw one call", "paired", "paired range"]),
    ])
    append_results(args.results, text + "\n")


if __name__ == "__main__":
    main()
