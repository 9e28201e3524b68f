"""`lasthop lab` (run as `python -m lasthop.lab.cli`): commands and exit codes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from drawn import read

from lasthop.lab import Plan, runner
from lasthop.lab.cli import EXIT_LAB, EXIT_OK, EXIT_USAGE
from lasthop.lab.services import VIP
from lasthop.lab.topology import lab_namespaces
from lasthop.services.store import state_path

pytestmark = [pytest.mark.root, pytest.mark.netns]


def _lab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lasthop.lab.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_up_status_down(lab_name: str) -> None:
    """up builds the routed lab with the recipe, status describes it, down removes it."""
    up = _lab("up", "--name", lab_name, "--routed", "--recipe")
    assert up.returncode == EXIT_OK, up.stderr
    assert f"{lab_name}-fw3" in up.stdout and "Linux recipe on" in up.stdout
    status = _lab("status", "--name", lab_name, "--check")
    assert status.returncode == EXIT_OK, status.stderr
    assert "02:00:00:f0:00:02" in status.stdout and "traffic check" in status.stdout
    down = _lab("down", "--name", lab_name)
    assert down.returncode == EXIT_OK
    assert f"removed {len(Plan(lab_name).namespaces())} namespaces" in down.stdout
    assert lab_namespaces(lab_name) == []


def test_draw_shows_the_lab_and_where_replies_die_now(lab_name: str, tmp_path: Path) -> None:
    """`lab draw --check` on a routed lab without lasthop: every namespace and
    link drawn; each client's request reaches its VM, and the replies to cl2
    and cl3 stop at fw1 (routed host: vm -> host -> sw -> fw1)."""
    assert _lab("up", "--name", lab_name, "--routed").returncode == EXIT_OK
    out = tmp_path / "lab.svg"
    result = _lab("draw", "--name", lab_name, "-o", str(out), "--check")
    assert result.returncode == EXIT_OK, result.stderr
    drawn = read(out)
    plan, ns = Plan(lab_name, routed=True), Plan(lab_name).ns
    assert sorted(drawn.nodes) == sorted(plan.namespaces())
    assert len(drawn.links) == 2 * len(plan.sites) + 1 + len(plan.vms)
    for n in plan.sites:
        request = drawn.way("request", f"cl{n}", f"vm{n}")
        assert request[-1] == (ns("host"), ns(f"vm{n}")), request
        off = drawn.way("reply-off", f"cl{n}", f"vm{n}")
        assert off[:2] == [(ns("host"), ns(f"vm{n}")), (ns("sw"), ns("host"))], off
        end = (ns("cl1"), ns("fw1")) if n == 1 else (ns("fw1"), ns("sw"))
        assert off[-1] == end, off
    assert "drop_invalid +" in drawn.texts[ns("fw1")]
    assert not drawn.way("reply-on", "cl2", "vm2")  # lasthop is not attached


def test_status_of_a_missing_lab_exits_3(lab_name: str) -> None:
    result = _lab("status", "--name", lab_name)
    assert result.returncode == EXIT_LAB and f"no lab {lab_name}" in result.stdout


def test_recipe_without_routed_is_a_usage_error(lab_name: str) -> None:
    result = _lab("up", "--name", lab_name, "--recipe")
    assert result.returncode == EXIT_USAGE and "--routed" in result.stderr
    assert lab_namespaces(lab_name) == []


@pytest.mark.slow
@pytest.mark.bpf
@pytest.mark.skipif(not runner.available(), reason="agent not built yet")
def test_demo_passes_and_cleans_up(lab_name: str, tmp_path: Path) -> None:
    """The demo exits 0 on both host modes (fails without lasthop, works with
    it; the service spreads every connection over the VMs and the drain holds)
    and leaves nothing behind, not even the agent's service state. Its
    drawings are checked in _check_drawing."""
    result = _lab(
        "demo", "--name", lab_name, "-n", "1", "--service-connections", "10",
        "--draw", str(tmp_path / "demo.svg"),
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == EXIT_OK, out + result.stderr
    assert "demo passed" in out
    assert "fw2" in out and "02:00:00:f0:00:02" in out
    # per host mode: the service table, its totals row (3 clients x 2 families x 10), the drain
    assert out.count(f"service {VIP.v4}, {VIP.v6}") == 2
    totals = re.findall(r"│ all +│.*│ +60/60 │ +100% │ +60/60 │ +60/60 │", out)
    assert len(totals) == 2, out
    assert "service without lasthop: 0/6 connections answered" in out  # routed
    assert "service without lasthop: 2/6 connections answered (cl1 2/2, cl2 0/2" in out  # bridged
    assert out.count("60/60 new connections answered, none by vm") == 2
    assert out.count("open connection to vm") == 2 and "stopped" not in out
    assert lab_namespaces(lab_name) == []
    assert not state_path(Plan(lab_name).host.ns).parent.exists()
    for mode in ("bridged", "routed"):
        _check_drawing(tmp_path / f"demo-{mode}.svg", Plan(lab_name, routed=mode == "routed"), out)


def _check_drawing(path: Path, plan: Plan, out: str) -> None:
    """The demo's drawing of one host mode: a node per namespace and an edge
    per veth pair of the lab it built; per client, the request through its
    own firewall, the reply without lasthop dropped at fw1 (whose drop counter
    is shown), the reply with lasthop back through the firewall whose MAC the
    demo's `lasthop show` table gave that client; the service on every VM.

        clN ─▶ fwN ─▶ sw ─▶ host ─▶ vmN          request
        vmN ─▶ host ─▶ sw ─▶ fw1 ⊣               without lasthop (N > 1)
        vmN ─▶ host ─▶ sw ─▶ fwN ─▶ clN          with lasthop
    """
    drawn = read(path)
    assert sorted(drawn.nodes) == sorted(plan.namespaces()), path
    ns = plan.ns
    links = {(ns(f"cl{n}"), ns(f"fw{n}")) for n in plan.sites}
    links |= {(ns(f"fw{n}"), ns("sw")) for n in plan.sites}
    links |= {(ns("sw"), ns("host"))} | {(ns("host"), ns(f"vm{n}")) for n in plan.vms}
    assert sorted(drawn.links) == sorted(links), path  # one each: no link missing or doubled
    assert "drop_invalid +" in drawn.texts[ns("fw1")]
    for n in plan.sites:
        cl, fw, vm = f"cl{n}", ns(f"fw{n}"), f"vm{n}"
        request = drawn.way("request", cl, vm)
        assert request[0] == (ns(cl), fw) and request[-1] == (ns("host"), ns(vm)), request
        off = drawn.way("reply-off", cl, vm)
        on = drawn.way("reply-on", cl, vm)
        assert off[0] == (ns("host"), ns(vm)) and on[0] == off[0]
        if n == 1:  # the symmetric client: its reply arrives either way
            assert off[-1] == (ns(cl), fw), off
        else:
            assert off[-1] == (ns("fw1"), ns("sw")), off  # dies at fw1, never reaches fwN
            assert "dies at fw1" in drawn.texts[f"way:reply-off:{cl}:{vm}:{len(off) - 1}"]
        assert on[-2:] == [(fw, ns("sw")), (ns(cl), fw)], on
        label = drawn.texts[f"way:reply-on:{cl}:{vm}:{len(on) - 1}"]
        mac = re.search(r"last hop (\S+)", label)
        assert mac and re.search(rf"{plan.client(n).addr.v4}:\d+ .*{mac[1]} .* fw{n} ", out)
    for n in plan.vms:
        assert drawn.texts[f"service:vm{n}"].startswith("service: cl"), path
