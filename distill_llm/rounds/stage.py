"""`distill-llm rounds`: on-policy distillation as a loop of the stages the project already has.

Round r (1 .. rounds.n), in ``<rounds.dir>/round-<r>/``:
  prompts.jsonl  rounds.prompts_per_round prompts of data.prompts, drawn without replacement across rounds
  samples/       the current student samples them (the teacher stage's engine serving the student; no top-k)
  traces.jsonl   those samples as finished traces
  scored/        the teacher scores every position of them by prefill (generate.mode: score, top-k)
  offline/       with rounds.offline_mix: a seeded sample of the offline shard sets (data.shards)
  train/, student/  the student trains on scored/ (+ offline/; train.* as configured) and is exported
  round.json     written last: the round is done (what it cost, the checkpoint hashes)

Each step is skipped when its output is complete (a manifest, round.json) and otherwise left to the stage's
own resume (committed shards, Ray Train checkpoints), so a killed run resumes where it stopped and nothing is
generated twice. The stages are used only through their public functions (generate, train).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

from .. import faults
from ..config import ROUND_TEACHER, Config, ConfigError, build_config
from ..paths import absolute, is_url, resolve_model

ROUND_RECORD = "round.json"


def rounds_dir(cfg: Config) -> Path:
    """rounds.dir, else ``rounds/`` beside output.dir."""
    if cfg.rounds.dir:
        return Path(absolute(cfg.rounds.dir))
    return Path(absolute(cfg.output.dir)).parent / "rounds"


def teacher_round(cfg: Config) -> int | None:
    """N of ``teacher.model: round:N``, else None."""
    model = cfg.teacher.model
    if not model.startswith(ROUND_TEACHER):
        return None
    try:
        return int(model[len(ROUND_TEACHER):])
    except ValueError:
        raise ConfigError(f"teacher.model={model}: expected round:N with N a round number (round:0 is the "
                          "starting student)") from None


def check_rounds(cfg: Config) -> None:
    """Refuse, naming the key, a rounds config that cannot run or would train nothing, before any work."""
    r = cfg.rounds
    if r is None:
        raise ConfigError("distill-llm rounds needs a rounds: section (rounds.n, rounds.prompts_per_round, ...)")
    if cfg.train.alpha == 0:
        raise ConfigError("rounds with train.alpha=0 would train the student on its own samples by cross-entropy "
                          "alone, nothing from the teacher: set train.alpha > 0 (1.0 is on-policy KD alone)")
    if cfg.generate.top_k_logprobs == 0:
        raise ConfigError("rounds need the teacher's top-k at every position of the student's samples: set "
                          "generate.top_k_logprobs >= 1")
    check_sampled_estimator(cfg)
    n = teacher_round(cfg)
    if n is not None and n != 0:
        raise ConfigError(f"teacher.model=round:{n}: the rounds before round {n + 1} would have no teacher; "
                          "round:0 (the starting student, student.model) is the checkpoint every round can use")
    if cfg.student.lora is not None and not cfg.student.merge_lora:
        raise ConfigError("rounds serve each round's student with the teacher stage's engine, which needs merged "
                          "weights: set student.merge_lora=true (or student.lora=null)")
    if r.dir and is_url(r.dir):
        raise ConfigError(f"rounds.dir={r.dir}: rounds keep their prompts and traces in a local (or shared) "
                          "folder; give a path, the shard sets inside it are plain folders")
    needed = r.n * r.prompts_per_round
    if cfg.data.num_prompts is not None and needed > cfg.data.num_prompts:
        raise ConfigError(f"rounds.n={r.n} x rounds.prompts_per_round={r.prompts_per_round} = {needed} prompts "
                          f"drawn without replacement, but data.num_prompts={cfg.data.num_prompts}")


def check_sampled_estimator(cfg: Config) -> None:
    """train.estimator=sampled weighs each sampled token by the student's bucket distribution at
    train.temperature, so it is the reverse-KL gradient only when the student sampled from that same
    distribution: generate.temperature equal to train.temperature and no top-p truncation, and only on the
    student's own samples (no rounds.offline_mix: the offline rows are the teacher's samples). Otherwise refuse."""
    t, g = cfg.train, cfg.generate
    if t.estimator != "sampled":
        return
    if t.temperature != g.temperature or g.top_p != 1:
        raise ConfigError(f"train.estimator=sampled with train.temperature={t.temperature}, the student sampling at "
                          f"generate.temperature={g.temperature}, generate.top_p={g.top_p}: the one-sample estimate is "
                          "unbiased only for samples from the distribution it trains, so set train.temperature equal "
                          "to generate.temperature and generate.top_p=1 (or train.estimator=topk)")
    mix = cfg.rounds.offline_mix if cfg.rounds is not None else 0
    if mix > 0:  # one estimator trains every row of a round: the offline rows' tokens are the teacher's samples
        raise ConfigError(f"train.estimator=sampled with rounds.offline_mix={mix}: the one-sample estimate is the "
                          "reverse-KL gradient only on the student's own samples, and the offline rows are the "
                          "teacher's, so set rounds.offline_mix=0 (or train.estimator=topk)")


def checkpoint_hash(folder: str) -> str:
    """sha256 (16 hex) over a model folder's weight files, by name: which checkpoint sampled or taught (a hub
    id that is not a local folder: over its name, which with student.revision pins the weights)."""
    digest = hashlib.sha256()
    if not Path(folder).is_dir():
        return hashlib.sha256(f"hub:{folder}".encode()).hexdigest()[:16]
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise ConfigError(f"model folder {folder} holds no weights (*.safetensors)")
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSONL atomically (a temp file renamed), so a killed run never leaves half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    os.replace(tmp, path)


def all_prompts(cfg: Config) -> list[dict[str, Any]]:
    """The usable prompts of data.prompts ({messages, answer}), in prompt_id order (independent of the read)."""
    from ..corpus.prompts import read_prompts
    from ..corpus.schema import SKIP_REASON

    rows = [r for r in read_prompts(cfg.data).take_all() if r[SKIP_REASON] is None]
    return [{"prompt_id": r["prompt_id"], "messages": r["messages"], "answer": r["answer"]}
            for r in sorted(rows, key=lambda r: r["prompt_id"])]


def draw(prompts: list[dict[str, Any]], cfg: Config, round_no: int) -> list[dict[str, Any]]:
    """Round ``round_no``'s prompts: slice r of one seeded permutation, so no prompt is drawn twice."""
    import numpy as np

    r = cfg.rounds
    if r.n * r.prompts_per_round > len(prompts):
        raise ConfigError(f"rounds.n={r.n} x rounds.prompts_per_round={r.prompts_per_round} prompts drawn without "
                          f"replacement, but data.prompts={cfg.data.prompts} has {len(prompts)} usable prompts")
    order = np.random.default_rng(r.seed).permutation(len(prompts))
    picked = order[(round_no - 1) * r.prompts_per_round: round_no * r.prompts_per_round]
    return [{"messages": prompts[i]["messages"], "answer": prompts[i]["answer"]} for i in picked]


