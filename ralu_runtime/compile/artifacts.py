"""Compile caches across processes, and why their files are treated as code.

:func:`enable_persistent_cache` points inductor's FX-graph, AOT-autograd and autotune caches at a folder
(default ``$RALU_CACHE_DIR`` or ``~/.cache/ralu/inductor``, created private to the user) so a new process skips
the compile. :func:`save_compile_artifacts` / :func:`load_compile_artifacts` move torch's portable cache bundle
(``torch.compiler.save_cache_artifacts``) between processes or machines.

**These files are code.** Loading a bundle unpickles inductor entries (a crafted file runs arbitrary commands)
and writes autotune entries at paths taken from the file; the persistent cache folder is read the same way.
So:

* :func:`save_compile_artifacts` writes, next to the bundle, a manifest ``<file>.manifest.json`` with the
  bundle's SHA-256, its size, the torch / ralu / CUDA versions and device it was built with, and an HMAC-SHA256
  over all of it with a secret key (default: ``~/.cache/ralu/artifact.key``, 32 random bytes created with mode 0600
  on first use; ``RALU_ARTIFACT_KEY_FILE`` or ``key=`` choose another, e.g. one shared by the replicas of a
  deployment);
* the key has at least :data:`MIN_KEY_BYTES` (32) bytes, and a key file must belong to this user with no group or
  other permission bits (mode 0600 or 0400): anything else is refused (:class:`ArtifactError`) with the reason;
* :func:`load_compile_artifacts` refuses (:class:`ArtifactError`, before anything is unpickled) a bundle whose
  file, manifest or folder others can write (group or other write bit), and, unless ``trust=True`` (a file you
  vouch for yourself), a bundle without manifest, with a wrong digest or size, a manifest not signed with the key,
  or other torch / ralu / CUDA versions or another device;
* :func:`enable_persistent_cache` makes the cache folder private (mode 0700) only when it belongs to this user; a
  folder of another user is refused with the reason, never chmod-ed; so are a folder holding a symlink or an entry
  that is not this user's or that others can write, and a folder under a parent others can write without the
  sticky bit. The same checks cover inductor's cache folder before a bundle is loaded into it, and ``onnx_dir``;
* the key file is opened once without following symlinks, and checked and read from that open file; a bundle must
  be a regular file whose signed manifest names it (not a bundle renamed over another).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import platform
import secrets
import stat
import time
from pathlib import Path

import torch

from ..versions import installed_version

FORMAT = "ralu-compile-artifacts/1"


MIN_KEY_BYTES = 32  # HMAC-SHA256 keys: at least the hash's output size


class ArtifactError(ValueError):
    """A compile-artifact file, key or cache folder that ralu cannot trust: not written by ralu, written for another
    environment, or open to other users."""


def _owner_problem(path: Path, st: os.stat_result) -> str | None:
    """Why ``path`` is not owned by this process's user (None: it is, or the platform has no owners)."""
    if not hasattr(os, "geteuid"):  # pragma: no cover - Windows: no POSIX owners
        return None
    if st.st_uid != os.geteuid():
        return f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})"
    return None


def _check_ancestors(path: Path) -> None:
    """ArtifactError when a folder above ``path`` lets other users rename or replace what is below it: writable by
    group or others without the sticky bit (``/tmp`` has it). (Folders above that belong to another user are taken:
    a container's bind mounts are owned by a host user.)"""
    if not hasattr(os, "geteuid"):  # pragma: no cover - Windows
        return
    for parent in path.absolute().parents:
        st = parent.stat()
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise ArtifactError(f"{path}: the folder above it, {parent}, is writable by other users (mode "
                                f"{st.st_mode & 0o777:04o}, no sticky bit), who can replace what is below it")


