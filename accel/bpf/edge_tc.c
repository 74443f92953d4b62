/* Replies of balanced flows, given the VIP back as their source, so clients only ever
 * see the VIP. Two programs over one rewrite (reply_revnat):
 *
 * edge_tc, clsact egress of the edge interface: whatever leaves towards clients.
 *
 * edge_reply, clsact ingress of the host end of each backend's interface that the edge
 * enters directly (bpf_redirect_peer, or an XDP/tc redirect): a reply is rewritten there
 * and sent straight out of the edge interface (bpf_redirect_neigh, TTL one less), as the
 * request came in. Its connection never met the host's conntrack on the way in, so the
 * host's netfilter must not see the reply either: a masquerade rule for the backends'
 * subnet (Docker's, many CNIs') would take it for a new connection and rewrite its
 * source, and "ctstate INVALID -j DROP" rules would drop it. Anything else goes on to the
 * next filter (TC_ACT_UNSPEC: pod routing sits behind us on the same hook).
 *
 * edge_tc also translates ICMP errors about a balanced flow (frag-needed / packet too
 * big, unreachable, time exceeded, from the backend or a router between): the packet
 * they quote is given the VIP back, and so is their source when the backend itself sent
 * it; the client's path-MTU discovery then works through the edge.
 *
 * The L4 checksum by the helper, not hand-made arithmetic: a reply from a local pod is
 * usually CHECKSUM_PARTIAL (the L4 field holds only the pseudo-header sum), and
 * bpf_l4_csum_replace(BPF_F_PSEUDO_HDR) updates either form correctly.
 * A packet we cannot read goes on as it is.
 */
#include "lib/common.h"
#include "lib/edge.h"
#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>
#include <uapi/linux/pkt_cls.h>

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

/* bcc's helpers.h declares bpf_redirect_neigh without its plen argument (the kernel's
 * has four since 5.11): declared here as the kernel defines it. */
static long (*redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) =
	(void *)BPF_FUNC_redirect_neigh;

static __always_inline void count(u32 idx)
{
	u64 *v = edge_counters.lookup(&idx);
	if (v)
		*v += 1;
}

/* Whether a backend serves on this (network-order) source port: edge_rports. */
static __always_inline int backend_port(__u16 port)
{
	u32 w = port >> 6;
	u64 *bits = edge_rports.lookup(&w);

	return bits && (*bits & (1ULL << (port & 63)));
}

/* The reply mapping of the flow an ICMP error quotes: the quoted packet went client ->
 * backend, so its reverse is the reply key. */
static __always_inline struct edge_rev *quoted_rev(struct edge_flow *rk, __u8 proto,
						   __u16 *ports)
{
	rk->sport = ports[1];
	rk->dport = ports[0];
	rk->proto = proto;
	return edge_revs.lookup(rk);
}

/* The quoted packet's own L4 checksum, where the error quotes it (UDP's is in the first 8
 * bytes, TCP's at byte 16: Linux quotes as much as fits): updated by `diff` (the address
 * and port given back), and the ICMP checksum at `sum` for that change. A UDP checksum of
 * 0 (none) stays 0. */
static __always_inline void quoted_l4sum(struct __sk_buff *skb, __u32 l4, __u8 proto, __u32 sum,
					 __u64 diff)
{
	__u32 at = l4 + (proto == IPPROTO_TCP ? offsetof(struct tcphdr, check)
					      : offsetof(struct udphdr, check));
	__u16 old, new;

	if (bpf_skb_load_bytes(skb, at, &old, 2))
		return; /* not quoted */
	if (proto == IPPROTO_UDP && old == 0)
		return;
	new = old;
	edge_csum_apply(&new, diff);
	if (proto == IPPROTO_UDP && new == 0)
		new = 0xffff;
	if (bpf_skb_store_bytes(skb, at, &new, 2, 0))
		return;
	bpf_l4_csum_replace(skb, sum, old, new, 2);
}

