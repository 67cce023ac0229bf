"""The test Hub server against the real `huggingface_hub` client over real HTTP."""

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import httpx2
import pytest
from hub_server import (
    DEFAULT_GITATTRIBUTES,
    HubHTTPError,
    _byte_range,
    _is_lfs,
    client_env,
    git_blob_oid,
    lfs_pointer,
)
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

pytestmark = pytest.mark.usefixtures("lfs_not_xet")


def _model_folder(path: Path, weights: bytes, config: dict) -> Path:
    (path / "nested").mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(weights)
    (path / "nested" / "notes.txt").write_text("plain text in a subfolder\n")
    return path


def test_git_blob_oid_matches_git_hash_object():
    # `printf 'Hello, World!' | git hash-object --stdin`
    assert git_blob_oid(b"Hello, World!") == "b45ef6fec89518d314f546fd6c3025367b721684"
    # `git hash-object /dev/null`
    assert git_blob_oid(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"


def test_lfs_pointer_is_the_git_lfs_spec_layout():
    pointer = lfs_pointer("ab" * 32, 1234).decode()
    assert pointer == f"version https://git-lfs.github.com/spec/v1\noid sha256:{'ab' * 32}\nsize 1234\n"


def test_lfs_rules_follow_size_binary_content_and_gitattributes():
    assert _is_lfs("model.safetensors", 10, b"{}", DEFAULT_GITATTRIBUTES)
    assert _is_lfs("last-checkpoint/optimizer.pt", 10, b"x", DEFAULT_GITATTRIBUTES)
    assert not _is_lfs("config.json", 10, b"{}", DEFAULT_GITATTRIBUTES)
    assert _is_lfs("big.txt", 10 * 1024 * 1024 + 1, b"text", "")
    assert _is_lfs("blob.txt", 2, b"\0\1", "")
    rooted = "data/*.csv filter=lfs diff=lfs merge=lfs -text\n"
    assert _is_lfs("data/a.csv", 3, b"a,b", rooted)
    assert not _is_lfs("a.csv", 3, b"a,b", rooted)


def test_byte_ranges_are_inclusive_and_clipped_to_the_file():
    assert _byte_range(None, 10) is None
    assert _byte_range("bytes=2-", 10) == (2, 9)
    assert _byte_range("bytes=2-4", 10) == (2, 4)
    assert _byte_range("bytes=5-100", 10) == (5, 9)
    with pytest.raises(HubHTTPError):
        _byte_range("bytes=10-", 10)


def test_round_trip_into_a_fresh_process_with_an_empty_cache(hub, api, tmp_path):
    weights = os.urandom(50_000)
    folder = _model_folder(tmp_path / "local", weights, {"version": 1})
    repo_id = api.create_repo("round-trip").repo_id
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="first")
    assert len(commit.oid) == 40
    script = f"""
import json, pathlib, sys
from huggingface_hub import hf_hub_download, snapshot_download
snapshot = pathlib.Path(snapshot_download({repo_id!r}))
single = hf_hub_download({repo_id!r}, "nested/notes.txt")
files = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
print(json.dumps({{"snapshot": str(snapshot), "files": files, "single": pathlib.Path(single).read_text()}}))
"""
    hf_home = tmp_path / "fresh-hf-home"
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        env=client_env(hub, hf_home),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    snapshot = Path(result["snapshot"])
    assert snapshot.is_relative_to(hf_home) and snapshot.name == commit.oid
    assert result["files"] == [".gitattributes", "config.json", "model.safetensors", "nested/notes.txt"]
    assert (snapshot / "model.safetensors").read_bytes() == weights
    assert json.loads((snapshot / "config.json").read_text()) == {"version": 1}
    assert result["single"] == "plain text in a subfolder\n"
    blob_requests = [request for request in hub.requests if request.origin == "blobs"]
    assert any(request.method == "GET" for request in blob_requests), "LFS files are served by the blob origin"
    assert not any(request.authorized for request in blob_requests), "credentials must not leave the Hub"