def _check_contents(path: Path) -> None:
    """ArtifactError for anything in the folder ``path`` (at any depth) that is a symlink, belongs to another user
    or is writable by group or others: planted there while the folder was open, it would be read as code."""
    for root, dirs, files in os.walk(path, followlinks=False):
        for name in dirs + files:
            entry = Path(root) / name
            st = entry.lstat()
            if stat.S_ISLNK(st.st_mode):
                raise ArtifactError(f"{entry} is a symbolic link inside a folder whose contents ralu loads as code "
                                    f"(it points to {os.readlink(entry)!r}); remove it or use a fresh folder")
            problem = _owner_problem(entry, st)
            if problem is not None or st.st_mode & 0o022:
                why = problem or f"{entry} is writable by other users (mode {st.st_mode & 0o777:04o})"
                raise ArtifactError(f"{why}, inside a folder whose contents ralu loads as code; remove it or use a "
                                    "fresh folder")


def _private_dir(path: Path, *, contents: bool = True) -> Path:
    """Create ``path`` (mode 0700) or make this user's existing folder 0700; a folder of another user, a folder
    above it that others can write (:func:`_check_ancestors`) or, with ``contents``, anything inside that is not
    this user's own plain file or folder (:func:`_check_contents`) is refused (ArtifactError) and left as it is.
    Missing folders above it (a fresh home without ``~/.cache``) are created with mode 0700 too."""
    path = path.absolute()
    try:
        for parent in reversed(path.parents):  # the missing ones, top down: checked below with the others
            if not parent.exists():
                parent.mkdir(mode=0o700, exist_ok=True)
        _check_ancestors(path)
        path.mkdir(exist_ok=True, mode=0o700)
    except (FileExistsError, NotADirectoryError) as exc:
        raise ArtifactError(f"{path}: cannot be a folder, a file is in the way ({exc.filename}); give a folder "
                            "path (cache_dir= or RALU_CACHE_DIR)") from None
    except PermissionError as exc:
        raise ArtifactError(f"{path}: cannot create it ({exc.strerror}: {exc.filename}); give a folder of your own "
                            "(cache_dir= or RALU_CACHE_DIR)") from None
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        raise ArtifactError(f"{path} is a symbolic link; give ralu the real folder (its contents are loaded as code)")
    problem = _owner_problem(path, st)
    if problem is not None:
        raise ArtifactError(f"{problem}: ralu loads its contents as code and will not change the mode of a folder it "
                            "does not own; use a folder of your own (cache_dir= or RALU_CACHE_DIR)")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    if contents:
        _check_contents(path)
    return path


def _check_not_writable_by_others(path: Path, what: str) -> None:
    """ArtifactError when ``path`` (a bundle, its manifest or their folder) has the group or other write bit."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ArtifactError(f"{what} {path}: cannot be checked ({exc})") from None
    if mode & 0o022:
        raise ArtifactError(f"{what} {path} is writable by other users (mode {mode & 0o777:04o}): anyone who can "
                            "write it can run code in this process; remove the group / other write bits (chmod "
                            "go-w) or keep bundles in a folder of your own")


def _check_key_file(path: Path, st: os.stat_result) -> None:
    """ArtifactError unless the key file ``path`` (``st``: the open file's status) is a regular file of this user
    without group / other bits."""
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"artifact key file {path} is not a regular file")
    problem = _owner_problem(path, st)
    if problem is not None:
        raise ArtifactError(f"artifact key file: {problem}; the key must be this user's own")
    if st.st_mode & 0o077:
        raise ArtifactError(f"artifact key file {path} has mode {st.st_mode & 0o777:04o}: other users can read or "
                            "change the key (and forge signatures); chmod 600 it")


def default_cache_root() -> Path:
    return Path(os.environ.get("RALU_CACHE_DIR") or Path.home() / ".cache" / "ralu")


def enable_persistent_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """Keep inductor's FX-graph, AOT-autograd and autotune caches in ``cache_dir`` (default: ``$RALU_CACHE_DIR/inductor``
    or ``~/.cache/ralu/inductor``), so compiled kernels survive the process. Call before the first compile. The
    folder's contents are loaded as code: it is created (or set) to mode 0700; a folder owned by another user is
    refused (:class:`ArtifactError`), never chmod-ed."""
    path = _private_dir(Path(cache_dir) if cache_dir else default_cache_root() / "inductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    import torch._inductor.config as icfg

    icfg.fx_graph_cache = True
    for name in ("autotune_local_cache", "bundle_triton_into_fx_graph_cache"):
        if hasattr(icfg, name):
            setattr(icfg, name, True)
    try:
        import torch._functorch.config as fcfg

        fcfg.enable_autograd_cache = True
    except (ImportError, AttributeError):  # pragma: no cover - older torch
        pass
    return path


def _bundle_path(path) -> Path:
    """``path`` of a bundle as a Path; TypeError naming it for anything but a str or os.PathLike."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path={path!r}: give the bundle's file path (a str or os.PathLike)")
    return Path(path)


