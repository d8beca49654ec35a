"""Files: atomic writes (a reader, or a crash, sees the old file or the complete new one, never half of it),
and reading the project's safetensors files (models, avatars), whose metadata names their format."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

from .errors import CheckpointError, MediaError


class atomic_path:
    """``with atomic_path(final) as tmp:`` write ``tmp``; on success it becomes ``final`` (os.replace),
    on any exception it is deleted. ``tmp`` lies in ``final``'s directory and keeps its suffix, so
    libraries that pick a format from the file name still work.
    """

    def __init__(self, final: str | os.PathLike, make_parents: bool = False):
        self.final = os.path.abspath(os.fspath(final))
        directory = os.path.dirname(self.final)
        if make_parents:
            os.makedirs(directory, exist_ok=True)
        if not os.path.isdir(directory):
            raise MediaError(f"{final}: directory {directory} does not exist")
        if os.path.isdir(self.final):
            raise MediaError(f"{final}: is a directory")
        stem, suffix = os.path.splitext(os.path.basename(self.final))
        try:
            fd, self.tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".part{suffix}", dir=directory)
        except OSError as exc:
            raise MediaError(f"{final}: cannot write here ({exc.strerror or exc})") from exc
        os.close(fd)
        # mkstemp makes the file private (0600); the final file gets the usual mode (0666 less the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)

    def __enter__(self) -> str:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                os.replace(self.tmp, self.final)
                return
            except OSError as err:
                self.discard()
                raise MediaError(f"{self.final}: cannot write ({err.strerror or err})") from err
        self.discard()

    def discard(self) -> None:
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (fsync before the rename); makes parent folders."""
    with atomic_path(path, make_parents=True) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def read_tensor_file(
    path: str,
    format_name: str,
    what: str,
    foreign: Callable[[str | None], str] | None = None,
    device: str = "cpu",
) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file whose metadata ``format`` is ``format_name``.

    CheckpointError for a missing, truncated or foreign file; ``what`` names the kind of file in messages
    ("model file"), ``foreign(kind)`` words the message for a file of another format. Never unpickles.
    """
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"{what} not found: {path}")
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            kind = metadata.get("format")
            if kind != format_name:
                raise CheckpointError(foreign(kind) if foreign else f"{path} is not a {what} (metadata format={kind!r})")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {what} {path} (truncated or not safetensors): {exc}") from exc
    return tensors, metadata
