"""Fixtures of the evaluation tests: `local_ray`, one local Ray (2 CPUs) per module for its builds (starting Ray and
its workers is most of their cost)."""

import pytest

from attribution.evaluation.ray_engine import RayCluster


@pytest.fixture(scope="module")
def local_ray():
    with RayCluster(num_cpus=2) as cluster:
        yield cluster
