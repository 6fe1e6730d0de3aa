"""Stages as Ray jobs: submit through Ray's Job Submission SDK, follow the logs, report how the job ended.

A submitted job runs the entrypoint a user would give ``ray job submit``
(``python -m pipelines.<module> CONFIG [overrides]``) in a copy of the project folder (the runtime_env's
``working_dir``), so the cluster runs the code of this checkout. Paths in the config are the cluster's.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from ..config import ENV_CONFIG_PREFIX, Config, ConfigError
from ..paths import is_url

STAGE_MODULES = {"generate": "generate_teacher", "train": "train_student", "eval": "evaluate", "run": "run",
                 "rounds": "rounds", "curate": "curate"}
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

# The config travels as text in this env var of the job's runtime_env and the entrypoint reads it as
# ``env:DISTILL_LLM_JOB_CONFIG``. Shipping the text (rather than a path inside working_dir) works wherever the
# file lies locally (outside the project, in an ignored folder, no working_dir at all), and the job reads
# exactly the file that was validated at submit time. Overrides stay visible on the entrypoint.
CONFIG_ENV = "DISTILL_LLM_JOB_CONFIG"
MAX_CONFIG_BYTES = 64 * 1024  # one environment string must stay well below Linux's 128 KiB limit

# Never uploaded with the working_dir (Ray also honours .gitignore / .rayignore): outputs, caches,
# environments, VCS data and the benchmarks (bench/ and its outputs) would blow Ray's package size cap and are of
# no use to the job.
EXCLUDES = ["runs/", ".git", "__pycache__/", "*.pyc", "*.egg-info/", ".venv/", "venv/", "build/", "dist/",
            ".pytest_cache/", ".mypy_cache/", ".ruff_cache/", ".ipynb_checkpoints/", "bench/", "bench-*/",
            "wandb/", "lightning_logs/"]

SERVER_TIMEOUT_S = 60.0  # how long the job server may stay unreachable while a job is followed
REQUEST_TIMEOUT_S = 30.0  # one status/info request
SUBMIT_TIMEOUT_S = 600.0  # connecting and submitting, which includes uploading the working_dir


class JobError(RuntimeError):
    """The job server cannot be reached or answered with an error; printed without a traceback."""


def resolve_address(address: str | None, config_address: str | None = None) -> str:
    """The job server: ``--address``, else RAY_ADDRESS, else ``ray.address`` of the config when it is http(s)."""
    chosen = address or os.environ.get("RAY_ADDRESS")
    if not chosen and config_address and config_address.startswith(("http://", "https://")):
        chosen = config_address
    if not chosen:
        hint = f" (ray.address={config_address} is not a job server URL)" if config_address else ""
        raise ConfigError("no job server address: pass --address http://HEAD:8265 (the Ray dashboard) or set "
                          f"RAY_ADDRESS{hint}")
    if chosen == "auto" or chosen.startswith("ray://"):
        raise ConfigError(f"{chosen} is not a job server address: give the Ray dashboard URL, e.g. "
                          "--address http://HEAD:8265")
    return chosen.rstrip("/")


def project_root() -> Path | None:
    """The source checkout holding distill_llm/ and pipelines/, or None when the package is installed."""
    root = Path(__file__).resolve().parents[2]  # distill_llm/cluster/jobs.py -> the checkout
    if (root / "pyproject.toml").is_file() and (root / "pipelines").is_dir():
        return root
    return None  # site-packages: the cluster's own installation runs the job


def entrypoint(stage: str, overrides: list[str], config: str = f"{ENV_CONFIG_PREFIX}{CONFIG_ENV}") -> str:
    """The shell command the job runs: the same module `ray job submit -- python -m ...` would run."""
    if stage not in STAGE_MODULES:
        raise ConfigError(f"unknown stage {stage!r}: choose one of {', '.join(STAGE_MODULES)}")
    return shlex.join(["python", "-m", f"pipelines.{STAGE_MODULES[stage]}", config, *overrides])


def build_runtime_env(config_text: str, root: Path | None) -> dict[str, Any]:
    """working_dir (the project, minus EXCLUDES) and the env vars the job needs.

    Nothing else is copied from the local environment: tokens and keys stay here; the cluster has its own
    credentials (instance roles, secrets in the cluster spec).
    """
    if len(config_text.encode()) > MAX_CONFIG_BYTES:
        raise ConfigError(f"the config is over {MAX_CONFIG_BYTES // 1024} KiB; a job config that large is not "
                          "supported (move long lists, such as prompts, to a file the cluster can read)")
    env: dict[str, Any] = {"env_vars": {CONFIG_ENV: config_text, "PYTHONUNBUFFERED": "1"}}  # logs live
    if root is not None:
        env["working_dir"] = str(root)
        env["excludes"] = list(EXCLUDES)
    return env


def _stage_paths(cfg: Config, stage: str) -> list[tuple[str, str]]:
    """(dotted key, path) of what the stage writes or reads between stages."""
    shards = [("data.shards" if cfg.data.shards else "output.dir", d) for d in cfg.shard_dirs]
    generate = [("output.dir", cfg.output.dir)]
    train = [*shards, ("output.student_dir", cfg.output.student_dir), ("train.storage_path", cfg.train.storage_path)]
    evaluate = [("output.student_dir", cfg.output.student_dir), ("output.eval_dir", cfg.eval_dir)]
    if stage == "curate":
        if cfg.curate is None:
            raise ConfigError("curate: the config has no curate section; add curate.inputs (shard sets) and "
                              "curate.output (a new folder)")
        return [*((f"curate.inputs[{i}].dir", c.dir) for i, c in enumerate(cfg.curate.inputs)),
                ("curate.output", cfg.curate.output)]
    return {"generate": generate, "train": train, "eval": evaluate, "run": generate + train + evaluate}[stage]


def check_cluster_paths(cfg: Config, stage: str) -> None:
    """Refuse relative local paths for outputs: in a job they land in its temporary working_dir copy."""
    for key, path in _stage_paths(cfg, stage):
        if not is_url(path) and not Path(path.removeprefix("file://")).expanduser().is_absolute():
            raise ConfigError(f"{key}={path} is a relative path: in a cluster job it would resolve inside the job's "
                              "temporary copy of the project on one node. Use an s3:// or gs:// URL, or an absolute "
                              "path on storage every node shares")


def _bounded(fn: Callable[..., Any], *args: Any, timeout_s: float, what: str) -> Any:
    """fn(*args) in a daemon thread, so an unresponsive job server cannot hang us (requests has no timeout)."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as err:  # handed to the caller's thread
            box["error"] = err

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise JobError(f"{what}: no answer from the job server in {timeout_s:.0f}s")
    err = box.get("error")
    if isinstance(err, (JobError, ConfigError)):
        raise err
    if _is_auth_error(err):
        raise JobError(auth_hint(what, err)) from None
    if err is not None:
        raise JobError(f"{what}: {err}") from err
    return box.get("value")