def key_problem(path: str | os.PathLike) -> str | None:
    """Why the existing key file ``path`` would be refused by save / load / verify (its mode, owner, contents), or
    None when it would be used. Creates nothing (``ralu info``)."""
    try:
        _key(Path(path))
    except (ArtifactError, ValueError, OSError) as exc:
        return " ".join(str(exc).split())
    return None


def _key(key) -> bytes:
    """The HMAC key (at least :data:`MIN_KEY_BYTES` bytes): bytes, a hex string, a key file (this user's, mode 0600
    or 0400, holding hex), ``$RALU_ARTIFACT_KEY_FILE``, or the default key file (created on first use)."""
    if key is not None and not isinstance(key, (bytes, str, os.PathLike)):
        raise TypeError(f"key={type(key).__name__}: give bytes, a hex string or a key file path (or None: "
                        "$RALU_ARTIFACT_KEY_FILE or the default key file)")
    if isinstance(key, bytes):
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"key: {len(key)} bytes; use at least {MIN_KEY_BYTES} random bytes "
                             "(e.g. secrets.token_bytes(32))")
        return key
    if isinstance(key, str) and not os.path.lexists(key):
        try:
            raw = bytes.fromhex(key)
        except ValueError:
            raise ValueError(f"key={key[:80]!r} is neither an existing key file nor a hex string: give bytes, a hex "
                             "string or the path of a key file") from None
        return _key(raw)
    path = Path(key or os.environ.get("RALU_ARTIFACT_KEY_FILE") or default_cache_root() / "artifact.key")
    if not path.exists():
        if key is not None or os.environ.get("RALU_ARTIFACT_KEY_FILE"):
            raise ArtifactError(f"artifact key file {path} does not exist")
        _private_dir(path.parent, contents=False)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(MIN_KEY_BYTES))
    # open once, without following a symlink, and check and read that same open file (no swap in between)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ArtifactError(f"artifact key file {path} cannot be opened as a plain file ({exc.strerror or exc}; a "
                            "symbolic link is refused)") from None
    with os.fdopen(fd, "rb") as f:
        _check_key_file(path, os.fstat(f.fileno()))
        text = f.read(4096)
    try:
        data = bytes.fromhex(text.decode("ascii").strip())
    except ValueError:
        raise ArtifactError(f"artifact key file {path} does not hold a hex key") from None
    if len(data) < MIN_KEY_BYTES:
        raise ArtifactError(f"artifact key file {path} holds {len(data)} bytes; use at least {MIN_KEY_BYTES} random "
                            f"bytes (e.g. python -c 'import secrets; print(secrets.token_hex({MIN_KEY_BYTES}))')")
    return data


def environment() -> dict:
    """What a bundle depends on: torch, ralu, CUDA versions and the device it was compiled for."""
    ralu = installed_version("ralu") or "source"  # "source": running from a tree that is not installed
    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "ralu": ralu, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.machine()})"}


def _manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".manifest.json")


def _signed_fields(m: dict) -> bytes:
    return json.dumps({k: v for k, v in m.items() if k != "hmac_sha256"}, sort_keys=True).encode()


