"""`tunelab <stage>`: one thin subcommand per stage. Each loads and validates the study config, sets up
logging and calls the stage's entry. A user error exits 2 with its message; a bug keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tunelab import gpus, hub
from tunelab.config import Study, check_runtime, load_study
from tunelab.errors import TunelabError

log = logging.getLogger("tunelab")


def _validate(study: Study, args) -> None:
    check_runtime(study)
    models = sorted({r.model for r in study.runs})
    print(f"{study.path}: study {study.name!r}: {len(study.runs)} runs, {len(models)} models "
          f"({', '.join(models)}), data {study.data.source}")
    for warning in hub.unpinned_warnings(study):
        print(f"warning: {warning}", file=sys.stderr)


def _lock(study: Study, args) -> None:
    for source, commit in hub.write_lock(study, offline=args.offline).items():
        print(f"{source} -> {commit}")
    print(f"wrote {hub.lock_path(study.path)}")


def _data(study: Study, args) -> None:
    from tunelab.data import run_data

    run_data(study.data, args.out, hub.read_lock(study.path))


def _base(study: Study, args) -> None:
    from tunelab.base import run_base, storage_dtype

    if args.model not in study.models:
        raise TunelabError(f"{study.path}: no model named {args.model!r} (models: {', '.join(study.models)})")
    run_base(study.models[args.model], args.data, args.out,
             dtype=storage_dtype([r.train for r in study.runs if r.model == args.model]), lock=hub.read_lock(study.path))


def _tokenize(study: Study, args) -> None:
    from tunelab.modeling import base_path, load_tokenizer
    from tunelab.tokenize import run_tokenize

    run_tokenize(study.data, load_tokenizer(base_path(args.base)), args.data, args.out)


def _train(study: Study, args) -> None:
    from tunelab.distributed import launch
    from tunelab.train import run_train

    check_runtime(study)
    run = study.run(args.run)
    if run.train.world_size > 1 and not launch.is_rank():  # start the launcher; each rank runs this command again
        import torch

        worker_args = [str(a) for o in ("config", "run", "base", "tokens", "out") for a in (f"--{o}", getattr(args, o))]
        status = launch.launch(run.train.distributed, worker_args, gpus=torch.cuda.is_available())
        if status:
            raise SystemExit(status)
        return
    run_train(run, args.base, args.tokens, args.out)


def _merge(study: Study, args) -> None:
    from tunelab.merge import run_merge

    study.run(args.run)
    run_merge(args.out, args.tokens, study.merge)


def _generate(study: Study, args) -> None:
    from tunelab.generate import generate_answers, run_generate

    if args.model_dir:  # answer prompts with any trained, merged or exported model
        instructions = list(args.prompt or [])
        if args.prompts:
            instructions += [line for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not instructions:
            raise TunelabError("generate --model needs --prompt TEXT or --prompts FILE")
        if not args.model_dir.is_dir():
            raise TunelabError(f"generate --model {args.model_dir}: no such model directory")
        answers = generate_answers(args.model_dir, instructions, study.generation, study.data.prompt_format)
        for instruction, answer in zip(instructions, answers):
            print(json.dumps({"instruction": instruction, "answer": answer}, ensure_ascii=False))
        return
    missing = [f"--{o}" for o in ("run", "base", "data", "tokens", "out") if getattr(args, o) is None]
    if missing:
        raise TunelabError(f"generate needs {', '.join(missing)} (or --model DIR --prompt TEXT)")
    reference = args.run in study.reference_runs
    model_dir = None if reference else args.out / "model"
    if args.run in study.merged_runs:  # a run's merged model, scored as its own row
        model_dir = args.out.parent / study.merged_runs[args.run] / "merged"
    elif not reference and args.run not in study.export_runs:
        study.run(args.run)
    run_generate(model_dir, args.base, args.data, args.tokens, study.generation, args.out,
                 study.data.prompt_format, study.reference_settings(args.run) if reference else None)


def _serve(study: Study, args) -> None:
    from tunelab.serve import run_serve

    if args.model_dir is None:
        raise TunelabError("serve needs --model DIR (a trained, merged or exported model directory)")
    run_serve(args.model_dir, study.generation, study.data.prompt_format, args.host, args.port, args.max_batch_size)


def _export(study: Study, args) -> None:
    from tunelab.export import run_export

    if args.run not in study.export_runs:
        raise TunelabError(f"{study.path}: no export named {args.run!r} (exports: {', '.join(study.export_runs)})")
    run, export_format = study.export_runs[args.run]
    run_export(args.merged, export_format, study.exports, args.tokens, args.out, study.run(run).train)


def _score(study: Study, args) -> None:
    from tunelab.score import run_score

    run_score(study.metrics, args.generations, args.data / "test.jsonl", args.out)


def _status(study: Study, args) -> None:
    from tunelab.status import run_status

    run_status(study, args.results, args.watch)


def _report(study: Study, args) -> None:
    from tunelab.report import run_report

    run_report(study, args.runs, args.out)


STAGES = {
    "validate": (_validate, "check a study config and summarise it (warns about unpinned hf: sources)", ()),
    "lock": (_lock, "resolve every hf: source to a commit and write the study's lock file", ("offline",)),
    "data": (_data, "load, check and split the dataset", ("out",)),
    "base": (_base, "make a study model available locally (build and warm up the tiny one)", ("model", "data", "out")),
    "tokenize": (_tokenize, "apply the prompt template and tokenize every split", ("base", "data", "out")),
    "train": (_train, "train one run", ("run", "base", "tokens", "out")),
    "merge": (_merge, "merge a run's adapter into its base (safetensors in the run's precision)", ("run", "tokens", "out")),
    "export": (_export, "quantize a merged run for deployment (nf4, int8, pruned_int8)",
               ("run", "merged", "tokens", "out")),
    "generate": (_generate, "test loss and generations of a run or a base; or answers of any model to prompts",
                 ("run", "base", "data", "tokens", "out", "model_dir", "prompt", "prompts")),
    "score": (_score, "score a run's generations (exact match, BLEU, ROUGE-L, BERTScore, CodeBLEU)",
              ("generations", "data", "out")),
    "serve": (_serve, "serve a trained, merged or exported model over an OpenAI-compatible HTTP API",
              ("model_dir", "host", "port", "max_batch_size")),
    "report": (_report, "aggregate every run into summary.csv, report.md/html and plots", ("runs", "out")),
    "status": (_status, "where each run of a study stands (stage, step, loss, tokens/s, ETA), from its results",
               ("results", "watch")),
}
GPU_STAGES = ("merge", "export", "generate", "serve")  # train: its run's GPUs
OPTIONS = {"model": (str, "model name from the study's models"), "run": (str, "run name from the study's runs"),
           "data": (Path, "the data stage's directory"), "base": (Path, "the base stage's directory of the model"),
           "tokens": (Path, "the tokenize stage's directory of the model"), "out": (Path, "output directory"),
           "generations": (Path, "a generations.jsonl"), "runs": (Path, "the directory of every run"),
           "merged": (Path, "a run's merged model directory")}
OPTIONAL = {  # options of `generate --model`: an argument list, not Snakemake's files
    "model_dir": dict(flags=["--model"], type=Path, help="a trained, merged or exported model directory"),
    "prompt": dict(flags=["--prompt"], action="append", help="an instruction to answer (repeatable)"),
    "prompts": dict(flags=["--prompts"], type=Path, help="a file of instructions, one per line"),
    "results": dict(flags=["--results"], type=Path, default=Path("results"), help="the study's results folder"),
    "watch": dict(flags=["--watch"], type=float, nargs="?", const=5.0, default=None, metavar="SECONDS",
                  help="refresh every SECONDS (default 5) until no run is running or queued"),
    "offline": dict(flags=["--offline"], action="store_true",
                    help="record sources pinned to a full commit hash without asking the Hub"),
    "host": dict(flags=["--host"], default="127.0.0.1", help="address to listen on (default 127.0.0.1)"),
    "port": dict(flags=["--port"], type=int, default=8000, help="port to listen on (default 8000)"),
    "max_batch_size": dict(flags=["--max-batch-size"], type=int, default=32,
                           help="most requests' rows run together on the model (default 32)"),
}


def _gpus_used(study: Study, args) -> int:
    """GPUs the stage takes if the machine has them (tunelab.gpus claims them): a run's GPUs per node for train,
    one for the other stages whose rules ask for a GPU, none for the rest."""
    if args.stage == "train":
        distributed = study.run(args.run).train.distributed
        return distributed.gpus if distributed else 1
    return 1 if args.stage in GPU_STAGES else 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="tunelab", description=__doc__.splitlines()[0])
    root.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = root.add_subparsers(dest="stage", required=True)
    for stage, (_, help_text, options) in STAGES.items():
        command = commands.add_parser(stage, help=help_text, description=help_text)
        if stage == "validate":
            command.add_argument("config", type=Path, help="study YAML")
        else:
            command.add_argument("--config", type=Path, default=Path("config.yaml"), help="study YAML")
        for option in options:
            if option in OPTIONAL:
                spec = dict(OPTIONAL[option])
                command.add_argument(*spec.pop("flags"), dest=option, **spec)
                continue
            kind, option_help = OPTIONS[option]
            command.add_argument(f"--{option}", type=kind, required=stage != "generate", help=option_help)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        study = load_study(args.config)
        gpus.claim(_gpus_used(study, args), " ".join(["tunelab", args.stage, getattr(args, "run", None) or ""]).strip())
        STAGES[args.stage][0](study, args)
    except TunelabError as err:
        print(f"tunelab {args.stage}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
