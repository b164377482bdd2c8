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

**Sharded checkpoints.** Under Lightning's ``ModelParallelStrategy`` (FSDP) a checkpoint is a
directory, ``rollout=000050.ckpt/``, that every process writes its part of: ``__<rank>_0.distcp``
(``torch.distributed.checkpoint`` shards of the model and optimiser tensors), ``.metadata``
(where each tensor's pieces are) and ``meta.pt`` (everything else: step counters, callback and
module state, hyperparameters). A directory cannot carry a zip comment, so it carries a manifest
instead: :data:`MANIFEST` lists the SHA-256 of every other file in it, in the format
``sha256sum -c`` checks. :func:`write_manifest` writes it once the last shard is on disk;
:func:`verify_checkpoint` and :func:`read_checkpoint` check every listed file, and
:func:`copy_checkpoint` copies a directory as one step (hard links where the filesystem has them:
the files of a finished checkpoint are never rewritten).

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
    "MANIFEST",
    "SHARDED_STATE",
    "ChecksummedCheckpointIO",
    "CorruptCheckpointError",
    "copy_checkpoint",
    "install_checkpoint",
    "is_sharded_checkpoint",
    "read_checkpoint",
    "read_recorded_state",
    "recorded_digest",
    "remove_checkpoint",
    "verified_checkpoints",
    "verify_checkpoint",
    "with_checksummed_io",
    "write_checkpoint",
    "write_manifest",
]

GUARD_FIRING_SUFFIX = "-guard_firing"
"""Ends the name of a checkpoint written while a collapse guard was firing (``….ckpt`` after
it); such files are never suggested as a replacement for a corrupt one."""

MANIFEST = "checksums.sha256"
"""The file of a sharded checkpoint directory that lists ``<SHA-256>  <file name>`` for every
other file in it, one a line (what ``sha256sum`` writes and ``sha256sum -c`` checks)."""

SHARDED_STATE = "meta.pt"
"""The file of a sharded checkpoint directory that holds everything but the model and optimiser
tensors (Lightning writes it; a directory that holds it is a sharded checkpoint)."""

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

    def __reduce__(self) -> tuple[Any, ...]:  # sent between processes whole
        return type(self), (self.path, self.problem, self.alternatives)


def recorded_digest(path: str | Path) -> str | None:
    """The SHA-256 (hex) recorded in the checkpoint at ``path``, or None when it has none. For a
    sharded checkpoint (a directory), the SHA-256 of its :data:`MANIFEST`, which records every
    other file's.

    Raises :class:`CorruptCheckpointError` when the file is empty or its checksum record is
    damaged."""
    path = Path(path)
    if path.is_dir():
        manifest = path / MANIFEST
        return _sha256(manifest, manifest.stat().st_size) if manifest.is_file() else None
    digest, problem = _recorded(path)
    if problem is not None:
        raise _corrupt(path, problem)
    return digest


def verify_checkpoint(path: str | Path) -> bool:
    """True when the checkpoint at ``path`` matches its recorded checksum (every file listed in
    the manifest of a sharded checkpoint); False when it has none to check. Raises
    :class:`CorruptCheckpointError` on a mismatch, an empty or missing part, or a directory that
    is not a checkpoint, and ``FileNotFoundError`` when there is no such file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    verified, problem = _verified(path)
    if problem is not None:
        raise _corrupt(path, problem)
    return verified


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a sharded checkpoint: a directory holding :data:`SHARDED_STATE`."""
    path = Path(path)
    return path.is_dir() and (path / SHARDED_STATE).is_file()


