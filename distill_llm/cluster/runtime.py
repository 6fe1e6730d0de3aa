"""Starting or joining Ray, and what the cluster offers."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Mapping

from ..config import RayConfig


# Settings that every worker must share with the driver: the package's own, the engine's, the hub's
# cache and offline switches, and where the object store is (AWS_ENDPOINT_URL[_S3], region, profile).
FORWARD_PREFIXES = ("DISTILL_LLM_", "VLLM_", "HF_", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
                    "AWS_PROFILE")
# Never forwarded, whatever the prefix: a runtime_env is stored in Ray's GCS, shown by the dashboard and
# `ray job` tooling, and written to Ray's logs, so a token in it (HF_TOKEN, AWS_SECRET_ACCESS_KEY,
# DISTILL_LLM_API_KEY) would be readable by everyone who can see the cluster. Workers get secrets the
# way the driver does: a local Ray's workers inherit its environment, cluster nodes have their own
# (instance roles, env set where the nodes start, a secrets manager).
SECRET_WORDS = ("TOKEN", "SECRET", "KEY", "PASS", "CREDENTIAL", "AUTH", "COOKIE", "PRIVATE", "SIGNATURE")


def forwarded_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment variables a job hands its Ray workers: settings, never secrets."""
    return {k: v for k, v in environ.items()
            if k.startswith(FORWARD_PREFIXES) and not any(word in k.upper() for word in SECRET_WORDS)}


def _job_env_vars() -> set[str]:
    """Env var names the runtime_env of the Ray job running this driver sets (none outside a job)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job manager for the entrypoint
    if not raw:
        return set()
    return set((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})


def init_ray(cfg: RayConfig) -> None:
    """Join ``ray.address`` / RAY_ADDRESS (``auto``: the Ray already running here), else start a private Ray.

    Without an address the local Ray is always a new, private instance (Ray's ``address="local"``): a head
    started on this machine with ``ray start --head``, or the stale record of a dead one (``ray_current_cluster``
    in Ray's temp dir), is neither joined nor an error. ``ray.address: auto`` joins the running head instead.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Inside a submitted job Ray refuses a ray.init env var that the job's runtime_env sets too (and the
    # job's already reach every worker), so those are left out.
    job_vars = _job_env_vars()
    env = {"env_vars": {k: v for k, v in forwarded_env(os.environ).items() if k not in job_vars}}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=env, logging_level=logging.WARNING)
    else:
        # Logical CPUs are scheduling tokens: on a 2-core laptop two Train workers would take both and
        # starve the Ray Data tasks that feed them (a deadlock), so a local Ray gets at least 4.
        num_cpus = cfg.num_cpus or max(4, os.cpu_count() or 1)
        recorded = running_head_recorded()
        other = (f"; the Ray head recorded at {recorded} is not joined (ray.address=auto joins it)"
                 if recorded else "")
        print(f"ray: starting a private local Ray ({num_cpus} CPUs){other}", file=sys.stderr, flush=True)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 dashboard_host=cfg.dashboard_host,
                 runtime_env=env, logging_level=logging.WARNING, configure_logging=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.print_on_execution_start = False


def running_head_recorded() -> str | None:
    """The address in Ray's ``ray_current_cluster`` record (written by ``ray start``), or None.

    The record lies in Ray's default temp dir (RAY_TMPDIR, else TMPDIR on Linux, else /tmp, plus ``/ray``)
    and may point at a head that has since died; either way a run without ``ray.address`` does not use it.
    """
    from ray._common.utils import get_ray_address_file

    try:
        return Path(get_ray_address_file(None)).read_text().strip() or None
    except OSError:
        return None


def cluster_gpus() -> float:
    import ray

    return ray.cluster_resources().get("GPU", 0.0)
