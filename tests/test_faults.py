"""Faults and bad input, tried for real (issue 12): a run never deletes what it did not write, bad options fail
in the driver, a crash mid-save leaves the last good checkpoint usable, image paths inside a dataset stay
inside the user's data, and secrets stay out of what Ray displays."""

import http.server
import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from local_cluster import BUCKET
from PIL import Image

from twist_hf import TwistConfig, TwistForPreTraining
from twist_hf.data import ImageLimits, SkippedImageCounter, decode_image
from twist_hf.training.checkpoint import (
    LocalCheckpoints,
    checkpoint_problem,
    find_latest_checkpoint,
    restorable_cuda_rng_states,
    restore_training_state,
)
from twist_hf.training.storage import checkpoint_folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
from pretrain import main
from tiny_run import tiny_run_args

TINY = tiny_run_args(launcher="local", save_strategy="steps", save_steps=4, save_total_limit=10)
# Runs that only need checkpoints: fewer images, no kNN evaluation.
SMALL = tiny_run_args(
    launcher="local", save_strategy="steps", save_steps=4, save_total_limit=10, max_train_samples=128, eval_split=""
)


def errors_of(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]


# ------------------------------------------------------------------------------------------------
# Item 3: every numeric option is checked in the driver, with its name and allowed range.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("save_total_limit", "0", "--save_total_limit must be at least 1, got 0"),
        ("save_total_limit", "-2", "--save_total_limit must be at least 1, got -2"),
        ("save_steps", "0", "--save_steps must be at least 1, got 0"),
        ("logging_steps", "0", "--logging_steps must be at least 1, got 0"),
        ("knn_k", "0", "--knn_k must be at least 1, got 0"),
        ("learning_rate", "0", "--learning_rate must be greater than 0, got 0.0"),
        ("momentum", "1.5", "--momentum must be in [0, 1), got 1.5"),
        ("warmup_ratio", "2", "--warmup_ratio must be in [0, 1], got 2.0"),
        ("knn_temperature", "-1", "--knn_temperature must be greater than 0, got -1.0"),
        ("hub_push_timeout", "0", "--hub_push_timeout must be greater than 0, got 0.0"),
        ("max_train_samples", "0", "--max_train_samples must be at least 1, got 0"),
        ("dataloader_num_workers", "-1", "--dataloader_num_workers must be at least 0, got -1"),
        ("max_image_pixels", "0", "--max_image_pixels must be at least 1, got 0"),
        ("max_failures", "-5", "--max_failures must be at least -1, got -5"),
    ],
)
def test_out_of_range_option_fails_in_the_driver_naming_option_and_range(tmp_path, capsys, option, value, message):
    output = tmp_path / "out"
    started = time.perf_counter()
    assert main([*TINY, "--output_dir", str(output), f"--{option}", value]) == 2
    assert time.perf_counter() - started < 5
    assert errors_of(capsys) == [f"error: {message}."]
    assert not output.exists()


# ------------------------------------------------------------------------------------------------
# Items 1 and 12: --overwrite_output_dir replaces only the run's own outputs; the model is readable by others.
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_overwrite_output_dir_keeps_foreign_files_and_replaces_the_runs_own(tmp_path):
    output = tmp_path / "run"
    (output / "checkpoints" / "checkpoint-999").mkdir(parents=True)
    (output / "checkpoints" / "checkpoint-999" / "trainer_state.json").write_text('{"global_step": 999}')
    (output / "log.jsonl").write_text('{"step": 999}\n')
    (output / "thesis.tex").write_text("\\chapter{Years of work}")
    (output / "notes").mkdir()
    (output / "notes" / "ideas.md").write_text("keep me")

    assert main([*SMALL, "--output_dir", str(output), "--max_steps", "4", "--overwrite_output_dir"]) == 0

    assert (output / "thesis.tex").read_text() == "\\chapter{Years of work}"
    assert (output / "notes" / "ideas.md").read_text() == "keep me"
    assert [path.name for path in (output / "checkpoints").iterdir()] == ["checkpoint-4"]
    assert [json.loads(line)["step"] for line in (output / "log.jsonl").read_text().splitlines()] == [4, 4]
    umask_mode = 0o666 & ~current_umask()
    for weights in (
        output / "model.safetensors",
        output / "checkpoints" / "checkpoint-4" / "model" / "model.safetensors",
    ):
        assert weights.stat().st_mode & 0o777 == umask_mode, oct(weights.stat().st_mode)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_saved_weights_have_the_mode_of_the_other_outputs(tmp_path):
    old = os.umask(0o027)
    try:
        TwistForPreTraining(TwistConfig.from_preset("tiny-resnet")).save_pretrained(tmp_path / "model")
    finally:
        os.umask(old)
    assert (tmp_path / "model" / "model.safetensors").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "model" / "config.json").stat().st_mode & 0o777 == 0o640


