/* The edge balancer on the edge interface's ingress: client packets to an edge VIP
 * are DNATed to a backend chosen by the VIP's Maglev ring (or kept on the backend the
 * flow already has) and sent on to the backend. Anything that is not a TCP/UDP packet
 * to a VIP passes untouched. The flood guard (deny list, SYN token bucket) and the
 * VIP's connection limit apply to VIP traffic only: the balancer protects the services
 * it fronts, the host's own traffic is the kernel's business.
 *
 * One decision (edge_decide), two hooks:
 * - edge_xdp, at XDP, where the driver runs it on its own receive buffers (a NIC):
 *   the packet is rewritten before the kernel makes an skb of it and redirected out
 *   of the backend's interface (a devmap), or passed to the kernel, marked for
 *   edge_ingress (struct edge_meta) when a pod's veth takes no XDP frames or a SYN
 *   is refused.
 * - edge_tc_balance, at tc ingress, where the packet is an skb already (a veth: its
 *   native XDP would copy every packet into a page of its own first, and generic XDP
 *   turns GRO off): it runs after GRO, once per aggregated packet, and does
 *   edge_ingress's part itself.
 */
#include "lib/common.h"
#include "lib/edge.h"
#include "lib/gcra.h"
#include "lib/tcp_reset.h"
#include <uapi/linux/pkt_cls.h>

static __always_inline void count(u32 idx)
{
	u64 *v = edge_counters.lookup(&idx);
	if (v)
		*v += 1;
}

/* Deny list and SYN budget. Returns the drop counter, or -1 to go on. */
static __always_inline int edge_guard(struct addr16 *src, int v4, int syn,
				      struct edge_vip_stats *st)
{
	u32 zero = 0;
	struct edge_config *cfg = edge_config.lookup(&zero);

	if (!cfg)
		return -1;
	if (cfg->deny_active) {
		/* First octet (IPv4) or second byte (IPv6) against the prefilter:
		 * most sources never pay for the trie walk. */
		u32 b = v4 ? (src->w[3] & 0xff) : ((src->w[0] >> 8) & 0xff);
		u64 bits = v4 ? cfg->deny4[(b >> 6) & 3] : cfg->deny6[(b >> 6) & 3];
		if (bits & (1ULL << (b & 63))) {
			struct edge_deny_key dk = { .prefixlen = 128, .addr = *src };
			u32 *denied = edge_deny.lookup(&dk);
			if (denied) {
				if (st)
					st->drop_deny++;
				return E_DROP_DENY;
			}
		}
	}
	if (!syn || !cfg->syn_rate)
		return -1;

	u64 now = bpf_ktime_get_ns();
	struct edge_syn_bucket *bk = edge_syn.lookup(src);
	if (!bk) {
		struct edge_syn_bucket fresh = { .tokens = cfg->syn_cap - EDGE_NANO, .last_ns = now };
		/* Lost races between CPUs only make the budget approximate. */
		edge_syn.update(src, &fresh);
		return -1;
	}
	u64 elapsed = now - bk->last_ns;
	if (elapsed > cfg->syn_fill_ns)
		elapsed = cfg->syn_fill_ns;
	u64 tokens = bk->tokens + elapsed * cfg->syn_rate;
	if (tokens > cfg->syn_cap)
		tokens = cfg->syn_cap;
	bk->last_ns = now;
	if (tokens < EDGE_NANO) {
		bk->tokens = tokens;
		if (st)
			st->drop_syn++;
		return E_DROP_SYN;
	}
	bk->tokens = tokens - EDGE_NANO;
	return -1;
}

/* Tell edge_ingress (tc ingress, same interface) what to do with a passed frame. The
 * frame's pointers are stale afterwards: the caller returns at once. */
static __always_inline int edge_mark(struct xdp_md *ctx, __u32 what, __u32 arg)
{
	if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(struct edge_meta)))
		return -1;
	struct edge_meta *m = (void *)(long)ctx->data_meta;
	if ((void *)(m + 1) > (void *)(long)ctx->data)
		return -1;
	m->what = what;
	m->arg = arg;
	return 0;
}