def write_manifest(directory: str | Path) -> Path:
    """Write the :data:`MANIFEST` of the sharded checkpoint ``directory``: the SHA-256 of every
    file in it (at any depth) but the manifest. Call it once every process has finished writing
    its shard; returns the manifest's path."""
    directory = Path(directory)
    if not is_sharded_checkpoint(directory):
        raise ValueError(f"{directory} is not a sharded checkpoint (a directory holding "
                         f"{SHARDED_STATE}); nothing to write a manifest for")
    lines = []
    for file in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        name = file.relative_to(directory).as_posix()
        lines.append(f"{_sha256(file, file.stat().st_size)}  {name}\n")
    manifest = directory / MANIFEST
    with _replacing(manifest) as (handle, _):
        handle.write("".join(lines).encode())
    return manifest


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
    """(whether the checkpoint matches a recorded checksum, what is wrong with it or None);
    never raises for a damaged checkpoint, so that looking for alternatives cannot recurse."""
    if path.is_dir():
        return _verified_directory(path)
    expected, problem = _recorded(path)
    if expected is None:
        return False, problem
    actual = _sha256(path, path.stat().st_size - _COMMENT_LENGTH - 2)
    if actual != expected:
        return False, (f"its contents do not match the checksum recorded when it was written "
                       f"(SHA-256 {actual[:12]}… instead of {expected[:12]}…): it was "
                       f"altered or damaged after saving")
    return True, None


def _verified_directory(path: Path) -> tuple[bool, str | None]:
    """:func:`_verified` for a sharded checkpoint: every file its manifest lists."""
    if not (path / SHARDED_STATE).is_file():
        return False, (f"it is a directory without {SHARDED_STATE}, not a sharded checkpoint "
                       "(or one whose writing never finished)")
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False, None
    listed = _manifest_entries(manifest.read_bytes())
    if listed is None or SHARDED_STATE not in listed:
        return False, f"its checksum manifest {MANIFEST} is damaged"
    for name, expected in listed.items():
        file = path / name
        if not file.is_file():
            return False, f"its file {name}, listed in {MANIFEST}, is missing"
        actual = _sha256(file, file.stat().st_size)
        if actual != expected:
            return False, (f"its file {name} does not match the checksum recorded when it was "
                           f"written (SHA-256 {actual[:12]}… instead of {expected[:12]}…): it "
                           "was altered or damaged after saving")
    return True, None


