"""Saving never loses data: overwrite replaces only a folder this package wrote (never the
current directory or a parent), and whatever fails - an exception or a SIGKILL at any step of
the save - the path holds the complete old folder or the complete new one; what a killed save
left behind is cleaned up (an old folder moved back) by the next save to the same parent."""

from __future__ import annotations

import os
import signal

import pytest

from flexigpt_kernels.io import _write, save_pretrained
from flexigpt_kernels.io._write import WRITTEN_NAME, atomic_directory

from .helpers import converted, one_thread

OLD = {"model.safetensors": "old weights", "config.json": "old config"}
NEW = {"model.safetensors": "new weights", "config.json": "new config", "tokenizer.json": "new tok"}


def _write_files(out, files, overwrite=False):
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)


def _content(path):
    return {p.name: p.read_text() for p in path.iterdir() if p.name != WRITTEN_NAME}


def _old_or_new(path):
    """'old' or 'new' when `path` holds exactly one of the two folders, else fail."""
    content = _content(path)
    assert content in (OLD, NEW), content
    return "old" if content == OLD else "new"


@pytest.fixture(scope="module")
def model():
    with one_thread():
        return converted()


# --- what overwrite may replace ---------------------------------------------------------------


def test_overwrite_refuses_the_current_directory(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "thesis.tex").write_text("my only copy")
    with pytest.raises(ValueError, match="current directory"):
        save_pretrained(model, ".", overwrite=True)
    assert os.listdir(tmp_path) == ["thesis.tex"]
    assert (tmp_path / "thesis.tex").read_text() == "my only copy"


def test_overwrite_refuses_a_parent_of_the_current_directory(model, tmp_path, monkeypatch):
    save_pretrained(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "ckpt" / "sub")
    with pytest.raises(ValueError, match="parent"):
        save_pretrained(model, "..", overwrite=True)
    assert (tmp_path / "ckpt" / "sub").is_dir()


def test_overwrite_refuses_a_checkpoint_with_a_file_added(model, tmp_path):
    out = save_pretrained(model, tmp_path / "ckpt")
    (out / "notes.md").write_text("results of a week of training")
    with pytest.raises(FileExistsError, match="did not write.*notes.md"):
        save_pretrained(model, out, overwrite=True)
    assert (out / "notes.md").read_text() == "results of a week of training"


def test_overwrite_refuses_a_folder_without_our_manifest(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="did not write"):
        _write_files(tmp_path / "hf", NEW, overwrite=True)
    assert os.listdir(tmp_path / "hf") == ["config.json"]


def test_overwrite_accepts_a_checkpoint_written_before_the_file_list(tmp_path):
    """A checkpoint of an earlier version (no .flexigpt-written.json): our names only."""
    (tmp_path / "ckpt").mkdir()
    for name in ("flexigpt.json", "model.safetensors", "config.json", "tokenizer.json"):
        (tmp_path / "ckpt" / name).write_text("{}")
    _write_files(tmp_path / "ckpt", NEW, overwrite=True)
    assert _old_or_new(tmp_path / "ckpt") == "new"
    (tmp_path / "ckpt" / WRITTEN_NAME).unlink()  # the new one, list removed: no flexigpt.json either
    with pytest.raises(FileExistsError, match="did not write"):
        _write_files(tmp_path / "ckpt", OLD, overwrite=True)


def test_a_symlinked_target_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(FileExistsError, match="symlink"):
        _write_files(tmp_path / "link", NEW, overwrite=True)


def test_overwrite_replaces_our_own_folder(tmp_path):
    _write_files(tmp_path / "ckpt", OLD)
    _write_files(tmp_path / "ckpt", NEW, overwrite=True)
    assert _old_or_new(tmp_path / "ckpt") == "new"
    assert os.listdir(tmp_path) == ["ckpt"]


# --- failures injected at every step ----------------------------------------------------------


class _FailAt:
    """Wraps a function: the n-th call of any wrapped function (counted together) raises; with
    `sticky`, every call from the n-th on raises (a restore that fails too)."""

    def __init__(self, n, sticky=False):
        self.n, self.sticky, self.calls = n, sticky, 0

    def wrap(self, fn):
        def wrapped(*args, **kwargs):
            self.calls += 1
            if self.calls == self.n or (self.sticky and self.calls > self.n):
                raise OSError(5, "injected failure")
            return fn(*args, **kwargs)

        return wrapped


