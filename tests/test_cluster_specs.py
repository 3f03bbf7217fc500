"""Cluster specs: the `ray up` YAML against the schema shipped in the ray package, and the KubeRay
manifests against the shape of the RayCluster / RayJob / RayService APIs (apiVersion ray.io/v1)."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
REPO = CLUSTER.parent
KUBERAY = sorted(p for p in CLUSTER.glob("*.yaml") if yaml.safe_load(p.read_text()).get("apiVersion") == "ray.io/v1")


def check_cluster_spec(spec: dict, where: str) -> None:
    """The fields KubeRay needs in a RayCluster spec (also embedded in RayJob and RayService)."""
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    containers = head["template"]["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers), where
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no worker group"
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names), f"{where}: duplicate groupName"
    for g in groups:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], f"{where}: {g['groupName']}"
        assert isinstance(g["rayStartParams"], dict)
        for c in g["template"]["spec"]["containers"]:
            assert c["name"] and c["image"]
            limits = c.get("resources", {}).get("limits", {})
            if "nvidia.com/gpu" in limits:  # GPU pods must request what they limit
                assert c["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]


def check_entrypoint(entrypoint: str, where: str) -> None:
    """A job entrypoint runs a script of this repo with a config that loads into the stage's config class."""
    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and (REPO / argv[1]).is_file(), f"{where}: {argv[1]} is not in the repo"
    if "--config" in argv:
        config = REPO / argv[argv.index("--config") + 1]
        assert config.is_file(), f"{where}: {config} missing"
        from r2f_ray.config import load_config

        stage = Path(argv[1]).stem
        config_class = _config_classes().get(stage)
        if config_class is not None:
            load_config(config_class, config)


def _config_classes() -> dict:
    from r2f_ray.eval.harness import EvalConfig
    from r2f_ray.pipeline.pairs import PairsConfig
    from r2f_ray.pipeline.train import TrainConfig

    return {"generate_pairs": PairsConfig, "train_decoders": TrainConfig, "evaluate": EvalConfig}


def check_manifest(doc: dict, where: str) -> None:
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    kind, spec = doc["kind"], doc["spec"]
    if kind == "RayCluster":
        check_cluster_spec(spec, where)
    elif kind == "RayJob":
        check_entrypoint(spec["entrypoint"], where)
        check_cluster_spec(spec["rayClusterSpec"], where)
        if "runtimeEnvYAML" in spec:
            assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    elif kind == "RayService":  # KubeRay names the embedded cluster rayClusterConfig here
        check_cluster_spec(spec["rayClusterConfig"], where)
        serve = yaml.safe_load(spec["serveConfigV2"])
        apps = serve["applications"]
        assert apps and all(a["import_path"] and a.get("route_prefix", "/").startswith("/") for a in apps)
    else:
        pytest.fail(f"{where}: unknown kind {kind}")


def test_every_kind_is_present():
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in KUBERAY}
    assert kinds == {"RayCluster", "RayJob", "RayService"}
    jobs = {Path(shlex.split(yaml.safe_load(p.read_text())["spec"]["entrypoint"])[1]).stem
            for p in KUBERAY if yaml.safe_load(p.read_text())["kind"] == "RayJob"}
    assert jobs == {"generate_pairs", "train_decoders", "evaluate"}  # one RayJob per batch stage


def test_stage_configs_load():
    """Every config under configs/cluster/ loads into its stage's config class (typos fail here)."""
    from r2f_ray.config import load_config

    classes = _config_classes()
    for name, stage in {"pairs": "generate_pairs", "train": "train_decoders", "evaluate": "evaluate"}.items():
        load_config(classes[stage], REPO / "configs" / "cluster" / f"{name}.yaml")


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_shape(path):
    check_manifest(yaml.safe_load(path.read_text()), path.name)


def test_manifest_checks_catch_broken_specs():
    doc = yaml.safe_load((CLUSTER / "raycluster.yaml").read_text())
    broken = copy.deepcopy(doc)
    broken["spec"]["workerGroupSpecs"][0]["minReplicas"] = 9  # above maxReplicas
    with pytest.raises(AssertionError):
        check_manifest(broken, "broken")
    broken = copy.deepcopy(doc)
    del broken["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    with pytest.raises((AssertionError, KeyError)):
        check_manifest(broken, "broken")
    with pytest.raises(AssertionError):
        check_entrypoint("python jobs/no_such_job.py", "broken")


def test_ray_up_yaml_validates_against_the_ray_schema():
    import json

    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs after filling defaults
    assert config["head_node_type"] in config["available_node_types"]
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
