"""``distill-llm``: one command per stage, all reading the same YAML config with dotted overrides.

    distill-llm generate CONFIG.yaml [key=value ...]   teacher -> shards
    distill-llm train    CONFIG.yaml [key=value ...]   shards -> student checkpoint
    distill-llm eval     CONFIG.yaml [model=PATH ...]  teacher and students scored side by side
    distill-llm run      CONFIG.yaml [key=value ...]   generate -> train -> eval
    distill-llm inspect  DIR                           what a shard set holds
    distill-llm config   CONFIG.yaml [key=value ...]   print the validated config
    distill-llm plan     CONFIG.yaml [key=value ...]   tokens, bytes, GPU-hours and fit, before anything runs
    distill-llm submit   CONFIG.yaml --address URL [--stage S] [--no-wait] [key=value ...]   a stage as a Ray job
    distill-llm jobs     status|logs|stop JOB_ID --address URL [--follow]                  manage submitted jobs
"""

from __future__ import annotations

import argparse
import sys

from .config import Config, ConfigError, dump_config, load_config

STAGES = ("generate", "train", "eval", "run")
JOB_COMMANDS = ("submit", "jobs")  # parsed by job_main: they take flags (--address ...) besides overrides


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
        from .teacher.stage import generate

        generate(cfg)
    elif stage == "train":
        from .student.stage import train

        train(cfg)
    elif stage == "eval":
        from .evaluation.stage import evaluate

        evaluate(cfg)
    elif stage == "run":
        from .teacher.stage import generate
        from .student.stage import train
        from .evaluation.stage import evaluate

        generate(cfg)
        student = train(cfg)
        evaluate(cfg, student=student)


def _job_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"distill-llm {command}")
    parser.add_argument("--address", help="job server (Ray dashboard) URL, e.g. http://HEAD:8265; "
                                           "default: RAY_ADDRESS, then ray.address of the config when it is http")
    parser.add_argument("--server-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="while following a job, give up after the job server is unreachable this long")
    if command == "submit":
        parser.add_argument("config", help="CONFIG.yaml")
        parser.add_argument("overrides", nargs="*", help="dotted.key=value")
        parser.add_argument("--stage", choices=STAGES, default="run")
        parser.add_argument("--no-wait", action="store_true", help="print the job id and return")
    else:
        parser.add_argument("action", choices=["status", "logs", "stop"])
        parser.add_argument("job_id")
        parser.add_argument("--follow", action="store_true", help="logs: follow until the job ends")
    return parser


def _follow_to_end(client, job_id: str, address: str, server_timeout_s: float) -> int:
    """Follow a job's logs; 0 when it succeeded, 1 with its error on stderr otherwise."""
    from .cluster import jobs

    try:
        final = jobs.follow(client, job_id, server_timeout_s=server_timeout_s)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} goes on (distill-llm jobs stop {job_id} --address {address})",
              file=sys.stderr)
        return 130
    if final == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED")
        return 0
    print(jobs.failure_report(client, job_id, final), file=sys.stderr)
    return 1


def _job_command(command: str, ns: argparse.Namespace) -> int:
    from .cluster import jobs

    if command == "submit":
        overrides = _eval_overrides(ns.overrides) if ns.stage == "eval" else ns.overrides
        cfg = load_config(ns.config, overrides)  # a typo fails here, before anything reaches the cluster
        address = jobs.resolve_address(ns.address, cfg.ray.address)
        client, job_id = jobs.submit(address, ns.config, ns.stage, ns.overrides, cfg)
        print(f"submitted job {job_id} ({ns.stage}) to {address}", flush=True)
        if ns.no_wait:
            print(f"follow it: distill-llm jobs logs {job_id} --follow --address {address}", file=sys.stderr)
            return 0
        return _follow_to_end(client, job_id, address, ns.server_timeout)
    address = jobs.resolve_address(ns.address)
    client = jobs.connect(address)
    if ns.action == "status":
        print(jobs.describe(jobs.info(client, ns.job_id)))
    elif ns.action == "stop":
        print(f"job {ns.job_id} {jobs.stop(client, ns.job_id)}")
    elif ns.follow:
        return _follow_to_end(client, ns.job_id, address, ns.server_timeout)
    else:
        print(jobs.logs(client, ns.job_id), end="")
    return 0


def job_main(argv: list[str]) -> int:
    """``submit`` and ``jobs``: ConfigError exits 2, an unreachable server or a failed job 1."""
    from .cluster.jobs import JobError

    command = argv[0]
    ns = _job_parser(command).parse_intermixed_args(argv[1:])
    try:
        return _job_command(command, ns)
    except ConfigError as err:
        print(f"distill-llm {command}: error: {err}", file=sys.stderr)
        return 2
    except JobError as err:
        print(f"distill-llm {command}: error: {err}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in JOB_COMMANDS:
        return job_main(argv)
    parser = argparse.ArgumentParser(prog="distill-llm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=[*STAGES, "inspect", "config", "plan", *JOB_COMMANDS])
    parser.add_argument("args", nargs=argparse.REMAINDER, help="CONFIG.yaml and dotted.key=value overrides")
    ns = parser.parse_args(argv)
    try:
        if ns.command == "inspect":
            from .corpus.shards import format_inspect, inspect

            if len(ns.args) != 1:
                parser.error("inspect takes one shard directory")
            print(format_inspect(inspect(ns.args[0])))
        elif ns.command == "config":
            print(dump_config(load("config", ns.args)), end="")
        elif ns.command == "plan":
            from .cluster.plan import EXIT_CANNOT_FIT, format_plan, plan

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