def _patch_steps(monkeypatch, hook, exchange: bool):
    monkeypatch.setattr(_write.os, "replace", hook.wrap(os.replace))
    monkeypatch.setattr(_write.os, "chmod", hook.wrap(os.chmod))
    monkeypatch.setattr(_write, "_exchange", hook.wrap(_write._exchange if exchange else lambda a, b: False))


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-swap", "two-renames"])
@pytest.mark.parametrize("sticky", [False, True], ids=["once", "restore-fails-too"])
def test_an_exception_at_any_step_leaves_old_or_new(tmp_path, monkeypatch, exchange, sticky):
    seen = set()
    for n in range(1, 10):
        out = tmp_path / f"run{n}" / "ckpt"
        _write_files(out, OLD)
        hook = _FailAt(n, sticky)
        with monkeypatch.context() as m:
            _patch_steps(m, hook, exchange)
            try:
                _write_files(out, NEW, overwrite=True)
            except OSError as e:
                assert "injected" in str(e)
        if hook.calls < n:  # every step passed: done
            assert _old_or_new(out) == "new"
            break
        if out.exists():
            seen.add(_old_or_new(out))
        else:  # both renames of the fallback failed: the old folder waits beside it ...
            assert not exchange and sticky
            _write_files(out.parent / "other", NEW)  # ... until the next save to the same parent
            assert _old_or_new(out) == "old"
        _write_files(out.parent / "later", NEW)  # cleans up whatever the failed save left
        assert sorted(os.listdir(out.parent)) in (["ckpt", "later"], ["ckpt", "later", "other"])
    else:
        pytest.fail("the save never completed")
    assert "old" in seen


def test_a_failure_while_writing_keeps_the_old_checkpoint(tmp_path):
    _write_files(tmp_path / "ckpt", OLD)
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(tmp_path / "ckpt", overwrite=True) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("disk full")
    assert _old_or_new(tmp_path / "ckpt") == "old"
    assert os.listdir(tmp_path) == ["ckpt"]


# --- SIGKILL at every step --------------------------------------------------------------------


def _killed_save(out, n, exchange: bool) -> bool:
    """Run the overwriting save in a forked process that SIGKILLs itself just before its n-th
    filesystem step (the writes included). True when the save got through all steps."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            calls = [0]

            def wrap(fn):
                def wrapped(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == n:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return fn(*args, **kwargs)

                return wrapped

            _write.os.replace = wrap(os.replace)
            _write.shutil.rmtree = wrap(_write.shutil.rmtree)
            _write._exchange = wrap(_write._exchange if exchange else lambda a, b: False)
            with atomic_directory(out, overwrite=True) as tmp:
                for name, text in NEW.items():
                    wrap(lambda: None)()  # a kill point between the files
                    (tmp / name).write_text(text)
                wrap(lambda: None)()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-swap", "two-renames"])
def test_sigkill_at_any_step_leaves_old_or_new(tmp_path, exchange):
    outcomes = []
    for n in range(1, 20):
        out = tmp_path / f"run{n}" / "ckpt"
        _write_files(out, OLD)
        finished = _killed_save(out, n, exchange)
        if not out.exists():  # killed between the two renames of the fallback
            assert not exchange
            outcomes.append("missing")
        else:
            outcomes.append(_old_or_new(out))
        _write_files(out.parent / "next", NEW)  # the next save to the same parent cleans up
        assert sorted(os.listdir(out.parent)) == ["ckpt", "next"]
        assert _old_or_new(out) == ("new" if outcomes[-1] == "new" else "old")
        if finished:
            break
    else:
        pytest.fail("the save never completed")
    assert outcomes[0] == "old" and outcomes[-1] == "new"
    assert ("missing" in outcomes) == (not exchange)


def test_check_output_directory_refuses_the_current_directory_without_overwrite_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for target in (".", "", str(tmp_path), ".."):
        with pytest.raises(ValueError, match="current directory or a parent"):
            _write.check_output_directory(target, overwrite=False)
    _write.check_output_directory("new-subfolder", overwrite=False)  # fine


def test_cleanup_leaves_look_alike_folders_of_the_user_alone(tmp_path):
    (tmp_path / ".cache.old-backup").mkdir()  # not an 8-character temp suffix
    (tmp_path / ".notes.old-abcd1234").mkdir()  # the pattern, but not a folder of ours
    (tmp_path / ".notes.old-abcd1234" / "mine.txt").write_text("x")
    _write_files(tmp_path / "ckpt", NEW)
    assert sorted(os.listdir(tmp_path)) == [".cache.old-backup", ".notes.old-abcd1234", "ckpt"]
    assert (tmp_path / ".notes.old-abcd1234" / "mine.txt").read_text() == "x"
