"""The quickstart's students side by side: token-level KD against sequence-level KD alone, over seeds.

Generates the quickstart's shard set once, then trains one student per (strategy, train.seed) and scores it
on the quickstart's held-out prompts, with the teacher once for reference. Prints one table row per student:
pass@1, mean completion tokens, train time. This is where "top-k KD is not worse than sequence-level KD"
is measured; tests/test_distill.py keeps only the KD student's floor.

    PYTHONPATH=$PWD python bench/quickstart.py --seeds 0,1,2 --results bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import QUICKSTART, append_results, header, machine, table

STRATEGIES = {"token-level KD": [], "sequence-level only": ["train.alpha=0"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0", help="train.seed values, comma-separated")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="rows to train: " + ", ".join(STRATEGIES))
    p.add_argument("--override", action="append", default=[], help="a dotted override for every run (repeatable)")
    p.add_argument("--workdir", default=None, help="where shards and students go (default: a temp dir)")
    p.add_argument("--results", default=None, help="append the Markdown section to this file")
    args = p.parse_args()
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        p.error(f"--strategies: unknown {unknown}; choose from {list(STRATEGIES)}")

    from distill_llm.config import load_config
    from distill_llm.evaluation.stage import evaluate
    from distill_llm.student.stage import train
    from distill_llm.teacher.stage import generate

    info = machine()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-quickstart-"))

    def config(name: str, *extra: str):
        return load_config(QUICKSTART, [
            f"output.dir={work / 'shards'}", f"output.student_dir={work / name}", f"output.eval_dir={work / name / 'eval'}",
            f"train.storage_path={work / 'train'}", *args.override, *extra])

    start = time.monotonic()
    generate(config("teacher"))
    rows = [{"student": "teacher", "generate s": round(time.monotonic() - start, 1)}]
    teacher_done = False
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in strategies:
            cfg = config(f"{name.split()[0]}-{seed}", f"train.seed={seed}", *STRATEGIES[name])
            start = time.monotonic()
            student = train(cfg)
            train_s = round(time.monotonic() - start, 1)
            cfg.eval.include_base_student = False
            cfg.eval.include_teacher = not teacher_done
            results = evaluate(cfg, student=student)
            if not teacher_done:
                rows[0].update(pass_at_1=results["teacher"]["pass@1"],
                               mean_tokens=results["teacher"]["mean_completion_tokens"])
                teacher_done = True
            got = results["student (distilled)"]
            rows.append({"student": name, "train.seed": seed, "pass_at_1": got["pass@1"],
                         "mean_tokens": got["mean_completion_tokens"], "train s": train_s})
    text = "\n".join([header("Quickstart students: token-level KD vs sequence-level KD (bench/quickstart.py)", info),
                      f"Overrides: {args.override or 'none'}.\n",
                      table(rows, ["student", "train.seed", "pass_at_1", "mean_tokens", "train s", "generate s"]), ""])
    print(text)
    append_results(args.results, text)


if __name__ == "__main__":
    main()
