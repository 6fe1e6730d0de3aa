"""Training checkpoints: sharded (torch.distributed.checkpoint), read back on any worker count and for the export.

A checkpoint folder holds ``weights/`` (DCP: the trainable parameters in fp32 and the AdamW state, one file per
worker plus ``.metadata``), ``trainer_state.json`` and ``metrics.jsonl``. Under FSDP every worker writes its own
shard; under DDP the replicas are written once. Loading re-shards to the reader's layout: a run saved by 2 FSDP
workers resumes on 1, and the export reads it in a single process. Frozen parameters (a LoRA student's base)
are not saved: they come from the base model. No Ray.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..config import ConfigError

WEIGHTS = "weights"


def _options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def _state(student, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(student, options=_options())}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(student, optimizer, options=_options())
    return state


def save_state(student, optimizer, directory: Path) -> None:
    """Write the trainable weights and optimizer state under ``directory/weights`` (every worker calls this)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(student, optimizer), checkpoint_id=str(Path(directory) / WEIGHTS))


def saved_keys(directory: Path) -> set[str]:
    """Parameter names stored in a checkpoint folder."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(Path(directory) / WEIGHTS)).read_metadata()
    return {k[len("model."):] for k in meta.state_dict_metadata if k.startswith("model.")}


def check_keys(student, directory: Path) -> None:
    """A checkpoint whose parameter names differ from the student's is an error naming them (never a silent
    resume from the base weights)."""
    if not (Path(directory) / WEIGHTS / ".metadata").is_file():
        raise ConfigError(f"checkpoint {directory} has no {WEIGHTS}/ folder: it was written by an older version of "
                          "distill-llm; start a new run (train.resume=false or another train.run_name)")
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    expected = set(get_model_state_dict(student, options=_options()))
    saved = saved_keys(directory)
    if saved != expected:
        missing, unexpected = sorted(expected - saved), sorted(saved - expected)
        raise ConfigError(f"checkpoint {directory} does not match the student: {len(missing)} parameter(s) missing "
                          f"from it {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}; was it written "
                          "for another student.model or student.lora? Start a new run (train.resume=false)")


def restore_state(student, optimizer, directory: Path) -> None:
    """Load weights and optimizer state into a student that is already placed (on its device, sharded).

    Restoring after placement puts AdamW's state where the parameters are (GPU, DTensor shards); every
    tensor is read into the placed state dict, so nothing lands on another rank's device.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    check_keys(student, directory)
    state = _state(student, optimizer)
    dcp.load(state, checkpoint_id=str(Path(directory) / WEIGHTS))
    # not strict: the frozen parameters (a LoRA base) are not in a checkpoint by design; check_keys above has
    # already refused any difference in the trainable ones
    set_model_state_dict(student, state["model"], options=_options(strict=False))
    if optimizer is not None:
        set_optimizer_state_dict(student, optimizer, state["optim"], options=_options())


def base_dtype(path: str, revision: str | None = None, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype the student's base is stored in (config.json), fp32 when it says nothing."""
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    dtype = getattr(conf, "dtype", None) or getattr(conf, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def checkpoint_model(directory: Path, student_path: str, student_cfg):
    """A checkpoint folder -> the trained Hugging Face model (a PeftModel for LoRA) in the base's dtype, on CPU.

    ``student_cfg`` is the run's StudentConfig. Reads a checkpoint of any worker count and strategy in one
    process; this is what the export saves.
    """
    from .model import add_lora, load_student

    student = load_student(student_path, torch.float32, student_cfg.revision, student_cfg.trust_remote_code,
                           allow_pickle=student_cfg.allow_pickle_weights,
                           max_position_embeddings=student_cfg.max_position_embeddings)
    if student_cfg.lora is not None:
        student = add_lora(student, student_cfg.lora)
    with warnings.catch_warnings():  # one process, no process group: what DCP warns about is intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        restore_state(student, None, Path(directory))
    return student.to(base_dtype(student_path, student_cfg.revision, student_cfg.trust_remote_code))
