"""Secrets stay out of what a job hands Ray and of every location it records (fast; the end-to-end search
over every written byte is in test_s3.py)."""

import pytest

from conftest import small_config
from distill_llm.config import ConfigError


def test_runtime_env_forwards_settings_but_never_secrets():
    from distill_llm.cluster.runtime import forwarded_env

    env = {"HF_HOME": "/cache/hf", "HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": "all",
           "DISTILL_LLM_CACHE": "/cache", "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1",
           "HF_TOKEN": "hf_x", "HUGGING_FACE_HUB_TOKEN": "hf_y", "DISTILL_LLM_API_KEY": "k", "VLLM_API_KEY": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_ACCESS_KEY_ID": "a", "AWS_SESSION_TOKEN": "t",
           "DISTILL_LLM_DB_PASSWORD": "p", "HF_AUTH": "x", "DISTILL_LLM_CREDENTIALS_FILE": "c", "PATH": "/bin"}
    assert forwarded_env(env) == {"HF_HOME": "/cache/hf", "HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": "all",
                                  "DISTILL_LLM_CACHE": "/cache", "AWS_ENDPOINT_URL": "http://minio:9000",
                                  "AWS_DEFAULT_REGION": "eu-west-1"}


@pytest.mark.parametrize("key", ["output.dir", "train.storage_path", "data.shards", "output.student_dir",
                                 "data.prompts", "student.model"])
def test_credentials_in_a_url_are_refused_without_echoing_them(tmp_path, key):
    section, name = key.split(".")
    with pytest.raises(ConfigError) as err:
        small_config(tmp_path, **{section: {name: "s3://AKIAEXAMPLE:sup3rs3cret@bucket/run"}})
    assert f"{key}: the URL carries credentials" in str(err.value)
    assert "sup3rs3cret" not in str(err.value) and "AKIAEXAMPLE" not in str(err.value)


def test_inspect_refuses_credentials_in_a_url(capsys):
    from distill_llm.cli import main

    assert main(["inspect", "s3://AKIAEXAMPLE:sup3rs3cret@bucket/run"]) == 2
    err = capsys.readouterr().err
    assert "the URL carries credentials" in err and "sup3rs3cret" not in err


def test_object_store_locations_keep_their_scheme(tmp_path):
    from distill_llm.paths import join

    cfg = small_config(tmp_path, output={"student_dir": "s3://bucket/run/student"})
    assert cfg.eval_dir == "s3://bucket/run/eval"
    assert join("s3://bucket/run?region=eu-west-1", "manifest.json") == "s3://bucket/run/manifest.json?region=eu-west-1"
    assert join("/data/run/", "a", "b") == "/data/run/a/b"
