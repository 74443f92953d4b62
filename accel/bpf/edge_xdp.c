/* XDP on the edge interface: client packets to an edge VIP are DNATed to a
 * backend chosen by the VIP's Maglev ring (or kept on the backend the flow
 * already has) and redirected to the backend's interface. Anything that is not
 * a TCP/UDP packet to a VIP passes untouched. The flood guard (deny list, SYN
 * token bucket) applies to VIP traffic only: the balancer protects the
 * services it fronts, the host's own traffic is the kernel's business.
 */
#include "lib/common.h"
#include "lib/edge.h"
#include "lib/gcra.h"

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

/* Tell edge_ingress.c (tc ingress, same interface) what to do with a passed frame. The
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

int edge_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	void *l3;
	__u16 h_proto;
	int vlan = 0;

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	h_proto = eth->h_proto;
	l3 = eth + 1;
	if (h_proto == ETH_P_8021Q_BE || h_proto == ETH_P_8021AD_BE) {
		if (l3 + 4 > data_end)
			return XDP_PASS;
		h_proto = *(__u16 *)(l3 + 2);
		l3 += 4;
		vlan = 1;
	}

	struct edge_vip_key vk = {};
	struct addr16 src;
	__u16 sport;
	struct iphdr *ip4 = NULL;
	struct ipv6hdr *ip6 = NULL;
	void *l4;

	if (h_proto == ETH_P_IP_BE) {
		ip4 = l3;
		if ((void *)(ip4 + 1) > data_end) {
			count(E_PASS_MALFORMED);
			return XDP_PASS;
		}
		__u32 hl = ip4->ihl * 4;
		if (hl < sizeof(*ip4)) {
			count(E_PASS_MALFORMED);
			return XDP_PASS;
		}
		if (ip4->protocol != IPPROTO_TCP && ip4->protocol != IPPROTO_UDP)
			return XDP_PASS;
		if (ip4->frag_off & IP_FRAG_BE) {
			count(E_PASS_FRAGMENT);
			return XDP_PASS;
		}
		vk.proto = ip4->protocol;
		addr_from4(&src, ip4->saddr);
		addr_from4(&vk.addr, ip4->daddr);
		l4 = l3 + hl;
	} else if (h_proto == ETH_P_IPV6_BE) {
		ip6 = l3;
		if ((void *)(ip6 + 1) > data_end) {
			count(E_PASS_MALFORMED);
			return XDP_PASS;
		}
		if (ip6->nexthdr != IPPROTO_TCP && ip6->nexthdr != IPPROTO_UDP) {
			/* Fragment, hop-by-hop, routing...: the kernel knows how. */
			if (ip6->nexthdr != IPPROTO_ICMPV6)
				count(E_PASS_IPV6_EXT);
			return XDP_PASS;
		}
		vk.proto = ip6->nexthdr;
		__builtin_memcpy(&src, &ip6->saddr, 16);
		__builtin_memcpy(&vk.addr, &ip6->daddr, 16);
		l4 = ip6 + 1;
	} else {
		return XDP_PASS;
	}

	/* Ports, and the checksum field: TCP needs 18 bytes, UDP 8. */
	__u16 *ports = l4;
	__u16 *l4sum;
	int syn = 0;
	if (vk.proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > data_end) {
			count(E_PASS_MALFORMED);
			return XDP_PASS;
		}
		syn = th->syn && !th->ack;
		l4sum = &th->check;
	} else {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > data_end) {
			count(E_PASS_MALFORMED);
			return XDP_PASS;
		}
		l4sum = &uh->check;
	}
	sport = ports[0];
	vk.port = ports[1];

	struct edge_vip *vip = find_vip(&vk);
	if (!vip)
		return XDP_PASS;

	u32 vid = vip->id;
	struct edge_vip_stats *st = edge_vip_stats.lookup(&vid);
	int drop = edge_guard(&src, ip4 != NULL, syn, st);
	if (drop >= 0) {
		count(drop);
		return XDP_DROP;
	}

	/* Over the connection limit: the SYN goes to tc unchanged (to the VIP), which
	 * answers it with a reset from the VIP, as a closed port would: the client fails
	 * at once instead of retrying into the limit. */
	if (syn && !within_limit(vid)) {
		count(E_REFUSE_LIMIT);
		if (st)
			st->refused_limit++;
		if (edge_mark(ctx, EDGE_META_REFUSE, vid)) {
			count(E_RST_FAIL);
			return XDP_DROP;
		}
		return XDP_PASS;
	}

	u32 bid = 0;
	struct edge_backend *be = pick(&src, sport, &vk, vip, vk.proto == IPPROTO_TCP && !syn, st,
				       &bid);
	if (!be) {
		count(E_DROP_NO_BACKEND);
		if (st)
			st->drop_no_backend++;
		return XDP_DROP;
	}

	/* DNAT with incremental checksums: the pseudo-header covers the address. */
	__u64 diff = 0;
	if (ip4) {
		__u32 old = ip4->daddr, new = be->addr.w[3];
		diff = edge_csum_diff4(old, new);
		ip4->daddr = new;
		edge_csum_apply(&ip4->check, diff);
	} else if (ip6) {
		__u32 *d = (__u32 *)&ip6->daddr;
#pragma unroll
		for (int i = 0; i < 4; i++) {
			diff += edge_csum_diff4(d[i], be->addr.w[i]);
			d[i] = be->addr.w[i];
		}
	}
	if (be->port != vk.port) {
		diff += edge_csum_diff4(vk.port, be->port);
		ports[1] = be->port;
	}
	/* IPv4 UDP may carry no checksum (0): leave it so; a computed 0 is sent as 0xffff. */
	if (vk.proto == IPPROTO_TCP || *l4sum || ip6) {
		edge_csum_apply(l4sum, diff);
		if (vk.proto == IPPROTO_UDP && *l4sum == 0)
			*l4sum = 0xffff;
	}

	if (st) {
		st->packets++;
		st->bytes += data_end - data;
	}

	if (!(be->flags & EDGE_BE_REDIRECT)) {
		/* A pod's veth: tc ingress moves it in (a VLAN-tagged frame is the kernel's:
		 * the tag's device decides where it goes). Counted there. */
		if ((be->flags & EDGE_BE_PEER) && !vlan &&
		    !edge_mark(ctx, EDGE_META_PEER, bid))
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
	if (ip4) {
		if (ip4->ttl <= 1) {
			count(E_FWD_TTL_EXPIRING);
			return XDP_PASS;
		}
		__u16 *w = (__u16 *)&ip4->ttl; /* ttl and protocol: one checksum word */
		__u16 before = *w;
		ip4->ttl--;
		edge_csum_apply(&ip4->check, (__u64)(__u16)~before + *w);
	} else if (ip6) {
		if (ip6->hop_limit <= 1) {
			count(E_FWD_TTL_EXPIRING);
			return XDP_PASS;
		}
		ip6->hop_limit--;
	}

	u32 m0 = be->macs[0], m1 = be->macs[1], m2 = be->macs[2];
	u32 tx = be->tx;
	__u16 l3proto = ip4 ? ETH_P_IP_BE : ETH_P_IPV6_BE;
	if (vlan) {
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
