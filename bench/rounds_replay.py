"""Replay one round's training in plain torch (no Ray, no vLLM): which loss settings help on the student's samples?

    PYTHONPATH=$PWD python bench/rounds_replay.py --work /tmp/rounds-bench/w300 --results bench/RESULTS.md

``--work`` is a finished bench/rounds.py folder: its start student (offline/student), its offline shards
(offline/shards) and round 1's teacher-scored samples (rounds/round-1/scored). Each setting trains the start
student on those rows with the project's own batching and loss (build_batch, StudentWithLoss; AdamW, cosine,
no warmup, clip 1, 32 rows a step, one process) and is scored by greedy decoding with transformers on the
held-out toy eval problems (toy.greedy_accuracy). It isolates the training signal from the engines and the
rounds' orchestration: a setting that loses here loses in `distill-llm rounds` too.

``--setting`` (repeatable) replaces the audit's fixed list with settings of your own, each a comma-separated
list of key=value: ``data`` (on: the round's scored rows; mixed: those plus as many offline rows; offline: the
offline shards), ``steps`` (a number, or ``pass``: one pass over the rows), ``lr``, and any KDSettings field
(``divergence``, ``alpha``, ``temperature``, ``tail_bucket``, ``jsd_beta``); ``--seeds`` trains each setting
once per seed and reports every seed's pass@1 and their mean:

    PYTHONPATH=$PWD python bench/rounds_replay.py --work /tmp/rnd/s1 --seeds 1,2 \
        --setting data=mixed,steps=pass,lr=1e-4,divergence=reverse_kl,alpha=1,temperature=1 \
        --setting data=offline,steps=32,lr=1e-4,divergence=forward_kl,alpha=0.5,temperature=2
"""

from __future__ import annotations

import argparse
import glob
import random
import sys
import time

from common import append_results, header, machine, table

BATCH = 32


def read_table(folder: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(f) for f in sorted(glob.glob(f"{folder}/*.parquet"))])


