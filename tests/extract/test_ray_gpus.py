"""--engine ray on a cluster with GPUs: an actor per GPU, and no more actors than GPUs (one
more would wait for a GPU forever). A stand-in for Ray's cluster view; Ray itself not needed."""

from __future__ import annotations

import pytest

import featx
from featx.extract import ray_engine


class Cluster:
    """What _actor_plan asks Ray: the cluster's resources and its nodes."""

    def __init__(self, gpus: int, cpus: int = 16):
        self.resources = {"GPU": float(gpus), "CPU": float(cpus)}

    def cluster_resources(self) -> dict:
        return self.resources

    def nodes(self) -> list[dict]:
        return [{"Alive": True, "Resources": self.resources}]


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_more_gpu_actors_than_gpus_are_refused_in_one_line(device):
    with pytest.raises(ValueError, match=r"--ray-actors 3 .* has 2; use --ray-actors 2 or fewer") as raised:
        ray_engine._actor_plan(Cluster(gpus=2), featx.ExtractConfig(device=device), actors=3)
    assert "\n" not in str(raised.value)


def test_one_actor_per_gpu_up_to_the_gpus():
    config = featx.ExtractConfig(device="cuda")
    assert ray_engine._actor_plan(Cluster(gpus=2), config, actors=None) == (
        "cuda",
        2,
        {"num_gpus": 1, "num_cpus": 1},
        1,
    )
    assert ray_engine._actor_plan(Cluster(gpus=2), config, actors=1)[:2] == ("cuda", 1)
    # CPU actors are not bound by the GPUs
    assert ray_engine._actor_plan(Cluster(gpus=1, cpus=64), featx.ExtractConfig(device="cpu"), actors=3)[:2] == (
        "cpu",
        3,
    )
