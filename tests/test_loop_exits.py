"""How the per-worker loop ends, for real on tiny data: epochs that run out of decodable images (one process and two
torchrun processes), data with no decodable image, a final evaluation that fails, a diverged run that still
pushes its last good checkpoint, a per-image run resumed mid-epoch, and a run continued from a saved model."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_server import TEST_TOKEN, TEST_USER, client_env
from huggingface_hub import HfApi
from PIL import Image
from safetensors.torch import load_file
from tiny_run import PRETRAIN_SCRIPT, tiny_run_args, torchrun_command

from twist_hf import TwistConfig, TwistForPreTraining
from twist_hf.training import LocalReporter, parse_pretrain_args
from twist_hf.training.loop import PretrainingRun

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
from pretrain import main

TINY = tiny_run_args(launcher="local", save_strategy="steps", save_steps=4, save_total_limit=10)


def mostly_empty_image_folder(root: Path, good: int = 8, empty: int = 40) -> Path:
    """An imagefolder of `good` small PNGs and `empty` zero-byte ones, over two classes."""
    rng = np.random.default_rng(0)
    for index in range(good + empty):
        folder = root / "train" / ("a" if index % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        if index < good:
            Image.fromarray(rng.integers(0, 256, (24, 20, 3), np.uint8)).save(folder / f"good-{index}.png")
        else:
            (folder / f"empty-{index}.png").write_bytes(b"")
    return root


def image_folder_flags(root: Path, batch: int = 4) -> list[str]:
    """Per-image training on `root` with batches of `batch`, no monitors."""
    return [
        "--dataset_name",
        "imagefolder",
        "--data_dir",
        str(root),
        "--augmentation_backend",
        "per_image",
        "--max_train_samples",
        "1000",
        "--per_device_train_batch_size",
        str(batch),
        "--bunch_size",
        str(batch),
        "--eval_split",
        "",
    ]


def logged(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


def run_cli(output: Path, *extra: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, str(PRETRAIN_SCRIPT), *TINY, "--output_dir", str(output), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


# ------------------------------------------------------------------------------------------------
# Epochs end when their data ends (issue 12, item 2).
# ------------------------------------------------------------------------------------------------


def test_an_epoch_with_few_decodable_batches_ends_and_the_run_reaches_its_last_step(tmp_path):
    """8 good and 40 empty PNGs, batches of 4: 12 batches an epoch, at most 8 with an image. The run trains its
    20 steps over as many epochs as it takes (it used to spin forever at step 2)."""
    root = mostly_empty_image_folder(tmp_path / "images")
    output = tmp_path / "run"
    finished = run_cli(output, *image_folder_flags(root), "--max_steps", "20", "--save_steps", "10", timeout=240)
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = json.loads((output / "all_results.json").read_text())
    assert results["status"] == "completed" and results["global_step"] == 20
    assert results["skipped_images"] >= 40 * 2  # every empty file, read once per epoch, at least two epochs
    epochs = [entry["epoch"] for entry in logged(output) if "loss" in entry]
    assert epochs == sorted(epochs) and epochs[-1] >= 2
    assert (output / "model.safetensors").is_file()


def test_a_dataset_without_a_decodable_image_is_one_clear_error(tmp_path, capsys):
    root = mostly_empty_image_folder(tmp_path / "images", good=0, empty=16)
    code = main([*TINY, "--output_dir", str(tmp_path / "run"), *image_folder_flags(root), "--max_steps", "8"])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1
    assert "no batch with a decodable training image" in errors[0] and "skipped 16 undecodable" in errors[0]


RANK_STEPS_SCRIPT = textwrap.dedent("""
    import json, sys
    from twist_hf.training import LocalReporter, parse_pretrain_args
    from twist_hf.distributed import end_process_group
    from twist_hf.training.loop import PretrainingRun

    args = parse_pretrain_args(sys.argv[2:])
    run = PretrainingRun(args, LocalReporter(args.training.output_dir, args.training.save_total_limit))
    results = run.run()
    rank = run.accelerator.process_index
    with open(f"{sys.argv[1]}/rank{rank}.json", "w") as handle:
        json.dump({"step": run.last_step, "epoch": run.epoch, "skipped": run.views.skipped.count}, handle)
    end_process_group()  # or Gloo's threads may abort the process at exit
