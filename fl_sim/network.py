"""What a run opens to the network, and whom it lets in (Ray's control plane runs arbitrary code for
whoever reaches it: the "ShadowRay" exposure).

- A **local run** (no ``backend.ray_address``) starts a Ray instance of its own whose processes listen
  on loopback only (``loopback_only``): Ray's node address is 127.0.0.1, so the GCS, the raylet, the
  runtime-env agent, the workers and the driver bind 127.0.0.1; Ray's dashboard (and with it the Jobs
  API) is off, and Ray's client server is never started. Ray's token authentication is on as well
  (``settle_ray_auth``).
- A **cluster run** (``backend.ray_address``) joins a cluster that others started: ``check_cluster``
  asks its GCS, without a token, whether it lets an unauthenticated caller in. One without
  authentication gets a warning line; a process whose authentication mode does not match the
  cluster's gets one line saying what to set (Ray fixes the mode when it is imported).

Ray reads its authentication mode once, when it is imported; Flower imports it when a simulation
starts. ``settle_ray_auth`` runs just before, in the process that starts the simulation (``fl-sim``, or
code calling ``fl_sim.runner.run``), never inside Flower's own runtime (``flwr run``: Flower starts Ray
there, and another mode in the environment would reach only some of its processes). Nothing here
imports Ray at module level.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import sys
from pathlib import Path
from typing import Iterator

from fl_sim.config import ConfigError

LOOPBACK = "127.0.0.1"
_CLUSTER_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's switch between local-only (loopback) and cluster nodes
README = "see the README, 'More than one machine'"


def ray_auth_mode() -> str:
    """``"token"`` or ``"disabled"``: the mode Ray uses in this process (fixed when Ray is imported)."""
    if "ray" in sys.modules:
        from ray._raylet import AuthenticationMode, get_authentication_mode

        return "token" if get_authentication_mode() == AuthenticationMode.TOKEN else "disabled"
    return "token" if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "token" else "disabled"


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Within: a Ray instance started here takes 127.0.0.1 as its node address, and every process of it
    binds loopback. Ray does this by itself on macOS and Windows (local-only nodes); on Linux it takes
    the address that routes outward. The driver reads the switch when ``ray.init`` runs; the processes
    it starts inherit it from the environment."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(_CLUSTER_VAR)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[_CLUSTER_VAR] = "0"
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before[0]
        if before[1] is None:
            os.environ.pop(_CLUSTER_VAR, None)
        else:
            os.environ[_CLUSTER_VAR] = before[1]


def gcs_address(ray_address: str) -> str | None:
    """``HOST:PORT`` of the cluster's GCS; ``"auto"``: ``RAY_ADDRESS`` or the cluster Ray recorded on this
    machine (None when there is none)."""
    if ray_address != "auto":
        return None if ray_address.startswith("ray://") else ray_address  # ray://: Ray's client server, not a GCS
    if os.environ.get("RAY_ADDRESS"):
        return gcs_address(os.environ["RAY_ADDRESS"]) if os.environ["RAY_ADDRESS"] != "auto" else None
    record = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    try:
        return record.read_text().strip() or None
    except OSError:
        return None


def on_this_machine_only(ray_address: str | None) -> bool:
    """Whether the run's Ray is reachable on loopback only: a local instance, or a cluster whose address is
    a loopback one (its head started with local-only nodes, as the tests' cluster is). The driver then
    takes 127.0.0.1 as its own address too: Ray would turn a 127.0.0.1 address into the machine's outward
    one, where such a cluster does not listen."""
    if not ray_address:
        return True
    address = gcs_address(str(ray_address))
    if address is None:
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def requires_token(address: str, timeout: float = 10.0) -> bool | None:
    """Whether the GCS at ``HOST:PORT`` refuses a caller without a token: ``True`` refused as
    unauthenticated, ``False`` answered, ``None`` unreachable (Ray then says why, on joining)."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        # the cluster-id query is the first call every Ray client makes; an empty message is a valid request
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId",
                                   request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            call(b"", timeout=timeout)
            return False
        except grpc.RpcError as e:
            return True if e.code() == grpc.StatusCode.UNAUTHENTICATED else None


#: what ``settle_ray_auth`` chose in this process: the mode (the user had set none), a token of its own
CHOSEN = {"mode": False, "token": False}


def token_at_hand() -> bool:
    """Whether Ray finds a token: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (its order)."""
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").is_file())


UNASKED = object()  # the cluster has not been asked yet (requires_token's None means: unreachable)


def settle_ray_auth(ray_address: str | None):
    """Before this process imports Ray: token authentication unless the user set ``RAY_AUTH_MODE``. A
    local run with no token at hand gets a random one of this process's own, in its environment only
    (the Ray processes it starts inherit it), never written to disk. A run joining a cluster takes the
    cluster's mode (``check_cluster`` warns when that is none). Once Ray is imported its mode stands.
    Returns the cluster's ``requires_token`` answer when it asked, else ``UNASKED``."""
    if "ray" in sys.modules or "RAY_AUTH_MODE" in os.environ:
        return UNASKED
    mode, answer = "token", UNASKED
    if ray_address:
        address = gcs_address(str(ray_address))
        if address is not None:
            answer = requires_token(address)
            mode = "disabled" if answer is False else "token"
    os.environ["RAY_AUTH_MODE"] = mode
    CHOSEN["mode"] = True
    if mode == "token" and not ray_address and not token_at_hand():
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        CHOSEN["token"] = True
    return answer


def check_cluster(ray_address: str, answer=UNASKED) -> str | None:
    """Before joining the cluster at ``ray_address``: a ConfigError (one line) when this process cannot
    join it as its authentication stands; the warning line for a cluster without authentication.
    ``answer``: the cluster's ``requires_token`` answer when ``settle_ray_auth`` already asked."""
    address = gcs_address(ray_address)
    if address is None:
        return None
    needs_token = requires_token(address) if answer is UNASKED else answer
    mode = ray_auth_mode()
    if needs_token is True and mode != "token":
        raise ConfigError(f"backend.ray_address={ray_address}: this Ray cluster requires token authentication; "
                          f"set RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN, or ~/.ray/auth_token) ({README})")
    if needs_token is True and (CHOSEN["token"] or not token_at_hand()):  # a local run's token is not the cluster's
        raise ConfigError(f"backend.ray_address={ray_address}: this Ray cluster requires its token; set "
                          f"RAY_AUTH_TOKEN or copy it to ~/.ray/auth_token (`ray get-auth-token` on its head) ({README})")
    if needs_token is False and mode == "token":
        raise ConfigError(f"backend.ray_address={ray_address}: this Ray cluster runs without authentication, and "
                          "this process already uses Ray's token authentication (Ray keeps the mode it was imported with); restart "
                          f"the cluster with RAY_AUTH_MODE=token ({README}), or join it from a new process")
    if needs_token is False:
        return (f"the Ray cluster at {address} runs without authentication: anyone who can reach its ports can "
                f"run code as its user, and read this run's data and models; start it with RAY_AUTH_MODE=token "
                f"({README})")
    return None
