"""``distill-llm``: one command per stage, all reading the same YAML config with dotted overrides.

    distill-llm generate CONFIG.yaml [key=value ...]   teacher -> shards
    distill-llm train    CONFIG.yaml [key=value ...]   shards -> student checkpoint
    distill-llm eval     CONFIG.yaml [model=PATH ...]  teacher and students scored side by side
    distill-llm run      CONFIG.yaml [key=value ...]   generate -> train -> eval
    distill-llm curate   CONFIG.yaml [key=value ...]   shard sets -> filtered shard set in curate.output
    distill-llm rounds   CONFIG.yaml [key=value ...]   on-policy rounds: student samples, teacher scores, student trains
    distill-llm quantize CONFIG.yaml [key=value ...]   student -> one quantised folder per quantize.schemes
    distill-llm inspect  DIR                           what a shard set holds
    distill-llm config   CONFIG.yaml [key=value ...]   print the validated config
    distill-llm plan     CONFIG.yaml [key=value ...]   tokens, bytes, GPU-hours and fit, before anything runs
    distill-llm submit   CONFIG.yaml --address URL [--stage S] [--no-wait] [key=value ...]   a stage as a Ray job
    distill-llm jobs     status|logs|stop JOB_ID --address URL [--follow]                  manage submitted jobs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from .config import Config, ConfigError, dump_config, load_config

STAGES = ("generate", "train", "eval", "run", "curate", "rounds")
JOB_COMMANDS = ("submit", "jobs")
DEBUG_ENV = "DISTILL_LLM_DEBUG"  # 1: print the traceback of an unexpected error (as --debug does)

# Each command: (one-line summary, what it does, an example).
COMMANDS = {
    "generate": ("teacher -> shards in output.dir",
                 "Run the teacher over data.prompts and write Parquet shards with top-k logprobs to output.dir "
                 "(resumable: a rerun skips committed samples).",
                 "distill-llm generate configs/quickstart.yaml data.num_prompts=64 output.dir=runs/a/shards"),
    "train": ("shards -> student checkpoint in output.student_dir",
              "Train the student on the shards (data.shards, default output.dir) with Ray Train and export a "
              "Hugging Face folder to output.student_dir.",
              "distill-llm train configs/quickstart.yaml train.max_steps=200 train.alpha=0.5"),
    "eval": ("teacher and students scored side by side",
             "Serve the teacher, the base and distilled student and any model=PATH, and score them on "
             "eval.prompts; writes report.json / report.md to output.eval_dir.",
             "distill-llm eval configs/quickstart.yaml model=runs/other/student eval.num_prompts=50"),
    "run": ("generate -> train -> eval",
            "The three stages one after the other, with one config.",
            "distill-llm run configs/quickstart.yaml"),
    "curate": ("shard sets -> filtered shard set in curate.output",
               "Deduplicate, decontaminate, verify and filter the shard sets of curate.inputs into a new shard set "
               "(resumable; removed rows are kept in rejects/ with their reason).",
               "distill-llm curate configs/curate.yaml curate.verify.correct_only=true"),
    "rounds": ("on-policy rounds: the student samples, the teacher scores, the student trains",
               "For rounds.n rounds from student.model: the current student samples rounds.prompts_per_round prompts, "
               "the teacher scores every position of its samples (top-k by prefill) and the student trains on them "
               "(train.divergence: reverse_kl recommended) and is exported (resumable, round by round).",
               "distill-llm rounds configs/quickstart.yaml rounds.n=3 student.model=runs/quickstart/student "
               "train.divergence=reverse_kl"),
    "quantize": ("student -> one quantised folder per quantize.schemes",
                 "Quantise the exported student (or quantize.model) into one compressed-tensors folder per scheme "
                 "(w8a8-int8, w4a16, fp8-dynamic) that vLLM serves, with a model card; corpus rows measure the cost.",
                 "distill-llm quantize configs/quickstart.yaml 'quantize.schemes=[w8a8-int8,w4a16]'"),
    "inspect": ("what a shard set holds",
                "Rows, prompts, completion tokens, k, bytes per token, finish reasons and the answer pass rate of "
                "a shard set, computed from its files.",
                "distill-llm inspect runs/quickstart/shards --json"),
    "config": ("print the validated config",
               "Read the config and the overrides, validate them and print the full config with every default.",
               "distill-llm config configs/quickstart.yaml train.alpha=0"),
    "plan": ("tokens, bytes, GPU-hours and fit, before anything runs",
             "Estimate what the config will cost and flag what cannot fit (exit 3) without starting anything.",
             "distill-llm plan configs/r1distill-qwen7b.yaml plan.gpu_type=H200"),
    "submit": ("a stage as a Ray job",
               "Validate the config here, submit a stage to a Ray cluster's job server and follow its log "
               "(exit 0 when the job SUCCEEDED).",
               "distill-llm submit configs/quickstart.yaml --address http://HEAD:8265 --stage generate "
               "output.dir=s3://BUCKET/run1/shards"),
    "jobs": ("manage submitted jobs",
             "Status, logs (--follow) or stop of a job submitted with `distill-llm submit`.",
             "distill-llm jobs logs raysubmit_XXXX --follow --address http://HEAD:8265"),
}


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
    elif stage == "curate":
        from .curation.stage import curate
        from .evaluation.stage import sample_passes

        curate(cfg, sample_passes)
    elif stage == "rounds":
        from .rounds.stage import rounds

        rounds(cfg)
    elif stage == "quantize":
        from .quantize.stage import quantize

        quantize(cfg)
    elif stage == "run":
        from .teacher.stage import generate
        from .student.stage import train
        from .evaluation.stage import evaluate
        from .quantize.stage import check_quantize, quantize

        check_quantize(cfg)  # a scheme this device cannot serve stops the run before the teacher starts
        generate(cfg)
        student = train(cfg)
        if cfg.quantize is not None:
            quantize(cfg)
        evaluate(cfg, student=student)


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
        if ns.stage in ("generate", "train", "run"):  # refused here, not after the cluster's GPU time
            from .cluster.plan import hub_offline
            from .tokenizers import check_pair

            check_pair(cfg, "submit", hub_offline)
        if ns.stage == "rounds":
            from .rounds.stage import check_rounds

            check_rounds(cfg)
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


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml",
                        help="the YAML config (omitted: the built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value",
                        help="overrides parsed as YAML scalars, e.g. train.alpha=0 student.lora=null")


def _add_job_args(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--address", help="job server (Ray dashboard) URL, e.g. http://HEAD:8265; "
                                           "default: RAY_ADDRESS, then ray.address of the config when it is http")
    parser.add_argument("--server-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="while following a job, give up after the job server is unreachable this long")
    if command == "submit":
        _add_config_args(parser)
        parser.add_argument("--stage", choices=STAGES, default="run")
        parser.add_argument("--no-wait", action="store_true", help="print the job id and return")
    else:
        parser.add_argument("action", choices=["status", "logs", "stop"])
        parser.add_argument("job_id")
        parser.add_argument("--follow", action="store_true", help="logs: follow until the job ends")


def command_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one command, with its own --help: what it does, its arguments and an example."""
    summary, description, example = COMMANDS[command]
    parser = argparse.ArgumentParser(prog=f"distill-llm {command}", description=f"{summary}. {description}",
                                     epilog=f"example:\n  {example}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if command in JOB_COMMANDS:
        _add_job_args(parser, command)
    elif command == "inspect":
        parser.add_argument("dir", metavar="DIR", help="a shard set: a local folder or an s3:// / gs:// URL")
        parser.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    else:
        _add_config_args(parser)
    if command == "eval":
        parser.epilog += "\n\nmodel=PATH (repeatable) adds PATH to eval.models."
    parser.add_argument("--debug", action="store_true",
                        help=f"print the traceback of an unexpected error (or set {DEBUG_ENV}=1)")
    return parser


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<9} {summary}" for name, (summary, _, _) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="distill-llm", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Offline LLM distillation on Ray: every command reads the same YAML config with dotted "
                    f"overrides.\n\ncommands:\n{lines}\n\n`distill-llm COMMAND --help` shows a command's "
                    "arguments and an example.")
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    return parser


