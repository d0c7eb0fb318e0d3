"""Rendering of the in-pod rules and probe SNAT (DESIGN §4.6), without touching any netns."""

from __future__ import annotations

from ztunnel.redirect import rules

EMPTY_SAVE = """*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
COMMIT
"""


def test_inpod_v4_has_the_design_rules() -> None:
    text = rules.render_inpod(rules.IPV4, EMPTY_SAVE, proxy_cgroup="/kubepods/pod1/ztunnel")
    assert "-A ZTUNNEL-PREROUTING -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff" in text
    assert "--restore-mark" in text
    assert (
        "-A ZTUNNEL-PREROUTING ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff "
        "-j REDIRECT --to-ports 15006" in text
    )
    assert "-A ZTUNNEL-OUTPUT ! -d 127.0.0.1/32 -p tcp -j REDIRECT --to-ports 15001" in text
    # the proxy's sockets: its mark AND its cgroup (the mark alone needs only CAP_NET_RAW), before the redirects
    exempt = '-A ZTUNNEL-OUTPUT -m mark --mark 0x539/0xfff -m cgroup --path "/kubepods/pod1/ztunnel" -j ACCEPT'
    assert exempt in text and text.index(exempt) < text.index("--to-ports 15001")
    assert "-A ZTUNNEL-PREROUTING -s 169.254.7.127/32 -p tcp -j ACCEPT" in text
    assert "-A ZTUNNEL-OUTPUT -d 169.254.7.127/32 -p tcp -j ACCEPT" in text
    assert text.count("-I PREROUTING 1 -j ZTUNNEL-PREROUTING") == 2  # mangle and nat
    assert text.count("-I OUTPUT 1 -j ZTUNNEL-OUTPUT") == 2
    assert "15053" not in text


def test_inpod_v6_mirrors_v4() -> None:
    text = rules.render_inpod(rules.IPV6, EMPTY_SAVE)
    assert "127.0.0.1" not in text and "169.254" not in text
    assert "! -d ::1/128 -p tcp -j REDIRECT --to-ports 15001" in text
    assert "-s fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128 -p tcp -j ACCEPT" in text


def test_dns_capture_is_optional() -> None:
    text = rules.render_inpod(rules.IPV4, EMPTY_SAVE, dns_capture=True, proxy_cgroup="/zt")
    assert "-p udp --dport 53 -j REDIRECT --to-ports 15053" in text
    assert text.index('-m cgroup --path "/zt" -j ACCEPT') < text.index("--to-ports 15053")  # the proxy's upstream


def test_no_local_socket_skips_redirection_on_the_mark_alone() -> None:
    """Without the proxy's cgroup (none connected yet, none in the pod's rules) nothing is exempt: fail closed."""
    text = rules.render_inpod(rules.IPV4, EMPTY_SAVE)
    output = [line for line in text.splitlines() if line.startswith("-A ZTUNNEL-OUTPUT")]
    assert output and not any("0x539" in line for line in output), output
    assert "cgroup" not in text


def test_the_proxy_cgroup_in_place_is_kept_when_none_is_given() -> None:
    """An agent restarted before the proxy reconnects re-applies the rules with the cgroup they name."""
    first = rules.render_inpod(rules.IPV4, EMPTY_SAVE, proxy_cgroup="/kubepods/p/c1")
    save = "\n".join(line for line in first.splitlines() if not line.startswith("-I"))  # as iptables-save shows it
    assert rules.existing_proxy_cgroup(save) == "/kubepods/p/c1"
    again = rules.render_inpod(rules.IPV4, save)
    assert '-m cgroup --path "/kubepods/p/c1" -j ACCEPT' in again
    assert '--path "/kubepods/p/c2"' in rules.render_inpod(rules.IPV4, save, proxy_cgroup="/kubepods/p/c2")


def test_a_proxy_cgroup_that_would_break_the_rule_is_refused() -> None:
    for bad in ("kubepods/x", '/a"b', "/a b", "/a\nb"):
        try:
            rules.proxy_cgroup_match(bad)
        except ValueError as e:
            assert "proxy cgroup" in str(e)
        else:
            raise AssertionError(bad)


def test_existing_jumps_are_not_added_twice_and_duplicates_removed() -> None:
    save = EMPTY_SAVE.replace(
        ":POSTROUTING ACCEPT [0:0]\n",
        ":POSTROUTING ACCEPT [0:0]\n:ZTUNNEL-PREROUTING - [0:0]\n:ZTUNNEL-OUTPUT - [0:0]\n"
        "-A PREROUTING -j ZTUNNEL-PREROUTING\n-A OUTPUT -j ZTUNNEL-OUTPUT\n-A OUTPUT -j ZTUNNEL-OUTPUT\n",
    )
    text = rules.render_inpod(rules.IPV4, save)
    nat = text[text.index("*nat") :]
    assert "-I PREROUTING" not in nat
    assert nat.count("-D OUTPUT -j ZTUNNEL-OUTPUT") == 1
    assert ":ZTUNNEL-OUTPUT - [0:0]" in nat  # the chain is re-declared, which flushes it


def test_remove_is_empty_when_nothing_is_installed() -> None:
    assert rules.render_inpod_remove(EMPTY_SAVE) == ""


def test_remove_deletes_jumps_then_chains() -> None:
    save = EMPTY_SAVE.replace(
        ":POSTROUTING ACCEPT [0:0]\n",
        ":POSTROUTING ACCEPT [0:0]\n:ZTUNNEL-OUTPUT - [0:0]\n"
        "-A OUTPUT -j ZTUNNEL-OUTPUT\n-A ZTUNNEL-OUTPUT -j ACCEPT\n",
    )
    text = rules.render_inpod_remove(save)
    assert text == "*nat\n-D OUTPUT -j ZTUNNEL-OUTPUT\n-F ZTUNNEL-OUTPUT\n-X ZTUNNEL-OUTPUT\nCOMMIT\n"


def test_probe_snat_lists_each_pod_once_per_family() -> None:
    ips = ["10.244.1.5", "10.244.1.5", "fd00::5", "10.244.1.2"]
    v4 = rules.render_probe_snat(rules.IPV4, ips, EMPTY_SAVE)
    assert v4.count("! --dport 15008 -m owner --socket-exists -j SNAT --to-source 169.254.7.127") == 2
    assert v4.index("10.244.1.2/32") < v4.index("10.244.1.5/32")
    assert "-I POSTROUTING 1 -j ZTUNNEL-POSTROUTING" in v4
    v6 = rules.render_probe_snat(rules.IPV6, ips, EMPTY_SAVE)
    assert (
        "-d fd00::5/128 -p tcp ! --dport 15008 -m owner --socket-exists "
        "-j SNAT --to-source fd16:9254:7127:1337:ffff:ffff:ffff:ffff" in v6
    )


def test_ours_keeps_only_project_lines() -> None:
    save = (
        "*nat\n:OUTPUT ACCEPT [0:0]\n:ZTUNNEL-OUTPUT - [0:0]\n-A OUTPUT -j ZTUNNEL-OUTPUT\n-A OUTPUT -j OTHER\nCOMMIT\n"
    )
    assert rules.ours(save) == "*nat :ZTUNNEL-OUTPUT -\n*nat -A OUTPUT -j ZTUNNEL-OUTPUT"
