import pytest

from tests.slurm.cluster import ClusterUnavailable, SlurmCluster, unavailable_reason


@pytest.fixture(scope="session")
def slurm_cluster():
    """One cluster for all Slurm tests (starting it takes a few seconds); stopped at the end, whatever happened."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no Slurm: {reason}")
    cluster = SlurmCluster()
    try:
        cluster.start()
    except ClusterUnavailable as e:
        cluster.stop()
        pytest.skip(f"Slurm did not start: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
