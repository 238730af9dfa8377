"""Result files: atomic writes (a reader never sees a half-written file) and JSON helpers.

Every atomic write of the package goes through `atomic_path` (a file) or `atomic_dir` (a folder):
write into a temporary sibling, then move it into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch

PathLike = Union[str, Path]


def check_fields(cls: type, d: dict) -> None:
    """Raise a ValueError naming any key of `d` that is not a field of the dataclass `cls`: a config
    read back from JSON with a typo or from a newer version fails loudly, not silently."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"Unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}.")


def check_out_dir(out: PathLike, marker: Optional[str] = None, overwrite: bool = False) -> None:
    """Fail before any work if directory `out` cannot take a result: it is a file, it already holds
    `marker` (a finished result) and not `overwrite`, or it is not writable. Creates it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: pass a directory path.")
    if marker is not None and (out / marker).exists() and not overwrite:
        raise ValueError(f"--out {out} already holds a result ({marker}); pass --overwrite to "
                         "replace it, or another --out.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / _PROBE
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"--out {out} is not writable ({exc.strerror}): pick another path."
                         ) from exc


def check_out_file(out: PathLike) -> None:
    """Fail before any work if a result file cannot be written at `out` (a directory, a parent
    that is a file, or not writable); an existing file is replaced."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory: pass a file path (e.g. {out / 'eval.json'}).")
    if out.parent.exists() and not out.parent.is_dir():
        raise ValueError(f"--out {out}: {out.parent} is a file, not a folder; pick another path.")
    check_out_dir(out.parent)


@contextlib.contextmanager
def atomic_path(path: PathLike, *, record: bool = True) -> Iterator[Path]:
    """A temporary sibling of `path` (`.{name}.{random}.partial`) for the block to write; moved
    onto `path` when the block ends without an error (`atomic_replace`, or with `record=False` only
    the mode and the move, for the manifest itself), removed otherwise. An OSError without a file
    name (disk full) raised in the block names `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    try:
        with _naming(path):
            yield Path(tmp)
        if record:
            atomic_replace(tmp, path)
        else:
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """A temporary sibling folder of `path` for the block to fill; it replaces `path` (an old
    folder there is removed first) when the block ends without an error, and is removed otherwise:
    a reader sees no folder or a whole one, never a half-filled one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # as a plain mkdir would (`mkdtemp` makes 0700)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(text: str, path: PathLike) -> None:
    """Write `text` to `path` atomically (`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


class _naming:
    """Inside: an OSError without a file name (a failed write: disk full, file too large) gets
    `path`'s, so the one-line error names the file that could not be written."""

    def __init__(self, path: PathLike):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, tp, exc, tb):
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(self.path)) from exc
        return False


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def atomic_replace(tmp: PathLike, path: PathLike) -> None:
    """Finish an atomic write: give the temporary file `tmp` the mode a plain `open` would (0666
    less the user's umask; `mkstemp` makes 0600), move it onto `path`, and record it in the
    manifest of the run directory being written, if `path` is inside one (`RunDirectory`)."""
    rd = active_run_dir(path)
    os.chmod(tmp, 0o666 & ~_umask())
    if rd is not None:
        rd.check_writable(path)
        # Listed before the move: a kill between the two leaves a listed file whose checksum does
        # not match (recomputed on resume), never an unlisted file of ours (refused as foreign).
        rd.record(path, source=tmp)
    os.replace(tmp, path)


def to_jsonable(obj: Any) -> Any:
    """Tensors, arrays, numpy scalars, paths and dataclass-like objects -> plain JSON values.

    NaN and inf become None (JSON has no NaN), so an undefined value is explicit, never a number.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return None if (math.isnan(f) or math.isinf(f)) else f
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return to_jsonable(obj.to_dict())
    return obj


def atomic_write_json(obj: Any, path: PathLike) -> None:
    atomic_write_text(json.dumps(to_jsonable(obj), indent=2) + "\n", path)


def read_json(path: PathLike, *, expect: Optional[type] = None) -> Any:
    """A JSON file's value; a missing, unreadable, malformed (too deeply nested included) file, or
    one whose top level is not of type `expect`, is a one-line error naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a JSON file.")
    try:
        value = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); delete it and re-run.") from exc
    except RecursionError as exc:
        raise ValueError(f"{path} is nested too deeply to be a file cast_interp wrote; delete it "
                         "and re-run.") from exc
    if expect is not None and not isinstance(value, expect):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not the "
                         f"{'object' if expect is dict else expect.__name__} cast_interp writes "
                         "there; delete it and re-run.")
    return value


