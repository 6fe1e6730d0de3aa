"""Smoke test of the benchmark scripts at tiny sizes: each runs and prints its table.

bench/generate.py and bench/memory.py start vLLM engines (a minute each on CPU) and are exercised by the
recorded runs in bench/RESULTS.md instead.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Each case starts a fresh interpreter (torch, transformers): 20-40 s per test on 2 idle cores.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def run_script(name: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / name), *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_storage_bench_prints_bytes_per_token_and_kd_error():
    out = run_script("storage.py", "--no-toy", "--synthetic-rows", "2", "--levels", "3")
    assert "| data | k | option |" in out
    for k in (8, 20, 64):
        assert f"| synthetic | {k} | current (ShardWriter: zstd-3 bss ids) | v1 |" in out
    assert "| synthetic | 20 | zstd-3 bss ids, u8-lin20 | changes |" in out


def test_train_bench_compares_ours_and_naive():
    out = run_script("train.py", "--shape", "toy-student", "--modes", "full", "--batch", "1", "--seq", "32",
                     "--prompt-len", "8", "--steps", "1", "--loss-n", "64", "--loss-vocab", "512", "--no-data-wait")
    assert "| full | ours |" in out and "| full | naive |" in out
    assert "| 512 | 64 | ours |" in out and "| 512 | 64 | naive |" in out
    assert "exit " not in out and "timed out" not in out, out  # run_case's error cells
