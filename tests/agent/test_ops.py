"""The agent as systemd runs it (the unit's ExecStart and ExecReload, a fake
NOTIFY_SOCKET), in private namespaces on the real kernel: READY, STATUS,
WATCHDOG; a reload applies what can change live and keeps the table size
(with a warning naming it); a bad config is refused naming its key and the
running config stays; the unix socket's group and its callers' uids."""

from __future__ import annotations

import grp
import os
import signal
import sys
from pathlib import Path

import pytest

from agentlib import (
    ROOT_MARKS,
    Netns,
    NotifySocket,
    PinnedTable,
    Sandbox,
    conn_key,
    lasthop,
    sh,
    unit_command,
    wait_for,
)
from lasthop import abi, libbpf
from lasthop.lab.runner import AgentProcess
from lasthop.services.cli import AgentClient

pytestmark = ROOT_MARKS


def write_config(path: Path, netns: str, body: str) -> Path:
    path.write_text(f'netns = "{netns}"\nexpiry_interval = 0.5\n{body}')
    return path


def as_unit(box: Sandbox, config: Path, notify: NotifySocket) -> AgentProcess:
    """The agent started by the unit's ExecStart, in systemd's environment."""
    log = box.logs / f"agent{len(box.agents)}.log"
    log.touch()
    st = log.stat()
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(notify.path),
        "WATCHDOG_USEC": "1000000",
        "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}",  # stderr is "the journal"
    }
    agent = AgentProcess(unit_command("ExecStart", config), log, env=env)
    box.agents.append(agent)
    agent.start()
    return agent


def settings(pins: Path) -> abi.Settings:
    m = libbpf.Map.pinned(pins / "lh_settings")
    try:
        raw = m.lookup(bytes(4))
        assert raw is not None
        return abi.Settings.from_buffer_copy(raw)
    finally:
        m.close()


def test_the_unit_reports_ready_status_and_watchdog(box: Sandbox) -> None:
    """READY=1 once attached, with STATUS naming the entries; WATCHDOG=1 every
    half WATCHDOG_USEC; SIGHUP (a reload) sends RELOADING=1 then READY=1 again;
    log lines under the journal carry no timestamp."""
    ns = box.host()
    notify = NotifySocket(box.logs)
    try:
        cfg = write_config(
            box.logs / "lasthop.toml",
            ns.name,
            '[[uplink]]\nname = "up0"\n[[vm_port]]\nname = "vm0"\n',
        )
        agent = as_unit(box, cfg, notify)
        ready = notify.wait_for("READY")
        assert ready["STATUS"] == "0 entries; 1 uplinks, 1 VM ports"
        assert ready["MAINPID"] == str(agent.proc.pid) if agent.proc else False
        notify.wait_for("WATCHDOG", timeout=5)
        notify.wait_for("WATCHDOG", timeout=5)
        table = PinnedTable(ns.pins)
        try:
            table.add(conn_key("10.0.0.1", "10.0.0.2", 1000, 80, proto=6))
        finally:
            table.close()
        wait_for(lambda: notify.wait_for("STATUS", timeout=5)["STATUS"].startswith("1 entries"))
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        assert notify.wait_for("RELOADING")["RELOADING"] == "1"
        assert notify.wait_for("READY")["STATUS"].startswith("1 entries")
        assert agent.running
        print("notify messages seen:", *notify.seen, sep="\n  ")  # for the note
        lines = agent.stderr.splitlines()
        assert "<6>attach role=uplink interface=up0" in "\n".join(lines)
        assert any(line.startswith("<6>reload changed=nothing") for line in lines), lines
    finally:
        notify.close()


def test_reload_applies_live_keys_and_keeps_the_table_size(box: Sandbox) -> None:
    """The unit's ExecReload after the config gained an uplink, a new timeout and
    a bigger table: up1 is attached, the timeout is in lh_settings, table_size
    keeps its value with a warning naming it, and the table's entry stays."""
    ns = box.host(uplinks=2)
    notify = NotifySocket(box.logs)
    try:
        cfg = box.logs / "lasthop.toml"
        base = '[[uplink]]\nname = "up0"\n[[vm_port]]\nname = "vm0"\n'
        write_config(cfg, ns.name, "table_size = 1024\n" + base)
        as_unit(box, cfg, notify)
        table = PinnedTable(ns.pins)
        key = conn_key("10.0.0.1", "10.0.0.2", 1000, 80, proto=6)
        try:
            table.add(key)
            assert ns.tc_program("up1") is None
            write_config(
                cfg,
                ns.name,
                "table_size = 4096\n[timeouts]\ntcp_established = 1234\n"
                + base
                + '[[uplink]]\nname = "up1"\nzone = 0\n',
            )
            result = sh(*unit_command("ExecReload", cfg), check=False)
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == "reloaded: changed uplink, timeouts"
            assert "warning: table_size cannot change while running" in result.stderr
            assert ns.tc_program("up1") == "lh_uplink"
            assert settings(ns.pins).timeout[abi.State.TCP_ESTABLISHED] == 1234
            # table_size (+ the default in-place room, a quarter of lh_pending4's 1024)
            assert table.conns.map4.info.max_entries == 1024 + 256
            assert bytes(key) in table.keys()  # noqa: SIM118 (PinnedTable.keys: both tables)
        finally:
            table.close()
    finally:
        notify.close()


RELOAD_BASE = '[[uplink]]\nname = "up0"\n'


