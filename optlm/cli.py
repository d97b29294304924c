"""The ``optlm`` command line: thin dispatch over the package's plain functions."""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    """Print a checkpoint's config, parameter count, dtype and file sizes without loading the weights."""
    from . import checkpoint as ckpt
    from .config import OPTConfig

    directory = ckpt.resolve(args.model, args.revision)
    config = OPTConfig.from_json_file(directory / "config.json")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optlm", description="Run, fine-tune and serve OPT language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="show a checkpoint's config, parameter count, dtype and file sizes")
    p.add_argument("model", help="checkpoint directory or hub id (e.g. facebook/opt-125m)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as e:  # user-facing errors: one clear line, no traceback
        print(f"optlm {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
