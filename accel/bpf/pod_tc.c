/* tc ingress on the host side of each mesh pod's veth: a packet from a local
 * mesh pod to another local pod skips the bridge (or, for routed pods, the
 * host's routing).
 *
 * The kernel path for pod -> pod is veth -> backlog -> bridge or IP forward
 * (and their netfilter hooks) -> veth -> backlog -> pod. bpf_redirect_peer
 * moves the packet into the peer pod's namespace within the same softirq
 * round, as Cilium's host routing does. It carries every packet the socket
 * fast path cannot: handshakes, ACKs, FINs, and connections kept on TCP.
 * A routed hop stays a routed hop: TTL/hop limit down by one, MACs those of
 * the peer's gateway and the peer.
 *
 * Only TCP, and only connections whose SYN we saw go pod to pod (see
 * accel_pod_flows: replies of connections the host NATs must meet its
 * conntrack). What stays with the kernel, untouched: non-TCP, IP options,
 * fragments or a TTL about to expire (the kernel answers those), packets whose
 * destination is not a local pod, packets whose source address is not the sending pod's own (spoofed or
 * unknown), traffic between bridges or between a bridge and a routed pod (the
 * host's routing and firewall decide that), and traffic where neither end is
 * a mesh address. */
#include "lib/common.h"
#include "lib/counters.h"
#include "lib/mesh.h"
#include "lib/podroute.h"
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>
#include <linux/stddef.h>

#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_TTL_OFF (ETH_HLEN + offsetof(struct iphdr, ttl))
#define IP6_HOPS_OFF (ETH_HLEN + offsetof(struct ipv6hdr, hop_limit))

static __always_inline void count_add(u32 idx, u64 n)
{
	u64 *v = accel_counters.lookup(&idx);
	if (v)
		*v += n;
}

#define count(idx) count_add((idx), 1)

static __always_inline int mac_eq(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] &&
	       a[5] == b[5];
}

static __always_inline int is_mesh_addr(const struct addr16 *a)
{
	struct mesh_net_key k = { .prefixlen = 128 };

	k.addr = *a;
	return accel_mesh_nets.lookup(&k) != NULL;
}

/* A pod-to-pod packet of a connection we did not see open pod to pod: the kernel's. */
static __always_inline int untracked(struct pod_flow *flow)
{
	if (is_mesh_addr(&flow->dst) || is_mesh_addr(&flow->src))
		count(C_POD_UNTRACKED);
	return TC_ACT_OK;
}

int accel_pod_tc(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct pod_flow flow = {};
	struct pod_ep *to, *from;
	struct tcphdr *tcp;
	__u8 ttl;
	int v4, opening, answering;
	__u32 seq, ack_seq;

	if ((void *)(eth + 1) > end)
		return TC_ACT_OK;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end || ip->ihl != 5 || ip->protocol != IPPROTO_TCP ||
		    (ip->frag_off & bpf_htons(0x3fff)))
			return TC_ACT_OK;
		tcp = (void *)(ip + 1);
		if ((void *)(tcp + 1) > end)
			return TC_ACT_OK;
		addr_from4(&flow.src, ip->saddr);
		addr_from4(&flow.dst, ip->daddr);
		ttl = ip->ttl;
		v4 = 1;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end || ip6->nexthdr != IPPROTO_TCP)
			return TC_ACT_OK;
		tcp = (void *)(ip6 + 1);
		if ((void *)(tcp + 1) > end)
			return TC_ACT_OK;
		__builtin_memcpy(&flow.src, &ip6->saddr, sizeof(flow.src));
		__builtin_memcpy(&flow.dst, &ip6->daddr, sizeof(flow.dst));
		ttl = ip6->hop_limit;
		v4 = 0;
	} else {
		return TC_ACT_OK;
	}

	flow.sport = tcp->source;
	flow.dport = tcp->dest;
	opening = tcp->syn && !tcp->ack;
	answering = tcp->syn && tcp->ack;
	seq = bpf_ntohl(tcp->seq);
	ack_seq = bpf_ntohl(tcp->ack_seq);

	/* Most packets leaving a pod go elsewhere: one lookup decides. */
	to = accel_pod_eps.lookup(&flow.dst);
	if (!to)
		return TC_ACT_OK;
	from = accel_pod_eps.lookup(&flow.src);
	if (!from || from->ifindex != skb->ingress_ifindex) {
		count(C_POD_FOREIGN_SOURCE);
		return TC_ACT_OK;
	}
	if (from->bridge != to->bridge || to->ifindex == skb->ingress_ifindex)
		return TC_ACT_OK;
	if (opening) {
		/* Mesh membership is decided when the connection opens and kept for
		 * its life, as the socket fast path does: the flow entry says so. */
		if (!is_mesh_addr(&flow.dst) && !is_mesh_addr(&flow.src))
			return TC_ACT_OK;
		struct pod_flow_val fresh = { .syn_next = seq + 1 };

		accel_pod_flows.update(&flow, &fresh);
	} else {
		struct pod_flow_val *seen = accel_pod_flows.lookup(&flow);
		struct pod_flow rev = {};

		rev.src = flow.dst;
		rev.dst = flow.src;
		rev.sport = flow.dport;
		rev.dport = flow.sport;
		if (seen) {
			/* The initiator never sends the SYN-ACK: this is another
			 * connection on an old entry's four-tuple. */
			if (answering) {
				accel_pod_flows.delete(&flow);
				return untracked(&flow);
			}
		} else {
			seen = accel_pod_flows.lookup(&rev);
			if (!seen)
				return untracked(&flow);
			if (answering && ack_seq != seen->syn_next) {
				accel_pod_flows.delete(&rev);
				return untracked(&flow);
			}
		}
	}

	/* On a bridge the sender addressed the peer already (it resolved it). */
	int set_mac = !to->bridge || !mac_eq(eth->h_dest, to->mac);

	if (!to->bridge) {
		/* Routed: what the host's forwarding would do to the packet. An
		 * expiring TTL is the kernel's to answer (ICMP time exceeded). */
		if (ttl <= 1)
			return TC_ACT_OK;
		if (v4) {
			__u16 old = 0, new = 0;

			if (bpf_skb_load_bytes(skb, IP_TTL_OFF, &old, 2) < 0)
				return TC_ACT_OK;
			new = old;
			((__u8 *)&new)[0] = ttl - 1;
			if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old, new, 2) < 0 ||
			    bpf_skb_store_bytes(skb, IP_TTL_OFF, &new, 2, 0) < 0)
				return TC_ACT_SHOT; /* half-rewritten: never deliver it */
		} else {
			__u8 hops = ttl - 1;

			if (bpf_skb_store_bytes(skb, IP6_HOPS_OFF, &hops, 1, 0) < 0)
				return TC_ACT_OK;
		}
		if (bpf_skb_store_bytes(skb, 6, to->host_mac, 6, 0) < 0)
			return TC_ACT_SHOT;
	}
	/* The peer pod's interface accepts what is addressed to it. */
	if (set_mac && bpf_skb_store_bytes(skb, 0, to->mac, 6, 0) < 0)
		return to->bridge ? TC_ACT_OK : TC_ACT_SHOT;
	count(C_POD_REDIRECTS);
	return bpf_redirect_peer(to->ifindex, 0);
}
