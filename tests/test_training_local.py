"""The per-worker loop without Ray, for real on tiny data: one plain process, two torchrun processes,
resuming (exactly, nothing re-initialised), bad images in an imagefolder, and a diverging loss."""

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel

from twist_hf.training import LocalReporter, parse_pretrain_args
from twist_hf.training.checkpoint import load_training_state, read_trainer_state
from twist_hf.training.loop import PretrainingRun
from twist_hf.training.step import cpu_runs_bf16_natively

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
from pretrain import main
from tiny_run import tiny_run_args, torchrun_command

TINY = tiny_run_args(launcher="local", save_strategy="steps", save_steps=4, save_total_limit=10)
# The recipe asks for bf16; a CPU without bf16 instructions trains in fp32 instead.
RECIPE_PRECISION = "bf16" if cpu_runs_bf16_natively() else "fp32"


def pretrain(output_dir: Path, *extra: str) -> dict:
    """recipes/pretrain.py's entry point in this process; returns the run's all_results.json."""
    assert main([*TINY, "--output_dir", str(output_dir), *extra]) == 0
    return json.loads((output_dir / "all_results.json").read_text())


def logged_steps(output_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (output_dir / "log.jsonl").read_text().splitlines()]


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model.safetensors")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """16 steps in one go, checkpoints every 4 steps."""
    output = tmp_path_factory.mktemp("straight") / "run"
    pretrain(output, "--max_steps", "16")
    return output


def test_single_process_run_leaves_a_complete_output_folder(straight_run, capsys):
    results = json.loads((straight_run / "all_results.json").read_text())
    assert results["status"] == "completed" and results["global_step"] == 16
    assert 0.1 < results["knn_top1"] <= 1 and results["skipped_images"] == 0
    assert results["precision"] == RECIPE_PRECISION
    model = AutoModel.from_pretrained(straight_run)
    assert model.config.num_classes == 16
    assert all(torch.isfinite(value).all() for value in model.state_dict().values())
    assert (straight_run / "preprocessor_config.json").is_file()
    card = (straight_run / "README.md").read_text()
    assert "knn20_top1" in card or "knn_top1" in card
    assert f"| precision | {RECIPE_PRECISION} |" in card
    assert logged_steps(straight_run) == [4, 8, 12, 16, 16]
    assert sorted(path.name for path in (straight_run / "checkpoints").iterdir()) == [
        "checkpoint-12",
        "checkpoint-16",
        "checkpoint-4",
        "checkpoint-8",
    ]
    arguments = json.loads((straight_run / "training_args.json").read_text())
    assert arguments["training"]["max_steps"] == 16 and arguments["launch"]["launcher"] == "local"


def test_resuming_from_a_checkpoint_reproduces_the_uninterrupted_run(straight_run, tmp_path):
    """Same recipe, resumed at step 8 into a fresh folder: steps 9-16 again give bit-identical weights."""
    checkpoint = straight_run / "checkpoints" / "checkpoint-8"
    resumed = tmp_path / "resumed"
    results = pretrain(resumed, "--max_steps", "16", "--resume_from_checkpoint", str(checkpoint))
    assert results["global_step"] == 16
    assert logged_steps(resumed) == [12, 16, 16]
    assert json.loads((resumed / "log.jsonl").read_text().splitlines()[0])["resumed_from_step"] == 8
    expected, actual = final_weights(straight_run), final_weights(resumed)
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, f"resumed run differs from the uninterrupted one in {different[:5]}"


def test_resume_latest_restores_every_state_and_continues_the_step_counter(tmp_path):
    """A run stops after 8 steps; `--resume_from_checkpoint latest` with more steps starts from exactly the
    checkpoint's weights, batch-norm statistics and optimiser momentum buffers, and continues from step 8."""
    output = tmp_path / "run"
    pretrain(output, "--max_steps", "8")
    checkpoint = load_training_state(output / "checkpoints" / "checkpoint-8")
    assert checkpoint["global_step"] == 8

    recipe = ["--config", str(ROOT / "recipes" / "configs" / "fmnist.yaml")]  # what main() runs by default
    args = parse_pretrain_args(
        [*recipe, *TINY, "--output_dir", str(output), "--max_steps", "16", "--resume_from_checkpoint", "latest"]
    )
    run = PretrainingRun(args, LocalReporter(str(output), args.training.save_total_limit))
    assert run.start_step == 8
    for name, value in run.student.state_dict().items():
        assert torch.equal(value, checkpoint["model"][name]), name
    momentum = [state["momentum_buffer"] for state in run.optimizer.state_dict()["state"].values()]
    saved = [state["momentum_buffer"] for state in checkpoint["optimizer"]["state"].values()]
    assert len(momentum) == len(saved) > 0 and all(m.abs().sum() > 0 for m in saved)
    assert all(torch.equal(m, s) for m, s in zip(momentum, saved))
    assert torch.equal(torch.get_rng_state(), checkpoint["torch_rng"])

    results = run.run()
    assert results["global_step"] == 16
    assert results["precision"] == RECIPE_PRECISION
    assert logged_steps(output) == [4, 8, 8, 12, 16, 16]
    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [entry.get("resumed_from_step") for entry in log] == [None, None, None, 8, None, None]
    assert read_trainer_state(output / "checkpoints" / "checkpoint-16")["global_step"] == 16


