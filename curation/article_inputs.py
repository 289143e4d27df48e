"""Where `curate extract` reads JATS articles and their image files from, safely.

Articles come loose (`.nxml` with their image files in the same folder) or as PMC OA packages
(`.tar.gz`, one article per package). Each becomes an `ArticleInput`: its XML, read on demand up to
a cap the caller gives, and an `ImageIndex` of the image files beside it. A figure's graphic href has
no extension, so `ImageIndex.resolve` finds the image by file stem, preferring JPEG/PNG over
TIFF/GIF/EPS.

Nothing here follows a symbolic link or opens a FIFO or device: a folder's links and special files
are listed as refused with the reason. A package's compressed stream is read through once so that a
failed checksum refuses the package before any member is used; a member whose path is absolute or
climbs out with '..' is skipped, and a hard link resolves to the member it names. Members are read
through tarfile, never extracted by name.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import lzma
import os
import posixpath
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from medllava.curation.common import READ_CHUNK, Rejected, StepReport, read_capped

# Lower rank wins: JPEG/PNG are what training reads; TIFF/EPS are print masters.
IMAGE_RANK = {".jpg": 0, ".jpeg": 0, ".png": 1, ".webp": 2, ".bmp": 3, ".tif": 4, ".tiff": 4,
              ".gif": 5, ".eps": 6}
PACKAGE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
# Files found in a folder that are never opened, with the skip reason.
REFUSED_KINDS = {"link": "symbolic link not followed", "special": "not a regular file"}
# Magic bytes of the compressions tarfile reads, and the module that checks each one's checksums.
_DECOMPRESSORS = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))


class PackageError(ValueError):
    """An OA package that holds no article, or whose compressed stream is corrupt."""


class ImageIndex:
    """The image files of one folder by stem (exact and case-folded), built once per folder.

    `files` maps a file name (no folder) to the opaque key its reader takes; `refused` maps a name
    that is never read (a symbolic link, a hard link to nothing in the package) to the reason.
    """

    def __init__(self, files: dict[str, object], refused: dict[str, str] | None = None):
        self.files = files
        self.refused = refused or {}
        self._exact: dict[str, list[str]] = {}
        self._folded: dict[str, list[str]] = {}
        for name in [*self.files, *self.refused]:
            stem, ext = posixpath.splitext(name)
            if ext.lower() in IMAGE_RANK:
                self._exact.setdefault(stem, []).append(name)
                self._folded.setdefault(stem.lower(), []).append(name)

    def resolve(self, href: str | None) -> str | None:
        """The file a graphic href points at: same stem, best-ranked image extension, readable first."""
        if not href:
            return None
        base = posixpath.basename(href.replace("\\", "/"))
        stem, ext = posixpath.splitext(base)
        if ext.lower() not in IMAGE_RANK:
            # Hrefs carry no extension, but a stem can contain dots ("pone.0046493.g001").
            stem = base
        matches = self._exact.get(stem) or self._folded.get(stem.lower())
        if not matches:
            return None
        return min(matches, key=lambda n: (n in self.refused, IMAGE_RANK[posixpath.splitext(n)[1].lower()], n))


@dataclass
class ArticleInput:
    """One article to extract: where it is named in reports, its XML, and its image files.

    `read_xml(cap)` reads at most `cap` bytes of the article; `image_prefix` is the path of the image
    files relative to the image root; `origin` names their folder in reports; `read_image(key, cap)`
    reads at most `cap` bytes of one; `order(key)` is its position in the file, the order images are
    copied in.
    """

    name: str
    read_xml: Callable[[int], bytes]
    images: ImageIndex
    image_prefix: str
    origin: str
    read_image: Callable[[object, int], bytes]
    order: Callable[[object], int]


def discover(paths: list[str]) -> Iterator[tuple[str, Path, Path]]:
    """(kind, file, root) for every article file under `paths`; kind is "nxml" or "package", or
    "link" / "special" for a symbolic link / non-regular file found in a folder, which is never opened
    (a file named on the command line is: the user chose it).
    """
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for folder, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    kind = _kind(name)
                    if kind:
                        file = Path(folder) / name
                        yield _refusal(file) or kind, file, path
        elif path.is_file():
            yield _kind(path.name) or "nxml", path, path.parent
        else:
            raise FileNotFoundError(f"--jats input not found: {path}")


def _refusal(file: Path) -> str | None:
    """"link" for a symbolic link, "special" for a FIFO, device or socket (opening one can block), else None."""
    mode = file.lstat().st_mode
    return "link" if stat.S_ISLNK(mode) else None if stat.S_ISREG(mode) else "special"


def _kind(name: str) -> str | None:
    """"nxml" or "package" by file name, else None (not an article file)."""
    lower = name.lower()
    if lower.endswith((".nxml", ".xml")):
        return "nxml"
    if lower.endswith(PACKAGE_SUFFIXES):
        return "package"
    return None


def _read_file(path: Path, cap: int, follow: bool) -> bytes:
    """At most `cap` bytes of a regular file; with follow=False a symbolic link is refused (O_NOFOLLOW)."""
    # O_NONBLOCK: opening a FIFO must not wait for a writer (fstat then refuses it).
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | (0 if follow else getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(os.open(path, flags), "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise Rejected("not a regular file")
        return read_capped(f, cap, st.st_size)


@functools.lru_cache(maxsize=8)
def _folder_index(folder: Path) -> ImageIndex:
    """A folder's files by lstat, symbolic links refused; cached as a flat folder may hold thousands of articles."""
    files: dict[str, object] = {}
    refused: dict[str, str] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_symlink():
                refused[entry.name] = "a symbolic link, not followed"
            elif entry.is_file(follow_symlinks=False):
                files[entry.name] = entry.name
            elif not entry.is_dir(follow_symlinks=False):
                refused[entry.name] = "not a regular file"
    return ImageIndex(files, refused)


