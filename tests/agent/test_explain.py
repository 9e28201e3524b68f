"""`lasthop explain`: a connection the data path learned from real traffic
is found by the key explain builds (both orientations), named with its
firewall's MAC and uplink; a connection it does not know is said to take
the host's normal path; a service address names the VM Maglev would pick."""

from __future__ import annotations

import json

import pytest

from agentlib import BridgedSite, Sandbox, lasthop
from lasthop.errors import ConfigError
from lasthop.explain import Query, parse_endpoint


def _explain(netns: str, *args: str) -> dict[str, object]:
    result = lasthop("explain", "--netns", netns, *args, "--json")
    assert result.returncode == 0, result.stderr
    out: dict[str, object] = json.loads(result.stdout)
    return out


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("10.0.0.1:80", ("10.0.0.1", 80)),
        ("10.0.0.1", ("10.0.0.1", 0)),
        ("[fd00::1]:443", ("fd00::1", 443)),
        ("fd00::1", ("fd00::1", 0)),
    ],
)
def test_parse_endpoint(text: str, want: tuple[str, int]) -> None:
    assert parse_endpoint(text, "client") == want


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("10.0.0.300:80", "client '10.0.0.300:80': not an IP address"),
        ("10.0.0.1:99999", "the port must be 0-65535"),
        ("[fd00::1]x", r"expected \[ADDR\]:PORT"),
    ],
)
def test_parse_endpoint_errors(text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_endpoint(text, "client")


def test_query_refuses_mixed_families() -> None:
    with pytest.raises(ConfigError, match="both IPv4 or both IPv6"):
        Query("tcp", "10.0.0.1", 1, "fd00::1", 2)


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_explains_a_learned_connection_and_an_unknown_one(
    served_site: BridgedSite, proto: str
) -> None:
    site = served_site
    port = site.exchange(proto, n=2)
    client, server = f"{site.FW_IP}:{port}", f"{site.VM_IP}:{site.PORT}"
    got = _explain(site.host.name, proto, client, server)
    assert got["table"] and got["opened_by"] == "client", got
    conn = got["connection"]
    assert isinstance(conn, dict)
    assert (conn["mac"], conn["uplink"], conn["sport"]) == (site.fw_mac, "fw0", port)
    words = "\n".join(got["words"])  # type: ignore[arg-type]
    assert f"came from MAC {site.fw_mac}" in words and "on uplink fw0" in words
    assert "whatever the guest's routing says" in words
    # named the other way round (server first): the same entry, opened by the other end
    back = _explain(site.host.name, proto, server, client)
    assert back["opened_by"] == "server" and back["connection"] == got["connection"] | {
        "age_s": back["connection"]["age_s"]  # type: ignore[index]
    }
    # a port nobody used: no entry, the host's normal path
    none = _explain(site.host.name, proto, f"{site.FW_IP}:{port ^ 1}", server)
    assert none["table"] == "" and none["connection"] is None
    assert "takes the host's normal path" in "\n".join(none["words"])  # type: ignore[arg-type]
    plain = lasthop("explain", "--netns", site.host.name, proto, client, server)
    assert plain.returncode == 0 and f"came from MAC {site.fw_mac}" in plain.stdout


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
def test_explain_names_the_firewall_from_the_config_and_the_scope_rule(box: Sandbox) -> None:
    """last_hop_names names the firewall; a TCP connection no rule matches is
    learned (the default), a UDP one the rule passes is not: it takes the
    host's normal path, counted scope_passed, and explain names rule 1."""
    site = BridgedSite(box)
    cfg = box.logs / "scope.toml"
    cfg.write_text(
        f'[last_hop_names]\n"{site.fw_mac}" = "fw-a"\n'
        '[[scope]]\naction = "pass"\nproto = "udp"\n'
        '[[uplink]]\nname = "fw0"\n'
    )
    try:
        site.serve()
        box.agent("--config", str(cfg), "--bridge", "br0", netns=site.host)
        server = f"{site.VM_IP}:{site.PORT}"
        tcp = site.exchange("tcp", n=2)
        got = _explain(site.host.name, "--config", str(cfg), "tcp", f"{site.FW_IP}:{tcp}", server)
        assert got["firewall"] == "fw-a"
        assert got["scope"] == {"action": "learn", "rule": 0, "text": "scope_default = learn"}
        words = "\n".join(got["words"])  # type: ignore[arg-type]
        assert f"MAC {site.fw_mac} (firewall fw-a) on uplink fw0" in words
        udp = site.exchange("udp", n=2)  # works: the bridge forwards it
        got = _explain(site.host.name, "--config", str(cfg), "udp", f"{site.FW_IP}:{udp}", server)
        assert got["table"] == ""
        assert got["scope"] == {"action": "pass", "rule": 1, "text": "pass proto udp"}
        stats = json.loads(lasthop("stats", "--netns", site.host.name, "--json").stdout)
        assert stats["interfaces"]["fw0"]["scope_passed"] == 2
    finally:
        site.close()