def json_field(doc: dict, name: str, kind: Any, path: PathLike, *, where: str = "") -> Any:
    """`doc[name]`, checked to be of type `kind` (a type or tuple; bools are not numbers, floats
    must be finite): a ValueError naming the file and the field otherwise."""
    v = doc.get(name, _MISSING) if isinstance(doc, dict) else _MISSING
    field_name = f"{where}{name}"
    if v is _MISSING:
        raise ValueError(f"{path}: field {field_name!r} is missing; the file was not written by "
                         "this version of cast_interp or was edited.")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    numeric = any(k in (int, float) for k in kinds)
    ok = isinstance(v, kinds) and not (numeric and isinstance(v, bool) and bool not in kinds)
    if ok and isinstance(v, float) and not math.isfinite(v):
        ok = False
    if not ok:
        want = " or ".join("null" if k is type(None) else
                           {"dict": "an object", "list": "a list", "str": "a string",
                            "float": "a finite number", "int": "an integer"}.get(k.__name__,
                                                                                 k.__name__)
                           for k in kinds)
        raise ValueError(f"{path}: field {field_name!r} must be {want}, got {v!r:.60}.")
    return v


_MISSING = object()


def atomic_save_safetensors(tensors: dict, path: PathLike, metadata: dict | None = None) -> None:
    """safetensors file written atomically; `metadata` values are JSON-encoded strings."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={k: json.dumps(to_jsonable(v)) for k, v in (metadata or {}).items()})


def remove_partials(directory: PathLike, *, older_than_s: float = 0.0) -> list[Path]:
    """Delete the leftovers of interrupted atomic writes (`*.partial*` files and folders) under
    `directory`, those last modified more than `older_than_s` seconds ago (a writer in another
    process may still own a fresh one). Returns what was removed."""
    import time

    d = Path(directory)
    if not d.is_dir():
        return []
    now, removed = time.time(), []
    for p in sorted(d.rglob("*.partial*"), reverse=True):
        try:
            if now - p.lstat().st_mtime < older_than_s:
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
        except FileNotFoundError:  # already gone (inside a removed folder)
            continue
    return removed


def sha256_file(path: PathLike, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Run directories: a manifest of the files the toolkit wrote, a lock, symlinks refused
# --------------------------------------------------------------------------------------------------

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "cast-interp-manifest"
LOCK_FILE = ".cast-interp.lock"
_MANIFEST_LOCK = ".cast-interp.manifest.lock"
_PROBE = ".cast-interp.write-test"
# Our own bookkeeping: not content a user put there (a folder holding only these is empty).
BOOKKEEPING = (LOCK_FILE, _MANIFEST_LOCK, _PROBE)
# The leftovers of our atomic writes: `.{name}.{random}.partial`, `name` a file we write.
_OWN_PARTIAL = re.compile(r"^\.(.+\.(?:json|jsonl|md|safetensors|png|pdf|svg))\.[A-Za-z0-9_]+"
                          r"\.partial$")


class RunDirError(ValueError):
    """A run directory cannot be used as it is: not a run directory, in use, holding a symlink,
    or a file that is not what the run wrote. The message names the file and the fix."""


_ACTIVE: list["RunDirectory"] = []


class RunDirectory:
    """The files the toolkit wrote into `root`, each with its sha256 and size, in
    `root/manifest.json` (`{"format", "kind", "files": {relative path: {"sha256", "size"}}}`).

    While active (`with RunDirectory(root, kind):`), every atomic write under `root` (`io`'s
    writers, `figures.save_figure`) is recorded, and a write onto an existing file the manifest
    does not list (one the user put there) is refused. Readers of re-used files ask `changed(path)`
    before trusting one. Several processes (torchrun ranks) may record at once: updates are made
    under an advisory lock.
    """

    def __init__(self, root: PathLike, kind: str = "run"):
        self.root, self.kind = Path(root), kind

    def __enter__(self) -> "RunDirectory":
        _ACTIVE.insert(0, self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_FILE

    def contains(self, path: PathLike) -> bool:
        root, p = os.path.abspath(self.root), os.path.abspath(path)
        return p != root and os.path.commonpath([root, p]) == root

    def rel(self, path: PathLike) -> str:
        return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(self.root))).as_posix()

    def read(self) -> Optional[dict]:
        """The manifest ({"kind", "files"}), None if there is none; a malformed one is an error."""
        if not self.manifest_path.exists():
            return None
        doc = read_json(self.manifest_path, expect=dict)
        if doc.get("format") != MANIFEST_FORMAT:
            raise RunDirError(f"{self.manifest_path} is not a cast-interp manifest (field 'format' "
                              f"is {doc.get('format')!r}); this folder is not a run directory.")
        json_field(doc, "kind", str, self.manifest_path)
        files = json_field(doc, "files", dict, self.manifest_path)
        for rel, entry in files.items():
            json_field(entry, "sha256", str, self.manifest_path, where=f"files.{rel}.")
            json_field(entry, "size", int, self.manifest_path, where=f"files.{rel}.")
        return doc

    def files(self) -> dict:
        doc = self.read()
        return {} if doc is None else doc["files"]

    def _flock(self):
        import contextlib
        import fcntl

        @contextlib.contextmanager
        def held():
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.root / _MANIFEST_LOCK, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
        return held()

    def _write(self, files: dict) -> None:
        text = json.dumps({"format": MANIFEST_FORMAT, "kind": self.kind,
                           "files": dict(sorted(files.items()))}, indent=1) + "\n"
        # Not recorded: the manifest does not list itself.
        with atomic_path(self.manifest_path, record=False) as tmp, \
                open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    def start(self) -> None:
        """Write an empty manifest if there is none (a new run directory)."""
        with self._flock():
            if not self.manifest_path.exists():
                self._write({})

    def record(self, path: PathLike, *, source: Optional[PathLike] = None) -> None:
        """Add (or update) `path`'s checksum and size (of the bytes in `source`, the file about
        to be moved there, if given)."""
        src = path if source is None else source
        entry = {"sha256": sha256_file(src), "size": os.path.getsize(src)}
        with self._flock():
            files = self.files()
            files[self.rel(path)] = entry
            self._write(files)

    def check_writable(self, path: PathLike) -> None:
        """Refuse to replace a file at `path` that this run directory did not write."""
        p = Path(path)
        for q in [p, *p.parents]:
            if not self.contains(q):
                break
            if q.is_symlink():
                raise RunDirError(f"{q} is a symbolic link: a run directory holds no links (a "
                                  "write would go to its target). Replace it with a real folder.")
        if p.exists() and self.rel(p) not in self.files():
            raise RunDirError(f"{p} exists but was not written by this run (it is not in "
                              f"{self.manifest_path}): nothing replaced. Move it away, or use "
                              "another output folder.")

    def changed(self, path: PathLike) -> Optional[str]:
        """None if `path` holds exactly what the run wrote; else why not (for a message)."""
        entry = self.files().get(self.rel(path))
        p = Path(path)
        if entry is None:
            return f"is not in {MANIFEST_FILE} (not written by this run)"
        if p.is_symlink() or not p.is_file():
            return "is missing or not a plain file"
        size = os.path.getsize(p)
        if size != entry["size"]:
            return f"was changed since the run wrote it ({entry['size']} bytes -> {size})"
        if sha256_file(p) != entry["sha256"]:
            return "was changed since the run wrote it (same size, other sha256)"
        return None

    def verify(self, path: PathLike) -> None:
        """RunDirError naming `path` unless it holds what the run wrote."""
        why = self.changed(path)
        if why is not None:
            raise RunDirError(f"{path} {why}: a run directory's files are checked against "
                              f"{MANIFEST_FILE}. Restore the file, or start a new output folder.")

    def remove_written(self) -> list[Path]:
        """Delete every file the manifest lists (and the folders that held only them), then the
        manifest. A listed file that was changed since is left in place: an error names it, and
        nothing is deleted."""
        files = self.files()
        changed = [(rel, why) for rel in files
                   if (self.root / rel).exists() and (why := self.changed(self.root / rel))]
        if changed:
            rel, why = changed[0]
            raise RunDirError(f"{self.root / rel} {why}; --overwrite deletes only files exactly as "
                              f"the run wrote them ({len(changed)} changed): move it away first. "
                              "Nothing was deleted.")
        removed = []
        for rel in sorted(files, reverse=True):
            p = self.root / rel
            if p.is_file() and not p.is_symlink():
                p.unlink()
                removed.append(p)
        for d in sorted({(self.root / rel).parent for rel in files}, key=lambda q: -len(q.parts)):
            while self.contains(d) and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
                d = d.parent
        if self.manifest_path.exists():
            self.manifest_path.unlink()
        return removed


def active_run_dir(path: PathLike) -> Optional[RunDirectory]:
    """The active `RunDirectory` that holds `path`, if any."""
    return next((rd for rd in _ACTIVE if rd.contains(path)), None)


def changed_since_written(path: PathLike) -> Optional[str]:
    """For a file about to be re-used: None if no active run directory holds it or it holds what
    the run wrote; else a message naming the file and why (the caller recomputes it)."""
    rd = active_run_dir(path)
    why = None if rd is None else rd.changed(path)
    return None if why is None else f"{path} {why}"


def find_symlinks(root: PathLike) -> list[Path]:
    """Symbolic links under `root` (not followed)."""
    found = []
    for d, dirs, files in os.walk(root, followlinks=False):
        found += [Path(d) / n for n in dirs + files if os.path.islink(os.path.join(d, n))]
    return found


def check_no_symlinks(root: PathLike) -> None:
    links = find_symlinks(root)
    if links:
        raise RunDirError(f"{links[0]} is a symbolic link ({len(links)} under {root}): a run "
                          "directory holds no links, since a write would go to the link's target. "
                          "Replace it with a real folder or file.")


def user_entries(root: PathLike) -> list[str]:
    """Names in folder `root` other than the toolkit's bookkeeping files."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(n for n in os.listdir(root) if n not in BOOKKEEPING)


