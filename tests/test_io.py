"""lorabook._io, the one place lorabook writes files: a file or a folder is replaced as one unit, a failure at any
point leaves what was there and no temp file or folder, on Linux (one renameat2 exchange) and elsewhere (two
renames)."""
import os

import pytest

from lorabook import _io


def boom(*args, **kwargs):
    raise OSError("disk full")


def listing(folder) -> dict[str, str]:
    """name -> content of every file under ``folder`` (relative paths)."""
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(params=["exchange", "two renames"])
def swap(request, monkeypatch):
    """Run a test with Linux's atomic exchange and with the fallback other systems get."""
    if request.param == "two renames":
        monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    return request.param


@pytest.fixture
def adapter(tmp_path):
    folder = tmp_path / "ad"
    folder.mkdir()
    (folder / "weights").write_text("old weights")
    (folder / "config").write_text("old config")
    (folder / "README.md").write_text("notes")
    (folder / "images").mkdir()
    (folder / "images" / "plot.txt").write_text("a plot")
    return folder


def writer(text):
    return lambda path: path.write_text(text)


def test_write_folder_replaces_its_files_and_keeps_the_others(adapter, swap):
    _io.write_folder(adapter, {"weights": writer("new weights"), "config": writer("new config")})
    assert listing(adapter) == {"weights": "new weights", "config": "new config", "README.md": "notes",
                                "images/plot.txt": "a plot"}
    assert os.listdir(adapter.parent) == ["ad"]


def test_write_folder_creates_a_folder_and_its_parents(tmp_path, swap):
    folder = tmp_path / "a" / "b"
    assert _io.write_folder(folder, {"x": writer("1")}) == folder
    assert listing(folder) == {"x": "1"} and os.listdir(folder.parent) == ["b"]


def test_build_folder_replaces_an_existing_folder_whole(adapter, swap):
    _io.build_folder(adapter, lambda tmp: (tmp / "model").write_text("built"))
    assert listing(adapter) == {"model": "built"} and os.listdir(adapter.parent) == ["ad"]


@pytest.mark.parametrize("call", ["write_folder", "build_folder"])
def test_a_path_that_is_a_file_is_refused(tmp_path, call):
    file = tmp_path / "ad"
    file.write_text("a file")
    with pytest.raises(ValueError, match=f"{file} exists and is not a folder"):
        if call == "write_folder":
            _io.write_folder(file, {"x": writer("1")})
        else:
            _io.build_folder(file, lambda tmp: None)
    assert file.read_text() == "a file" and os.listdir(tmp_path) == ["ad"]


def failing_writer(path):
    path.write_text("half")
    raise OSError("disk full")


FAILURES = {  # where a write_folder fails: (what to patch, or None; the files given)
    "first file": (None, {"weights": failing_writer, "config": writer("new config")}),
    "last file": (None, {"weights": writer("new weights"), "config": failing_writer}),
    "keeping the old files": ("_link_or_copy", {"weights": writer("new weights")}),
    "the swap": ("_swap_in", {"weights": writer("new weights")}),
}


@pytest.mark.parametrize("where", sorted(FAILURES))
def test_a_failure_leaves_the_folder_as_it_was_and_nothing_beside_it(adapter, monkeypatch, swap, where):
    patch, files = FAILURES[where]
    if patch:
        monkeypatch.setattr(_io, patch, boom)
    before = listing(adapter)
    with pytest.raises(OSError, match="disk full"):
        _io.write_folder(adapter, files)
    assert listing(adapter) == before and os.listdir(adapter.parent) == ["ad"]


def test_a_failure_creates_no_folder(tmp_path, swap):
    with pytest.raises(OSError, match="disk full"):
        _io.write_folder(tmp_path / "new", {"x": failing_writer})
    assert os.listdir(tmp_path) == []


def test_the_fallback_puts_the_old_folder_back_when_the_second_rename_fails(adapter, monkeypatch):
    """Two renames: folder -> .ad.old-*, then tmp -> folder; if the second fails the first is undone."""
    monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    rename, calls = os.rename, []

    def second_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("disk full")
        return rename(src, dst)
    monkeypatch.setattr(_io.os, "rename", second_fails)
    before = listing(adapter)
    with pytest.raises(OSError, match="disk full"):
        _io.write_folder(adapter, {"weights": writer("new weights")})
    assert len(calls) == 3  # out of the way, (failed) in, back
    assert listing(adapter) == before and os.listdir(adapter.parent) == ["ad"]


def test_the_exchange_is_used_on_linux(adapter, monkeypatch):
    if not _io._exchange(adapter, adapter):  # exchanging a path with itself: a no-op where renameat2 exists
        pytest.skip("no renameat2 here: the two-rename fallback runs (tested above)")
    monkeypatch.setattr(_io.os, "rename", boom)  # the exchange alone must do it
    _io.write_folder(adapter, {"weights": writer("new weights")})
    assert listing(adapter)["weights"] == "new weights" and os.listdir(adapter.parent) == ["ad"]


def test_write_file_and_write_text(tmp_path):
    path = tmp_path / "f.txt"
    _io.write_text(path, "één\n")
    assert path.read_bytes() == "één\n".encode()
    with pytest.raises(OSError, match="disk full"):
        _io.write_file(path, failing_writer)
    assert path.read_text(encoding="utf-8") == "één\n" and os.listdir(tmp_path) == ["f.txt"]