def _config_and_overrides(ns: argparse.Namespace) -> tuple[str | None, list[str]]:
    """An override in the config's place (no file, just overrides) goes back to the overrides."""
    if ns.config is not None and "=" in ns.config:
        return None, [ns.config, *ns.overrides]
    return ns.config, list(ns.overrides)


def _run_command(command: str, ns: argparse.Namespace) -> int:
    if command in JOB_COMMANDS:
        if command == "submit":
            ns.config, ns.overrides = _config_and_overrides(ns)
            if ns.config is None:
                raise ConfigError("submit needs a config file: distill-llm submit CONFIG.yaml --address URL")
        return _job_command(command, ns)
    if command == "inspect":
        from .corpus.shards import format_inspect, inspect

        info = inspect(ns.dir)
        print(json.dumps(info, indent=2, sort_keys=True) if ns.json else format_inspect(info))
        return 0
    path, overrides = _config_and_overrides(ns)
    args = ([path] if path else []) + overrides
    if command == "config":
        print(dump_config(load("config", args)), end="")
    elif command == "plan":
        from .cluster.plan import EXIT_CANNOT_FIT, format_plan, plan

        cfg = load("plan", args)
        result = plan(cfg)
        print(format_plan(result, cfg))
        if not result.fits:
            return EXIT_CANNOT_FIT
    else:
        run_stage(command, load(command, args))
    return 0


def unexpected_error(command: str, err: BaseException) -> str:
    """One line for an error that is not a config error: what failed, and what to do next."""
    text = " ".join(str(err).split()) or "(no message)"
    if len(text) > 400:
        text = text[:400] + " ..."
    return (f"distill-llm {command}: failed: {type(err).__name__}: {text} -- fix the cause named here and rerun the "
            f"same command (stages resume from what they committed); --debug or {DEBUG_ENV}=1 prints the "
            "traceback")


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success, 2 on a config error, 1 on any other error (one line; the traceback with --debug)."""
    from .cluster.jobs import JobError

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        top = _top_parser()
        if not argv:
            top.print_help(sys.stderr)
            return 2
        top.parse_args(argv[:1])  # --help, or an error naming the valid commands
        return 2
    command = argv[0]
    ns = command_parser(command).parse_intermixed_args(argv[1:])
    debug = ns.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return _run_command(command, ns)
    except ConfigError as err:
        print(f"distill-llm {command}: error: {err}", file=sys.stderr)
        return 2
    except JobError as err:
        print(f"distill-llm {command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"distill-llm {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            traceback.print_exc()
        print(unexpected_error(command, err), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
