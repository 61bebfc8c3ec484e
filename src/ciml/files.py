"""Writing files so that a crash or kill never leaves a half-written output behind.

Everything ciml writes goes to a temporary name in the destination's folder and is renamed over the
destination only once complete (a rename within one file system is atomic).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ciml.errors import ParameterError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` when the block succeeds.

    Args:
        path: the destination.
        suffix: the temporary file's ending (default: the destination's, e.g. ``.nii.gz``, so writers
            that choose a format by extension work).

    Example:
        >>> with atomic_path(out / "labels.nii.gz") as temporary:  # doctest: +SKIP
        ...     nib.save(image, temporary)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """JSON with 2-space indent; NaN is written as null (JSON has no NaN)."""
    return write_text_atomic(path, json.dumps(_nan_to_none(data), indent=2, default=_plain) + "\n")


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value


def refuse_existing(paths: Iterable[str | Path], overwrite: bool = False) -> None:
    """Refuse to replace an existing file or non-empty folder unless ``overwrite``.

    Call it before any work, so that a refused run writes nothing at all.
    """
    if overwrite:
        return
    taken = [
        p for p in map(Path, paths) if (p.is_dir() and any(p.iterdir())) or (p.exists() and not p.is_dir())
    ]
    if taken:
        shown = ", ".join(map(str, taken[:5])) + (f" and {len(taken) - 5} more" if len(taken) > 5 else "")
        what = "is not empty" if taken[0].is_dir() else "already exists"
        raise ParameterError("overwrite", f"{shown}: {what} (set overwrite to replace it)")