static __always_inline int icmp4_revnat(struct __sk_buff *skb, __u32 l3off, __u32 hl)
{
	__u32 off = l3off + hl; /* ICMP header; its checksum has no pseudo-header */
	__u8 type;

	if (bpf_skb_load_bytes(skb, off, &type, 1))
		return TC_ACT_OK;
	if (type != ICMP_DEST_UNREACH && type != ICMP_TIME_EXCEEDED && type != ICMP_PARAMETERPROB)
		return TC_ACT_OK;
	__u32 in3 = off + 8;
	struct iphdr in;
	if (bpf_skb_load_bytes(skb, in3, &in, sizeof(in)))
		return TC_ACT_OK;
	if (in.protocol != IPPROTO_TCP && in.protocol != IPPROTO_UDP)
		return TC_ACT_OK;
	__u32 ihl = in.ihl * 4;
	if (ihl < sizeof(in) || ihl > 60)
		return TC_ACT_OK;
	__u16 ports[2];
	if (bpf_skb_load_bytes(skb, in3 + ihl, ports, sizeof(ports)))
		return TC_ACT_OK;
	struct edge_flow rk = {};
	addr_from4(&rk.src, in.daddr);
	addr_from4(&rk.dst, in.saddr);
	struct edge_rev *rv = quoted_rev(&rk, in.protocol, ports);
	if (!rv)
		return TC_ACT_OK;

	__u32 vip = rv->vip.w[3], backend = in.daddr;
	__u16 vport = rv->vport, newc;
	__u32 sum = off + 2;
	if (bpf_skb_store_bytes(skb, in3 + offsetof(struct iphdr, daddr), &vip, 4, 0))
		return TC_ACT_OK;
	bpf_l3_csum_replace(skb, in3 + offsetof(struct iphdr, check), backend, vip, 4);
	if (bpf_skb_load_bytes(skb, in3 + offsetof(struct iphdr, check), &newc, 2))
		return TC_ACT_OK;
	bpf_l4_csum_replace(skb, sum, backend, vip, 4);
	bpf_l4_csum_replace(skb, sum, in.check, newc, 2);
	if (vport != ports[1]) {
		bpf_skb_store_bytes(skb, in3 + ihl + 2, &vport, 2, 0);
		bpf_l4_csum_replace(skb, sum, ports[1], vport, 2);
	}
	quoted_l4sum(skb, in3 + ihl, in.protocol, sum,
		     edge_csum_diff4(backend, vip) +
		     (vport != ports[1] ? edge_csum_diff4(ports[1], vport) : 0));
	/* A router on the way keeps its address; the backend's own answer is the VIP's. */
	__u32 osrc;
	if (!bpf_skb_load_bytes(skb, l3off + offsetof(struct iphdr, saddr), &osrc, 4) &&
	    osrc == backend) {
		bpf_skb_store_bytes(skb, l3off + offsetof(struct iphdr, saddr), &vip, 4, 0);
		bpf_l3_csum_replace(skb, l3off + offsetof(struct iphdr, check), backend, vip, 4);
	}
	count(E_ICMP_REVNAT);
	return TC_ACT_OK;
}

