"""Object-store paths for real: a moto S3 server on loopback, shards, Ray Train checkpoints and the exported
student all in ``s3://``, and no planted secret in any byte written or printed."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from conftest import ray_restarted_with, small_config
from distill_llm.config import ConfigError

pytestmark = pytest.mark.slow

BUCKET = "distill"
RUN = f"s3://{BUCKET}/run"
# Secrets a user has in the environment while running the pipeline; none may reach an output or a log.
PLANTED = {"AWS_SECRET_ACCESS_KEY": "planted-aws-secret-7f3a9c", "HF_TOKEN": "hf_plantedToken9d2e41",
           "DISTILL_LLM_API_KEY": "dl-planted-api-key-51b8"}


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (free port) with one bucket; stages find it through AWS_ENDPOINT_URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "planted-access-id",
           "AWS_DEFAULT_REGION": "us-east-1", **PLANTED}
    # A local Ray's workers take the driver's environment when Ray starts: restart it so they see the
    # endpoint and the credentials (secrets are not in the runtime_env, see distill_llm/cluster/runtime.py).
    with ray_restarted_with(env):
        client = boto3.client("s3")  # endpoint from AWS_ENDPOINT_URL, like every stage
        client.create_bucket(Bucket=BUCKET)
        yield client
    server.stop()


def _objects(client, prefix: str = "") -> dict[str, dict]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o for page in pages for o in page.get("Contents", [])}


def _download(client, prefix: str, dest: Path) -> list[str]:
    keys = [k for k in _objects(client, prefix) if not k.endswith("/")]
    for key in keys:
        target = dest / key[len(prefix):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, key, str(target))
    return sorted(k[len(prefix):].lstrip("/") for k in keys)


def find_planted(client, folders: list[Path], texts: list[str]) -> list[str]:
    """Where any planted secret occurs: local files under ``folders``, every object in the bucket, ``texts``."""
    needles = [v.encode() for v in PLANTED.values()]
    hits = [f"s3://{BUCKET}/{key}" for key in _objects(client)
            if any(n in client.get_object(Bucket=BUCKET, Key=key)["Body"].read() for n in needles)]
    for folder in folders:
        hits += [str(p) for p in folder.rglob("*") if p.is_file() and any(n in p.read_bytes() for n in needles)]
    return hits + [f"output #{i}" for i, text in enumerate(texts) if any(n.decode() in text for n in needles)]


@pytest.fixture(scope="module")
def pipeline(s3, tmp_path_factory, request):
    """generate -> train with every location in S3; returns the config and the captured output."""
    import ray

    from distill_llm.teacher.stage import generate
    from distill_llm.student.stage import train

    tmp = tmp_path_factory.mktemp("s3run")
    cfg = small_config(tmp, output={"dir": f"{RUN}/shards", "student_dir": f"{RUN}/student"},
                       data={"num_prompts": 16},
                       train={"storage_path": f"{RUN}/train", "max_steps": 4, "checkpoint_every": 2,
                              "batch_size": 8, "log_every": 2, "num_workers": 1})
    capman = request.config.pluginmanager.getplugin("capturemanager")
    capman.read_global_capture()  # start the capture of this run's output from here
    manifest = generate(cfg)
    student = train(cfg)
    out, err = capman.read_global_capture()
    runtime_env = ray.get_runtime_context().runtime_env
    node = ray._private.worker._global_node  # no public API names a local Ray's session folder
    return {"cfg": cfg, "manifest": manifest, "student": student, "output": [out, err], "tmp": tmp,
            "runtime_env": dict(runtime_env), "capturing": capman.is_globally_capturing(),
            "ray_logs": Path(node.get_session_dir_path()) / "logs"}


def test_shards_are_committed_to_s3_with_the_manifest_last(pipeline, s3):
    from distill_llm.corpus.shards import commit_records, read_manifest, shard_files

    manifest = read_manifest(f"{RUN}/shards")
    assert manifest["totals"]["rows"] == 32 and manifest == pipeline["manifest"], "16 prompts x 2 samples"
    assert manifest["run"]["top_k_logprobs"] == 8
    objects = _objects(s3, "run/shards/")
    keys = set(objects)
    assert not [k for k in keys if "_tmp" in k or "_attempts" in k or ".tmp-" in k], "no temporaries left"
    # pyarrow's S3 delete leaves an empty "folder/" marker for the parent of what it removed (the scratch
    # folders here); readers see a folder, never a file, so only empty markers are allowed.
    assert all(objects[k]["Size"] == 0 for k in keys if k.endswith("/")), "markers hold nothing"
    listed = {f"run/shards/{s['file']}" for s in manifest["shards"]}
    shards = {k for k in keys if k.startswith("run/shards/part-")}
    assert listed == shards, "every shard object is a committed one in the manifest"
    assert {f"run/shards/{r['file']}" for r in commit_records(f"{RUN}/shards")} == shards
    assert [objects[f"run/shards/{s['file']}"]["Size"] for s in manifest["shards"]] == \
        [s["bytes"] for s in manifest["shards"]]
    written = objects["run/shards/manifest.json"]["LastModified"]
    assert all(o["LastModified"] <= written for o in objects.values()), "the manifest is written last"
    assert len(shard_files(f"{RUN}/shards", verify="sha256")) == len(listed)


def test_inspect_reads_a_shard_set_in_s3(pipeline, capsys):
    from distill_llm.cli import main

    assert main(["inspect", f"{RUN}/shards"]) == 0
    out = capsys.readouterr().out
    assert "32 completions of 16 prompts" in out and "k=8" in out


def test_train_checkpoints_and_student_live_in_s3(pipeline, s3, tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from distill_llm.paths import resolve_model

    assert pipeline["student"] == f"{RUN}/student"
    checkpoints = {k.split("/")[3] for k in _objects(s3, "run/train/") if "/checkpoint_step" in k}
    assert checkpoints == {"checkpoint_step0000002", "checkpoint_step0000004"}
    files = _download(s3, "run/student/", tmp_path / "student")
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "distill_llm.json"} <= set(files)
    info = json.loads((tmp_path / "student" / "distill_llm.json").read_text())
    assert info["steps"] == 4 and info["shards"] == [f"{RUN}/shards"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert model.num_parameters() > 0
    fetched = Path(resolve_model(f"{RUN}/student"))  # what `distill-llm eval model=s3://...` loads
    assert sorted(str(p.relative_to(fetched)) for p in fetched.rglob("*") if p.is_file()) == files


def test_the_run_in_s3_is_what_a_rerun_resumes_from(pipeline, s3):
    """Ray Train reads back the run (its checkpoint index and latest checkpoint) through the same file system;
    a full rerun is checked locally in test_train.py and would cost another Ray Train start here."""
    import json

    import ray.train

    from distill_llm.paths import filesystem

    runs = {k.split("/")[2] for k in _objects(s3, "run/train/") if k.count("/") > 2}  # not Ray's folder marker
    assert len(runs) == 1
    fs, path = filesystem(f"{RUN}/train/{runs.pop()}")
    result = ray.train.Result.from_path(path, storage_filesystem=fs)
    assert result.checkpoint.path.endswith("checkpoint_step0000004")
    with result.checkpoint.as_directory() as d:
        assert json.loads((Path(d) / "trainer_state.json").read_text())["step"] == 4


def test_no_secret_reaches_outputs_logs_or_the_runtime_env(pipeline, s3):
    assert pipeline["capturing"], "run without -s: the run's output is part of what is searched"
    assert not set(PLANTED.values()) & set(pipeline["runtime_env"].get("env_vars", {}).values())
    assert "AWS_ENDPOINT_URL" in pipeline["runtime_env"]["env_vars"], "settings still reach the workers"
    folders = [pipeline["tmp"], Path(os.environ["DISTILL_LLM_CACHE"]), pipeline["ray_logs"]]
    assert sum(len(t) for t in pipeline["output"]) > 0
    # The search can fail: a planted value in a local file and in an object is found.
    canary = pipeline["tmp"] / "canary.txt"
    canary.write_text(f"token={PLANTED['HF_TOKEN']}")
    s3.put_object(Bucket=BUCKET, Key="run/canary", Body=PLANTED["AWS_SECRET_ACCESS_KEY"].encode())
    try:
        assert find_planted(s3, folders, []) == [f"s3://{BUCKET}/run/canary", str(canary)]
    finally:
        canary.unlink()
        s3.delete_object(Bucket=BUCKET, Key="run/canary")
    assert find_planted(s3, folders, pipeline["output"]) == []


def test_a_missing_bucket_is_named_before_any_work(s3, tmp_path):
    from distill_llm.cli import main
    from distill_llm.teacher.stage import generate
    from distill_llm.student.stage import train

    cfg = small_config(tmp_path, output={"dir": "s3://no-such-bucket/shards"})
    with pytest.raises(ConfigError, match="output.dir=s3://no-such-bucket/shards: bucket 'no-such-bucket' does not"):
        generate(cfg)
    cfg = small_config(tmp_path, train={"storage_path": "s3://no-such-bucket/train"})
    with pytest.raises(ConfigError, match="train.storage_path=.*does not exist; create it first"):
        train(cfg)
    assert main(["inspect", "s3://no-such-bucket/shards"]) == 2


def test_an_unreachable_endpoint_is_named(s3, monkeypatch, capsys):
    from distill_llm.cli import main

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    assert main(["inspect", f"{RUN}/shards"]) == 2
    err = capsys.readouterr().err
    assert f"inspect={RUN}/shards: cannot reach bucket '{BUCKET}' through the endpoint " \
           "AWS_ENDPOINT_URL=http://127.0.0.1:9" in err and "Traceback" not in err
