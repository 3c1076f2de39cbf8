"""Compile-artifact files are code: ralu loads only bundles it wrote and signed, for this environment."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ralu_runtime.compile import ArtifactError, load_compile_artifacts, verify_compile_artifacts
from ralu_runtime.compile.artifacts import FORMAT, _signed_fields, environment

ROOT = Path(__file__).resolve().parents[1]


def _crafted_bundle(target: Path) -> bytes:
    """A torch cache bundle whose autotune entry's key is an absolute path: loading it writes ``target``."""
    from torch._inductor.runtime.autotune_cache import AutotuneCacheArtifact
    from torch.compiler._cache import _serialize_single_cache
    from torch.utils._appending_byte_serializer import AppendingByteSerializer

    ser = AppendingByteSerializer(serialize_fn=_serialize_single_cache)
    ser.extend([("autotune", [AutotuneCacheArtifact(str(target), b'{"written": "by a crafted file"}')])])
    return ser.to_bytes()


def _manifest(data: bytes, key: bytes, **over) -> dict:
    m = {"format": FORMAT, "file": "bundle.bin", "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
         "created": "2026-01-01T00:00:00Z", **environment(), **over}
    m["hmac_sha256"] = hmac.new(key, _signed_fields(m), hashlib.sha256).hexdigest()
    return m


def _key_file(path: Path, text: str, mode: int = 0o600) -> Path:
    """A key file holding ``text`` with ``mode`` (0600: what ralu accepts)."""
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def crafted(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    target = tmp_path / "outside" / "written.json"
    bundle = tmp_path / "bundle.bin"
    bundle.write_bytes(_crafted_bundle(target))
    key = _key_file(tmp_path / "artifact.key", "11" * 32)
    return bundle, target, key


def test_crafted_file_is_dangerous_when_trusted(crafted):
    """The threat is real: torch writes wherever the file says (here: outside the cache folder)."""
    bundle, target, _key = crafted
    assert load_compile_artifacts(bundle, trust=True)
    assert target.exists()


def test_crafted_file_without_manifest_is_refused(crafted):
    bundle, target, key = crafted
    with pytest.raises(ArtifactError, match="no manifest"):
        load_compile_artifacts(bundle, key=key)
    assert not target.exists()


def test_forged_manifest_is_refused(crafted):
    bundle, target, key = crafted
    data = bundle.read_bytes()
    forged = _manifest(data, b"\x22" * 32)  # right digest and environment, signed with another key
    bundle.with_name("bundle.bin.manifest.json").write_text(json.dumps(forged))
    with pytest.raises(ArtifactError, match="signature"):
        load_compile_artifacts(bundle, key=key)
    assert not target.exists()


def test_swapped_bundle_other_environment_and_wrong_key_are_refused(crafted, tmp_path):
    bundle, target, key = crafted
    good = b"\x00" * 8  # stands for a genuine bundle; only its digest matters here
    mpath = bundle.with_name("bundle.bin.manifest.json")
    mpath.write_text(json.dumps(_manifest(good, bytes.fromhex(key.read_text()))))
    with pytest.raises(ArtifactError, match="do not match the manifest"):  # the crafted bytes behind a real manifest
        load_compile_artifacts(bundle, key=key)
    data = bundle.read_bytes()
    mpath.write_text(json.dumps(_manifest(data, bytes.fromhex(key.read_text()), torch="1.0.0")))
    with pytest.raises(ArtifactError, match="another environment: torch '1.0.0'"):
        verify_compile_artifacts(bundle, key=key)
    other = _key_file(tmp_path / "other.key", "33" * 32)
    mpath.write_text(json.dumps(_manifest(data, bytes.fromhex(key.read_text()))))
    with pytest.raises(ArtifactError, match="signature"):
        load_compile_artifacts(bundle, key=other)
    assert verify_compile_artifacts(bundle, key=key)["sha256"] == hashlib.sha256(data).hexdigest()
    assert not target.exists()


def test_missing_file_is_false_and_bad_key_arguments(tmp_path):
    assert load_compile_artifacts(tmp_path / "none.bin") is False
    with pytest.raises(ValueError, match="at least 32 random bytes"):
        from ralu_runtime.compile.artifacts import _key

        _key(b"short")
    with pytest.raises(ArtifactError, match="does not exist"):
        _key(tmp_path / "missing.key")


def test_a_fresh_home_gets_its_cache_folders_and_bad_paths_are_artifact_errors(tmp_path, monkeypatch):
    """Folders above the cache folder that do not exist yet (a fresh home without ~/.cache) are created, 0700:
    the ancestor check stat-ed them first and raised FileNotFoundError; a file in the way, a path or key of the
    wrong type, an undecodable manifest and a signed bundle torch cannot read are errors that say so."""
    from ralu_runtime.compile import enable_persistent_cache
    from ralu_runtime.compile.artifacts import _key

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))   # no such folder yet
    monkeypatch.delenv("RALU_CACHE_DIR", raising=False)
    made = enable_persistent_cache()
    assert made == tmp_path / "home" / ".cache" / "ralu" / "inductor" and made.is_dir()
    for folder in (made, made.parent, made.parent.parent, made.parents[2]):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    monkeypatch.setenv("RALU_CACHE_DIR", str(tmp_path / "x" / "y"))
    assert len(_key(None)) == 32 and (tmp_path / "x" / "y" / "artifact.key").is_file()   # the default key file
    (tmp_path / "file").write_text("")
    with pytest.raises(ArtifactError, match="a file is in the way"):
        enable_persistent_cache(tmp_path / "file")
    with pytest.raises(ArtifactError, match="a file is in the way"):
        enable_persistent_cache(tmp_path / "file" / "sub")
    with pytest.raises(TypeError, match="path=None: give the bundle's file path"):
        load_compile_artifacts(None)
    with pytest.raises(TypeError, match="key=int"):
        _key(123)


