"""Evaluation: held-out prompts through each model's vLLM engine (same Ray Data path), scored by the checker."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from typing import Any

import pyarrow as pa

from .checkers import get_checker
from ..config import Config, ConfigError
from ..paths import check_weights_format, filesystem, join, makedirs, read_text, resolve_model
from ..teacher.engine import SamplingSpec


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def score(rows: list[dict[str, Any]], samples: int) -> dict[str, Any]:
    """pass@1 (and pass@k for k in 2, 4, ... <= n), mean completion length, finish reasons."""
    by_prompt: dict[str, list[bool]] = {}
    lengths, finish = [], {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(bool(r["answer_correct"]))
        lengths.append(len(r["completion_token_ids"] or []))
        finish[r["finish_reason"]] = finish.get(r["finish_reason"], 0) + 1
    out: dict[str, Any] = {"prompts": len(by_prompt), "samples": len(rows)}
    ks = [1] + [k for k in (2, 4, 8, 16, 32, 64) if k <= samples]
    for k in ks:
        vals = [pass_at_k(len(v), sum(v), k) for v in by_prompt.values() if len(v) >= k]
        out[f"pass@{k}"] = sum(vals) / len(vals) if vals else 0.0
    out["mean_completion_tokens"] = sum(lengths) / len(lengths) if lengths else 0.0
    out["finish_reasons"] = finish
    return out


def models_to_score(cfg: Config, student: str | None) -> list[tuple[str, str]]:
    """(label, model) pairs in table order: teacher, untrained student, trained student, extras."""
    models: list[tuple[str, str]] = []
    if cfg.eval.include_teacher:
        models.append(("teacher", cfg.teacher.model))
    if cfg.eval.include_base_student:
        models.append(("student (before)", cfg.student.model))
    trained = student or (cfg.output.student_dir if _exported(cfg.output.student_dir) else None)
    if trained:
        models.append(("student (distilled)", trained))
    models += [(m, m) for m in cfg.eval.models]
    if not models:
        raise ConfigError("nothing to evaluate: pass model=PATH or enable eval.include_teacher")
    return models


def _exported(folder: str) -> bool:
    fs, path = filesystem(folder)
    return read_text(fs, join(path, "config.json")) is not None


def evaluate_model(cfg: Config, model: str, is_teacher: bool = False) -> tuple[dict[str, Any], pa.Table]:
    from ..corpus.prompts import expand_samples, read_prompts
    from ..teacher.stage import apply_engine, engine_spec, use_gpu_for

    path = resolve_model(model)
    role = "teacher" if is_teacher else "student"
    allow_pickle = getattr(cfg, role).allow_pickle_weights
    check_weights_format(path, allow_pickle, f"{role}.allow_pickle_weights")
    e = cfg.eval
    use_gpu = use_gpu_for(cfg.teacher.use_gpu)
    prompts = read_prompts(cfg.data, source=e.prompts, num_prompts=e.num_prompts)
    sampling = SamplingSpec(max_new_tokens=e.max_new_tokens or cfg.generate.max_new_tokens,
                            temperature=e.temperature, top_p=1.0 if e.temperature == 0 else cfg.generate.top_p,
                            seed=e.seed, top_k_logprobs=0, checker=cfg.data.checker,
                            system_prompt=cfg.data.system_prompt)
    spec = engine_spec(cfg, path, use_gpu, e.seed)
    if not is_teacher:  # students are served one GPU per engine, whatever the teacher's parallelism
        # ... and not pinned to the teacher's node group, where one student would hold a whole teacher pod.
        spec = replace(spec, tensor_parallel_size=1, pipeline_parallel_size=1, resources={},
                       load_format="auto" if allow_pickle else "safetensors")
    rows = apply_engine(expand_samples(prompts, e.samples, set()), spec, sampling, cfg.teacher.replicas, use_gpu,
                        cfg.teacher.batch_size, cfg.teacher.max_restarts)
    batches = list(rows.iter_batches(batch_format="pyarrow", batch_size=None))
    if not batches:
        raise ConfigError(f"no evaluation prompts were read from {e.prompts}")
    table = pa.concat_tables(batches)
    good = table.filter(pa.compute.is_null(table["skip_reason"]))
    result = score(good.to_pylist(), e.samples)
    result["skipped"] = table.num_rows - good.num_rows
    return result, good


def format_table(results: dict[str, dict[str, Any]]) -> str:
    ks = sorted({k for r in results.values() for k in r if k.startswith("pass@")}, key=lambda s: int(s[5:]))
    head = "| model | " + " | ".join(ks) + " | mean tokens | prompts |"
    lines = [head, "|" + "---|" * (len(ks) + 3)]
    for label, r in results.items():
        lines.append(f"| {label} | " + " | ".join(f"{r[k]:.1%}" for k in ks)
                     + f" | {r['mean_completion_tokens']:.1f} | {r['prompts']} |")
    return "\n".join(lines)


def evaluate(cfg: Config, student: str | None = None) -> dict[str, dict[str, Any]]:
    """Score every model on the held-out prompts; writes report.json/.md under the eval dir and prints the table."""
    import pyarrow.parquet as pq

    from ..cluster.runtime import init_ray

    if get_checker(cfg.data.checker) is None:
        raise ConfigError("evaluation needs an answer checker: set data.checker (toy, math, exact)")
    models = models_to_score(cfg, student)
    init_ray(cfg.ray)
    start = time.time()
    fs, out = filesystem(cfg.eval_dir)  # a local folder or an object-store URL, like every output
    results: dict[str, dict[str, Any]] = {}
    for label, model in models:
        result, table = evaluate_model(cfg, model, is_teacher=label == "teacher")
        results[label] = {"model": model, **result}
        makedirs(fs, out)
        name = f"samples-{label.replace(' ', '_').replace('(', '').replace(')', '')}.parquet"
        pq.write_table(table, join(out, name), filesystem=fs)
    table = format_table(results)
    _write_text(fs, join(out, "report.json"), json.dumps(results, indent=2))
    _write_text(fs, join(out, "report.md"), f"# Evaluation on {cfg.eval.prompts}\n\n{table}\n")
    _add_to_card(cfg, student, table)
    print(f"\neval: {cfg.eval.num_prompts} held-out prompts ({cfg.eval.prompts}), {cfg.eval.samples} sample(s) each, "
          f"temperature {cfg.eval.temperature}, checker {cfg.data.checker}, {time.time() - start:.0f}s\n{table}")
    return results


def _write_text(fs, path: str, text: str) -> None:
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def _add_to_card(cfg: Config, student: str | None, table: str) -> None:
    fs, folder = filesystem(student or cfg.output.student_dir)
    card = join(folder, "README.md")
    text = read_text(fs, card)
    if text is not None:
        text = text.split("\n## Evaluation\n")[0].rstrip()
        _write_text(fs, card, f"{text}\n\n## Evaluation\n\nHeld-out prompts `{cfg.eval.prompts}` "
                              f"(n={cfg.eval.num_prompts}), checker `{cfg.data.checker}`:\n\n{table}\n")
