"""Checkpoint files that can be trusted: written atomically, checksummed, verified on load.

**Format.** A checkpoint is what ``torch.save`` writes (a zip archive) with one addition: the
archive's comment, the last field of a zip file, reads ``trustregion-sha256:<64 hex digits>``,
the SHA-256 of every byte before the comment's two-byte length field. The file stays a valid zip
and a valid ``torch.load`` input, and the checksum travels with the file: a copy made with ``cp``
or ``scp`` is still verifiable, and writing one file is one atomic rename (a checksum file beside
the checkpoint could be left out of date by a crash between two renames).

**Writing** (:func:`write_checkpoint`): serialise to a temporary file in the target directory,
add the checksum, flush and ``fsync``, then ``os.replace`` it over the target and ``fsync`` the
directory. A crash or a full disk part-way leaves the previous file untouched.

**Reading** (:func:`read_checkpoint`, :class:`ChecksummedCheckpointIO`): a recorded checksum is
verified before unpickling. An empty, truncated or altered file, or one that cannot be
unpickled, raises :class:`CorruptCheckpointError` naming the file, what is wrong and the
checkpoints in the same directory that do verify (newest first). A file without a checksum
(written by plain Lightning or ``torch.save``) still loads, with a warning that it could not be
verified.

Example:
    >>> write_checkpoint({"step": 3}, "/tmp/example.ckpt")  # doctest: +SKIP
    >>> read_checkpoint("/tmp/example.ckpt")["step"]  # doctest: +SKIP
    3
"""

from __future__ import annotations

import hashlib
import os
import pickle
import secrets
import shutil
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = [
    "GUARD_FIRING_SUFFIX",
    "ChecksummedCheckpointIO",
    "CorruptCheckpointError",
    "copy_checkpoint",
    "read_checkpoint",
    "recorded_digest",
    "verified_checkpoints",
    "verify_checkpoint",
    "with_checksummed_io",
    "write_checkpoint",
]

GUARD_FIRING_SUFFIX = "-guard_firing"
"""Ends the name of a checkpoint written while a collapse guard was firing (``….ckpt`` after
it); such files are never suggested as a replacement for a corrupt one."""

