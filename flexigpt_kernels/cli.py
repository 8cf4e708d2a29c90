"""The `flexigpt` command line: a thin dispatcher over subcommands.

Each subcommand lives in its own module, imported only when that subcommand runs, so
`flexigpt --help` stays fast and one broken subcommand cannot break the others. A
subcommand module defines:

    def add_arguments(parser: argparse.ArgumentParser) -> None   # optional
    def run(args: argparse.Namespace) -> int | None             # exit status (None = 0)

and is registered in COMMANDS below (or at run time with `register_command`).

Exit status and errors:

- 0: done. 2: the user's input is wrong; ONE line ``flexigpt <command>: error: <argument>:
  <what is wrong>`` on stderr, no traceback. 1: an internal error (a bug, or the machine: out
  of memory, a full disk); one line naming the exception and a log file holding the traceback
  (``--debug`` prints the traceback instead). 130: interrupted (Ctrl-C).
- What counts as the user's input (exit 2), and where the boundary lies:
  1. argparse errors (unknown option, a value a ``type=`` validator of commands/_common.py
     rejects: NaN, a negative count, an empty list, ``--out`` naming a file, ...);
  2. :class:`UsageError`, raised by command code, and by ``commands._common.user_input(ARG)``
     around the steps that read what the user named (loading ``--model``, checking
     ``--data``, ``--out``): there a ValueError or OSError of any origin (transformers,
     datasets, json, the file system) is about that argument;
  3. a ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError
     or PermissionError raised by a ``raise`` statement of this package outside ops/ and nn/:
     the library's contract is that these name a rejected argument (e.g. prune()'s
     validation of its calibration source, save_pretrained refusing a folder).
  Everything else is internal (exit 1): the same exception types raised inside third-party
  code during the work itself, or by Python on a line of ours that is not a ``raise``
  (``a, b = [1, 2, 3]``), or by the tensor-level checks of ops/ and nn/ (which the CLI's own
  inputs cannot reach: reaching them is a bug), and every other exception type.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path


class UsageError(ValueError):
    """A mistake in what the user asked for: reported in one line, exit status 2.
    The message starts with the argument it is about (``--model: ...``)."""


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
    "demo",
    "flexigpt_kernels.commands.demo",
    "run the main job (prune) on the embedded default model and check the result (see README)",
)
register_command(
    "prune",
    "flexigpt_kernels.commands.prune",
    "prune a causal LM the FlexiGPT way (or drop blocks), report and save it",
)
register_command(
    "heal",
    "flexigpt_kernels.commands.heal",
    "recovery-train a pruned model (adapters and gammas by default) and save it",
)
register_command(
    "compare",
    "flexigpt_kernels.commands.compare",
    "FlexiGPT vs ShortGPT + LoRA at an equal recovery budget on the embedded default",
)
register_command(
    "bench",
    "flexigpt_kernels.commands.bench",
    "benchmarks: kernels (op vs unfused vs dense floor), model (end to end), plot",
)
register_command(
    "extend",
    "flexigpt_kernels.commands.extend",
    "grow a model by repeating blocks that share the original weights (own adapters, output norms) and save it",
)
register_command(
    "eval",
    "flexigpt_kernels.commands.eval",
    "held-out perplexity and lm-eval tasks of a model, side by side with its dense source",
)
register_command(
    "generate",
    "flexigpt_kernels.commands.generate",
    "decode with a saved converted model, self-speculatively (draft = model minus its replacement blocks)",
)

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
_PACKAGE = Path(__file__).resolve().parent
_TENSOR_LEVEL = (_PACKAGE / "ops", _PACKAGE / "nn")  # checks the CLI's inputs cannot reach
_USER_ERROR_TYPES = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``<prog>: error: <message>``, exit 2
    (subparsers inherit the class)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(text) -> str:
    return " ".join(str(text).split())


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("flexigpt-kernels")
    except Exception:  # running from a source tree that is not installed
        return "unknown"


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser. Only the `selected` subcommand's module is imported (to add
    its arguments); the others contribute their name and help line."""
    parser = Parser(
        prog="flexigpt",
        description="Fused kernels and tools for LLMs pruned or extended with FlexiGPT. Exit status: 0 done, "
        "2 a wrong input (one line on stderr), 1 an internal error (its traceback goes to a log "
        "file, or to stderr with --debug).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of any error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = {}
    for cmd in COMMANDS.values():
        p = parser.commands[cmd.name] = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        p.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="print the traceback of any error"
        )
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
        raise SystemExit(
            f"flexigpt {cmd.name}: not available in this version (module {cmd.module} is missing)"
        ) from None


def is_user_error(exc: BaseException) -> bool:
    """True when `exc` reports a wrong input rather than a bug (rules in the module doc)."""
    if isinstance(exc, UsageError):
        return True
    if not isinstance(exc, _USER_ERROR_TYPES):
        return False
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return False
    last = frames[-1]
    where = Path(last.filename).resolve()
    if not where.is_relative_to(_PACKAGE) or any(where.is_relative_to(d) for d in _TENSOR_LEVEL):
        return False
    return (last.line or "").lstrip().startswith("raise")


def write_log(command: str, exc: BaseException) -> Path:
    """Write `exc`'s traceback to a new file (in $FLEXIGPT_LOG_DIR, else the temp folder)."""
    folder = os.environ.get("FLEXIGPT_LOG_DIR") or tempfile.gettempdir()
    os.makedirs(folder, exist_ok=True)
    fd, name = tempfile.mkstemp(
        prefix=f"flexigpt-{command}-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log", dir=folder
    )
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(f"flexigpt {command}, argv {sys.argv!r}\n")
        f.write("".join(traceback.format_exception(exc)))
    return Path(name)


def report_error(command: str, exc: BaseException, *, debug: bool) -> int:
    """Print `exc` the way the module doc says; return the exit status."""
    prog = f"flexigpt {command}"
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    if is_user_error(exc):
        print(f"{prog}: error: {one_line(exc) or type(exc).__name__}", file=sys.stderr)
        return EXIT_USAGE
    detail = f"{type(exc).__name__}: {one_line(exc)}" if str(exc) else type(exc).__name__
    if debug:
        print(f"{prog}: internal error: {detail}", file=sys.stderr)
        return EXIT_INTERNAL
    try:
        where = f"traceback in {write_log(command, exc)}"
    except OSError as log_exc:
        where = f"no log written ({one_line(log_exc)})"
    print(f"{prog}: internal error: {detail} ({where}; --debug prints it)", file=sys.stderr)
    return EXIT_INTERNAL


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected if selected in COMMANDS else None)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand's parser, which names the command
        owner = parser.commands.get(args.command, parser)
        owner.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    debug = bool(getattr(args, "debug", False))
    try:
        status = _import(COMMANDS[args.command]).run(args)
    except KeyboardInterrupt:
        print(f"flexigpt {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - every error ends here, as one line
        return report_error(args.command, exc, debug=debug)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
