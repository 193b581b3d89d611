"""The Flower-native path (issue 15): client discovery that fails fast when the federation does not hold
``num_clients`` clients; the README's `flwr run` commands, and what they open to the network (issue 16)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

import psutil
from conftest import free_port, is_loopback, listening, process_tree
from fl_sim.network import requires_token
from fl_sim.protocol import ClientsMissing, discover_clients

pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py: Messages need one


class FakeGrid:
    """A Grid whose nodes answer discovery as fl-sim's ClientApp does; ``arrive``: node ids over time."""

    def __init__(self, partitions: int, nodes: int, arrive_every: float = 0.0):
        self.partitions, self.nodes, self.arrive_every, self.start = partitions, nodes, arrive_every, time.monotonic()

    def get_node_ids(self):
        if self.arrive_every <= 0:
            return list(range(100, 100 + self.nodes))
        n = min(self.nodes, 1 + int((time.monotonic() - self.start) / self.arrive_every))
        return list(range(100, 100 + n))

    def send_and_receive(self, messages, timeout=None):
        self.calls = getattr(self, "calls", []) + [len(messages)]
        out = []
        for m in messages:
            reply = Message(RecordDict({"client": ConfigRecord(
                {"partition-id": m.metadata.dst_node_id - 100, "num-partitions": self.partitions})}), reply_to=m)
            out.append(reply)  # a reply comes from the node the query went to
        return out


def test_discovery_maps_each_partition_to_its_node(compose):
    cfg = compose(["num_clients=4"])
    grid = FakeGrid(partitions=4, nodes=4)
    assert discover_clients(grid, cfg) == {0: 100, 1: 101, 2: 102, 3: 103}
    # all there at the first look (a simulation): asked together, so every actor loads its data at once
    assert grid.calls == [4]


def test_nodes_still_arriving_are_probed_once_then_all_asked(compose):
    cfg = compose(["num_clients=3", "backend.connect_timeout=10"])
    grid = FakeGrid(partitions=3, nodes=3, arrive_every=0.2)
    assert len(discover_clients(grid, cfg)) == 3
    assert grid.calls == [1, 3]


@pytest.mark.parametrize("nodes", [2, 12])
def test_a_federation_of_another_size_is_refused_at_once_with_both_numbers_and_the_fix(compose, nodes):
    """`flwr run` on Flower's default of 2 SuperNodes (or more than asked) with num_clients=10."""
    cfg = compose(["num_clients=10"])  # backend.connect_timeout stays at its default (60 s)
    t0 = time.monotonic()
    with pytest.raises(ClientsMissing) as e:
        discover_clients(FakeGrid(partitions=nodes, nodes=nodes), cfg)
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert f"the federation has {nodes} SuperNodes but num_clients=10" in msg and "\n" not in msg
    assert "--num-supernodes 10" in msg and f"num_clients={nodes}" in msg


def test_missing_clients_fail_after_the_connect_timeout_not_the_round_timeout(compose):
    cfg = compose(["num_clients=10", "backend.connect_timeout=1", "round_timeout=3600"])
    grid = FakeGrid(partitions=10, nodes=3)
    t0 = time.monotonic()
    with pytest.raises(ClientsMissing, match=r"^3 of 10 clients connected after 1 s: .*backend.connect_timeout"):
        discover_clients(grid, cfg)
    assert 1 <= time.monotonic() - t0 < 5


def test_clients_that_arrive_one_by_one_within_the_timeout_are_all_found(compose):
    cfg = compose(["num_clients=5", "backend.connect_timeout=10"])
    assert len(discover_clients(FakeGrid(partitions=5, nodes=5, arrive_every=0.1), cfg)) == 5


# --------------------------------------------------------------------------- the README's commands, for real

REPO = Path(__file__).resolve().parents[1]


