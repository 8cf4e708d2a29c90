"""The `flexigpt` command line: a thin dispatcher over subcommands.

Each subcommand lives in its own module, imported only when that subcommand runs, so
`flexigpt --help` stays fast and one broken subcommand cannot break the others. A
subcommand module defines:

    def add_arguments(parser: argparse.ArgumentParser) -> None   # optional
    def run(args: argparse.Namespace) -> int | None             # exit status (None = 0)

and is registered in COMMANDS below (or at run time with `register_command`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    module: str  # dotted path of the module holding add_arguments() and run()
    help: str


COMMANDS: dict[str, Command] = {}


def register_command(name: str, module: str, help: str) -> None:
    """Add (or replace) the subcommand `name`, implemented by `module`."""
    COMMANDS[name] = Command(name, module, help)


register_command(
    "demo", "flexigpt_kernels.demo",
    "run the main job (prune) on the embedded default model and check the result (see README)",
)
register_command(
    "prune", "flexigpt_kernels.commands.prune",
    "prune a causal LM the FlexiGPT way (or drop blocks), report and save it",
)
register_command(
    "heal", "flexigpt_kernels.commands.heal",
    "recovery-train a pruned model (adapters and gammas by default) and save it",
)
register_command(
    "compare", "flexigpt_kernels.commands.compare",
    "FlexiGPT vs ShortGPT + LoRA at an equal recovery budget on the embedded default",
)
register_command(
    "bench", "flexigpt_kernels.commands.bench",
    "benchmarks: kernels (op vs unfused vs dense floor), model (end to end), plot",
)
register_command(
    "extend", "flexigpt_kernels.commands.extend",
    "grow a model by repeating blocks that share the original weights (own adapters, output norms) and save it",
)
register_command(
    "eval", "flexigpt_kernels.commands.eval",
    "held-out perplexity and lm-eval tasks of a model, side by side with its dense source",
)
register_command(
    "generate", "flexigpt_kernels.commands.generate",
    "decode with a saved converted model, self-speculatively (draft = model minus its replacement blocks)",
)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("flexigpt-kernels")
    except Exception:  # running from a source tree that is not installed
        return "unknown"


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser. Only the `selected` subcommand's module is imported (to add
    its arguments); the others contribute their name and help line."""
    parser = argparse.ArgumentParser(
        prog="flexigpt",
        description="Fused kernels and tools for LLMs pruned or extended with FlexiGPT.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if cmd.name == selected:
            add_arguments = getattr(_import(cmd), "add_arguments", None)
            if add_arguments is not None:
                add_arguments(p)
    return parser


def _import(cmd: Command):
    try:
        return importlib.import_module(cmd.module)
    except ModuleNotFoundError as exc:
        if exc.name != cmd.module:  # a real missing dependency inside the module
            raise
        raise SystemExit(f"flexigpt {cmd.name}: not available in this version "
                         f"(module {cmd.module} is missing)") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected if selected in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    status = _import(COMMANDS[args.command]).run(args)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
