"""distill-llm: offline LLM distillation on Ray.

The public surface for notebooks and scripts (the CLI, ``distill-llm``, runs the same functions)::

    import distill_llm as dl

    cfg = dl.load_config("configs/quickstart.yaml", ["data.num_prompts=64"])
    dl.generate(cfg)                      # teacher -> shards in cfg.output.dir
    rows = dl.read_shards(cfg.output.dir)  # a pyarrow Table; rows.to_pandas()
    student = dl.train(cfg)               # shards -> Hugging Face folder
    dl.evaluate(cfg, student)             # teacher and students side by side
    dl.rounds(cfg)                        # with a rounds: section: on-policy rounds (README, "Rounds")

Everything else is internal. Importing this package imports neither torch nor Ray: each function loads
its stage when called.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

# Once torchao (train.qat) is installed, transformers and vLLM import it in every process. On a machine without
# CUDA its import warns that its CUDA kernels do not load, and torch warns about its enum registration; neither
# touches a run, but each process printed them (about 20 lines a quickstart) in words that read as errors.
# Every process of a run imports this package before transformers or vLLM (the CLI, Ray workers unpickling our
# functions, engine processes started through teacher.tracker), so the loggers are quieted here.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from .config import Config, ConfigError, load_config

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["Config", "ConfigError", "load_config", "generate", "train", "evaluate", "rounds", "read_shards"]


def generate(cfg: Config) -> dict[str, Any]:
    """Run the teacher stage: prompts -> vLLM on Ray Data -> committed Parquet shards in ``cfg.output.dir``.

    Resumes a matching run found there; returns the manifest.
    """
    from .teacher.stage import generate as run

    return run(cfg)


def train(cfg: Config) -> str:
    """Run the student stage on the shards in ``cfg.shard_dirs``; returns the exported student folder."""
    from .student.stage import train as run

    return run(cfg)


def evaluate(cfg: Config, student: str | None = None) -> dict[str, dict[str, Any]]:
    """Score the teacher, the base student and ``student`` (a folder) side by side; returns each model's scores."""
    from .evaluation.stage import evaluate as run

    return run(cfg, student)


def rounds(cfg: Config) -> list[dict[str, Any]]:
    """Run ``cfg.rounds.n`` on-policy rounds (the student samples, the teacher scores, the student trains);
    resumes finished rounds and stages; returns each round's record (round.json)."""
    from .rounds.stage import rounds as run

    return run(cfg)


def read_shards(shard_dir: str, columns: list[str] | None = None, verify: str = "size") -> "pa.Table":
    """Every committed row of a shard set (local path or s3:// / gs:// URL) as one Arrow table."""
    from .corpus.shards import read_shards as read

    return read(shard_dir, columns, verify)
