"""`distill-llm submit` against a real two-node Ray cluster on this machine (two raylets, token auth on).

Both nodes start with --node-ip-address=127.0.0.1 and the dashboard binds 127.0.0.1; Ray itself swaps
127.0.0.1 for the machine's own interface address for its internal gRPC, so nothing leaves the machine.

The head advertises ``student`` and the second node ``teacher``, so ``teacher.resources`` and
``train.resources_per_worker`` decide where the engine and the Train workers run; the test checks the
placement through Ray's state API. The cluster is stopped by the ids of its own processes, never `ray stop`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import marked_pids, stop_marked

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "quickstart.yaml")
MARKER = "DISTILL_LLM_TEST_CLUSTER_ID"  # set in every process of the cluster: how its pids are found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    """Every port a node binds, chosen free, so two nodes (and other Rays on this machine) never collide."""
    names = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port")
    return [f"--{name}={free_port()}" for name in names]


class LoopbackCluster:
    """A head and a worker node started with `ray start`, all on 127.0.0.1, in a temp dir of their own."""

    def __init__(self):
        self.id = uuid.uuid4().hex
        self.temp_dir = tempfile.mkdtemp(prefix="dlray-", dir="/tmp")  # short: Ray's socket paths must fit
        # Token auth stays on, as on a real cluster, with a token of this cluster only.
        # Clients (the CLI under test, state queries) get the token but not the marker, so stop() spares them.
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)

    def _ray_start(self, *args: str) -> None:
        common = ["--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}", "--object-store-memory=300000000",
                  "--disable-usage-stats", *node_ports()]
        proc = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", *args, *common],
                              env={**self.env, MARKER: self.id},
                              capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start {args} failed:\n{proc.stdout}\n{proc.stderr}")

    def start(self, attempts: int = 2) -> None:
        """Ray gives a raylet a fixed 30 s to register, which a loaded machine can miss: start anew once."""
        for attempt in range(attempts):
            try:
                return self._start()
            except RuntimeError:
                self.stop()
                if attempt == attempts - 1:
                    raise
                os.makedirs(self.temp_dir)

    def _start(self) -> None:
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self._ray_start("--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
                        f"--ray-client-server-port={free_port()}", "--num-cpus=4",
                        '--resources={"student": 2}')
        self._ray_start(f"--address=127.0.0.1:{self.gcs_port}", "--num-cpus=1", '--resources={"teacher": 1}')
        deadline = time.monotonic() + 120
        while len(self.nodes()) < 2:
            assert time.monotonic() < deadline, "the second node did not join"
            time.sleep(2)

    def python(self, code: str) -> object:
        """Run ``code`` (which prints JSON) as a client of this cluster; its parsed output."""
        proc = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def nodes(self) -> list[dict]:
        return self.python(
            "import json; from ray.util.state import list_nodes; "
            f"print(json.dumps([{{'id': n.node_id, 'resources': n.resources_total}} for n in "
            f"list_nodes(address='127.0.0.1:{self.gcs_port}', filters=[('state', '=', 'ALIVE')])]))")

    def actors(self) -> list[dict]:
        return self.python(
            "import json; from ray.util.state import list_actors; "
            f"print(json.dumps([{{'cls': a.class_name, 'node': a.node_id}} for a in "
            f"list_actors(address='127.0.0.1:{self.gcs_port}', limit=10000)]))")

    def cli(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "distill_llm.cli", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT)

    def pids(self) -> list[int]:
        return marked_pids(MARKER, self.id, self.temp_dir)

    def stop(self) -> None:
        stop_marked(MARKER, self.id, self.temp_dir)


@pytest.fixture(scope="module")
def cluster():
    c = LoopbackCluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("cluster-run")


def submit_and_wait(cluster, stage: str, *overrides: str) -> subprocess.CompletedProcess:
    proc = cluster.cli("submit", CONFIG, "--address", cluster.address, "--stage", stage, *overrides)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "submitted job raysubmit_" in proc.stdout and "SUCCEEDED" in proc.stdout
    return proc


def assert_placed(cluster, actor_class: str, resource: str) -> None:
    """Every actor of ``actor_class`` ran on the node advertising ``resource``."""
    node = next(n["id"] for n in cluster.nodes() if resource in n["resources"])
    actors = [a for a in cluster.actors() if actor_class in a["cls"]]
    assert actors and {a["node"] for a in actors} == {node}


def test_generate_job_runs_its_engine_on_the_teacher(cluster, outputs):
    start = time.monotonic()
    proc = submit_and_wait(cluster, "generate", f"output.dir={outputs / 'shards'}", "data.num_prompts=16",
                           "generate.top_k_logprobs=8", "teacher.resources={teacher: 1}", "teacher.batch_size=16")
    assert "generate: 16 rows" in proc.stdout, "the job's log was followed"
    manifest = json.loads((outputs / "shards" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["totals"]["rows"] == 16 and manifest["run"]["top_k_logprobs"] == 8
    tables = [pq.read_table(f, columns=["sample_id", "topk_token_ids"])
              for f in sorted((outputs / "shards").glob("part-*.parquet"))]
    assert sum(t.num_rows for t in tables) == 16 and len(tables[0]["topk_token_ids"][0].as_py()[0]) == 8
    assert_placed(cluster, "TeacherEngine", "teacher")
    print(f"generate job: {time.monotonic() - start:.0f}s")


def test_train_job_places_workers_and_writes_a_student(cluster, outputs):
    from transformers import AutoModelForCausalLM

    start = time.monotonic()
    submit_and_wait(cluster, "train", f"data.shards={outputs / 'shards'}", f"output.student_dir={outputs / 'student'}",
                    f"train.storage_path={outputs / 'train'}", "train.max_steps=2", "train.batch_size=8",
                    "train.log_every=1", "train.resources_per_worker={student: 1}")
    info = json.loads((outputs / "student" / "distill_llm.json").read_text())
    assert info["steps"] == 2
    assert AutoModelForCausalLM.from_pretrained(outputs / "student").num_parameters() > 0
    assert_placed(cluster, "RayTrainWorker", "student")
    print(f"train job: {time.monotonic() - start:.0f}s")


def test_failed_job_returns_nonzero_with_its_error(cluster, outputs):
    start = time.monotonic()
    proc = cluster.cli("submit", CONFIG, "--address", cluster.address, "--stage", "generate",
                       "data.prompts=/nonexistent/prompts.jsonl", f"output.dir={outputs / 'failed'}", timeout=240)
    assert proc.returncode == 1
    assert "FAILED" in proc.stderr and "/nonexistent/prompts.jsonl" in proc.stderr and "does not exist" in proc.stderr
    job_id = proc.stdout.split("submitted job ", 1)[1].split()[0]
    status = cluster.cli("jobs", "status", job_id, "--address", cluster.address, timeout=60)
    assert status.returncode == 0 and "FAILED" in status.stdout
    assert not (outputs / "failed" / "manifest.json").exists()
    print(f"failed job: {time.monotonic() - start:.0f}s")


def test_following_a_job_whose_server_vanishes_fails_in_bounded_time(cluster, outputs):
    """Last in this file: it takes the cluster down while a job runs."""
    proc = cluster.cli("submit", CONFIG, "--address", cluster.address, "--stage", "generate", "--no-wait",
                       f"output.dir={outputs / 'lost'}", "teacher.resources={teacher: 1}", timeout=120)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.split("submitted job ", 1)[1].split()[0]
    follower = subprocess.Popen([sys.executable, "-m", "distill_llm.cli", "jobs", "logs", job_id, "--follow",
                                 "--address", cluster.address, "--server-timeout", "10"], env=cluster.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    time.sleep(5)
    start = time.monotonic()
    cluster.stop()
    _, err = follower.communicate(timeout=90)
    assert follower.returncode == 1 and "job server" in err, err
    assert time.monotonic() - start < 60
