"""The student model: load, wrap with LoRA, compute the loss, merge and save a Hugging Face folder. No Ray."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, LoraSettings
from .losses import KDSettings, distill_loss


def load_student(path: str, dtype: torch.dtype, revision: str | None = None, trust_remote_code: bool = False,
                 gradient_checkpointing: bool = False, allow_pickle: bool = False,
                 max_position_embeddings: int | None = None):
    """A causal LM from a local folder or hub id; safetensors only unless ``allow_pickle`` (pickle runs code).

    ``max_position_embeddings`` replaces the config's (student.max_position_embeddings); the saved config keeps it.
    """
    from transformers import AutoModelForCausalLM

    extra = {} if max_position_embeddings is None else {"max_position_embeddings": max_position_embeddings}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code,
                                                     dtype=dtype, use_safetensors=not allow_pickle, **extra)
    except OSError as err:
        raise ConfigError(f"cannot load student model {path}: {err}") from None
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def add_lora(model, lora: LoraSettings):
    """Wrap with a peft LoRA adapter; a target list that matches no module is a ConfigError."""
    from peft import LoraConfig, get_peft_model

    conf = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM")
    try:
        wrapped = get_peft_model(model, conf)
    except ValueError as err:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"student.lora.target_modules={lora.target_modules!r} matched no layer of the "
                          f"student ({err}); linear layers are named {names}") from None
    return wrapped  # 'all-linear' leaves lm_head out on purpose: it stays frozen


def check_lora_targets(path: str, lora: LoraSettings, revision: str | None = None,
                       trust_remote_code: bool = False) -> None:
    """Apply the LoRA config to a weightless (meta-device) copy of the student: fails fast on the driver."""
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(conf, trust_remote_code=trust_remote_code)
    add_lora(skeleton, lora)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


class StudentWithLoss(nn.Module):
    """The student and the chunked distillation loss in one module, so DDP sees one forward.

    The causal LM runs without its head; the loss applies the output embedding chunk by chunk
    at completion positions only, so full-batch logits never exist.
    """

    def __init__(self, model, settings: KDSettings):
        super().__init__()
        self.model, self.settings = model, settings
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.backbone = base.get_decoder() if hasattr(base, "get_decoder") else base.model
        self.head = base.get_output_embeddings()

    def forward(self, input_ids, gather_index, targets, attention_mask=None, topk_ids=None, topk_logprobs=None,
                normalizer: float | None = None, position_ids=None, kd_weights=None) -> dict[str, torch.Tensor]:
        """A packed batch (batching.build_batch with pack=True) has no attention mask and position ids that
        restart at every sequence: transformers then keeps attention inside each sequence."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, gather_index)
        out = distill_loss(flat, self.head.weight, targets, topk_ids, topk_logprobs, self.settings, normalizer,
                           kd_weights)
        if gather_index.numel() == 0:  # keep every parameter in the graph so DDP's reducer stays in step
            out["loss"] = out["loss"] + 0.0 * (hidden.sum() + self.head.weight.sum())
        return out


PACKED_ATTENTION = "distill_llm_packed_sdpa"


def _packed_mask(*args, attention_mask=None, **kwargs):
    """No dense mask for a packed batch (no padding mask: packed_sdpa_attention splits it by position ids);
    SDPA's own mask otherwise."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          is_causal=None, **kwargs):
    """transformers attention over a packed batch: causal SDPA on each sequence of each row on its own.

    A packed row's sequences start where its position ids restart at 0. Attending within each segment costs
    the sum of the squared lengths, where a block-diagonal mask over the row costs the row length squared
    (and builds the dense mask). Batches with a padding mask or no position ids go to transformers' SDPA.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    positions = kwargs.get("position_ids")
    if attention_mask is not None or positions is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    length = query.shape[2]
    rows = []
    for r in range(query.shape[0]):
        starts = sorted({0, *(positions[r] == 0).nonzero().flatten().tolist()})
        bounds = list(zip(starts, starts[1:] + [length]))
        rows.append(torch.cat([nn.functional.scaled_dot_product_attention(
            query[r:r + 1, :, a:b], key[r:r + 1, :, a:b], value[r:r + 1, :, a:b], dropout_p=dropout,
            is_causal=True, scale=scaling) for a, b in bounds], dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def use_packed_attention(model) -> bool:
    """train.packing: a student on transformers' SDPA attends per packed sequence (packed_sdpa_attention)
    instead of through a dense block-diagonal mask; True when switched. flash-attention and other
    implementations are kept (flash-attention's varlen path already works per sequence)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, _packed_mask)
    base.set_attn_implementation(PACKED_ATTENTION)
    return True


def decoder_layers(model) -> list[nn.Module]:
    """The student's repeated blocks (the classes its ``_no_split_modules`` names): FSDP's units."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"train.strategy=fsdp: cannot find the decoder layers of {type(base).__name__} "
                          "(it names no _no_split_modules); use train.strategy=ddp")
    return layers


def place_model(student, settings: KDSettings, strategy: str, dtype: torch.dtype, device: torch.device,
                world: int) -> nn.Module:
    """StudentWithLoss on ``device``: DDP replicas, or FSDP2 shards (one unit per decoder layer plus the root).

    Parameters stay in the dtype they were loaded in (fp32: the master weights). Under FSDP, ``dtype`` is the
    compute dtype of the gathered parameters and gradients are reduced in fp32; under DDP the caller runs
    the forward under autocast (``compute_context``). Needs torch.distributed initialised when world > 1
    or strategy is fsdp.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)  # FSDP's default device mesh and NCCL use the current device
    module = StudentWithLoss(student, settings).to(device)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for layer in decoder_layers(student):
            fully_shard(layer, mp_policy=policy)
        fully_shard(module, mp_policy=policy)
        return module
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    return module


def compute_context(strategy: str, dtype: torch.dtype, device: torch.device):
    """Autocast to ``dtype`` over fp32 parameters (DDP); FSDP casts through its MixedPrecisionPolicy instead."""
    import contextlib

    if strategy == "fsdp" or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def save_hf_folder(model, tokenizer, out_dir: str | Path, merge_lora: bool = True,
                   card: str | None = None, extra_files: dict[str, Any] | None = None) -> Path:
    """Write a folder that transformers and vLLM load as is: merged weights (safetensors), tokenizer, card.

    With LoRA the adapter is kept beside the merged weights under ``adapter/``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config"):
        model.save_pretrained(str(out / "adapter"), safe_serialization=True)
        if merge_lora:
            model = model.merge_and_unload()
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    if getattr(model, "generation_config", None) is not None:
        gen = model.generation_config
        gen.eos_token_id = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
        gen.save_pretrained(str(out))
    if card:
        (out / "README.md").write_text(card)
    for name, obj in (extra_files or {}).items():
        (out / name).write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=2))
    return out
