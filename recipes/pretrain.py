"""TWIST pretraining: `python recipes/pretrain.py [--config recipes/configs/<recipe>.yaml] [--key value ...]`.

With no arguments: the embedded default, 2 Ray Train CPU workers on Fashion-MNIST with kNN evaluation.
"""

import logging
import sys
from pathlib import Path

from twist_hf.distributed import end_process_group
from twist_hf.training import launch, parse_pretrain_args
from twist_hf.training.launch import LaunchError, summary_lines

DEFAULT_RECIPE = Path(__file__).parent / "configs" / "fmnist.yaml"


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not any(arg == "--config" or arg.startswith("--config=") for arg in argv):
        argv = ["--config", str(DEFAULT_RECIPE), *argv]
    try:
        args = parse_pretrain_args(argv)
        metrics = launch(args)
    except (LaunchError, ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(args, metrics)))
    end_process_group()  # under torchrun / accelerate launch (--launcher local); Ray Train ends its workers' own
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
