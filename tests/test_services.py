"""lasthop.services, its REST API and its CLI: the model and its checks, the
state file and how it merges with the config, the manager's changes (in
state-only mode here: the data-path side is in tests/bpf/test_services.py),
and, on a real kernel, `lasthop service` against a running agent and with
none, across an agent restart."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from lasthop import abi
from lasthop.errors import NotAttachedError, ServiceConflict, ServiceError, ServiceNotFound
from lasthop.services import cli as service_cli
from lasthop.services.manager import ServiceManager
from lasthop.services.model import (
    HealthCheck,
    Service,
    ServiceVm,
    check_unique,
    parse_vm,
    validate_service,
)
from lasthop.services.store import ServiceStore, StateFile, merge

VIP = "192.0.2.100"


def web(**kw: Any) -> Service:
    data: dict[str, Any] = {
        "name": "web",
        "address": VIP,
        "ports": [80],
        "vms": [{"port": "vm1"}, {"port": "vm2", "weight": 2}],
    }
    data.update(kw)
    return Service.model_validate(data)


# ---------------------------------------------------------------- the model


def test_a_port_without_a_protocol_means_tcp() -> None:
    assert web().proto == "tcp"
    assert Service(name="any", address=VIP).proto == "any"


def test_ports_need_tcp_or_udp() -> None:
    with pytest.raises(ServiceError, match="ports need proto tcp or udp"):
        validate_service({"name": "x", "address": VIP, "proto": "icmp", "ports": [80]})


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "-x", "address": VIP},
        {"name": "x", "address": "224.0.0.1"},
        {"name": "x", "address": "not-an-ip"},
        {"name": "x", "address": VIP, "ports": [80, 80]},
        {"name": "x", "address": VIP, "vms": [{"port": "vm1"}, {"port": "vm1"}]},
        {"name": "x", "address": VIP, "vms": [{"port": "vm1", "weight": 0}]},
        {"name": "x", "address": VIP, "vms": [{"port": "vm1", "mac": "nope"}]},
        {"name": "x", "address": VIP, "health": {"fall": 3, "down_after": 2}},
        {"name": "x", "address": VIP, "extra": 1},
    ],
)
def test_invalid_definitions_are_refused_with_the_reason(bad: dict[str, Any]) -> None:
    with pytest.raises(ServiceError, match=r"service '.*': "):
        validate_service(bad)


def test_keys_as_the_data_path_looks_them_up() -> None:
    """One lh_services key per port; no port = port 0; ICMP over IPv6 is protocol 58."""
    svc = web(ports=[80, 443])
    assert [(p, port) for _, p, port in svc.svc_keys()] == [(6, 80), (6, 443)]
    assert svc.svc_keys()[0][0] == bytes([192, 0, 2, 100]) + bytes(12)
    v6 = Service(name="p", address="2001:db8::1", proto="icmp")
    assert [(p, port) for _, p, port in v6.svc_keys()] == [(58, 0)]
    assert v6.family == abi.FAMILY_V6


def test_two_services_may_not_claim_one_address_and_port() -> None:
    with pytest.raises(ServiceConflict, match="both claim tcp 192.0.2.100:80"):
        check_unique([web(), web(name="other")])
    check_unique([web(), web(name="other", ports=[443]), web(name="udp", proto="udp")])


def test_the_check_takes_the_services_first_port() -> None:
    assert web().check(HealthCheck()).port == 80
    # no port: nothing to connect to
    assert Service(name="a", address=VIP).check(HealthCheck()).type == "none"
    assert web().check(HealthCheck(port=8080)).port == 8080


@pytest.mark.parametrize(
    ("text", "vm"),
    [
        ("vm1", ServiceVm(port="vm1")),
        ("vm1:3", ServiceVm(port="vm1", weight=3)),
        ("vm1@10.2.0.11", ServiceVm(port="vm1", address="10.2.0.11")),
        ("vm1:2@fd00::11", ServiceVm(port="vm1", weight=2, address="fd00::11")),
    ],
)
def test_parse_vm(text: str, vm: ServiceVm) -> None:
    assert parse_vm(text) == vm


@pytest.mark.parametrize("text", ["vm1:x", "vm1@nowhere", ":2", "a-very-long-interface-name"])
def test_parse_vm_refuses_nonsense(text: str) -> None:
    with pytest.raises(ServiceError, match="expected PORT"):
        parse_vm(text)


# ---------------------------------------------------------------- config and state file


def test_config_carries_services_health_and_on_vm_down(tmp_path: Path) -> None:
    from lasthop import config

    path = tmp_path / "c.toml"
    path.write_text(
        'on_vm_down = "drop"\n[health]\ntype = "http"\npath = "/ok"\n'
        '[[service]]\nname = "web"\naddress = "192.0.2.100"\nports = [80]\n'
        'vms = [{port = "vm1", address = "10.2.0.11"}]\n'
    )
    cfg = config.load(path)
    assert cfg.on_vm_down == "drop" and cfg.health.path == "/ok"
    assert cfg.services[0].vms[0].address == "10.2.0.11"
    assert cfg.merged(routed=True).services == cfg.services
    path.write_text(path.read_text() + '[[service]]\nname = "web"\naddress = "192.0.2.101"\n')
    with pytest.raises(config.ConfigError, match="two services are named 'web'"):
        config.load(path)


def _state(services: list[Service], config_services: list[Service] | None) -> StateFile:
    return StateFile(services=services, config_services=config_services)


def test_merge_without_a_state_file_takes_the_config() -> None:
    assert merge([web()], None) == [web()]


def test_merge_keeps_runtime_changes_while_the_config_is_unchanged() -> None:
    drained = web(vms=[{"port": "vm1", "drained": True}])
    extra = web(name="extra", ports=[443])
    assert merge([web()], _state([drained, extra], [web()])) == [drained, extra]


def test_merge_config_changes_win() -> None:
    """A service the config changed is taken from the config; one it dropped goes."""
    drained = web(vms=[{"port": "vm1", "drained": True}])
    changed = web(ports=[8080])
    old = web(name="old", ports=[1])
    assert merge([changed], _state([drained, old], [web(), old])) == [changed]


def test_merge_a_service_removed_at_run_time_stays_removed() -> None:
    assert merge([web()], _state([], [web()])) == []


def test_the_store_round_trips_and_rejects_other_files(tmp_path: Path) -> None:
    store = ServiceStore(tmp_path / "d" / "services.json")
    assert store.load() is None
    state = _state([web()], [])
    state.ids["web"] = 3
    store.save(state)
    assert store.load() == state
    store.path.write_text('{"services": 7}')
    with pytest.raises(ServiceError, match="not a lasthop state file"):
        store.load()


@pytest.mark.root
@pytest.mark.netns
def test_the_state_does_not_outlive_its_namespace(tmp_path: Path) -> None:
    """A state file written in a namespace that has gone is not read (and is
    removed) in a new namespace of the same name: it does not get the old
    services back. In the namespace that wrote it, it is read as ever."""
    from pyroute2 import netns

    name = f"lh-state-{os.getpid()}"
    path = tmp_path / name / "services.json"
    state = _state([web()], [])
    for generation in ("old", "new"):
        netns.create(name)
        netns.pushns(name)
        try:
            if generation == "old":
                ServiceStore(path).save(state)
                assert ServiceStore(path).load() == state
            else:
                assert ServiceStore(path).load() is None
                assert not path.exists()
        finally:
            netns.popns()
            netns.remove(name)


# ---------------------------------------------------------------- the manager, state only


@contextlib.contextmanager
def _no_maps() -> Iterator[None]:
    raise NotAttachedError("nothing pinned")
    yield  # pragma: no cover


def manager(path: Path) -> ServiceManager:
    return ServiceManager("test", _no_maps, path=path)  # type: ignore[arg-type]


def test_changes_without_a_data_path_go_to_the_state_file(tmp_path: Path) -> None:
    """Nothing pinned: every change is kept in the state file for the next agent."""
    path = tmp_path / "services.json"
    m = manager(path)
    m.add(web())
    m.add_vms("web", [ServiceVm(port="vm3")])
    m.set_drained("web", ["vm2"], True)
    again = manager(path)
    svc = again.get("web")
    assert [(v.port, v.drained) for v in svc.vms] == [("vm1", False), ("vm2", True), ("vm3", False)]
    assert json.loads(path.read_text())["ids"] == {"web": 0}
    assert again.remove_vms("web", ["vm1"]) == {"moved": 0, "dropped": 0}
    assert again.remove("web") == 0
    assert manager(path).services == []


def test_ids_are_reused_lowest_first(tmp_path: Path) -> None:
    m = manager(tmp_path / "s.json")
    for i in range(3):
        m.add(web(name=f"s{i}", ports=[1000 + i]))
    m.remove("s1")
    m.add(web(name="s3", ports=[2000]))
    assert m.status("s3")[0].id == 1


def test_errors_name_what_is_wrong(tmp_path: Path) -> None:
    m = manager(tmp_path / "s.json")
    m.add(web())
    with pytest.raises(ServiceConflict, match="exists"):
        m.add(web())
    with pytest.raises(ServiceConflict, match="both claim"):
        m.add(web(name="other"))
    with pytest.raises(ServiceNotFound, match="no service named 'nope'"):
        m.remove("nope")
    with pytest.raises(ServiceNotFound, match="has no VM 'vm9'"):
        m.set_drained("web", ["vm9"], True)
    with pytest.raises(ServiceConflict, match="already in the pool"):
        m.add_vms("web", [ServiceVm(port="vm1")])


def test_health_thresholds(tmp_path: Path) -> None:
    """unknown -> the first result decides; up -> unhealthy after `fall` failures;
    -> down after `down_after`; back up after `rise` passes. Changes are counted."""
    m = manager(tmp_path / "s.json")
    m.add(web(health={"fall": 2, "rise": 2, "down_after": 4}))
    seq = [
        (True, "up"),
        (False, None),
        (False, "unhealthy"),
        (False, None),
        (False, "down"),
        (True, None),
        (True, "up"),
    ]
    assert [m.report("web", "vm1", ok, "") for ok, _ in seq] == [want for _, want in seq]
    assert m.health_of("web", "vm1").changes == 4
    assert m.health_changes == 4
    assert m.report("web", "gone", False, "") is None  # removed meanwhile: ignored
    assert manager(tmp_path / "s.json").health_of("web", "vm1").status == "up"  # persisted


def test_a_failing_new_vm_is_unhealthy_at_once(tmp_path: Path) -> None:
    m = manager(tmp_path / "s.json")
    m.add(web())
    assert m.report("web", "vm1", False, "refused") == "unhealthy"


# ---------------------------------------------------------------- the REST API


@pytest.fixture
def api(tmp_path: Path) -> Any:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lasthop.services.api import router

    class Holder:
        services = manager(tmp_path / "s.json")

    app = FastAPI()
    app.include_router(router(Holder()))
    return TestClient(app)


def test_api_add_list_drain_remove(api: Any) -> None:
    r = api.post(
        "/v1/services",
        json={
            "name": "web",
            "address": VIP,
            "ports": [80],
            "vms": [{"port": "vm1"}, {"port": "vm2"}],
        },
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["name"], body["proto"], body["ports"]) == ("web", "tcp", [80])
    assert [v["port"] for v in body["vms"]] == ["vm1", "vm2"]
    assert set(body["vms"][0]) >= {
        "port",
        "weight",
        "drained",
        "health",
        "link",
        "serving",
        "down",
        "slots",
        "changes",
        "since",
        "detail",
        "ifindex",
    }
    assert api.post("/v1/services/web/drain", json={"vms": ["vm2"]}).json()["vms"][1]["drained"]
    r = api.post("/v1/services/web/vms", json=[{"port": "vm3", "weight": 4}])
    assert [v["weight"] for v in r.json()["vms"]] == [1, 1, 4]
    assert api.delete("/v1/services/web/vms", params={"port": ["vm1", "vm3"]}).json() == {
        "moved": 0,
        "dropped": 0,
    }
    assert [s["name"] for s in api.get("/v1/services").json()] == ["web"]
    assert api.delete("/v1/services/web").json() == {"removed": "web", "forgotten": 0}
    assert api.get("/v1/services").json() == []


def test_api_errors(api: Any) -> None:
    assert api.get("/v1/services/nope").status_code == 404
    assert api.post("/v1/services", json={"name": "x", "address": "bad"}).status_code == 422
    api.post("/v1/services", json={"name": "web", "address": VIP})
    r = api.post("/v1/services", json={"name": "web", "address": VIP})
    assert (r.status_code, "exists" in r.json()["detail"]) == (409, True)
    assert api.post("/v1/services/web/undrain", json={"vms": ["vm9"]}).status_code == 404


# ---------------------------------------------------------------- the CLI, on a manager


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from lasthop.cli import cli as root

    client = service_cli.LocalServices(manager(tmp_path / "s.json"), attached=False)
    monkeypatch.setattr(service_cli, "_client", lambda *a: client)
    runner = CliRunner()

    def run(*args: str) -> Any:
        return runner.invoke(root, ["service", *args], catch_exceptions=False)

    return run


def test_cli_commands_and_exit_codes(cli: Any) -> None:
    r = cli(
        "add",
        "web",
        "--address",
        VIP,
        "--port",
        "80",
        "--vm",
        "vm1",
        "--vm",
        "vm2:3@10.2.0.12",
        "--check",
        "http",
        "--check-path",
        "/health",
        "--json",
    )
    assert r.exit_code == 0, r.output
    body = json.loads(r.output)
    assert body["health"]["type"] == "http" and body["health"]["path"] == "/health"
    assert [(v["port"], v["weight"], v["address"]) for v in body["vms"]] == [
        ("vm1", 1, None),
        ("vm2", 3, "10.2.0.12"),
    ]
    assert cli("add", "web", "--vm", "vm3").exit_code == 0
    assert cli("drain", "web", "vm1").exit_code == 0
    listed = json.loads(cli("list", "--json").output)
    assert [(v["port"], v["drained"]) for v in listed[0]["vms"]] == [
        ("vm1", True),
        ("vm2", False),
        ("vm3", False),
    ]
    assert "web" in cli("list").output
    assert cli("undrain", "web", "vm1").exit_code == 0
    assert cli("remove", "web", "vm3").exit_code == 0
    # exit codes: 2 invalid or taken, 4 no such service or VM
    assert cli("add", "web", "--address", VIP).exit_code == 2
    assert cli("add", "bad", "--address", "nope").exit_code == 2
    assert cli("add", "x", "--vm", "vm1:zero").exit_code == 2
    assert cli("add", "web", "--port", "81").exit_code == 2
    assert cli("drain", "web", "vm9").exit_code == 4
    assert cli("remove", "nope").exit_code == 4
    assert cli("remove", "web").exit_code == 0
    assert json.loads(cli("list", "--json").output) == []


# ---------------------------------------------------------------- on a real kernel, with an agent


@pytest.fixture
def agent_box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from agentlib import sandbox

    monkeypatch.setenv("LASTHOP_STATE_DIR", str(tmp_path / "run"))  # agents and CLIs inherit it
    with sandbox() as box:
        yield box


def _pinned_table(ns: Any) -> tuple[set[bytes], list[int] | None]:
    from lasthop import libbpf
    from lasthop.services.lookup import read_table

    services = libbpf.Map.pinned(ns.pins / "lh_services")
    maglev = libbpf.Map.pinned(ns.pins / "lh_maglev")
    try:
        return set(services.keys()), read_table(maglev, 0)
    finally:
        services.close()
        maglev.close()


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
def test_cli_through_the_agent_and_without_it_across_a_restart(
    agent_box: Any, tmp_path: Path
) -> None:
    """`service add` goes through the running agent; with the agent stopped,
    `service drain` edits the pinned maps and the state file; the restarted
    agent keeps the service and the drain."""
    from agentlib import lasthop

    box = agent_box
    ns = box.host(uplinks=1, vm_ports=3)
    args = ("--uplink", "up0", "--vm-port", "vm0", "--vm-port", "vm1", "--vm-port", "vm2")
    agent = box.agent(*args, netns=ns)
    r = lasthop(
        "service",
        "add",
        "web",
        "--netns",
        ns.name,
        "--address",
        VIP,
        "--port",
        "80",
        "--vm",
        "vm0",
        "--vm",
        "vm1",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    listed = lasthop("service", "list", "--netns", ns.name)
    assert "(agent)" in listed.stdout and "serving" in listed.stdout
    keys, table = _pinned_table(ns)
    assert len(keys) == 1 and table is not None
    assert set(table) == {ns.ifindex("vm0"), ns.ifindex("vm1")}
    state = json.loads((tmp_path / "run" / ns.name / "services.json").read_text())
    assert [s["name"] for s in state["services"]] == ["web"]

    assert agent.stop() == 0
    r = lasthop("service", "drain", "web", "vm1", "--netns", ns.name)
    assert r.returncode == 0, r.stderr
    assert "pinned maps and state file" in r.stdout
    assert set(_pinned_table(ns)[1] or []) == {ns.ifindex("vm0")}

    box.agent(*args, netns=ns)
    body = json.loads(lasthop("service", "list", "--netns", ns.name, "--json").stdout)
    assert [(v["port"], v["drained"], v["serving"]) for v in body[0]["vms"]] == [
        ("vm0", False, True),
        ("vm1", True, False),
    ]
    assert set(_pinned_table(ns)[1] or []) == {ns.ifindex("vm0")}
    assert lasthop("service", "remove", "web", "--netns", ns.name).returncode == 0
    assert _pinned_table(ns) == (set(), None)
    assert lasthop("service", "remove", "web", "--netns", ns.name).returncode == 4


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
def test_without_the_agent_a_removed_vms_connections_move_through_the_pinned_walker(
    agent_box: Any,
) -> None:
    """The agent pins lh_svc_walk; with the agent stopped, `service remove web vm1`
    runs it through that pin: the service's entries on vm1 (confirmed and
    pending) move to vm0, the table's only VM left, and vm1's shortcut entry
    of another address stays."""
    from agentlib import PinnedTable, conn_key, lasthop
    from lasthop import libbpf
    from lasthop.datapath import request_expiry

    box = agent_box
    ns = box.host(uplinks=1, vm_ports=2)
    agent = box.agent("--uplink", "up0", "--vm-port", "vm0", "--vm-port", "vm1", netns=ns)
    add = ("service", "add", "web", "--netns", ns.name, "--address", VIP, "--port", "80")
    r = lasthop(*add, "--vm", "vm0", "--vm", "vm1")
    assert r.returncode == 0, r.stderr
    assert (ns.pins / "lh_svc_walk").exists()
    vm0, vm1 = ns.ifindex("vm0"), ns.ifindex("vm1")
    table = PinnedTable(ns.pins)
    try:
        ours = [conn_key("198.51.100.7", VIP, 40000 + i, 80, proto=6) for i in range(3)]
        other = conn_key("198.51.100.7", "192.0.2.7", 40000, 80, proto=6)
        for i, key in enumerate([*ours, other]):
            entry = abi.ConnEntry(
                vm_ifindex=vm1,
                ifindex=ns.ifindex("up0"),
                packets=1,
                flags=abi.F_ENTRY_HOP_KNOWN | (abi.F_ENTRY_VM_FAST if key is other else 0),
                state=int(abi.State.TCP_ESTABLISHED),
                last_seen=table.clock.jiffies(),
            )
            (table.pending if i == 0 else table.conns).update(bytes(key), bytes(entry))
        expiry = libbpf.Map.pinned(ns.pins / "lh_expiry_request")
        try:
            request_expiry(expiry)  # as every writer from user space must
        finally:
            expiry.close()
        assert agent.stop() == 0
        r = lasthop("service", "remove", "web", "vm1", "--netns", ns.name, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"moved": 3, "dropped": 0}
        for i, key in enumerate(ours):
            raw = (table.pending if i == 0 else table.conns).lookup(bytes(key))
            assert raw is not None and abi.ConnEntry.from_buffer_copy(raw).vm_ifindex == vm0
        raw = table.conns.lookup(bytes(other))
        assert raw is not None and abi.ConnEntry.from_buffer_copy(raw).vm_ifindex == vm1
    finally:
        table.close()
