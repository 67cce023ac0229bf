"""Names of the files and folders a run writes, in one place: the loop, the launcher, the checkpoint store, the
Hub pusher, the sweep and the evaluation runner all read them from here."""

# In a pretraining run's output folder.
RESULTS_FILE = "all_results.json"
LOG_FILE = "log.jsonl"
ARGS_FILE = "training_args.json"
CHECKPOINTS_DIR = "checkpoints"
RAY_STORAGE_DIR = "ray"

# Inside one checkpoint folder (`checkpoint-<step>`): the model as `save_pretrained` writes it.
CHECKPOINT_PREFIX = "checkpoint-"
MODEL_DIR = "model"

# In a Hub repo: the resumable state pushed with hub_strategy=checkpoint.
HUB_CHECKPOINT_DIR = "last-checkpoint"

# Written by the evaluation runner next to the model.
EVAL_RESULTS_FILE = "eval_results.json"