def _is_auth_error(err: BaseException | None) -> bool:
    from ray.exceptions import AuthenticationError

    return isinstance(err, AuthenticationError)


def auth_hint(what: str, err: BaseException) -> str:
    """One sentence for Ray's AuthenticationError: which variable to set.

    A head started with ``ray start --head`` turns token authentication on when this machine has a token
    (``~/.ray/auth_token``, which any local Ray writes), while a client sends the token only when
    RAY_AUTH_MODE=token is set in its own environment.
    """
    message = str(getattr(err, "message", err)).strip().rstrip(".")
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return (f"{what}: the Ray cluster requires an authentication token ({message}); set RAY_AUTH_MODE=token "
                "(the token is read from RAY_AUTH_TOKEN, else ~/.ray/auth_token, which a head started on this "
                "machine uses), e.g. RAY_AUTH_MODE=token distill-llm submit ...")
    return (f"{what}: the Ray cluster refused the token sent ({message}); set RAY_AUTH_TOKEN to the cluster's "
            "token (`ray get-auth-token` on the head prints it)")


def connect(address: str, timeout_s: float = REQUEST_TIMEOUT_S):
    """A JobSubmissionClient for ``address`` (Ray's token from ~/.ray/auth_token or RAY_AUTH_TOKEN is sent)."""
    from ray.job_submission import JobSubmissionClient

    return _bounded(JobSubmissionClient, address, timeout_s=timeout_s, what=f"cannot reach the job server at {address}")


def submit(address: str, cfg_path: str, stage: str, overrides: list[str], cfg: Config) -> tuple[Any, str]:
    """Submit ``stage`` of an already validated config: (client, submission id)."""
    check_cluster_paths(cfg, stage)
    job_overrides = list(overrides)
    if cfg.ray.address:  # inside the job the driver joins the cluster it runs on (RAY_ADDRESS from the job server)
        job_overrides.append("ray.address=null")
    text = Path(cfg_path).read_text()
    env = build_runtime_env(text, project_root())
    command = entrypoint(stage, job_overrides)
    metadata = {"distill_llm_stage": stage, "distill_llm_config": str(cfg_path)}
    client = connect(address)
    job_id = _bounded(lambda: client.submit_job(entrypoint=command, runtime_env=env, metadata=metadata),
                      timeout_s=SUBMIT_TIMEOUT_S, what="submitting the job")
    return client, job_id