def clear_folder_indexes() -> None:
    """Forget the cached folder indexes: files may have changed since an earlier run in this process."""
    _folder_index.cache_clear()


def loose_inputs(path: Path, root: Path, after_last: Callable[[], None]) -> Iterator[ArticleInput]:
    """The loose article at `path` (found under `root`), its images indexed from its folder; calls
    `after_last` once the article has been read, as `package_inputs` does."""
    folder = path.parent
    prefix = folder.relative_to(root).as_posix() if folder != root else ""
    yield ArticleInput(name=str(path), read_xml=lambda cap: _read_file(path, cap, follow=True),
                       images=_folder_index(folder), image_prefix=prefix, origin=f"{folder}{os.sep}",
                       read_image=lambda name, n: _read_file(folder / name, n, follow=False),
                       order=lambda _name: 0)
    after_last()


def _check_stream(path: Path) -> None:
    """Read a compressed package through once so its checksums are verified before any member is used.

    tarfile stops at the archive's end marker and never reaches the gzip trailer, so a corrupt
    stream would otherwise give corrupt images silently.
    """
    with open(path, "rb") as f:
        head = f.read(6)
    opener = next((o for magic, o in _DECOMPRESSORS if head.startswith(magic)), None)
    if opener is None:
        return
    try:
        with opener(path, "rb") as stream:
            while stream.read(READ_CHUNK):
                pass
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as e:
        raise PackageError(f"corrupt compressed stream ({type(e).__name__}: {e})") from None


def _safe_member(name: str) -> bool:
    """A member path that stays inside the package: relative, no '..' step."""
    return not name.startswith("/") and ".." not in name.split("/")


def _package_index(members: list[tarfile.TarInfo], path: Path,
                   report: StepReport) -> tuple[list[tarfile.TarInfo], dict[str, ImageIndex]]:
    """The package's articles and one image index per folder, built in one pass over its members.

    A hard link resolves to the regular member it names (tar stores a repeated file so); a symbolic
    link, or a hard link to nothing in the package, is refused with the reason. A member whose path
    is absolute or climbs with '..' is skipped: its path would point outside the package.
    """
    regular = {m.name: m for m in members if m.isfile()}
    xmls: list[tarfile.TarInfo] = []
    folders: dict[str, tuple[dict, dict]] = {}
    for m in members:
        if m.isdir():
            continue
        if not _safe_member(m.name):
            report.skip("unsafe path in package", f"{path}:{m.name}: absolute or climbs out with '..'")
            continue
        folder, base = posixpath.split(m.name)
        files, refused = folders.setdefault(folder, ({}, {}))
        if m.isfile() and base.lower().endswith((".nxml", ".xml")):
            xmls.append(m)
        elif m.isfile():
            files[base] = m
        elif m.islnk() and m.linkname in regular:
            files[base] = regular[m.linkname]
        elif m.islnk():
            refused[base] = f"a hard link to {m.linkname!r}, which is no file in the package"
        else:
            refused[base] = "a symbolic link, not followed" if m.issym() else "not a regular file"
    if not xmls:
        raise PackageError("no .nxml article in the package")
    return xmls, {folder: ImageIndex(files, refused) for folder, (files, refused) in folders.items()}


def package_inputs(path: Path, report: StepReport, after_last: Callable[[], None]) -> Iterator[ArticleInput]:
    """Articles in one OA package; members are read through tarfile, never extracted by name.

    `after_last` is called once every article has been yielded, while the package is still open: the
    caller reads the images it needs there, in archive order. Unsafe member paths are skips in `report`.
    """
    _check_stream(path)
    with tarfile.open(path, "r:*") as tar:
        xmls, indexes = _package_index(tar.getmembers(), path, report)

        def read(member: tarfile.TarInfo, n: int) -> bytes:
            f = tar.extractfile(member)
            if f is None:
                raise Rejected("not a regular file")
            return read_capped(f, n, member.size)

        for xml in xmls:
            folder = posixpath.dirname(xml.name)
            yield ArticleInput(name=f"{path}:{xml.name}", read_xml=functools.partial(read, xml),
                               images=indexes[folder], image_prefix=folder,
                               origin=f"{path}:{folder}/" if folder else f"{path}:",
                               read_image=read, order=lambda member: member.offset_data)
        # Images only once every article is read, in archive order: reading a member behind the last
        # one read rewinds a gzip stream and inflates it again from the start.
        after_last()


