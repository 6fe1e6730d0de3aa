"""train.qat: torchao fake quantisation during distillation that matches `distill-llm quantize`'s rounding.

The tests hold the fake quantisers against the quantise stage's own compressed-tensors rounding on the toy
student, build the worker's student with qat and run a few optimizer steps through the training module and
the real checkpoint/export functions, and check the refusals. All fast: no Ray (the quickstart comparison in
bench/RESULTS.md ran the whole stage).
"""

import json
from pathlib import Path

import pytest
import torch

from distill_llm.config import ConfigError, build_config


def _toy_student():
    from transformers import AutoModelForCausalLM

    from distill_llm import registry

    path = str(registry.model("toy-student").path())
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _pair(scheme, group_size):
    """(the quantise stage's model, a prepared student) from the same toy student, weights spread out (the toy
    student's initialisation repeats few magnitudes) and the extreme of each group or channel made positive.

    Why positive: a symmetric scale puts a group's extreme exactly half a step past the grid's end (|w| / scale
    = 7.5 or 127.5). Positive, both libraries clamp it to the top value; negative, it is a rounding tie that
    torchao (w * (1 / scale)) and compressed-tensors (w / scale) may break apart by a float ulp (-8 against -7),
    one weight per group at most (README, "Quantise").
    """
    from distill_llm.quantize.qat import prepare
    from distill_llm.quantize.stage import apply_scheme, linear_widths

    _, reference = _toy_student()
    _, student = _toy_student()
    torch.manual_seed(0)
    layers = linear_widths(reference)
    with torch.no_grad():
        for (name, ref), mine in zip(reference.named_parameters(), student.parameters()):
            ref.add_(torch.randn_like(ref) * ref.std().clamp(min=0.02))
            if name.removesuffix(".weight") in layers:
                groups = ref.view(ref.shape[0], -1, group_size if scheme == "w4a16" else ref.shape[1])
                top = groups.abs().argmax(-1, keepdim=True)
                groups.scatter_(-1, top, groups.gather(-1, top).abs())
            mine.copy_(ref)
    apply_scheme(reference, scheme, group_size)
    return reference, student, prepare(student, scheme, group_size)