def status(client, job_id: str) -> str:
    answer = _bounded(client.get_job_status, job_id, timeout_s=REQUEST_TIMEOUT_S, what=f"status of job {job_id}")
    return getattr(answer, "value", str(answer))


def info(client, job_id: str):
    return _bounded(client.get_job_info, job_id, timeout_s=REQUEST_TIMEOUT_S, what=f"details of job {job_id}")


def logs(client, job_id: str) -> str:
    return _bounded(client.get_job_logs, job_id, timeout_s=REQUEST_TIMEOUT_S, what=f"logs of job {job_id}")


def stop(client, job_id: str, wait_s: float = 60.0) -> str:
    """Ask the job to stop and wait (bounded) until it has ended; returns its last status."""
    _bounded(client.stop_job, job_id, timeout_s=REQUEST_TIMEOUT_S, what=f"stopping job {job_id}")
    deadline = time.monotonic() + wait_s
    current = status(client, job_id)
    while current not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1.0)
        current = status(client, job_id)
    return current


def describe(details) -> str:
    """A few lines about a job for `distill-llm jobs status`."""
    def when(ms: int | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"

    status_value = getattr(details.status, "value", details.status)
    lines = [f"job:        {details.submission_id or details.job_id}", f"status:     {status_value}",
             f"entrypoint: {details.entrypoint}", f"started:    {when(details.start_time)}",
             f"ended:      {when(details.end_time)}"]
    if details.message:
        lines.append(f"message:    {details.message.strip().splitlines()[0]}")
    return "\n".join(lines)


class _LogTail:
    """Streams a job's logs to ``out`` from a daemon thread; stops writing once told to, without duplicates."""

    def __init__(self, client, job_id: str, out: TextIO):
        self.client, self.job_id, self.out = client, job_id, out
        self.written = 0  # characters of the job's log already printed
        self.lock = threading.Lock()
        self.closed = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(self.job_id):
                self.write(chunk)

        try:
            asyncio.run(tail())
        except Exception:  # a broken stream: finish() prints what is missing from get_job_logs
            pass

    def write(self, text: str) -> None:
        with self.lock:
            if not self.closed:
                self.out.write(text)
                self.out.flush()
                self.written += len(text)

    def finish(self, client, wait_s: float = 10.0) -> None:
        """Let the stream drain, then print whatever of the log it missed."""
        self.thread.join(wait_s)
        with self.lock:
            self.closed = True
            written = self.written
        try:
            rest = logs(client, self.job_id)[written:]
        except JobError:
            return
        if rest:
            self.out.write(rest)
            self.out.flush()


def follow(client, job_id: str, out: TextIO | None = None, poll_s: float = 2.0,
           server_timeout_s: float = SERVER_TIMEOUT_S) -> str:
    """Print the job's logs as they come until it ends; returns SUCCEEDED, FAILED or STOPPED.

    The status is polled beside the log stream, so a job server that disappears (the stream may just go
    quiet) ends this with a JobError after ``server_timeout_s`` instead of a hang.
    """
    tail = _LogTail(client, job_id, out or sys.stdout)
    tail.thread.start()
    last_answer = time.monotonic()
    while True:
        try:
            current = status(client, job_id)
            last_answer = time.monotonic()
        except JobError as err:
            if time.monotonic() - last_answer > server_timeout_s:
                raise JobError(f"lost the job server for {server_timeout_s:.0f}s while following job {job_id} "
                               f"({err}); the job may still be running") from None
            current = None
        if current in TERMINAL:
            tail.finish(client)
            return current
        time.sleep(poll_s)


def failure_report(client, job_id: str, final: str, tail_lines: int = 20) -> str:
    """Why the job ended badly: Ray's message (first line) and the last lines of the job's log."""
    details = info(client, job_id)
    message = (details.message or "").strip().splitlines()
    head = f"job {job_id} {final}" + (f": {message[0]}" if message else "")
    try:
        last = logs(client, job_id).rstrip().splitlines()[-tail_lines:]
    except JobError:
        last = []
    return "\n".join([head, *(["last lines of the job's log:", *("  " + line for line in last)] if last else [])])
