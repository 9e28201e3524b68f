"""Reloading the agent under traffic, as systemd runs it (issue 10's "Done
when"): the unit's ExecStart with NOTIFY_SOCKET, WATCHDOG_USEC and the journal
as stderr; three reloads by the unit's ExecReload while every client keeps a
TCP connection to every VM busy — an uplink added, a timeout changed, a
service added — and not one exchange fails.

    cl1..3 ── fw1..3 ──┐ (stateful: drop what they did not see start)
                       sw ── uplink ┐
                                   br0 (host: lasthop) ── vm1..3  (echo servers)
                         lhx0 ┘ (a second uplink, added by reload 1)
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from agentlib import NotifySocket, unit_command
from lasthop.lab import Lab, runner, traffic
from lasthop.lab.demo import expect_all_ok, expect_asymmetric
from lasthop.lab.namespaces import eventually, run
from lasthop.lab.runner import AgentProcess
from lasthop.lab.services import VIP, serve_vip
from lasthop.lab.services import config as services_config
from lasthop.lab.traffic import EchoSession

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.bpf, pytest.mark.slow]


class Busy:
    """Round after round of one exchange on every session, in a thread, until stopped."""

    def __init__(self, sessions: list[EchoSession]) -> None:
        self.sessions = sessions
        self.rounds = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for s in self.sessions:
                if not s.exchange():
                    self.failures.append(f"{s.client.name} -> {s.dst} round {self.rounds}")
            self.rounds += 1

    def __enter__(self) -> Busy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def wait_rounds(self, n: int) -> None:
        """Until *n* more full rounds have run (the traffic goes on across each reload)."""
        target = self.rounds + n
        assert eventually(lambda: self.rounds >= target, timeout=30, every=0.05), self.failures


def test_three_reloads_under_traffic_lose_no_connection(
    bridged_lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab, plan = bridged_lab, bridged_lab.plan
    monkeypatch.setenv("LASTHOP_STATE_DIR", str(tmp_path / "run"))  # the services' state file
    serve_vip(lab)
    cfg = tmp_path / "lasthop.toml"
    head = f'netns = "{plan.host.ns}"\nexpiry_interval = 0.5\n'
    uplinks = f'[[uplink]]\nname = "{plan.host.uplink}"\n'
    vm_ports = "".join(f'[[vm_port]]\nname = "{plan.vm(n).port}"\n' for n in plan.vms)
    cfg.write_text(head + uplinks + vm_ports)
    notify = NotifySocket(tmp_path)
    log = tmp_path / "agent.log"
    log.touch()
    st = log.stat()
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(notify.path),
        "WATCHDOG_USEC": "2000000",
        "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}",
    }
    agent = AgentProcess(unit_command("ExecStart", cfg), log, env=env)
    sessions: list[EchoSession] = []

    def reload(changed: str) -> None:
        result = run(unit_command("ExecReload", cfg), check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"reloaded: changed {changed}"
        assert notify.wait_for("RELOADING")
        assert notify.wait_for("READY")

    without = traffic.check(plan, n=1, protos=["tcp"], timeout=1.0)
    assert expect_asymmetric(without, "without lasthop") == []  # cl2, cl3 die without it
    try:
        agent.start()
        notify.wait_for("READY")
        sessions = [EchoSession(plan, client=c, vm=v) for c in plan.sites for v in plan.vms]
        assert all(s.exchange() for s in sessions)
        with Busy(sessions) as busy:
            busy.wait_rounds(3)
            # 1: an uplink added
            run(["ip", "-n", plan.host.ns, "link", "add", "lhx0", "type", "veth",
                 "peer", "name", "lhx0p"])  # fmt: skip
            run(["ip", "-n", plan.host.ns, "link", "set", "lhx0", "up"])
            uplinks += '[[uplink]]\nname = "lhx0"\n'
            cfg.write_text(head + uplinks + vm_ports)
            reload("uplink")
            busy.wait_rounds(3)
            # 2: a timeout changed
            head += "[timeouts]\ntcp_established = 3600\n"
            cfg.write_text(head + uplinks + vm_ports)
            reload("timeouts")
            busy.wait_rounds(3)
            # 3: a service added (vm1..3 behind VIP)
            cfg.write_text(head + uplinks + vm_ports + services_config(plan))
            reload("service, health")
            busy.wait_rounds(3)
        assert busy.failures == [], busy.failures
        assert busy.rounds >= 12
        print(f"{len(sessions)} connections, {busy.rounds} rounds of exchanges, 3 reloads, 0 lost")
        assert set(runner.services(plan)) == {"web", "web6"}
        with EchoSession(plan, client=plan.sites[0], address=VIP) as to_service:
            assert to_service.exchange(), "a new connection to the reloaded service failed"
        assert expect_all_ok(traffic.check(plan, n=1), "new connections after 3 reloads") == []
        assert "lhx0" in [row["name"] for row in _interfaces(plan)]
        assert agent.running
        assert not any(line[:1].isdigit() for line in agent.stderr.splitlines())  # no time
    finally:
        for s in sessions:
            s.close()
        agent.stop()
        notify.close()
        runner.detach(plan)


def _interfaces(plan: object) -> list[dict[str, object]]:
    from lasthop.services.cli import AgentClient

    ns = plan.host.ns  # type: ignore[attr-defined]
    return list(AgentClient(Path(f"/run/lasthop/{ns}.sock")).call("GET", "/v1/interfaces"))
