"""The admin store (SPO_DATA_DIR/admin_state.json), atomic writes and adapter paths: files only, no server."""

import json
import multiprocessing
import os
import threading

import pytest

from spo_runtime.errors import InvalidRequestError
from spo_runtime.fsutil import atomic_write, write_json_atomic
from spo_runtime.state import EMPTY, AdminStore, resolve_under


@pytest.fixture
def store(tmp_path):
    return AdminStore(tmp_path / "data", tmp_path / "adapters")


def test_read_mutate_version(store):
    assert store.read() == EMPTY and store.version() == 0 and not store.path.exists()
    fresh = store.read()
    fresh["adapters"]["x"] = {}  # a caller's copy: the defaults stay empty
    assert store.read()["adapters"] == {} and EMPTY["adapters"] == {}
    rec = store.mutate(lambda s: s.update(default_lora_scale=0.5))
    assert rec["version"] == 1 and rec["default_lora_scale"] == 0.5 and "updated_at" in rec
    assert store.version() == 1 and store.read() == rec
    store.mutate(lambda s: s["adapters"].update(mine={"file": "mine.safetensors", "sha256": "ab"}))
    rec = store.read()
    assert rec["version"] == 2 and rec["default_lora_scale"] == 0.5 and rec["adapters"]["mine"]["file"] == "mine.safetensors"
    assert json.loads(store.path.read_text()) == rec  # what another worker reads


def test_unreadable_file_reads_as_empty(store):
    store.path.write_text("{not json")
    assert store.read() == EMPTY and store.version() == 0
    assert store.mutate(lambda s: None)["version"] == 1  # and the next change replaces it


def test_a_failing_change_leaves_the_file_alone(store):
    store.mutate(lambda s: s.update(default_lora_scale=1.5))
    before = store.path.read_bytes()

    def bad(s):
        s["default_lora_scale"] = -9
        raise RuntimeError("half done")

    with pytest.raises(RuntimeError):
        store.mutate(bad)
    assert store.path.read_bytes() == before and store.version() == 1


def _increment():
    def change(s):
        s["count"] = s.get("count", 0) + 1
    return change


def test_concurrent_mutations_from_threads_are_serialised(store):
    errors = []

    def worker():
        try:
            for _ in range(40):
                store.mutate(_increment())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    rec = store.read()
    assert rec["count"] == 80 and rec["version"] == 80  # no lost update


def _mutate_many(data_dir, adapter_dir, n):
    s = AdminStore(data_dir, adapter_dir)  # its own store object, in its own process
    for _ in range(n):
        s.mutate(_increment())


def test_concurrent_mutations_from_processes_are_serialised(store):
    ctx = multiprocessing.get_context("fork")  # no re-import: the children only touch files
    procs = [ctx.Process(target=_mutate_many, args=(store.data_dir, store.adapter_dir, 30)) for _ in range(2)]
    for p in procs:
        p.start()
    _mutate_many(store.data_dir, store.adapter_dir, 30)  # and this process, at the same time
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    rec = store.read()
    assert rec["count"] == 90 and rec["version"] == 90


def test_atomic_write_leaves_no_half_file(tmp_path):
    path = tmp_path / "f.json"
    write_json_atomic(path, {"a": 1})
    before = path.read_bytes()

    def partial(fh):
        fh.write(b'{"a": 2, "b": [')  # half a document, then the writer fails
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, partial)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]  # no temp file left behind
    atomic_write(path, b"raw bytes")
    assert path.read_bytes() == b"raw bytes"
    write_json_atomic(tmp_path / "new" / "dir" / "g.json", [1])  # parents are created
    assert json.loads((tmp_path / "new" / "dir" / "g.json").read_text()) == [1]


def test_readers_never_see_a_partial_admin_file(store):
    store.mutate(lambda s: s.update(pad="x" * 200_000))  # big enough that a plain write is not one syscall
    stop = threading.Event()
    bad = []

    def reader():
        while not stop.is_set():
            try:
                json.loads(store.path.read_text())
            except json.JSONDecodeError as e:
                bad.append(e)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(40):
            store.mutate(lambda s: s.update(pad=str(i) * 200_000))
    finally:
        stop.set()
        t.join()
    assert not bad
    assert not [p for p in store.data_dir.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def adapters(tmp_path):
    root = tmp_path / "adapters"
    (root / "sub").mkdir(parents=True)
    (root / "a.safetensors").write_bytes(b"x")
    (root / "sub" / "b.safetensors").write_bytes(b"x")
    (root / "evil.bin").write_bytes(b"x")
    (root / "prompts.txt").write_text("a fox\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "c.safetensors").write_bytes(b"x")
    os.symlink(outside / "c.safetensors", root / "link_out.safetensors")
    os.symlink(outside, root / "dir_out")
    os.symlink(root / "a.safetensors", root / "link_in.safetensors")
    return root


def test_resolve_under_accepts_files_under_the_root(adapters):
    assert resolve_under(adapters, "a.safetensors", "file") == (adapters / "a.safetensors").resolve()
    assert resolve_under(adapters, "sub/b.safetensors", "file") == (adapters / "sub" / "b.safetensors").resolve()
    assert resolve_under(adapters, "sub/../a.safetensors", "file") == (adapters / "a.safetensors").resolve()
    assert resolve_under(adapters, "link_in.safetensors", "file") == (adapters / "a.safetensors").resolve()
    assert resolve_under(adapters, "prompts.txt", "prompts_file", suffixes=(".txt",)).name == "prompts.txt"


@pytest.mark.parametrize("relative,why", [
    ("../outside/c.safetensors", "stay under"),
    ("sub/../../outside/c.safetensors", "stay under"),
    ("link_out.safetensors", "stay under"),  # a symlink out
    ("dir_out/c.safetensors", "stay under"),  # through a symlinked directory
    ("evil.bin", "must end with"),
    ("prompts.txt", "must end with"),
    ("missing.safetensors", "no such file"),
    ("sub", "must end with"),
    ("", "relative path"),
    ("a\x00.safetensors", "relative path"),
])
def test_resolve_under_refuses(adapters, relative, why):
    with pytest.raises(InvalidRequestError, match=why) as e:
        resolve_under(adapters, relative, "file")
    assert e.value.field == "file"


def test_resolve_under_refuses_absolute_paths(adapters):
    for absolute in (str(adapters / "a.safetensors"), "/etc/passwd"):
        with pytest.raises(InvalidRequestError, match="relative path"):
            resolve_under(adapters, absolute, "file")
