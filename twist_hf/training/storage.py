"""Run storage that may be remote (`s3://`, `gs://`, ...): Ray Train persists checkpoints there through pyarrow,
configured the standard way for each cloud (for S3: `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION` or the machine's role). Nothing here assumes a shared disk."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from ..outputs import CHECKPOINT_PREFIX
from .checkpoint import TRAINER_STATE

logger = logging.getLogger(__name__)

# Ray Train folder names of our checkpoints: RayReporter names them checkpoint-<global step, 9 digits>.
_CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)$")


class StorageError(ValueError):
    """The run's storage cannot be used: unreachable, missing bucket, no credentials."""


def is_remote(path: str | None) -> bool:
    """A URI with a scheme (s3://, gs://, ...) rather than a folder on this machine."""
    return path is not None and "://" in path and not path.startswith("file://")


@contextlib.contextmanager
def checkpoint_folder(checkpoint) -> Iterator[Path | None]:
    """A Ray checkpoint (or None) as a folder to read inside the `with` block: a local one is read in place, one in
    object storage is downloaded to a temporary folder deleted at the end. (Ray's `Checkpoint.to_directory()`
    copies either kind into the temporary directory and leaves it there: one copy per restart of every worker.)"""
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        if checkpoint.filesystem.type_name != "local":
            uri = f"{checkpoint.filesystem.type_name}://{checkpoint.path}"
            logger.info("Reading checkpoint %s from its temporary download %s.", uri, folder)
        yield Path(folder)


def open_storage(uri: str):
    """(pyarrow filesystem, path inside it) of a storage URI, as Ray Train resolves it."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (pyarrow.ArrowInvalid, OSError) as error:
        raise StorageError(f"--storage_path {uri} cannot be opened: {error}") from error


def check_storage_reachable(uri: str) -> None:
    """List the storage once from the driver, so that a wrong endpoint, bucket or credentials fail before launch."""
    import pyarrow.fs

    filesystem, path = open_storage(uri)
    bucket = path.split("/", 1)[0]
    try:
        info = filesystem.get_file_info(bucket)
    except OSError as error:
        raise StorageError(
            f"--storage_path {uri} is not reachable: {error}. Check the endpoint (AWS_ENDPOINT_URL) and the "
            "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the machine's role)."
        ) from error
    if info.type == pyarrow.fs.FileType.NotFound:
        raise StorageError(f"--storage_path {uri}: the bucket {bucket!r} does not exist; create it first.")


def find_latest_stored_checkpoint(uri: str, run_prefix: str = "") -> str | None:
    """URI of the checkpoint with the highest global step among the runs under `uri` whose name starts with
    `run_prefix` (Ray Train layout: <uri>/<run>/checkpoint-<step>/trainer_state.json); None if there is none."""
    import pyarrow.fs

    filesystem, root = open_storage(uri)
    try:
        runs = filesystem.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    except OSError as error:
        raise StorageError(f"Cannot list {uri}: {error}") from error
    best: tuple[int, str] | None = None
    for run in runs:
        if run.type != pyarrow.fs.FileType.Directory or not run.base_name.startswith(run_prefix):
            continue
        for entry in filesystem.get_file_info(pyarrow.fs.FileSelector(run.path)):
            match = _CHECKPOINT_NAME.match(entry.base_name)
            complete = filesystem.get_file_info(f"{entry.path}/{TRAINER_STATE}").type == pyarrow.fs.FileType.File
            if match and complete and (best is None or int(match.group(1)) > best[0]):
                best = (int(match.group(1)), entry.path)
    if best is None:
        return None
    return f"{uri.split('://', 1)[0]}://{best[1]}"
