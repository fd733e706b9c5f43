"""The ``vtm-jax`` command: convert, predict, eval, bench, train, visualize, demo, sweep, configs.

Bad input ends with one line ``vtm-jax: error: ...`` and exit status 2, never a traceback:
:func:`main` turns every expected failure (``vtm_jax.errors.expected_failure``) into that
line, and each command checks its output locations (``vtm_jax.outputs``) before any work.
:mod:`.parser` declares the flags, :mod:`.commands` turns them into calls of the jobs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from vtm_jax.cli import commands
from vtm_jax.cli.parser import build_parser
from vtm_jax.errors import expected_failure
from vtm_jax.outputs import check_output_file

CONFIG_COMMANDS = ("bench", "eval", "train", "demo", "sweep")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # --config and --config.x=y go to ml_collections, the rest to argparse.
    config_args = [a for a in argv if a == "--config" or a.startswith("--config")]
    if "--config" in config_args:
        parser.error("write --config=FILE (with '=')")
    args = parser.parse_args([a for a in argv if a not in config_args])
    if config_args and args.command not in CONFIG_COMMANDS:
        parser.error(f"{args.command} takes no --config")
    try:
        if args.command == "predict" and args.save_logits:
            check_output_file(commands.logits_path(args.save_logits), what="--save-logits")
        commands.HANDLERS[args.command](args, config_args)
    except KeyboardInterrupt:
        print("vtm-jax: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = expected_failure(e)
        if message is None:
            raise  # a bug in vtm-jax: its traceback is the report
        print(f"vtm-jax: error: {message}", file=sys.stderr)
        return 2
    return 0
