"""TWIST hyperparameter sweep: `python tune/sweep.py [--config tune/configs/<space>.yaml] [--key value ...]`.

With no arguments: the embedded default, tau/lam1/lam2 on a Fashion-MNIST subset (4 trials, ASHA, 2 at once).
"""

import logging
import sys
from pathlib import Path

from twist_hf.training.launch import LaunchError
from twist_hf.tune import parse_sweep_args, run_sweep

DEFAULT_SWEEP = Path(__file__).parent / "configs" / "default.yaml"


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not any(arg == "--config" or arg.startswith("--config=") for arg in argv):
        argv = ["--config", str(DEFAULT_SWEEP), *argv]
    try:
        setup = parse_sweep_args(argv)
        outcome = run_sweep(setup)
    except (LaunchError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output = Path(setup.base.training.output_dir).resolve()
    print(f"Trials: {outcome.table_path} (and trials.md)")
    if outcome.best_config is not None:
        print(f"Best config: {outcome.best_config}  ->  python recipes/pretrain.py --config {outcome.best_config}")
        print(f"Best trial: {outcome.best}")
    if outcome.unfinished:
        print(
            f"{outcome.unfinished} trial(s) unfinished; continue with: python tune/sweep.py {' '.join(argv)} "
            f"--resume (outputs in {output})"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
