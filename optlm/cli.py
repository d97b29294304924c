"""The ``optlm`` command line: thin dispatch over the package's plain functions."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings


def _cmd_info(args: argparse.Namespace) -> int:
    """Print a checkpoint's config, parameter count, dtype and file sizes without loading the weights."""
    from . import checkpoint as ckpt
    from .models import read_config

    directory = ckpt.resolve(args.model, args.revision)
    if not (directory / "config.json").is_file():
        raise ckpt.CheckpointError(f"{directory} has no config.json; a checkpoint directory needs one")
    config = read_config(directory / "config.json")
    files = ckpt.weight_files(directory)
    params, dtypes = ckpt.count_parameters(files)
    print(f"model:       {args.model}")
    print(f"directory:   {directory}")
    print(f"parameters:  {params:,} ({params / 1e6:.1f}M)")
    print(f"dtype:       {', '.join(sorted(dtypes))}")
    print("files:")
    for f in files:
        print(f"  {f.name:40s} {f.stat().st_size / 2**20:10.1f} MiB")
    print("config:")
    for key, value in sorted(config.to_dict().items()):
        print(f"  {key}: {value}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    """Pre-train or fine-tune an OPT model on text/JSONL files (see optlm.train)."""
    from .train import TrainArgs, TrainingError, train

    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: use KEY=VALUE, e.g. --set hidden_size=256")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    fields = {k: v for k, v in vars(args).items() if k in TrainArgs.__dataclass_fields__}
    if fields.get("best_metric") == "none":
        fields["best_metric"] = None
    if args.lora is not None and args.adapter is not None:
        raise ValueError("give one of --lora and --adapter")
    spec = args.lora if args.lora is not None else args.adapter
    if spec is not None:
        from .adapters.spec import parse_spec

        fields["adapter"] = parse_spec(spec, "lora").to_dict()
    main = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 reports for all
    try:
        result = train(TrainArgs(**{**fields, "config_overrides": overrides, "progress": not args.quiet}))
    except TrainingError as e:
        if main:
            print(f"optlm train: error: {e}", file=sys.stderr)
        return 1
    if not main:
        return 0
    print(f"checkpoint: {result.checkpoint}")
    if result.best is not None:
        print(f"best: {os.path.join(args.out_dir, 'best')} ({result.best['metric']} {result.best['value']:.4f} at "
              f"step {result.best['step']})")
    return 0


def _cmd_train_tokenizer(args: argparse.Namespace) -> int:
    """Train a byte-level BPE tokenizer with OPT's special tokens (see optlm.tokenizer_train)."""
    from .tokenizer_train import train_tokenizer

    tok = train_tokenizer(args.data, args.out, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                          jsonl_key=args.jsonl_key, show_progress=not args.quiet and sys.stderr.isatty(),
                          unwrap=args.unwrap)
    print(f"saved a {len(tok)}-token tokenizer to {args.out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """Sliding-window perplexity of a model over a text file (see optlm.evaluate), or a classifier's metrics."""
    if args.task == "question-answering":
        from .train.predict import evaluate_qa_file, load_reader

        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
        reader = load_reader(args.model, args.adapter, args.device, args.dtype, args.max_length,
                             max_answer_length=args.max_answer_length)
        reader.progress = not args.quiet
        m = evaluate_qa_file(reader, args.data, args.batch_size)
        print(json.dumps(m) if args.json else "\n".join(f"{k + ':':<24}{v:.2f}" if isinstance(v, float) else
                                                         f"{k + ':':<24}{v}" for k, v in m.items()))
        return 0
    if args.task == "sequence-classification":
        from .train.predict import evaluate_file, load_classifier, report

        clf = load_classifier(args.model, args.adapter, args.device, args.dtype, args.max_length)
        clf.progress = not args.quiet
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
        m = evaluate_file(clf, args.data, args.jsonl_key, args.label_key, args.batch_size)
        print(json.dumps(m) if args.json else f"{args.data}: {m['examples']} examples\n{report(clf, m)}")
        return 0
    if args.adapter is not None:
        raise ValueError("--adapter applies to --task sequence-classification here; for perplexity, merge the "
                         "LoRA first (optlm merge)")
    from .evaluate import evaluate_file

    r = evaluate_file(args.model, args.data, stride=args.stride, max_length=args.max_length,
                      batch_size=args.batch_size, device=args.device, dtype=args.dtype, jsonl_key=args.jsonl_key,
                      unwrap=args.unwrap, progress=not args.quiet)
    print(f"model:       {args.model or 'bundled (opt-gutenberg)'}")
    print(f"perplexity:  {r.perplexity:.3f}")
    print(f"nll/token:   {r.nll:.4f}")
    print(f"tokens:      {r.tokens:,}")
    print(f"time:        {r.seconds:.1f}s ({r.tokens / max(r.seconds, 1e-9):,.0f} tokens/s)")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    """Each JSONL row with the classifier's prediction added, or each question's answer (see
    optlm.train.predict)."""
    from .train.predict import answer_file, load_classifier, load_reader, predict_file, task_of

    if not 0 < args.threshold < 1:
        raise ValueError(f"--threshold must be between 0 and 1, got {args.threshold}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    task = args.task or task_of(args.model, args.adapter) or "sequence-classification"
    if task == "question-answering":
        reader = load_reader(args.model, args.adapter, args.device, args.dtype, args.max_length,
                             max_answer_length=args.max_answer_length)
        reader.progress = not args.quiet
        rows = answer_file(reader, args.data, args.batch_size, args.allow_no_answer)
    else:
        clf = load_classifier(args.model, args.adapter, args.device, args.dtype, args.max_length)
        clf.progress = not args.quiet
        rows = predict_file(clf, args.data, args.text_key, args.batch_size, args.threshold)
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    if args.out is None:
        print("\n".join(lines))
    else:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        print(f"{len(lines)} predictions written to {args.out}", file=sys.stderr)
    return 0


_UNWRAP_HELP = "join hard-wrapped lines of .txt files into paragraphs (e.g. Project Gutenberg books)"


def _cmd_convert(args: argparse.Namespace) -> int:
    """A checkpoint in another layout (metaseq's model-parallel pickles) written as a Hugging Face directory."""
    from pathlib import Path

    from .convert import convert_metaseq
    from .hf import parse_dtype
    from .tokenizer import Tokenizer

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"{out} is not empty; pass --overwrite to replace its files, or choose another --out")
    convert_metaseq(args.path, out, args.config, parse_dtype(args.dtype))
    if args.tokenizer is not None:
        Tokenizer.from_pretrained(args.tokenizer).save_pretrained(out)
    note = "" if args.tokenizer else " (no tokenizer: add one with --tokenizer, e.g. facebook/opt-125m)"
    print(f"converted {args.path} ({args.source}) to {out}{note}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    """Fold a LoRA adapter into its base model and save the result as a plain checkpoint."""
    import shutil
    from pathlib import Path

    from .adapters import PeftModel, read_config
    from .checkpoint import resolve
    from .hf import AutoModelForCausalLM
    from .tokenizer import Tokenizer

    adapter_dir, config = read_config(args.adapter)
    if config.peft_type != "LORA":
        raise ValueError(f"{args.adapter} is a {config.peft_type.lower()} adapter, which is non-linear and cannot "
                         "be merged; use it with --adapter instead")
    base = args.model or config.base_model_name_or_path
    if base is None:
        raise ValueError(f"{args.adapter}/adapter_config.json names no base model; pass --model")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"{out} is not empty; pass --overwrite to replace its files, or choose another --out")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=args.dtype)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out)
    base_dir = resolve(base)
    tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer.json").is_file() else base_dir
    Tokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    if (base_dir / "generation_config.json").is_file():
        shutil.copyfile(base_dir / "generation_config.json", out / "generation_config.json")
    print(f"merged the LoRA adapter {args.adapter} into {base}: {out}")
    return 0


def _add_training_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pre-train or fine-tune on text/JSONL files (HF checkpoints, exact resume)")
    p.add_argument("--task", choices=["causal-lm", "sequence-classification", "question-answering"],
                   default="causal-lm",
                   help="causal-lm: next-token prediction on text; sequence-classification: a label per JSONL row "
                        "(--text-key, --label-key), validated with accuracy / F1 / a confusion matrix; "
                        "question-answering: answer spans in SQuAD JSON / JSONL, validated with exact match / F1")
    p.add_argument("--data", nargs="+", required=True,
                   help="training files: .txt (one document each) or .jsonl; classification: .jsonl, .csv or .tsv "
                        "rows; QA: SQuAD .json or .jsonl")
    p.add_argument("--out", dest="out_dir", required=True, help="output directory for checkpoints and logs")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory or hub id to fine-tune")
    src.add_argument("--config", help="train from scratch: a config.json or a preset name such as opt-125m")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    p.add_argument("--val-data", nargs="+", help="validation files (default: hold out the tail of --data)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="tail fraction held out without --val-data")
    p.add_argument("--jsonl-key", "--text-key", dest="jsonl_key", default="text",
                   help="JSONL field that holds the text")
    p.add_argument("--label-key", default="label",
                   help="classification: JSONL field that holds the label (a class, a list of classes, or a number)")
    p.add_argument("--problem-type", default=None,
                   choices=["single_label_classification", "multi_label_classification", "regression"],
                   help="classification: default from the labels (class -> single-label, list -> multi-label, "
                        "fractional number -> regression)")
    p.add_argument("--class-weights", default=None, metavar="balanced|LABEL=W,...",
                   help="single-label classification: weight the loss per class ('balanced': n / (classes x count))")
    p.add_argument("--best-metric", default="auto",
                   help="keep the checkpoint with the best value of this validation metric in OUT/best ('auto': "
                        "macro_f1 for classification, val_loss for regression, f1 for QA, none for causal-lm; "
                        "'none': off)")
    p.add_argument("--doc-stride", type=int, default=128,
                   help="question answering: tokens shared by consecutive windows of a long context")
    p.add_argument("--max-answer-length", type=int, default=30, help="question answering: longest answer, in tokens")
    p.add_argument("--unwrap", action="store_true", help=_UNWRAP_HELP)
    p.add_argument("--block-size", type=int, default=256,
                   help="tokens per training sequence (classification: longer texts are cut to their start; QA: "
                        "the window, question included)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--stop-after", type=int, default=None,
                   help="end this session after that step (the schedule still spans --max-steps); then --resume")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=None, help="cosine floor (default lr/10)")
    p.add_argument("--warmup-steps", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--schedule", choices=["cosine", "wsd"], default="cosine",
                   help="after warm-up: cosine decay, or wsd = constant then a linear decay over the last "
                        "--decay-steps (extend --max-steps on --resume when the compute budget allows)")
    p.add_argument("--decay-steps", type=int, default=None, help="wsd: length of the final decay (default "
                   "max-steps / 5)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay (not on biases / LayerNorm)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--dropout", type=float, default=None, help="override the model's dropout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast: auto = bf16 where the hardware has it")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass and return freed activation memory to the "
                        "system at once: a lower peak memory for a longer step")
    p.add_argument("--eval-every", type=int, default=100, help="validate every N steps")
    p.add_argument("--eval-batches", type=int, default=20, help="validation batches per evaluation")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
    p.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep (0 = all)")
    p.add_argument("--log-every", type=int, default=10, help="write metrics every N steps")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 …")
    p.add_argument("--lora", metavar="SPEC", default=None,
                   help="train a LoRA adapter instead of the whole model, e.g. r=8,alpha=16,dropout=0.05,"
                        "targets=q_proj,v_proj (keys: r, alpha, dropout, targets, bias, rslora, modules_to_save, "
                        "init); checkpoints are adapter directories in peft's format")
    p.add_argument("--adapter", metavar="SPEC", default=None,
                   help="train another adapter kind: bottleneck,reduction=16,variant=houlsby|pfeiffer,act=relu "
                        "(or lora,… as --lora)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="with --lora/--adapter: quantize the frozen base (QLoRA-style; CPU)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard parameters, gradients and optimizer state across the processes torchrun starts "
                        "(FSDP2): `torchrun --nproc-per-node N --no-python optlm train ... --fsdp`; --batch-size is "
                        "per process; --dtype bf16 also gathers the weights in bf16; resumes on any number of "
                        "processes that keeps N x --batch-size")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer with OPT's special tokens")
    p.add_argument("--data", nargs="+", required=True, help="training files: .txt or .jsonl")
    p.add_argument("--out", required=True, help="directory for tokenizer.json and its configs")
    p.add_argument("--vocab-size", type=int, default=8192, help="total vocabulary, special tokens included")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    p.add_argument("--jsonl-key", default="text", help="JSONL field that holds the text")
    p.add_argument("--unwrap", action="store_true", help=_UNWRAP_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train_tokenizer)

    p = sub.add_parser("convert", help="convert an original metaseq OPT checkpoint into a Hugging Face directory")
    p.add_argument("path", help="the metaseq checkpoint: a .pt file, or the directory of its *model_part-K.pt files")
    p.add_argument("--from", dest="source", choices=["metaseq"], required=True, help="the checkpoint's layout")
    p.add_argument("--out", required=True, help="directory for config.json and the safetensors weights")
    p.add_argument("--config", default=None,
                   help="the architecture, for checkpoints that do not record it: a preset (opt-125m …) or a "
                        "config.json (default: read from the checkpoint)")
    p.add_argument("--tokenizer", default=None, help="also save this tokenizer (a directory or hub id) in --out")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("merge", help="fold a LoRA adapter into its base model (a plain HF checkpoint)")
    p.add_argument("--adapter", required=True, help="the adapter directory (or hub id), peft's format")
    p.add_argument("--model", default=None, help="the base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--out", required=True, help="directory for the merged checkpoint and its tokenizer")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("eval", help="sliding-window perplexity over a text file, or a classifier's metrics")
    p.add_argument("--task", choices=["causal-lm", "sequence-classification", "question-answering"],
                   default="causal-lm",
                   help="causal-lm: perplexity; sequence-classification: loss, accuracy, F1 per label and the "
                        "confusion matrix on labelled JSONL rows; question-answering: SQuAD's exact match and F1")
    p.add_argument("--max-answer-length", type=int, default=30, help="question answering: longest answer, in tokens")
    p.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the bundled model, "
                   "opt-gutenberg)")
    p.add_argument("--adapter", default=None, help="classification / QA: an adapter directory trained with --task "
                   "(the base: --model or the one the adapter names)")
    p.add_argument("--data", required=True, help="a .txt or .jsonl file")
    p.add_argument("--stride", type=int, default=None, help="window step (default: half the context)")
    p.add_argument("--max-length", type=int, default=None,
                   help="window length; classification: tokens per text (default: the model's context)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="windows (classification: texts) per forward pass")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--jsonl-key", "--text-key", dest="jsonl_key", default="text",
                   help="JSONL field that holds the text")
    p.add_argument("--label-key", default="label", help="classification: JSONL field that holds the label")
    p.add_argument("--json", action="store_true", help="classification: print the metrics as one JSON object")
    p.add_argument("--unwrap", action="store_true", help=_UNWRAP_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="classify JSONL rows (labels, probabilities) or answer questions (SQuAD "
                       "format) with a fine-tuned model")
    p.add_argument("--task", choices=["sequence-classification", "question-answering"], default=None,
                   help="default: what the model (or adapter) was fine-tuned for")
    p.add_argument("--model", default=None, help="the classifier: a checkpoint directory or hub id (or the base "
                   "model of --adapter)")
    p.add_argument("--adapter", default=None, help="an adapter directory trained with --task "
                   "sequence-classification")
    p.add_argument("--data", required=True, help="classification: a .jsonl file (one object with a text field per "
                   "line) or a .csv / .tsv file with a header; QA: SQuAD .json or .jsonl")
    p.add_argument("--text-key", default="text", help="JSONL field that holds the text")
    p.add_argument("--out", default=None, help="write the rows with their predictions here (default: stdout)")
    p.add_argument("--threshold", type=float, default=0.5, help="multi-label: probability above which a label "
                   "is predicted")
    p.add_argument("--allow-no-answer", action="store_true",
                   help="question answering: answer '' when no-answer scores higher than every span (SQuAD 2.0)")
    p.add_argument("--max-answer-length", type=int, default=30, help="question answering: longest answer, in tokens")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per text (default: the model's context); QA: per window (default 384)")
    p.add_argument("--batch-size", type=int, default=16, help="texts (QA: windows) per forward pass")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)


class _SubParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


# ---- generate / chat -------------------------------------------------------------------------------------

_SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "num_beams", "penalty_alpha",
                   "repetition_penalty", "no_repeat_ngram_size", "stop", "seed")


def _generation_params(args: argparse.Namespace) -> dict:
    """Decoding keywords from the flags (preset first, explicit flags over it), checked before loading."""
    from .generation_config import validate_params
    from .lm import resolve_params

    params = resolve_params(args.preset, **{k: getattr(args, k) for k in _SAMPLING_FLAGS})
    validate_params(params)
    return params


def _load_lm(args: argparse.Namespace):
    from .lm import load

    return load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize, adapter=args.adapter,
                tensor_parallel=getattr(args, "tensor_parallel", False), offload=getattr(args, "offload", False),
                max_memory=getattr(args, "max_memory", None))


def _model_config(args: argparse.Namespace):
    """The config of the model ``args`` names (the bundled model's when none), without loading weights."""
    from . import checkpoint as ckpt
    from .bundled import bundled_model_path
    from .models import read_config

    directory = bundled_model_path() if args.model is None else ckpt.resolve(args.model, weights=False)
    return read_config(directory / "config.json")


def _tensor_parallel_generate(rank: int, world: int, args: argparse.Namespace) -> None:
    """One rank of ``optlm generate --tensor-parallel-size N``: every rank runs the same generation on its slice
    of the model (the logits are gathered, and the seed is shared, so all draw the same tokens); rank 0 prints."""
    import contextlib

    args.tensor_parallel, args.tensor_parallel_size = True, 1
    if rank == 0:
        _cmd_generate(args)
        return
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        _cmd_generate(args)


def _cmd_generate(args: argparse.Namespace) -> int:
    """Continue a prompt (``-`` reads it from stdin), streaming the text unless --no-stream."""
    import time

    prompt = args.prompt
    if prompt == "-":
        prompt = _read_stdin(whole=True).removesuffix("\n")  # the newline that `echo` and editors add
    params = _generation_params(args)
    from .parallel import joined

    if joined() and not getattr(args, "tensor_parallel", False):  # one of torchrun's processes
        import torch.distributed as dist

        from .parallel.launch import init_from_env, shared_seed

        rank, world = init_from_env()
        try:
            args.prompt, args.seed = prompt, shared_seed(args.seed)  # every rank must sample alike
            _tensor_parallel_generate(rank, world, args)
            dist.barrier()
        finally:
            dist.destroy_process_group()  # gloo's threads stopped here, not torn down at interpreter exit
        return 0
    if args.tensor_parallel_size < 1:
        raise ValueError(f"--tensor-parallel-size must be at least 1, got {args.tensor_parallel_size}")
    if args.tensor_parallel_size > 1:
        import random

        from .parallel import run
        from .parallel.tp import check_divisible

        check_divisible(_model_config(args), args.tensor_parallel_size)  # before starting any process

        # every rank must sample alike: one seed, drawn here when none is given
        args.prompt, args.seed = prompt, random.randrange(2**31) if args.seed is None else args.seed
        run(_tensor_parallel_generate, args.tensor_parallel_size, args)
        return 0
    lm = _load_lm(args)
    if params.get("num_beams", 1) > 1:  # beam search ranks whole hypotheses: nothing to stream
        start = time.perf_counter()
        out, width = lm.generate_ids(prompt, **params)
        seconds = time.perf_counter() - start
        print((prompt if args.echo else "") + lm.decode(out[:, width:], params.get("stop_strings"))[0])
        if args.verbose:
            new = out.shape[1] - width
            print(f"prompt tokens: {width}\nnew tokens: {new}\ntime: {seconds:.2f} s "
                  f"({new / max(seconds, 1e-9):.1f} tokens/s, beam search)", file=sys.stderr)
        return 0
    stream = lm.stream(prompt, **params)  # checks the prompt against the context window
    if args.echo:
        print(prompt, end="", flush=True)
    for piece in stream:
        if args.stream:
            print(piece, end="", flush=True)
    print(stream.text if not args.stream else "")
    if args.verbose:
        ttft, speed = stream.time_to_first_token, stream.tokens_per_second
        print(f"prompt tokens: {stream.prompt_tokens}\nnew tokens: {stream.new_tokens}\n"
              f"time to first token: {'n/a' if ttft is None else f'{ttft * 1000:.1f} ms'}\n"
              f"tokens/s: {'n/a' if speed is None else f'{speed:.1f}'}", file=sys.stderr)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    """Interactive chat; reads one user message per line (stdin may be a pipe), streams each reply."""
    params = _generation_params(args)
    if params.get("num_beams", 1) > 1:
        raise ValueError("chat streams its replies, which beam search cannot do; use --num-beams 1")
    from .parallel import joined

    lm = _load_lm(args) if args.tensor_parallel_size == 1 and not joined() else _remote_lm(args)
    if lm is None:  # a rank other than 0 under torchrun: it followed the conversation to its end
        return 0
    try:
        _chat_loop(lm, args, params)
    finally:
        if hasattr(lm, "close"):  # the ranks of a split model
            lm.close()
    return 0


def _chat_loop(lm, args: argparse.Namespace, params: dict) -> None:
    session = lm.chat_session(system=args.system, on_trim=lambda msg: print(f"[{msg}]", file=sys.stderr), **params)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {lm.name}; /reset forgets the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("> ") if interactive else _read_stdin(whole=False)
        except EOFError:  # Ctrl-D at the prompt
            print(file=sys.stderr)
            break
        if not interactive and not line:  # end of piped input
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            continue
        if not text:
            continue
        if not interactive:  # a transcript: each turn marked, turns apart, as the model sees them
            print(f"{session.template.user}: {text}\n{session.template.assistant}: ", end="", flush=True)
        for piece in session.stream(text):
            print(piece, end="", flush=True)
        print("\n" if not interactive else "")


def _remote_lm(args: argparse.Namespace):
    """``optlm chat --tensor-parallel-size N``: the model in N ranks started here; this process holds the
    conversation and each turn runs on every rank."""
    from .bundled import BUNDLED_MODEL_NAME
    from .parallel import joined
    from .parallel.workers import GroupWorkers, RemoteLM, follow_group, start_workers, torchrun_rank

    if args.tensor_parallel_size < 1:
        raise ValueError(f"--tensor-parallel-size must be at least 1, got {args.tensor_parallel_size}")
    if args.offload or args.max_memory is not None:
        raise ValueError("--tensor-parallel-size does not combine with --offload or --max-memory")
    load_kwargs = dict(dtype=args.dtype, device=args.device, quantize=args.quantize, adapter=args.adapter)
    name = BUNDLED_MODEL_NAME if args.model is None else str(args.model)
    if joined():  # torchrun: rank 0 holds the conversation, the other ranks follow its calls
        if torchrun_rank(args.tensor_parallel_size) != 0:
            follow_group(args.model, load_kwargs)
            return None
        return RemoteLM(GroupWorkers(args.model, load_kwargs, {}), name)
    workers, _ = start_workers(args.model, args.tensor_parallel_size, load_kwargs)
    return RemoteLM(workers, name)


def _read_stdin(whole: bool) -> str:
    """All of stdin, or its next line, decoded as UTF-8 whatever the locale says (a clear error if it is not)."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # already text (an embedding program replaced sys.stdin)
        return sys.stdin.read() if whole else sys.stdin.readline()
    raw = stream.read() if whole else stream.readline()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"standard input is not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at offset {e.start}); "
                         "convert it first, e.g. with `iconv -f latin1 -t utf-8`") from None


def _check_arguments(args: argparse.Namespace) -> None:
    """Every text argument must be UTF-8 (undecodable bytes arrive as lone surrogates, PEP 383)."""
    from .chat import check_text

    for name, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                check_text(item, "the prompt" if name == "prompt" else f"--{name.replace('_', '-')}",
                           fix="pass UTF-8 text, or read it from a converted file with -")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    from .lm import DEFAULT_MAX_NEW_TOKENS, DEFAULT_PRESET, PRESETS, QUANTIZE_MODES

    p.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the bundled model, "
                   "opt-gutenberg)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"tokens to generate (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy decoding; > 0 samples (default: the balanced preset's 0.7)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--num-beams", type=int, default=None, help="beam search with this many beams")
    p.add_argument("--penalty-alpha", type=float, default=None, help="contrastive search degeneration penalty")
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeating tokens")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None, help="never repeat an n-gram of this size")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop at this text (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (repeatable runs)")
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="temperature / top-p / repetition penalty together; explicit flags override it "
                        f"(default: {DEFAULT_PRESET}: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in
                                                                     PRESETS[DEFAULT_PRESET].items()
                                                                     if k != "do_sample") + ")")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cpu)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA or bottleneck adapter directory (peft's format) to apply; without --model its "
                        "base_model_name_or_path is the base")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default=None,
                   help="int8 or int4: weight-only (int8: fastest batch-1 decoding on AVX2 CPUs); "
                        "int8-dynamic: activations too (fastest prompts and batches)")
    p.add_argument("--offload", action="store_true",
                   help="a model larger than memory: keep 2 decoder layers in memory and stream the others from "
                        "the checkpoint's safetensors as they run (slow: the weights are read once per token)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="like --offload, keeping as many layers as fit in SIZE (e.g. 6GB) beside the embeddings; "
                        "the whole model when it fits")


def _add_generation_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt (sampling, greedy, beam or contrastive search)",
                       description="Continue a prompt and print the prompt followed by its continuation "
                                   "(--no-echo: the continuation only). Samples with the balanced preset unless "
                                   "told otherwise; --temperature 0 decodes greedily, --seed makes it repeatable.")
    p.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    _add_generation_args(p)
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split the model across N processes on this machine (started here; under torchrun, "
                        "its processes are used)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print text as it is generated (default: on)")
    p.add_argument("--echo", action=argparse.BooleanOptionalAction, default=True,
                   help="print the prompt before the continuation (default: on)")
    p.add_argument("--verbose", action="store_true",
                   help="report prompt/new token counts, time to first token and tokens/s on stderr")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("chat", help="chat with a model through a plain dialogue template",
                       description="Chat through a 'Human:/AI:' transcript. At a terminal: type a message at "
                                   "the '> ' prompt and the reply streams back. With stdin piped: one message "
                                   "per line, and the output is the transcript, each turn marked 'Human: ' / "
                                   "'AI: ' and turns separated by a blank line.")
    _add_generation_args(p)
    p.add_argument("--system", default=None, help="system text opening the conversation")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split the model across N processes on this machine (started here)")
    p.set_defaults(func=_cmd_chat)


def _cmd_bench(args: argparse.Namespace) -> int:
    """Speed against transformers and CTranslate2 (those installed) on random-weight OPT and GPT-Neo shapes."""
    from .benchmark import run_from_args

    return run_from_args(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .serve import run

    return run(args)


def _add_serve_command(sub: argparse._SubParsersAction) -> None:
    from .serve import add_arguments

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming, metrics)",
                       description="Serve a model over OpenAI's API (/v1/completions, /v1/chat/completions, "
                                   "/v1/models) plus /health, /metrics, /tokenize, /detokenize and /version, "
                                   "with continuous batching. Without --model: the bundled model, offline.")
    add_arguments(p)
    p.set_defaults(func=_cmd_serve)


def _add_bench_command(sub: argparse._SubParsersAction) -> None:
    from .benchmark import add_arguments

    p = sub.add_parser("bench", help="decode/prefill speed and memory vs transformers and CTranslate2")
    add_arguments(p)
    p.set_defaults(func=_cmd_bench)


class _HelpFormatter(argparse.HelpFormatter):
    """Help lines end with the option's default, when it has one worth showing and the text does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default == argparse.SUPPRESS
                or action.option_strings == [] or isinstance(action, argparse._StoreTrueAction)):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optlm", description="Run, fine-tune and serve OPT language models.",
                                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_SubParser)

    p = sub.add_parser("info", help="show a checkpoint's config, parameter count, dtype and file sizes")
    p.add_argument("model", help="checkpoint directory or hub id (e.g. facebook/opt-125m)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.set_defaults(func=_cmd_info)
    _add_generation_commands(sub)
    _add_training_commands(sub)
    _add_serve_command(sub)
    _add_bench_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"optlm {args.command}: warning: {message}", file=sys.stderr)

    warnings.showwarning = show_warning  # one plain line, not a source location and code
    try:
        _check_arguments(args)
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`optlm generate ... | head -1`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except (ValueError, TypeError, OSError, ImportError) as e:  # user-facing errors: one line, no traceback
        print(f"optlm {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
