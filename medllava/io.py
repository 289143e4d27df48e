"""File I/O every package shares: atomic writes, JSON/JSONL reading with located errors,
an append-only JSONL log that survives being killed mid-write, and the one-line messages
for a full disk or a refused write.

Writes go through a temporary file in the same folder and `os.replace`, so a crash never
leaves half a file under the final name. A killed writer does leave its temporary
(`.NAME.XXXXXXXX.tmp`) behind; `remove_stale_temps` clears those before the output is rewritten.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any


READ_BLOCK = 1 << 16
"""Bytes read at a time when scanning a file backwards."""


class DataError(ValueError):
    """Bad input data; the message names the file and the line or record."""


def read_yaml_mapping(path: Path, expected: str = "", error: type[ValueError] = DataError) -> dict:
    """The mapping at the top of the YAML file `path` ({} for an empty file), read safely (no Python
    objects are ever built); anything else raises `error` naming the file, with `expected` saying
    what the mapping should hold."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise error(f"{path}: invalid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: the top level must be a mapping{' with ' + expected if expected else ''}")
    return data


def _make_temp(path: Path, create: Callable[[str], Any]) -> tuple[Any, str]:
    """Create a new temporary beside `path` with `create(name)` (which must fail if the name exists).

    Created with the mode a plain `open` or `mkdir` would use (the umask applies), unlike
    `tempfile.mkstemp`'s 0600, so a finished file has the permissions users expect.
    """
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return create(tmp), tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise _naming(e, path, tmp) from None