def derived(cfg: Config, **sections: dict[str, Any]) -> Config:
    """``cfg`` with some keys replaced per section, validated again as a whole (one stage's config)."""
    tree = cfg.model_dump(mode="json")
    tree["rounds"] = None
    for section, values in sections.items():
        tree[section] = {**(tree.get(section) or {}), **values}
    return build_config(tree)


def engine_settings(cfg: Config) -> dict[str, Any]:
    """teacher.* engine keys for serving the student: eval.engine's where set (the student's engine there)."""
    e = cfg.eval.engine
    keys = ("dtype", "tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization",
            "max_model_len", "max_num_seqs", "enforce_eager")
    out = {k: getattr(e, k) for k in keys if getattr(e, k) is not None}
    if e.cpu_kv_cache_gb is not None:
        out["cpu_kv_cache_gb"] = e.cpu_kv_cache_gb
    return out


def sampling_config(cfg: Config, student: str, prompts: Path, out: Path, round_no: int) -> Config:
    """The teacher stage's config in which the student samples (no top-k: the teacher scores them next)."""
    return derived(cfg, teacher={"model": student, "revision": None, "tokenizer": None, "engine_kwargs": {},
                                 "trust_remote_code": cfg.student.trust_remote_code, **engine_settings(cfg)},
                   data={"prompts": str(prompts), "dataset": None, "num_prompts": None},
                   generate={"mode": "generate", "logprobs": None, "top_k_logprobs": 0,
                             "samples_per_prompt": cfg.rounds.samples_per_prompt,
                             "seed": cfg.rounds.seed + round_no},
                   student={"model": student, "revision": None}, train={"alpha": 0},
                   output={"dir": str(out)})


def scoring_config(cfg: Config, teacher: str, student: str, traces: Path, out: Path) -> Config:
    """The teacher stage's config in score mode over the student's traces."""
    return derived(cfg, teacher={"model": teacher},
                   data={"prompts": str(traces), "dataset": None, "num_prompts": None},
                   generate={"mode": "score", "logprobs": None, "samples_per_prompt": 1},
                   student={"model": student, "revision": None}, output={"dir": str(out)})