/* A SYN within the VIP's connection limit (or no limit): 1. */
static __always_inline int within_limit(u32 vid)
{
	struct edge_limit *lim = edge_limits.lookup(&vid);

	if (!lim || !lim->interval_ns)
		return 1;
	return gcra_admit(&lim->tat, lim->interval_ns, lim->tolerance_ns, bpf_ktime_get_ns());
}

static __always_inline int vip_key_eq(const struct edge_vip_key *a, const struct edge_vip_key *b)
{
	return a->addr.w[3] == b->addr.w[3] && a->addr.w[2] == b->addr.w[2] &&
	       a->addr.w[1] == b->addr.w[1] && a->addr.w[0] == b->addr.w[0] &&
	       a->port == b->port && a->proto == b->proto;
}

/* Linear probing over edge_vips: array lookups, which the verifier inlines. */
static __always_inline struct edge_vip *find_vip(const struct edge_vip_key *k)
{
	u32 h = edge_vip_hash(k);

#pragma unroll
	for (int i = 0; i < EDGE_VIP_PROBES; i++) {
		u32 idx = (h + i) & (EDGE_VIP_SLOTS - 1);
		struct edge_vip *v = edge_vips.lookup(&idx);
		if (!v || v->state == EDGE_VIP_EMPTY)
			return NULL;
		if (v->state == EDGE_VIP_LIVE && vip_key_eq(&v->key, k))
			return v;
	}
	return NULL;
}

static __always_inline struct edge_backend *live_backend(u32 bid)
{
	struct edge_backend *be = edge_backends.lookup(&bid);

	if (be && (be->flags & EDGE_BE_VALID))
		return be;
	return NULL;
}

/* The backend for a flow. A TCP segment that is no SYN, on a clean ring slot,
 * takes the ring's backend at once: no flow on that slot ever went elsewhere.
 * Everything else asks the flow table first, and a flow it does not know
 * picks from the ring and is recorded, with its reply mapping. */
static __always_inline struct edge_backend *pick(struct addr16 *src, __u16 sport,
						 struct edge_vip_key *vk, struct edge_vip *vip,
						 int fast, struct edge_vip_stats *st, u32 *picked)
{
	/* hash * size >> 32 maps the hash onto [0, size) like % but without a divide. */
	u32 h = ((u64)edge_flow_hash(src, ((u32)sport << 16) | vk->port) * EDGE_RING_SIZE) >> 32;
	u32 row = vip->ring * EDGE_RING_ROWS + h / EDGE_RING_CELLS;
	struct edge_ring_row *r = edge_rings.lookup(&row);
	if (!r)
		return NULL;
	u32 cell = r->b[h & (EDGE_RING_CELLS - 1)];
	u32 bid = cell & EDGE_CELL_ID;
	*picked = bid;
	if (fast && !(cell & EDGE_CELL_DIRTY))
		return live_backend(bid);

	/* The flow key is built only here: the fast path never needs it. */
	struct edge_flow fl = {
		.src = *src, .dst = vk->addr, .sport = sport, .dport = vk->port, .proto = vk->proto,
	};
	struct edge_flow *flow = &fl;
	struct edge_backend *be;
	struct edge_conn *cn = edge_conns.lookup(flow);
	if (cn) {
		u32 held = cn->backend;
		be = live_backend(held);
		if (be && be->gen == cn->gen) {
			*picked = held;
			return be;
		}
		count(E_REPICK);
	}
	be = live_backend(bid);
	if (!be)
		return NULL;

	struct edge_conn c = { .backend = bid, .gen = be->gen };
	int rc = edge_conns.update(flow, &c);
	struct edge_flow rk = {
		.src = be->addr, .dst = flow->src,
		.sport = be->port, .dport = flow->sport, .proto = flow->proto,
	};
	struct edge_rev rv = { .vip = flow->dst, .vport = flow->dport, .vip_id = vip->id };
	int rc2 = edge_revs.update(&rk, &rv);
	if (rc || rc2) {
		count(E_CONN_FULL);
		if (st)
			st->conn_full++;
	}
	count(E_NEW_FLOW);
	if (st)
		st->new_flows++;
	return be;
}

/* A parsed packet to a VIP and what edge_decide made of it. */
struct edge_pkt {
	struct addr16 src;
	struct edge_vip_key vk;
	__u16 sport;
	__u8 v4;
	__u8 vlan;
	__u32 l3off; /* from the frame's start */
	__u32 l4off;
	__u32 vid;
	__u32 bid;
	struct edge_backend *be;
	struct edge_vip_stats *st;
};

