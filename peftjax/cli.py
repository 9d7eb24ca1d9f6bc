"""The ``peftjax`` command.

    peftjax train CONFIG.yaml [KEY=VALUE ...] [--dry-run]   train (or plan) a run
    peftjax eval CONFIG.yaml [KEY=VALUE ...] [--split S] [--step N | --model DIR]
    peftjax export CONFIG.yaml [KEY=VALUE ...] --out DIR [--step N]   PEFT-format adapter
                                                               (HF model: full/head/ReLoRA)
    peftjax memory CONFIG.yaml [KEY=VALUE ...] [--json FILE]   device memory of the train step
    peftjax merge --model PATH --adapter DIR --out DIR [--dtype D]
                  [--quantization nf4|fp4|int4 [--blocksize N]] [--save-4bit]
                                                               merged HF checkpoint
    peftjax merge-adapters DIR DIR ... --weights W W ... [--type ties --density D] --out DIR
                                                               combined adapter (PEFT format)
    peftjax generate --model PATH [--adapter DIR] [--chat] PROMPT ...
    peftjax serve [SERVE.yaml] [--model PATH] [--adapter NAME=DIR ...] [--port N] ...
                                                               OpenAI-compatible server
    peftjax launch -n N [--cpu-devices K] -- train CONFIG.yaml [KEY=VALUE ...]
                                                               N processes (jax.distributed)

Overrides use dotted keys: ``peftjax train cfg.yaml train.lr=1e-4 peft.r=16``.
Exit codes: 0 done, 1 bad input (config, paths, checkpoints), 2 training diverged, 130
interrupted (a checkpoint was saved). ``PEFTJAX_DEBUG=1`` shows tracebacks for bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _add_config(p):
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. train.lr=1e-4 peft.r=16")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="peftjax", description="Parameter-efficient fine-tuning "
                                 "for JAX: train, evaluate, export and merge adapters.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train from a YAML config")
    _add_config(p)
    p.add_argument("--dry-run", action="store_true", help="validate the config, build the model "
                   "abstractly (no weights), print parameter counts and XLA's memory estimate")
    p = sub.add_parser("eval", help="evaluate a run's checkpoint on a split")
    _add_config(p)
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--model", default=None,
                   help="evaluate this Hugging Face checkpoint (e.g. a merged model from "
                   "`peftjax merge`) on the run's data instead of the run's checkpoint")
    p = sub.add_parser("export", help="write a run checkpoint as a PEFT-format adapter (or, "
                       "for runs that train weights, as a Hugging Face model)")
    _add_config(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p = sub.add_parser("memory", help="plan the train step's device memory (compiles on "
                       "abstract shapes; no weights)")
    _add_config(p)
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p = sub.add_parser("merge", help="fold a LoRA adapter into its base model (HF checkpoint)")
    p.add_argument("--model", required=True, help="base model: directory, Hub id or pkg:NAME")
    p.add_argument("--adapter", required=True, help="PEFT-format adapter directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--task", default=None, help="model task (default: from the adapter/config)")
    p.add_argument("--quantization", default=None, choices=["nf4", "fp4", "int4"],
                   help="QLoRA / QA-LoRA adapter: load the base in this 4-bit format (as in "
                   "training) and merge into its dequantized weights")
    p.add_argument("--blocksize", type=int, default=None,
                   help="4-bit blocksize, the group size for int4 (default 64), with "
                   "--quantization or --save-4bit")
    p.add_argument("--no-double-quant", action="store_true",
                   help="the 4-bit base was stored without double quantization")
    p.add_argument("--save-4bit", action="store_true",
                   help="store the merged layers in 4 bits again (--quantization's format, nf4 "
                   "by default) and write a 4-bit checkpoint (bitsandbytes; GPTQ layout for "
                   "int4); prints the quantization error this adds. A QA-LoRA adapter over "
                   "int4 folds into the zero points exactly instead")
    p.add_argument("--round-zeros", action="store_true",
                   help="with --quantization int4 --save-4bit: round the zero points a QA-LoRA "
                   "merge leaves to integers, for a standard GPTQ checkpoint any GPTQ runtime "
                   "loads (prints the weight change this makes; without it the exact float zero "
                   "points are kept in peftjax's variant of the layout)")
    p = sub.add_parser("merge-adapters", help="combine adapters into one (PEFT's "
                       "add_weighted_adapter), written as a PEFT-format adapter")
    p.add_argument("adapters", nargs="+", help="PEFT-format adapter directories (one method)")
    p.add_argument("--weights", type=float, nargs="+", required=True,
                   help="one weight per adapter (negative subtracts)")
    p.add_argument("--type", default=None, dest="combination_type",
                   help="LoRA: svd (default), linear, cat, ties, dare_linear, dare_ties, "
                   "magnitude_prune, or their *_svd forms; (IA)3: linear (a weighted sum)")
    p.add_argument("--density", type=float, default=None,
                   help="fraction of entries kept (ties, dare_*, magnitude_prune)")
    p.add_argument("--majority-sign", default=None, choices=["total", "frequency"],
                   help="TIES sign election (default total)")
    p.add_argument("--svd-rank", type=int, default=None,
                   help="rank of an SVD combination (default: the largest rank)")
    p.add_argument("--svd-clamp", type=float, default=None,
                   help="clamp the SVD factors at this quantile of their values")
    p.add_argument("--seed", type=int, default=None, help="DARE's random masks (default 0)")
    p.add_argument("--model", default=None,
                   help="base model (default: base_model_name_or_path of the first adapter)")
    p.add_argument("--task", default=None, help="model task (default: from the adapter)")
    p.add_argument("--out", required=True, help="output directory (the combined adapter)")
    p = sub.add_parser("generate", help="generate text with a model (and adapter)")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", default=None)
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("prompts", nargs="+")
    p = sub.add_parser("serve", help="serve a base model with many adapters over an "
                       "OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)")
    p.add_argument("config", nargs="?", default=None, help="YAML file of serve settings "
                   "(the flags' names with underscores; flags override it)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve the PEFT adapter in DIR as model NAME (repeatable)")
    from peftjax.serving._server import SETTINGS
    for key, (_, kind, text) in SETTINGS.items():
        if key != "adapters":
            p.add_argument("--" + key.replace("_", "-"), dest=key, default=None,
                           type=kind if kind in (int, str) else str, help=text)
    p = sub.add_parser("launch", help="run a command as N processes on this machine "
                       "(jax.distributed; e.g. launch -n 2 -- train CONFIG)")
    p.add_argument("-n", "--nproc", type=int, required=True, help="number of processes")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="CPU devices per process (JAX_NUM_CPU_DEVICES; runs on CPU)")
    p.add_argument("--port", type=int, default=None,
                   help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds the other processes get "
                   "to stop after one fails, before SIGKILL")
    p.add_argument("launched", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help="the peftjax command each process runs")
    return ap


def _launch(args) -> int:
    from peftjax._launch import launch
    command = args.launched[1:] if args.launched[:1] == ["--"] else args.launched
    return launch(args.nproc, command, cpu_devices=args.cpu_devices, port=args.port,
                  grace_s=args.grace)


def _load(args):
    from peftjax.config import load_config
    return load_config(args.config, args.overrides)


def _train(args) -> int:
    cfg = _load(args)
    if args.dry_run:
        from peftjax.train._plan import dry_run, format_plan
        print(format_plan(dry_run(cfg)))
        return 0
    from peftjax.train._run import run_training
    summary = run_training(cfg, progress=not args.no_progress)
    return 130 if summary["interrupted"] else 0


def _eval(args) -> int:
    from peftjax.train._run import evaluate_checkpoint
    cfg = _load(args)
    result = evaluate_checkpoint(cfg, split=args.split, step=args.step, model_dir=args.model,
                                 progress=not args.no_progress)
    print(json.dumps(result, indent=2))
    return 0


def _export(args) -> int:
    from peftjax.tokenizer import load_tokenizer
    from peftjax.train._run import load_trained_model, save_result
    cfg = _load(args)
    model, step = load_trained_model(cfg, step=args.step, progress=not args.no_progress)
    model = cfg.procedure.procedure_config().final_model(model)  # ReLoRA: merged
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path, revision=cfg.model.revision)
    kind = save_result(model, args.out, tok)
    print(f"wrote the {kind} of step {step} to {args.out}"
          + (" (Hugging Face format: the run's weights themselves)" if kind == "model" else ""))
    return 0


def _memory(args) -> int:
    import json

    from peftjax.train._plan import format_memory, memory_plan
    report = memory_plan(_load(args))
    print(format_memory(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _merge(args) -> int:
    from peftjax.models import CheckpointError, from_pretrained, save_pretrained
    from peftjax.tuners import PeftModel, read_config
    adapter_cfg = read_config(args.adapter)
    if not adapter_cfg.mergeable:
        raise ValueError(f"{args.adapter}: {adapter_cfg.method} cannot be merged into the "
                         f"weights: {adapter_cfg.merge_reason} Use the adapter with the base "
                         "model instead (peftjax generate --adapter, PeftModel.from_pretrained).")
    task = args.task or _TASKS.get(adapter_cfg.task_type)
    from peftjax.quant import QuantConfig
    from peftjax.quant._io import dequantize_model, merge_and_requantize, requantization_summary
    if not (args.quantization or args.save_4bit) and (args.blocksize or args.no_double_quant):
        raise ValueError("--blocksize and --no-double-quant describe 4-bit storage: add "
                         "--quantization (a QLoRA base) or --save-4bit (a 4-bit merge)")
    if args.round_zeros and not (args.save_4bit and args.quantization == "int4"):
        raise ValueError("--round-zeros applies to INT4 merges: add --quantization int4 "
                         "--save-4bit")
    qcfg = QuantConfig(args.quantization or "nf4", False if args.no_double_quant else None,
                       args.dtype, args.blocksize or 64)
    base = from_pretrained(args.model, task=task, dtype=args.dtype,
                           quantization=qcfg if args.quantization else None)
    peft = PeftModel.from_pretrained(base, args.adapter)
    if args.save_4bit:
        merged, reports = merge_and_requantize(peft, qcfg, dtype=args.dtype)
        if reports:
            print(requantization_summary(reports, qcfg.quant_type))
        if args.round_zeros:
            from peftjax.quant import round_zero_points
            rounded = round_zero_points(merged)
            if rounded:
                rel = sorted(r["rel_fro"] for r in rounded.values())
                print(f"rounded the zero points of {len(rel)} layers to integers (standard "
                      f"GPTQ): relative Frobenius change of the weights max {rel[-1]:.4f}, "
                      f"mean {sum(rel) / len(rel):.4f}")
    else:
        merged = dequantize_model(peft.merge_and_unload(args.dtype), args.dtype)
    save_pretrained(merged, args.out)
    from peftjax.tokenizer import load_tokenizer
    try:
        load_tokenizer(args.model).save_pretrained(args.out)
    except CheckpointError as e:  # a model without a tokenizer still merges
        print(f"note: no tokenizer copied ({e})")
    print(f"merged {args.adapter} into {args.model} -> {args.out} "
          f"({qcfg.quant_type + ' 4-bit' if args.save_4bit else args.dtype})")
    return 0


def _generate(args) -> int:
    import jax

    from peftjax.generation import generate
    from peftjax.models import from_pretrained
    from peftjax.tokenizer import load_tokenizer
    from peftjax.tuners import PeftModel
    tok = load_tokenizer(args.model)
    model = from_pretrained(args.model, task="causal_lm")
    if args.adapter:
        model = PeftModel.from_pretrained(model, args.adapter)
    prompts = args.prompts
    if args.chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    out = generate(model, prompts, tokenizer=tok, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, rng=jax.random.key(args.seed))
    for prompt, text in zip(args.prompts, out.texts):
        print(f"### {prompt}\n{text}\n")
    return 0


def _merge_adapters(args) -> int:
    from peftjax.models import from_pretrained
    from peftjax.tuners import PeftModel, read_config
    if len(args.weights) != len(args.adapters):
        raise ValueError(f"{len(args.adapters)} adapters but {len(args.weights)} --weights")
    first = read_config(args.adapters[0])
    model = args.model or first.base_model_name_or_path
    if not model:
        raise ValueError(f"{args.adapters[0]}: its adapter_config.json names no "
                         "base_model_name_or_path; pass --model")
    task = args.task or _TASKS.get(first.task_type)
    base = from_pretrained(model, task=task)
    names = [f"source_{i}" for i in range(len(args.adapters))]
    peft = PeftModel.from_pretrained(base, args.adapters[0], adapter_name=names[0])
    for name, directory in zip(names[1:], args.adapters[1:]):
        peft.load_adapter(directory, name)
    options = {k: v for k, v in (("density", args.density),
                                 ("majority_sign_method", args.majority_sign),
                                 ("svd_rank", args.svd_rank), ("svd_clamp", args.svd_clamp),
                                 ("seed", args.seed)) if v is not None}
    kind = args.combination_type or ("svd" if first.method == "lora" else "linear")
    if first.method == "lora" or kind != "linear":
        options["combination_type"] = kind
    peft.add_weighted_adapter(names, args.weights, "default", **options)
    peft.save_pretrained(args.out, selected_adapters=["default"])
    print(f"combined {len(names)} {first.method} adapters ({kind}, weights {args.weights}) "
          f"-> {args.out}")
    return 0


def _serve(args) -> int:
    from peftjax.serving._server import SETTINGS, load_settings, serve
    adapters = {}
    for item in args.adapter:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"--adapter takes NAME=DIR, got {item!r}")
        adapters[name] = directory
    flags = {k: getattr(args, k) for k in SETTINGS if k != "adapters"}
    if isinstance(flags.get("targets"), str) and flags["targets"] != "all-linear":
        flags["targets"] = flags["targets"].split(",")
    return serve(load_settings(args.config, {**flags, "adapters": adapters}))


_TASKS = {"SEQ_CLS": "sequence_classification", "TOKEN_CLS": "token_classification",
          "CAUSAL_LM": "causal_lm"}
COMMANDS = {"train": _train, "eval": _eval, "export": _export, "memory": _memory, "merge": _merge,
            "merge-adapters": _merge_adapters, "generate": _generate, "serve": _serve,
            "launch": _launch}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parses the command line; KEY=VALUE overrides may stand before, between or after the
    options (argparse alone takes positionals only in one run)."""
    ap = _parser()
    args, extra = ap.parse_known_args(argv)
    if extra:
        stray = [a for a in extra if a.startswith("-") or "=" not in a]
        if stray or not hasattr(args, "overrides"):
            ap.error(f"unrecognized arguments: {' '.join(stray or extra)}")
        args.overrides = list(args.overrides) + extra
    return args


def _backend_started() -> bool:
    from jax._src import xla_bridge
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return started() if started is not None else True


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if (args.command == "memory" or getattr(args, "dry_run", False)) and not _backend_started():
        # plan with XLA:CPU's memory-minimising scheduler (its default favours concurrency and
        # keeps buffers alive that GPU/TPU schedulers would free); XLA reads the flags when the
        # backend starts, which importing jax does not do
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_enable_concurrency_optimized_scheduler=false")
    from peftjax.checkpoint import CheckpointMismatchError
    from peftjax.config import ConfigError
    from peftjax.models import CheckpointError, UnsupportedConfigError
    from peftjax.train._run import TrainingDiverged
    from peftjax.train._sharding import DistributedSetupError
    try:
        return COMMANDS[args.command](args)
    except TrainingDiverged as e:
        print(f"peftjax: training stopped: {e}", file=sys.stderr)
        return 2
    except (ConfigError, CheckpointError, UnsupportedConfigError, CheckpointMismatchError,
            FileNotFoundError, FileExistsError, ValueError, DistributedSetupError) as e:
        if os.environ.get("PEFTJAX_DEBUG"):
            raise
        print(f"peftjax {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
