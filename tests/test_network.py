"""What a run opens to the network, and whom its Ray lets in (issue 16): a local run listens on loopback
only and its Ray requires a token; a cluster without authentication gets a warning line; a client without
the token is refused. The sockets are read from the live process tree (psutil), not from a list of names."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import LOOPBACK_NODE, forget_ray_head, free_port, is_loopback, listening, process_tree
from fl_sim import network
from fl_sim.config import ConfigError

TINY = ["dataset=digits", "model=mlp", "model.hidden=[32]", "num_clients=2", "client.lr=0.1", "attack=none",
        "report=false"]


def user_env(home: Path, **extra: str) -> dict:
    """The environment of a user who set nothing about Ray's authentication, with a fresh home (no
    ~/.ray/auth_token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return {**env, "HOME": str(home), **extra}


def test_addresses_are_read_as_ray_reads_them(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert network.gcs_address("10.0.0.5:6379") == "10.0.0.5:6379"
    assert network.gcs_address("ray://10.0.0.5:10001") is None  # Ray's client server: no GCS to ask
    assert network.gcs_address("auto") is None  # no cluster recorded on this machine
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:6380\n")
    assert network.gcs_address("auto") == "127.0.0.1:6380"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")
    assert network.gcs_address("auto") == "10.0.0.7:6379"
    assert network.on_this_machine_only(None) and network.on_this_machine_only("127.0.0.1:6379")
    assert network.on_this_machine_only("localhost:6379") and network.on_this_machine_only("[::1]:6379")
    assert not network.on_this_machine_only("10.0.0.5:6379") and not network.on_this_machine_only("head.lab:6379")


@pytest.mark.parametrize("needs_token, mode, made, expected", [
    (True, "token", False, None),                       # an authenticated cluster, its token at hand: joins
    (True, "disabled", False, "requires token authentication"),
    (True, "token", True, "requires its token"),        # our own throwaway token cannot be the cluster's
    (False, "disabled", False, "WARNING"),              # joins, with the warning line
    (False, "token", False, "runs without authentication, and this process already uses"),
    (None, "token", False, None),                       # unreachable: Ray says why when joining
])
def test_joining_a_cluster_is_refused_in_one_line_or_warned_by_what_the_cluster_and_this_process_use(
        monkeypatch, needs_token, mode, made, expected):
    monkeypatch.setattr(network, "requires_token", lambda address, timeout=10.0: needs_token)
    monkeypatch.setattr(network, "ray_auth_mode", lambda: mode)
    monkeypatch.setitem(network.CHOSEN, "token", made)
    if expected in (None, "WARNING"):
        warning = network.check_cluster("10.0.0.5:6379")
        if expected is None:
            assert warning is None
        else:
            assert "runs without authentication" in warning and "RAY_AUTH_MODE=token" in warning
            assert "\n" not in warning
    else:
        with pytest.raises(ConfigError, match=expected) as e:
            network.check_cluster("10.0.0.5:6379")
        assert "\n" not in str(e.value) and "backend.ray_address=10.0.0.5:6379" in str(e.value)


@pytest.mark.parametrize("user_mode, address, cluster_needs_token, mode, token_made", [
    (None, None, None, "token", True),                 # a local run: token authentication, its own token
    ("disabled", None, None, "disabled", False),       # the user's choice stands
    (None, "10.0.0.5:6379", True, "token", False),     # an authenticated cluster: its token, not one of ours
    (None, "10.0.0.5:6379", False, "disabled", False),  # a cluster without: joined without (and warned)
])
def test_ray_authentication_is_settled_before_ray_is_imported(tmp_path, monkeypatch, user_mode, address,
                                                              cluster_needs_token, mode, token_made):
    monkeypatch.delitem(sys.modules, "ray", raising=False)  # as in a process that has not imported Ray yet
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    if user_mode:
        monkeypatch.setenv("RAY_AUTH_MODE", user_mode)
    monkeypatch.setattr(network, "requires_token", lambda a, timeout=10.0: cluster_needs_token)
    monkeypatch.setattr(network, "CHOSEN", {"mode": False, "token": False})
    network.settle_ray_auth(address)
    assert os.environ["RAY_AUTH_MODE"] == mode and network.CHOSEN["token"] is token_made
    assert ("RAY_AUTH_TOKEN" in os.environ) is token_made
    if token_made:
        assert len(os.environ["RAY_AUTH_TOKEN"]) == 64 and not (tmp_path / ".ray").exists()


@pytest.mark.e2e
def test_a_local_run_listens_on_loopback_only_and_its_ray_refuses_a_caller_without_the_token(tmp_path):
    """`fl-sim` as a user runs it who set nothing about Ray: while it trains, every listening socket of
    its process tree (driver, GCS, raylet, agents, client actors) is bound to loopback, and the GCS
    refuses a call without the token, which lives in the processes' environment only."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fl_sim", *TINY, "num_rounds=4", "faults.straggler_rate=1",
                             "faults.straggler_seconds=1", f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=user_env(tmp_path), start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (run_dir / "checkpoint.pt").exists():  # round 1 done: Ray and both client actors are up
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.time() < deadline, "no round after 300 s"
            time.sleep(0.1)
        sockets = listening(process_tree(proc.pid))
        gcs = [port for _, port, name in sockets if name == "gcs_server"]
        refused = network.requires_token(f"127.0.0.1:{gcs[0]}") if gcs else None
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-2000:]
    names = {name for _, _, name in sockets}
    # the check saw Ray's own processes and the clients' (it cannot pass on an empty tree)
    assert {"gcs_server", "raylet"} <= names and sum(n.startswith("ray::ClientApp") for n in names) >= 1, sockets
    assert sorted(s for s in sockets if not is_loopback(s[0])) == []
    assert refused is True
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["network"] == {"ray": "local", "listen": "127.0.0.1", "ray_auth": "token", "dashboard": False}
    assert not (tmp_path / ".ray").exists()  # the run's token was never written to disk


@pytest.mark.e2e
def test_the_tests_loopback_cluster_refuses_a_ray_client_without_its_token(ray_cluster, tmp_path):
    """The shared cluster (conftest) listens on loopback and runs with token authentication: a real Ray
    client without the token, or with a wrong one, is refused; one with it joins."""
    port = int(ray_cluster.rsplit(":", 1)[1])
    head = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert head and all(is_loopback(c.laddr.ip) for c in head)
    assert network.requires_token(ray_cluster) is True
    code = f"import ray; ray.init(address={ray_cluster!r}, logging_level='ERROR'); print('joined')"
    clients = {  # started together: a refused client retries for about 20 s before it gives up
        "without": user_env(tmp_path, RAY_AUTH_MODE="disabled", **LOOPBACK_NODE),
        "wrong": user_env(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64, **LOOPBACK_NODE),
        "with": {**os.environ, **LOOPBACK_NODE},
    }
    procs = {k: subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, env in clients.items()}
    done = {k: (p.communicate(timeout=180), p.returncode) for k, p in procs.items()}
    for k in ("without", "wrong"):
        (out, err), rc = done[k]
        assert rc != 0 and "joined" not in out and "Authentication token is missing or incorrect" in err, (k, err[-800:])
    (out, err), rc = done["with"]
    assert rc == 0 and "joined" in out, err[-2000:]


@pytest.mark.e2e
def test_a_cluster_without_authentication_is_joined_with_one_warning_line(tmp_path):
    """A user who set nothing joins a cluster started without authentication: the CLI joins it (Ray's
    mode is settled before Ray is imported) and says in one line why that is dangerous."""
    ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    port = free_port()
    env = user_env(tmp_path, RAY_AUTH_MODE="disabled", **LOOPBACK_NODE)
    head = subprocess.Popen([ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    try:
        deadline = time.time() + 120
        while network.requires_token(f"127.0.0.1:{port}", timeout=2) is None:
            assert head.poll() is None and time.time() < deadline, "the unauthenticated head did not start"
            time.sleep(1)
        forget_ray_head(port)  # a plain ray.init() elsewhere (flwr run's) must not join it, or wait for it once gone
        run_dir = tmp_path / "run"
        p = subprocess.run([sys.executable, "-m", "fl_sim", *TINY, "num_rounds=1", "backend.client_resources.num_cpus=0.5",
                            f"backend.ray_address=127.0.0.1:{port}", f"hydra.run.dir={run_dir}"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path, env=user_env(tmp_path))
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        forget_ray_head(port)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if "without authentication" in ln]
    assert len(lines) == 1 and "anyone who can reach its ports can run code" in lines[0], p.stdout + p.stderr
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["network"]["ray_auth"] == "disabled" and s["network"]["cluster_without_authentication"] is True



def test_a_cluster_is_asked_once_before_joining(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    asked = []
    monkeypatch.setattr(network, "requires_token", lambda a, timeout=10.0: asked.append(a) or False)
    monkeypatch.setattr(network, "CHOSEN", {"mode": False, "token": False})
    answer = network.settle_ray_auth("10.0.0.5:6379")
    warning = network.check_cluster("10.0.0.5:6379", answer)
    assert asked == ["10.0.0.5:6379"] and "runs without authentication" in warning