static __always_inline int icmp6_revnat(struct __sk_buff *skb, __u32 l3off)
{
	__u32 off = l3off + sizeof(struct ipv6hdr); /* checksum covers the pseudo-header */
	__u8 type;

	if (bpf_skb_load_bytes(skb, off, &type, 1))
		return TC_ACT_OK;
	if (type < ICMPV6_DEST_UNREACH || type > ICMPV6_PARAMPROB)
		return TC_ACT_OK;
	__u32 in3 = off + 8;
	struct ipv6hdr in;
	if (bpf_skb_load_bytes(skb, in3, &in, sizeof(in)))
		return TC_ACT_OK;
	if (in.nexthdr != IPPROTO_TCP && in.nexthdr != IPPROTO_UDP)
		return TC_ACT_OK;
	__u16 ports[2];
	if (bpf_skb_load_bytes(skb, in3 + sizeof(in), ports, sizeof(ports)))
		return TC_ACT_OK;
	struct edge_flow rk = {};
	__builtin_memcpy(&rk.src, &in.daddr, 16);
	__builtin_memcpy(&rk.dst, &in.saddr, 16);
	struct edge_rev *rv = quoted_rev(&rk, in.nexthdr, ports);
	if (!rv)
		return TC_ACT_OK;

	struct addr16 vip = rv->vip;
	__u16 vport = rv->vport;
	__u32 sum = off + 2;
	__s64 diff = bpf_csum_diff(rk.src.w, 16, vip.w, 16, 0);
	if (bpf_skb_store_bytes(skb, in3 + offsetof(struct ipv6hdr, daddr), vip.w, 16, 0))
		return TC_ACT_OK;
	bpf_l4_csum_replace(skb, sum, 0, diff, 0);
	if (vport != ports[1]) {
		bpf_skb_store_bytes(skb, in3 + sizeof(in) + 2, &vport, 2, 0);
		bpf_l4_csum_replace(skb, sum, ports[1], vport, 2);
	}
	__u64 qdiff = vport != ports[1] ? edge_csum_diff4(ports[1], vport) : 0;
#pragma unroll
	for (int i = 0; i < 4; i++)
		qdiff += edge_csum_diff4(rk.src.w[i], vip.w[i]);
	quoted_l4sum(skb, in3 + sizeof(in), in.nexthdr, sum, qdiff);
	struct addr16 osrc;
	if (!bpf_skb_load_bytes(skb, l3off + offsetof(struct ipv6hdr, saddr), &osrc, 16) &&
	    osrc.w[0] == rk.src.w[0] && osrc.w[1] == rk.src.w[1] &&
	    osrc.w[2] == rk.src.w[2] && osrc.w[3] == rk.src.w[3]) {
		bpf_skb_store_bytes(skb, l3off + offsetof(struct ipv6hdr, saddr), vip.w, 16, 0);
		bpf_l4_csum_replace(skb, sum, 0, diff, BPF_F_PSEUDO_HDR);
	}
	count(E_ICMP_REVNAT);
	return TC_ACT_OK;
}

/* What reply_revnat did. */
enum reply_done {
	REPLY_NOT_OURS = 0,
	REPLY_REWRITTEN,  /* the VIP is its source: the kernel routes it on */
	REPLY_FORWARDED,  /* and its TTL / hop limit one less: ready to leave */
};

/* A reply of a balanced flow gets the VIP back as its source. `fwd` (edge_reply, which
 * forwards it itself: the edge interface's ifindex) also takes one off its TTL / hop
 * limit, unless it expires here (the kernel's to answer), and says where it goes. ICMP errors are translated when `icmp` (edge_tc; edge_reply
 * leaves them to the kernel's path, which ends at edge_tc).
 *
 * Reads are direct, writes by the helpers: these programs see every packet of their
 * interface, mostly other traffic, and a packet from a local socket is a clone (TCP keeps
 * the original): a direct write anywhere in a program makes the kernel unshare every
 * cloned packet before it runs, a helper's write only the packet it changes. The L3 part
 * is one store (TTL, checksum and address are adjacent), the L4 checksum goes through the
 * helper that knows the skb's checksum state: 2-4 helper calls a reply (~50 ns each on
 * this VM), where the first version made eleven. */
