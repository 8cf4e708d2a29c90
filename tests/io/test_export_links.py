"""export_dense never carries a file from outside the checkpoint folder through a symlink."""

from __future__ import annotations

import os

import pytest

from flexigpt_kernels.io import export_dense, save_pretrained

from .helpers import converted, one_thread


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    with one_thread():
        return save_pretrained(converted(output_norm=False), tmp_path_factory.mktemp("src") / "ckpt")


def test_a_symlink_out_of_the_folder_is_refused(checkpoint, tmp_path):
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    link = checkpoint / "special_tokens_map.json"
    link.symlink_to(secret)
    try:
        with pytest.raises(ValueError, match="outside the checkpoint folder"):
            export_dense(checkpoint, tmp_path / "dense")
    finally:
        link.unlink()
    assert not (tmp_path / "dense").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".dense")]  # no temp folder left


def test_a_symlink_inside_the_folder_is_copied_as_a_file(checkpoint, tmp_path):
    (checkpoint / "notes.txt").write_text("kept")
    link = checkpoint / "notes-link.txt"
    link.symlink_to("notes.txt")
    try:
        out = export_dense(checkpoint, tmp_path / "dense")
    finally:
        link.unlink()
        (checkpoint / "notes.txt").unlink()
    assert not (out / "notes-link.txt").is_symlink()
    assert (out / "notes-link.txt").read_text() == "kept"
