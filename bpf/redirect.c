// eBPF in-pod redirection (DESIGN §4.6, eBPF mode): one program set per node.
//
// Compiled by the node agent with bcc (ztunnel/redirect/ebpf.py), which defines PIN_DIR (the node's bpffs
// directory), the ports and marks of DESIGN §4.1, and PROBE_V4/PROBE_V6_* (the probe SNAT address, network
// order). Every map is pinned there, so a restarted agent (and the proxy) find the same state. The cgroup
// programs are attached once, to the cgroup the node's pods run under, and act only on sockets of an enrolled
// pod's netns (the `pods` map, by netns cookie); sk_lookup is attached to each enrolled pod's netns.
// Why these hooks: README.md.
//
//   connect4/6   cgroup       TCP connect -> 127.0.0.1:15001 ([::1]:15001), original destination recorded by
//                             socket cookie; with DNS capture, TCP and connected UDP port 53 -> loopback:15053
//   sockops      cgroup       TCP_CONNECT_CB: the source port is known now: move the record to orig_dst,
//                             keyed (netns cookie, family, client port), where the proxy reads it
//   sendmsg4/6   cgroup       unconnected UDP to port 53 -> loopback:15053 (DNS capture)
//   recvmsg4/6   cgroup       replies from loopback:15053 appear to come from the resolver the app asked
//   getpeername4/6, getsockname4/6  cgroup  a redirected socket's peer is what it dialled, its address the
//                             pod's (as under iptables REDIRECT), from `redirected` (socket storage)
//   sk_lookup    pod netns    inbound TCP SYNs (not 15008, not from the probe address, not the proxy's own
//                             connections to the app, which connect4 noted in `bypass`) -> the proxy's
//                             15006 listener for the destination address, from the listeners sockhash; none
//                             there (proxy gone) -> refused

#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>

#define AF_INET_ 2
#define AF_INET6_ 10
#define FLAG_DNS 1

// netns cookie of an enrolled pod -> its addresses (network order) and options, written by the agent
struct pod_cfg {
    u32 ip4;
    u32 ip6[4];
    u32 flags;
};
// an original destination: address (v4 in addr[0]) and port, network order
struct orig_dst {
    u32 addr[4];
    u16 port;
    u16 family;
};
// a redirected connection as the proxy sees it: the client's netns, family, address (network order) and port
// (host order). The address matters: sockets bound to different local addresses may share a port, and with
// the port alone the second connect overwrote the first one's destination (the proxy sent it there).
struct conn_key {
    u64 netns;
    u32 addr[4];
    u32 family;
    u32 port;
};
// a proxy listener: the pod address it serves (network order) and its port (host order)
struct listener_key {
    u32 addr[4];
    u32 port;
    u32 family;
};

BPF_TABLE_PINNED("hash", u64, struct pod_cfg, pods, 4096, PIN_DIR "/pods");
BPF_TABLE_PINNED("lru_hash", u64, struct orig_dst, pending, 16384, PIN_DIR "/pending");
BPF_TABLE_PINNED("lru_hash", struct conn_key, struct orig_dst, orig_dst, 65536, PIN_DIR "/orig_dst");
BPF_TABLE_PINNED("lru_hash", u64, struct orig_dst, dns_orig, 16384, PIN_DIR "/dns_orig");
BPF_TABLE_PINNED("sockhash", struct listener_key, u32, listeners, 8192, PIN_DIR "/listeners");
// the proxy's connections to a pod's app (mark CONNMARK), by their (client address, client port, app port),
// host order: sk_lookup lets their SYN through to the app once. They arrive over lo, but the packet's
// ingress ifindex is the pod's eth0 (the local route's device), so the interface cannot tell them apart.
struct bypass_key {
    u32 addr[4];
    u32 port;
    u32 app_port;
};
BPF_TABLE_PINNED("lru_hash", struct bypass_key, u8, bypass, 16384, PIN_DIR "/bypass");
// a redirected socket's original destination, for as long as the socket lives (freed with it): getpeername()
// and getsockname() answer as they would under iptables REDIRECT (family 0: connected again, not redirected)
BPF_SK_STORAGE(redirected, struct orig_dst);

