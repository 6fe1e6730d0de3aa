"""Shared by the benchmark scripts: machine description, tables, model shapes, memory high-water marks.

Scripts run as ``PYTHONPATH=$PWD python bench/<name>.py``; this file sits beside them on sys.path.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
QWEN_VOCAB = 151_936

# Qwen2.5 shapes as published on the hub (config.json), for random-weight models; "tiny-qwen" keeps
# the real vocabulary with a 2-layer body so CPU runs see realistic logits/top-k costs.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny-qwen": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=64, tie_word_embeddings=True),
    # >= 50M parameters, most of them the two untied 152k-row embeddings (the FSDP vs DDP memory bench)
    "qwen-82m": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, tie_word_embeddings=False),
}


def qwen_config(shape: str):
    """A Qwen2Config of ``shape`` with the Qwen vocabulary; token ids of the toy tokenizer as specials."""
    from transformers import Qwen2Config

    from distill_llm.toy import build_tokenizer

    tok = build_tokenizer()
    return Qwen2Config(vocab_size=QWEN_VOCAB, max_position_embeddings=32768, rope_theta=1_000_000.0,
                       rms_norm_eps=1e-6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       bos_token_id=None, **SHAPES[shape])


def model_folder(shape: str, root: Path) -> str:
    """A config-only model folder (plus the toy tokenizer) for vLLM's ``load_format=dummy`` random weights.

    The toy tokenizer covers the first ~100 ids; the rest decode to nothing, which only shortens
    ``completion_text`` (token ids, top-k and throughput are what is measured).
    """
    from distill_llm.toy import build_tokenizer

    path = root / f"{shape}-random"
    if not (path / "config.json").is_file():
        path.mkdir(parents=True, exist_ok=True)
        qwen_config(shape).save_pretrained(str(path))
        build_tokenizer(path)
    return str(path)


def machine() -> dict[str, Any]:
    """What a results table needs to be read later: machine, date, versions, load."""
    info: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                            "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")),
                           platform.processor())
    except (OSError, subprocess.SubprocessError):
        info["cpu"] = platform.processor()
    try:
        info["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    for name in ("vllm", "ray", "torch", "pyarrow", "transformers", "peft"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # a missing package is worth a cell, not a crash
            info[name] = "-"
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception:
        info["gpu"] = "none"
    info["load_avg"] = load_average()
    return info


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def header(title: str, info: dict[str, Any]) -> str:
    return (f"## {title}\n\n{info['date']}; {info['cores']} cores ({info['cpu']}), {info.get('mem_gib', '?')} GiB, "
            f"GPU {info['gpu']}; vllm {info['vllm']}, ray {info['ray']}, torch {info['torch']}, "
            f"pyarrow {info['pyarrow']}, transformers {info['transformers']}, peft {info['peft']}; "
            f"load average at start {info['load_avg']}\n")


def table(rows: list[dict[str, Any]], columns: Iterable[str]) -> str:
    """A Markdown table; floats get a sensible number of digits."""
    cols = list(columns)

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else (f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}")
        return f"{v:,}" if isinstance(v, int) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def run_case(script: str, case: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run ``script --case JSON`` in a fresh interpreter (so its memory high-water mark is its own);
    returns the JSON of its last ``RESULT`` line, or an ``error`` entry with the tail of its output."""
    cmd = [sys.executable, str(Path(__file__).parent / script), "--case", json.dumps(case)]
    # Large blocks always mmap'd, so a freed tensor leaves the RSS and RSS tracks live memory.
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ, "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timed out after {timeout:.0f}s"}
    results = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**case, "error": f"exit {proc.returncode}: " + " / ".join(tail)[-300:]}
    return json.loads(results[-1][len("RESULT "):])


def emit(result: dict[str, Any]) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def append_results(path: str | None, text: str) -> None:
    """Print a finished section and, with ``--results FILE``, append it there too."""
    print(text, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(text.rstrip() + "\n\n")


def scaling_runs(script: str, size_key: str, sizes: Iterable[int], extra: dict[str, Any],
                 timeout: float = 1800) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run ``script``'s case once per size (in a fresh process each) and add a growth row.

    Returns (every row, growth row included; the rows that did not fail). The growth row gives the last
    size over the first and each ``... MiB`` column's ratio, so "flat as the input grows 10x" reads off it.
    """
    rows = []
    for n in sizes:
        rows.append(run_case(script, {size_key: n, **extra}, timeout=timeout))
        print(rows[-1], flush=True)
    ok = [r for r in rows if "error" not in r]
    if len(ok) >= 2:
        first, last = ok[0], ok[-1]
        rows.append({size_key: f"x{last[size_key] / first[size_key]:g}",
                     **{k: f"x{last[k] / max(first[k], 1e-9):.2f}" for k in first if k.endswith("MiB")}})
    return rows, ok

