"""The API on TCP: never plaintext unless asked, TLS with client certificates (mutual TLS)
admits only clients the CA signed, and server-only TLS lets TCP clients read, not write."""

from __future__ import annotations

import os

import grpc
import pytest

from accel.api.gen import agent_pb2 as pb
from accel.api.gen import agent_pb2_grpc as pb_grpc
from tests.api_harness import REPO, accel, cert_chain, free_port

pytestmark = pytest.mark.kernel

MESH = REPO / "examples" / "mesh.yaml"


@pytest.fixture
def certs(env):
    return cert_chain(env.tmp)


def tls_stub(port: int, certs, client: str | None) -> pb_grpc.AgentStub:
    creds = grpc.ssl_channel_credentials(
        root_certificates=certs["ca.pem"].read_bytes(),
        private_key=certs[f"{client}.key"].read_bytes() if client else None,
        certificate_chain=certs[f"{client}.pem"].read_bytes() if client else None,
    )
    return pb_grpc.AgentStub(grpc.secure_channel(f"127.0.0.1:{port}", creds))


def apply_one(s: pb_grpc.AgentStub, version: str):
    return s.ApplyConfig(pb.ApplyConfigRequest(version=version, table=pb.ServiceTable(services=[
        pb.Service(name="t", vip="10.96.3.3", port=80,
                   endpoints=[pb.Endpoint(address="10.200.0.33", port=80)])])), timeout=10)


def test_tcp_without_tls_is_refused_at_startup(env):
    port = free_port()
    out = accel("agent", "--config", str(MESH), "--pin-dir", env.pin_dir, "--cgroup",
                str(env.cgroup), "--api-socket", env.socket, "--api-listen", f"127.0.0.1:{port}")
    assert out.returncode == 2 and "--api-listen" in out.stderr and "--api-tls-cert" in out.stderr
    assert not os.path.exists(env.pin_dir) and not os.path.exists(env.socket)


def test_mutual_tls(env, certs):
    port = free_port()
    env.agent(MESH, "--api-listen", f"127.0.0.1:{port}",
              "--api-tls-cert", str(certs["server.pem"]), "--api-tls-key", str(certs["server.key"]),
              "--api-tls-client-ca", str(certs["ca.pem"]))
    good = tls_stub(port, certs, "client")
    assert good.GetStatus(pb.GetStatusRequest(), timeout=10).config_version == "file-1"
    assert apply_one(good, "mtls-1").applied  # a verified client may drive the agent
    assert good.ListServices(pb.ListServicesRequest(), timeout=10).config_version == "mtls-1"

    for client in (None, "rogue"):  # no certificate; one the CA did not sign
        with pytest.raises(grpc.RpcError) as e:
            tls_stub(port, certs, client).GetStatus(pb.GetStatusRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, client
    plain = pb_grpc.AgentStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    with pytest.raises(grpc.RpcError) as e:
        plain.GetStatus(pb.GetStatusRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    # The unix socket still serves next to TCP.
    unix = pb_grpc.AgentStub(grpc.insecure_channel(f"unix:{env.socket}"))
    assert unix.GetStatus(pb.GetStatusRequest(), timeout=10).config_version == "mtls-1"


def test_server_tls_without_client_ca_is_read_only(env, certs):
    port = free_port()
    env.agent(MESH, "--api-listen", f"127.0.0.1:{port}",
              "--api-tls-cert", str(certs["server.pem"]), "--api-tls-key", str(certs["server.key"]))
    s = tls_stub(port, certs, None)
    assert s.GetStatus(pb.GetStatusRequest(), timeout=10).services == 3
    with pytest.raises(grpc.RpcError) as e:
        apply_one(s, "anon")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as e:
        s.SetGuard(pb.SetGuardRequest(guard=pb.Guard(syn_rate=1)), timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert s.ListServices(pb.ListServicesRequest(), timeout=10).config_version == "file-1"


def test_insecure_tcp_when_asked(env):
    port = free_port()
    env.agent(MESH, "--api-listen", f"127.0.0.1:{port}", "--api-insecure")
    s = pb_grpc.AgentStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    assert apply_one(s, "trusted-1").version == "trusted-1"