// The node proxy's own sockets in a pod netns: the proxy tags each one here (bpf(2) on the pinned map, keyed by
// its fd) as it makes it. Its marks alone prove nothing: SO_MARK needs only CAP_NET_RAW (Linux >= 5.17), which
// containers usually have, and a 0x111-marked connect() used to plant a `bypass` entry for any pod on the node.
// (BPF_SK_STORAGE, pinned)
struct proxy_socks_table_t {
    int key;
    u32 leaf;
    void *(*sk_storage_get)(void *, void *, int);
    int (*sk_storage_delete)(void *);
    u32 flags;
};
__attribute__((section("maps/sk_storage:" PIN_DIR "/proxy_socks"))) struct proxy_socks_table_t proxy_socks = {
    .flags = BPF_F_NO_PREALLOC};
BPF_ANNOTATE_KV_PAIR(proxy_socks, int, u32);

// bcc declares bpf_get_socket_cookie as returning u32; the cookie is 64 bits
static u64 (*socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

static __always_inline struct pod_cfg *pod_of(void *ctx, struct bpf_sock *sk) {
    if (!sk)
        return 0;
    u32 mark = sk->mark & MARK_MASK;
    if ((mark == PROXY_MARK || mark == CONNMARK) && proxy_socks.sk_storage_get(sk, 0, 0))
        return 0;  // the proxy's own sockets (DNS, its connector): marked, and tagged by the proxy
    u64 ns = bpf_get_netns_cookie(ctx);
    return pods.lookup(&ns);
}

static __always_inline int is_dns(struct pod_cfg *cfg, u32 port) {
    return (cfg->flags & FLAG_DNS) && port == bpf_htons(53);
}

static __always_inline void remember(void *ctx, struct orig_dst *o, int udp) {
    u64 c = socket_cookie(ctx);
    if (udp)
        dns_orig.update(&c, o);
    else
        pending.update(&c, o);
}

// connect4/6 redirected the socket (o: where it was going) or, with o 0, left it alone
static __always_inline void connected(struct bpf_sock_addr *ctx, struct orig_dst *o, int udp) {
    struct orig_dst *r = redirected.sk_storage_get(ctx->sk, 0, o ? BPF_SK_STORAGE_GET_F_CREATE : 0);
    if (r && o)
        *r = *o;
    else if (r)
        r->family = 0;
    if (o)
        remember(ctx, o, udp);
}

// The proxy's connector (bound to the client's address with IP_TRANSPARENT, so its port is known): let its
// SYN reach the app (sk_lookup).
static __always_inline void let_through(struct bpf_sock *sk, u32 app_port) {
    if (!sk || (sk->mark & MARK_MASK) != CONNMARK || !sk->src_port || !proxy_socks.sk_storage_get(sk, 0, 0))
        return;
    struct bypass_key k = {};
    if (sk->family == AF_INET_) {
        k.addr[0] = sk->src_ip4;
    } else {
        k.addr[0] = sk->src_ip6[0];
        k.addr[1] = sk->src_ip6[1];
        k.addr[2] = sk->src_ip6[2];
        k.addr[3] = sk->src_ip6[3];
    }
    k.port = sk->src_port;
    k.app_port = bpf_ntohs(app_port);
    u8 one = 1;
    bypass.update(&k, &one);
}

// Where an IPv4 destination goes, as the iptables rules of DESIGN §4.6 decide it: 0 (left alone) for the pod
// itself (127/8, 0.0.0.0, which the kernel makes 127.0.0.1, its own address) and for TCP to the probe address
// (replies to node probes); else DNS_PORT for port 53 with DNS capture; else OUTBOUND_PORT for TCP.
static __always_inline u16 v4_target(struct pod_cfg *cfg, u32 dst, u32 port, int udp) {
    if ((bpf_ntohl(dst) >> 24) == 127 || !dst || dst == cfg->ip4)
        return 0;
    if (dst == PROBE_V4 && !udp)
        return 0;
    if (is_dns(cfg, port))
        return DNS_PORT;
    return udp ? 0 : OUTBOUND_PORT;
}

static __always_inline int is_v4_mapped(u32 a0, u32 a1, u32 a2) {
    return !a0 && !a1 && a2 == bpf_htonl(0xffff);
}

int connect4(struct bpf_sock_addr *ctx) {
    let_through(ctx->sk, ctx->user_port);
    struct pod_cfg *cfg = pod_of(ctx, ctx->sk);
    if (!cfg)
        return 1;
    u32 dst = ctx->user_ip4;
    u32 port = ctx->user_port;
    int udp = ctx->protocol == IPPROTO_UDP;
    if (ctx->protocol != IPPROTO_TCP && !udp)
        return 1;
    u16 to = v4_target(cfg, dst, port, udp);
    if (!to) {
        connected(ctx, 0, udp);
        return 1;
    }
    struct orig_dst o = {};
    o.addr[0] = dst;
    o.port = port;
    o.family = AF_INET_;
    connected(ctx, &o, udp);
    ctx->user_ip4 = bpf_htonl(0x7f000001);
    ctx->user_port = bpf_htons(to);
    return 1;
}

// the pod itself: ::1, :: (the kernel makes it ::1), its own address
static __always_inline int v6_local(struct bpf_sock_addr *ctx, struct pod_cfg *cfg) {
    u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];
    if (!a0 && !a1 && !a2 && (!a3 || a3 == bpf_htonl(1)))
        return 1;
    return a0 == cfg->ip6[0] && a1 == cfg->ip6[1] && a2 == cfg->ip6[2] && a3 == cfg->ip6[3];
}