enum edge_verdict {
	EDGE_V_PASS = 0, /* not ours: untouched */
	EDGE_V_DROP,     /* denied, over the SYN budget, or no backend */
	EDGE_V_REFUSE,   /* a SYN over the VIP's connection limit: reset it */
	EDGE_V_BALANCE,  /* p->be is the backend */
};

/* Parse, find the VIP, guard, limit and pick: everything but the rewrite, which each
 * hook does its own way. Counts what it decides. */
static __always_inline int edge_decide(void *data, void *data_end, struct edge_pkt *p)
{
	struct ethhdr *eth = data;
	void *l3;
	__u16 h_proto;
	int syn = 0;

	if ((void *)(eth + 1) > data_end)
		return EDGE_V_PASS;
	h_proto = eth->h_proto;
	l3 = eth + 1;
	if (h_proto == ETH_P_8021Q_BE || h_proto == ETH_P_8021AD_BE) {
		if (l3 + 4 > data_end)
			return EDGE_V_PASS;
		h_proto = *(__u16 *)(l3 + 2);
		l3 += 4;
		p->vlan = 1;
	}
	p->l3off = l3 - data;

	void *l4;
	if (h_proto == ETH_P_IP_BE) {
		struct iphdr *ip4 = l3;
		if ((void *)(ip4 + 1) > data_end) {
			count(E_PASS_MALFORMED);
			return EDGE_V_PASS;
		}
		__u32 hl = ip4->ihl * 4;
		if (hl < sizeof(*ip4)) {
			count(E_PASS_MALFORMED);
			return EDGE_V_PASS;
		}
		if (ip4->protocol != IPPROTO_TCP && ip4->protocol != IPPROTO_UDP)
			return EDGE_V_PASS;
		if (ip4->frag_off & IP_FRAG_BE) {
			count(E_PASS_FRAGMENT);
			return EDGE_V_PASS;
		}
		p->v4 = 1;
		p->vk.proto = ip4->protocol;
		addr_from4(&p->src, ip4->saddr);
		addr_from4(&p->vk.addr, ip4->daddr);
		l4 = l3 + hl;
	} else if (h_proto == ETH_P_IPV6_BE) {
		struct ipv6hdr *ip6 = l3;
		if ((void *)(ip6 + 1) > data_end) {
			count(E_PASS_MALFORMED);
			return EDGE_V_PASS;
		}
		if (ip6->nexthdr != IPPROTO_TCP && ip6->nexthdr != IPPROTO_UDP) {
			/* Fragment, hop-by-hop, routing...: the kernel knows how. */
			if (ip6->nexthdr != IPPROTO_ICMPV6)
				count(E_PASS_IPV6_EXT);
			return EDGE_V_PASS;
		}
		p->vk.proto = ip6->nexthdr;
		__builtin_memcpy(&p->src, &ip6->saddr, 16);
		__builtin_memcpy(&p->vk.addr, &ip6->daddr, 16);
		l4 = ip6 + 1;
	} else {
		return EDGE_V_PASS;
	}
	p->l4off = l4 - data;

	/* Ports: TCP needs its 20-byte header (flags, checksum), UDP 8. */
	__u16 *ports = l4;
	if (p->vk.proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > data_end) {
			count(E_PASS_MALFORMED);
			return EDGE_V_PASS;
		}
		syn = th->syn && !th->ack;
	} else {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > data_end) {
			count(E_PASS_MALFORMED);
			return EDGE_V_PASS;
		}
	}
	p->sport = ports[0];
	p->vk.port = ports[1];

	struct edge_vip *vip = find_vip(&p->vk);
	if (!vip)
		return EDGE_V_PASS;

	u32 vid = vip->id;
	p->vid = vid;
	struct edge_vip_stats *st = edge_vip_stats.lookup(&vid);
	p->st = st;
	int drop = edge_guard(&p->src, p->v4, syn, st);
	if (drop >= 0) {
		count(drop);
		return EDGE_V_DROP;
	}

	/* Over the connection limit: the SYN is answered with a reset from the VIP, as a
	 * closed port would, and the client fails at once instead of retrying into it. */
	if (syn && !within_limit(vid)) {
		count(E_REFUSE_LIMIT);
		if (st)
			st->refused_limit++;
		return EDGE_V_REFUSE;
	}

	u32 bid = 0;
	struct edge_backend *be = pick(&p->src, p->sport, &p->vk, vip,
				       p->vk.proto == IPPROTO_TCP && !syn, st, &bid);
	if (!be) {
		count(E_DROP_NO_BACKEND);
		if (st)
			st->drop_no_backend++;
		return EDGE_V_DROP;
	}
	p->be = be;
	p->bid = bid;
	if (st) {
		st->packets++;
		st->bytes += data_end - data;
	}
	return EDGE_V_BALANCE;
}

