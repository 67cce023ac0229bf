"""The cluster recipes in recipes/cluster/, checked offline: the launcher YAML through Ray's own config
preparation and schema validation, the KubeRay RayJob's entrypoint through our own argument parser, and both
against the resources the training recipe they run asks for; and the probe that checks each node before a run."""

import math
import shlex
import subprocess
import sys
from pathlib import Path

import cloudpickle
import ray
import yaml

from twist_hf.training.arguments import parse_pretrain_args
from twist_hf.training.launch import WORKER_MODULES, missing_modules_probe, worker_resources
from twist_hf.training.storage import is_remote

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "recipes" / "cluster"
PAPER_RECIPE = ROOT / "recipes" / "configs" / "imagenet-resnet50-multicrop.yaml"


def workers_per_node(per_worker: dict, node: dict) -> int:
    """How many workers of `per_worker` resources one node of `node` resources holds."""
    return min(math.floor(node.get(name, 0) / amount) for name, amount in per_worker.items() if amount)


def test_launcher_yaml_passes_rays_validation_and_holds_the_paper_recipe():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((CLUSTER / "aws-cluster.yaml").read_text()))
    validate_config(config)
    assert config["provider"]["type"] == "aws"
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and "--num-cpus=0" in " ".join(config["head_start_ray_commands"])
    (gpu_type,) = [node for node in nodes.values() if node["resources"].get("GPU")]
    assert gpu_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert any("pip install" in command and "twist-hf" in command for command in config["setup_commands"])
    assert any("HF_HOME" in command for command in config["setup_commands"])

    recipe = parse_pretrain_args(["--config", str(PAPER_RECIPE)])
    per_node = workers_per_node(worker_resources(recipe), gpu_type["resources"])
    assert per_node * gpu_type["min_workers"] >= recipe.launch.num_workers


def test_rayjob_runs_pretrain_with_the_paper_recipe_on_s3_and_fits_its_worker_pods(monkeypatch):
    manifest = yaml.safe_load((CLUSTER / "rayjob-imagenet-resnet50.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    command = shlex.split(manifest["spec"]["entrypoint"])
    assert command[:2] == ["python", "recipes/pretrain.py"] and (ROOT / command[1]).is_file()
    monkeypatch.chdir(ROOT)  # the image's working directory is the repository (recipes/cluster/Dockerfile)
    args = parse_pretrain_args(command[2:])
    assert args.model.model_preset == "resnet50" and args.data.num_local_crops == 12
    assert is_remote(args.launch.storage_path) and args.launch.storage_path.startswith("s3://")

    cluster = manifest["spec"]["rayClusterSpec"]
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert cluster["rayVersion"] == ray.__version__ and f"FROM rayproject/ray:{ray.__version__}-" in dockerfile
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = cluster["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    pod = {"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])}
    assert workers_per_node(worker_resources(args), pod) * group["minReplicas"] >= args.launch.num_workers


PROBE_ON_A_NODE = """
import pickle, sys
probe = pickle.loads(sys.stdin.buffer.read())
print(probe(tuple(sys.argv[1:])), "twist_hf" in sys.modules)
"""


def test_the_node_probe_names_what_a_node_lacks_and_imports_none_of_it():
    """Shipped as Ray ships it (cloudpickle) into a fresh Python: it finds modules without importing them."""
    shipped = cloudpickle.dumps(missing_modules_probe())
    command = [sys.executable, "-c", PROBE_ON_A_NODE, *WORKER_MODULES, "no_such_module_on_this_node"]
    done = subprocess.run(command, input=shipped, capture_output=True, timeout=60, check=True)
    assert done.stdout.decode().split() == ["['no_such_module_on_this_node']", "False"]