// An AF_INET6 socket dialling ::ffff:a.b.c.d sends IPv4 packets, which the IPv4 rules of iptables mode
// redirect: the same decision as connect4, the proxy's address as ::ffff:127.0.0.1, and the destination
// recorded as IPv4 (what the proxy's IPv4 listener sees).
static __always_inline int connect_v4_mapped(struct bpf_sock_addr *ctx, struct pod_cfg *cfg, int udp) {
    u32 dst = ctx->user_ip6[3];
    u32 port = ctx->user_port;
    u16 to = v4_target(cfg, dst, port, udp);
    if (!to) {
        connected(ctx, 0, udp);
        return 1;
    }
    struct orig_dst o = {};
    o.addr[0] = dst;
    o.port = port;
    o.family = AF_INET_;
    connected(ctx, &o, udp);
    ctx->user_ip6[3] = bpf_htonl(0x7f000001);
    ctx->user_port = bpf_htons(to);
    return 1;
}

int connect6(struct bpf_sock_addr *ctx) {
    let_through(ctx->sk, ctx->user_port);
    struct pod_cfg *cfg = pod_of(ctx, ctx->sk);
    if (!cfg)
        return 1;
    int udp = ctx->protocol == IPPROTO_UDP;
    if (ctx->protocol != IPPROTO_TCP && !udp)
        return 1;
    if (is_v4_mapped(ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2]))
        return connect_v4_mapped(ctx, cfg, udp);
    u32 port = ctx->user_port;
    if (v6_local(ctx, cfg) || (udp && !is_dns(cfg, port))) {
        connected(ctx, 0, udp);
        return 1;
    }
    u16 to = is_dns(cfg, port) ? DNS_PORT : OUTBOUND_PORT;
    struct orig_dst o = {};
    o.addr[0] = ctx->user_ip6[0];
    o.addr[1] = ctx->user_ip6[1];
    o.addr[2] = ctx->user_ip6[2];
    o.addr[3] = ctx->user_ip6[3];
    o.port = port;
    o.family = AF_INET6_;
    connected(ctx, &o, udp);
    ctx->user_ip6[0] = 0;
    ctx->user_ip6[1] = 0;
    ctx->user_ip6[2] = 0;
    ctx->user_ip6[3] = bpf_htonl(1);
    ctx->user_port = bpf_htons(to);
    return 1;
}

int sockops(struct bpf_sock_ops *skops) {
    if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
        return 1;
    u64 c = socket_cookie(skops);
    struct orig_dst *o = pending.lookup(&c);
    if (!o)
        return 1;
    struct conn_key k = {};
    k.netns = bpf_get_netns_cookie(skops);
    k.port = skops->local_port;
    if (o->family == AF_INET_) {  // an AF_INET6 socket to a v4-mapped address too: the proxy sees IPv4
        k.family = AF_INET_;
        k.addr[0] = skops->local_ip4;
    } else {
        k.family = AF_INET6_;
        k.addr[0] = skops->local_ip6[0];
        k.addr[1] = skops->local_ip6[1];
        k.addr[2] = skops->local_ip6[2];
        k.addr[3] = skops->local_ip6[3];
    }
    orig_dst.update(&k, o);
    pending.delete(&c);
    return 1;
}

// (an AF_INET6 socket's datagram to a v4-mapped address comes here too: the kernel sends it as IPv4)
int sendmsg4(struct bpf_sock_addr *ctx) {
    struct pod_cfg *cfg = pod_of(ctx, ctx->sk);
    if (!cfg || v4_target(cfg, ctx->user_ip4, ctx->user_port, 1) != DNS_PORT)
        return 1;
    struct orig_dst o = {};
    o.addr[0] = ctx->user_ip4;
    o.port = ctx->user_port;
    o.family = AF_INET_;
    remember(ctx, &o, 1);
    ctx->user_ip4 = bpf_htonl(0x7f000001);
    ctx->user_port = bpf_htons(DNS_PORT);
    return 1;
}