def _manifest_entries(text: bytes) -> dict[str, str] | None:
    """File name → SHA-256 of a manifest's lines; None when a line is not ``<64 hex>  name``
    with a relative name inside the directory, or there are none."""
    entries = {}
    for line in text.decode("utf-8", errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        parts = Path(name).parts
        if (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not name
                or Path(name).is_absolute() or ".." in parts):
            return None
        entries[name] = digest
    return entries or None


def verified_checkpoints(directory: str | Path, *, exclude: Path | None = None) -> list[Path]:
    """The ``*.ckpt`` files and sharded checkpoint directories in ``directory`` that carry a
    checksum and match it, newest first; ``exclude`` and checkpoints written while a collapse
    guard was firing are left out."""
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
    """The contents of the checkpoint at ``path`` (on the CPU unless ``map_location`` says
    otherwise), after verifying its checksum. For a sharded checkpoint (a directory), its
    :data:`SHARDED_STATE`: everything but the model and optimiser tensors, which stay in the
    shards (read them with ``torch.distributed.checkpoint``).

    Raises:
        CorruptCheckpointError: the checkpoint is empty, truncated, altered or cannot be
            unpickled.
        FileNotFoundError: there is no such file (the message lists verified checkpoints in its
            directory).
    """
    path = Path(path)
    if not path.exists():
        alternatives = verified_checkpoints(path.parent)
        listed = (": " + ", ".join(str(p) for p in alternatives)) if alternatives else ""
        raise FileNotFoundError(f"checkpoint {path} does not exist; verified checkpoints in "
                                f"{path.parent}{listed or ': none'}")
    verified = verify_checkpoint(path)
    target = path / SHARDED_STATE if path.is_dir() else path
    try:
        loaded = torch.load(target, map_location=map_location, weights_only=weights_only)
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
        how = (f"a sharded checkpoint without {MANIFEST}" if path.is_dir()
               else "written without trustregion's ChecksummedCheckpointIO")
        warnings.warn(f"checkpoint {path} has no recorded checksum ({how}), so it could not "
                      "be verified", stacklevel=2)
    return loaded


def read_recorded_state(path: str | Path) -> dict[str, Any]:
    """What the checkpoint at ``path`` records, its tensors memory-mapped rather than read (for
    a sharded checkpoint, its :data:`SHARDED_STATE`): a quick look at a few recorded values of
    a checkpoint, without verifying it (:func:`read_checkpoint` does)."""
    path = Path(path)
    target = path / SHARDED_STATE if path.is_dir() else path
    loaded = torch.load(target, map_location="cpu", mmap=not path.is_dir(), weights_only=True)
    if not isinstance(loaded, dict):
        raise _corrupt(path, f"it holds a {type(loaded).__name__}, not a checkpoint dict")
    return loaded


def write_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Save ``checkpoint`` to ``path`` atomically, with its checksum (see the module docs)."""
    path = Path(path)
    with _replacing(path) as (file, _):
        torch.save(checkpoint, file)
        file.flush()
        _seal(file)


def copy_checkpoint(source: str | Path, target: str | Path) -> None:
    """Copy the checkpoint ``source`` (a file or a sharded directory) to ``target`` as one step
    (see :func:`install_checkpoint`): ``target`` never holds half a copy. A directory's files
    are hard-linked where the filesystem allows it, else copied."""
    source, target = Path(source), Path(target)
    if source.is_dir():
        staging = _staging_path(target)
        try:
            shutil.copytree(source, staging, copy_function=_link_or_copy)
            install_checkpoint(staging, target)
        except BaseException:
            remove_checkpoint(staging)
            raise
        return
    with source.open("rb") as src, _replacing(target) as (file, _):
        shutil.copyfileobj(src, file, _CHUNK)


def install_checkpoint(finished: str | Path, path: str | Path) -> None:
    """Put the finished checkpoint ``finished`` (a file or a directory beside ``path``) at
    ``path``, replacing what is there. A file replaces a file in one rename; a directory, or
    anything replacing one, first moves the old checkpoint aside, so that for a moment ``path``
    may be missing, but it never holds a mix of two checkpoints."""
    finished, path = Path(finished), Path(path)
    if path.is_dir() or (finished.is_dir() and os.path.lexists(path)):
        aside = _staging_path(path, ".old")
        os.replace(path, aside)
        try:
            os.replace(finished, path)
        except BaseException:
            os.replace(aside, path)
            raise
        remove_checkpoint(aside)
    else:
        os.replace(finished, path)
    _fsync_directory(path.parent)


def remove_checkpoint(path: str | Path) -> None:
    """Delete the checkpoint at ``path``, a file or a directory; nothing when there is none."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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
        if Path(path).is_dir():  # the strategy reads sharded checkpoints, not checkpoint I/O
            raise ValueError(
                f"checkpoint {path} is a sharded checkpoint (a directory written by several "
                "processes under FSDP), which only ModelParallelStrategy reads; resume it with "
                "the strategy and number of processes that wrote it, or export its policy "
                f"(trustregion export {path} OUT_DIR) and use OUT_DIR as model.policy")
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
    temporary = _staging_path(path)
    # os.open rather than mkstemp: the file gets the usual permissions (0666 less the umask)
    handle = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "w+b") as file:
            yield file, temporary
            file.flush()
            os.fsync(file.fileno())
        install_checkpoint(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _staging_path(path: Path, suffix: str = ".tmp") -> Path:
    """A hidden name beside ``path``, unique to this process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _link_or_copy(source: str, target: str) -> str:
    """Hard-link ``source`` as ``target``, or copy it (flushed to disk) where links fail."""
    try:
        os.link(source, target)
    except OSError:
        with open(source, "rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
            dst.flush()
            os.fsync(dst.fileno())
    return target


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