def check_run_dir(root: PathLike, kind: str, *, flag: str = "--out") -> Optional[dict]:
    """Before any work: `root` is a folder that is empty (or absent), or a run directory of this
    `kind` (its manifest is returned). A non-empty folder of the user's, a run directory of another
    kind, an older run without a manifest, or one holding symbolic links is a `RunDirError`."""
    root = Path(root)
    if root.is_symlink():
        raise RunDirError(f"{flag} {root} is a symbolic link: pass the real folder.")
    if root.exists() and not root.is_dir():
        raise ValueError(f"{flag} {root} is a file: pass a directory path.")
    doc = RunDirectory(root, kind).read()
    if doc is None:
        names = user_entries(root)
        if names:
            older = " (a run from an older cast_interp, without manifest.json)" if (
                "config.json" in names and "arms" in names) else ""
            raise RunDirError(
                f"{flag} {root} is not empty ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
                f") and is not a cast-interp output folder{older}: results go to an empty or new "
                "folder, so nothing of yours is replaced or deleted. Pass another path.")
        return None
    if doc["kind"] != kind:
        raise RunDirError(f"{flag} {root} holds the output of `cast-interp {doc['kind']}`, not of "
                          f"`{kind}`: pass another folder.")
    check_no_symlinks(root)
    return doc