int sendmsg6(struct bpf_sock_addr *ctx) {
    struct pod_cfg *cfg = pod_of(ctx, ctx->sk);
    if (!cfg || !is_dns(cfg, ctx->user_port) || v6_local(ctx, cfg) ||
        is_v4_mapped(ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2]))  // (sendmsg4 sees those)
        return 1;
    struct orig_dst o = {};
    o.addr[0] = ctx->user_ip6[0];
    o.addr[1] = ctx->user_ip6[1];
    o.addr[2] = ctx->user_ip6[2];
    o.addr[3] = ctx->user_ip6[3];
    o.port = ctx->user_port;
    o.family = AF_INET6_;
    remember(ctx, &o, 1);
    ctx->user_ip6[0] = 0;
    ctx->user_ip6[1] = 0;
    ctx->user_ip6[2] = 0;
    ctx->user_ip6[3] = bpf_htonl(1);
    ctx->user_port = bpf_htons(DNS_PORT);
    return 1;
}

int recvmsg4(struct bpf_sock_addr *ctx) {
    if (ctx->user_ip4 != bpf_htonl(0x7f000001) || ctx->user_port != bpf_htons(DNS_PORT))
        return 1;
    u64 c = socket_cookie(ctx);
    struct orig_dst *o = dns_orig.lookup(&c);
    if (o && o->family == AF_INET_) {
        ctx->user_ip4 = o->addr[0];
        ctx->user_port = o->port;
    }
    return 1;
}

int recvmsg6(struct bpf_sock_addr *ctx) {
    if (ctx->user_ip6[0] || ctx->user_ip6[1] || ctx->user_port != bpf_htons(DNS_PORT))
        return 1;
    u64 c = socket_cookie(ctx);
    if (ctx->user_ip6[2] == bpf_htonl(0xffff) && ctx->user_ip6[3] == bpf_htonl(0x7f000001)) {
        struct orig_dst *m = dns_orig.lookup(&c);  // from ::ffff:127.0.0.1: a v4-mapped query's answer
        if (m && m->family == AF_INET_) {
            ctx->user_ip6[3] = m->addr[0];
            ctx->user_port = m->port;
        }
        return 1;
    }
    if (ctx->user_ip6[2] || ctx->user_ip6[3] != bpf_htonl(1))
        return 1;
    struct orig_dst *o = dns_orig.lookup(&c);
    if (o && o->family == AF_INET6_) {
        ctx->user_ip6[0] = o->addr[0];
        ctx->user_ip6[1] = o->addr[1];
        ctx->user_ip6[2] = o->addr[2];
        ctx->user_ip6[3] = o->addr[3];
        ctx->user_port = o->port;
    }
    return 1;
}

static __always_inline int is_proxy_port(u32 port) {
    return port == bpf_htons(OUTBOUND_PORT) || port == bpf_htons(DNS_PORT);
}

int getpeername4(struct bpf_sock_addr *ctx) {
    struct orig_dst *r = redirected.sk_storage_get(ctx->sk, 0, 0);
    if (r && r->family == AF_INET_ && ctx->user_ip4 == bpf_htonl(0x7f000001) && is_proxy_port(ctx->user_port)) {
        ctx->user_ip4 = r->addr[0];
        ctx->user_port = r->port;
    }
    return 1;
}

int getpeername6(struct bpf_sock_addr *ctx) {
    struct orig_dst *r = redirected.sk_storage_get(ctx->sk, 0, 0);
    if (!r || ctx->user_ip6[0] || ctx->user_ip6[1] || !is_proxy_port(ctx->user_port))
        return 1;
    if (r->family == AF_INET_ && ctx->user_ip6[2] == bpf_htonl(0xffff) &&
        ctx->user_ip6[3] == bpf_htonl(0x7f000001)) {
        ctx->user_ip6[3] = r->addr[0];
        ctx->user_port = r->port;
    } else if (r->family == AF_INET6_ && !ctx->user_ip6[2] && ctx->user_ip6[3] == bpf_htonl(1)) {
        ctx->user_ip6[0] = r->addr[0];
        ctx->user_ip6[1] = r->addr[1];
        ctx->user_ip6[2] = r->addr[2];
        ctx->user_ip6[3] = r->addr[3];
        ctx->user_port = r->port;
    }
    return 1;
}

