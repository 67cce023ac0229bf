"""Evaluate a TWIST model (or any HF vision backbone) with the paper's protocols.

python recipes/evaluate.py --model runs/fmnist --dataset fashion-mnist --protocol all
python recipes/evaluate.py --config recipes/configs/eval/dtd.yaml --model user/twist-resnet50
accelerate launch recipes/evaluate.py --config recipes/configs/eval/imagenet-linear.yaml --model ...
"""

import json
import logging
import sys

from accelerate import PartialState

from twist_hf.evaluation import parse_evaluation_arguments, run_evaluation


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        metrics = run_evaluation(*parse_evaluation_arguments(argv))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if PartialState().is_main_process:
        print(json.dumps({f"eval_{key}": value for key, value in metrics.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