# ------------------------------------------------------------------------------------------------
# Item 6: checkpoints are atomic; `latest` skips (and names) unreadable ones.
# ------------------------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.slow
def test_resume_skips_a_truncated_newest_checkpoint_and_an_explicit_one_is_a_clear_error(tmp_path, capsys, caplog):
    output = tmp_path / "run"
    assert main([*SMALL, "--output_dir", str(output), "--max_steps", "8"]) == 0
    newest = output / "checkpoints" / "checkpoint-8"
    truncate(newest / "training_state.pt")
    assert checkpoint_problem(newest).startswith("training_state.pt truncated")
    capsys.readouterr()

    assert (
        main([*SMALL, "--output_dir", str(output), "--max_steps", "12", "--resume_from_checkpoint", str(newest)]) == 2
    )
    (error,) = errors_of(capsys)
    assert f"Cannot resume from {newest}: training_state.pt truncated" in error and "latest" in error

    assert main([*SMALL, "--output_dir", str(output), "--max_steps", "12", "--resume_from_checkpoint", "latest"]) == 0
    assert f"Skipping checkpoint {newest}: training_state.pt truncated" in caplog.text
    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [entry.get("resumed_from_step") for entry in log if entry.get("resumed_from_step")] == [4]


def test_truncated_weights_are_found_and_pruning_ignores_foreign_folder_names(tmp_path):
    model = TwistForPreTraining(TwistConfig.from_preset("tiny-resnet"))
    checkpoints = LocalCheckpoints(tmp_path / "run", limit=1)
    (checkpoints.root / "checkpoint-old").mkdir(parents=True)
    (checkpoints.root / "checkpoint-old" / "notes.txt").write_text("mine")
    for step in (1, 2):
        save_tiny_checkpoint(tmp_path / f"saved-{step}", model, step=step)
        checkpoints.keep(tmp_path / f"saved-{step}", step)
    assert sorted(path.name for path in checkpoints.root.iterdir()) == ["checkpoint-2", "checkpoint-old"]
    assert checkpoint_problem(checkpoints.root / "checkpoint-2") is None
    truncate(checkpoints.root / "checkpoint-2" / "model" / "model.safetensors")
    assert checkpoint_problem(checkpoints.root / "checkpoint-2") == "model/model.safetensors truncated"
    assert find_latest_checkpoint(tmp_path / "run") is None
    with pytest.raises(ValueError, match="save_total_limit must be at least 1, got 0"):
        LocalCheckpoints(tmp_path / "run", limit=0)


def test_a_checkpoint_ray_restores_from_a_local_folder_is_read_in_place_not_copied(tmp_path):
    """Ray's `to_directory()` would copy it into the temporary directory and leave it there at every restart.
    (A checkpoint in object storage is downloaded: the next test.)"""
    from ray.train import Checkpoint

    folder = tmp_path / "checkpoint-000000004"
    folder.mkdir()
    with checkpoint_folder(Checkpoint.from_directory(str(folder))) as readable:
        assert readable == folder
    with checkpoint_folder(None) as readable:
        assert readable is None


def test_a_checkpoint_in_object_storage_is_read_from_a_download_that_is_deleted_and_named_in_the_log(s3, caplog):
    """A worker that resumes from S3 (moto's server, real HTTP) says which object it read, not only the temporary
    folder, and leaves no copy behind."""
    from ray.train import Checkpoint

    s3.client().put_object(Bucket=BUCKET, Key="runs/checkpoint-000000004/trainer_state.json", Body=b"{}")
    with caplog.at_level(logging.INFO, logger="twist_hf.training.storage"):
        with checkpoint_folder(Checkpoint(f"s3://{BUCKET}/runs/checkpoint-000000004")) as readable:
            assert (readable / "trainer_state.json").read_text() == "{}"
    assert not readable.exists()
    assert f"s3://{BUCKET}/runs/checkpoint-000000004" in caplog.text


