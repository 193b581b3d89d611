import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# One authentication for every Ray process of the session (the shared cluster, the runs that start Ray of
# their own, the CLI's subprocesses), set before Ray is imported: Ray's token mode and this session's token
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)

#: a Ray process started with this takes 127.0.0.1 as its node address and listens on loopback only
LOOPBACK_NODE = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@pytest.fixture
def task_identity():
    """Messages need a task identity; the simulation sets one, these unit tests set it themselves."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def forget_ray_head(port: int) -> None:
    """Remove Ray's record of the current cluster if it names the head on ``port``: a plain ray.init()
    (Flower's simulation runtime under `flwr run`) would otherwise join that cluster, or wait for it
    once it is dead."""
    record = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    if record.exists() and record.read_text().strip().endswith(f":{port}"):
        record.unlink()


@pytest.fixture(scope="session")
def ray_cluster():
    """One real Ray cluster (`ray start --head`, 2 CPUs, listening on loopback only, with Ray's token
    authentication and this session's token; one GPU declared to Ray, which none of this machine backs:
    a task asking for a share is scheduled and told its id, and torch, finding no CUDA, computes on the
    CPU under device=auto; two units of the attack workers' resource, as a local run reserves them) that
    the in-process end-to-end runs
    join: each run still starts its own Flower simulation and client actors, without paying Ray's
    start-up and shutdown (seconds of both cores on a small machine) every time. Runs that start
    their own local instance are tested too: the killed and resumed CLI runs, `flwr run`, and the
    first run of the determinism test."""
    ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    port = free_port()
    # --block, in its own process group: stopping it stops this cluster only
    head = subprocess.Popen([ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--num-gpus=1", '--resources={"fl_sim_attack": 2}',
                             "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, **LOOPBACK_NODE})
    try:
        deadline = time.time() + 120
        while subprocess.run([ray, "status", f"--address=127.0.0.1:{port}"], capture_output=True,
                             timeout=60, env={**os.environ, **LOOPBACK_NODE}).returncode != 0:
            assert head.poll() is None and time.time() < deadline, "the shared Ray head did not start"
            time.sleep(1)
        forget_ray_head(port)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        forget_ray_head(port)


@pytest.fixture
def compose(request):
    """fl_sim's compose; in end-to-end tests (marked e2e) the run joins the shared Ray cluster unless
    the overrides name `backend.ray_address` (`backend.ray_address=null`: a local instance of its own)."""
    from fl_sim.config import compose as _compose

    if request.node.get_closest_marker("e2e") is None:
        return _compose

    def joined(overrides=()):
        overrides = list(overrides)
        if not any(o.startswith("backend.ray_address=") for o in overrides):
            overrides.append(f"backend.ray_address={request.getfixturevalue('ray_cluster')}")
        return _compose(overrides)

    return joined


@pytest.fixture(scope="session")
def digits():
    """sklearn's real 8x8 digits as (N, 1, 8, 8) float tensors in [0, 1] and int labels."""
    import torch

    from fl_sim.loaders import load_digits

    x, y = load_digits()
    return torch.from_numpy(x), torch.from_numpy(y)


def process_tree(pid: int) -> set[int]:
    """``pid`` and every process below it (gone ones skipped)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return {pid} | {c.pid for c in root.children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def listening(pids: set[int]) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of the processes ``pids``, read from
    the system (psutil), not from a list of expected names."""
    import psutil

    out = set()
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            try:
                name = psutil.Process(c.pid).name()
            except psutil.NoSuchProcess:
                name = "?"
            out.add((c.laddr.ip, c.laddr.port, name))
    return out


def is_loopback(ip: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1
    return address.is_loopback
