"""Load pickles that hold only plain data, without running code from the file.

`pickle.load` calls whatever callable the file names, so loading a downloaded pickle can
run arbitrary code. The original PathVQA release ships its questions as pickled lists of
dicts of strings and numbers; `load_plain_pickle` reads exactly that kind of content and
refuses any file that asks for another global (os.system, builtins.eval, a class...),
before anything from it is called.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

from medllava.io import DataError

# Plain data types only. Callables such as eval, exec, getattr or __import__ stay out:
# those are exactly what a malicious pickle asks for. bytes and bytearray stay out too:
# pickles build them with their own opcodes, and called by name they would let a file
# allocate any size it asks for.
_ALLOWED = frozenset({"dict", "list", "tuple", "set", "frozenset", "str", "int", "float", "complex", "bool"})
# Python 2 pickles name the builtins module `__builtin__`.
_BUILTIN_MODULES = ("builtins", "__builtin__")


class _PlainUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        # Python 2 pickles store text as byte strings; UTF-8 decodes the releases' text.
        super().__init__(file, encoding="utf-8")
        self._path = path

    def find_class(self, module: str, name: str):
        if module in _BUILTIN_MODULES and name in _ALLOWED:
            return getattr(__import__("builtins"), name)
        raise DataError(
            f"{self._path}: refusing to load pickle: it references {module}.{name}, and only plain data "
            f"({', '.join(sorted(_ALLOWED))}) is allowed; convert the file to JSON if it is trusted"
        )

    def persistent_load(self, pid):
        raise DataError(f"{self._path}: refusing to load pickle: it uses persistent ids")


def loads_plain(data: bytes, path: Path | str = "<bytes>"):
    """Unpickle `data`, allowing only plain builtin data types."""
    try:
        return _PlainUnpickler(io.BytesIO(data), Path(path)).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, UnicodeDecodeError, IndexError) as e:
        raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


def load_plain_pickle(path: str | Path):
    """Read a pickle file holding only plain data (lists, dicts, strings, numbers)."""
    path = Path(path)
    return loads_plain(path.read_bytes(), path)