def test_second_push_updates_changed_files_and_skips_unchanged_lfs_weights(hub, api, tmp_path):
    weights = os.urandom(20_000)
    folder = _model_folder(tmp_path / "local", weights, {"version": 1})
    repo_id = api.create_repo("two-pushes").repo_id
    first = api.upload_folder(repo_id=repo_id, folder_path=folder)
    weights_oid = hashlib.sha256(weights).hexdigest()
    assert hub.lfs_uploads == [weights_oid]

    (folder / "config.json").write_text(json.dumps({"version": 2}))
    second = api.upload_folder(repo_id=repo_id, folder_path=folder)

    assert hub.lfs_uploads == [weights_oid], "unchanged weights must not be uploaded again"
    assert second.oid != first.oid
    config = hf_hub_download(repo_id, "config.json", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    assert json.loads(Path(config).read_text()) == {"version": 2}
    files = {entry.path: entry for entry in api.list_repo_tree(repo_id, recursive=True) if hasattr(entry, "lfs")}
    assert files["model.safetensors"].lfs.sha256 == weights_oid
    assert files["config.json"].lfs is None
    assert files["config.json"].blob_id == git_blob_oid(json.dumps({"version": 2}).encode())


def test_errors_map_to_the_clients_exceptions(hub, api, tmp_path):
    repo_id = api.create_repo("errors").repo_id
    cache = tmp_path / "cache"
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(repo_id, "missing.txt", endpoint=hub.endpoint, cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", revision="no-such-branch", endpoint=hub.endpoint, cache_dir=cache)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("test-user/no-such-repo", "config.json", endpoint=hub.endpoint, cache_dir=cache)
    with pytest.raises(HfHubHTTPError) as unauthenticated:
        HfApi(endpoint=hub.endpoint, token=False).create_repo("anonymous")
    assert unauthenticated.value.response.status_code == 401
    url = api.create_repo("errors", exist_ok=True)
    assert url.repo_id == repo_id, "a 409 for an existing repo carries its url"


def test_private_repos_need_credentials_to_read(hub, api, tmp_path):
    repo_id = api.create_repo("secret", private=True).repo_id
    assert api.model_info(repo_id).private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=False).model_info(repo_id)


def test_branches_are_created_on_request_and_hold_their_own_commits(hub, api, tmp_path):
    folder = _model_folder(tmp_path / "local", b"w" * 100, {"branch": "dev"})
    repo_id = api.create_repo("branches").repo_id
    api.create_branch(repo_id, branch="dev", exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, revision="dev", path_in_repo="sub")
    assert "sub/config.json" in api.list_repo_files(repo_id, revision="dev")
    assert api.list_repo_files(repo_id) == [".gitattributes"]
    refs = {ref.name: ref.target_commit for ref in api.list_repo_refs(repo_id).branches}
    assert refs["dev"] == api.model_info(repo_id, revision="dev").sha
    api.create_branch(repo_id, branch="dev", exist_ok=True)


def test_range_requests_return_partial_content(hub, api, tmp_path):
    folder = _model_folder(tmp_path / "local", b"w", {"abc": "defghij"})
    repo_id = api.create_repo("ranges").repo_id
    api.upload_folder(repo_id=repo_id, folder_path=folder)
    request = urllib.request.Request(
        f"{hub.endpoint}/{repo_id}/resolve/main/config.json", headers={"Range": "bytes=2-4"}
    )
    with urllib.request.urlopen(request) as response:
        assert response.status == 206
        assert response.read() == json.dumps({"abc": "defghij"}).encode()[2:5]


def test_fault_switches_stop_restart_fail_and_heal(hub, api, tmp_path):
    repo_id = api.create_repo("faults").repo_id
    endpoint = hub.endpoint

    hub.fail_with(503)
    with pytest.raises(HfHubHTTPError) as failed:
        api.model_info(repo_id)
    assert failed.value.response.status_code == 503
    hub.heal()
    assert api.model_info(repo_id).id == repo_id

    hub.stop()
    with pytest.raises(httpx2.ConnectError):
        api.model_info(repo_id)
    hub.restart()
    assert hub.endpoint == endpoint
    assert api.model_info(repo_id).id == repo_id, "the restarted server reloads its state from disk"


def test_hang_blocks_commits_until_healed_and_drops_them(hub, api, tmp_path):
    folder = _model_folder(tmp_path / "local", b"w" * 10, {"hang": True})
    repo_id = api.create_repo("hang").repo_id
    head = api.model_info(repo_id).sha
    outcome = {}

    def commit_in_background():
        try:
            api.upload_folder(repo_id=repo_id, folder_path=folder)
        except Exception as error:  # noqa: BLE001 - the test inspects whatever the client raised
            outcome["error"] = error

    hub.hang(60)
    worker = threading.Thread(target=commit_in_background, daemon=True)
    worker.start()
    worker.join(1.5)
    assert worker.is_alive(), "a hung commit blocks the client"
    started = time.monotonic()
    hub.heal()
    worker.join(10)
    assert not worker.is_alive() and time.monotonic() - started < 5
    assert isinstance(outcome["error"], httpx2.RemoteProtocolError)
    assert api.model_info(repo_id).sha == head, "a dropped commit never lands"
