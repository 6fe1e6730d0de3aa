"""Rounds against extra offline KD, simulated without engines: which settings are worth a `distill-llm rounds` run?

    PYTHONPATH=$PWD python bench/rounds_sim.py --work /tmp/rnd/s1 --lr 1e-4 --setting divergence=reverse_kl

``--work`` holds a start student (offline/student) and its offline shard set (offline/shards), the layout of
bench/rounds.py's --work folder. Each round does in one process what `distill-llm rounds` does with Ray and
vLLM: the current student samples ``--samples`` completions of ``--prompts`` prompts of the offline set (drawn
without replacement across rounds) with transformers at ``--sample-temperature``; the toy teacher scores every
position by one forward pass (its top 20, stored as fp16 like the teacher stage; the audit in bench/RESULTS.md
found the stage's scores equal to such a pass); the student trains one pass over those rows plus
``--offline-mix`` of offline rows with the project's batching and loss (bench/rounds_replay.replay). The
control trains as many steps per round on the offline shards with the quickstart's loss at the same lr. Every
checkpoint is scored by greedy decoding (transformers) on the held-out toy eval problems. ``--setting`` takes
KDSettings keywords for the rounds' loss (default reverse KL, alpha 1, T 1), comma-separated key=value.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

from common import append_results, header, machine, table
from rounds_replay import BATCH, parse_setting, read_table, replay

TEACHER = Path(__file__).resolve().parents[1] / "distill_llm" / "assets" / "toy-teacher"
COLUMNS = ["prompt_token_ids", "completion_token_ids", "topk_token_ids", "topk_logprobs"]


def sample(model, prompts: list[list[int]], n: int, temperature: float, seed: int, pad_id: int, eos_id: int):
    """``n`` completions per prompt (ids up to and with the first EOS), sampled at ``temperature``."""
    import torch

    torch.manual_seed(seed)
    out = []
    for start in range(0, len(prompts), 128):
        chunk = prompts[start:start + 128]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                 top_k=0, top_p=1.0, max_new_tokens=96, num_return_sequences=n,
                                 pad_token_id=pad_id, eos_token_id=eos_id)
        for row in gen[:, width:].tolist():
            out.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
    return out


def score(teacher, prompts: list[list[int]], completions: list[list[int]], k: int = 20):
    """The teacher's top-k log-probs at every completion position (positions P-1 .. P+C-2), fp16."""
    import numpy as np
    import torch

    ids_out, lps_out = [], []
    for start in range(0, len(prompts), 128):
        seqs = [p + c for p, c in zip(prompts[start:start + 128], completions[start:start + 128])]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        with torch.no_grad():
            logp = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        top = logp.topk(k, dim=-1)
        for i, (p, c) in enumerate(zip(prompts[start:start + 128], completions[start:start + 128])):
            span = slice(len(p) - 1, len(p) + len(c) - 1)
            ids_out.append(top.indices[i, span].numpy().astype(np.int32))
            lps_out.append(top.values[i, span].numpy().astype(np.float16))
    return ids_out, lps_out


def scored_table(prompts, completions, ids, lps, schema):
    """The rows as an Arrow table of the offline shards' four training columns."""
    import pyarrow as pa

    return pa.table({"prompt_token_ids": prompts, "completion_token_ids": completions,
                     "topk_token_ids": [[list(r) for r in a] for a in ids],
                     "topk_logprobs": [[list(r) for r in a] for a in lps]}).cast(schema)