def test_resume_from_a_folder_that_is_not_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert (
        main(
            [
                *TINY,
                "--output_dir",
                str(tmp_path / "run"),
                "--max_steps",
                "4",
                "--resume_from_checkpoint",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "is not a twist-hf checkpoint" in capsys.readouterr().err


RANK_WEIGHTS_SCRIPT = textwrap.dedent("""
    import sys, torch
    from twist_hf.distributed import end_process_group
    from twist_hf.training import LocalReporter, parse_pretrain_args, validate_before_launch
    from twist_hf.training.loop import PretrainingRun

    args = parse_pretrain_args(sys.argv[2:])
    validate_before_launch(args)
    run = PretrainingRun(args, LocalReporter(args.training.output_dir, args.training.save_total_limit))
    results = run.run()
    torch.save({"world": run.accelerator.num_processes, "results": results, "state": run.student.state_dict()},
               f"{sys.argv[1]}/rank{run.accelerator.process_index}.pt")
    end_process_group()  # or Gloo's threads may abort the process at exit
""")


def test_two_processes_without_ray_train_one_model(tmp_path):
    """The same loop under torchrun: both ranks end with identical weights and statistics (backbone batch norms
    are synchronised; a bunch of 64 spans both ranks' 32 images), trained on a global batch of 64."""
    script = tmp_path / "train_and_save_rank_weights.py"
    script.write_text(RANK_WEIGHTS_SCRIPT)
    output = tmp_path / "run"
    flags = [*TINY, "--output_dir", str(output), "--max_steps", "8", "--bunch_size", "64"]
    command = torchrun_command(script, str(tmp_path), *flags)
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert finished.returncode == 0, finished.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert [rank["world"] for rank in ranks] == [2, 2]
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    saved = final_weights(output)
    assert all(torch.equal(saved[name], value) for name, value in ranks[0]["state"].items() if name in saved)
    first_log = json.loads((output / "log.jsonl").read_text().splitlines()[0])
    assert first_log["step"] == 4 and first_log["epoch"] == 0.5  # 512 images / (2 ranks x 32) = 8 steps per epoch
    assert ranks[0]["results"]["knn_top1"] == ranks[1]["results"]["knn_top1"]


# ------------------------------------------------------------------------------------------------
# Bad images: converted (grayscale, RGBA, CMYK) or skipped and counted (corrupt, truncated).
# ------------------------------------------------------------------------------------------------


def encoded(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def messy_image_folder(root: Path, good_per_class: int = 43) -> dict[str, int]:
    """train/ and test/ splits of two classes with every kind of troublesome file; returns the counts.

    86 good + 10 troublesome = 96 training files, six full batches of 16: every file is read once per epoch."""
    rng = np.random.default_rng(0)

    def colour() -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (24, 20, 3), np.uint8))

    for split in ("train", "test"):
        for label in ("boot", "shirt"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(good_per_class):
                colour().save(folder / f"good-{index}.png")
    train = root / "train" / "boot"
    converted = {
        "gray.png": colour().convert("L"),
        "rgba.png": colour().convert("RGBA"),
        "cmyk.jpg": colour().convert("CMYK"),
        "palette.png": colour().convert("P"),
        "gray16.png": colour().convert("L").convert("I;16"),
        "gray-alpha.png": colour().convert("LA"),
    }
    for name, image in converted.items():
        image.save(train / name)
    png = encoded(colour(), "PNG")
    (train / "truncated.png").write_bytes(png[: len(png) // 2])
    (train / "truncated.jpg").write_bytes(encoded(colour(), "JPEG")[:200])
    (train / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 300, np.uint8)))
    (train / "empty.jpg").write_bytes(b"")
    return {"converted": len(converted), "skipped": 4}


@pytest.mark.parametrize("backend", ["per_image", "batched"])
def test_bad_images_are_converted_or_skipped_counted_and_reported(tmp_path, backend, capsys, caplog):
    counts = messy_image_folder(tmp_path / "images")
    output = tmp_path / "run"
    results = pretrain(
        output,
        "--dataset_name",
        "imagefolder",
        "--data_dir",
        str(tmp_path / "images"),
        "--augmentation_backend",
        backend,
        "--max_train_samples",
        "1000",
        "--num_train_epochs",
        "1",
        "--per_device_train_batch_size",
        "16",
        "--bunch_size",
        "16",
        "--save_strategy",
        "no",
    )
    assert results["status"] == "completed"
    assert results["skipped_images"] == counts["skipped"]
    assert "knn_top1" in results
    assert json.loads((output / "log.jsonl").read_text().splitlines()[-1])["skipped_images"] == counts["skipped"]
    assert '"skipped_images": 4' in capsys.readouterr().out
    warnings = [record.getMessage() for record in caplog.records if "undecodable" in record.getMessage()]
    assert warnings and "skipped 4 undecodable images" in warnings[0] and "truncated" in warnings[0]
    assert AutoModel.from_pretrained(output).config.num_classes == 16


# ------------------------------------------------------------------------------------------------
# A diverging loss stops the run with a clear message and keeps the last good checkpoint.
# ------------------------------------------------------------------------------------------------


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    """Steps 1-8 train normally; the self-labeling phase from step 8 on has an absurd lr (1e30, fp32)."""
    output = tmp_path / "run"
    code = main(
        [
            *TINY,
            "--output_dir",
            str(output),
            "--max_steps",
            "16",
            "--self_label_epochs",
            "0.5",
            "--self_label_learning_rate",
            "1e30",
            "--self_label_warmup_epochs",
            "0",
            "--save_steps",
            "8",
        ]
    )
    assert code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(error) == 1
    assert "The loss became nan at step" in error[0] or "The loss became inf at step" in error[0]
    assert "training stopped. The last good checkpoint (step 8) is kept." in error[0]
    assert "Lower learning_rate" in error[0]
    assert [path.name for path in (output / "checkpoints").iterdir()] == ["checkpoint-8"]
    state = load_training_state(output / "checkpoints" / "checkpoint-8")
    assert state["global_step"] == 8
    assert all(torch.isfinite(value).all() for value in state["model"].values() if value.is_floating_point())
    assert AutoModel.from_pretrained(output / "checkpoints" / "checkpoint-8" / "model") is not None
    assert not (output / "model.safetensors").exists() and not (output / "all_results.json").exists()


def test_pretrain_script_exits_non_zero_on_a_diverging_resume(tmp_path, straight_run, capsys):
    """recipes/pretrain.py's main, resumed from a good checkpoint with lr 1e30: exit code 2, one message that names
    the checkpoint it resumed from as the last good one, and that checkpoint untouched."""
    checkpoint = straight_run / "checkpoints" / "checkpoint-8"
    before = (checkpoint / "training_state.pt").read_bytes()
    code = main(
        [
            *TINY,
            "--output_dir",
            str(tmp_path / "run"),
            "--max_steps",
            "16",
            "--learning_rate",
            "1e30",
            "--resume_from_checkpoint",
            str(checkpoint),
        ]
    )
    assert code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(error) == 1 and "error: The loss became" in error[0]
    assert "at step 9; training stopped. The last good checkpoint (step 8) is kept." in error[0]
    assert (checkpoint / "training_state.pt").read_bytes() == before
    assert not (tmp_path / "run" / "checkpoints").exists()
