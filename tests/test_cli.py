"""The `flexigpt` dispatcher: subcommands are registered by module and imported lazily."""

import sys
import types

import pytest

from flexigpt_kernels import cli


@pytest.fixture
def fake_command(monkeypatch):
    calls = []
    mod = types.ModuleType("flexigpt_fake_cmd")
    mod.add_arguments = lambda p: p.add_argument("--n", type=int, default=1)
    mod.run = lambda args: calls.append(args.n) or 3
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    cli.register_command("fake", mod.__name__, "a test command")
    return calls


def test_registered_command_runs_with_its_arguments(fake_command):
    assert cli.main(["fake", "--n", "7"]) == 3
    assert fake_command == [7]


def test_no_command_prints_help_and_returns_2(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_help_lists_commands_without_importing_them(fake_command, capsys, monkeypatch):
    cli.register_command("broken", "flexigpt_no_such_module", "never imported by --help")
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "fake" in out and "broken" in out


def test_missing_command_module_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    cli.register_command("later", "flexigpt_kernels.no_such_module", "not written yet")
    with pytest.raises(SystemExit, match="not available"):
        cli.main(["later"])