""")


def test_two_ranks_with_uneven_decodable_batches_take_the_same_steps(tmp_path):
    """Two torchrun processes, each with 24 of the files (6 batches of 4) and 15 good images split unevenly
    (an odd number cannot split evenly): a batch missing on either rank is skipped on both, so neither waits on a
    collective the other never joins."""
    root = mostly_empty_image_folder(tmp_path / "images", good=15, empty=33)
    script = tmp_path / "train_and_report_steps.py"
    script.write_text(RANK_STEPS_SCRIPT)
    output = tmp_path / "run"
    flags = [*TINY, *image_folder_flags(root), "--output_dir", str(output), "--max_steps", "6", "--save_strategy", "no"]
    command = torchrun_command(script, str(tmp_path), *flags)
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert finished.returncode == 0, finished.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["skipped"] != ranks[1]["skipped"]  # the ranks hold different numbers of good images
    assert ranks[0]["step"] == ranks[1]["step"] == 6 and ranks[0]["epoch"] == ranks[1]["epoch"]
    assert json.loads((output / "all_results.json").read_text())["status"] == "completed"


# ------------------------------------------------------------------------------------------------
# The model and the last checkpoint are on disk before the final evaluation (issue 12, item 4).
# ------------------------------------------------------------------------------------------------


class BrokenMonitor:
    def evaluate(self, model, accelerator) -> dict[str, float]:
        raise RuntimeError("the evaluation data went away")


def test_a_failing_final_evaluation_leaves_the_model_and_the_last_checkpoint(tmp_path):
    output = tmp_path / "run"
    args = parse_pretrain_args([*TINY, "--output_dir", str(output), "--max_steps", "6", "--eval_split", ""])
    run = PretrainingRun(args, LocalReporter(str(output), args.training.save_total_limit))
    run.monitors = [BrokenMonitor()]
    with pytest.raises(RuntimeError, match="evaluation data went away"):
        run.run()
    assert (output / "model.safetensors").is_file() and (output / "config.json").is_file()
    assert (output / "checkpoints" / "checkpoint-6" / "training_state.pt").is_file()
    saved = load_file(output / "model.safetensors")
    assert all(torch.equal(value, run.student.state_dict()[name]) for name, value in saved.items())


# ------------------------------------------------------------------------------------------------
# A diverged run still pushes its last good checkpoint and cleans its staging folders (item 5).
# ------------------------------------------------------------------------------------------------


def test_a_diverged_run_pushes_its_last_good_checkpoint_and_leaves_no_staging(hub, tmp_path):
    """Steps 1-8 train (checkpoint 8 is queued for the Hub); the self-labeling phase from step 8 has lr 1e30."""
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {**client_env(hub, tmp_path / "hf-home"), "TMPDIR": str(temp)}
    finished = run_cli(
        tmp_path / "run",
        "--max_steps",
        "16",
        "--save_steps",
        "8",
        "--self_label_epochs",
        "0.5",
        "--self_label_learning_rate",
        "1e30",
        "--self_label_warmup_epochs",
        "0",
        "--push_to_hub",
        "--hub_model_id",
        f"{TEST_USER}/diverged",
        "--hub_token",
        TEST_TOKEN,
        "--hub_strategy",
        "checkpoint",
        env=env,
    )
    assert finished.returncode == 2, finished.stderr[-3000:]
    assert "The last good checkpoint (step 8) is kept." in finished.stderr
    api = HfApi(endpoint=hub.endpoint, token=TEST_TOKEN)
    assert "last-checkpoint/training_state.pt" in api.list_repo_files(f"{TEST_USER}/diverged")
    state = api.hf_hub_download(f"{TEST_USER}/diverged", "last-checkpoint/trainer_state.json", cache_dir=tmp_path)
    assert json.loads(Path(state).read_text())["global_step"] == 8
    assert [path.name for path in temp.iterdir() if path.name.startswith("twist-")] == []


# ------------------------------------------------------------------------------------------------
# Per-image resume is exact (issue 12, risk); a saved model continues in training mode (issue 13).
# ------------------------------------------------------------------------------------------------


def test_a_per_image_run_resumed_mid_epoch_reproduces_the_uninterrupted_run(tmp_path):
    """Gapped epochs (12 batches, at most 8 with an image): resumed from step 3, steps 4-6 give the same
    weights as the run that never stopped, with two DataLoader workers in the resumed run."""
    root = mostly_empty_image_folder(tmp_path / "images")
    flags = [*image_folder_flags(root), "--max_steps", "6", "--save_steps", "3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*TINY, "--output_dir", str(straight), *flags]) == 0
    checkpoint = straight / "checkpoints" / "checkpoint-3"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step_in_epoch"] >= 3
    resume = ["--resume_from_checkpoint", str(checkpoint), "--dataloader_num_workers", "2"]
    assert main([*TINY, "--output_dir", str(resumed), *flags, *resume]) == 0
    expected, actual = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, f"resumed run differs from the uninterrupted one in {different[:5]}"


def test_continuing_from_a_saved_model_trains_in_training_mode(tmp_path):
    """`from_pretrained` returns a model in eval mode: the run must still update the batch-norm statistics."""
    torch.manual_seed(0)
    saved = tmp_path / "saved"
    TwistForPreTraining(TwistConfig.from_preset("tiny-resnet")).save_pretrained(saved)
    output = tmp_path / "run"
    args = ["--output_dir", str(output), "--max_steps", "2", "--save_strategy", "no", "--eval_split", ""]
    assert main([*TINY, *args, "--model_name_or_path", str(saved)]) == 0
    before, after = load_file(saved / "model.safetensors"), load_file(output / "model.safetensors")
    running = [name for name in before if name.endswith("running_mean")]
    assert running and all(not torch.equal(before[name], after[name]) for name in running)