/* ---- tc: the follow-up of XDP's marks, and the balancer on skbs ---------------------- */

static __always_inline int to_kernel(void)
{
	count(E_PEER_KERNEL);
	return TC_ACT_OK;
}

/* On to the backend, its address already rewritten: MACs, TTL, then into the pod
 * (EDGE_BE_PEER: bpf_redirect_peer, the pod's namespace gets the skb GRO built on this
 * interface, large segments without GRO of its own, and nothing about the pod changes)
 * or out of the backend's interface (EDGE_BE_REDIRECT). A packet whose TTL expires
 * here, or too big for the backend's MTU, goes on to the kernel, which forwards it or
 * answers with ICMP (which edge_tc.c translates). */
static __always_inline int forward_skb(struct __sk_buff *skb, struct edge_backend *be)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 hl, seg;

	if (!(be->flags & (EDGE_BE_PEER | EDGE_BE_REDIRECT)) || !be->ifindex)
		return to_kernel(); /* changed since XDP looked: the kernel routes it */
	if ((void *)(eth + 1) > data_end)
		return to_kernel();
	if (eth->h_proto == ETH_P_IP_BE) {
		struct iphdr *ip4 = (void *)(eth + 1);
		if ((void *)(ip4 + 1) > data_end || ip4->ttl <= 1)
			return to_kernel();
		hl = ip4->ihl * 4;
		if (ip4->protocol == IPPROTO_TCP) {
			struct tcphdr *th = (void *)ip4 + hl;
			if (hl < sizeof(*ip4) || (void *)(th + 1) > data_end)
				return to_kernel();
			hl += th->doff * 4;
		} else {
			hl += sizeof(struct udphdr);
		}
	} else if (eth->h_proto == ETH_P_IPV6_BE) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end || ip6->hop_limit <= 1)
			return to_kernel();
		hl = sizeof(*ip6);
		if (ip6->nexthdr == IPPROTO_TCP) {
			struct tcphdr *th = (void *)(ip6 + 1);
			if ((void *)(th + 1) > data_end)
				return to_kernel();
			hl += th->doff * 4;
		} else {
			hl += sizeof(struct udphdr);
		}
	} else {
		return to_kernel();
	}
	/* What the pod's interface must take: one packet, or each segment of a GRO packet.
	 * (The barrier keeps clang from merging the three context loads into one with a
	 * computed offset, which the verifier refuses.) */
	__u32 segs = skb->gso_segs, gso = skb->gso_size, len = skb->len;
	asm volatile("" : "+r"(segs), "+r"(gso), "+r"(len));
	seg = segs > 1 ? hl + gso : len - sizeof(*eth);
	if (be->mtu && seg > be->mtu) {
		count(E_FWD_TOO_BIG);
		return TC_ACT_OK;
	}

	u32 m0 = be->macs[0], m1 = be->macs[1], m2 = be->macs[2], ifindex = be->ifindex;
	int peer = be->flags & EDGE_BE_PEER;
	if (eth->h_proto == ETH_P_IP_BE) {
		struct iphdr *ip4 = (void *)(eth + 1);
		if ((void *)(ip4 + 1) > data_end)
			return to_kernel();
		__u16 *w = (__u16 *)&ip4->ttl; /* ttl and protocol: one checksum word */
		__u16 before = *w;
		ip4->ttl--;
		edge_csum_apply(&ip4->check, (__u64)(__u16)~before + *w);
	} else {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end)
			return to_kernel();
		ip6->hop_limit--;
	}
	((u32 *)data)[0] = m0;
	((u32 *)data)[1] = m1;
	((u32 *)data)[2] = m2;
	if (!peer)
		return bpf_redirect(ifindex, 0);
	count(E_FWD_PEER);
	return bpf_redirect_peer(ifindex, 0);
}