def test_an_undecodable_manifest_and_an_unreadable_signed_bundle_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    key = _key_file(tmp_path / "artifact.key", "11" * 32)
    bundle = tmp_path / "bundle.bin"
    bundle.write_bytes(b"not a torch bundle")
    (tmp_path / "bundle.bin.manifest.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ArtifactError, match="unreadable manifest"):
        load_compile_artifacts(bundle, key=key)
    data = bundle.read_bytes()   # signed with the right key: verified, then torch cannot unpickle it
    (tmp_path / "bundle.bin.manifest.json").write_text(json.dumps(_manifest(data, bytes.fromhex("11" * 32))))
    with pytest.raises(ArtifactError, match="torch could not read the bundle"):
        load_compile_artifacts(bundle, key=key)


_SAVE = """
import sys, torch
from ralu_runtime.compile import enable_persistent_cache, save_compile_artifacts
enable_persistent_cache(sys.argv[1])
f = torch.compile(lambda x: torch.sin(x) * 2 + 1, dynamic=False)
f(torch.arange(8.0))
print(save_compile_artifacts(sys.argv[2], key=sys.argv[3]))
"""

_LOAD = """
import sys, torch
from torch._dynamo.utils import counters
from ralu_runtime.compile import enable_persistent_cache, load_compile_artifacts
enable_persistent_cache(sys.argv[1])
print("loaded", load_compile_artifacts(sys.argv[2], key=sys.argv[3]))
f = torch.compile(lambda x: torch.sin(x) * 2 + 1, dynamic=False)
y = f(torch.arange(8.0))
assert torch.allclose(y, torch.sin(torch.arange(8.0)) * 2 + 1)
print("fxgraph_cache_hit", counters["inductor"]["fxgraph_cache_hit"])
"""


@pytest.mark.slow
def test_round_trip_in_fresh_processes(tmp_path):
    """save_compile_artifacts in one process, load_compile_artifacts in another with an empty cache: the compile
    is served from the bundle (inductor FX-graph cache hit)."""
    key = _key_file(tmp_path / "k", "44" * 32)
    bundle = tmp_path / "ralu.bundle"
    run = lambda code, cache: subprocess.run(  # noqa: E731
        [sys.executable, "-c", textwrap.dedent(code), str(tmp_path / cache), str(bundle), str(key)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    saved = run(_SAVE, "cache_a")
    assert saved.returncode == 0, saved.stderr[-3000:]
    assert int(saved.stdout.split()[-1]) > 0 and bundle.with_name("ralu.bundle.manifest.json").exists()
    loaded = run(_LOAD, "cache_b")
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "loaded True" in loaded.stdout
    assert int(loaded.stdout.split("fxgraph_cache_hit")[1].split()[0]) >= 1, loaded.stdout


# ---------------------------------------------------------------------------------------- keys and permissions
def test_short_or_open_keys_are_refused(tmp_path):
    """Issue 22 item 2: an empty or 1-byte key file, and key files readable or writable by others, were accepted."""
    from ralu_runtime.compile.artifacts import _key

    for text in ("", "ab", "11" * 31):
        with pytest.raises(ArtifactError, match="at least 32 random bytes"):
            _key(_key_file(tmp_path / "short.key", text))
    with pytest.raises(ValueError, match="at least 32 random bytes"):
        _key(b"\x01" * 31)
    with pytest.raises(ValueError, match="at least 32 random bytes"):
        _key("11" * 16)  # a hex string of 16 bytes
    for mode in (0o644, 0o666, 0o640, 0o604):
        with pytest.raises(ArtifactError, match=f"mode {mode:04o}.*chmod 600"):
            _key(_key_file(tmp_path / "open.key", "11" * 32, mode))
    assert _key(_key_file(tmp_path / "ok.key", "11" * 32)) == b"\x11" * 32
    assert _key(_key_file(tmp_path / "ro.key", "11" * 32, 0o400)) == b"\x11" * 32


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown to another user")
def test_key_and_cache_folder_of_another_user_are_refused_and_left_alone(tmp_path):
    from ralu_runtime.compile import enable_persistent_cache
    from ralu_runtime.compile.artifacts import _key

    key = _key_file(tmp_path / "theirs.key", "11" * 32)
    os.chown(key, 12345, 12345)
    with pytest.raises(ArtifactError, match="belongs to uid 12345"):
        _key(key)
    folder = tmp_path / "their_cache"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    os.chown(folder, 12345, 12345)
    with pytest.raises(ArtifactError, match="belongs to uid 12345.*will not change the mode"):
        enable_persistent_cache(folder)
    assert folder.stat().st_mode & 0o777 == 0o777  # not chmod-ed


def test_own_cache_folder_is_made_private(tmp_path, monkeypatch):
    from ralu_runtime.compile import enable_persistent_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before"))
    folder = tmp_path / "mine"
    folder.mkdir()
    folder.chmod(0o777)
    assert enable_persistent_cache(folder) == folder
    assert folder.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("open_part", ["bundle", "manifest", "folder"])
def test_bundles_others_can_write_are_refused_even_when_trusted(crafted, tmp_path, open_part):
    bundle, target, key = crafted
    data = bundle.read_bytes()
    mpath = bundle.with_name(bundle.name + ".manifest.json")
    mpath.write_text(json.dumps(_manifest(data, bytes.fromhex(key.read_text()))))
    part = {"bundle": bundle, "manifest": mpath, "folder": tmp_path}[open_part]
    part.chmod(part.stat().st_mode | 0o022)
    try:
        for trust in (False, True):
            with pytest.raises(ArtifactError, match="writable by other users"):
                load_compile_artifacts(bundle, key=key, trust=trust)
    finally:
        part.chmod(part.stat().st_mode & ~0o022)
    assert not target.exists()


# ------------------------------------------------------------------------------- what a shared machine can plant
ROOT_ONLY = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                               reason="needs root to chown to another user")


def test_a_symlink_planted_in_the_cache_folder_is_refused(tmp_path, monkeypatch):
    """A folder that was open (0777) may hold what another user planted: a symlink to their own folder survived
    the chmod to 0700 and the compile wrote (and later read) cache entries there."""
    from ralu_runtime.compile import enable_persistent_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before"))
    folder, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    (folder / "fxgraph").symlink_to(elsewhere)
    with pytest.raises(ArtifactError, match="fxgraph is a symbolic link inside a folder whose contents ralu loads"):
        enable_persistent_cache(folder)
    (folder / "fxgraph").unlink()
    (folder / "fxgraph").mkdir()
    (folder / "fxgraph" / "entry").write_bytes(b"x")
    (folder / "fxgraph" / "entry").chmod(0o666)
    with pytest.raises(ArtifactError, match="entry is writable by other users"):
        enable_persistent_cache(folder)
    (folder / "fxgraph" / "entry").chmod(0o644)
    assert enable_persistent_cache(folder) == folder


@ROOT_ONLY
def test_entries_of_another_user_and_open_folders_above_are_refused(tmp_path, monkeypatch):
    from ralu_runtime.compile import enable_persistent_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before"))
    folder = tmp_path / "cache"
    (folder / "fxgraph").mkdir(parents=True)
    os.chown(folder / "fxgraph", 12345, 12345)
    with pytest.raises(ArtifactError, match="fxgraph belongs to uid 12345"):
        enable_persistent_cache(folder)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)                         # others may rename what is below it (no sticky bit)
    with pytest.raises(ArtifactError, match="the folder above it, .*shared, is writable by other users"):
        enable_persistent_cache(shared / "cache")
    shared.chmod(0o1777)                        # /tmp's way: the sticky bit keeps others' hands off our entries
    assert enable_persistent_cache(shared / "cache2") == shared / "cache2"


@ROOT_ONLY
def test_a_bundle_loads_only_into_an_inductor_cache_of_this_user(crafted, tmp_path, monkeypatch):
    """torch's default cache folder is created by whoever comes first: a verified bundle went into one another
    user prepared, and the next compile read their entries."""
    bundle, target, key = crafted
    data = bundle.read_bytes()
    bundle.with_name(bundle.name + ".manifest.json").write_text(json.dumps(_manifest(data, bytes.fromhex(
        key.read_text()))))
    theirs = tmp_path / "inductor"
    theirs.mkdir(mode=0o777)
    os.chown(theirs, 12345, 12345)
    with pytest.raises(ArtifactError, match="belongs to uid 12345"):
        load_compile_artifacts(bundle, key=key)
    assert not target.exists()


@ROOT_ONLY
def test_trusted_bundles_of_another_user_are_refused(crafted):
    bundle, target, _key = crafted
    os.chown(bundle, 12345, 12345)
    with pytest.raises(ArtifactError, match="bundle: .* belongs to uid 12345"):
        load_compile_artifacts(bundle, trust=True)
    assert not target.exists()


def test_a_renamed_bundle_a_swapped_key_link_and_odd_paths_are_refused(crafted, tmp_path):
    from ralu_runtime.compile.artifacts import _key

    bundle, target, key = crafted
    data = bundle.read_bytes()
    other = tmp_path / "other-model.bin"                     # a signed bundle saved under another name
    other.write_bytes(data)
    other.with_name(other.name + ".manifest.json").write_text(json.dumps(_manifest(data, bytes.fromhex(
        key.read_text()))))
    with pytest.raises(ArtifactError, match="signed for the file 'bundle.bin', not 'other-model.bin'"):
        load_compile_artifacts(other, key=key)
    link = tmp_path / "key-link"                             # a key reached through a symlink (swappable)
    link.symlink_to(key)
    with pytest.raises(ArtifactError, match="cannot be opened as a plain file"):
        _key(link)
    with pytest.raises(ValueError, match="neither an existing key file nor a hex string"):
        _key(str(tmp_path / "missing.key"))
    with pytest.raises(ArtifactError, match="not a regular file"):
        load_compile_artifacts(tmp_path, key=key)
    fifo = tmp_path / "fifo.bin"
    os.mkfifo(fifo)
    with pytest.raises(ArtifactError, match="not a regular file"):   # reading it would block for good
        load_compile_artifacts(fifo, key=key)
    assert not target.exists()


def test_onnx_dir_with_something_planted_is_refused(tmp_path):
    """Exported graphs are loaded back by path: a link planted in onnx_dir would let its owner swap the graph."""
    from ralu_runtime.compile.artifacts import _private_dir

    folder = tmp_path / "onnx"
    folder.mkdir()
    (folder / "stage0_L16_B1").symlink_to(tmp_path)
    with pytest.raises(ArtifactError, match="symbolic link"):
        _private_dir(folder)
