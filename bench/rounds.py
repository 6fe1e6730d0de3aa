"""On-policy rounds against the same number of extra offline-KD steps, from a weak offline-KD student.

    PYTHONPATH=$PWD python bench/rounds.py --results bench/RESULTS.md
    PYTHONPATH=$PWD python bench/rounds.py --student runs/quickstart/student --shards runs/quickstart/shards

The quickstart's fully distilled student already scores near the teacher on toy:eval, so by default the start is
made here: the quickstart's teacher shards (``--offline-prompts`` prompts) and a student trained on them with the
quickstart's train.* for only ``--start-steps`` steps (``--student``/``--shards`` start from existing ones).
Two arms, each ``--rounds`` times ``--steps`` training steps on top of that student:
- rounds: `distill-llm rounds` (the student samples, the toy teacher scores, reverse KL with train.alpha=1);
- control: ``--steps`` more offline-KD steps per round on the same offline shards (its own train.* settings).
Every checkpoint is then scored on the held-out toy:eval prompts (greedy pass@1); the table gives, per row,
the compute each round took (student tokens generated, teacher tokens scored, steps, seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from common import QUICKSTART, append_results, header, machine, table


def base_config(args, work: Path, *overrides: str):
    from distill_llm.config import load_config

    return load_config(QUICKSTART, [f"student.model={args.student}", f"data.shards=[{args.shards}]",
                                    f"output.dir={args.shards}", f"eval.num_prompts={args.eval_prompts}",
                                    f"output.eval_dir={work / 'eval'}", *overrides])


def prepare(args, work: Path) -> None:
    """The weak start: the quickstart's teacher shards and a student trained on them for --start-steps steps."""
    from distill_llm.config import load_config
    from distill_llm.student.stage import train
    from distill_llm.teacher.stage import generate

    start = time.time()
    shards, student = work / "offline" / "shards", work / "offline" / "student"
    cfg = load_config(QUICKSTART, [f"data.num_prompts={args.offline_prompts}", f"output.dir={shards}",
                                   f"output.student_dir={student}", f"train.max_steps={args.start_steps}",
                                   f"train.storage_path={work / 'offline' / 'train'}"])
    args.reused = (shards / "manifest.json").is_file() and student.is_dir()
    if not (shards / "manifest.json").is_file():
        generate(cfg)
    if not student.is_dir():
        train(cfg)
    args.student, args.shards = str(student), str(shards)
    args.prepare_seconds = round(time.time() - start, 1)
    if args.reused:  # the start found in --work says how long it trained, whatever --start-steps says now
        args.start_steps = json.loads((student / "distill_llm.json").read_text())["train"]["max_steps"]


def run_rounds(args, work: Path) -> list[dict]:
    from distill_llm.rounds.stage import rounds

    cfg = base_config(args, work, f"rounds.n={args.rounds}", f"rounds.prompts_per_round={args.prompts_per_round}",
                      f"rounds.samples_per_prompt={args.samples}", f"rounds.dir={work / 'rounds'}",
                      f"rounds.offline_mix={args.offline_mix}", f"train.temperature={args.temperature}",
                      f"train.max_steps={args.steps}", "train.divergence=reverse_kl", "train.alpha=1.0",
                      f"train.lr={args.lr}", "train.warmup_steps=0", "data.num_prompts=2048")
    return rounds(cfg)


def run_control(args, work: Path) -> list[dict]:
    """``--steps`` more offline-KD steps per round, each continuing the previous checkpoint."""
    from distill_llm.student.stage import train

    student, records = args.student, []
    for r in range(1, args.rounds + 1):
        start = time.time()
        folder = work / "control" / f"round-{r}"
        cfg = base_config(args, work, f"student.model={student}", f"train.max_steps={args.steps}",
                          f"train.lr={args.lr}", "train.warmup_steps=0", f"train.seed={r}",
                          f"train.storage_path={folder / 'train'}", f"output.student_dir={folder / 'student'}")
        student = train(cfg)
        records.append({"student_out": student, "steps": args.steps, "seconds": round(time.time() - start, 1)})
    return records