/* A SYN to a VIP over its connection limit, unchanged: answered with a reset from the
 * VIP (lib/tcp_reset.h), sent back out of this interface. */
static __always_inline int refuse(struct __sk_buff *skb)
{
	if (tcp_reset_syn(skb) < 0) {
		/* Refused all the same: the client's SYN is retried, and decided again. */
		count(E_RST_FAIL);
		return TC_ACT_SHOT;
	}
	return bpf_redirect(skb->ifindex, 0);
}

/* ---- XDP ------------------------------------------------------------------------------ */

int edge_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct edge_pkt p = {};

	switch (edge_decide(data, data_end, &p)) {
	case EDGE_V_BALANCE:
		break;
	case EDGE_V_DROP:
		return XDP_DROP;
	case EDGE_V_REFUSE:
		/* edge_ingress answers it (the SYN goes to tc unchanged). */
		if (edge_mark(ctx, EDGE_META_REFUSE, p.vid)) {
			count(E_RST_FAIL);
			return XDP_DROP;
		}
		return XDP_PASS;
	default:
		return XDP_PASS;
	}
	struct edge_backend *be = p.be;
	void *l3 = data + (p.l3off & 0xff);
	void *l4 = data + (p.l4off & 0xff);
	__u16 *ports = l4;
	__u16 *l4sum;

	if (p.vk.proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > data_end)
			return XDP_PASS;
		l4sum = &th->check;
	} else {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > data_end)
			return XDP_PASS;
		l4sum = &uh->check;
	}

	/* DNAT with incremental checksums: the pseudo-header covers the address. */
	__u64 diff = 0;
	if (p.v4) {
		struct iphdr *ip4 = l3;
		if ((void *)(ip4 + 1) > data_end)
			return XDP_PASS;
		__u32 old = ip4->daddr, new = be->addr.w[3];
		diff = edge_csum_diff4(old, new);
		ip4->daddr = new;
		edge_csum_apply(&ip4->check, diff);
	} else {
		struct ipv6hdr *ip6 = l3;
		if ((void *)(ip6 + 1) > data_end)
			return XDP_PASS;
		__u32 *d = (__u32 *)&ip6->daddr;
#pragma unroll
		for (int i = 0; i < 4; i++) {
			diff += edge_csum_diff4(d[i], be->addr.w[i]);
			d[i] = be->addr.w[i];
		}
	}
	if (be->port != p.vk.port) {
		diff += edge_csum_diff4(p.vk.port, be->port);
		ports[1] = be->port;
	}
	/* IPv4 UDP may carry no checksum (0): leave it so; a computed 0 is sent as 0xffff. */
	if (p.vk.proto == IPPROTO_TCP || *l4sum || !p.v4) {
		edge_csum_apply(l4sum, diff);
		if (p.vk.proto == IPPROTO_UDP && *l4sum == 0)
			*l4sum = 0xffff;
	}

	if (!(be->flags & EDGE_BE_REDIRECT)) {
		/* A pod's veth: edge_ingress moves it in (a VLAN-tagged frame is the kernel's:
		 * the tag's device decides where it goes). Counted there. */
		if ((be->flags & EDGE_BE_PEER) && !p.vlan &&
		    !edge_mark(ctx, EDGE_META_PEER, p.bid))
			return XDP_PASS;
		count(be->flags & (EDGE_BE_FALLBACK | EDGE_BE_PEER) ? E_FWD_FALLBACK : E_FWD_ROUTE);
		return XDP_PASS;
	}

	/* What the kernel must answer stays with the kernel: a packet too big for the
	 * backend's interface (a redirect would drop it; routed, it is fragmented or gets
	 * frag-needed, which edge_tc translates) and one whose TTL expires here. A
	 * redirected packet is forwarded: TTL / hop limit one less, as routing does. */
	if (be->mtu && (__u32)(data_end - l3) > be->mtu) {
		count(E_FWD_TOO_BIG);
		return XDP_PASS;
	}
	if (p.v4) {
		struct iphdr *ip4 = l3;
		if ((void *)(ip4 + 1) > data_end)
			return XDP_PASS;
		if (ip4->ttl <= 1) {
			count(E_FWD_TTL_EXPIRING);
			return XDP_PASS;
		}
		__u16 *w = (__u16 *)&ip4->ttl; /* ttl and protocol: one checksum word */
		__u16 before = *w;
		ip4->ttl--;
		edge_csum_apply(&ip4->check, (__u64)(__u16)~before + *w);
	} else {
		struct ipv6hdr *ip6 = l3;
		if ((void *)(ip6 + 1) > data_end)
			return XDP_PASS;
		if (ip6->hop_limit <= 1) {
			count(E_FWD_TTL_EXPIRING);
			return XDP_PASS;
		}
		ip6->hop_limit--;
	}

	u32 m0 = be->macs[0], m1 = be->macs[1], m2 = be->macs[2];
	u32 tx = be->tx;
	__u16 l3proto = p.v4 ? ETH_P_IP_BE : ETH_P_IPV6_BE;
	if (p.vlan) {
		/* Backend interfaces are untagged: drop the tag, the Ethernet header
		 * moves 4 bytes in. */
		if (bpf_xdp_adjust_head(ctx, 4)) {
			count(E_VLAN_POP_FAIL);
			return XDP_PASS;
		}
		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		if (data + sizeof(struct ethhdr) > data_end)
			return XDP_DROP;
		((struct ethhdr *)data)->h_proto = l3proto;
	}
	if (data + 12 > data_end)
		return XDP_DROP;
	/* The frame starts 2-byte aligned after XDP headroom: word stores are fine. */
	((u32 *)data)[0] = m0;
	((u32 *)data)[1] = m1;
	((u32 *)data)[2] = m2;
	return edge_tx.redirect_map(tx, XDP_PASS);
}

