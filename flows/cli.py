"""The `skeleton` command (installed by `pip install -e .`): one entry point for everything a user runs.

    skeleton sweep [--task T] [--backbone B] ...   the sweep flow; its options are flows.config.SweepConfig's fields
    skeleton benchmark [--demo | --skeletons DIR ...]   latency of skeletons vs the full model (flows/commands/benchmark.py)
    skeleton list | classify --task NAME TEXT ...  the exported task experts, and classifying with one
    skeleton serve TASK=SOURCE ...                 the REST server: task experts on one backbone (flows/commands/serve.py)
    skeleton promote --latest --rate R             a sweep's skeleton -> its task's registered model @production
    skeleton serve-bench | load-bench              serving's memory; REST throughput under load, skeleton vs full
    skeleton stack up | down | status              the local Prefect + MLflow stack (flows/commands/stack.py)
    skeleton nightly run | promote                 the nightly benchmark regression and its baseline (flows/nightly.py)
    skeleton verify RESULTS.parquet                every exported model reloads with its logits (flows/commands/verify_exports.py)
    skeleton gc [--delete]                         artifacts nothing refers to, listed or removed (tasks/gc.py)

An error prints as one line and exits 2; `skeleton --debug ...` shows the traceback. torch and Prefect are
imported only by the command that runs, so every --help is quick.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys

from flows.config import NightlyConfig, SweepConfig, add_options, from_options
from flows.settings import configure
# Commands that parse their own options: a module with main(argv, prog) -> exit code (flows/commands/, tasks/gc.py).
COMMANDS = {
    "benchmark": ("flows.commands.benchmark", None, "latency of the full model against its skeletons, beside the arithmetic bound"),
    "list": ("flows.commands.experts", "list", "list the task experts available (exported folders or MLflow)"),
    "classify": ("flows.commands.experts", "classify", "classify texts with one task expert on its backbone"),
    "serve-bench": ("flows.commands.serve_bench", None, "memory of one backbone + N experts vs N separate skeletons"),
    "serve": ("flows.commands.serve", None, "REST serving of task experts on one backbone, with dynamic batching"),
    "promote": ("flows.commands.promote", None, "register a sweep's skeleton under an alias (@production) for serving"),
    "load-bench": ("flows.commands.load_bench", None, "REST load test: the skeleton server against the full model's, same code"),
    "stack": ("flows.commands.stack", None, "start, stop or inspect the local Prefect + MLflow stack (up | down | status)"),
    "verify": ("flows.commands.verify_exports", None, "check that a sweep's exported models reload with their test logits"),
    "gc": ("tasks.gc", None, "list (--delete: remove) the artifacts no MLflow run, logged model or baseline refers to"),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="skeleton", description=__doc__.split("\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    top.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sweep = sub.add_parser("sweep", help="run the sweep: prompt tuning, attribution, skeletons, benchmark, MLflow",
                           description="Run the Skeleton sweep as a Prefect flow (on a server of its own, which ends "
                           "with it, unless PREFECT_API_URL is set). Options left out take their defaults; those marked "
                           "'the backbone family's' depend on the backbone (docs/methods.md).")
    add_options(sweep, SweepConfig)
    sweep.add_argument("--dask", metavar="ADDRESS", help="run sweep points on a Dask cluster: a scheduler address "
                       "(tcp://host:8786), or 'local:N' for a local cluster of N workers")

    nightly = sub.add_parser("nightly", help="nightly benchmark regression: run now, or promote a baseline")
    which = nightly.add_subparsers(dest="nightly_command", required=True, metavar="run|promote")
    run = which.add_parser("run", help="measure the reference skeletons now and compare with the baseline")
    add_options(run, NightlyConfig)
    promote = which.add_parser("promote", help="accept a sweep's skeletons as the new baseline")
    source = promote.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-id", help="MLflow parent run id of a sweep")
    source.add_argument("--latest", action="store_true", help="the latest finished sweep")
    promote.add_argument("--method", default="grad_x_act", help="selection method of the reference skeletons")
    promote.add_argument("--experiment", default="skeleton", help="MLflow experiment of the sweeps")

    for name, (_, _, help_text) in COMMANDS.items():
        # The module parses its own options (and answers --help with them).
        command = sub.add_parser(name, help=help_text, add_help=False, prefix_chars="\0")
        command.add_argument("args", nargs=argparse.REMAINDER)
    return top


def sweep(args) -> int:
    from flows.server import ended_by_signals, sweep_server

    with ended_by_signals():  # from here on a SIGTERM or SIGHUP cleans up as Ctrl-C does
        from flows.sweep import dask_runner, full_sweep
        from skeleton.data import check_source

        config = from_options(SweepConfig, args)
        config.resolved()  # unknown backbone or method: one line now, not a failed flow run
        check_source(config.task, config.data_file, config.text_column, config.label_column)  # bad data: the same
        flow = full_sweep.with_options(task_runner=dask_runner(args.dask)) if args.dask else full_sweep
        with sweep_server():
            flow(**dataclasses.asdict(config))
    return 0


def nightly(args) -> int:
    from flows import nightly as flows_nightly

    if args.nightly_command == "run":
        flows_nightly.nightly_benchmark(**dataclasses.asdict(from_options(NightlyConfig, args)))
        return 0
    baseline = flows_nightly.promote_from_mlflow(args.run_id, args.method, args.experiment)
    print(f"baseline promoted from {baseline['source']}: " +
          ", ".join(f"p={p['rate']} {p['speedup']:.2f}x acc {p['accuracy']:.4f}" for p in baseline["points"]))
    return 0


def dispatch(args) -> int:
    if args.command in COMMANDS:
        module, first, _ = COMMANDS[args.command]
        # A module with subcommands of its own (experts: list, classify) names them itself.
        argv, prog = ([first, *args.args], "skeleton") if first else (args.args, f"skeleton {args.command}")
        return importlib.import_module(module).main(argv, prog=prog) or 0
    return {"sweep": sweep, "nightly": nightly}[args.command](args)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    configure()  # before anything imports Prefect, which reads its settings once
    try:
        code = dispatch(args)
    except KeyboardInterrupt:
        code = 130
    except SystemExit as e:  # the commands' own errors: SystemExit("message") or an exit code
        if args.debug or e.code is None or isinstance(e.code, int):
            raise
        print(f"skeleton {args.command}: error: {e.code}", file=sys.stderr)
        code = 2
    except Exception as e:
        if args.debug:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() adds quotes
        print(f"skeleton {args.command}: error: {message}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