_MAGIC = b"trustregion-sha256:"
_COMMENT_LENGTH = len(_MAGIC) + 64
_END_RECORD = b"PK\x05\x06"  # zip "end of central directory" record, 22 bytes + comment
_END_RECORD_SIZE = 22
_TRAILER_SIZE = _END_RECORD_SIZE + _COMMENT_LENGTH
_CHUNK = 1 << 20


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be trusted or read.

    Attributes:
        path: the file.
        problem: what is wrong with it.
        alternatives: checkpoints in the same directory that verify, newest first.
    """

    def __init__(self, path: Path, problem: str, alternatives: list[Path]) -> None:
        self.path = path
        self.problem = problem
        self.alternatives = alternatives
        if alternatives:
            advice = ("use one of these checkpoints from the same directory instead (they "
                      "verify; newest first): " + ", ".join(str(p) for p in alternatives))
        else:
            advice = "no other checkpoint in its directory verifies; start again without it"
        super().__init__(f"checkpoint {path} is unusable: {problem}; {advice}")


def recorded_digest(path: str | Path) -> str | None:
    """The SHA-256 (hex) recorded in the checkpoint at ``path``, or None when it has none.

    Raises :class:`CorruptCheckpointError` when the file is empty or its checksum record is
    damaged."""
    path = Path(path)
    digest, problem = _recorded(path)
    if problem is not None:
        raise _corrupt(path, problem)
    return digest


def verify_checkpoint(path: str | Path) -> bool:
    """True when the checkpoint at ``path`` matches its recorded checksum; False when it has
    none to check. Raises :class:`CorruptCheckpointError` on a mismatch or an empty file, and
    ``FileNotFoundError`` when there is no such file."""
    path = Path(path)
    verified, problem = _verified(path)
    if problem is not None:
        raise _corrupt(path, problem)
    return verified


def _recorded(path: Path) -> tuple[str | None, str | None]:
    """(the recorded SHA-256 or None, what is wrong with the file's record or None)."""
    size = path.stat().st_size
    if size == 0:
        return None, "the file is empty (0 bytes; its write never happened)"
    with path.open("rb") as file:
        file.seek(max(size - _TRAILER_SIZE - 64, 0))
        tail = file.read()
    trailer = tail[-_TRAILER_SIZE:]
    if (len(trailer) == _TRAILER_SIZE and trailer.startswith(_END_RECORD)
            and int.from_bytes(trailer[20:22], "little") == _COMMENT_LENGTH
            and trailer[22:].startswith(_MAGIC)):
        digest = trailer[22 + len(_MAGIC):].decode("ascii", errors="replace")
        if all(c in "0123456789abcdef" for c in digest):
            return digest, None
    if _MAGIC in tail:
        return None, "its checksum record is damaged"
    return None, None


def _verified(path: Path) -> tuple[bool, str | None]:
    """(whether the file matches a recorded checksum, what is wrong with it or None); never
    raises for a damaged file, so that looking for alternatives cannot recurse."""
    expected, problem = _recorded(path)
    if expected is None:
        return False, problem
    actual = _sha256(path, path.stat().st_size - _COMMENT_LENGTH - 2)
    if actual != expected:
        return False, (f"its contents do not match the checksum recorded when it was written "
                       f"(SHA-256 {actual[:12]}… instead of {expected[:12]}…): it was "
                       f"altered or damaged after saving")
    return True, None


def verified_checkpoints(directory: str | Path, *, exclude: Path | None = None) -> list[Path]:
    """The ``*.ckpt`` files in ``directory`` that carry a checksum and match it, newest first;
    ``exclude`` and checkpoints written while a collapse guard was firing are left out."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for candidate in directory.glob("*.ckpt"):
        if candidate.name.endswith(GUARD_FIRING_SUFFIX + ".ckpt") or (
                exclude is not None and candidate.resolve() == exclude.resolve()):
            continue
        try:
            if _verified(candidate)[0]:
                found.append(candidate)
        except OSError:
            continue
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def read_checkpoint(path: str | Path, *, map_location: Any = "cpu",
                    weights_only: bool | None = False) -> dict[str, Any]:
    """The contents of the checkpoint file at ``path`` (on the CPU unless ``map_location``
    says otherwise), after verifying its checksum.

    Raises:
        CorruptCheckpointError: the file is empty, truncated, altered or cannot be unpickled.
        FileNotFoundError: there is no such file (the message lists verified checkpoints in its
            directory).
    """
    path = Path(path)
    if not path.is_file():
        alternatives = verified_checkpoints(path.parent)
        listed = (": " + ", ".join(str(p) for p in alternatives)) if alternatives else ""
        raise FileNotFoundError(f"checkpoint {path} does not exist; verified checkpoints in "
                                f"{path.parent}{listed or ': none'}")
    verified = verify_checkpoint(path)
    try:
        loaded = torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        if weights_only is not False and "weights_only" in str(err):
            raise pickle.UnpicklingError(
                f"checkpoint {path} holds Python objects that torch.load refuses with "
                "weights_only=True; if you trust the file, load it with weights_only=False"
            ) from err
        raise _corrupt(path, f"it cannot be unpickled ({type(err).__name__}: "
                             f"{_first_line(err)})") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        if verified:  # the file is intact: the failure is elsewhere (e.g. map_location)
            raise
        # the archive reader's own words ("failed finding central directory", ...) stay in
        # the chained exception; the message says what they mean
        raise _corrupt(path, "it is not a complete checkpoint archive (cut short, e.g. by a "
                             "crash or a full disk while it was written, or not written by "
                             "torch.save)") from err
    if not isinstance(loaded, dict):
        raise _corrupt(path, f"it holds a {type(loaded).__name__}, not a checkpoint dict")
    if not verified:  # said once it has loaded: a cut-off file loses its record too
        warnings.warn(f"checkpoint {path} has no recorded checksum (written without "
                      "trustregion's ChecksummedCheckpointIO), so it could not be verified",
                      stacklevel=2)
    return loaded


def write_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Save ``checkpoint`` to ``path`` atomically, with its checksum (see the module docs)."""
    path = Path(path)
    with _replacing(path) as (file, _):
        torch.save(checkpoint, file)
        file.flush()
        _seal(file)


def copy_checkpoint(source: str | Path, target: str | Path) -> None:
    """Copy the checkpoint ``source`` to ``target`` atomically (``target`` is replaced in one
    step, never left half-written or pointing at a missing file)."""
    with Path(source).open("rb") as src, _replacing(Path(target)) as (file, _):
        shutil.copyfileobj(src, file, _CHUNK)


class ChecksummedCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that writes with :func:`write_checkpoint` and reads with
    :func:`read_checkpoint`, so every checkpoint the trainer saves is atomic and checksummed and
    every one it resumes from is verified. ``trustregion fit`` uses it unless the trainer is
    given another ``CheckpointIO`` plugin.

    Remote paths (``s3://…``, ``gs://…``) are written and read as Lightning's
    ``TorchCheckpointIO`` does, without a checksum.

    Example:
        >>> trainer = L.Trainer(plugins=[ChecksummedCheckpointIO()])  # doctest: +SKIP
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if _is_remote(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options; got "
                            f"{storage_options!r}")
        write_checkpoint(checkpoint, path)

    def load_checkpoint(self, path: Any,
                        map_location: Callable[..., Any] | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if _is_remote(path):
            return super().load_checkpoint(path, map_location, weights_only)
        return read_checkpoint(path, map_location=map_location, weights_only=weights_only)


def with_checksummed_io(plugins: Any) -> list[Any]:
    """The trainer's ``plugins`` with a :class:`ChecksummedCheckpointIO` added, unless they
    already include a ``CheckpointIO`` (a user's choice is kept)."""
    if plugins is None:
        listed: list[Any] = []
    elif isinstance(plugins, list | tuple):
        listed = list(plugins)
    else:
        listed = [plugins]
    if any(isinstance(p, CheckpointIO) for p in listed):
        return listed
    return [*listed, ChecksummedCheckpointIO()]


# ------------------------------------------------------------------------------- internals
def _corrupt(path: Path, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(path, problem, verified_checkpoints(path.parent, exclude=path))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _is_remote(path: Any) -> bool:
    return "://" in str(path)


def _sha256(path: Path, length: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        remaining = length
        while remaining > 0:
            chunk = file.read(min(_CHUNK, remaining))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def _seal(file: IO[bytes]) -> None:
    """Record the SHA-256 of ``file`` (a finished ``torch.save`` archive, open for reading and
    writing) as the archive's comment."""
    size = file.seek(0, os.SEEK_END)
    file.seek(size - _END_RECORD_SIZE)
    end_record = file.read(_END_RECORD_SIZE)
    if not (end_record.startswith(_END_RECORD) and end_record[20:22] == b"\x00\x00"):
        raise RuntimeError("torch.save did not write a zip archive without a comment; the "
                           "checkpoint cannot be checksummed")
    digest = hashlib.sha256()
    file.seek(0)
    remaining = size - 2
    while remaining > 0:
        chunk = file.read(min(_CHUNK, remaining))
        digest.update(chunk)
        remaining -= len(chunk)
    file.seek(size - 2)
    file.write(_COMMENT_LENGTH.to_bytes(2, "little") + _MAGIC
               + digest.hexdigest().encode("ascii"))


@contextmanager
def _replacing(path: Path) -> Iterator[tuple[IO[bytes], Path]]:
    """A temporary file beside ``path`` that replaces it when the block finishes (flushed and
    fsynced first); on an error the temporary file is removed and ``path`` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    # os.open rather than mkstemp: the file gets the usual permissions (0666 less the umask)
    handle = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "w+b") as file:
            yield file, temporary
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