/* tc ingress after edge_xdp: what it marked (struct edge_meta). Unmarked frames pass. */
int edge_ingress(struct __sk_buff *skb)
{
	struct edge_meta *m = (void *)(long)skb->data_meta;

	if ((void *)(m + 1) > (void *)(long)skb->data)
		return TC_ACT_OK;
	__u32 what = m->what, arg = m->arg;
	if (what == EDGE_META_PEER) {
		struct edge_backend *be = edge_backends.lookup(&arg);
		if (!be || !(be->flags & EDGE_BE_PEER))
			return to_kernel(); /* changed since XDP looked: the kernel routes it */
		return forward_skb(skb, be);
	}
	if (what == EDGE_META_REFUSE)
		return refuse(skb);
	return TC_ACT_OK;
}

/* ---- tc ingress: the balancer on skbs ------------------------------------------------- */

/* The DNAT as the kernel's own NAT does it (nf_nat_ipv4_manip_pkt): the IP header by
 * direct writes (its checksum is always a full one), the L4 checksum by the helper, the
 * only one that knows the skb's checksum state: after GRO a TCP checksum is
 * CHECKSUM_PARTIAL (the field holds the pseudo-header's sum, which the port is not part
 * of) and a CHECKSUM_COMPLETE skb's sum must follow the pseudo-header. One helper call
 * where the first version made six: on this VM a helper call costs ~50 ns (return
 * thunks), more than the rest of the program. */
