"""Starting or joining Ray, and what the cluster offers."""

from __future__ import annotations

import logging
import os

from .config import RayConfig


def init_ray(cfg: RayConfig) -> None:
    """Join ``ray.address`` / RAY_ADDRESS, or start a local Ray bound to loopback."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # The library travels to workers as an installed package; only settings go in the runtime env.
    env = {"env_vars": {k: v for k, v in os.environ.items() if k.startswith(("DISTILL_LLM_", "VLLM_", "HF_"))}}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=env, logging_level=logging.WARNING)
    else:
        # Logical CPUs are scheduling tokens: on a 2-core laptop two Train workers would take both and
        # starve the Ray Data tasks that feed them (a deadlock), so a local Ray gets at least 4.
        ray.init(num_cpus=cfg.num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False,
                 dashboard_host=cfg.dashboard_host,
                 runtime_env=env, logging_level=logging.WARNING, configure_logging=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.print_on_execution_start = False


def cluster_gpus() -> float:
    import ray

    return ray.cluster_resources().get("GPU", 0.0)


def cluster_cpus() -> float:
    import ray

    return ray.cluster_resources().get("CPU", 0.0)
