"""A local Hugging Face Hub API server, so tests can run the real `huggingface_hub` client over real HTTP.

It speaks the subset of the Hub API that `huggingface_hub` 2.4 uses to create repos, commit (regular files
inline, large files through the LFS batch API), list and download files, with fault switches to test
clients against a server that is down, failing or hung. Model repos only; no pull requests, no Xet.
Set `HF_HUB_DISABLE_XET=1` (or `huggingface_hub.constants.HF_HUB_DISABLE_XET = True`) in the client,
otherwise it uploads large files through Xet, which this server does not speak.

Storage lives under `root`: `objects/<sha256>` holds every file content, `repos/<namespace>/<name>.json`
each repo's branches and commits (each commit: 40-hex sha, parent, message and a full files snapshot).
LFS downloads redirect to a second origin (another port) that serves the objects without credentials,
the way the real Hub redirects to its CDN.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import logging
import os
import re
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

logger = logging.getLogger(__name__)

TEST_TOKEN = "hf_test_token"
TEST_USER = "test-user"
# What every pushed TWIST model repository holds: weights, config, processor, card and the remote code.
PUSHED_MODEL_FILES = frozenset(
    {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "modeling_twist.py"}
)
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
LFS_POINTER_TEMPLATE = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
DEFAULT_GITATTRIBUTES = """\
*.bin filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.msgpack filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.npz filter=lfs diff=lfs merge=lfs -text
*.pkl filter=lfs diff=lfs merge=lfs -text
*.pickle filter=lfs diff=lfs merge=lfs -text
*.joblib filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
*.gz filter=lfs diff=lfs merge=lfs -text
*.tar filter=lfs diff=lfs merge=lfs -text
*.zst filter=lfs diff=lfs merge=lfs -text
*.arrow filter=lfs diff=lfs merge=lfs -text
*.parquet filter=lfs diff=lfs merge=lfs -text
*tfevents* filter=lfs diff=lfs merge=lfs -text
"""
REPO_ID = r"[\w.-]+/[\w.-]+"
SEGMENT = r"[^/?]+"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob, the `oid` the Hub reports for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that stands in the git tree for a large file."""
    return LFS_POINTER_TEMPLATE.format(oid=sha256, size=size).encode()


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class HubHTTPError(Exception):
    """An error answer: HTTP status, message, and the `X-Error-Code` the client maps to its exceptions."""

    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}


