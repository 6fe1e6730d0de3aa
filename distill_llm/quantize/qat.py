"""Quantisation-aware distillation (``train.qat``): torchao's fake quantisers on the student's linear layers.

The fake quantisation is the weight rounding ``distill-llm quantize`` will then apply with the same scheme:
bits, granularity (one scale per output channel, or per group of ``quantize.group_size`` input columns) and
symmetry are read from the scheme's compressed-tensors preset (schemes.py), and the scale is the same
max(|min|, |max|) / ((qmax - qmin) / 2) of each channel or group, recomputed from the current weights at every
forward. Gradients pass the rounding straight through (torchao), so the fp32 weights learn to sit well on
the grid. The layers skipped are the ones ``quantize`` skips (schemes.IGNORED: lm_head; embeddings and norms
are no linear layers). w8a8-int8's per-token int8 activations are not simulated: torchao's QAT has no
symmetric per-token activation quantiser, so only that scheme's int8 weights are.

A prepared layer keeps the state-dict keys of ``nn.Linear`` (``weight``, ``bias``): checkpoints hold the
plain fp32 weights, and the export, which loads them into a fresh transformers model, writes an ordinary
Hugging Face folder: that is torchao's convert step (``QATConfig(step="convert")`` without a base config
swaps the layers back to ``nn.Linear`` with the same weights), done by loading instead of swapping.
"""

from __future__ import annotations

from .schemes import IGNORED, SCHEMES


def fake_quantize_config(name: str, group_size: int):
    """torchao's IntxFakeQuantizeConfig for the weights of scheme ``name`` (its compressed-tensors preset)."""
    import torch
    from compressed_tensors.quantization import QuantizationStrategy, preset_name_to_scheme
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    args = preset_name_to_scheme(SCHEMES[name].preset, ["Linear"]).weights
    if args.type != "int" or args.num_bits not in (4, 8):
        raise ValueError(f"{name}: no integer fake quantiser for {args.num_bits}-bit {args.type} weights")
    if args.strategy == QuantizationStrategy.GROUP:
        granularity = PerGroup(group_size)
    elif args.strategy == QuantizationStrategy.CHANNEL:
        granularity = PerAxis(0)
    else:
        raise ValueError(f"{name}: weight strategy {args.strategy} has no fake quantiser here")
    dtype = torch.int4 if args.num_bits == 4 else torch.int8
    return IntxFakeQuantizeConfig(dtype, granularity, is_symmetric=args.symmetric)


def quantised_layer(module, name: str) -> bool:
    """The linear layers ``quantize`` rounds: every ``nn.Linear`` but the ignored ones (lm_head)."""
    from torch import nn

    return isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in IGNORED


def prepare(model, name: str, group_size: int) -> int:
    """Swap the quantised linear layers of ``model`` for torchao FakeQuantizedLinear in place; returns how many."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(weight_config=fake_quantize_config(name, group_size), step="prepare"),
              filter_fn=lambda module, fqn: quantised_layer(module, fqn))
    return sum(type(m).__name__ == "FakeQuantizedLinear" for m in model.modules())