def remove_own_partials(root: PathLike) -> list[Path]:
    """Delete the leftovers of this toolkit's interrupted atomic writes under `root`
    (`.{name}.{random}.partial`, `name` a .json/.jsonl/.md/.safetensors or figure file), not
    following links; other files named "partial" are the user's and stay."""
    removed = []
    for d, _, files in os.walk(root, followlinks=False):
        for n in files:
            p = Path(d) / n
            if _OWN_PARTIAL.match(n) and p.is_file() and not p.is_symlink():
                p.unlink()
                removed.append(p)
    return removed


def _zombie(pid: int) -> bool:
    """Whether process `pid` has exited and waits to be reaped (Linux; False where unknown)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] in "ZX"
    except (OSError, ValueError, IndexError):
        return False


class RunLock:
    """One writer per output folder: `root/.cast-interp.lock` holds the writer's host and pid,
    created exclusively. A lock whose process is gone (same host) is stale and taken over."""

    _held: set[str] = set()

    def __init__(self, root: PathLike):
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self.mine = False

    def acquire(self) -> None:
        import socket
        import time

        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                if self._stale(me):
                    try:
                        os.remove(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                raise RunDirError(self._busy_message())
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.mine = True
            RunLock._held.add(os.path.abspath(self.path))
            return
        raise RunDirError(self._busy_message())

    def _holder(self) -> dict:
        try:
            d = json.loads(self.path.read_text())
            return d if isinstance(d, dict) else {}
        except (OSError, ValueError, RecursionError):
            return {}

    def _stale(self, me: dict) -> bool:
        h = self._holder()
        pid = h.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or h.get("host") != me["host"]:
            # Unreadable (a writer between create and write) or another machine: not ours to judge,
            # unless it is old and unreadable.
            import time

            try:
                return not h and time.time() - self.path.stat().st_mtime > 60
            except FileNotFoundError:
                return True
        if pid == me["pid"]:
            return os.path.abspath(self.path) not in RunLock._held
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return _zombie(pid)  # killed but not reaped (e.g. an orphan in a container): gone

    def _busy_message(self) -> str:
        h = self._holder()
        who = f"pid {h.get('pid')} on {h.get('host')}" if h else "another process"
        return (f"{self.root} is in use by another cast-interp ({who}; {self.path}): one run at a "
                "time per folder. Wait for it to finish, or use another output folder; if no such "
                f"process runs, delete {self.path}.")

    def release(self) -> None:
        if self.mine:
            RunLock._held.discard(os.path.abspath(self.path))
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            self.mine = False


def package_versions() -> dict:
    """The versions a result depends on: Python, torch, TransformerLens, transformers and
    cast_interp (None where a package is not installed as a distribution)."""
    import platform
    from importlib.metadata import version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformer-lens", "transformers", "cast_interp"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # not installed as a distribution
            out[pkg] = None
    return out
