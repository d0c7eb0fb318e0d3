"""The node agent's decisions and both sides of the agent<->proxy session, without root, netns or sockets."""

from __future__ import annotations

from ztunnel.config.model import ClusterConfig, Workload
from ztunnel.inpod import protocol as p
from ztunnel.inpod.session import AgentSession, ProxySession
from ztunnel.redirect import planner
from ztunnel.redirect.pods import PodRecord


def workload(name: str, *, enrolled: bool = True, host_network: bool = False) -> Workload:
    return Workload(
        uid=f"uid-{name}",
        name=name,
        namespace="shop",
        node="a",
        service_account=name,
        ips=(),
        labels={},
        enrolled=enrolled,
        host_network=host_network,
    )


def config(*workloads: Workload) -> ClusterConfig:
    return ClusterConfig(namespaces={}, workloads=workloads, services=(), nodes={})


def pod(name: str, *, enrolled: bool = False, container: str = "c1", inode: int = 7) -> PodRecord:
    return PodRecord(
        uid=f"uid-{name}", name=name, namespace="shop", container_id=container, netns="/x", netns_inode=inode,
        enrolled=enrolled,
    )


def test_only_labelled_non_host_network_pods_are_enrollable() -> None:
    cfg = config(workload("web"), workload("off", enrolled=False), workload("host", host_network=True))
    assert planner.enrollable(cfg, pod("web")) == workload("web")
    assert planner.enrollable(cfg, pod("off")) is None
    assert planner.enrollable(cfg, pod("host")) is None
    assert planner.enrollable(cfg, pod("unknown")) is None


def test_add_enrolls_reapplies_or_unenrolls() -> None:
    cfg = config(workload("web"), workload("off", enrolled=False))
    assert planner.plan_add(cfg, pod("web")) == planner.Enroll("uid-web", workload("web"))
    assert planner.plan_add(cfg, pod("web", enrolled=True)) == planner.ReapplyRules("uid-web")
    assert planner.plan_add(cfg, pod("off", enrolled=True)) == planner.Unenroll("uid-off")
    assert planner.plan_add(cfg, pod("off")) is None


def test_a_new_sandbox_is_another_netns_or_container() -> None:
    assert not planner.is_new_sandbox(pod("web"), pod("web"))
    assert planner.is_new_sandbox(pod("web"), pod("web", inode=8))
    assert planner.is_new_sandbox(pod("web"), pod("web", container="c2"))


def test_converge_waits_for_the_proxy_to_enroll_but_always_unenrolls() -> None:
    cfg = config(workload("web"), workload("gone", enrolled=False))
    pods = [pod("web"), pod("gone", enrolled=True)]
    assert planner.plan_converge(cfg, pods, proxy_connected=False) == [planner.Unenroll("uid-gone")]
    assert planner.plan_converge(cfg, pods, proxy_connected=True) == [
        planner.Enroll("uid-web", workload("web")),
        planner.Unenroll("uid-gone"),
    ]


def test_snapshot_hands_over_enrolled_pods_and_enrolls_the_rest() -> None:
    cfg = config(workload("web"), workload("api"), workload("off", enrolled=False))
    pods = [pod("web", enrolled=True), pod("api"), pod("off")]
    assert planner.plan_snapshot(cfg, pods) == [
        planner.HandOver("uid-web", workload("web")),
        planner.Enroll("uid-api", workload("api")),
    ]


def test_restart_reapplies_rules_of_members_and_removes_them_from_leavers() -> None:
    cfg = config(workload("web"), workload("off", enrolled=False))
    assert planner.plan_restart(cfg, pod("web")) == planner.ReapplyRules("uid-web")
    assert planner.plan_restart(cfg, pod("off", enrolled=True)) == planner.Unenroll("uid-off")
    assert planner.plan_restart(cfg, pod("off")) is None


def test_gc_forgets_pods_whose_container_the_runtime_no_longer_has() -> None:
    pods = [pod("web", container="c1"), pod("api", container="c2")]
    assert planner.plan_gc(pods, {"c1"}) == [planner.Forget("uid-api")]


def test_check_reports_a_member_that_is_not_enrolled() -> None:
    cfg = config(workload("web"))
    assert planner.check_enrollment(cfg, "shop", "web", pod("web", enrolled=True)) == ""
    assert "should be in the mesh" in planner.check_enrollment(cfg, "shop", "web", pod("web"))
    assert "should be in the mesh" in planner.check_enrollment(cfg, "shop", "web", None)
    assert planner.check_enrollment(cfg, "shop", "other", None) == ""


def test_proxy_session_drops_what_the_snapshot_did_not_mention() -> None:
    session = ProxySession()
    session.added(p.AddWorkload(id=1, uid="a", netns_fd=3))
    assert session.keep(p.KeepWorkload(id=2, uid="b"), held={"a", "b", "c"}) == p.Ack(id=2)
    assert session.keep(p.KeepWorkload(id=3, uid="z"), held={"a"}) == p.Ack(id=3, ok=False, error="unknown")
    session.added(p.AddWorkload(id=4, uid="d", netns_fd=3))
    session.deleted(p.DelWorkload(id=5, uid="d"))
    assert not session.synced
    assert session.snapshot_sent(["a", "b", "c", "d"]) == ["c", "d"]
    assert session.synced


def test_agent_session_numbers_requests_and_matches_acks() -> None:
    session = AgentSession()
    add = session.add("u", {"name": "web"}, 5)
    delete = session.delete("u")
    done = session.snapshot_sent()
    assert (add.id, delete.id, done.id) == (1, 2, 3)
    assert session.check_ack(add, p.Ack(id=1)).ok
    refused = session.check_ack(add, p.Ack(id=1, ok=False, error="no listeners"))
    assert refused.refused and refused.error == "no listeners" and not refused.ok
    wrong = session.check_ack(delete, p.Ack(id=1))
    assert not wrong.ok and not wrong.refused and "unexpected reply" in wrong.error
    assert "disconnected" in session.check_ack(done, None).error
    assert AgentSession.check_hello(p.Hello()) == ""
    assert "expected hello" in AgentSession.check_hello(p.Hello(version=99))
    assert "expected hello" in AgentSession.check_hello(p.Ack(id=1))
