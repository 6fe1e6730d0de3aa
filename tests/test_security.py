"""Security defaults: pickled weights refused unless opted in, remote code off, Ray bound to loopback."""

import pytest

from distill_llm.config import ConfigError, load_config
from distill_llm.paths import check_weights_format


@pytest.fixture(scope="module")
def pickled_model(tmp_path_factory):
    """A tiny Qwen2 saved as pytorch_model.bin only (what an old or untrusted upload looks like)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("pickled")
    conf = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=64)
    conf.save_pretrained(folder)  # transformers 5 no longer writes pickles itself
    torch.save(Qwen2ForCausalLM(conf).state_dict(), folder / "pytorch_model.bin")
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    return folder


def test_pickled_weights_are_refused_unless_opted_in(pickled_model):
    with pytest.raises(ConfigError, match=r"pickle files \(pytorch_model.bin\).*teacher.allow_pickle_weights=true"):
        check_weights_format(str(pickled_model), False, "teacher.allow_pickle_weights")
    check_weights_format(str(pickled_model), True, "teacher.allow_pickle_weights")  # opted in: no error


def test_student_loader_reads_safetensors_only(pickled_model):
    import torch

    from distill_llm.student.model import load_student

    with pytest.raises(ConfigError, match="cannot load student model"):
        load_student(str(pickled_model), torch.float32)
    assert load_student(str(pickled_model), torch.float32, allow_pickle=True) is not None


def test_training_and_generation_refuse_a_pickled_model_before_ray_starts(pickled_model, tmp_path):
    from distill_llm.teacher.stage import generate
    from distill_llm.student.stage import train

    cfg = load_config(None, [f"teacher.model={pickled_model}", f"output.dir={tmp_path / 'shards'}"])
    with pytest.raises(ConfigError, match="teacher.allow_pickle_weights"):
        generate(cfg)
    cfg = load_config(None, [f"student.model={pickled_model}", f"output.dir={tmp_path / 'shards'}"])
    with pytest.raises(ConfigError, match="student.allow_pickle_weights"):
        train(cfg)


def test_secure_defaults():
    cfg = load_config(None)
    assert not cfg.teacher.trust_remote_code and not cfg.student.trust_remote_code
    assert not cfg.teacher.allow_pickle_weights and not cfg.student.allow_pickle_weights
    assert cfg.ray.dashboard_host == "127.0.0.1"
