"""`accel controller --xds-api workload`: mesh.yaml served as Istio ambient's workload API
over Delta ADS to a raw client subscribing as ztunnel does (wildcard Address and
Authorization, a ztunnel node id), decoded with the agent's processors; a file change is
pushed as the changed resources only."""

from __future__ import annotations

import queue
import socket
import threading
from pathlib import Path

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from accel import cli
from accel.sources.file import FileSource
from accel.xds.server import ControllerServer
from accel.xds.workload.decode import AddressProcessor, AuthorizationProcessor
from accel.xds.workload.kinds import ADDRESS, AUTHORIZATION
from accel.xds.workload.state import WorkloadState
from accel.xds.workload.to_table import to_table
from accel.xds.workload.to_verdicts import to_verdicts
from tests.test_mesh_policies import MESH

NODE_ID = "ztunnel~10.0.0.1~ztunnel-abc.istio-system~istio-system.svc.cluster.local"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ZtunnelLike:
    """A Delta ADS stream subscribing as ztunnel does, ACKing every response."""

    def __init__(self, port: int):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.requests: queue.Queue = queue.Queue()
        self.responses: queue.Queue = queue.Queue()
        node = base_pb2.Node(id=NODE_ID)
        node.metadata.update({"NAMESPACE": "istio-system", "NODE_NAME": "n1",
                              "CLUSTER_ID": "Kubernetes", "INSTANCE_IPS": "10.0.0.1"})
        for t in (ADDRESS, AUTHORIZATION):
            self.requests.put(discovery_pb2.DeltaDiscoveryRequest(
                node=node, type_url=t, resource_names_subscribe=["*"]))
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.call = stub.DeltaAggregatedResources(iter(self.requests.get, None))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for resp in self.call:
                self.responses.put(resp)
                self.requests.put(discovery_pb2.DeltaDiscoveryRequest(
                    type_url=resp.type_url, response_nonce=resp.nonce))
        except grpc.RpcError:
            pass

    def next(self, timeout: float = 5.0) -> discovery_pb2.DeltaDiscoveryResponse:
        return self.responses.get(timeout=timeout)

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()
        self.channel.close()


def _apply(state: WorkloadState, resp, procs) -> WorkloadState:
    p = procs[resp.type_url]
    got = p.decode_all({r.name: r.resource.value for r in resp.resources})
    return state.apply(resp.type_url, got, resp.removed_resources)


def test_serves_mesh_yaml_as_the_workload_api(tmp_path: Path):
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(MESH)
    srv = ControllerServer(FileSource(mesh, poll_interval=0.05), f"127.0.0.1:{_free_port()}",
                           api="workload", node_name="n1").start()
    client = ZtunnelLike(srv.port)
    procs = {ADDRESS: AddressProcessor(), AUTHORIZATION: AuthorizationProcessor()}
    try:
        state = WorkloadState()
        for _ in range(2):
            resp = client.next()
            assert all(r.resource.type_url == resp.type_url for r in resp.resources)
            state = _apply(state, resp, procs)
        assert len(state.policies) == 4 and len(state.services) == 3
        table = to_table(state, "n1").table
        pg = table.get("default/pg:5432")
        assert sorted((str(e.address), e.port, e.weight) for e in pg.endpoints) == \
            [("10.0.2.10", 5432, 1), ("10.0.2.11", 5433, 3)]
        v = to_verdicts(state, "n1").verdicts
        assert len(v.policed) == 5  # every endpoint runs on n1 and has a policy
        # a change: one more endpoint for web -> only what changed is pushed
        mesh.write_text(MESH.replace(
            "      - {address: 10.0.1.20, port: 8080, namespace: shop, name: client-1}",
            "      - {address: 10.0.1.20, port: 8080, namespace: shop, name: client-1}\n"
            "      - {address: 10.0.1.21, port: 8080, namespace: shop, name: client-2}"))
        resp = client.next()
        assert resp.type_url == ADDRESS
        assert [r.name for r in resp.resources] == ["meshaccel//Endpoint/shop/client-2"]
        state = _apply(state, resp, procs)
        web = to_table(state, "n1").table.get("default/web:80")
        assert "10.0.1.21" in {str(e.address) for e in web.endpoints}
        assert srv.ads.clients()[0]["node_id"] == NODE_ID
    finally:
        client.close()
        srv.stop()


def test_node_name_needs_the_workload_api(tmp_path: Path, capsys):
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(MESH)
    code = cli.main(["controller", "--config", str(mesh), "--node-name", "n1",
                     "--listen", f"127.0.0.1:{_free_port()}"])
    assert code == 2 and "--node-name goes with --xds-api workload" in capsys.readouterr().err