class RepoStore:
    """Repos, branches and commits persisted as JSON under `root`; file contents stored by sha256."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        (self.root / "repos").mkdir(exist_ok=True)
        self._lock = threading.RLock()

    def _repo_file(self, repo_id: str) -> Path:
        return self.root / "repos" / f"{repo_id}.json"

    def load(self, repo_id: str) -> dict | None:
        """The repo's record (`private`, `branches`, `commits`), or None if it does not exist."""
        path = self._repo_file(repo_id)
        return json.loads(path.read_text()) if path.exists() else None

    def _save(self, repo_id: str, repo: dict) -> None:
        path = self._repo_file(repo_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(repo, indent=1))
        tmp.replace(path)

    def put_object(self, data: bytes) -> str:
        """Store a content and return its sha256."""
        sha256 = hashlib.sha256(data).hexdigest()
        target = self.objects / sha256
        if not target.exists():
            tmp = self.objects / f"{sha256}.{uuid.uuid4().hex}.tmp"
            tmp.write_bytes(data)
            tmp.replace(target)
        return sha256

    def has_object(self, sha256: str) -> bool:
        return re.fullmatch(r"[0-9a-f]{64}", sha256) is not None and (self.objects / sha256).is_file()

    def read_object(self, sha256: str) -> bytes:
        return (self.objects / sha256).read_bytes()

    def create_repo(self, repo_id: str, private: bool) -> bool:
        """Create a repo with the Hub's initial `.gitattributes` commit; False if it already exists."""
        with self._lock:
            if self.load(repo_id) is not None:
                return False
            repo = {"private": private, "created_at": _now_iso(), "branches": {}, "commits": {}}
            entry = self._file_entry(DEFAULT_GITATTRIBUTES.encode(), lfs=False)
            sha = self._add_commit(repo, None, "initial commit", {".gitattributes": entry})
            repo["branches"]["main"] = sha
            self._save(repo_id, repo)
            return True

    def _file_entry(self, data: bytes, lfs: bool) -> dict:
        sha256 = self.put_object(data)
        oid = git_blob_oid(lfs_pointer(sha256, len(data)) if lfs else data)
        return {"size": len(data), "sha256": sha256, "lfs": lfs, "oid": oid}

    def lfs_entry(self, sha256: str, size: int) -> dict:
        """The file entry for an already uploaded LFS object."""
        return {"size": size, "sha256": sha256, "lfs": True, "oid": git_blob_oid(lfs_pointer(sha256, size))}

    @staticmethod
    def _add_commit(repo: dict, parent: str | None, message: str, files: dict) -> str:
        body = json.dumps({"parent": parent, "message": message, "files": files, "nonce": uuid.uuid4().hex})
        sha = hashlib.sha1(body.encode()).hexdigest()
        repo["commits"][sha] = {"parent": parent, "message": message, "date": _now_iso(), "files": files}
        return sha

    @staticmethod
    def resolve(repo: dict, revision: str) -> str | None:
        """The commit sha a branch name or (full or >= 7 chars abbreviated) commit sha points to."""
        if revision in repo["branches"]:
            return repo["branches"][revision]
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [sha for sha in repo["commits"] if sha.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        return None

    def commit(self, repo_id: str, branch: str, operations: list[dict], message: str, parent_commit: str | None) -> str:
        """Apply `operations` (`file`, `lfsFile`, `deletedFile`, `deletedFolder`) on top of `branch`."""
        with self._lock:
            repo = self._require_repo(repo_id)
            if branch not in repo["branches"]:
                raise HubHTTPError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = repo["branches"][branch]
            if parent_commit is not None and not head.startswith(parent_commit):
                raise HubHTTPError(412, f"Parent commit {parent_commit} is not the head of {branch} ({head})")
            files = dict(repo["commits"][head]["files"])
            for operation in operations:
                self._apply(files, operation)
            sha = self._add_commit(repo, head, message, files)
            repo["branches"][branch] = sha
            self._save(repo_id, repo)
            return sha

    def _apply(self, files: dict, operation: dict) -> None:
        key, value = operation["key"], operation["value"]
        path = value.get("path", "")
        if key == "file":
            files[path] = self._file_entry(base64.b64decode(value["content"]), lfs=False)
        elif key == "lfsFile":
            if not self.has_object(value["oid"]):
                raise HubHTTPError(422, f"LFS object {value['oid']} for {path} was never uploaded")
            files[path] = self.lfs_entry(value["oid"], self.object_size(value["oid"]))
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubHTTPError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            prefix = path.rstrip("/") + "/"
            for name in [name for name in files if name.startswith(prefix)]:
                del files[name]
        else:
            raise HubHTTPError(400, f"Unknown commit operation {key!r}")

    def object_size(self, sha256: str) -> int:
        return (self.objects / sha256).stat().st_size

    def create_branch(self, repo_id: str, branch: str, starting_point: str | None) -> None:
        """Create `branch` at `starting_point` (default: the head of main)."""
        with self._lock:
            repo = self._require_repo(repo_id)
            if branch in repo["branches"]:
                raise HubHTTPError(409, f"Reference already exists: refs/heads/{branch}")
            sha = self.resolve(repo, starting_point or "main")
            if sha is None:
                raise HubHTTPError(404, f"Invalid rev id: {starting_point}", "RevisionNotFound")
            repo["branches"][branch] = sha
            self._save(repo_id, repo)

    def _require_repo(self, repo_id: str) -> dict:
        repo = self.load(repo_id)
        if repo is None:
            raise HubHTTPError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo


@dataclass
class RecordedRequest:
    """One request as the server saw it (never the credentials, only whether there were some)."""

    origin: str
    method: str
    path: str
    authorized: bool
    status: int = 0


@dataclass
class _Faults:
    fail_status: int | None = None
    hang_seconds: float = 0.0
    wake: threading.Event = field(default_factory=threading.Event)


class _TrackingServer(ThreadingHTTPServer):
    """A threading HTTP server that can cut its open keep-alive connections when stopped."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type, hub: HubServer, origin: str):
        self.hub = hub
        self.origin = origin
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    """Reads a request, applies the fault switches, routes it and writes the JSON or bytes answer."""

    protocol_version = "HTTP/1.1"
    server: _TrackingServer

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.server.origin, format % args)

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        hub = self.server.hub
        record = RecordedRequest(
            self.server.origin,
            self.command,
            urlsplit(self.path).path,
            self.headers.get("Authorization") is not None,
        )
        hub.requests.append(record)
        body = self._read_body()
        try:
            if hub.faults.fail_status is not None:
                raise HubHTTPError(hub.faults.fail_status, "Fault injected by the test server")
            route, match = hub.route(self.server.origin, self.command, urlsplit(self.path).path)
            answer = route(self, match, body)
        except HubHTTPError as error:
            answer = _error_answer(error)
        except Exception as error:  # a server bug must reach the client as a 500, not a dropped socket
            logger.exception("test hub server failed on %s %s", self.command, self.path)
            answer = _error_answer(HubHTTPError(500, f"Internal test server error: {error!r}"))
        if answer is None:
            record.status = -1
            self.close_connection = True
            return
        record.status = answer.status
        self._write(answer)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        chunks = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()

    def _write(self, answer: Answer) -> None:
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, str(value))
        self.send_header("Content-Length", str(answer.content_length))
        self.end_headers()
        if self.command != "HEAD" and answer.body:
            self.wfile.write(answer.body)

    @property
    def token_user(self) -> str | None:
        """The user the bearer token belongs to, or None without a valid token."""
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
        return self.server.hub.tokens.get(token) if token else None

    def require_user(self) -> str:
        """The authenticated user; a 401 (as the Hub answers) without a valid token."""
        user = self.token_user
        if user is None:
            message = (
                "Invalid credentials in Authorization header"
                if "Authorization" in self.headers
                else ("You must be authenticated to write to the Hub")
            )
            raise HubHTTPError(401, message)
        return user


@dataclass
class Answer:
    status: int
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    content_length: int | None = None

    def __post_init__(self) -> None:
        if self.content_length is None:
            self.content_length = len(self.body)


def _json_answer(payload: Any, status: int = 200, headers: dict | None = None) -> Answer:
    return Answer(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})


def _error_answer(error: HubHTTPError) -> Answer:
    headers = {"X-Error-Message": error.message, **error.headers}
    if error.error_code:
        headers["X-Error-Code"] = error.error_code
    return _json_answer({"error": error.message}, error.status, headers)


def _byte_range(range_header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (start, end) of a `bytes=a-b` / `bytes=a-` Range header, or None for the whole file."""
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header or "")
    if match is None:
        return None
    start = int(match.group(1))
    end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
    if start > end:
        raise HubHTTPError(
            416,
            f"Range {range_header} is outside a file of {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return start, end


def _content_answer(handler: _Handler, data: bytes, headers: dict) -> Answer:
    """200 with the whole content, or 206 with the requested byte range."""
    span = _byte_range(handler.headers.get("Range"), len(data))
    headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", **headers}
    if span is None:
        return Answer(200, data, headers)
    start, end = span
    headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
    return Answer(206, data[start : end + 1], headers)


class HubServer:
    """The running test Hub: `endpoint` (API origin), `blob_endpoint` (LFS storage origin), fault switches.

    `requests` records every request; `lfs_uploads` the sha256 of every LFS object PUT to storage.
    """

    def __init__(self, root: Path, tokens: dict[str, str] | None = None):
        self.root = Path(root)
        self.tokens = tokens if tokens is not None else {TEST_TOKEN: TEST_USER}
        self.requests: list[RecordedRequest] = []
        self.lfs_uploads: list[str] = []
        self.faults = _Faults()
        self.store = RepoStore(self.root)
        self._upload_tickets: dict[str, tuple[str, int]] = {}
        self._ports = {"api": 0, "blobs": 0}
        self._servers: dict[str, _TrackingServer] = {}
        self._threads: list[threading.Thread] = []
        self._routes = _build_routes()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._ports['api']}"

    @property
    def blob_endpoint(self) -> str:
        return f"http://127.0.0.1:{self._ports['blobs']}"

    def start(self) -> HubServer:
        """Listen on 127.0.0.1 (ephemeral ports the first time, the same ports after a restart)."""
        self.faults.wake = threading.Event()
        for origin in ("api", "blobs"):
            server = _TrackingServer(("127.0.0.1", self._ports[origin]), _Handler, self, origin)
            self._ports[origin] = server.server_address[1]
            self._servers[origin] = server
            thread = threading.Thread(
                target=server.serve_forever, args=(0.05,), name=f"hub-server-{origin}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop listening and cut open connections: clients now get connection errors."""
        self.faults.wake.set()
        for server in self._servers.values():
            server.shutdown()
            server.server_close()
            server.cut_connections()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def restart(self) -> None:
        """Stop, then serve again on the same ports from the same folder (state reloaded from disk)."""
        self.stop()
        self.store = RepoStore(self.root)
        self.start()

    def fail_with(self, status: int) -> None:
        """Answer every request, on both origins, with `status`."""
        self.faults.fail_status = status

    def hang(self, seconds: float) -> None:
        """Block commit requests for `seconds` (or until `heal`/`stop`), then drop them unanswered."""
        self.faults.hang_seconds = seconds
        self.faults.wake = threading.Event()

    def heal(self) -> None:
        """Clear the fault switches and release hung requests."""
        self.faults.fail_status = None
        self.faults.hang_seconds = 0.0
        self.faults.wake.set()

    def route(self, origin: str, method: str, path: str) -> tuple[Callable, re.Match]:
        for route_origin, route_method, pattern, function in self._routes:
            if route_origin == origin and route_method == method and (match := pattern.fullmatch(path)):
                return function, match
        raise HubHTTPError(404, f"No route for {method} {path} on this test Hub server")

    def issue_upload_ticket(self, sha256: str, size: int) -> str:
        ticket = uuid.uuid4().hex
        self._upload_tickets[ticket] = (sha256, size)
        return ticket

    def redeem_upload_ticket(self, ticket: str) -> tuple[str, int]:
        if ticket not in self._upload_tickets:
            raise HubHTTPError(403, "Unknown or expired upload URL")
        return self._upload_tickets.pop(ticket)


def start_hub_server(root: Path, tokens: dict[str, str] | None = None) -> HubServer:
    """Start a test Hub backed by the folder `root`; call `.stop()` when done."""
    return HubServer(root, tokens).start()


def client_env(server: HubServer, hf_home: Path, token: str | None = None) -> dict[str, str]:
    """Environment for a fresh client process: `server` as HF_ENDPOINT, its own HF_HOME cache, Xet off."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("HF_")}
    env.update(HF_ENDPOINT=server.endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_XET="1")
    if token is not None:
        env["HF_TOKEN"] = token
    return env


# --- request handlers -------------------------------------------------------------------------------------


def _readable_repo(handler: _Handler, repo_id: str) -> dict:
    """The repo record, or the Hub's RepoNotFound answer (also for a private repo without credentials)."""
    repo = handler.server.hub.store.load(repo_id)
    if repo is None or (repo["private"] and handler.token_user is None):
        raise HubHTTPError(404, f"Repository not found: {repo_id}", "RepoNotFound")
    return repo


def _resolved(repo: dict, revision: str) -> tuple[str, dict]:
    sha = RepoStore.resolve(repo, revision)
    if sha is None:
        raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
    return sha, repo["commits"][sha]["files"]


def _query_flag(handler: _Handler, name: str) -> bool:
    """A boolean query parameter as httpx sends it (`true`/`false`)."""
    return parse_qs(urlsplit(handler.path).query).get(name, [""])[0].lower() in ("1", "true")


def _json_body(body: bytes) -> dict:
    try:
        return json.loads(body or b"{}")
    except json.JSONDecodeError as error:
        raise HubHTTPError(400, f"Request body is not valid JSON: {error}") from error


def whoami(handler: _Handler, match: re.Match, body: bytes) -> Answer:
    user = handler.require_user()
    return _json_answer(
        {
            "type": "user",
            "name": user,
            "fullname": user,
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"role": "write"}},
        }
    )


