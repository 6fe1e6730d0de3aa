"""A Ray head already running on the user's machine: a stage must not break on it, and `submit` must say
what to set when the head wants a token.

Every Ray here lives under a private RAY_TMPDIR (Ray's default temp dir, and so its ``ray_current_cluster``
record, is ``$RAY_TMPDIR/ray``) and a private HOME (Ray's token file is ``~/.ray/auth_token``), so nothing
here sees or disturbs another Ray on the machine. The head binds free ports on 127.0.0.1 and is stopped by
the pids of its own processes, never `ray stop`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from conftest import marked_pids, stop_marked

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "quickstart.yaml")
MARKER = "DISTILL_LLM_TEST_LOCAL_HEAD_ID"  # in the environment of every process started here: how they are found

# What a stage does first: start or join Ray as the config says; prints the GCS address it ended on.
JOIN = ("import json, ray; from distill_llm.config import RayConfig; from distill_llm.cluster.runtime import init_ray; "
        "init_ray(RayConfig(address={address!r}, num_cpus=1)); "
        "print(json.dumps({{'gcs': ray.get_runtime_context().gcs_address}})); ray.shutdown()")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Machine:
    """A private RAY_TMPDIR and HOME: the user's machine as Ray sees it."""

    def __init__(self):
        self.id = uuid.uuid4().hex
        self.root = tempfile.mkdtemp(prefix="dlh-", dir="/tmp")  # short: Ray's socket paths must fit
        self.ray_dir = os.path.join(self.root, "ray")  # Ray's default temp dir: where `ray start` records its head
        home = Path(self.root, "home")
        (home / ".ray").mkdir(parents=True)
        # A machine that has run Ray before holds a token: `ray start --head` then turns token auth on.
        (home / ".ray" / "auth_token").write_text(uuid.uuid4().hex)
        self.env = {**os.environ, "RAY_TMPDIR": self.root, "HOME": str(home), MARKER: self.id,
                    "RAY_USAGE_STATS_ENABLED": "0",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            self.env.pop(name, None)

    def start_head(self) -> None:
        """`ray start --head` as a user types it (plus free ports and loopback, to stay out of others' way)."""
        self.port = free_port()  # Ray records the machine's own address for 127.0.0.1: heads are told by port
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        ports = [f"--{name}={free_port()}" for name in (
            "node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
            "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port")]
        proc = subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={self.port}",
             "--node-ip-address=127.0.0.1", f"--temp-dir={self.ray_dir}", "--num-cpus=2",
             "--object-store-memory=200000000", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}", "--disable-usage-stats", *ports],
            env=self.env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert Path(self.ray_dir, "ray_current_cluster").read_text().strip().endswith(f":{self.port}")

    def run(self, args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, env={**self.env, **env}, capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def join(self, address: str | None) -> tuple[str, str]:
        """(GCS address, stderr) of a driver that starts or joins Ray with ``ray.address=address``."""
        proc = self.run([sys.executable, "-c", JOIN.format(address=address)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])["gcs"], proc.stderr

    def pids(self) -> list[int]:
        return marked_pids(MARKER, self.id, self.root)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, the processes started here, rescanning until none is left."""
        stop_marked(MARKER, self.id, self.root)


@pytest.fixture(scope="module")
def machine_with_head():
    machine = Machine()
    try:
        machine.start_head()
        yield machine
    finally:
        machine.stop()


def test_a_running_head_is_not_joined_unless_asked(machine_with_head):
    m = machine_with_head
    gcs, err = m.join(None)
    assert not gcs.endswith(f":{m.port}"), "without ray.address a stage starts its own Ray"
    assert "starting a private local Ray" in err and f":{m.port} is not joined (ray.address=auto joins it)" in err
    joined, _ = m.join("auto")
    assert joined.endswith(f":{m.port}")


def test_a_stale_head_record_does_not_break_a_stage():
    m = Machine()
    try:
        os.makedirs(m.ray_dir)
        dead = f"127.0.0.1:{free_port()}"  # a head that was killed: its record stays, nothing listens
        Path(m.ray_dir, "ray_current_cluster").write_text(dead)
        gcs, err = m.join(None)
        assert gcs != dead and "starting a private local Ray" in err and dead in err
    finally:
        m.stop()


def test_submit_to_a_token_auth_head_names_the_variable_to_set(machine_with_head, tmp_path):
    m = machine_with_head
    submit = [sys.executable, "-m", "distill_llm.cli", "submit", CONFIG, "--address", m.dashboard,
              "--stage", "generate", "data.prompts=/nonexistent/prompts.jsonl", f"output.dir={tmp_path / 'shards'}"]
    refused = m.run(submit, timeout=120)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "requires an authentication token" in refused.stderr and "RAY_AUTH_MODE=token" in refused.stderr
    # What the README says a laptop user types: the token is the machine's own (~/.ray/auth_token).
    accepted = m.run(submit, timeout=240, RAY_AUTH_MODE="token")
    assert "submitted job raysubmit_" in accepted.stdout, accepted.stderr[-3000:]
    assert accepted.returncode == 1 and "/nonexistent/prompts.jsonl" in accepted.stderr  # the job ran, and failed
