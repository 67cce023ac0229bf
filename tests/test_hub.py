"""HubPusher and resolve_resume_checkpoint against the local test Hub, with the real client over real HTTP."""

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hub_server import TEST_TOKEN, TEST_USER, client_env
from huggingface_hub import constants, hf_hub_download
from PIL import Image

from twist_hf import TwistConfig, TwistModel
from twist_hf.hub import CHECKPOINT_FOLDER, HubPusher, resolve_resume_checkpoint, scrub_token
from twist_hf.model_card import write_model_card

REPO = f"{TEST_USER}/pushed"


pytestmark = pytest.mark.usefixtures("lfs_not_xet")


def _pusher(hub, **options) -> HubPusher:
    options = {"hub_token": TEST_TOKEN, "push_timeout": 20.0, **options}
    return HubPusher(REPO, endpoint=hub.endpoint, **options)


def _save_model(folder: Path, version: int, weights: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"version": version}))
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "checkpoint-7").mkdir(exist_ok=True)
    (folder / "checkpoint-7" / "optimizer.pt").write_bytes(b"local checkpoints are not pushed")
    return folder


def _save_training_state(folder: Path, step: int, files: tuple[str, ...] = ("optimizer.pt", "rng_state.pth")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        (folder / name).write_bytes(f"{name} at step {step}".encode())
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def _fingerprint(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _remote_text(hub, tmp_path, name: str, revision: str | None = None) -> str:
    path = hf_hub_download(
        REPO, name, revision=revision, endpoint=hub.endpoint, cache_dir=tmp_path / "dl", force_download=True
    )
    return Path(path).read_text()


def test_every_save_pushes_each_save_and_skips_unchanged_weights(hub, api, tmp_path):
    weights = os.urandom(30_000)
    model = _save_model(tmp_path / "out", 1, weights)
    pusher = _pusher(hub, hub_strategy="every_save")
    assert pusher.on_save(model, step=100)
    assert pusher.wait(30)
    _save_model(model, 2, weights)
    before = _fingerprint(model)
    pusher.on_save(model, step=200)
    summary = pusher.finish(timeout=30)

    assert summary.ok, summary.message
    assert [result.label for result in summary.results] == ["step 100", "step 200"]
    assert all(result.ok for result in summary.results)
    assert json.loads(_remote_text(hub, tmp_path, "config.json")) == {"version": 2}
    assert hub.lfs_uploads == [hashlib.sha256(weights).hexdigest()], "unchanged weights are not re-uploaded"
    assert sorted(api.list_repo_files(REPO)) == [".gitattributes", "config.json", "model.safetensors"]
    assert api.model_info(REPO).sha == summary.results[-1].commit_oid
    assert _fingerprint(model) == before, "the local copy is never touched"


def test_end_strategy_pushes_only_the_final_model(hub, api, tmp_path):
    model = _save_model(tmp_path / "out", 1, b"weights")
    pusher = _pusher(hub, hub_strategy="end")
    assert not pusher.on_save(model, step=1)
    assert not any(request.path == "/api/repos/create" for request in hub.requests)
    summary = pusher.finish(model, timeout=30)
    assert summary.ok and [result.label for result in summary.results] == ["final"]
    assert api.model_info(REPO).sha == summary.results[0].commit_oid
    assert "model.safetensors" in api.list_repo_files(REPO)


def test_checkpoint_strategy_pushes_a_resumable_state_that_resume_downloads(hub, api, tmp_path):
    model = _save_model(tmp_path / "out", 1, b"weights")
    state = _save_training_state(tmp_path / "out" / "checkpoint-10", 10, ("optimizer.pt", "scheduler.pt"))
    pusher = _pusher(hub, hub_strategy="checkpoint")
    pusher.on_save(model, state, step=10)
    assert pusher.wait(30)
    newer = _save_training_state(tmp_path / "out" / "checkpoint-20", 20, ("optimizer.pt",))
    pusher.on_save(model, newer, step=20)
    assert pusher.finish(timeout=30).ok

    remote = sorted(name for name in api.list_repo_files(REPO) if name.startswith(CHECKPOINT_FOLDER))
    expected = ["optimizer.pt", "trainer_state.json"]
    assert remote == [f"{CHECKPOINT_FOLDER}/{name}" for name in expected], "stale state files are deleted"
    resumed = resolve_resume_checkpoint(REPO, tmp_path / "cache", token=TEST_TOKEN, endpoint=hub.endpoint)
    assert resumed.name == CHECKPOINT_FOLDER
    assert _fingerprint(resumed) == _fingerprint(newer)
    assert not (resumed.parent / "model.safetensors").exists(), "only last-checkpoint/ is downloaded"


def test_resume_from_a_branch_a_local_folder_and_clear_errors(hub, api, tmp_path):
    model = _save_model(tmp_path / "out", 1, b"weights")
    state = _save_training_state(tmp_path / "state", 5)
    pusher = _pusher(hub, hub_strategy="checkpoint", hub_revision="run-1")
    pusher.on_save(model, state, step=5)
    assert pusher.finish(timeout=30).ok
    assert not any(name.startswith(CHECKPOINT_FOLDER) for name in api.list_repo_files(REPO))

    resumed = resolve_resume_checkpoint(f"{REPO}@run-1", tmp_path / "cache", endpoint=hub.endpoint)
    assert _fingerprint(resumed) == _fingerprint(state)
    assert resolve_resume_checkpoint(str(state), tmp_path / "cache") == state
    with pytest.raises(FileNotFoundError, match="hub_strategy='checkpoint'"):
        resolve_resume_checkpoint(REPO, tmp_path / "cache", endpoint=hub.endpoint)
    with pytest.raises(FileNotFoundError, match="no Hub repo test-user/never-pushed at revision main"):
        resolve_resume_checkpoint("test-user/never-pushed", tmp_path / "cache", endpoint=hub.endpoint)
    with pytest.raises(FileNotFoundError, match="at revision no-such-branch"):
        resolve_resume_checkpoint(f"{REPO}@no-such-branch", tmp_path / "cache", endpoint=hub.endpoint)
    with pytest.raises(FileNotFoundError, match="not a Hub repo id"):
        resolve_resume_checkpoint(str(tmp_path / "no" / "such" / "folder"), tmp_path / "cache")


def test_push_to_a_stopped_server_fails_fast_and_a_later_push_succeeds(hub, api, tmp_path):
    model = _save_model(tmp_path / "out", 1, b"weights")
    before = _fingerprint(model)
    pusher = _pusher(hub, push_timeout=10)
    hub.stop()
    pusher.on_save(model, step=1)
    assert pusher.wait(15)
    failed = pusher.results[-1]
    assert not failed.ok and "ConnectError" in failed.error and failed.seconds < 10
    assert _fingerprint(model) == before

    hub.restart()
    _save_model(model, 2, b"weights")
    pusher.on_save(model, step=2)
    summary = pusher.finish(timeout=30)
    assert summary.ok, summary.message
    assert json.loads(_remote_text(hub, tmp_path, "config.json")) == {"version": 2}


def test_push_during_server_errors_reports_them_and_retries_at_the_next_save(hub, api, tmp_path):
    model = _save_model(tmp_path / "out", 1, b"weights")
    pusher = _pusher(hub, push_timeout=10)
    hub.fail_with(500)
    pusher.on_save(model, step=1)
    assert pusher.wait(15)
    assert not pusher.results[-1].ok and "500" in pusher.results[-1].error

    hub.heal()
    pusher.on_save(model, step=2)
    summary = pusher.finish(timeout=30)
    assert summary.ok and [result.ok for result in summary.results] == [False, True]
    assert "model.safetensors" in api.list_repo_files(REPO)


def test_push_to_a_hung_server_gives_up_at_the_deadline(hub, api, tmp_path):
    model = _save_model(tmp_path / "out", 1, b"weights")
    before = _fingerprint(model)
    pusher = _pusher(hub, push_timeout=2)
    hub.hang(120)
    started = time.monotonic()
    pusher.on_save(model, step=1)
    assert pusher.wait(10)
    assert time.monotonic() - started < 5
    assert not pusher.results[-1].ok and "deadline" in pusher.results[-1].error
    assert _fingerprint(model) == before

    hub.heal()
    pusher.on_save(model, step=2)
    summary = pusher.finish(timeout=30)
    assert summary.ok, summary.message
    assert api.model_info(REPO).sha == summary.results[-1].commit_oid


def test_finish_reports_a_push_still_running_when_its_wait_runs_out(hub, tmp_path):
    model = _save_model(tmp_path / "out", 1, b"weights")
    pusher = _pusher(hub, push_timeout=30)
    hub.hang(120)
    summary = pusher.finish(model, timeout=1)
    assert not summary.ok and "still running" in summary.message
    hub.heal()


def test_tokens_never_appear_in_logs_results_or_reprs(hub, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    model = _save_model(tmp_path / "out", 1, b"weights")
    pusher = _pusher(hub, push_timeout=10)
    hub.fail_with(500)
    pusher.on_save(model, step=1)
    assert pusher.wait(15)
    hub.heal()
    summary = pusher.finish(model, timeout=30)
    assert summary.ok
    shown = caplog.text + repr(pusher) + str(summary) + "".join(str(result) for result in summary.results)
    assert "500" in caplog.text and "pushed" in caplog.text
    assert TEST_TOKEN not in shown


def test_scrub_token_masks_the_token_and_token_shaped_strings():
    secret = "hf_" + "a" * 34
    text = f"401 for Bearer {secret} (other token hf_{'B1' * 17}, short id hf_abc)"
    assert scrub_token(text, secret) == "401 for Bearer <hf-token> (other token <hf-token>, short id hf_abc)"
    assert scrub_token("reason hf_test_token", "hf_test_token") == "reason <hf-token>"


def test_the_token_comes_from_the_environment_by_default(hub, api, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    pusher = HubPusher(REPO, endpoint=hub.endpoint, push_timeout=20)
    assert pusher.finish(_save_model(tmp_path / "out", 1, b"w"), timeout=30).ok


def test_bad_options_fail_early_with_clear_messages(hub, tmp_path, monkeypatch):
    choices = "'end', 'every_save', 'checkpoint'"
    with pytest.raises(ValueError, match=f"hub_strategy must be one of {choices}, got 'sometimes'"):
        _pusher(hub, hub_strategy="sometimes")
    with pytest.raises(ValueError, match="not a Hub repo id"):
        HubPusher("a/b/c", hub_token=TEST_TOKEN)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "empty-hf-home" / "token"))
    with pytest.raises(ValueError, match="needs a Hugging Face token and none was found"):
        HubPusher(REPO, endpoint=hub.endpoint)
    pusher = _pusher(hub, hub_strategy="checkpoint")
    with pytest.raises(ValueError, match="pass checkpoint_dir"):
        pusher.on_save(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        pusher.on_save(tmp_path / "missing", tmp_path)
    pusher.finish()
    with pytest.raises(RuntimeError, match="has finished"):
        pusher.on_save(tmp_path, tmp_path)


LOAD_SCRIPT = """
import sys
import torch

mode, repo_id, pixels, out = sys.argv[1:]
if mode == "remote-code":
    sys.modules["twist_hf"] = None  # loading must not need the package
else:
    import twist_hf  # noqa: F401
from transformers import AutoModel

model = AutoModel.from_pretrained(repo_id, trust_remote_code=mode == "remote-code").eval()
with torch.no_grad():
    outputs = model(pixel_values=torch.load(pixels))
torch.save({"module": type(model).__module__, "logits": outputs.logits, "features": outputs.pooler_output}, out)
"""


def _run_python(code: str, *args: str, env: dict, cwd: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        check=False,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]


def _python_blocks(markdown: str) -> str:
    blocks = markdown.split("```python\n")[1:]
    return "\n".join(block.split("```")[0] for block in blocks)


@pytest.mark.slow
def test_a_pushed_tiny_twist_model_loads_in_fresh_processes_with_and_without_the_package(hub, tmp_path):
    torch.manual_seed(0)
    model = TwistModel(TwistConfig.from_preset("tiny-resnet")).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    card = write_model_card(
        folder,
        model_id=REPO,
        config_summary={"preset": "tiny-resnet"},
        training_summary={"epochs": 0},
        eval_results=[],
    )
    pixels = torch.randn(2, 3, 16, 16)
    torch.save(pixels, tmp_path / "pixels.pt")
    with torch.no_grad():
        expected = model(pixel_values=pixels)
    assert _pusher(hub, hub_strategy="end").finish(folder, timeout=60).ok

    for mode, module_prefix in (("package", "twist_hf."), ("remote-code", "transformers_modules.")):
        out = tmp_path / f"{mode}.pt"
        env = client_env(hub, tmp_path / f"hf-home-{mode}")
        _run_python(LOAD_SCRIPT, mode, REPO, str(tmp_path / "pixels.pt"), str(out), env=env, cwd=tmp_path)
        loaded = torch.load(out)
        assert loaded["module"].startswith(module_prefix)
        torch.testing.assert_close(loaded["logits"], expected.logits)
        torch.testing.assert_close(loaded["features"], expected.pooler_output)

    Image.new("RGB", (28, 28), "gray").save(tmp_path / "image.png")
    snippets = _python_blocks(card.read_text())
    _run_python(snippets, env=client_env(hub, tmp_path / "hf-home-card"), cwd=tmp_path)
