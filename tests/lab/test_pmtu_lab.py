"""Path-MTU discovery through a routed host whose VM network is narrower
than the clients' links: the host itself answers a client's big segment with
"fragmentation needed" / "packet too big", which its own routing sends to its
default gateway -- a firewall that never saw the connection and drops the
error. The client keeps sending segments that cannot pass and the connection
stalls. lasthop's uplink egress program sends the error back by the firewall
the connection came through, and the transfer completes."""

from __future__ import annotations

import socket
import time

import pytest

from lasthop.lab import Lab, runner
from lasthop.lab import plan as P
from lasthop.lab.namespaces import ip_batch, open_socket

needs_agent = pytest.mark.skipif(not runner.available(), reason="agent not built yet")
pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.bpf, needs_agent]

NARROW_MTU = 1280  # the host's side of the VM network (IPv6's minimum)
PAYLOAD = bytes(range(256)) * 32  # 8 KiB: full-size segments from a 1500-byte client link
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}


def narrow_the_vm_network(lab: Lab) -> None:
    """The host's side of the VM network -- the bridge and its VM ports -- is
    narrower than the VMs' own links (which still advertise a 1460-byte MSS)."""
    host = lab.plan.host
    ports = [lab.plan.vm(n).port for n in lab.plan.vms]
    ip_batch(host.ns, [f"link set dev {dev} mtu {NARROW_MTU}" for dev in (*ports, host.bridge)])


def echo_big(lab: Lab, client: int, vm: int, family: int, timeout: float) -> bool:
    """Sends PAYLOAD over a new TCP connection to the VM's echo server; True
    when all of it comes back within *timeout* seconds."""
    sock = open_socket(lab.plan.client(client).ns, _AF[family], socket.SOCK_STREAM)
    deadline = time.monotonic() + timeout
    try:
        sock.settimeout(timeout)
        sock.connect((lab.plan.vm(vm).addr.of(family), P.ECHO_PORT))
        sock.sendall(PAYLOAD)
        got = b""
        while len(got) < len(PAYLOAD):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                return False
            got += chunk
        return got == PAYLOAD
    except OSError:
        return False
    finally:
        sock.close()


@pytest.mark.parametrize("family", [4, 6])
def test_path_mtu_discovery_works_through_the_host(routed_lab: Lab, family: int) -> None:
    narrow_the_vm_network(routed_lab)
    # the path through fw1 (the host's default route) is symmetric: the control
    assert echo_big(routed_lab, client=1, vm=1, family=family, timeout=5.0)
    # through fw2, without lasthop, the host's error goes to fw1 and dies
    assert not echo_big(routed_lab, client=2, vm=1, family=family, timeout=2.0)
    with runner.AgentRunner(routed_lab.plan):
        assert echo_big(routed_lab, client=2, vm=1, family=family, timeout=5.0)
        assert runner.stats(routed_lab.plan)["totals"]["host_icmp_redirected"] >= 1