static __always_inline int reply_revnat(struct __sk_buff *skb, int icmp, __u32 fwd,
					__u32 *out_ifindex)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 l3off = sizeof(*eth);
	__u16 h_proto;

	if ((void *)(eth + 1) > data_end)
		return REPLY_NOT_OURS;
	h_proto = eth->h_proto;
	if (h_proto == ETH_P_8021Q_BE || h_proto == ETH_P_8021AD_BE) {
		if (data + l3off + 4 > data_end)
			return REPLY_NOT_OURS;
		h_proto = *(__u16 *)(data + l3off + 2);
		l3off += 4;
	}

	struct edge_flow rk = {};
	__u32 l4off;
	__u8 hops;
	__u16 l3sum = 0;

	if (h_proto == ETH_P_IP_BE) {
		struct iphdr *ip4 = data + l3off;
		if ((void *)(ip4 + 1) > data_end)
			return REPLY_NOT_OURS;
		if (ip4->protocol == IPPROTO_ICMP && ip4->ihl >= 5) {
			if (icmp)
				icmp4_revnat(skb, l3off, ip4->ihl * 4);
			return REPLY_NOT_OURS;
		}
		if (ip4->protocol != IPPROTO_TCP && ip4->protocol != IPPROTO_UDP)
			return REPLY_NOT_OURS;
		/* Later fragments carry no ports; a reply that big is split after us. */
		if (ip4->frag_off & IP_FRAG_BE)
			return REPLY_NOT_OURS;
		__u32 hl = ip4->ihl * 4;
		if (hl < sizeof(*ip4) || hl > 60)
			return REPLY_NOT_OURS;
		rk.proto = ip4->protocol;
		addr_from4(&rk.src, ip4->saddr);
		addr_from4(&rk.dst, ip4->daddr);
		hops = ip4->ttl;
		l3sum = ip4->check;
		l4off = l3off + hl;
	} else if (h_proto == ETH_P_IPV6_BE) {
		struct ipv6hdr *ip6 = data + l3off;
		if ((void *)(ip6 + 1) > data_end)
			return REPLY_NOT_OURS;
		if (ip6->nexthdr == IPPROTO_ICMPV6) {
			if (icmp)
				icmp6_revnat(skb, l3off);
			return REPLY_NOT_OURS;
		}
		if (ip6->nexthdr != IPPROTO_TCP && ip6->nexthdr != IPPROTO_UDP)
			return REPLY_NOT_OURS;
		rk.proto = ip6->nexthdr;
		__builtin_memcpy(&rk.src, &ip6->saddr, 16);
		__builtin_memcpy(&rk.dst, &ip6->daddr, 16);
		hops = ip6->hop_limit;
		l4off = l3off + sizeof(*ip6);
	} else {
		return REPLY_NOT_OURS;
	}

	__u16 ports[2];
	__u16 *pp = data + (l4off & 0xff);
	if ((void *)(pp + 2) <= data_end) {
		ports[0] = pp[0];
		ports[1] = pp[1];
	} else if (bpf_skb_load_bytes(skb, l4off, ports, sizeof(ports))) {
		return REPLY_NOT_OURS;
	}
	rk.sport = ports[0];
	rk.dport = ports[1];

	if (!backend_port(rk.sport))
		return REPLY_NOT_OURS;
	struct edge_rev *rv = edge_revs.lookup(&rk);
	if (!rv)
		return REPLY_NOT_OURS;

	struct addr16 vip = rv->vip;
	__u16 vport = rv->vport;
	u32 vid = rv->vip_id;
	__u32 l4sum_off = l4off + (rk.proto == IPPROTO_TCP ? offsetof(struct tcphdr, check)
							   : offsetof(struct udphdr, check));
	__u64 l4flags = BPF_F_PSEUDO_HDR | (rk.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0);
	int done = fwd && hops > 1 ? REPLY_FORWARDED : REPLY_REWRITTEN;
	__u64 diff = 0;

	if (done == REPLY_FORWARDED) {
		/* Out of the interface the kernel would forward it through, as from this
		 * interface (a multi-homed host's route to the client need not be the edge
		 * interface). Where this interface does not forward (the FIB helper will not
		 * say then), out of the edge interface it came in by; no route, or too big
		 * for it (GSO-aware without tot_len): the kernel's to route or answer. */
		struct bpf_fib_lookup fib = { .ifindex = skb->ifindex, .l4_protocol = rk.proto,
					      .sport = vport, .dport = rk.dport };
		if (h_proto == ETH_P_IP_BE) {
			fib.family = AF_INET;
			fib.ipv4_src = vip.w[3];
			fib.ipv4_dst = rk.dst.w[3];
		} else {
			fib.family = AF_INET6;
			__builtin_memcpy(fib.ipv6_src, vip.w, 16);
			__builtin_memcpy(fib.ipv6_dst, rk.dst.w, 16);
		}
		long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
		if (rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
			*out_ifindex = fib.ifindex;
		} else if (rc < 0 || rc == BPF_FIB_LKUP_RET_FWD_DISABLED) {
			*out_ifindex = fwd;
		} else {
			count(E_REPLY_KERNEL);
			done = REPLY_REWRITTEN;
		}
	}

	if (h_proto == ETH_P_IP_BE) {
		/* Bytes 8-15: TTL, protocol, header checksum, source address. */
		struct {
			__u8 ttl;
			__u8 proto;
			__u16 check;
			__u32 saddr;
		} l3 = { .ttl = hops, .proto = rk.proto, .check = l3sum, .saddr = vip.w[3] };
		diff = edge_csum_diff4(rk.src.w[3], vip.w[3]);
		__u64 l3diff = diff;
		if (done == REPLY_FORWARDED) {
			__u16 before = *(__u16 *)&l3;
			l3.ttl--;
			l3diff += (__u16)~before + *(__u16 *)&l3;
		}
		edge_csum_apply(&l3.check, l3diff);
		if (bpf_skb_store_bytes(skb, l3off + offsetof(struct iphdr, ttl), &l3, sizeof(l3), 0))
			return REPLY_NOT_OURS;
	} else {
#pragma unroll
		for (int i = 0; i < 4; i++)
			diff += edge_csum_diff4(rk.src.w[i], vip.w[i]);
		/* Byte 7 (hop limit) and the source address after it. */
		struct {
			__u8 hop_limit;
			__u8 saddr[16];
		} __attribute__((packed)) l3 = { .hop_limit = hops - (done == REPLY_FORWARDED) };
		__builtin_memcpy(l3.saddr, vip.w, 16);
		if (bpf_skb_store_bytes(skb, l3off + offsetof(struct ipv6hdr, hop_limit), &l3,
					sizeof(l3), 0))
			return REPLY_NOT_OURS;
	}
	bpf_l4_csum_replace(skb, l4sum_off, 0, edge_csum_fold32(diff), l4flags);
	if (vport != rk.sport) {
		bpf_l4_csum_replace(skb, l4sum_off, rk.sport, vport, l4flags | 2);
		bpf_skb_store_bytes(skb, l4off, &vport, 2, 0);
	}

	count(E_REPLY_REVNAT);
	struct edge_vip_stats *st = edge_vip_stats.lookup(&vid);
	if (st) {
		st->reply_packets++;
		st->reply_bytes += skb->len;
	}
	return done;
}

int edge_tc(struct __sk_buff *skb)
{
	__u32 unused = 0;

	reply_revnat(skb, 1, 0, &unused);
	return TC_ACT_OK;
}

int edge_reply(struct __sk_buff *skb)
{
	__u32 zero = 0;

	if (skb->vlan_present)
		return TC_ACT_UNSPEC;
	/* Forwarded as a router would (TTL / hop limit one less) while the edge is attached
	 * (edge_uplink set); otherwise only rewritten, and the kernel routes it. */
	u32 *uplink = edge_uplink.lookup(&zero);
	__u32 out = 0;
	switch (reply_revnat(skb, 0, uplink ? *uplink : 0, &out)) {
	case REPLY_NOT_OURS:
		return TC_ACT_UNSPEC;
	case REPLY_FORWARDED:
		count(E_REPLY_DIRECT);
		return redirect_neigh(out, NULL, 0, 0);
	default:
		return TC_ACT_OK; /* the VIP as its source; one expiring here is the kernel's */
	}
}