def evaluate_all(args, work: Path, models: list[str]) -> dict[str, float]:
    """pass@1 of each model folder, scored one at a time as the stage's distilled student (eval.models would
    name its samples file after the folder's path)."""
    from distill_llm.evaluation.stage import evaluate

    scores = {}
    for i, model in enumerate(models):
        cfg = base_config(args, work, "eval.include_teacher=false", "eval.include_base_student=false",
                          f"output.eval_dir={work / 'eval' / str(i)}")
        scores[model] = next(iter(evaluate(cfg, student=model).values()))["pass@1"]
    return scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default=None, help="start from this student (default: train a weak one)")
    parser.add_argument("--shards", default=None, help="its offline shard set (with --student)")
    parser.add_argument("--offline-prompts", type=int, default=2048)
    parser.add_argument("--start-steps", type=int, default=100, help="offline-KD steps of the weak start")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts-per-round", type=int, default=256)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--offline-mix", type=float, default=0.5, help="rounds.offline_mix")
    parser.add_argument("--temperature", type=float, default=1.0, help="the rounds' train.temperature")
    parser.add_argument("--steps", type=int, default=32, help="steps per round (default: one pass over its rows)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-prompts", type=int, default=200)
    parser.add_argument("--work", default=None, help="folder for both arms (default: a temp folder)")
    parser.add_argument("--results", default=None, help="append the section to this file (bench/RESULTS.md)")
    args = parser.parse_args()
    if (args.student is None) != (args.shards is None):
        print("--student and --shards go together (or neither: a weak start is trained)", file=sys.stderr)
        return 2
    for what, path in (("--student", args.student), ("--shards", args.shards)):
        if path is not None and not Path(path).exists():
            print(f"{what} {path} does not exist: run `distill-llm run configs/quickstart.yaml` first", file=sys.stderr)
            return 2
    info = machine()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-rounds-"))
    start = "given"
    if args.student is None:
        prepare(args, work)
        start = (f"the quickstart config with data.num_prompts={args.offline_prompts} and train.max_steps="
                 f"{args.start_steps} " + ("(reused from the --work folder)" if args.reused
                                           else f"({args.prepare_seconds:.0f} s to generate and train)"))
    on_policy, control = run_rounds(args, work), run_control(args, work)
    scores = evaluate_all(args, work, [args.student] + [r["student_out"] for r in on_policy + control])
    rows = [{"checkpoint": f"start: offline KD, {args.start_steps} steps" if start != "given" else "start (given)",
             "pass@1": f"{scores[args.student]:.1%}", "steps": args.start_steps if start != "given" else ""}]
    for r, (a, b) in enumerate(zip(on_policy, control), start=1):
        rows.append({"checkpoint": f"after round {r}", "pass@1": f"{scores[a['student_out']]:.1%}",
                     "rows (on-policy + offline)": f"{a['rows']} + {a['offline_rows']}",
                     "student tokens generated": a["student_tokens_generated"],
                     "teacher tokens scored": a["teacher_tokens_scored"], "steps": a["steps"], "seconds": a["seconds"]})
        rows.append({"checkpoint": f"control: +{r * args.steps} offline-KD steps", "pass@1":
                     f"{scores[b['student_out']]:.1%}", "steps": b["steps"], "seconds": b["seconds"]})
    on_rows = args.prompts_per_round * args.samples
    n_rows = on_rows + (math.ceil(on_rows * args.offline_mix / (1 - args.offline_mix)) if args.offline_mix else 0)
    passes = args.steps * 32 / n_rows  # the quickstart's 16 rows per worker x 2 workers per step
    settings = (f"start: {start}; {args.rounds} rounds x {args.prompts_per_round} prompts x {args.samples} samples "
                f"+ offline_mix {args.offline_mix} = {n_rows} rows, {args.steps} steps of 32 rows per round ({passes:.1f} "
                f"passes; reverse KL over the top-k, alpha 1, train.temperature {args.temperature}, lr {args.lr}, no "
                f"warmup); control: {args.steps} steps per round of the quickstart's train.* (forward KL, alpha 0.5, "
                f"T 2) on the offline shards with lr {args.lr}, no warmup; held-out toy:eval, {args.eval_prompts} "
                "prompts, greedy")
    columns = ["checkpoint", "pass@1", "rows (on-policy + offline)", "student tokens generated", "teacher tokens scored", "steps", "seconds"]
    append_results(args.results, header("On-policy rounds vs extra offline KD (bench/rounds.py)", info)
                   + f"\n{settings}\n\n{table(rows, columns)}\n")
    print(json.dumps({"work": str(work)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