def save(model, tokenizer, folder: Path) -> str:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--sample-temperature", type=float, default=1.0)
    parser.add_argument("--offline-mix", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--steps", default="pass", help="steps per round: a number or 'pass' (one pass)")
    parser.add_argument("--setting", default="divergence=reverse_kl,alpha=1,temperature=1")
    parser.add_argument("--no-control", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="prompt draw and sampling seed")
    parser.add_argument("--eval-prompts", type=int, default=200)
    parser.add_argument("--results", default=None)
    args = parser.parse_args()

    import numpy as np
    import pyarrow as pa
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill_llm import toy

    torch.set_num_threads(1)
    info, start = machine(), f"{args.work}/offline/student"
    tokenizer = AutoTokenizer.from_pretrained(start)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    problems = toy.make_problems("eval", args.eval_prompts)
    offline = read_table(f"{args.work}/offline/shards")
    schema = offline.select(COLUMNS).schema
    pool = offline.select(["prompt_token_ids", "answer"]).to_pylist()
    teacher = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    _, _, _, _, kd = parse_setting(args.setting, {"on": offline})
    order = np.random.default_rng(args.seed).permutation(len(pool))
    tmp = Path(tempfile.mkdtemp(prefix="rounds-sim-"))
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32).eval()
    rows = [{"checkpoint": "start", "pass@1": f"{toy.greedy_accuracy(model, tokenizer, problems):.1%}"}]
    print(rows[-1], flush=True)
    current, control = start, start
    for r in range(1, args.rounds + 1):
        began = time.time()
        picked = [pool[i] for i in order[(r - 1) * args.prompts: r * args.prompts]]
        prompt_ids = [p["prompt_token_ids"] for p in picked]
        model = AutoModelForCausalLM.from_pretrained(current, dtype=torch.float32).eval()
        comps = sample(model, prompt_ids, args.samples, args.sample_temperature, args.seed + r, pad, eos)
        prompts_rep = [p for p in prompt_ids for _ in range(args.samples)]
        answers = [p["answer"] for p in picked for _ in range(args.samples)]
        correct = sum(toy.check_answer(tokenizer.decode(c, skip_special_tokens=True), a)
                      for c, a in zip(comps, answers)) / len(comps)
        ids, lps = score(teacher, prompts_rep, comps)
        scored = scored_table(prompts_rep, comps, ids, lps, schema)
        extra = math.ceil(scored.num_rows * args.offline_mix / (1 - args.offline_mix)) if args.offline_mix else 0
        mix = np.random.default_rng([args.seed, r]).choice(offline.num_rows, size=extra, replace=False)
        data = pa.concat_tables([scored, offline.select(COLUMNS).take(sorted(mix.tolist()))]) if extra else scored
        steps = data.num_rows // BATCH if args.steps == "pass" else int(args.steps)
        model = replay(current, data, steps, args.lr, r, pad, **kd)
        current = save(model, tokenizer, tmp / f"round-{r}")
        rows.append({"checkpoint": f"after round {r}", "pass@1": f"{toy.greedy_accuracy(model, tokenizer, problems):.1%}",
                     "samples correct": f"{correct:.1%}", "rows (on-policy + offline)": f"{scored.num_rows} + {extra}",
                     "steps": steps, "seconds": round(time.time() - began, 1)})
        print(rows[-1], flush=True)
        if not args.no_control:
            began = time.time()
            model = replay(control, offline, steps, args.lr, r, pad, alpha=0.5, divergence="forward_kl", temperature=2.0)
            control = save(model, tokenizer, tmp / f"control-{r}")
            rows.append({"checkpoint": f"control: +{r * steps} offline-KD steps",
                         "pass@1": f"{toy.greedy_accuracy(model, tokenizer, problems):.1%}", "steps": steps,
                         "seconds": round(time.time() - began, 1)})
            print(rows[-1], flush=True)
    text = (f"\nsimulated rounds from {start} (bench/rounds_sim.py): {args.prompts} prompts x {args.samples} samples at "
            f"T {args.sample_temperature}, offline_mix {args.offline_mix}, loss {args.setting}, lr {args.lr}, cosine, no "
            f"warmup, steps {args.steps}; control: quickstart loss, same steps and lr; greedy pass@1 (transformers) "
            f"on {args.eval_prompts} held-out toy eval problems\n\n"
            f"{table(rows, ['checkpoint', 'pass@1', 'samples correct', 'rows (on-policy + offline)', 'steps', 'seconds'])}\n")
    append_results(args.results, header("Rounds simulated without engines (bench/rounds_sim.py)", info) + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