def save_compile_artifacts(path: str | os.PathLike, *, key=None) -> int:
    """Write torch's portable compile-cache bundle (everything compiled in this process) to ``path`` and its
    signed manifest to ``<path>.manifest.json``. Returns the bundle's bytes (0: nothing compiled, nothing
    written)."""
    path = _bundle_path(path)
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return 0
    data, _info = saved
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "file": path.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **environment()}
    manifest["hmac_sha256"] = hmac.new(_key(key), _signed_fields(manifest), hashlib.sha256).hexdigest()
    path.write_bytes(data)
    _manifest_path(path).write_text(json.dumps(manifest, indent=2))
    return len(data)


def verify_compile_artifacts(path: str | os.PathLike, *, key=None, data: bytes | None = None) -> dict:
    """Check a bundle against its manifest, the key and this environment; returns the manifest or raises
    :class:`ArtifactError` saying what does not match. Reads the file's bytes only (nothing is unpickled);
    ``data``: the bundle's bytes when already read (so the bytes checked are the bytes loaded)."""
    path = _bundle_path(path)
    mpath = _manifest_path(path)
    if not mpath.exists():
        raise ArtifactError(f"{path}: no manifest {mpath.name}; ralu loads only bundles written by "
                            "save_compile_artifacts (pass trust=True for a file you vouch for)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ArtifactError(f"{mpath}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: not a {FORMAT} manifest")
    if manifest.get("file") != path.name:  # signed: a bundle copied or renamed over another is not that one
        raise ArtifactError(f"{path}: its manifest was signed for the file {manifest.get('file')!r}, not "
                            f"{path.name!r} (a bundle renamed or copied over another); save it under its own name")
    expected = hmac.new(_key(key), _signed_fields(manifest), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(str(manifest.get("hmac_sha256", "")), expected):
        raise ArtifactError(f"{mpath}: signature does not match this artifact key (written by another key, or "
                            "edited); use the key it was saved with (key= or RALU_ARTIFACT_KEY_FILE)")
    data = path.read_bytes() if data is None else data
    if len(data) != manifest.get("size") or hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        raise ArtifactError(f"{path}: contents do not match the manifest's size and SHA-256 (modified or truncated)")
    env = environment()
    wrong = {k: (manifest.get(k), v) for k, v in env.items() if manifest.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k} {a!r} (here {b!r})" for k, (a, b) in wrong.items())
        raise ArtifactError(f"{path}: built for another environment: {detail}")
    return manifest


def load_compile_artifacts(path: str | os.PathLike, *, key=None, trust: bool = False) -> bool:
    """Load a bundle written by :func:`save_compile_artifacts` (in a fresh process, before compiling), after
    :func:`verify_compile_artifacts` (skipped with ``trust=True``). Returns False when the file does not exist.
    A bundle, manifest or folder that other users can write is refused even with ``trust=True``."""
    p = _bundle_path(path)
    if not p.exists():
        return False
    if not p.is_file():
        raise ArtifactError(f"{p} is not a regular file (a folder, pipe or device); give the bundle's file")
    # the folder holding the link and the one holding the file (one entry when they are the same)
    places = {p: "bundle", _manifest_path(p): "manifest", p.absolute().parent: "bundle folder",
              p.resolve().parent: "bundle folder"}
    for q, what in places.items():
        if q.exists():
            _check_not_writable_by_others(q, what)
            problem = _owner_problem(q, q.stat()) if trust else None  # verified: the signed digest decides
            if problem is not None:
                raise ArtifactError(f"{what}: {problem}; its owner can change it, and trust=True skips the "
                                    "signature: keep bundles you vouch for in a folder of your own")
    _check_ancestors(p.resolve())
    data = p.read_bytes()
    if not trust:
        verify_compile_artifacts(p, key=key, data=data)
    # the bundle's entries go into inductor's cache folder, which the next compile reads as code: it must be
    # this user's and private too (torch's default, $TMPDIR/torchinductor_$USER, is created by whoever comes first)
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    _private_dir(Path(cache_dir()))
    if torch.compiler.load_cache_artifacts(data) is None:  # torch logs the unpickling failure and goes on
        raise ArtifactError(f"{p}: torch could not read the bundle (corrupt, or written by another torch build): "
                            "nothing was loaded; compile afresh and save a new bundle")
    return True
