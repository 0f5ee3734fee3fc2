"""cluster.yaml: valid against the JSON schema shipped inside the ray package and Ray's own checks."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).parent.parent / "cluster.yaml"


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_valid_against_rays_shipped_schema(config):
    schema_path = Path(os.path.dirname(ray.__file__)) / "autoscaler" / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))


def test_rays_own_config_validation(config):
    # what `ray up` does before it talks to AWS: fill in the provider's defaults, then validate
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["gpu_worker"]["max_workers"] == 8


def test_cluster_shape(config):
    types = config["available_node_types"]
    assert config["provider"]["type"] == "aws"
    # CPU-only head that runs no tasks
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and not head["node_config"]["InstanceType"].startswith(("g", "p"))
    # an autoscaling GPU worker type from zero, and a CPU worker type
    assert types["gpu_worker"]["min_workers"] == 0 and types["gpu_worker"]["max_workers"] > 0
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert types["cpu_worker"]["min_workers"] == 0
    assert types["cpu_worker"]["node_config"]["InstanceType"].startswith(("c", "m"))
    # Docker with shared memory sized for the object store
    docker = config["docker"]
    assert docker["image"].startswith("rayproject/ray:") and "gpu" in docker["image"]
    assert any(o.startswith("--shm-size=") for o in docker["head_run_options"])
    for t in ("gpu_worker", "cpu_worker"):
        assert any(o.startswith("--shm-size=") for o in types[t]["docker"]["worker_run_options"])
    # Docker tags follow the installed Ray (drivers and cluster must run the same version)
    for image in (docker["image"], docker["head_image"], types["cpu_worker"]["docker"]["worker_image"]):
        assert image.split(":")[1].startswith(ray.__version__ + "-")
    # this project installed on every node; S3 through instance profiles, no keys anywhere
    assert "." in config["file_mounts"].values()
    assert any("pip install" in c and "/home/ray/cdi-ray" in c for c in config["setup_commands"])
    for t in types.values():
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    text = CLUSTER_YAML.read_text()
    assert "aws_secret_access_key" not in text.lower() and "AWS_SECRET" not in text
