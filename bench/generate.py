"""Generation-stage throughput against raw ``vllm.LLM.generate`` on the same model, prompts and sampling.

    PYTHONPATH=$PWD python bench/generate.py                          # toy teacher, CPU, a few minutes
    PYTHONPATH=$PWD python bench/generate.py --shape tiny-qwen        # Qwen vocabulary (151,936), 2 layers
    PYTHONPATH=$PWD python bench/generate.py --device cuda --shape qwen2.5-1.5b --prompts 1024 \
        --max-new-tokens 512 --batch-size 1024                        # a GPU host

Cases, interleaved per repetition (ours, raw, ours, raw...) and reported as medians:
  ours e2e      ``distill_llm.teacher.stage.generate(cfg)``: Ray Data, an engine actor (its start-up included),
                shards written and committed, manifest. Nothing subtracted.
  ours engine   the same ``TeacherEngine`` class called in this process on the same batches: engine time,
                top-k extraction and Arrow rows, without Ray Data, start-up or shard writing.
  raw k         ``engine.llm.generate`` (the very ``vllm.LLM`` that TeacherEngine built, so identical engine
                settings) on all prompts at once, the same per-request seeds, ``logprobs=k, flat_logprobs=True``.
  raw no-lp     the same without logprobs: the cost of top-k capture is raw k against this.
  extract       ``teacher.topk_arrays`` on raw k's outputs: vLLM's flat lists -> [n, k] numpy arrays.
  ours rescore  ``TeacherEngine`` with ``generate.logprobs: rescore`` on the same batches: sampled without
                logprobs, then prompt + completion scored by one prefill each (``prompt_logprobs=k``).
  raw rescore   raw no-lp followed by ``llm.generate`` of prompt + completion with ``prompt_logprobs=k``,
                ``max_tokens=1``: plain vLLM's generate-then-score.
On a GPU both engines (this process's and the actor's) hold 0.4 of the GPU memory each; the host needs
Ray and vLLM installed. Random-weight shapes use vLLM's ``load_format=dummy`` (no weights on disk) and never emit EOS, so
every completion runs to ``--max-new-tokens``; the toy teacher stops after ~26 tokens like a trained model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common import QUICKSTART, append_results, header, load_average, machine, median, model_folder, table


def bench_config(args, out_dir: Path):
    from distill_llm.config import load_config

    over = [f"data.num_prompts={args.prompts}", f"generate.top_k_logprobs={args.k}",
            f"generate.max_new_tokens={args.max_new_tokens}", f"output.dir={out_dir}", "output.overwrite=true",
            "generate.samples_per_prompt=1"]
    if args.batch_size:
        over.append(f"teacher.batch_size={args.batch_size}")
    if args.shape != "toy":
        over += [f"teacher.model={model_folder(args.shape, Path(args.workdir))}", "teacher.engine_kwargs.load_format=dummy",
                 "data.checker=none"]
    if args.device == "cuda":
        # Two engines share the GPU while ours e2e runs (this process's and the Ray actor's): 0.4 each.
        over += ["teacher.use_gpu=true", "teacher.dtype=bfloat16", f"teacher.max_model_len={args.max_model_len or 2048}",
                 "teacher.gpu_memory_utilization=0.4", "teacher.max_num_seqs=256"]
    else:
        over += ["teacher.use_gpu=false"]
        if args.max_model_len:
            over.append(f"teacher.max_model_len={args.max_model_len}")
    return load_config(QUICKSTART, over)


def raw_params(rows, prompt_lens, cfg, max_len: int, k: int | None):
    """The SamplingParams TeacherEngine builds, written out here so 'raw' is plain vLLM usage."""
    from vllm import SamplingParams

    from distill_llm.teacher.engine import request_seed

    g = cfg.generate
    return [SamplingParams(max_tokens=min(g.max_new_tokens, max_len - n), temperature=g.temperature, top_p=g.top_p,
                           seed=request_seed(g.seed, r["sample_id"]), logprobs=k, flat_logprobs=True,
                           detokenize=False) for r, n in zip(rows, prompt_lens)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="toy", choices=["toy", "tiny-qwen", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=None, help="teacher.batch_size (default: the config's)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip-e2e", action="store_true", help="leave out the Ray Data end-to-end runs (smoke tests)")
    p.add_argument("--workdir", default=None, help="where shards and model folders go (default: a temp dir)")
    p.add_argument("--results", default=None, help="append the Markdown section to this file")
    args = p.parse_args()
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    given = args.workdir
    work = Path(given or tempfile.mkdtemp(prefix="bench-gen-"))
    args.workdir = str(work)
    info = machine()

    import pyarrow as pa

    from distill_llm.corpus.prompts import expand_samples, read_prompts
    from distill_llm.teacher.stage import engine_spec, generate, sampling_spec, use_gpu_for
    from distill_llm.paths import resolve_model
    from distill_llm.cluster.runtime import init_ray
    from distill_llm.teacher.engine import TeacherEngine, topk_arrays
    from distill_llm.tokenizers import prompt_ids
    from vllm import SamplingParams

    cfg = bench_config(args, work / "shards")
    init_ray(cfg.ray)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    use_gpu = use_gpu_for(cfg.teacher.use_gpu)
    rows = expand_samples(read_prompts(cfg.data), 1, set()).take_all()
    rows = [r for r in rows if not r["skip_reason"]]

    t0 = time.perf_counter()
    engine = TeacherEngine(engine_spec(cfg, resolve_model(cfg.teacher.model), use_gpu, cfg.generate.seed),
                           sampling_spec(cfg))
    startup = time.perf_counter() - t0
    prompts = [{"prompt_token_ids": prompt_ids(engine.tokenizer, r["messages"])} for r in rows]
    lens = [len(x["prompt_token_ids"]) for x in prompts]
    params_k = raw_params(rows, lens, cfg, engine.max_len, args.k)
    params_0 = raw_params(rows, lens, cfg, engine.max_len, None)
    batch = cfg.teacher.batch_size
    tables = [pa.Table.from_pylist(rows[i:i + batch]) for i in range(0, len(rows), batch)]
    engine.llm.generate(prompts[:8], params_k[:8], use_tqdm=False)  # warm-up (first-call paths)

    # The engine sees one batch at a time: a teacher.batch_size below the engine's max_num_seqs leaves it idle
    # slots, so the same class is also timed with every prompt in one batch.
    whole = f"ours engine, batch {len(rows)}"
    cases = ["ours e2e", "ours engine", *([whole] if batch < len(rows) else []), "ours rescore", "raw k",
             "raw no-lp", "raw rescore"]
    inline_spec, rescore_spec = engine.sampling, replace(engine.sampling, logprobs="rescore")
    score_params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=args.k, flat_logprobs=True,
                                  detokenize=False)
    times: dict[str, list[float]] = {c: [] for c in [*cases, "extract"]}
    tokens: dict[str, int] = {}
    same = None
    for rep in range(args.reps):
        if not args.skip_e2e:
            shutil.rmtree(work / "shards", ignore_errors=True)
            t = time.perf_counter()
            manifest = generate(cfg)
            times["ours e2e"].append(time.perf_counter() - t)
            tokens["ours e2e"] = manifest["totals"]["completion_tokens"]
        t = time.perf_counter()
        outs = engine.llm.generate(prompts, params_k, use_tqdm=False)
        times["raw k"].append(time.perf_counter() - t)
        tokens["raw k"] = sum(len(o.outputs[0].token_ids) for o in outs)
        t = time.perf_counter()
        for o in outs:
            topk_arrays(o.outputs[0].logprobs, args.k, len(o.outputs[0].token_ids))
        times["extract"].append(time.perf_counter() - t)
        tokens["extract"] = tokens["raw k"]
        t = time.perf_counter()
        ours = pa.concat_tables([engine(tb) for tb in tables])
        times["ours engine"].append(time.perf_counter() - t)
        tokens["ours engine"] = sum(len(x) for x in ours.column("completion_token_ids").to_pylist())
        if whole in times:
            t = time.perf_counter()
            one = engine(pa.Table.from_pylist(rows))
            times[whole].append(time.perf_counter() - t)
            tokens[whole] = sum(len(x) for x in one.column("completion_token_ids").to_pylist())
        if same is None:
            raw_ids = {r["sample_id"]: list(o.outputs[0].token_ids) for r, o in zip(rows, outs)}
            got = dict(zip(ours.column("sample_id").to_pylist(), ours.column("completion_token_ids").to_pylist()))
            same = sum(raw_ids[s] == got.get(s) for s in raw_ids) / len(raw_ids)
        t = time.perf_counter()
        outs0 = engine.llm.generate(prompts, params_0, use_tqdm=False)
        times["raw no-lp"].append(time.perf_counter() - t)
        tokens["raw no-lp"] = sum(len(o.outputs[0].token_ids) for o in outs0)
        full = [{"prompt_token_ids": x["prompt_token_ids"] + list(o.outputs[0].token_ids)} for x, o in zip(prompts, outs0)]
        t = time.perf_counter()
        engine.llm.generate(full, [score_params] * len(full), use_tqdm=False)
        times["raw rescore"].append(times["raw no-lp"][-1] + time.perf_counter() - t)
        tokens["raw rescore"] = tokens["raw no-lp"]
        engine.sampling = rescore_spec
        t = time.perf_counter()
        resc = pa.concat_tables([engine(tb) for tb in tables])
        times["ours rescore"].append(time.perf_counter() - t)
        engine.sampling = inline_spec
        tokens["ours rescore"] = sum(len(x) for x in resc.column("completion_token_ids").to_pylist())
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{c} {v[-1]:.1f}s" for c, v in times.items() if v)
              + f" (load {load_average()})", flush=True)
    load_end = load_average()

    med = {c: median(v) for c, v in times.items()}
    rate = {c: tokens[c] / med[c] for c in med if med[c]}
    raw_k = rate["raw k"]
    out = []
    for c in cases:
        if med[c] is None:
            continue
        out.append({"case": c, "median s": med[c], "runs": len(times[c]), "tokens": tokens[c],
                    "tok/s": rate[c], "vs raw k": rate[c] / raw_k})
    extract_us = med["extract"] / max(tokens["extract"], 1) * 1e6
    capture = 1 - rate["raw k"] / rate["raw no-lp"]
    lines = [header(f"Generation: {args.shape}, {args.device}, k={args.k}", info),
             f"{len(rows)} prompts x 1 sample, max_new_tokens {args.max_new_tokens}, temperature "
             f"{cfg.generate.temperature}, teacher.batch_size {batch}, engine "
             f"max_num_seqs {engine.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs}, "
             f"max_num_batched_tokens {engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens}, "
             f"enforce_eager {engine.llm.llm_engine.model_config.enforce_eager}; medians of {args.reps} interleaved "
             f"repetitions; load average at end {load_end}.\n",
             table(out, ["case", "median s", "runs", "tokens", "tok/s", "vs raw k"]), "",
             f"- engine start-up (in this process, not in any tok/s above except ours e2e): {startup:.1f} s",
             f"- top-k capture cost, raw k against raw no-lp: {capture:+.1%} of throughput (target <= 10%)",
             f"- extraction into arrays: {med['extract']:.3f} s per run, {extract_us:.1f} us per token "
             f"({med['extract'] / med['raw k']:.1%} of raw k's time)",
             f"- completions identical between ours engine and raw k (same seeds): {same:.0%}",
             f"- generate.logprobs: rescore against inline, ours engine: {rate['ours rescore'] / rate['ours engine']:.2f}x; "
             f"raw vLLM (no-lp + prefill against k): {rate['raw rescore'] / raw_k:.2f}x",
             ]
    if med["ours e2e"]:
        raw_cold = tokens["raw k"] / (startup + med["raw k"])
        lines.append(f"- raw k with its engine start-up added (a plain-vLLM script from launch): {raw_cold:,.0f} tok/s; "
                     f"ours e2e against it: {rate['ours e2e'] / raw_cold:.2f}x")
        if med["ours e2e"] > startup:
            steady = tokens["ours e2e"] / (med["ours e2e"] - startup)
            lines.append(f"- ours e2e with this process's engine start-up subtracted (an estimate of steady state): "
                         f"{steady:,.0f} tok/s ({steady / raw_k:.2f}x raw k)")
    append_results(args.results, "\n".join(lines) + "\n")
    if given is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