def replay(start: str, rows, steps: int, lr: float, seed: int, pad_id: int, **kd) -> object:
    """``steps`` steps of 32 rows (reshuffled each pass) from the ``start`` checkpoint; returns the model."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill_llm.student.batching import build_batch
    from distill_llm.student.loop import lr_at
    from distill_llm.student.losses import KDSettings
    from distill_llm.student.model import StudentWithLoss

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
    student = StudentWithLoss(model, KDSettings(chunk_size=4096, **kd)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    order: list[int] = []
    for step in range(1, steps + 1):
        if len(order) < BATCH:
            fresh = list(range(rows.num_rows))
            rng.shuffle(fresh)
            order += fresh
        picked, order = order[:BATCH], order[BATCH:]
        batch, _ = build_batch(rows.take(picked), max_seq_len=160, pad_id=pad_id, with_topk=True)
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_at(step, steps, 0, "cosine")
        loss = student(**batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return model.eval()


def parse_setting(spec: str, tables: dict) -> tuple[str, object, int, float | None, dict]:
    """One --setting spec as (name, rows, steps, lr or None, KDSettings keywords)."""
    kd, data, steps, lr = {}, "on", "pass", None
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key == "data":
            data = value
        elif key == "steps":
            steps = value
        elif key == "lr":
            lr = float(value)
        elif key == "tail_bucket":
            kd[key] = value.lower() in ("1", "true", "yes")
        elif key in ("alpha", "temperature", "jsd_beta"):
            kd[key] = float(value)
        else:
            kd[key] = value
    rows = tables[data]
    return spec, rows, rows.num_rows // BATCH if steps == "pass" else int(steps), lr, kd


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="a finished bench/rounds.py --work folder")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--eval-prompts", type=int, default=200)
    parser.add_argument("--seeds", default=None, help="training seeds, comma-separated (with --setting)")
    parser.add_argument("--setting", action="append", default=[], help="key=value,... (see the docstring)")
    parser.add_argument("--results", default=None)
    args = parser.parse_args()

    import pyarrow as pa
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill_llm import toy

    torch.set_num_threads(1)
    info, start = machine(), f"{args.work}/offline/student"
    tokenizer = AutoTokenizer.from_pretrained(start)
    problems = toy.make_problems("eval", args.eval_prompts)
    offline = read_table(f"{args.work}/offline/shards")
    if args.setting and not glob.glob(f"{args.work}/rounds/round-1/scored/*.parquet"):  # round 1 not scored yet
        return custom(args, info, start, tokenizer, problems, {"offline": offline})
    scored = read_table(f"{args.work}/rounds/round-1/scored")
    mixed = pa.concat_tables([scored, offline.select(scored.schema.names).slice(0, scored.num_rows)])
    one_pass, mixed_pass = scored.num_rows // BATCH, mixed.num_rows // BATCH
    rkl = {"alpha": 1.0, "divergence": "reverse_kl"}
    quickstart = {"alpha": 0.5, "divergence": "forward_kl", "temperature": 2.0}
    settings = [  # (name, rows, steps, loss settings)
        ("on-policy: reverse KL, T 2 (as benched)", scored, 50, {**rkl, "temperature": 2.0}),
        ("on-policy: reverse KL, T 1", scored, 50, {**rkl, "temperature": 1.0}),
        ("on-policy: reverse KL, T 1, tail bucket", scored, 50, {**rkl, "temperature": 1.0, "tail_bucket": True}),
        ("on-policy: jsd, T 1", scored, 50, {"alpha": 1.0, "divergence": "jsd", "temperature": 1.0}),
        ("on-policy: forward KL, T 1", scored, 50, {"alpha": 1.0, "divergence": "forward_kl", "temperature": 1.0}),
        ("on-policy: reverse KL, T 1, one pass", scored, one_pass, {**rkl, "temperature": 1.0}),
        ("on-policy + offline_mix 0.5: reverse KL, T 1, one pass", mixed, mixed_pass, {**rkl, "temperature": 1.0}),
        ("control: offline shards, quickstart train.*", offline, 50, quickstart),
        ("control: offline shards, quickstart train.*", offline, mixed_pass, quickstart),
    ]
    if args.setting:
        return custom(args, info, start, tokenizer, problems, {"on": scored, "mixed": mixed, "offline": offline})
    base = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32).eval()
    rows = [{"setting": "start (no training)", "rows": "", "steps": "",
             "pass@1": f"{toy.greedy_accuracy(base, tokenizer, problems):.1%}", "seconds": ""}]
    for name, data, steps, kd in settings:
        began = time.time()
        model = replay(start, data, steps, args.lr, args.seed, tokenizer.pad_token_id, **kd)
        rows.append({"setting": name, "rows": data.num_rows, "steps": steps,
                     "pass@1": f"{toy.greedy_accuracy(model, tokenizer, problems):.1%}",
                     "seconds": round(time.time() - began, 1)})
        print(rows[-1], flush=True)
    text = (f"\nreplay of round 1 of {args.work} (bench/rounds_replay.py): lr {args.lr}, cosine, no warmup, "
            f"{BATCH} rows a step, seed {args.seed}; greedy pass@1 (transformers) on {args.eval_prompts} held-out "
            f"toy eval problems\n\n{table(rows, ['setting', 'rows', 'steps', 'pass@1', 'seconds'])}\n")
    append_results(args.results, header("Rounds' training replayed without engines (bench/rounds_replay.py)", info) + text)
    return 0


def custom(args, info: dict, start: str, tokenizer, problems: list, tables: dict) -> int:
    """Each --setting once per --seeds seed: pass@1 per seed and the mean, one table row per setting."""
    import statistics

    import torch
    from transformers import AutoModelForCausalLM

    from distill_llm import toy

    seeds = [int(s) for s in (args.seeds or str(args.seed)).split(",")]
    base = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32).eval()
    rows = [{"setting": "start (no training)", "pass@1 per seed": f"{toy.greedy_accuracy(base, tokenizer, problems):.1%}"}]
    print(rows[-1], flush=True)
    for spec in args.setting:
        name, data, steps, lr, kd = parse_setting(spec, tables)
        began, got = time.time(), []
        for seed in seeds:
            model = replay(start, data, steps, lr or args.lr, seed, tokenizer.pad_token_id, **kd)
            got.append(toy.greedy_accuracy(model, tokenizer, problems))
        rows.append({"setting": name, "rows": data.num_rows, "steps": steps,
                     "pass@1 per seed": " / ".join(f"{g:.1%}" for g in got), "mean": f"{statistics.mean(got):.1%}",
                     "seconds": round(time.time() - began, 1)})
        print(rows[-1], flush=True)
    text = (f"\nreplay of round 1 of {args.work} (bench/rounds_replay.py): cosine, no warmup, {BATCH} rows a step, "
            f"training seeds {seeds}, lr {args.lr} unless the setting names one; greedy pass@1 (transformers) on "
            f"{args.eval_prompts} held-out toy eval problems\n\n"
            f"{table(rows, ['setting', 'rows', 'steps', 'pass@1 per seed', 'mean', 'seconds'])}\n")
    append_results(args.results, header("Rounds' training replayed without engines (bench/rounds_replay.py)", info) + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