def readme_flwr_commands() -> list[str]:
    """The command lines of the README's `flwr run` section, as written there."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### `flwr run`"):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    return [line for line in block[: block.index("```")].splitlines() if line.strip()]


class SuperLinkSockets(threading.Thread):
    """Twice a second, the listening sockets of the process tree of the SuperLink that ``home`` started
    (its SuperExec, its simulation runtime and that runtime's Ray); whether each Ray GCS among them
    refuses a caller without the token."""

    def __init__(self, home: Path):
        super().__init__(daemon=True)
        self.home, self.sockets, self.gcs_refuses, self.done = str(home), set(), {}, threading.Event()
        self.errors: list[str] = []  # a sample that failed (a process gone mid-scan): the next one goes on

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 - recorded; the watch must outlive one bad sample
                self.errors.append(repr(e))
            self.done.wait(0.5)

    def sample(self) -> None:
        pids = set()
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if any("flower-superlink" in a for a in cmd) and any(self.home in a for a in cmd):
                pids |= process_tree(p.pid)
        found = listening(pids)
        self.sockets |= found
        for _, port, name in found:
            if name == "gcs_server" and port not in self.gcs_refuses:
                self.gcs_refuses[port] = requires_token(f"127.0.0.1:{port}", timeout=5)


def stop_local_superlink(home: Path) -> None:
    """The SuperLink this test's HOME started (its database lives under it), and nothing else."""
    subprocess.run(["pkill", "-f", f"flower-superlink.*{home}"], capture_output=True)


@pytest.mark.e2e
def test_the_readmes_flwr_run_commands_work_with_a_fresh_home_and_a_mismatch_fails_in_seconds(tmp_path):
    """A machine where Flower never ran (HOME without ~/.flwr): the README's commands, run as written,
    complete a 10-client run; then a run config asking for 4 clients of that 10-SuperNode federation
    stops within seconds, one line giving both numbers, `summary.json` failed, and Flower records the run
    as failed (the ServerApp exits with Flower's code 700; `flwr run` itself returns 0 in Flower 1.41).
    While the first run trains, every listening socket of the SuperLink's process tree is on loopback."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    ray_tmp = tempfile.mkdtemp(prefix="flwr", dir="/tmp")
    env.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()), FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
               # Flower's plain ray.init() joins a cluster Ray recorded on the machine (RAY_TMPDIR/ray/
               # ray_current_cluster), e.g. the tests' own after an in-process run: a Ray directory of its own
               # (short: Ray's socket paths must fit in 107 characters)
               RAY_TMPDIR=ray_tmp)
    commands = readme_flwr_commands()
    assert any(c.startswith("flwr run ") for c in commands)
    runs = REPO / "outputs" / "flwr-run"
    before = set(runs.glob("*")) if runs.is_dir() else set()
    watch = SuperLinkSockets(home)
    watch.start()
    try:
        p = subprocess.run(["bash", "-c", "set -e\n" + "\n".join(commands)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=400)
        watch.done.set()
        watch.join()
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        # the README's RAY_* line: the SuperLink and its simulation runtime's Ray listen on loopback only, and
        # that Ray refuses a caller without the token, which is in no file (issue 16)
        names = {name for _, _, name in watch.sockets}
        assert {"gcs_server", "raylet"} <= names and any(n.startswith("flower-super") for n in names), \
            (watch.sockets, watch.errors[:3])
        assert sorted(s for s in watch.sockets if not is_loopback(s[0])) == []
        assert watch.gcs_refuses and all(v is True for v in watch.gcs_refuses.values()), watch.gcs_refuses
        assert not (home / ".ray").exists()
        new = sorted(set(runs.glob("*")) - before)
        assert len(new) == 1, new
        s = json.loads((new[0] / "summary.json").read_text())
        assert s["status"] == "completed" and s["rounds"][-1]["clients"] == list(range(10))
        assert not (new[0] / "checkpoint.pt").exists()  # a completed run keeps no checkpoint, as under fl-sim
        assert s["network"] == {"ray": "flwr run (Flower's simulation runtime)", "ray_auth": "token"}
        assert (home / ".flwr" / "config.toml").is_file()  # Flower made its configuration on this run

        run_dir = tmp_path / "mismatch"
        mismatch = commands[-1].replace("num_clients=10", "num_clients=4")[: -1] + f' run_dir=\"{run_dir}\"\''
        t0 = time.monotonic()
        p = subprocess.run(["bash", "-c", "\n".join(commands[:-2] + [mismatch])], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
        seconds = time.monotonic() - t0
        out = p.stdout + p.stderr
        assert "the federation has 10 SuperNodes but num_clients=4" in out, out[-3000:]
        assert "Exit Code: 700" in out, out[-3000:]
        s = json.loads((run_dir / "summary.json").read_text())
        assert s["status"] == "failed" and "num_clients=4" in s["error"]
        assert seconds < 60, seconds
        listed = subprocess.run(["flwr", "ls", "local", "--format", "json"], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=60)
        statuses = [r["status"] for r in json.loads(listed.stdout)["runs"]]
        assert sorted(s.rsplit(":", 1)[-1] for s in statuses) == ["completed", "failed"], listed.stdout
        print(f"mismatch refused after {seconds:.1f} s")
    finally:
        watch.done.set()
        stop_local_superlink(home)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        for d in set(runs.glob("*")) - before if runs.is_dir() else ():
            shutil.rmtree(d, ignore_errors=True)