def save_tiny_checkpoint(folder: Path, model, step: int) -> None:
    from twist_hf.training.checkpoint import save_checkpoint

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(
        folder, model=model, optimizer=optimizer, teacher=None, scaler=None, global_step=step, epoch=0,
        step_in_epoch=step, metrics={},
    )  # fmt: skip


SAVE_FOREVER = textwrap.dedent("""
    import sys, tempfile
    from pathlib import Path
    import torch
    from twist_hf import TwistConfig, TwistForPreTraining
    from twist_hf.training.checkpoint import LocalCheckpoints, save_checkpoint

    model = TwistForPreTraining(TwistConfig.from_preset("tiny-resnet"))
    teacher = torch.nn.Linear(2048, 4096)  # 32 MB of state: a save takes long enough to be interrupted
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoints = LocalCheckpoints(sys.argv[1], limit=2)
    for step in range(1, 1000):
        folder = Path(tempfile.mkdtemp())
        save_checkpoint(folder, model=model, optimizer=optimizer, teacher=teacher, scaler=None,
                        global_step=step, epoch=0, step_in_epoch=step, metrics={})
        checkpoints.keep(folder, step)
        print(step, flush=True)
""")


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_only_complete_checkpoints(tmp_path):
    """A real process saving in a loop is killed the moment its next save shows up in checkpoints/."""
    output = tmp_path / "run"
    root = output / "checkpoints"
    env = {**os.environ, "TMPDIR": "/dev/shm" if Path("/dev/shm").is_dir() else str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-c", SAVE_FOREVER, str(output)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert process.stdout.readline().strip() == "1"  # checkpoint-1 is complete
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and set(os.listdir(root)) == {"checkpoint-1"}:
            time.sleep(0.0005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    published = [path for path in root.iterdir() if not path.name.startswith(".")]
    assert published and all(checkpoint_problem(path) is None for path in published), [
        (path.name, checkpoint_problem(path)) for path in published
    ]
    latest = find_latest_checkpoint(output)
    assert latest is not None and checkpoint_problem(latest) is None


# ------------------------------------------------------------------------------------------------
# Risk: resuming on a machine with fewer GPUs than the one that saved.
# ------------------------------------------------------------------------------------------------


def test_rng_state_of_more_gpus_than_this_machine_has_restores():
    saved = [torch.full((16,), index, dtype=torch.uint8) for index in range(8)]
    assert restorable_cuda_rng_states(saved, 2) == saved[:2]
    assert restorable_cuda_rng_states(saved, 0) == [] and restorable_cuda_rng_states(None, 4) == []
    model = TwistForPreTraining(TwistConfig.from_preset("tiny-resnet"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": saved,
    }
    restore_training_state(state, model=model, optimizer=optimizer, teacher=None, scaler=None)


# ------------------------------------------------------------------------------------------------
# Items 8 and 9: image paths inside a dataset, sizes and pixel counts.
# ------------------------------------------------------------------------------------------------


class RecordingHandler(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 - the http.server API
        RecordingHandler.requests.append(self.path)
        body = png_bytes(8)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def image_server():
    RecordingHandler.requests = []
    server = http.server.HTTPServer(("127.0.0.1", 0), RecordingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", RecordingHandler.requests
    server.shutdown()


def png_bytes(size: int, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def pixel_bomb_png(side: int = 13000) -> bytes:
    """A side x side grayscale PNG of zeros: ~170 MB of pixels in ~170 kB, compressed row by row."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    compressor = zlib.compressobj(9)
    row = bytes(side + 1)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def test_image_limits_refuse_system_files_devices_urls_and_oversized_images(tmp_path, image_server):
    url, requests = image_server
    inside = tmp_path / "data" / "ok.png"
    inside.parent.mkdir()
    inside.write_bytes(png_bytes(8))
    limits = ImageLimits(roots=(str(tmp_path / "data"),), max_bytes=1_000_000, max_pixels=100_000)
    counter = SkippedImageCounter()
    values = {
        "inside": {"bytes": None, "path": str(inside)},
        "etc": {"bytes": None, "path": "/etc/hostname"},
        "zero": "/dev/zero",
        "url": {"bytes": None, "path": f"{url}/image.png"},
        "big": png_bytes(600),  # 1.1 MB of noise
        "bomb": pixel_bomb_png(),
    }
    decoded = {name: decode_image(value, counter, name, limits=limits) for name, value in values.items()}
    assert decoded["inside"] is not None and decoded["inside"].size == (8, 8)
    assert all(image is None for name, image in decoded.items() if name != "inside")
    assert counter.examples == [
        "etc: outside data roots",
        "zero: outside data roots",
        "url: remote URL not allowed",
        "big: over byte limit",
        "bomb: over pixel limit",
    ]
    assert requests == []
    unrestricted = ImageLimits(max_bytes=10_000)
    assert decode_image("/dev/zero", counter, "zero", limits=unrestricted) is None
    assert counter.examples[-1] == "zero: not a regular file"
    assert decode_image(f"{url}/opt-in.png", limits=ImageLimits(allow_remote=True)).size == (8, 8)
    assert requests and set(requests) == {"/opt-in.png"}  # fsspec may ask twice (size, then bytes)


def write_parquet_with_image_paths(path: Path, images: list) -> None:
    """A parquet dataset whose image column holds {bytes, path} values as given (datasets would fetch paths)."""
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=["a", "b"]))
    metadata = {"huggingface": json.dumps({"info": {"features": features.to_dict()}})}
    table = pa.table({"image": images, "label": [index % 2 for index in range(len(images))]})
    pq.write_table(table.replace_schema_metadata(metadata), path)


@pytest.mark.slow
def test_training_skips_and_counts_foreign_paths_urls_and_pixel_bombs_fetching_nothing(tmp_path, image_server):
    url, requests = image_server
    data = tmp_path / "data"
    data.mkdir()
    good = [{"bytes": png_bytes(16, seed), "path": None} for seed in range(32)]
    bad = [
        {"bytes": None, "path": "/etc/hostname"},
        {"bytes": None, "path": "/dev/zero"},
        {"bytes": None, "path": f"{url}/internal.png"},
        {"bytes": pixel_bomb_png(), "path": None},
    ]
    write_parquet_with_image_paths(data / "train.parquet", good + bad)
    output = tmp_path / "run"
    options = ["--dataset_name", "parquet", "--data_files", str(data / "train.parquet"), "--eval_split", ""]
    options += ["--model_preset", "tiny-resnet", "--bunch_size", "8", "--per_device_train_batch_size", "8"]
    assert main([*TINY, *options, "--output_dir", str(output), "--max_steps", "2"]) == 0
    results = json.loads((output / "all_results.json").read_text())
    assert results["skipped_images"] == 4
    assert requests == []


# ------------------------------------------------------------------------------------------------
# Risks: the Hub token and Ray; the Hub client's HTTP timeout.
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_hub_token_stays_out_of_rays_runtime_env_and_reaches_workers_through_the_object_store(tmp_path, monkeypatch):
    import ray

    from twist_hf.training import parse_pretrain_args
    from twist_hf.training.launch import start_ray, train_loop_config

    secret = "hf_" + "S3cret" * 6
    monkeypatch.delenv("HF_TOKEN", raising=False)
    options = ["--launcher", "ray", "--ray_dashboard", "false", "--num_workers", "1", "--hub_token", secret]
    args = parse_pretrain_args([*TINY, *options, "--output_dir", str(tmp_path / "run")])
    assert start_ray(args)
    try:
        assert secret not in str(ray.get_runtime_context().runtime_env)
        config = train_loop_config(args)
        assert secret not in str(config)

        @ray.remote(num_cpus=0)
        def what_a_worker_sees(config: dict) -> tuple:
            return ray.get(config["hub_token"]), os.environ.get("HF_TOKEN")

        assert ray.get(what_a_worker_sees.remote(config)) == (secret, None)
    finally:
        ray.shutdown()


def test_hub_http_timeout_is_restored_when_the_pusher_finishes():
    from huggingface_hub.utils import get_session

    from twist_hf.hub import HubPusher

    before = get_session().timeout
    pusher = HubPusher("user/model", hub_token="hf_" + "x" * 30, http_timeout=7.0, push_timeout=20.0)
    assert get_session().timeout.read == 7.0
    pusher.finish()
    assert get_session().timeout == before
