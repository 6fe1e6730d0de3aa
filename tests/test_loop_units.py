"""Pieces of the training loop that need no Ray: the learning-rate schedule, the compute dtype, fp32 master
weights under bf16 compute, checkpoint keys and where a restored optimizer state lands."""

from __future__ import annotations

import pytest
import torch

from distill_llm.config import ConfigError, build_config
from distill_llm.student.loop import compute_dtype, lr_at


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("total,warmup", [(1, 0), (2, 0), (10, 0), (10, 3), (4, 3)])
def test_every_step_of_the_schedule_trains(schedule, total, warmup):
    """The last step's multiplier is above 0 (max_steps 1 trains); the decay is monotone and starts at 1."""
    scales = [lr_at(step, total, warmup, schedule) for step in range(1, total + 1)]
    assert all(s > 0 for s in scales), scales
    after = scales[warmup:]
    assert after[0] == 1.0 and all(a >= b for a, b in zip(after, after[1:])), scales
    if warmup:
        assert scales[:warmup] == [s / warmup for s in range(1, warmup + 1)]


def test_schedule_shape():
    assert lr_at(6, 10, 0, "linear") == pytest.approx(0.5)  # step 6 of 10: 5 of 10 decay steps done
    assert lr_at(10, 10, 0, "linear") == pytest.approx(0.1)
    assert lr_at(10, 10, 0, "cosine") == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(0.9 * torch.pi)).item()))
    assert lr_at(7, 10, 0, "constant") == 1.0


def test_compute_dtype_defaults_to_bf16_on_gpu_only():
    cfg = build_config({})
    assert compute_dtype(cfg.train) == torch.float32
    assert compute_dtype(build_config({"train": {"use_gpu": True}}).train) == torch.bfloat16
    assert compute_dtype(build_config({"train": {"dtype": "bfloat16"}}).train) == torch.bfloat16
    with pytest.raises(ConfigError, match="train.dtype"):
        build_config({"train": {"dtype": "float16"}})
    with pytest.raises(ConfigError, match="train.strategy"):
        build_config({"train": {"strategy": "zero3"}})
