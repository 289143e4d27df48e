"""What every curation step shares: the end-of-run count report, reading figure records, bounded
reads of untrusted files, clearing the temporaries a killed earlier run left beside a step's outputs, and
loading the user's plug-ins (`module:function`).

A step never dies on one bad record: it counts it under a reason, keeps a few examples, and
prints the tally at the end, so a 15M-record run tells exactly what it dropped and why.
"""

from __future__ import annotations

import functools
import importlib
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from medllava.io import DataError, read_jsonl, remove_stale_temps, remove_stale_temps_under

from medllava.curation.sources import is_llava_med_record, llava_med_to_figure

READ_CHUNK = 2**20  # read size for streams of untrusted files


class StepReport:
    """Counts for one step: items read and written, and skipped items per reason (with examples)."""

    def __init__(self, step: str, unit: str = "records", examples: int = 5, log_skips: bool = False):
        self.step = step
        self.unit = unit
        self.read = 0
        self.written = 0
        self.notes: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self._max_examples = examples
        # Every skip with its detail, for steps that write the full list beside their output.
        self.skip_log: list[dict] | None = [] if log_skips else None

    def skip(self, reason: str, example: str | None = None) -> None:
        if example is not None:  # one line, however the error that made it was worded (tarfile's spans five)
            example = " ".join(line.strip() for line in example.splitlines() if line.strip())
        self.skipped[reason] += 1
        if self.skip_log is not None:
            self.skip_log.append({"reason": reason, "detail": example})
        if example is not None:
            shown = self.examples.setdefault(reason, [])
            if len(shown) < self._max_examples:
                shown.append(example)

    def merge(self, other: "StepReport") -> None:
        """Add the counts of a report made elsewhere (e.g. in a worker process)."""
        self.read += other.read
        self.written += other.written
        self.notes.update(other.notes)
        self.skipped.update(other.skipped)
        for reason, shown in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine += shown[:self._max_examples - len(mine)]
        if self.skip_log is not None and other.skip_log:
            self.skip_log += other.skip_log

    def note(self, what: str, n: int = 1) -> None:
        """Count something worth reporting that is not a skip (e.g. figures without an image file)."""
        self.notes[what] += n

    def summary(self) -> str:
        lines = [f"{self.step}: {self.read} {self.unit} read, {self.written} written, "
                 f"{sum(self.skipped.values())} skipped"]
        for reason, n in self.skipped.most_common():
            lines.append(f"  skipped {n}: {reason}")
            lines += [f"    e.g. {ex}" for ex in self.examples.get(reason, [])]
        for what, n in sorted(self.notes.items()):
            lines.append(f"  {what}: {n}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"step": self.step, "read": self.read, "written": self.written,
                "skipped": dict(self.skipped), "notes": dict(self.notes)}


def iter_figure_records(path: str | os.PathLike, report: StepReport) -> Iterator[dict]:
    """Figure records from a JSONL file; LLaVA-Med per-figure records are converted on the fly.

    Broken lines and records without an id are skipped and counted in `report`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    errors: list[str] = []
    for lineno, obj in read_jsonl(path, skip_bad=True, errors=errors):
        while errors:
            report.read += 1
            report.skip("not a JSON object", errors.pop())
        report.read += 1
        if is_llava_med_record(obj):
            try:
                obj = llava_med_to_figure(obj)
            except (DataError, TypeError, ValueError) as e:
                report.skip("bad LLaVA-Med record", f"{path}:{lineno}: {e}")
                continue
        if not obj.get("id"):
            report.skip("record without an id", f"{path}:{lineno}")
            continue
        yield obj
    for msg in errors:
        report.read += 1
        report.skip("not a JSON object", msg)


def clear_stale_temps(outputs: Iterable[str | os.PathLike], folders: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Remove the temporaries a killed run left beside `outputs` and anywhere under `folders`;
    returns them and prints one line when there were any.

    An output's pattern also covers its side files (NAME.skipped.jsonl, NAME.removed.jsonl,
    NAME.done.json). Call it only as the sole writer of those paths: a step about to write them.
    """
    found = [tmp for out in outputs for tmp in remove_stale_temps(out)]
    found += [tmp for folder in folders for tmp in remove_stale_temps_under(folder)]
    if found:
        print(f"removed {len(found)} temporary files left by an interrupted run (e.g. {found[0]})")
    return found


def dumps(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False)


class Rejected(ValueError):
    """One file or package member refused (over a size cap, not an image); the message says why."""


class TooLarge(Rejected):
    """Over a size cap; the message names the cap."""


def read_capped(f, cap: int, size: int | None = None) -> bytes:
    """At most `cap` bytes from `f`, read in chunks; TooLarge (naming the cap) if there are more."""
    if size is not None and size > cap:
        raise TooLarge(f"{size} bytes, over the {mib(cap)} limit")
    buf = bytearray()
    while chunk := f.read(min(READ_CHUNK, cap + 1 - len(buf))):
        buf += chunk
        if len(buf) > cap:
            raise TooLarge(f"over the {mib(cap)} limit")
    return bytes(buf)


def mib(n: int) -> str:
    """A byte count in MiB, for messages ("64 MiB")."""
    return f"{n / 2**20:g} MiB"


def check_image(data: bytes) -> None:
    """Rejected unless Pillow reads `data` as an image with intact headers (PNG: chunk checksums too).

    No pixels are decoded, so this is cheap; a decompression bomb is refused by Pillow's pixel limit.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Image.UnidentifiedImageError:
        raise Rejected("not an image file Pillow recognises") from None
    except Exception as e:  # noqa: BLE001 - hostile bytes raise many kinds inside Pillow
        raise Rejected(f"not a decodable image ({type(e).__name__}: {e})") from None


@functools.lru_cache(maxsize=8)
def load_callable(spec: str, option: str) -> Callable:
    """The user's plug-in named `module:function`; ValueError naming `option` if it cannot be loaded."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{option} must look like module:function, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{option} {spec}: cannot load it ({e})") from None
    if not callable(fn):
        raise ValueError(f"{option} {spec}: {attr} is not callable")
    return fn
