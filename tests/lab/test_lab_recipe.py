"""The usual Linux alternative (ct mark by firewall MAC + ip rule): it works
on a routed host for the MACs it was told about, and stops working for any
other MAC (a fail-over, a firewall added later) and on a bridged host."""

from __future__ import annotations

import pytest

from lasthop.lab import Lab, recipe, traffic
from lasthop.lab.demo import expect_all_ok, expect_asymmetric, expect_dead_only

pytestmark = [pytest.mark.root, pytest.mark.netns]


def test_recipe_makes_a_routed_host_symmetric_for_known_macs(routed_lab: Lab) -> None:
    """With each firewall's MAC mapped to its routing table, every path works."""
    recipe.configure(routed_lab)
    result = traffic.check(routed_lab.plan, n=1)
    assert expect_all_ok(result, "recipe") == []


def test_recipe_fails_for_a_mac_it_was_not_told_about(routed_lab: Lab) -> None:
    """fw2 fails over to a standby MAC: cl2's new connections get no mark and die at fw1."""
    recipe.configure(routed_lab)
    routed_lab.failover(2)
    result = traffic.check(routed_lab.plan, n=1, protos=["tcp", "udp"])
    assert expect_dead_only(result, "recipe after fail-over", {"cl2"}) == []


def test_recipe_fails_for_a_firewall_added_later(routed_lab: Lab) -> None:
    """fw4 comes up after the recipe was written: cl4 dies until someone adds its MAC."""
    recipe.configure(routed_lab)
    routed_lab.add_site(4)
    result = traffic.check(routed_lab.plan, n=1, clients=[1, 4], protos=["tcp"])
    assert expect_dead_only(result, "recipe, new fw4", {"cl4"}) == []
    recipe.add_mac(routed_lab, routed_lab.plan.firewall(4).transit_mac, 4)
    assert (
        expect_all_ok(traffic.check(routed_lab.plan, n=1, clients=[4], protos=["tcp"]), "fw4 added")
        == []
    )


def test_recipe_is_not_applicable_to_a_bridged_host(bridged_lab: Lab) -> None:
    with pytest.raises(recipe.RecipeError, match="bridged host"):
        recipe.configure(bridged_lab)


def test_removing_the_recipe_restores_the_asymmetry(routed_lab: Lab) -> None:
    """remove() takes away the nft table, the ip rules and the tables."""
    recipe.configure(routed_lab)
    recipe.remove(routed_lab)
    assert "fwmark" not in routed_lab.exec("host", ["ip", "rule"])
    assert recipe.TABLE not in routed_lab.exec("host", ["nft", "list", "tables"])
    result = traffic.check(routed_lab.plan, n=1, protos=["tcp"])
    assert expect_asymmetric(result, "recipe removed") == []
