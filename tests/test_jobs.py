"""The parts of `distill-llm submit` / `jobs` that need no cluster: address, entrypoint, runtime_env, paths, errors.

tests/test_cluster.py submits real jobs to a real two-node cluster.
"""

import importlib.util
import json
import shlex
import shutil
import socket
import time
import zipfile
from pathlib import Path

import pytest

from distill_llm.cluster import jobs
from distill_llm.cli import main
from distill_llm.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "quickstart.yaml")
ABSOLUTE = ["output.dir=/data/shards", "output.student_dir=/data/student", "train.storage_path=s3://b/train"]


def test_address_comes_from_the_flag_then_ray_address_then_an_http_config(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert jobs.resolve_address("http://head:8265/", "http://other:8265") == "http://head:8265"
    assert jobs.resolve_address(None, "https://head:8265") == "https://head:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://env:8265")
    assert jobs.resolve_address(None, "http://cfg:8265") == "http://env:8265"
    assert jobs.resolve_address("http://flag:8265") == "http://flag:8265"


def test_missing_or_non_http_addresses_are_refused(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="--address"):
        jobs.resolve_address(None)
    with pytest.raises(ConfigError, match=r"ray\.address=ray://head:10001 is not a job server URL"):
        jobs.resolve_address(None, "ray://head:10001")
    for bad in ("auto", "ray://head:10001"):
        with pytest.raises(ConfigError, match="not a job server address"):
            jobs.resolve_address(bad)


@pytest.mark.parametrize("stage,module", sorted(jobs.STAGE_MODULES.items()))
def test_entrypoint_runs_the_stage_module_on_the_shipped_config(stage, module):
    command = jobs.entrypoint(stage, ["teacher.resources={teacher_node: 1}", "model=/m/a b"])
    assert shlex.split(command) == ["python", "-m", f"pipelines.{module}", "env:DISTILL_LLM_JOB_CONFIG",
                                    "teacher.resources={teacher_node: 1}", "model=/m/a b"]
    assert importlib.util.find_spec(f"pipelines.{module}") is not None
    with pytest.raises(ConfigError, match="unknown stage"):
        jobs.entrypoint("deploy", [])


def test_runtime_env_ships_the_project_and_the_config_but_no_secrets(monkeypatch):
    for name in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN", "DISTILL_LLM_CACHE"):
        monkeypatch.setenv(name, f"secret-{name}")
    text = Path(CONFIG).read_text()
    env = jobs.build_runtime_env(text, jobs.project_root())
    assert env["working_dir"] == str(ROOT)
    assert (Path(env["working_dir"]) / "distill_llm").is_dir() and (Path(env["working_dir"]) / "pipelines").is_dir()
    assert {"runs/", ".git", "__pycache__/", "*.egg-info/", ".venv/", "build/"} <= set(env["excludes"])
    assert set(env["env_vars"]) == {jobs.CONFIG_ENV, "PYTHONUNBUFFERED"}
    assert "secret-" not in json.dumps(env)
    # what the job reads back is the config that was validated here
    monkeypatch.setenv(jobs.CONFIG_ENV, env["env_vars"][jobs.CONFIG_ENV])
    assert load_config(f"env:{jobs.CONFIG_ENV}", ["train.alpha=0"]) == load_config(CONFIG, ["train.alpha=0"])
    assert "working_dir" not in jobs.build_runtime_env(text, None)  # an installed package: the cluster's own copy


def test_excludes_keep_outputs_and_vcs_out_of_the_upload(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__"))
    for junk in ("runs/quickstart/shards/part-0.parquet", ".git/objects/ab", "distill_llm/__pycache__/x.pyc",
                 "distill_llm.egg-info/PKG-INFO", ".venv/bin/python", "build/lib/x.py"):
        (project / junk).parent.mkdir(parents=True, exist_ok=True)
        (project / junk).write_bytes(b"x" * 1000)
    package = tmp_path / "pkg.zip"
    create_package(str(project), package, include_gitignore=False, excludes=jobs.EXCLUDES)
    names = zipfile.ZipFile(package).namelist()
    assert "pipelines/generate_teacher.py" in names and "distill_llm/assets/toy-teacher/model.safetensors" in names
    leaked = [n for n in names if n.split("/")[0] in {"runs", ".git", ".venv", "build", "distill_llm.egg-info"}
              or "__pycache__" in n]
    assert not leaked
    assert package.stat().st_size < 20 * 2**20


def test_oversized_config_and_missing_env_config_are_refused(monkeypatch):
    with pytest.raises(ConfigError, match="KiB"):
        jobs.build_runtime_env("# " + "x" * (jobs.MAX_CONFIG_BYTES + 1), None)
    monkeypatch.delenv("NO_SUCH_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="environment variable NO_SUCH_CONFIG is not set"):
        load_config("env:NO_SUCH_CONFIG")


def test_relative_output_paths_are_refused_for_the_stages_that_use_them():
    cfg = load_config(CONFIG)  # the quickstart writes under runs/ (relative)
    with pytest.raises(ConfigError, match="output.dir=runs/quickstart/shards is a relative path"):
        jobs.check_cluster_paths(cfg, "generate")
    with pytest.raises(ConfigError, match="train.storage_path"):
        jobs.check_cluster_paths(load_config(CONFIG, ABSOLUTE[:2]), "train")
    jobs.check_cluster_paths(load_config(CONFIG, ABSOLUTE), "run")
    jobs.check_cluster_paths(load_config(CONFIG, ["output.dir=gs://b/shards"]), "generate")
    jobs.check_cluster_paths(load_config(CONFIG, ["output.student_dir=/data/student"]), "eval")


def test_job_env_vars_are_not_passed_to_ray_init_again(monkeypatch):
    from distill_llm.cluster.runtime import _job_env_vars

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert _job_env_vars() == set()
    job_config = {"runtime_env": {"env_vars": {jobs.CONFIG_ENV: "x", "HF_HOME": "/h"}, "working_dir": "gcs://p"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job_config))
    assert _job_env_vars() == {jobs.CONFIG_ENV, "HF_HOME"}


def test_a_request_that_never_answers_is_bounded():
    start = time.monotonic()
    with pytest.raises(jobs.JobError, match="no answer from the job server in 0s"):
        jobs._bounded(time.sleep, 30, timeout_s=0.2, what="status")
    assert time.monotonic() - start < 5
    with pytest.raises(jobs.JobError, match="status: boom"):
        jobs._bounded(lambda: (_ for _ in ()).throw(RuntimeError("boom")), timeout_s=5, what="status")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_submit_errors_exit_before_anything_is_sent(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["submit", CONFIG, "--stage", "generate", "train.alhpa=1", "--address", "http://127.0.0.1:1"]) == 2
    assert "train.alhpa: unknown key (did you mean train.alpha?)" in capsys.readouterr().err
    assert main(["submit", CONFIG, "--stage", "generate", *ABSOLUTE]) == 2
    assert "no job server address" in capsys.readouterr().err
    assert main(["submit", CONFIG, "--stage", "generate", "--address", "http://127.0.0.1:1"]) == 2
    assert "output.dir=runs/quickstart/shards is a relative path" in capsys.readouterr().err


def test_cli_reports_an_unreachable_job_server(capsys):
    address = f"http://127.0.0.1:{_closed_port()}"
    assert main(["submit", CONFIG, "--stage", "generate", "--no-wait", *ABSOLUTE, "--address", address]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the job server at {address}" in err and "Traceback" not in err
    for action in ("status", "logs", "stop"):
        assert main(["jobs", action, "raysubmit_x", "--address", address]) == 1
        assert "cannot reach the job server" in capsys.readouterr().err
