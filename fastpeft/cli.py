"""The ``fastpeft`` command (also ``python -m fastpeft``).

    fastpeft demo      the fine-tuning tour (fastpeft presets beside HF PEFT LoRA)
    fastpeft bench     low-rank layer microbenchmarks, every provider side by side
    fastpeft memory    peak memory of one training step of a Llama-like decoder
    fastpeft report    regenerate the README's results section from bench/results
    fastpeft inspect   compile a problem's kernels for sm_80/sm_90 without a GPU and read the SASS

``fastpeft <command> --help`` lists each command's flags. Bad flags exit with status 2 and a
message naming the flag.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]


def plain(text: str) -> str:
    """Docstring text for a terminal: reST markup (``code``, :func:`name`) as plain words."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return " ".join(text.replace("``", "").split())


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (the heavy modules are imported only when one runs)."""
    from .benchmark import lowrank, memory, readme

    # the subcommand list below names each command once; the epilog only says how to get flags
    parser = argparse.ArgumentParser(prog="fastpeft", description=plain(__doc__.split("\n\n")[0]),
                                     epilog=plain(__doc__.split("\n\n")[2]))
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True
    sub.add_parser("demo", add_help=False, help="the fine-tuning tour (flags: fastpeft demo --help)")
    bench = sub.add_parser("bench", help="low-rank layer microbenchmarks",
                           description=plain(lowrank.__doc__.split("\n\n")[0]))
    lowrank.add_arguments(bench)
    mem = sub.add_parser("memory", help="peak memory of one training step",
                         description=plain(memory.__doc__.split("\n\n")[0]))
    memory.add_arguments(mem)
    report = sub.add_parser("report", help="regenerate the README's results section",
                            description=plain(readme.__doc__.split("\n\n")[0]))
    readme.add_arguments(report)
    from .kernels import inspect as inspect_kernels
    insp = sub.add_parser("inspect", help="the binaries a training step or decode call would run, compiled "
                          "for sm_80/sm_90 without a GPU", description=plain(inspect_kernels.__doc__.split("\n\n")[0]))
    inspect_kernels.add_arguments(insp)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fastpeft`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # bitsandbytes (imported by peft) logs CPU notices at import that read as our failures
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from . import demo
        return int(demo.main(rest) or 0)
    if rest:
        parser.error(f"unrecognized arguments for 'fastpeft {args.command}': {' '.join(rest)}")
    from .benchmark import lowrank, memory, readme
    from .kernels import inspect as inspect_kernels

    module = {"bench": lowrank, "memory": memory, "report": readme, "inspect": inspect_kernels}[args.command]
    problem = module.validate(args)
    if problem:
        parser.error(f"fastpeft {args.command}: {problem}")
    return int(module.run(args) or 0)