def _naming(e: OSError, target: Path, tmp: str) -> OSError:
    """`e` with the target in place of the temporary it was writing (or no file at all), so the
    message names the file the user asked for."""
    name = e.filename
    if name is None or str(name) == tmp:
        e.filename = str(target)
    elif str(name).startswith(tmp + os.sep):  # a file inside a temporary folder (atomic_dir)
        e.filename = str(target / os.path.relpath(name, tmp))
    return e


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside `path`; on clean exit fsync it and rename it to `path`.

    On an exception the temporary file is removed and `path` is left as it was; an OSError
    (a full disk, a refused write) names `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    binary = "b" in mode
    fd, tmp = _make_temp(path, lambda name: os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _naming(e, path, tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on clean exit it replaces `path` whole.

    An interrupted write leaves `path` as it was (or absent), never half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _, tmp = _make_temp(path, lambda name: os.mkdir(name, 0o777))
    try:
        yield Path(tmp)
        replace_dir(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _naming(e, path, tmp)
        raise


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed writers of `path` left beside it (`.NAME.*.tmp`, files
    or folders, including those of files named `NAME.*` such as `NAME.done.json`); returns them.

    A temporary being written looks the same as an abandoned one: call this only where no other
    process is writing `path` at the same time (e.g. a step, before it writes its own outputs).
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    found = sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))
    for tmp in found:
        _remove(tmp)
    return found


def remove_stale_temps_under(folder: str | os.PathLike) -> list[Path]:
    """Remove every temporary (`.*.tmp`) under `folder`, at any depth; returns them. For a folder
    one step owns and fills file by file (e.g. extracted images), with the same caution as
    `remove_stale_temps`."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for root, dirs, files in os.walk(folder):
        for name in [*files, *dirs]:
            if name.startswith(".") and name.endswith(".tmp"):
                found.append(Path(root) / name)
        dirs[:] = [d for d in dirs if not (d.startswith(".") and d.endswith(".tmp"))]
    for tmp in found:
        _remove(tmp)
    return sorted(found)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def replace_dir(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Move folder `src` to `dest`, replacing any folder there, by renames only."""
    src, dest = Path(src), Path(dest)
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(src, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dest)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def save_png(fig, path: str | os.PathLike) -> None:
    """Write a matplotlib Figure to `path` as a PNG, atomically."""
    import warnings

    with atomic_open(path, "wb") as f, warnings.catch_warnings():
        # Labels in scripts the default font lacks (SLAKE's Chinese answers) draw as boxes;
        # the Markdown tables carry the text, so one warning per glyph is only noise.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Atomically write `rows` as JSON lines; returns the number written."""
    n = 0
    with atomic_open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False))
            f.write("\n")
            n += 1
    return n


def read_jsonl(path: str | os.PathLike, skip_bad: bool = False, errors: list | None = None) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, object)` for each non-blank line of a JSONL file.

    A line that is not a JSON object raises `DataError` naming `file:line`, or with
    `skip_bad=True` is skipped and its message appended to `errors` (when given).
    """
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            except ValueError as e:
                msg = f"{path}:{lineno}: not a valid JSON object ({e})"
                if not skip_bad:
                    raise DataError(msg) from None
                if errors is not None:
                    errors.append(msg)
                continue
            yield lineno, obj


def iter_json_array(path: str | os.PathLike, chunk_size: int = 1 << 20) -> Iterator[tuple[int, Any]]:
    """Yield `(index, element)` from a file holding one JSON array, without reading it whole.

    The file is decoded in chunks, so a multi-GB release file (LLaVA-Med's alignment set)
    is never held in memory as text and as objects at once.
    """
    path = Path(path)
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf = f.read(chunk_size)
        pos = _skip_ws(buf, 0)
        if pos >= len(buf) or buf[pos] != "[":
            raise DataError(f"{path}: expected a JSON array")
        pos += 1
        index = 0
        eof = False
        while True:
            buf, pos, eof = _fill(f, buf, pos, eof, chunk_size)
            pos = _skip_ws(buf, pos)
            if pos < len(buf) and buf[pos] == "]":
                return
            if index:
                if pos >= len(buf) or buf[pos] != ",":
                    raise DataError(f"{path}: record {index}: expected ',' or ']' after the previous record")
                pos = _skip_ws(buf, pos + 1)
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    if eof:
                        raise DataError(f"{path}: record {index}: invalid JSON ({e.msg})") from None
                    buf, pos, eof = _fill(f, buf, pos, eof, chunk_size, force=True)
            yield index, obj
            index += 1
            pos = end


def _skip_ws(buf: str, pos: int) -> int:
    while pos < len(buf) and buf[pos] in " \t\r\n":
        pos += 1
    return pos


def _fill(f, buf: str, pos: int, eof: bool, chunk_size: int, force: bool = False):
    """Drop consumed text and read more when little is left (or when `force`)."""
    if eof or (not force and len(buf) - pos > chunk_size // 2):
        return buf, pos, eof
    more = f.read(chunk_size)
    return buf[pos:] + more, 0, not more


def iter_json_or_jsonl(
    path: str | os.PathLike, skip_bad: bool = False, errors: list | None = None
) -> Iterator[tuple[str, Any]]:
    """Yield `(location, element)` from a JSON array file or a JSONL file.

    The location reads `line N` for JSONL and `record N` (0-based) for a JSON array.
    The format is taken from the first non-blank character, not the extension. With `skip_bad`,
    broken JSONL lines are skipped and noted in `errors`; a broken JSON array cannot be read past
    the break, so it always raises.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if not head:
        return
    if head[0] == "[":
        for i, obj in iter_json_array(path):
            yield f"record {i}", obj
    else:
        for lineno, obj in read_jsonl(path, skip_bad=skip_bad, errors=errors):
            yield f"line {lineno}", obj


class JsonlLog:
    """Append-only JSONL results file for resumable runs.

    Each row is written and flushed whole; on reopening, a trailing partial line left by a
    killed process is cut off, so every line in the file is a complete row.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_partial_tail()
        self._f = open(self.path, "a", encoding="utf-8")

    def _truncate_partial_tail(self) -> None:
        """Cut a last line that a killed writer left half-written, reading from the end only as far back
        as its start (the rest of a long log is not read)."""
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            end = f.seek(0, os.SEEK_END)
            if end == 0:
                return
            f.seek(end - 1)
            if f.read(1) == b"\n":
                return
            start = end
            while start > 0:
                size = min(READ_BLOCK, start)
                start -= size
                f.seek(start)
                newline = f.read(size).rfind(b"\n")
                if newline != -1:
                    f.truncate(start + newline + 1)
                    return
            f.truncate(0)

    def rows(self) -> list[dict]:
        """Rows already in the file (complete lines only)."""
        return [obj for _, obj in read_jsonl(self.path)]

    def append(self, row: dict) -> None:
        with self._naming_errors():
            self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        with self._naming_errors():  # closing flushes what a failed append left in the buffer
            self._f.close()

    @contextlib.contextmanager
    def _naming_errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            if e.filename is None:
                e.filename = str(self.path)
            raise

    def __enter__(self) -> "JsonlLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# errno -> (what happened, how the path is joined on, what to do): the CLI's one line for a failed
# write. Permission errors may come from reading an input too, so their advice fits either.
ELSEWHERE = "another --out or run_dir"
DISK_ERRORS = {
    errno.ENOSPC: ("no space left on device", " writing ", f"free some space or write somewhere else ({ELSEWHERE})"),
    errno.EDQUOT: ("disk quota exceeded", " writing ", f"free some space or write somewhere else ({ELSEWHERE})"),
    errno.EACCES: ("permission denied", ": ", f"give this user access to it or use another path ({ELSEWHERE})"),
    errno.EPERM: ("operation not permitted", ": ", f"give this user access to it or use another path ({ELSEWHERE})"),
    errno.EROFS: ("read-only file system", ": ", f"write to a writable disk ({ELSEWHERE})"),
}


def describe_error(e: BaseException) -> str:
    """One line for an error the CLI reports: for a full disk or a refused write, what happened,
    to which path, and what to do; otherwise the error's own message."""
    if not (isinstance(e, OSError) and e.errno in DISK_ERRORS):
        return str(e)
    what, join, todo = DISK_ERRORS[e.errno]
    if e.filename is not None:
        what += f"{join}{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
    return f"{what}: {todo}"