def create_repo(handler: _Handler, match: re.Match, body: bytes) -> Answer:
    user = handler.require_user()
    payload = _json_body(body)
    if payload.get("type", "model") != "model":
        raise HubHTTPError(400, "This test Hub server only hosts model repos")
    repo_id = f"{payload.get('organization') or user}/{payload['name']}"
    if not re.fullmatch(REPO_ID, repo_id):
        raise HubHTTPError(400, f"Invalid repo name {repo_id!r}")
    url = f"{handler.server.hub.endpoint}/{repo_id}"
    if not handler.server.hub.store.create_repo(repo_id, private=payload.get("visibility") == "private"):
        return _json_answer({"error": "You already created this model repo", "url": url}, 409)
    return _json_answer({"url": url, "name": repo_id, "id": uuid.uuid4().hex[:24]})


def validate_yaml(handler: _Handler, match: re.Match, body: bytes) -> Answer:
    _json_body(body)
    return _json_answer({"errors": [], "warnings": []})


def model_info(handler: _Handler, match: re.Match, body: bytes) -> Answer:
    repo_id = match["repo"]
    repo = _readable_repo(handler, repo_id)
    sha, files = _resolved(repo, unquote(match["rev"] or "main"))
    with_blobs = _query_flag(handler, "blobs")
    siblings = [_sibling(path, entry, with_blobs) for path, entry in sorted(files.items())]
    return _json_answer(
        {
            "_id": uuid.uuid5(uuid.NAMESPACE_URL, repo_id).hex[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "private": repo["private"],
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "createdAt": repo["created_at"],
            "lastModified": repo["commits"][sha]["date"],
        }
    )


def _sibling(path: str, entry: dict, with_blobs: bool) -> dict:
    if not with_blobs:
        return {"rfilename": path}
    sibling = {"rfilename": path, "size": entry["size"], "blobId": entry["oid"]}
    if entry["lfs"]:
        pointer_size = len(lfs_pointer(entry["sha256"], entry["size"]))
        sibling["lfs"] = {"sha256": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size}
    return sibling


def _tree_entry(path: str, entry: dict) -> dict:
    item = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
    if entry["lfs"]:
        pointer_size = len(lfs_pointer(entry["sha256"], entry["size"]))
        item["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size}
    return item


def _folder_entry(path: str, files: dict) -> dict:
    listing = sorted((name, entry["oid"]) for name, entry in files.items() if name.startswith(path + "/"))
    return {
        "type": "directory",
        "oid": hashlib.sha1(json.dumps(listing).encode()).hexdigest(),
        "size": 0,
        "path": path,
    }


def _folders(files: dict) -> set[str]:
    return {str(parent) for name in files for parent in PurePosixPath(name).parents if str(parent) != "."}


def list_tree(handler: _Handler, match: re.Match, body: bytes) -> Answer:
    repo = _readable_repo(handler, match["repo"])
    sha, files = _resolved(repo, unquote(match["rev"]))
    base = unquote(match["path"] or "").strip("/")
    recursive = _query_flag(handler, "recursive")
    folders = _folders(files)
    if base and base not in folders:
        raise HubHTTPError(404, f"{base} does not exist on {sha}", "EntryNotFound")
    prefix = base + "/" if base else ""

    def listed(path: str) -> bool:
        return path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])

    items = [_folder_entry(path, files) for path in sorted(folders) if listed(path)]
    items += [_tree_entry(path, entry) for path, entry in sorted(files.items()) if listed(path)]
    return _json_answer(items)


