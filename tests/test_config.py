from pathlib import Path

import pytest

from distill_llm.config import ConfigError, build_config, load_config, parse_overrides

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_valid():
    cfg = build_config({})
    assert cfg.teacher.model == "toy-teacher" and cfg.generate.top_k_logprobs == 20
    assert cfg.shard_dirs == [cfg.output.dir]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_names_its_command(path):
    load_config(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "distill-llm" in first, "a config opens with the command that runs it"


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError) as err:
        build_config({"train": {"alhpa": 0.3}})
    assert "train.alhpa: unknown key" in str(err.value) and "train.alpha" in str(err.value)


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match="trian: unknown key"):
        build_config({"trian": {}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["generate.max_new_tokens=lots"])
    assert "generate.max_new_tokens" in str(err.value) and "lots" in str(err.value)


def test_out_of_range_and_bad_choice():
    with pytest.raises(ConfigError, match="train.alpha"):
        load_config(None, ["train.alpha=1.5"])
    with pytest.raises(ConfigError, match="train.divergence"):
        load_config(None, ["train.divergence=hellinger"])


def test_overrides_are_yaml_scalars_and_nest():
    tree = parse_overrides(["train.alpha=0.25", "student.lora=null", "eval.models=[a,b]", "data.prompts=x.jsonl"])
    assert tree == {"train": {"alpha": 0.25}, "student": {"lora": None}, "eval": {"models": ["a", "b"]},
                    "data": {"prompts": "x.jsonl"}}
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["train.alpha=0.25", "student.lora=null"])
    assert cfg.train.alpha == 0.25 and cfg.student.lora is None


def test_malformed_override():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_overrides(["train.alpha"])


def test_kd_without_topk_is_refused_up_front():
    with pytest.raises(ConfigError, match="top_k_logprobs"):
        load_config(None, ["generate.top_k_logprobs=0", "train.alpha=0.5"])
    load_config(None, ["generate.top_k_logprobs=0", "train.alpha=0"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_cli_reports_config_errors_without_traceback(capsys):
    from distill_llm.cli import main

    assert main(["config", str(ROOT / "configs" / "quickstart.yaml"), "train.lr=fast"]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "Traceback" not in err
    assert main(["config", "train.lr=0.1"]) == 0
