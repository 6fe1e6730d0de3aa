"""Peak resident memory of the generation driver and of its workers as the prompt set grows 10x.

    PYTHONPATH=$PWD python bench/memory.py                   # 200 and 2,000 toy prompts, a few minutes

Each size runs ``distill_llm.teacher.stage.generate`` in a fresh interpreter with its own local Ray, so every
Ray process (raylet, GCS, workers, the engine actor and its vLLM EngineCore) is a descendant of that
interpreter. A thread samples the RSS of the whole process tree every ``--interval`` seconds and keeps,
per group, the peak of the largest process and the peak of the group's sum:
  driver       the interpreter running generate()
  engine actor the Ray actor holding TeacherEngine (``ray::MapWorker(...TeacherEngine)``)
  vLLM engine  vLLM's processes under it (VLLM::EngineCore and, on CPU, its VLLM::Worker)
  ray workers  every other Ray worker (prompt expansion, shard writes, idle pool)
  ray system   raylet, GCS, dashboard agents, log monitor
RSS counts shared pages (the object store's shared memory, libraries) in every process that maps
them, so group sums over-count; the per-process peaks are the figures to compare across sizes.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

from common import QUICKSTART, append_results, emit, header, load_average, machine, scaling_runs, table

MIB = 2**20
GROUPS = ("driver", "engine actor", "vLLM engine", "ray workers", "ray system")


def group_of(proc, me: int) -> str:
    if proc.pid == me:
        return "driver"
    title = " ".join(proc.cmdline()) or proc.name()
    if title.startswith("VLLM::"):  # EngineCore and, on CPU, its Worker process (weights, KV cache)
        return "vLLM engine"
    if "TeacherEngine" in title:
        return "engine actor"
    if title.startswith("ray::") or "default_worker.py" in title:
        return "ray workers"
    return "ray system"


class TreeSampler:
    """Samples RSS of this process and all descendants in a thread; peaks per group."""

    def __init__(self, interval: float):
        import psutil

        self.psutil, self.interval = psutil, interval
        self.root = psutil.Process()
        self.peak_proc = {g: 0 for g in GROUPS}
        self.peak_sum = {g: 0 for g in GROUPS}
        self.peak_tree = 0
        self.by_task: dict[str, tuple[int, int]] = {}  # Ray worker title -> peak (RSS, RSS less shared pages)
        self.samples = 0
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            sums = {g: 0 for g in GROUPS}
            for proc in [self.root, *self.root.children(recursive=True)]:
                try:
                    info = proc.memory_info()
                    rss = info.rss
                    group = group_of(proc, self.root.pid)
                    if group == "ray workers":
                        self._task_peak(" ".join(proc.cmdline()).strip()[:80], rss, rss - info.shared)
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                    continue
                sums[group] += rss
                self.peak_proc[group] = max(self.peak_proc[group], rss)
            for g, v in sums.items():
                self.peak_sum[g] = max(self.peak_sum[g], v)
            self.peak_tree = max(self.peak_tree, sum(sums.values()))
            self.samples += 1
            time.sleep(self.interval)

    def _task_peak(self, title: str, rss: int, private: int) -> None:
        old = self.by_task.get(title, (0, 0))
        self.by_task[title] = (max(old[0], rss), max(old[1], private))

    def stop(self) -> dict:
        self.running = False
        self.thread.join()
        out = {f"{g} max MiB": self.peak_proc[g] / MIB for g in GROUPS}
        out.update({f"{g} sum MiB": self.peak_sum[g] / MIB for g in GROUPS})
        out.update(tree_MiB=self.peak_tree / MIB, samples=self.samples)
        out["by task"] = {t: (round(r / MIB), round(p / MIB)) for t, (r, p) in
                          sorted(self.by_task.items(), key=lambda kv: -kv[1][0])}
        return out


def case(c: dict) -> dict:
    from distill_llm.config import load_config
    from distill_llm.teacher.stage import generate

    work = Path(tempfile.mkdtemp(prefix="bench-mem-"))
    try:
        cfg = load_config(QUICKSTART, [f"output.dir={work / 'shards'}", f"data.num_prompts={c['prompts']}",
                                       f"generate.top_k_logprobs={c['k']}"])
        sampler = TreeSampler(c["interval"])
        t = time.perf_counter()
        manifest = generate(cfg)
        seconds = time.perf_counter() - t
        peaks = sampler.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**c, "seconds": seconds, "rows": manifest["totals"]["rows"],
            "tokens": manifest["totals"]["completion_tokens"], **peaks}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--sizes", default="200,2000")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--interval", type=float, default=0.25)
    p.add_argument("--results", default=None)
    args = p.parse_args()
    if args.case:
        import json

        emit(case(json.loads(args.case)))
        return
    info = machine()
    rows, _ = scaling_runs("memory.py", "prompts", (int(x) for x in args.sizes.split(",")),
                           {"k": args.k, "interval": args.interval})
    per_proc = ["prompts", "rows", "tokens", "seconds", *[f"{g} max MiB" for g in GROUPS]]
    sums = ["prompts", *[f"{g} sum MiB" for g in GROUPS], "tree_MiB", "samples"]
    append_results(args.results, header("Memory: generation driver and workers", info)
                   + f"\nToy teacher, k {args.k}, quickstart settings; RSS sampled every {args.interval}s; "
                   f"load average at end {load_average()}.\n\nPeak RSS of the largest process per group:\n\n"
                   + table(rows, per_proc) + "\n\nPeak of each group's summed RSS (over-counts shared pages):\n\n"
                   + table(rows, sums) + "\n")


if __name__ == "__main__":
    main()
