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


def _student(lora=None, seed: int = 0):
    from distill_llm.config import LoraSettings
    from distill_llm.paths import resolve_model
    from distill_llm.student.model import add_lora, load_student

    torch.manual_seed(seed)
    model = load_student(resolve_model("toy-student"), torch.float32)
    return add_lora(model, LoraSettings(**lora)) if lora else model


def _one_step(student, dtype: torch.dtype, lr: float = 1e-5):
    """One optimizer step of the loop (placement, accumulation, schedule, AdamW) on a fixed batch."""
    from distill_llm.student.loop import _step, accumulate
    from distill_llm.student.losses import KDSettings
    from distill_llm.student.model import compute_context, place_model
    from test_train_loop import _micro, rows_table

    t = build_config({"train": {"lr": lr, "lr_schedule": "constant", "max_grad_norm": None}}).train
    device = torch.device("cpu")
    model = place_model(student, KDSettings(alpha=0.5, temperature=2.0), "ddp", dtype, device, 1)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr)
    means, _ = accumulate(model, _micro(rows_table(), 4), device, compute_context("ddp", dtype, device))
    _step(optimizer, params, 1, 1, t, means)
    return optimizer


def _moved(before: dict, student) -> torch.Tensor:
    return torch.cat([(p.detach().float() - before[n].float()).flatten() for n, p in student.named_parameters()])


def test_bf16_compute_updates_fp32_master_weights_like_an_fp32_run():
    """At lr 1e-5 a bf16 parameter cannot take most updates (its spacing near 0.02 is ~1e-4); with bf16
    compute over fp32 master weights the parameters move as in an all-fp32 run."""
    deltas = {}
    for name, dtype in (("fp32", torch.float32), ("bf16_compute", torch.bfloat16)):
        student = _student()
        before = {n: p.detach().clone() for n, p in student.named_parameters()}
        optimizer = _one_step(student, dtype)
        assert all(p.dtype == torch.float32 for p in student.parameters()), "master weights stay fp32"
        assert all(v.dtype == torch.float32 for s in optimizer.state.values() for v in s.values() if v.dim())
        deltas[name] = _moved(before, student)
    ref, bf16 = deltas["fp32"], deltas["bf16_compute"]
    moved = ref.abs() > 5e-6
    assert moved.float().mean() > 0.9
    assert (bf16.abs() > 5e-6).float().mean() > 0.95 * moved.float().mean()
    assert (torch.sign(bf16[moved]) == torch.sign(ref[moved])).float().mean() > 0.9, "same direction"

    pure = _student().to(torch.bfloat16)  # the old GPU path: bf16 parameters updated in place
    before = {n: p.detach().clone() for n, p in pure.named_parameters()}
    _one_step(pure, torch.float32)
    assert (_moved(before, pure) == 0).float().mean() > 0.5, "a pure-bf16 update leaves most weights unchanged"


def test_checkpoint_round_trip_and_optimizer_state_where_the_parameters_are(tmp_path):
    from distill_llm.student.checkpoint import restore_state, save_state

    student = _student()
    optimizer = _one_step(student, torch.float32, lr=1e-3)
    save_state(student, optimizer, tmp_path)
    fresh = _student(seed=1)
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-3)
    restore_state(fresh, fresh_opt, tmp_path)
    for (name, a), b in zip(student.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name
    by_param = dict(zip(fresh.parameters(), fresh_opt.state.values()))
    assert len(by_param) == len(list(fresh.parameters()))
    for param, state in by_param.items():
        assert state["exp_avg"].device == param.device and state["exp_avg"].dtype == torch.float32
        assert state["exp_avg"].shape == param.shape


def test_restore_into_another_student_names_the_keys(tmp_path):
    """A checkpoint whose parameters do not match (another student or LoRA setting) is an error naming them,
    never a silent resume from the base weights (the old restore used load_state_dict(strict=False))."""
    from distill_llm.student.checkpoint import restore_state, save_state

    save_state(_student(), None, tmp_path)
    with pytest.raises(ConfigError, match=r"missing from it \['base_model\.model\..*lora_A"):
        restore_state(_student(lora={"r": 4, "alpha": 8}), None, tmp_path)
    with pytest.raises(ConfigError, match="older version"):
        restore_state(_student(), None, tmp_path / "nothing")


def test_export_reads_a_lora_checkpoint_into_a_peft_model(tmp_path):
    """checkpoint_model (what the export saves) rebuilds the base + adapter from a checkpoint that holds only the
    adapter, in the base's dtype."""
    from distill_llm.paths import resolve_model
    from distill_llm.student.checkpoint import checkpoint_model, save_state

    student = _student(lora={"r": 4, "alpha": 8})
    optimizer = _one_step(student, torch.float32, lr=1e-2)
    save_state(student, optimizer, tmp_path)
    cfg = build_config({"student": {"model": "toy-student", "lora": {"r": 4, "alpha": 8}}})
    model = checkpoint_model(tmp_path, resolve_model("toy-student"), cfg.student)
    assert hasattr(model, "peft_config")
    trained = dict(student.named_parameters())
    lora = [(n, p) for n, p in model.named_parameters() if "lora_B" in n]
    assert lora and all(torch.equal(p, trained[n]) and p.abs().sum() > 0 for n, p in lora)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the toy student is stored in fp32


@pytest.mark.parametrize("vocab, chunk", [(151936, 512), (152064, 512), (129280, 512), (32000, 2048),
                                          (262144, 256), (128, 8192), (10**7, 64)])
def test_loss_chunk_is_sized_from_the_vocabulary(vocab, chunk):
    """An unset train.loss_chunk_size holds about 2^26 logits per chunk (the bench found 256-512 right for a
    152k vocabulary), within 64..8192 positions; an explicit value is kept."""
    from distill_llm.student.loop import kd_settings
    from distill_llm.student.losses import default_chunk_size

    assert default_chunk_size(vocab) == chunk
    assert kd_settings(build_config({}).train, vocab).chunk_size == chunk
    assert kd_settings(build_config({"train": {"loss_chunk_size": 2048}}).train, vocab).chunk_size == 2048