static __always_inline int dnat_skb(struct __sk_buff *skb, struct edge_pkt *p)
{
	struct edge_backend *be = p->be;
	__u32 l3off = p->l3off & 0xff, l4off = p->l4off & 0xff;
	__u32 sum_off = l4off + (p->vk.proto == IPPROTO_TCP ? offsetof(struct tcphdr, check)
							    : offsetof(struct udphdr, check));
	__u64 l4flags = BPF_F_PSEUDO_HDR | (p->vk.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0);
	struct addr16 to = be->addr;
	__u16 port = be->port, vport = p->vk.port;
	__u64 diff = 0;

	if (p->v4) {
		diff = edge_csum_diff4(p->vk.addr.w[3], to.w[3]);
	} else {
#pragma unroll
		for (int i = 0; i < 4; i++)
			diff += edge_csum_diff4(p->vk.addr.w[i], to.w[i]);
	}
	__u32 d = edge_csum_fold32(diff);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u16 *sum = data + (sum_off & 0xff), before;
	if ((void *)(sum + 1) > data_end)
		return -1;
	before = *sum;
	if (bpf_l4_csum_replace(skb, sum_off, 0, d, l4flags))
		return -1;

	if (port != vport) {
		/* What the helper wrote tells the checksum's state (edge_csum_state); a TCP
		 * port is then changed without a second call: a full checksum takes the
		 * port's change, a pseudo-header sum does not. */
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		sum = data + (sum_off & 0xff);
		if ((void *)(sum + 1) > data_end)
			return -1;
		int st = p->vk.proto == IPPROTO_TCP ? edge_csum_state(before, *sum, d)
						    : EDGE_CSUM_UNKNOWN;
		if (st == EDGE_CSUM_FULL)
			edge_csum_apply(sum, edge_csum_diff4(vport, port));
		else if (st == EDGE_CSUM_UNKNOWN)
			bpf_l4_csum_replace(skb, sum_off, vport, port, l4flags | 2);
	}

	/* The helpers moved the packet's pointers: found again. */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	__u16 *ports = data + l4off;
	if ((void *)(ports + 2) > data_end)
		return -1;
	ports[1] = port;
	void *l3 = data + l3off;
	if (p->v4) {
		struct iphdr *ip4 = l3;
		if ((void *)(ip4 + 1) > data_end)
			return -1;
		ip4->daddr = to.w[3];
		edge_csum_apply(&ip4->check, diff);
	} else {
		struct ipv6hdr *ip6 = l3;
		if ((void *)(ip6 + 1) > data_end)
			return -1;
		__builtin_memcpy(&ip6->daddr, to.w, 16);
	}
	return 0;
}

/* Headers the parse needs beyond the skb's linear part (a driver may leave them in
 * pages) are pulled in; only then: a pull copies, and may unshare the skb. */
static __always_inline void pull_headers(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 l3 = sizeof(*eth), need = sizeof(*eth) + 4 + 60 + sizeof(struct tcphdr);

	if ((void *)(eth + 1) <= data_end) {
		__u16 proto = eth->h_proto;
		if (proto == ETH_P_8021Q_BE || proto == ETH_P_8021AD_BE) {
			if (data + l3 + 4 > data_end)
				goto pull;
			proto = *(__u16 *)(data + l3 + 2);
			l3 += 4;
		}
		if (proto == ETH_P_IP_BE) {
			struct iphdr *ip4 = data + l3;
			if ((void *)(ip4 + 1) <= data_end)
				need = l3 + ip4->ihl * 4 + sizeof(struct tcphdr);
		} else if (proto == ETH_P_IPV6_BE) {
			need = l3 + sizeof(struct ipv6hdr) + sizeof(struct tcphdr);
		} else {
			return; /* nothing the balancer reads */
		}
	}
pull:
	if (need > skb->len)
		need = skb->len;
	if ((long)data_end - (long)data < need)
		bpf_skb_pull_data(skb, need);
}

int edge_tc_balance(struct __sk_buff *skb)
{
	pull_headers(skb);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct edge_pkt p = {};

	switch (edge_decide(data, data_end, &p)) {
	case EDGE_V_BALANCE:
		break;
	case EDGE_V_DROP:
		return TC_ACT_SHOT;
	case EDGE_V_REFUSE:
		return refuse(skb);
	default:
		return TC_ACT_OK;
	}
	struct edge_backend *be = p.be;
	if (p.vlan || skb->vlan_present) {
		/* The tag's device decides where it goes: rewrite, let the kernel route. */
		if (dnat_skb(skb, &p))
			return TC_ACT_OK;
		count(E_FWD_ROUTE);
		return TC_ACT_OK;
	}
	if (dnat_skb(skb, &p))
		return TC_ACT_OK; /* not rewritten: the kernel sees the VIP, which is no address of its */
	if (be->flags & (EDGE_BE_PEER | EDGE_BE_REDIRECT))
		return forward_skb(skb, be);
	count(be->flags & EDGE_BE_FALLBACK ? E_FWD_FALLBACK : E_FWD_ROUTE);
	return TC_ACT_OK;
}
