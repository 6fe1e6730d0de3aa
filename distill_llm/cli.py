"""``distill-llm``: one command per stage, all reading the same YAML config with dotted overrides.

    distill-llm generate CONFIG.yaml [key=value ...]   teacher -> shards
    distill-llm train    CONFIG.yaml [key=value ...]   shards -> student checkpoint
    distill-llm eval     CONFIG.yaml [model=PATH ...]  teacher and students scored side by side
    distill-llm run      CONFIG.yaml [key=value ...]   generate -> train -> eval
    distill-llm inspect  DIR                           what a shard set holds
    distill-llm config   CONFIG.yaml [key=value ...]   print the validated config
    distill-llm plan     CONFIG.yaml [key=value ...]   tokens, bytes, GPU-hours and fit, before anything runs
"""

from __future__ import annotations

import argparse
import sys

from .config import Config, ConfigError, dump_config, load_config

STAGES = ("generate", "train", "eval", "run")


def _split(args: list[str]) -> tuple[str | None, list[str]]:
    """(config path or None, overrides): the config is the first argument without '='."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _eval_overrides(overrides: list[str]) -> list[str]:
    """``model=PATH`` (repeatable) is shorthand for adding PATH to eval.models."""
    models = [o.split("=", 1)[1] for o in overrides if o.startswith("model=")]
    rest = [o for o in overrides if not o.startswith("model=")]
    return rest + ([f"eval.models=[{','.join(repr(m) for m in models)}]"] if models else [])


def load(stage: str, args: list[str]) -> Config:
    path, overrides = _split(args)
    if stage == "eval":
        overrides = _eval_overrides(overrides)
    return load_config(path, overrides)


def run_stage(stage: str, cfg: Config) -> None:
    if stage == "generate":
        from .generation import generate

        generate(cfg)
    elif stage == "train":
        from .training import train

        train(cfg)
    elif stage == "eval":
        from .evaluate import evaluate

        evaluate(cfg)
    elif stage == "run":
        from .generation import generate
        from .training import train
        from .evaluate import evaluate

        generate(cfg)
        student = train(cfg)
        evaluate(cfg, student=student)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distill-llm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=[*STAGES, "inspect", "config", "plan"])
    parser.add_argument("args", nargs=argparse.REMAINDER, help="CONFIG.yaml and dotted.key=value overrides")
    ns = parser.parse_args(argv)
    try:
        if ns.command == "inspect":
            from .shards import format_inspect, inspect

            if len(ns.args) != 1:
                parser.error("inspect takes one shard directory")
            print(format_inspect(inspect(ns.args[0])))
        elif ns.command == "config":
            print(dump_config(load("config", ns.args)), end="")
        elif ns.command == "plan":
            from .plan import EXIT_CANNOT_FIT, format_plan, plan

            cfg = load("plan", ns.args)
            result = plan(cfg)
            print(format_plan(result, cfg))
            if not result.fits:
                return EXIT_CANNOT_FIT
        else:
            run_stage(ns.command, load(ns.command, ns.args))
    except ConfigError as err:
        print(f"distill-llm {ns.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
