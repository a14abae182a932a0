"""The one all-or-nothing writer (cdrl.utils.atomic_write) and output ownership (cdrl.utils.check_output_folder).

A user's files are never overwritten or removed by the bookkeeping; a folder replace leaves the old or
the new version at the path at every moment, or is recovered on the next write after a kill.
"""

from __future__ import annotations

import os

import pytest

import cdrl.utils as utils
from cdrl.cli.common import CLIError
from cdrl.utils import (
    OWNER_MARKER,
    atomic_write,
    check_output_folder,
    is_owned_output,
    recover_replace,
)


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_file_appears_only_once_complete_and_an_error_leaves_the_old_one(tmp_path):
    path = tmp_path / "figures.json"
    with atomic_write(path) as tmp:
        assert tmp.parent == tmp_path and tmp != path and not path.exists()
        tmp.write_text("new")
    assert path.read_text() == "new" and _listing(tmp_path) == ["figures.json"]
    with pytest.raises(RuntimeError), atomic_write(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "new" and _listing(tmp_path) == ["figures.json"]


def test_temporaries_never_take_a_users_name(tmp_path):
    # The old scheme wrote to .tmp-NAME and NAME.tmp and deleted whatever was there first.
    for name in (".tmp-out", "out.tmp", ".tmp-grid.png", "grid.png.tmp"):
        (tmp_path / name).write_text("the user's")
    with atomic_write(tmp_path / "out", folder=True) as tmp:
        (tmp / "a.png").write_bytes(b"x")
    with atomic_write(tmp_path / "grid.png") as tmp:
        tmp.write_bytes(b"png")
    for name in (".tmp-out", "out.tmp", ".tmp-grid.png", "grid.png.tmp"):
        assert (tmp_path / name).read_text() == "the user's"


def test_a_folder_is_replaced_whole_and_carries_our_marker(tmp_path):
    out = tmp_path / "samples"
    with atomic_write(out, folder=True) as tmp:
        (tmp / "old.png").write_bytes(b"1")
    assert is_owned_output(out) and _listing(out) == [OWNER_MARKER, "old.png"]
    with atomic_write(out, folder=True) as tmp:
        (tmp / "new.png").write_bytes(b"2")
    assert _listing(out) == [OWNER_MARKER, "new.png"]
    assert _listing(tmp_path) == ["samples"]  # no temporary or old copy is left beside it


def test_failed_write_removes_the_folders_it_made(tmp_path):
    with pytest.raises(ValueError), atomic_write(tmp_path / "a/b/c.json") as tmp:
        tmp.write_text("x")
        raise ValueError("bad")
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False])
def test_the_old_or_the_new_folder_is_always_there(tmp_path, monkeypatch, exchange):
    # Watch the path at every rename: it must never be missing. Without an atomic exchange (other OSes)
    # the fallback moves the old version aside first; a kill right there is repaired by recover_replace.
    out = tmp_path / "pipeline"
    with atomic_write(out, folder=True) as tmp:
        (tmp / "v").write_text("old")
    if not exchange:
        monkeypatch.setattr(utils, "_exchange", lambda a, b: False)
    seen, real_replace = [], os.replace

    def watched_replace(src, dst):
        real_replace(src, dst)
        seen.append((out / "v").read_text() if out.exists() else None)

    monkeypatch.setattr(utils.os, "replace", watched_replace)
    with atomic_write(out, folder=True) as tmp:
        (tmp / "v").write_text("new")
    assert (out / "v").read_text() == "new"
    if exchange:
        assert seen == []  # one renameat2 exchange, no window at all
    else:
        assert seen == [None, "new"]  # the window the recovery below closes

        # A kill between the two renames: the old version waits aside, the new one is a temporary.
        def killed_replace(src, dst):
            real_replace(src, dst)
            raise KeyboardInterrupt

        monkeypatch.setattr(utils.os, "replace", killed_replace)
        monkeypatch.setattr(utils, "_remove", lambda path: None)  # the kill also skips the cleanup
        with pytest.raises(KeyboardInterrupt), atomic_write(out, folder=True) as tmp:
            (tmp / "v").write_text("newer")
        assert not out.exists()
        monkeypatch.undo()
        recover_replace(out)
        assert (out / "v").read_text() == "new" and _listing(tmp_path) == ["pipeline"]


def test_only_our_folders_may_be_replaced(tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "manifest.json").write_text("{}")  # a manifest.json of the user's does not make it ours
    (mine / "holiday.jpg").write_bytes(b"jpg")
    with pytest.raises(CLIError, match="cdrl did not write"):
        check_output_folder(mine)
    assert _listing(mine) == ["holiday.jpg", "manifest.json"]
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty")
    check_output_folder(tmp_path / "new")
    with atomic_write(tmp_path / "ours", folder=True) as tmp:
        (tmp / "x").write_text("x")
    check_output_folder(tmp_path / "ours")
    with pytest.raises(CLIError, match="is a file"):
        check_output_folder(mine / "holiday.jpg")
