"""Pushing trained models to the Hugging Face Hub from training, and resuming training from the Hub.

`HubPusher` uploads in the background with a deadline per push, because `huggingface_hub` sets no timeout
and a hung Hub would otherwise block training forever. Create it on the main process (rank 0) only.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import filter_repo_objects, set_client_factory

from .configuration_twist import check_choice
from .outputs import CHECKPOINT_PREFIX, CHECKPOINTS_DIR, HUB_CHECKPOINT_DIR, RAY_STORAGE_DIR

logger = logging.getLogger(__name__)

HUB_STRATEGIES = ("end", "every_save", "checkpoint")
CHECKPOINT_FOLDER = HUB_CHECKPOINT_DIR
DEFAULT_IGNORE_PATTERNS = (
    f"{CHECKPOINT_PREFIX}*/**",
    f"{CHECKPOINTS_DIR}/**",
    f"{RAY_STORAGE_DIR}/**",
    f"{CHECKPOINT_FOLDER}/**",
    ".git/**",
    "**/.git/**",
    ".cache/**",
    "**/__pycache__/**",
    "*.tmp",
)
_REPO_ID = re.compile(r"(?:[\w.-]+/)?[\w.-]+")
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{20,}")
_TOKEN_MASK = "<hf-token>"


@dataclass(frozen=True)
class PushResult:
    """The outcome of one push: which save it was, success, duration, the commit or the (scrubbed) reason."""

    label: str
    ok: bool
    seconds: float
    commit_oid: str | None = None
    commit_url: str | None = None
    error: str | None = None

    def __str__(self) -> str:
        if self.ok:
            return f"{self.label}: pushed in {self.seconds:.1f}s (commit {self.commit_oid})"
        return f"{self.label}: FAILED after {self.seconds:.1f}s: {self.error}"


@dataclass(frozen=True)
class PushSummary:
    """What `HubPusher.finish` reports: whether the last push landed, and every push's result."""

    repo_id: str
    ok: bool
    results: tuple[PushResult, ...]
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass
class _PushJob:
    label: str
    commit_message: str
    staging: Path
    result: PushResult | None = field(default=None, repr=False)


def configure_hub_http_timeout(seconds: float) -> Callable[[], object]:
    """Give `huggingface_hub`'s shared HTTP client a connect/read/write timeout, process-wide, until the
    returned factory is given back to `set_client_factory` (`HubPusher.finish` does).

    The library's client has none, so a Hub that accepts a request and never answers blocks its caller.
    """
    # The factory in use keeps its request hooks (offline mode, request ids, a user's proxy); only the timeout
    # changes. huggingface_hub has no public getter for it.
    from huggingface_hub.utils import _http

    previous = _http._GLOBAL_CLIENT_FACTORY

    def client_with_timeout():
        client = previous()
        client.timeout = seconds
        return client

    set_client_factory(client_with_timeout)
    return previous


def scrub_token(text: str, token: str | None) -> str:
    """`text` with the token, and anything shaped like a Hugging Face token, masked."""
    if token:
        text = text.replace(token, _TOKEN_MASK)
    return _TOKEN_LIKE.sub(_TOKEN_MASK, text)


