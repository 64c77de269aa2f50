"""--engine ray on a real multi-process Ray cluster: a lost worker node and a killed driver.

The cluster is what `ray start` makes on real machines, here on one: a head node (1 CPU) and a
worker node (2 CPUs), each its own `ray start --block` process group, with a token of their own
(Ray 2.60 turns token authentication on, and a node or driver without the head's token is
refused) and Ray's session files in a temporary folder. featx runs as the CLI in its own
process, as a user would run it, so that process can be killed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import featx
from tests.conftest import features_by_path, write_images

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

IMAGES = 40
# Small Q keeps the run short, large enough that a run is still going when its first part lands.
SETTINGS = dict(model="vgg11", layer="pool5", weights="random", seed=0, scales=(96,), batch_size=2)
PART = 2  # images per part: many parts, so a kill lands mid-run
START_TIMEOUT = 60  # seconds for `ray start` to bring a node up
RUN_TIMEOUT = 150  # seconds for one featx run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Ray nodes started by `ray start --block`, each the leader of its own process group."""

    def __init__(self, temp_dir: Path):
        self.temp_dir = temp_dir
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # The head makes a token when token authentication is on (the default here, from a
        # ~/.ray/auth_token or not); every node and driver must present it. One of our own, in
        # the environment of each process, does not depend on the machine's ~/.ray.
        self.token = secrets.token_hex(32)
        self.env = os.environ | {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.nodes: list[subprocess.Popen] = []

    def start_node(self, *args: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", f"--temp-dir={self.temp_dir}"]
        p = subprocess.Popen(
            [*cmd, "--node-ip-address=127.0.0.1", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own group: the node's processes can be killed together
        )
        self.nodes.append(p)
        seen = []
        deadline = time.monotonic() + START_TIMEOUT
        for line in p.stdout:  # `ray start --block` says so once the node is up, then waits
            seen.append(line)
            if "Ray runtime started" in line:
                return p
            if time.monotonic() > deadline:
                break
        raise RuntimeError("ray start failed:\n" + "".join(seen[-30:]))

    def start_head(self) -> None:
        self.start_node("--head", f"--port={self.port}", "--num-cpus=1", "--num-gpus=0", "--include-dashboard=false")

    def start_worker(self) -> subprocess.Popen:
        return self.start_node(f"--address={self.address}", "--num-cpus=2", "--num-gpus=0")

    @staticmethod
    def kill(node: subprocess.Popen) -> None:
        """SIGKILL a node: its raylet and everything else in its process group, as a lost machine."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
        node.wait()

    def stop(self) -> None:
        """`ray stop` for this cluster only: `ray stop` itself would end every Ray on the machine."""
        for node in reversed(self.nodes):
            self.kill(node)
        # Ray's worker processes run in sessions of their own and leave when their raylet goes;
        # any that linger are found by the token in their environment, which only they hold.
        for pid in _pids_with_env(f"RAY_AUTH_TOKEN={self.token}"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _pids_with_env(entry: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if entry.encode() in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if sys.platform != "linux":
        pytest.skip("the cluster test uses process groups and /proc")
    # Ray's socket paths must stay short (AF_UNIX: 107 bytes): a short temp dir, not pytest's.
    with tempfile.TemporaryDirectory(prefix="ray") as temp_dir:
        c = Cluster(Path(temp_dir))
        try:
            c.start_head()
            c.worker = c.start_worker()
            yield c
        finally:
            c.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    sizes = [(120 + 8 * (i % 5), 100 + 6 * (i % 4)) for i in range(IMAGES)]
    write_images(root, sizes[: IMAGES // 2], seed=1, label="dogs")
    write_images(root, sizes[IMAGES // 2 :], seed=2, label="cats")
    return root


@pytest.fixture(scope="module")
def local(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "f.parquet"
    return features_by_path(featx.extract_features(images, out, **SETTINGS).output)


def _featx(cluster: Cluster, images: Path, out: Path) -> subprocess.Popen:
    args = ["extract", str(images), "-o", str(out), "--engine", "ray", "--ray-address", cluster.address]
    args += ["--model", SETTINGS["model"], "--weights", "random", "--seed", "0", "--layer", "pool5", "--scales", "96"]
    # Two actors of one CPU: the head has one CPU, so at least one actor runs on the worker node.
    args += ["--batch-size", "2", "--rows-per-group", str(PART), "--ray-actors", "2"]
    return subprocess.Popen(
        [sys.executable, "-m", "featx", *args],
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _parts(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.parquet")) if out.is_dir() else []


def _wait_for_a_part(run: subprocess.Popen, out: Path) -> int:
    """Wait until the run has written its first part; the number of parts then."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while not _parts(out):
        if run.poll() is not None:
            pytest.fail(f"featx ended (exit {run.returncode}) before writing a part:\n{run.stdout.read()}")
        if time.monotonic() > deadline:
            run.kill()
            pytest.fail("featx wrote no part in time")
        time.sleep(0.02)
    return len(_parts(out))


def _finish(run: subprocess.Popen) -> str:
    try:
        output, _ = run.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        output, _ = run.communicate()
        pytest.fail(f"featx did not finish in {RUN_TIMEOUT} s:\n{output}")
    assert run.returncode == 0, output
    return output


def _assert_equal_to_local(out: Path, local: dict[str, np.ndarray]) -> None:
    got = features_by_path(out)  # asserts each path once
    assert sorted(got) == sorted(local)
    for path, feature in local.items():
        np.testing.assert_allclose(got[path], feature, rtol=0, atol=1e-5)


def test_a_lost_worker_node_costs_its_in_flight_parts(cluster, images, local, tmp_path):
    out = tmp_path / "features"
    run = _featx(cluster, images, out)
    written = _wait_for_a_part(run, out)
    Cluster.kill(cluster.worker)  # the machine is gone mid-run: its actor, tasks and objects
    assert run.poll() is None and written < IMAGES // PART, "the run was over before the worker node was lost"
    # With one CPU the head cannot run an actor and decode: a replacement node joins, as an
    # autoscaler would start one. Ray Data restarts the lost actor and retries its parts there.
    cluster.worker = cluster.start_worker()
    _finish(run)
    _assert_equal_to_local(out, local)
    assert len(_parts(out)) == IMAGES // PART  # each part written once: none twice, none lost


def test_a_killed_driver_resumes(cluster, images, local, tmp_path):
    out = tmp_path / "features"
    run = _featx(cluster, images, out)
    written = _wait_for_a_part(run, out)
    os.killpg(run.pid, signal.SIGKILL)  # the featx process, as the OOM killer or a lost login
    run.communicate()
    kept = _parts(out)
    assert written <= len(kept) < IMAGES // PART, "the run was over before its driver was killed"
    _finish(_featx(cluster, images, out))
    _assert_equal_to_local(out, local)
    assert set(kept) <= set(_parts(out)), "the rerun recomputed parts the killed run had written"