def paths_info(handler: _Handler, match: re.Match, body: bytes) -> Answer:
    repo = _readable_repo(handler, match["repo"])
    _, files = _resolved(repo, unquote(match["rev"]))
    paths = parse_qs(body.decode()).get("paths", [])
    folders = _folders(files)
    items = [_tree_entry(path, files[path]) for path in paths if path in files]
    items += [_folder_entry(path, files) for path in paths if path in folders]
    return _json_answer(items)


def list_refs(handler: _Handler, match: re.Match, body: bytes) -> Answer:
    repo = _readable_repo(handler, match["repo"])
    branches = [
        {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
        for name, sha in sorted(repo["branches"].items())
    ]
    return _json_answer({"branches": branches, "converts": [], "tags": [], "pullRequests": []})


def create_branch(handler: _Handler, match: re.Match, body: bytes) -> Answer:
    handler.require_user()
    _readable_repo(handler, match["repo"])
    starting_point = _json_body(body).get("startingPoint")
    handler.server.hub.store.create_branch(match["repo"], unquote(match["branch"]), starting_point)
    return _json_answer({})


def _is_lfs(path: str, size: int, sample: bytes, gitattributes: str) -> bool:
    """Whether the Hub stores this file in LFS: large, binary, or matching an LFS rule in .gitattributes."""
    if size > LFS_SIZE_THRESHOLD or b"\0" in sample:
        return True
    for line in gitattributes.splitlines():
        pattern, _, attributes = line.strip().partition(" ")
        if "filter=lfs" in attributes.split():
            target = path if "/" in pattern else PurePosixPath(path).name
            if fnmatch.fnmatchcase(target, pattern.lstrip("/")):
                return True
    return False


def preupload(handler: _Handler, match: re.Match, body: bytes) -> Answer:
    handler.require_user()
    store = handler.server.hub.store
    repo = _readable_repo(handler, match["repo"])
    _, files = _resolved(repo, unquote(match["rev"]))
    gitattributes = store.read_object(files[".gitattributes"]["sha256"]).decode() if ".gitattributes" in files else ""
    answers = []
    for item in _json_body(body).get("files", []):
        lfs = _is_lfs(item["path"], item["size"], base64.b64decode(item["sample"]), gitattributes)
        remote = files.get(item["path"])
        oid = None if remote is None else (remote["sha256"] if remote["lfs"] else remote["oid"])
        answers.append(
            {
                "path": item["path"],
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": False,
                "oid": oid,
            }
        )
    return _json_answer({"files": answers, "commitOid": None})


def lfs_batch(handler: _Handler, match: re.Match, body: bytes) -> Answer:
    handler.require_user()
    hub = handler.server.hub
    _readable_repo(handler, match["repo"])
    payload = _json_body(body)
    if payload.get("operation") != "upload":
        raise HubHTTPError(400, "This test Hub server only answers LFS upload batches")
    objects = []
    for item in payload.get("objects", []):
        answer = {"oid": item["oid"], "size": item["size"], "authenticated": True}
        if not hub.store.has_object(item["oid"]):
            ticket = hub.issue_upload_ticket(item["oid"], item["size"])
            verify = f"{hub.endpoint}/{match['repo']}.git/info/lfs/objects/verify"
            answer["actions"] = {
                "upload": {"href": f"{hub.blob_endpoint}/upload/{ticket}", "expires_in": 900},
                "verify": {"href": verify, "header": {}},
            }
        objects.append(answer)
    return _json_answer(
        {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
        headers={"Content-Type": "application/vnd.git-lfs+json"},
    )


def lfs_verify(handler: _Handler, match: re.Match, body: bytes) -> Answer:
    handler.require_user()
    payload = _json_body(body)
    store = handler.server.hub.store
    if not store.has_object(payload.get("oid", "")) or store.object_size(payload["oid"]) != payload.get("size"):
        raise HubHTTPError(404, f"LFS object {payload.get('oid')} of size {payload.get('size')} was not uploaded")
    return _json_answer({})


def blob_upload(handler: _Handler, match: re.Match, body: bytes) -> Answer:
    hub = handler.server.hub
    sha256, size = hub.redeem_upload_ticket(match["ticket"])
    if len(body) != size or hashlib.sha256(body).hexdigest() != sha256:
        raise HubHTTPError(400, f"Uploaded content does not match sha256 {sha256} and size {size}")
    hub.store.put_object(body)
    hub.lfs_uploads.append(sha256)
    return Answer(200, headers={"ETag": f'"{hashlib.md5(body).hexdigest()}"'})


def blob_download(handler: _Handler, match: re.Match, body: bytes) -> Answer:
    store = handler.server.hub.store
    if not store.has_object(match["sha256"]):
        raise HubHTTPError(404, "No such object")
    return _content_answer(handler, store.read_object(match["sha256"]), {"ETag": f'"{match["sha256"]}"'})


def commit(handler: _Handler, match: re.Match, body: bytes) -> Answer | None:
    handler.require_user()
    hub = handler.server.hub
    if hub.faults.hang_seconds > 0:
        hub.faults.wake.wait(hub.faults.hang_seconds)
        return None
    if "create_pr" in parse_qs(urlsplit(handler.path).query):
        raise HubHTTPError(400, "This test Hub server does not support pull requests")
    _readable_repo(handler, match["repo"])
    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    if not lines or lines[0].get("key") != "header":
        raise HubHTTPError(400, "A commit payload starts with a 'header' line")
    header = lines[0]["value"]
    message = "\n\n".join(part for part in (header.get("summary"), header.get("description")) if part)
    sha = hub.store.commit(match["repo"], unquote(match["rev"]), lines[1:], message, header.get("parentCommit"))
    url = f"{hub.endpoint}/{match['repo']}/commit/{sha}"
    return _json_answer({"success": True, "commitOid": sha, "commitUrl": url, "hookOutput": "", "pullRequestUrl": None})


def resolve_file(handler: _Handler, match: re.Match, body: bytes) -> Answer:
    hub = handler.server.hub
    repo = _readable_repo(handler, match["repo"])
    sha, files = _resolved(repo, unquote(match["rev"]))
    path = unquote(match["path"])
    if path not in files:
        raise HubHTTPError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": sha})
    entry = files[path]
    headers = {"X-Repo-Commit": sha, "ETag": f'"{entry["oid"]}"'}
    if entry["lfs"]:
        headers.update(
            {
                "Location": f"{hub.blob_endpoint}/blobs/{entry['sha256']}",
                "X-Linked-Etag": f'"{entry["sha256"]}"',
                "X-Linked-Size": entry["size"],
            }
        )
        return Answer(302, headers=headers)
    return _content_answer(handler, hub.store.read_object(entry["sha256"]), headers)


def _build_routes() -> list[tuple[str, str, re.Pattern, Callable]]:
    repo, rev, model = rf"(?P<repo>{REPO_ID})", rf"(?P<rev>{SEGMENT})", rf"/api/models/(?P<repo>{REPO_ID})"
    table = [
        ("api", "GET", r"/api/whoami-v2", whoami),
        ("api", "POST", r"/api/repos/create", create_repo),
        ("api", "POST", r"/api/validate-yaml", validate_yaml),
        ("api", "GET", rf"{model}(?:/revision/{rev})?", model_info),
        ("api", "GET", rf"{model}/tree/{rev}(?:/(?P<path>.+))?", list_tree),
        ("api", "POST", rf"{model}/paths-info/{rev}", paths_info),
        ("api", "GET", rf"{model}/refs", list_refs),
        ("api", "POST", rf"{model}/branch/(?P<branch>{SEGMENT})", create_branch),
        ("api", "POST", rf"{model}/preupload/{rev}", preupload),
        ("api", "POST", rf"{model}/commit/{rev}", commit),
        ("api", "POST", rf"/{repo}\.git/info/lfs/objects/batch", lfs_batch),
        ("api", "POST", rf"/{repo}\.git/info/lfs/objects/verify", lfs_verify),
        ("api", "HEAD", rf"/{repo}/resolve/{rev}/(?P<path>.+)", resolve_file),
        ("api", "GET", rf"/{repo}/resolve/{rev}/(?P<path>.+)", resolve_file),
        ("blobs", "PUT", r"/upload/(?P<ticket>[0-9a-f]{32})", blob_upload),
        ("blobs", "GET", r"/blobs/(?P<sha256>[0-9a-f]{64})", blob_download),
        ("blobs", "HEAD", r"/blobs/(?P<sha256>[0-9a-f]{64})", blob_download),
    ]
    return [(origin, method, re.compile(pattern), function) for origin, method, pattern, function in table]
