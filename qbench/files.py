"""File helpers shared by every stage: content hashes, atomic JSON writes, staged ONNX writes."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from .errors import QbenchError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically: a unique temporary name in the same folder, then rename, so no half-written file
    looks complete and two writers never share a temporary file."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(obj, path: str | os.PathLike) -> Path:
    """Write JSON atomically (see atomic_write_text)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str | os.PathLike, default=None):
    """The JSON in `path`, or `default` when it is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def stage_onnx(model, out: Path) -> Path:
    """Save an ONNX model under a temporary name next to `out` (same folder, normal file permissions) and return
    that name: the caller renames it into place (os.replace) once everything else succeeded, so a model file at
    `out` always means a finished step."""
    import tempfile

    import onnx

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the model the permissions of a normal file
        onnx.save(model, tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def command_line(argv: list[str] | None = None) -> str:
    """The `qbench ...` command line of this process (or of `argv`), shell-quoted so it can be pasted back."""
    import shlex
    import sys

    argv = sys.argv if argv is None else argv
    return shlex.join(["qbench", *argv[1:]])


def check_writable(folder: str | os.PathLike, what: str = "output") -> Path:
    """Fail before any work when files cannot be written into `folder` (created if missing): a probe file is
    written and removed there. Returns the folder."""
    import tempfile

    folder = Path(folder)
    existing = next((q for q in [folder, *folder.parents] if q.exists()), None)
    if existing is not None and not existing.is_dir():
        raise QbenchError(f"{what} cannot be written into '{folder}': '{existing}' is a file, not a folder; pass "
                          "another path.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".qbench-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise QbenchError(f"{what} cannot be written into '{folder}' ({e.strerror or e}); pass a path in a folder "
                          "you can write to.") from e
    return folder


SCRATCH = re.compile(r"^qbench-[a-z0-9]+-(\d+)-")


def scratch(kind: str):
    """A temporary folder for one step (`qbench-KIND-PID-...` in the system temp dir), removed when the step ends;
    the PID lets `sweep_scratch` remove what a killed process (SIGKILL, power loss) left behind."""
    import tempfile

    return tempfile.TemporaryDirectory(prefix=f"qbench-{kind}-{os.getpid()}-")


def sweep_scratch() -> int:
    """Remove the scratch folders of qbench processes that no longer run; returns how many."""
    import shutil
    import tempfile

    removed = 0
    root = Path(tempfile.gettempdir())
    try:
        entries = list(root.iterdir())
    except OSError:
        return 0
    for d in entries:
        m = SCRATCH.match(d.name)
        if not m or not d.is_dir():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # still running (or not ours to signal)
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError, ValueError):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed += 1
    return removed


class exclusive:
    """Context manager: hold an exclusive lock on `folder` (a `.qbench.lock` file in it) for the work done inside;
    another qbench process asking for the same folder is refused at once instead of mixing its files in."""

    def __init__(self, folder: str | os.PathLike, what: str = "run"):
        self.path, self.what, self.fd = Path(folder) / ".qbench.lock", what, None

    def __enter__(self):
        import fcntl

        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise QbenchError(f"another qbench process is working in '{self.path.parent}' ({self.what}); wait for "
                              "it to finish or choose another --out.") from None
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        return False


def read_yaml(path: Path, what: str = ""):
    """Parse a YAML file; a syntax or read error becomes one QbenchError naming the file (and line)."""
    import yaml

    label = f"{what} {path}".strip()
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise QbenchError(f"{label}{where} is not valid YAML ({getattr(e, 'problem', e)}); fix the syntax.") from e
    except (OSError, UnicodeDecodeError) as e:
        raise QbenchError(f"cannot read {label} ({e}); check that it is a readable UTF-8 text file.") from e


def display_path(path: str | os.PathLike) -> str:
    """A path as a person would type it here: relative to the current folder when inside it or beside it
    (e.g. ../shared/datasets/x), '~/...' under the home folder, else absolute."""
    p = Path(path).expanduser().resolve()
    rel = os.path.relpath(p, Path.cwd())
    if not rel.startswith(os.path.join("..", "..")):
        return Path(rel).as_posix()
    try:
        return "~/" + p.relative_to(Path.home()).as_posix()
    except ValueError:
        return p.as_posix()