// a redirected socket's own address is the pod's, as when it leaves through eth0 (loopback only by us)
int getsockname4(struct bpf_sock_addr *ctx) {
    struct orig_dst *r = redirected.sk_storage_get(ctx->sk, 0, 0);
    if (!r || r->family != AF_INET_ || ctx->user_ip4 != bpf_htonl(0x7f000001))
        return 1;
    u64 ns = bpf_get_netns_cookie(ctx);
    struct pod_cfg *cfg = pods.lookup(&ns);
    if (cfg && cfg->ip4)
        ctx->user_ip4 = cfg->ip4;
    return 1;
}

int getsockname6(struct bpf_sock_addr *ctx) {
    struct orig_dst *r = redirected.sk_storage_get(ctx->sk, 0, 0);
    if (!r || ctx->user_ip6[0] || ctx->user_ip6[1])
        return 1;
    u64 ns = bpf_get_netns_cookie(ctx);
    struct pod_cfg *cfg = pods.lookup(&ns);
    if (!cfg)
        return 1;
    if (r->family == AF_INET_ && ctx->user_ip6[2] == bpf_htonl(0xffff) &&
        ctx->user_ip6[3] == bpf_htonl(0x7f000001) && cfg->ip4) {
        ctx->user_ip6[3] = cfg->ip4;
    } else if (r->family == AF_INET6_ && !ctx->user_ip6[2] && ctx->user_ip6[3] == bpf_htonl(1) &&
               (cfg->ip6[0] || cfg->ip6[1] || cfg->ip6[2] || cfg->ip6[3])) {
        ctx->user_ip6[0] = cfg->ip6[0];
        ctx->user_ip6[1] = cfg->ip6[1];
        ctx->user_ip6[2] = cfg->ip6[2];
        ctx->user_ip6[3] = cfg->ip6[3];
    }
    return 1;
}

int sk_lookup(struct bpf_sk_lookup *ctx) {
    if (ctx->protocol != IPPROTO_TCP)
        return SK_PASS;
    if (ctx->local_port == HBONE_PORT)  // the proxy's 15008 listener is found by the normal lookup
        return SK_PASS;
    struct bypass_key b = {};
    b.port = bpf_ntohs((u16)ctx->remote_port);
    b.app_port = ctx->local_port;
    struct listener_key k = {};
    k.port = PLAINTEXT_PORT;
    k.family = ctx->family;
    if (ctx->family == AF_INET_) {
        if (ctx->remote_ip4 == PROBE_V4)  // node probes (SNATed by the node) reach the app untouched
            return SK_PASS;
        if ((bpf_ntohl(ctx->local_ip4) >> 24) == 127 || ctx->remote_ip4 == ctx->local_ip4)  // the pod itself
            return SK_PASS;
        k.addr[0] = ctx->local_ip4;
        b.addr[0] = ctx->remote_ip4;
    } else {
        b.addr[0] = ctx->remote_ip6[0];
        b.addr[1] = ctx->remote_ip6[1];
        b.addr[2] = ctx->remote_ip6[2];
        b.addr[3] = ctx->remote_ip6[3];
        if (ctx->remote_ip6[0] == ctx->local_ip6[0] && ctx->remote_ip6[1] == ctx->local_ip6[1] &&
            ctx->remote_ip6[2] == ctx->local_ip6[2] && ctx->remote_ip6[3] == ctx->local_ip6[3])
            return SK_PASS;  // the pod itself (::1 included)
        k.addr[0] = ctx->local_ip6[0];
        k.addr[1] = ctx->local_ip6[1];
        k.addr[2] = ctx->local_ip6[2];
        k.addr[3] = ctx->local_ip6[3];
        if (ctx->remote_ip6[0] == PROBE_V6_0 && ctx->remote_ip6[1] == PROBE_V6_1 &&
            ctx->remote_ip6[2] == PROBE_V6_2 && ctx->remote_ip6[3] == PROBE_V6_3)
            return SK_PASS;
    }
    if (bypass.lookup(&b)) {  // the proxy delivering a connection to the app: once
        bypass.delete(&b);
        return SK_PASS;
    }
    struct bpf_sock *sk = (struct bpf_sock *)listeners.lookup(&k);
    if (!sk)
        return SK_DROP;  // enrolled, and no proxy listening: refused (fail closed), never around the proxy
    long err = bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    return err ? SK_DROP : SK_PASS;
}
