"""lasthop.capture and `lasthop pcap`: captures written by scapy (an
independent tool), read back by the report.

Each case is a conversation on a host's uplink: the frames (MACs, tags,
files), and what the report must say of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import ARP, CookedLinux, Dot1AD, Dot1Q, Ether
from scapy.packet import Packet, Raw
from scapy.utils import PcapNgWriter, wrpcap

from lasthop.capture import Hop, analyse, read_names
from lasthop.cli import cli
from lasthop.errors import ConfigError

FW1, FW2, FW3 = "02:00:00:f0:00:01", "02:00:00:f0:00:02", "02:00:00:f0:00:03"
HOST, HOST2 = "02:00:00:b0:00:01", "02:00:00:b0:00:02"
CLIENT4, SERVER4 = "10.1.2.3", "10.0.0.11"
CLIENT6, SERVER6 = "fd00:2::3", "fd00::11"
CPORT, SPORT = 40000, 80


def in4(mac: str, l4: Packet, *, tags: tuple[int, ...] = ()) -> Packet:
    """A request: firewall *mac* -> host."""
    return _eth(mac, HOST, tags) / IP(src=CLIENT4, dst=SERVER4) / l4


def out4(mac: str, l4: Packet, *, tags: tuple[int, ...] = (), src: str = HOST) -> Packet:
    """A reply: host -> firewall *mac*."""
    return _eth(src, mac, tags) / IP(src=SERVER4, dst=CLIENT4) / l4


def in6(mac: str, l4: Packet) -> Packet:
    return Ether(src=mac, dst=HOST) / IPv6(src=CLIENT6, dst=SERVER6) / l4


def out6(mac: str, l4: Packet) -> Packet:
    return Ether(src=HOST, dst=mac) / IPv6(src=SERVER6, dst=CLIENT6) / l4


def _eth(src: str, dst: str, tags: tuple[int, ...]) -> Packet:
    frame = Ether(src=src, dst=dst)
    for i, vid in enumerate(tags):
        frame = frame / (Dot1AD(vlan=vid) if i == 0 and len(tags) == 2 else Dot1Q(vlan=vid))
    return frame


SYN = TCP(sport=CPORT, dport=SPORT, flags="S")
SYNACK = TCP(sport=SPORT, dport=CPORT, flags="SA")
ACK = TCP(sport=CPORT, dport=SPORT, flags="A")
DATA_BACK = TCP(sport=SPORT, dport=CPORT, flags="PA") / Raw(b"x")


@dataclass
class Case:
    name: str
    files: dict[str, list[Packet]]  # file name -> frames (in time order across files)
    summary: dict[str, int]  # the report's summary figures that must hold
    pairs: dict[tuple[str, str], int] = field(default_factory=dict)  # (came mac, went mac) -> n
    skipped: dict[str, int] = field(default_factory=dict)


CASES = [
    Case(
        "tcp handshake through one firewall: symmetric",
        {"up0.pcap": [in4(FW1, SYN), out4(FW1, SYNACK), in4(FW1, ACK)]},
        {"connections": 1, "symmetric": 1, "return_asymmetric": 0, "requests": 2},
    ),
    Case(
        "request by fw2, reply to fw1: the reply left by another way",
        {"up0.pcap": [in4(FW2, SYN), out4(FW1, SYNACK), in4(FW2, SYN)]},
        {"connections": 1, "symmetric": 0, "return_asymmetric": 1, "forward_asymmetric": 0},
        pairs={(FW2, FW1): 1},
    ),
    Case(
        "the SYN-ACK seen first: the receiver is the client",
        {"up0.pcap": [out4(FW1, SYNACK), in4(FW3, ACK)]},
        {"connections": 1, "return_asymmetric": 1, "guessed": 0},
        pairs={(FW3, FW1): 1},
    ),
    Case(
        "mid-stream TCP: the higher port is the client's, marked guessed",
        {"up0.pcap": [out4(FW1, DATA_BACK), in4(FW2, ACK)]},
        {"connections": 1, "return_asymmetric": 1, "guessed": 1},
        pairs={(FW2, FW1): 1},
    ),
    Case(
        "UDP over IPv6, asymmetric",
        {"up0.pcap": [in6(FW3, UDP(sport=5353, dport=53)), out6(FW1, UDP(sport=53, dport=5353))]},
        {"connections": 1, "return_asymmetric": 1},
        pairs={(FW3, FW1): 1},
    ),
    Case(
        "ICMP echo, IPv4 and IPv6, symmetric and not",
        {
            "up0.pcap": [
                in4(FW1, ICMP(type=8, id=7)),
                out4(FW1, ICMP(type=0, id=7)),
                in6(FW2, ICMPv6EchoRequest(id=9)),
                out6(FW1, ICMPv6EchoReply(id=9)),
            ]
        },  # fmt: skip
        {"connections": 2, "symmetric": 1, "return_asymmetric": 1},
        pairs={(FW2, FW1): 1},
    ),
    Case(
        "same MAC, other VLAN: asymmetric",
        {"up0.pcap": [in4(FW1, SYN, tags=(100,)), out4(FW1, SYNACK, tags=(200,))]},
        {"connections": 1, "return_asymmetric": 1},
        pairs={(FW1, FW1): 1},
    ),
    Case(
        "QinQ tags kept apart from single tags: same stack, symmetric",
        {"up0.pcap": [in4(FW1, SYN, tags=(10, 100)), out4(FW1, SYNACK, tags=(10, 100))]},
        {"connections": 1, "symmetric": 1},
    ),
    Case(
        "request on up0, reply on up1: another way though the same firewall MAC",
        {"up0.pcap": [in4(FW1, SYN)], "up1.pcap": [out4(FW1, SYNACK)]},
        {"connections": 1, "return_asymmetric": 1},
        pairs={(FW1, FW1): 1},
    ),
    Case(
        "reply sent from another host MAC: answered from another way, return symmetric",
        {"up0.pcap": [in4(FW1, SYN), out4(FW1, SYNACK, src=HOST2)]},
        {"connections": 1, "symmetric": 0, "return_asymmetric": 0, "forward_asymmetric": 1},
    ),
    Case(
        "no reply: unanswered, neither symmetric nor not",
        {"up0.pcap": [in4(FW2, SYN), in4(FW2, SYN)]},
        {"connections": 1, "unanswered": 1, "symmetric": 0, "return_asymmetric": 0},
    ),
    Case(
        "ARP, a later fragment and an ICMP error carry no connection",
        {
            "up0.pcap": [
                Ether(src=FW1, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=CLIENT4, pdst=SERVER4),
                Ether(src=FW1, dst=HOST)
                / IP(src=CLIENT4, dst=SERVER4, frag=10, proto=17)
                / Raw(b"y" * 8),
                in4(FW1, ICMP(type=3, code=4)),
            ]
        },  # fmt: skip
        {"frames": 3, "connections": 0},
        skipped={"not_ip": 1, "fragment": 1, "icmp_other": 1},
    ),
]


def write(tmp: Path, case: Case, *, pcapng: bool = False) -> list[Path]:
    """The case's files, each frame stamped in the case's order (across files)."""
    t = 1_700_000_000.0
    paths = []
    for name, frames in case.files.items():
        for frame in frames:
            # the case lists every frame of every file: stamp them in listing order
            frame.time = t + _order(case, frame)
        path = tmp / (name.replace(".pcap", ".pcapng") if pcapng else name)
        if pcapng:
            with PcapNgWriter(str(path)) as w:
                for frame in frames:
                    w.write(frame)
        else:
            wrpcap(str(path), frames)
        paths.append(path)
    return paths


def _order(case: Case, frame: Packet) -> float:
    seq = [f for frames in case.files.values() for f in frames]
    return next(i for i, f in enumerate(seq) if f is frame) / 1000


@pytest.mark.parametrize("pcapng", [False, True], ids=["pcap", "pcapng"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_report(tmp_path: Path, case: Case, pcapng: bool) -> None:
    report = analyse(write(tmp_path, case, pcapng=pcapng))
    summary = report.summary()
    for key, want in case.summary.items():
        if key == "requests":
            (conn,) = report.conns.values()
            assert conn.requests == want
            continue
        assert summary[key] == want, (key, summary)
    got = {(came.mac, went.mac): n for (came, went), n in report.pairs().items()}
    assert got == case.pairs
    assert dict(report.skipped) == case.skipped


def test_hops_name_the_file_mac_and_tags(tmp_path: Path) -> None:
    case = next(c for c in CASES if c.name.startswith("same MAC, other VLAN"))
    report = analyse(write(tmp_path, case))
    ((came, went),) = report.pairs()
    assert came == Hop("up0", FW1, (100,)) and went == Hop("up0", FW1, (200,))
    assert came.label({FW1: "fw1"}) == f"up0: fw1 ({FW1}) vlan 100"


def test_many_connections_counted_per_pair(tmp_path: Path) -> None:
    frames = []
    for i in range(50):
        fw = (FW1, FW2, FW3)[i % 3]
        syn = TCP(sport=CPORT + i, dport=SPORT, flags="S")
        synack = TCP(sport=SPORT, dport=CPORT + i, flags="SA")
        frames += [in4(fw, syn), out4(FW1, synack)]
    for i, f in enumerate(frames):
        f.time = 1_700_000_000 + i / 1000
    wrpcap(str(tmp_path / "up0.pcap"), frames)
    report = analyse([tmp_path / "up0.pcap"])
    got = {(a.mac, b.mac): n for (a, b), n in report.pairs().items()}
    assert got == {(FW2, FW1): 17, (FW3, FW1): 16}
    assert report.summary()["symmetric"] == 17


def test_cooked_capture_is_refused_with_the_reason(tmp_path: Path) -> None:
    wrpcap(str(tmp_path / "any.pcap"), [CookedLinux() / IP(src=CLIENT4, dst=SERVER4) / SYN])
    with pytest.raises(ConfigError, match="no destination MAC.*not on 'any'"):
        analyse([tmp_path / "any.pcap"])


def test_not_a_capture(tmp_path: Path) -> None:
    (tmp_path / "x.pcap").write_bytes(b"hello, not a capture at all")
    with pytest.raises(ConfigError, match="not a pcap or pcapng capture"):
        analyse([tmp_path / "x.pcap"])
    with pytest.raises(ConfigError, match="cannot read"):
        analyse([tmp_path / "missing.pcap"])


def test_a_capture_cut_short_counts_what_was_read(tmp_path: Path) -> None:
    case = CASES[1]
    (path,) = write(tmp_path, case)
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # tcpdump killed mid-record: the last SYN lost its end
    report = analyse([path])
    assert report.frames == 3 and dict(report.skipped) == {"truncated": 1}
    (conn,) = report.conns.values()
    assert (conn.requests, conn.replies) == (1, 1)
    path.write_bytes(data[:-80])  # the last record gone, the one before cut short
    assert analyse([path]).frames == 2


def test_names_file() -> None:
    assert read_names([f"{FW1.upper()} fw1  # the first", "", "# nothing"]) == {FW1: "fw1"}
    with pytest.raises(ConfigError, match="names line 2: expected 'MAC NAME'"):
        read_names([f"{FW1} fw1", "fw2"])


def test_cli_json_and_exit_codes(tmp_path: Path) -> None:
    (path,) = write(tmp_path, CASES[1])
    runner = CliRunner()
    got = runner.invoke(cli, ["pcap", str(path), "--name", f"{FW2}=fw2", "--json"])
    assert got.exit_code == 0, got.output
    out = json.loads(got.output)
    assert out["summary"]["return_asymmetric"] == 1
    assert out["pairs"] == [
        {"request_from": f"up0: fw2 ({FW2})", "reply_to": f"up0: {FW1}", "connections": 1}
    ]
    (conn,) = out["return_asymmetric"]
    assert (conn["client"], conn["client_port"], conn["server_port"]) == (CLIENT4, CPORT, SPORT)
    got = runner.invoke(cli, ["pcap", str(path), "--fail-on-asymmetry"])
    assert got.exit_code == 1
    assert "replies that left by another way" in got.output
    (tmp_path / "sym").mkdir()
    (sym,) = write(tmp_path / "sym", CASES[0])
    assert runner.invoke(cli, ["pcap", str(sym), "--fail-on-asymmetry"]).exit_code == 0
    got = runner.invoke(cli, ["pcap", str(path), "--name", "fw2"])
    assert got.exit_code == 2 and "expected 'MAC NAME'" in got.output