@pytest.fixture(scope="module")
def reloadable(module_box: Sandbox) -> tuple[Netns, Path, AgentProcess]:
    """One agent run from a config file (uplink up0; up1 exists but is not in it),
    shared by the bad-config cases below: each leaves it as it found it. Its
    namespace, config file and process."""
    ns = module_box.host(uplinks=2)
    cfg = write_config(module_box.logs / "reloadable.toml", ns.name, RELOAD_BASE)
    return ns, cfg, module_box.agent("--config", str(cfg), netns=None)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[timeouts]\ntcp_syn = -1\n", "key 'timeouts.tcp_syn': Input should be greater than 0"),
        ('[[uplink]]\nname = "up9"\n', "key 'uplink[0].name': uplink 'up9' not found"),
        ("table_sise = 10\n", "key 'table_sise': Extra inputs are not permitted"),
        ('api = "0.0.0.0:9180"\n', "key 'api': Value error, refusing to serve the API on"),
    ],
)
def test_a_bad_config_is_refused_naming_the_key_and_the_running_one_stays(
    reloadable: tuple[Netns, Path, AgentProcess], body: str, message: str
) -> None:
    ns, cfg, agent = reloadable
    assert ns.tc_program("up1") is None
    refused = agent.stderr.count("reload_refused")
    write_config(cfg, ns.name, body + RELOAD_BASE)  # top-level keys before the tables
    result = lasthop("reload", "--config", str(cfg))
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in " ".join(result.stderr.split()), result.stderr
    assert ns.tc_program("up0") == "lh_uplink"
    write_config(cfg, ns.name, RELOAD_BASE + '[[uplink]]\nname = "up1"\n')  # a good one applies
    assert lasthop("reload", "--config", str(cfg)).returncode == 0
    assert ns.tc_program("up1") == "lh_uplink"
    assert agent.running
    assert agent.stderr.count("reload_refused") == refused + 1
    # back to the config the next case starts from: up1 detached again
    write_config(cfg, ns.name, RELOAD_BASE)
    assert lasthop("reload", "--config", str(cfg)).returncode == 0
    assert ns.tc_program("up1") is None


def test_reload_through_the_api_and_the_unix_sockets_group_and_callers(box: Sandbox) -> None:
    """POST /v1/reload answers with what changed; the socket belongs to
    api_socket_group; an API write is logged with the caller's uid."""
    group = next((g for g in ("nogroup", "daemon", "adm") if _has_group(g)), None)
    if group is None:
        pytest.skip("no group to give the socket to")
    ns = box.host()
    cfg = box.logs / "lasthop.toml"
    body = f'api_socket_group = "{group}"\n[[uplink]]\nname = "up0"\n'
    write_config(cfg, ns.name, body)
    argv = [sys.executable, "-m", "lasthop", "--log-level", "info", "run", "--config", str(cfg)]
    agent = AgentProcess(argv, box.logs / "a.log")
    box.agents.append(agent)
    agent.start()
    st = ns.socket.stat()
    assert st.st_gid == grp.getgrnam(group).gr_gid and st.st_mode & 0o777 == 0o660
    client = AgentClient(ns.socket)
    write_config(cfg, ns.name, body + "[timeouts]\nudp_new = 5\n")
    assert client.call("POST", "/v1/reload") == {
        "changed": ["timeouts"],
        "kept": [],
        "attached": [],
        "detached": [],
    }
    assert client.call("POST", "/v1/flush") == {"flushed": 0}
    log = agent.stderr
    assert f'api_write who="uid {os.getuid()}" method=POST path=/v1/flush' in log, log
    assert "flush removed=0" in log


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


FETCH = r"""
import sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[1], method=sys.argv[2])
if len(sys.argv) > 3:
    req.add_header("Authorization", "Bearer " + sys.argv[3])
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
"""


def test_over_tcp_the_real_agent_asks_every_request_for_its_token(box: Sandbox) -> None:
    """A real agent with api_tokens: over TCP, no token is 401, a read token's
    POST is 403, a write token's POST is served and logged with its name;
    the unix socket still needs none."""
    ns = box.host()
    tokens = box.logs / "tokens.toml"
    tokens.write_text(
        '[[token]]\nname = "grafana"\naccess = "read"\nsecret = "' + "r" * 24 + '"\n'
        '[[token]]\nname = "ops"\naccess = "write"\nsecret = "' + "w" * 24 + '"\n'
    )
    tokens.chmod(0o600)
    cfg = box.logs / "lasthop.toml"
    write_config(cfg, ns.name, f'api_tokens = "{tokens}"\napi = "127.0.0.1:9181"\n'
                 '[[uplink]]\nname = "up0"\n')  # fmt: skip
    info = {**os.environ, "LASTHOP_LOG_LEVEL": "info"}  # api_write is an info line
    agent = box.agent("--config", str(cfg), netns=None, env=info)
    url = "http://127.0.0.1:9181"

    def fetch(path: str, method: str = "GET", *token: str) -> tuple[int, str]:
        out = ns.exec(sys.executable, "-c", FETCH, url + path, method, *token).stdout
        code, _, body = out.strip().partition(" ")
        return int(code), body

    code, body = fetch("/healthz")
    assert code == 401 and "needs a token" in body
    assert fetch("/healthz", "GET", "x" * 24) == (401, '{"detail":"unknown token"}')
    assert fetch("/healthz", "GET", "r" * 24)[0] == 200
    code, body = fetch("/v1/flush", "POST", "r" * 24)
    assert code == 403 and "token 'grafana' is read-only" in body
    assert fetch("/v1/flush", "POST", "w" * 24) == (200, '{"flushed":0}')
    assert AgentClient(ns.socket).call("GET", "/healthz")["status"] == "ok"
    wait_for(lambda: "api_write who=ops method=POST path=/v1/flush status=200" in agent.stderr)