@pytest.mark.parametrize("scheme, group_size", [("w4a16", 32), ("w4a16", 64), ("w8a8-int8", 128)])
def test_fake_quantised_weights_equal_the_quantize_stage_rounding(scheme, group_size):
    """Every fake-quantised weight is the quantise stage's quantize-then-dequantize of it (same scale, same
    rounding), and only the layers the stage quantises are prepared."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    from distill_llm.quantize.stage import linear_widths

    reference, student, layers = _pair(scheme, group_size)
    prepared = {n: m for n, m in student.named_modules() if type(m).__name__ == "FakeQuantizedLinear"}
    assert layers == len(prepared) > 0
    assert set(prepared) == set(linear_widths(reference)) and "lm_head" not in prepared
    for name, module in reference.named_modules():
        if name not in prepared:
            continue
        args = module.quantization_scheme.weights
        expected = fake_quantize(module.weight, module.weight_scale, module.weight_zero_point, args)
        got = prepared[name].weight_fake_quantizer(prepared[name].weight)
        assert not torch.equal(got, module.weight)  # it really rounds
        assert torch.allclose(got, expected, rtol=0, atol=1e-7), (name, (got - expected).abs().max())
        assert len(got[0].unique()) <= (16 if args.num_bits == 4 else 256) * (got.shape[1] // (
            group_size if scheme == "w4a16" else got.shape[1]))  # at most 2^bits values per group


def test_fake_quantised_forward_is_the_quantised_models():
    """w4a16 (weights only): the prepared student's logits are the quantise stage's quantised model's."""
    reference, student, _ = _pair("w4a16", 32)
    ids = torch.randint(0, student.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = reference(input_ids=ids).logits, student(input_ids=ids).logits
        for module in reference.modules():
            if hasattr(module, "quantization_scheme"):
                module.quantization_enabled = False
        unquantised = reference(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-5), (got - want).abs().max()
    assert (unquantised - want).abs().max() > 1e-2  # the rounding is what is compared


def test_qat_train_steps_update_weights_and_export_plain_linear_layers(tmp_path):
    """The worker's student with train.qat (loop.build_student: 2 decoder layers x 7 linear layers), a few
    optimizer steps of the real training module, saved and exported through the real checkpoint functions:
    the folder loads with transformers as plain nn.Linear, the weights unrounded."""
    from transformers import AutoModelForCausalLM

    from distill_llm.student.checkpoint import checkpoint_model, save_state
    from distill_llm.student.loop import build_student
    from distill_llm.student.losses import KDSettings
    from distill_llm.student.model import StudentWithLoss, save_hf_folder
    from distill_llm.tokenizers import load_tokenizer

    path, _ = _toy_student()
    cfg = build_config({"student": {"model": path, "lora": None}, "train": {"qat": "w4a16"},
                        "quantize": {"schemes": ["w4a16"], "group_size": 32}})
    student, layers = build_student(cfg, path)  # what each Ray Train worker trains
    assert layers == 14 and type(student.model.layers[0].mlp.down_proj).__name__ == "FakeQuantizedLinear"
    student.train()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    module = StudentWithLoss(student, KDSettings(alpha=0.0))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    ids = torch.randint(0, student.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    gather = torch.arange(2 * 16 - 1)
    targets = ids.reshape(-1)[1:]
    for _ in range(3):
        loss = module(input_ids=ids, gather_index=gather, targets=targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(student.get_parameter(name), before[name])  # the straight-through gradient reached it
    save_state(student, optimizer, tmp_path / "ckpt")
    exported = save_hf_folder(checkpoint_model(tmp_path / "ckpt", path, cfg.student), load_tokenizer(path),
                              tmp_path / "student")
    assert "quantization_config" not in json.loads((exported / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32)
    kinds = {type(m).__name__ for m in loaded.modules() if "Linear" in type(m).__name__}
    assert kinds == {"Linear"}
    assert torch.equal(loaded.get_parameter(name), student.get_parameter(name).detach())  # the fp32 latent weights


@pytest.mark.parametrize("tree, message", [
    ({"train": {"qat": "fp8-dynamic"}}, "train.qat: Input should be 'w8a8-int8' or 'w4a16'"),
    ({"train": {"qat": "w4a16"}, "student": {"lora": None}},
     r"train.qat=w4a16 trains for a scheme `quantize` will not write \(there is no quantize section\)"),
    ({"train": {"qat": "w4a16"}, "student": {"lora": None}, "quantize": {"schemes": ["w8a8-int8"]}},
     r"train.qat=w4a16 trains for a scheme `quantize` will not write \(quantize.schemes=\['w8a8-int8'\]\)"),
    ({"train": {"qat": "w4a16"}, "quantize": {"schemes": ["w4a16"]}}, "train.qat=w4a16 with student.lora"),
    ({"train": {"qat": "w8a8-int8", "strategy": "fsdp"}, "student": {"lora": None},
      "quantize": {"schemes": ["w8a8-int8"]}}, "train.qat=w8a8-int8 is built and tested with train.strategy=ddp"),
])
def test_bad_qat_settings_are_refused_naming_train_qat(tree, message):
    with pytest.raises(ConfigError, match=message):
        build_config(tree)


def test_qat_config_that_can_run_is_accepted():
    cfg = build_config({"train": {"qat": "w4a16"}, "student": {"lora": None}, "quantize": {"schemes": ["w4a16"]}})
    assert cfg.train.qat == "w4a16" and build_config({}).train.qat is None


def test_qat_group_size_that_does_not_divide_a_layer_is_refused_before_training():
    from distill_llm.student.stage import check_qat

    path, _ = _toy_student()
    cfg = build_config({"student": {"model": path, "lora": None}, "train": {"qat": "w4a16"},
                        "quantize": {"schemes": ["w4a16"], "group_size": 128}})
    with pytest.raises(ConfigError, match=r"quantize.group_size=128 does not divide the input width 64"):
        check_qat(cfg, path)
    cfg.quantize.group_size = 32
    check_qat(cfg, path)


def test_run_refuses_qat_with_lora_before_the_teacher_starts(tmp_path, capsys):
    from distill_llm.cli import main

    config = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
    code = main(["run", str(config), f"output.dir={tmp_path / 'shards'}", "train.qat=w4a16",
                 "quantize.schemes=[w4a16]", "student.lora.r=8"])
    assert code == 2 and "train.qat=w4a16 with student.lora" in capsys.readouterr().err
    assert not (tmp_path / "shards").exists()



def test_importing_torchao_after_the_package_prints_no_warning():
    """transformers and vLLM import torchao in every process of a run; on a machine without CUDA its import
    warned that its CUDA kernels do not load (and torch about its enums), lines that read as errors in every
    log. Each process imports this package first, which quiets those loggers."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import distill_llm, torchao"], capture_output=True, text=True,
                         check=True)
    assert "Failed to load" not in out.stderr and "_pytree" not in out.stderr, out.stderr