class HubPusher:
    """Pushes a `save_pretrained` folder (and, for `hub_strategy="checkpoint"`, the training state under
    `last-checkpoint/`) to a Hub repo in the background, mirroring the Trainer's `hub_*` options.

    Every push uploads a snapshot copied at save time, as one commit, within `push_timeout` seconds; a push
    that fails or runs past its deadline is logged and the next save pushes everything again. The local
    folders are only read. Call `on_save` after each save and `finish` before the job exits.
    """

    def __init__(
        self,
        hub_model_id: str,
        *,
        hub_strategy: str = "every_save",
        hub_private_repo: bool | None = None,
        hub_token: str | None = None,
        hub_revision: str | None = None,
        push_timeout: float = 600.0,
        http_timeout: float | None = 120.0,
        endpoint: str | None = None,
        ignore_patterns: tuple[str, ...] = DEFAULT_IGNORE_PATTERNS,
        allow_patterns: Sequence[str] | None = None,
    ):
        _check_options(hub_model_id, hub_strategy, push_timeout)
        self._token = require_hub_token(hub_token)
        self.hub_model_id = hub_model_id
        self.hub_strategy = hub_strategy
        self.hub_private_repo = hub_private_repo
        self.hub_revision = hub_revision or "main"
        self.push_timeout = push_timeout
        self.ignore_patterns = list(ignore_patterns)
        self.allow_patterns = list(allow_patterns) if allow_patterns is not None else None
        self.results: list[PushResult] = []
        self._previous_client_factory = configure_hub_http_timeout(http_timeout) if http_timeout else None
        self._api = HfApi(endpoint=endpoint, token=self._token)
        self._staging_root = Path(tempfile.mkdtemp(prefix="twist-hub-push-"))
        self._condition = threading.Condition()
        self._pending: _PushJob | None = None
        self._busy = False
        self._closed = False
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="twist-hub-pusher", daemon=True)
        self._dispatcher.start()

    def __repr__(self) -> str:
        return f"HubPusher({self.hub_model_id!r}, hub_strategy={self.hub_strategy!r}, token=<hidden>)"

    def on_save(
        self, model_dir: str | Path, checkpoint_dir: str | Path | None = None, *, step: int | None = None
    ) -> bool:
        """Queue a push of what was just saved, as the strategy asks; True if a push was queued."""
        if self.hub_strategy == "end":
            return False
        if self.hub_strategy == "checkpoint" and checkpoint_dir is None:
            raise ValueError("hub_strategy='checkpoint' pushes the training state too: pass checkpoint_dir.")
        label = f"step {step}" if step is not None else "save"
        checkpoint = checkpoint_dir if self.hub_strategy == "checkpoint" else None
        self._submit(_PushJob(label, f"Training in progress, {label}", self._snapshot(model_dir, checkpoint)))
        return True

    def finish(self, model_dir: str | Path | None = None, timeout: float | None = None) -> PushSummary:
        """Push the final model (if given), wait for the pushes still running (at most `timeout` seconds),
        log and return a summary. The pusher accepts no more pushes afterwards."""
        if model_dir is not None:
            self._submit(_PushJob("final", "End of training", self._snapshot(model_dir, None)))
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        finished = self.wait(timeout)
        if self._previous_client_factory is not None:
            set_client_factory(self._previous_client_factory)
            self._previous_client_factory = None
        with contextlib.suppress(OSError):
            self._staging_root.rmdir()  # empty unless an abandoned upload still reads its snapshot
        summary = self._summary(finished, timeout)
        (logger.info if summary.ok else logger.warning)("%s", summary.message)
        return summary

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no push is queued or running (at most `timeout` seconds); True if none is."""
        with self._condition:
            return self._condition.wait_for(lambda: not self._busy and self._pending is None, timeout)

    def _submit(self, job: _PushJob) -> None:
        with self._condition:
            if self._pending is not None:
                logger.info("Hub push of %s superseded by %s before it started", self._pending.label, job.label)
                _carry_checkpoint(self._pending.staging, job.staging)
                shutil.rmtree(self._pending.staging, ignore_errors=True)
            self._pending = job
            self._condition.notify_all()

    def _snapshot(self, model_dir: str | Path, checkpoint_dir: str | Path | None) -> Path:
        """Copy what will be pushed, so that later saves cannot change a push half-way."""
        if self._closed:
            raise RuntimeError("This HubPusher has finished; create a new one to push again.")
        staging = Path(tempfile.mkdtemp(dir=self._staging_root))
        try:
            _copy_tree(Path(model_dir), staging, self.ignore_patterns, self.allow_patterns)
            if checkpoint_dir is not None:
                _copy_tree(Path(checkpoint_dir), staging / CHECKPOINT_FOLDER, [])
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    def _dispatch_loop(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                job, self._pending, self._busy = self._pending, None, True
            result = self._run_with_deadline(job)
            (logger.info if result.ok else logger.warning)("Hub push to %s %s", self.hub_model_id, result)
            with self._condition:
                self.results.append(result)
                self._busy = False
                self._condition.notify_all()

    def _run_with_deadline(self, job: _PushJob) -> PushResult:
        """Run the upload in a daemon thread and stop waiting for it at the deadline."""
        start = time.monotonic()
        worker = threading.Thread(target=self._attempt, args=(job,), name="twist-hub-upload", daemon=True)
        worker.start()
        worker.join(self.push_timeout)
        if worker.is_alive():
            reason = (
                f"no answer from the Hub within the {self.push_timeout:.0f}s push deadline; "
                "abandoned, the next save pushes again"
            )
            return PushResult(job.label, False, time.monotonic() - start, error=reason)
        assert job.result is not None
        return job.result

    def _attempt(self, job: _PushJob) -> None:
        start = time.monotonic()
        try:
            commit = self._upload(job.staging, job.commit_message)
            job.result = PushResult(job.label, True, time.monotonic() - start, commit.oid, commit.commit_url)
        # Whatever goes wrong becomes the push's reported outcome: it must never reach the training loop.
        except Exception as error:  # noqa: BLE001
            reason = scrub_token(f"{type(error).__name__}: {' '.join(str(error).split())}", self._token)
            job.result = PushResult(job.label, False, time.monotonic() - start, error=reason)
        finally:
            shutil.rmtree(job.staging, ignore_errors=True)

    def _upload(self, staging: Path, commit_message: str):
        """One commit holding the snapshot; stale `last-checkpoint/` files are deleted in the same commit."""
        repo = self._api.create_repo(self.hub_model_id, private=self.hub_private_repo, exist_ok=True)
        if self.hub_revision != "main":
            self._api.create_branch(repo.repo_id, branch=self.hub_revision, exist_ok=True)
        info = self._api.repo_info(repo.repo_id, revision=self.hub_revision)
        local = sorted(str(path.relative_to(staging).as_posix()) for path in staging.rglob("*") if path.is_file())
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=staging / name) for name in local]
        if (staging / CHECKPOINT_FOLDER).is_dir():
            remote = [sibling.rfilename for sibling in info.siblings or []]
            operations += [
                CommitOperationDelete(path_in_repo=name)
                for name in remote
                if name.startswith(f"{CHECKPOINT_FOLDER}/") and name not in local
            ]
        return self._api.create_commit(
            repo.repo_id,
            operations,
            commit_message=commit_message,
            revision=self.hub_revision,
            parent_commit=info.sha,
        )

    def _summary(self, finished: bool, timeout: float | None) -> PushSummary:
        results = tuple(self.results)
        if not finished:
            message = (
                f"Hub push to {self.hub_model_id}: still running after waiting {timeout:.0f}s; "
                "the local copy is complete, push it again with `hf upload`."
            )
            return PushSummary(self.hub_model_id, False, results, message)
        if not results:
            return PushSummary(self.hub_model_id, True, results, f"Hub push to {self.hub_model_id}: nothing pushed.")
        last = results[-1]
        verdict = "up to date" if last.ok else "NOT up to date, the local copy is complete"
        message = f"Hub push to {self.hub_model_id}: {verdict}; last push {last}"
        return PushSummary(self.hub_model_id, last.ok, results, message)


def require_hub_token(hub_token: str | None, needed_by: str = "Pushing to the Hub") -> str:
    """The token to push with (the given one, else HF_TOKEN or the login's); a clear error when there is none."""
    token = hub_token or get_token()
    if not token:
        raise ValueError(
            f"{needed_by} needs a Hugging Face token and none was found: pass --hub_token, set HF_TOKEN, "
            "or run `hf auth login`."
        )
    return token


def _check_options(hub_model_id: str, hub_strategy: str, push_timeout: float) -> None:
    if not _REPO_ID.fullmatch(hub_model_id or ""):
        raise ValueError(f"hub_model_id {hub_model_id!r} is not a Hub repo id: use 'name' or 'namespace/name'.")
    check_choice("hub_strategy", hub_strategy, HUB_STRATEGIES)
    if push_timeout <= 0:
        raise ValueError(f"push_timeout must be a positive number of seconds, got {push_timeout}.")


def _carry_checkpoint(superseded: Path, newer: Path) -> None:
    """A newer push without training state (e.g. the final model) keeps the superseded push's checkpoint, so
    the Hub never loses a `last-checkpoint/` that was queued."""
    checkpoint = superseded / CHECKPOINT_FOLDER
    if checkpoint.is_dir() and not (newer / CHECKPOINT_FOLDER).exists():
        shutil.move(str(checkpoint), newer / CHECKPOINT_FOLDER)


def _copy_tree(source: Path, target: Path, ignore_patterns: list[str], allow_patterns: list[str] | None = None) -> None:
    """Copy the files of `source` matching `allow_patterns` (None: all) and not `ignore_patterns` to `target`."""
    if not source.is_dir():
        raise FileNotFoundError(f"Cannot push {source}: it is not a folder (save the model before pushing).")
    names = [path.relative_to(source).as_posix() for path in source.rglob("*") if path.is_file()]
    for name in filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, target / name)