def training_config(cfg: Config, student: str, shards: list[Path], folder: Path, round_no: int) -> Config:
    """The student stage's config: the scored traces (and an offline mix) train the current student into
    ``folder/student``."""
    return derived(cfg, data={"shards": [str(s) for s in shards]}, student={"model": student, "revision": None},
                   train={"storage_path": str(folder / "train"), "run_name": None, "resume": True,
                          "seed": cfg.train.seed + round_no},
                   output={"student_dir": str(folder / "student")})


def complete(shard_dir: Path) -> dict[str, Any] | None:
    """The manifest of a finished shard set, else None."""
    path = shard_dir / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def check_sampler(shard_dir: Path, student_hash: str) -> None:
    """Refuse to resume a round's shard set that another student checkpoint began."""
    run = shard_dir / "run.json"
    if run.is_file():
        old = (json.loads(run.read_text()).get("rounds") or {}).get("student_sha256")
        if old not in (None, student_hash):
            raise ConfigError(f"{shard_dir} was started with student checkpoint {old}, not {student_hash}: the "
                              "rounds before it changed; use another rounds.dir")


def traces(samples: Path) -> list[dict[str, Any]]:
    """The student's samples as finished traces for score mode: messages ending with its completion, and its
    own token ids, which the teacher scores as they are (its tokenizer is the student's: train.alpha > 0), and
    its sample id as trace_id, so two identical samples of one prompt stay two scored rows (each draw counts)."""
    from ..corpus.shards import read_shards

    cols = ["sample_id", "messages", "completion_text", "completion_token_ids", "finish_reason", "answer"]
    rows = sorted(read_shards(str(samples), columns=cols).to_pylist(), key=lambda r: r["sample_id"])
    return [{"messages": r["messages"] + [{"role": "assistant", "content": r["completion_text"]}],
             "completion_token_ids": r["completion_token_ids"], "answer": r["answer"],
             "finish_reason": r["finish_reason"], "trace_id": r["sample_id"]}
            for r in rows if r["completion_text"] and r["completion_token_ids"]]


def offline_rows(cfg: Config, on_policy: int) -> int:
    """Offline rows mixed into a round of ``on_policy`` scored rows: rounds.offline_mix of the total."""
    f = cfg.rounds.offline_mix
    return math.ceil(on_policy * f / (1 - f)) if f > 0 else 0


