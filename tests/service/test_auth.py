"""The admin token file and the tokens' length (service/auth.py, Settings): files and threads, no server."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from service.auth import TOKEN_FILE, admin_token, check_token_file
from spo_runtime.errors import ConfigError
from spo_runtime.settings import Settings


@pytest.mark.parametrize("variable", ["SPO_ADMIN_TOKEN", "SPO_API_TOKEN"])
def test_tokens_shorter_than_16_characters_are_a_config_error(variable):
    with pytest.raises(ConfigError) as e:
        Settings.from_env({variable: "fifteen-chars-x"})
    assert e.value.variable == variable and "16" in str(e.value) and "fifteen" not in str(e.value)
    assert Settings.from_env({variable: "sixteen-chars-xy"}).token(variable.removeprefix("SPO_").lower()) == "sixteen-chars-xy"
    with pytest.raises(ConfigError) as e:
        admin_token("fifteen-chars-x", "/nonexistent")  # given to the service directly, not through Settings
    assert e.value.variable == "SPO_ADMIN_TOKEN" and "fifteen" not in str(e.value)


def test_the_token_file_is_created_once_private_and_durably(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    token = admin_token(None, tmp_path / "data")
    path = tmp_path / "data" / TOKEN_FILE
    assert path.read_text() == token + "\n" and len(token) >= 32
    assert stat.S_IMODE(path.lstat().st_mode) == 0o600 and not path.is_symlink()
    assert False in synced and True in synced  # the file's bytes and the directory entry
    assert sorted(p.name for p in path.parent.iterdir()) == [TOKEN_FILE]  # no temp file left
    assert admin_token(None, tmp_path / "data") == token  # later starts reuse it


def test_workers_starting_together_share_one_token(tmp_path):
    got, barrier = [], threading.Barrier(8)

    def start():
        barrier.wait()
        got.append(admin_token(None, tmp_path))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and len(set(got)) == 1 and (tmp_path / TOKEN_FILE).read_text().strip() == got[0]


def test_a_short_or_linked_token_file_is_refused(tmp_path):
    path = tmp_path / TOKEN_FILE
    path.write_text("twelve-chars\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError) as e:
        admin_token(None, tmp_path)
    assert e.value.variable == "SPO_ADMIN_TOKEN" and "16" in str(e.value) and str(path) in str(e.value)
    assert "twelve-chars" not in str(e.value)
    # a symbolic link in its place is never followed: neither read nor chmod-ed
    path.unlink()
    target = tmp_path / "elsewhere"
    target.write_text("a-long-enough-token-somebody-else-owns\n")
    target.chmod(0o644)
    path.symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link") as e:
        admin_token(None, tmp_path)
    assert "somebody" not in str(e.value) and stat.S_IMODE(target.stat().st_mode) == 0o644


def test_a_link_planted_where_the_temp_file_goes_is_never_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / f".{TOKEN_FILE}.{os.getpid()}.tmp").symlink_to(victim)  # the name a start used to write first
    token = admin_token(None, data)
    assert victim.read_text() == "keep me\n" and (data / TOKEN_FILE).read_text() == token + "\n"


def test_the_start_check_refuses_what_the_workers_would_and_creates_nothing(tmp_path):
    path = tmp_path / TOKEN_FILE
    check_token_file(None, tmp_path)  # missing: the first worker makes it
    assert not path.exists()
    for damage in (lambda: path.write_text("short\n"), lambda: path.symlink_to(tmp_path / "elsewhere"),
                   lambda: path.mkdir(), lambda: path.write_bytes(b"\xff\xfe" * 20)):
        damage()
        with pytest.raises(ConfigError) as e:
            check_token_file(None, tmp_path)
        assert str(e.value).startswith(f"SPO_ADMIN_TOKEN: {path}"), e.value
        with pytest.raises(ConfigError):  # the same verdict as the workers'
            admin_token(None, tmp_path)
        path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
    check_token_file("x" * 16, tmp_path)  # SPO_ADMIN_TOKEN set: the file is not read
    path.write_text("t" * 20 + "\n")
    check_token_file(None, tmp_path)
    assert admin_token(None, tmp_path) == "t" * 20