def resolve_resume_checkpoint(
    spec: str | Path,
    cache_dir: str | Path | None = None,
    *,
    token: str | None = None,
    endpoint: str | None = None,
) -> Path:
    """The training-state folder to resume from: `spec` itself if it is a local path, otherwise the
    `last-checkpoint/` folder of the Hub repo `spec` (`namespace/name` or `namespace/name@revision`)."""
    local = Path(spec).expanduser()
    if local.exists():
        return local
    repo_id, _, revision = str(spec).partition("@")
    if not _REPO_ID.fullmatch(repo_id):
        raise FileNotFoundError(f"Cannot resume from {spec!r}: no such local folder, and not a Hub repo id.")
    try:
        snapshot = snapshot_download(
            repo_id,
            revision=revision or None,
            allow_patterns=[f"{CHECKPOINT_FOLDER}/**"],
            cache_dir=cache_dir,
            token=token,
            endpoint=endpoint,
        )
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise FileNotFoundError(
            f"Cannot resume from {spec!r}: no such local folder, and no Hub repo {repo_id} at revision "
            f"{revision or 'main'} (or no access to it with this token)."
        ) from error
    checkpoint = Path(snapshot) / CHECKPOINT_FOLDER
    if not checkpoint.is_dir():
        raise FileNotFoundError(
            f"Hub repo {repo_id} (revision {revision or 'main'}) has no {CHECKPOINT_FOLDER}/ folder to resume "
            "from: push it with hub_strategy='checkpoint'."
        )
    return checkpoint