def offline_mix(cfg: Config, scored_run: dict[str, Any], on_policy: int, out: Path, round_no: int) -> Path | None:
    """Write round ``round_no``'s sample of the offline corpus as a shard set of its own (seeded, without
    replacement within the round), or None when rounds.offline_mix is 0. Only the chosen rows are read."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from ..corpus.schema import SKIP_DETAIL, SKIP_REASON, TEACHER_COLUMN
    from ..corpus.shards import (ShardWriter, check_compatible, prepare_output, read_manifest, shard_files,
                                 write_manifest)

    want = offline_rows(cfg, on_policy)
    if want == 0:
        return None
    if complete(out):
        return out
    dirs = [absolute(d) for d in cfg.shard_dirs]
    manifests = {d: read_manifest(d) for d in dirs}
    run = check_compatible(manifests)
    for key in ("top_k_logprobs", "tokenizer_fingerprint", "logprobs_dtype"):
        if run.get(key) != scored_run.get(key):
            raise ConfigError(f"rounds.offline_mix={cfg.rounds.offline_mix}: the offline shards ({', '.join(dirs)}) "
                              f"have {key}={run.get(key)!r}, the teacher's scores {scored_run.get(key)!r}; they "
                              "cannot train together (set generate.top_k_logprobs to the offline sets' k)")
    files = [f for d in dirs for f in shard_files(d)]
    ids = pads.dataset(files, format="parquet").to_table(columns=["sample_id"]).column("sample_id").to_pylist()
    rng = np.random.default_rng([cfg.rounds.seed, round_no])
    picked = sorted(ids[i] for i in rng.choice(len(ids), size=min(want, len(ids)), replace=False))
    table = pads.dataset(files, format="parquet").to_table(filter=pc.field("sample_id").isin(picked))
    teacher_column = TEACHER_COLUMN in table.column_names
    table = table.append_column(SKIP_REASON, pa.nulls(table.num_rows, pa.string())).append_column(
        SKIP_DETAIL, pa.nulls(table.num_rows, pa.string()))
    record = {**run, "rounds": {"round": round_no, "role": "offline_mix", "sources": dirs,
                                "fraction": cfg.rounds.offline_mix}}
    prepare_output(str(out), record, resume=True, overwrite=False)
    writer = ShardWriter(str(out), run["top_k_logprobs"], run["logprobs_dtype"], metadata=record,
                         teacher_column=teacher_column)
    writer.write([table])
    write_manifest(str(out), expected=table.num_rows)
    return out


def drill(round_no: int, step: str) -> None:
    """A drill point after each step of a round (faults.py ``kill_rounds``)."""
    faults.point("rounds_step", round_no, prompts=[step])


def run_round(cfg: Config, round_no: int, student: str, teacher: str, prompts: Callable[[], list[dict]]) -> dict:
    """One round from ``student`` (a model folder); returns its record (round.json). ``prompts`` gives every
    usable prompt, read only when this round's draw is not on disk yet."""
    from ..student.stage import train
    from ..teacher.stage import generate

    folder = rounds_dir(cfg) / f"round-{round_no}"
    folder.mkdir(parents=True, exist_ok=True)
    start, student_hash = time.time(), checkpoint_hash(student)
    provenance = {"round": round_no, "student": student, "student_sha256": student_hash,
                  "teacher": cfg.teacher.model, "teacher_resolved": teacher}
    prompts_file = folder / "prompts.jsonl"
    if not prompts_file.is_file():
        write_jsonl(prompts_file, draw(prompts(), cfg, round_no))
    samples, scored = folder / "samples", folder / "scored"
    check_sampler(samples, student_hash)
    sampled = complete(samples) or generate(sampling_config(cfg, student, prompts_file, samples, round_no),
                                            {**provenance, "role": "student_samples"})
    drill(round_no, "samples")
    traces_file = folder / "traces.jsonl"
    if not traces_file.is_file():
        write_jsonl(traces_file, traces(samples))
    check_sampler(scored, student_hash)
    scores = complete(scored) or generate(scoring_config(cfg, teacher, student, traces_file, scored),
                                          {**provenance, "role": "teacher_scores"})
    drill(round_no, "scored")
    mixed = offline_mix(cfg, scores["run"], scores["totals"]["rows"], folder / "offline", round_no)
    out = train(training_config(cfg, student, [scored] + ([mixed] if mixed else []), folder, round_no))
    info = json.loads((Path(out) / "distill_llm.json").read_text())
    record = {**provenance, "student_out": out, "student_out_sha256": checkpoint_hash(out),
              "prompts": cfg.rounds.prompts_per_round,
              "student_tokens_generated": sampled["totals"]["completion_tokens"],
              "teacher_tokens_scored": scores["totals"]["prompt_tokens"] + scores["totals"]["completion_tokens"],
              "rows": scores["totals"]["rows"], "offline_rows": info.get("rows", 0) - scores["totals"]["rows"],
              "steps": info.get("steps"), "final": info.get("final"),
              "seconds": round(time.time() - start, 1)}
    tmp = folder / f"{ROUND_RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    os.replace(tmp, folder / ROUND_RECORD)  # the round is done only once this lands whole
    return record


def rounds(cfg: Config) -> list[dict[str, Any]]:
    """Run rounds.n rounds (skipping finished ones); returns every round's record."""
    from ..cluster.runtime import init_ray

    check_rounds(cfg)
    start = resolve_model(cfg.student.model)
    teacher = start if teacher_round(cfg) == 0 else cfg.teacher.model
    init_ray(cfg.ray)
    records, student, read = [], start, {}

    def prompts() -> list[dict[str, Any]]:  # read once, and only by a round that still has to draw
        if "all" not in read:
            read["all"] = all_prompts(cfg)
        return read["all"]

    for round_no in range(1, cfg.rounds.n + 1):
        done = rounds_dir(cfg) / f"round-{round_no}" / ROUND_RECORD
        if done.is_file():
            record = json.loads(done.read_text())
            print(f"rounds: round {round_no} is done ({done}); skipped", flush=True)
        else:
            record = run_round(cfg, round_no, student, teacher, prompts)
            print(f"rounds: round {round_no}: {record['student_tokens_generated']:,} student tokens generated, "
                  f"{record['teacher_tokens_scored']:,} teacher tokens scored, {record['steps']} steps "
                  f"in {record['seconds']:.0f}s -> {record['student_out']}", flush=True)
        records.append(record)
        student = record["student_out"]
    return records
