/* tc ingress on the host side of each mesh pod's veth: a packet from a local
 * mesh pod to another local pod on the same bridge skips the bridge.
 *
 * The kernel path for pod -> pod is veth -> backlog -> bridge (and its
 * netfilter hooks) -> veth -> backlog -> pod. bpf_redirect_peer moves the
 * packet into the peer pod's namespace within the same softirq round, as
 * Cilium's host routing does. It carries every packet the socket fast path
 * cannot: handshakes, ACKs, FINs, UDP, and connections kept on TCP.
 *
 * What stays with the kernel, untouched: non-IP, packets whose destination is
 * not a local pod, packets whose source address is not the sending pod's own
 * (spoofed or unknown), traffic between bridges (the host's routing and
 * firewall decide that), and traffic where neither end is a mesh address. */
#include "lib/common.h"
#include "lib/counters.h"
#include "lib/mesh.h"
#include "lib/podroute.h"
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

static __always_inline void count_add(u32 idx, u64 n)
{
	u64 *v = accel_counters.lookup(&idx);
	if (v)
		*v += n;
}

#define count(idx) count_add((idx), 1)

static __always_inline int is_mesh_addr(const struct addr16 *a)
{
	struct mesh_net_key k = { .prefixlen = 128 };

	k.addr = *a;
	return accel_mesh_nets.lookup(&k) != NULL;
}

int accel_pod_tc(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct addr16 src, dst;
	struct pod_ep *to, *from;

	if ((void *)(eth + 1) > end)
		return TC_ACT_OK;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end)
			return TC_ACT_OK;
		addr_from4(&src, ip->saddr);
		addr_from4(&dst, ip->daddr);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end)
			return TC_ACT_OK;
		__builtin_memcpy(&src, &ip6->saddr, sizeof(src));
		__builtin_memcpy(&dst, &ip6->daddr, sizeof(dst));
	} else {
		return TC_ACT_OK;
	}

	/* Most packets leaving a pod go elsewhere: one lookup decides. */
	to = accel_pod_eps.lookup(&dst);
	if (!to)
		return TC_ACT_OK;
	from = accel_pod_eps.lookup(&src);
	if (!from || from->ifindex != skb->ingress_ifindex) {
		count(C_POD_FOREIGN_SOURCE);
		return TC_ACT_OK;
	}
	if (from->bridge != to->bridge || to->ifindex == skb->ingress_ifindex)
		return TC_ACT_OK;
	if (!is_mesh_addr(&dst) && !is_mesh_addr(&src))
		return TC_ACT_OK;

	/* The peer pod's interface accepts what is addressed to it (a routed
	 * sender may have addressed the gateway). */
	if (bpf_skb_store_bytes(skb, 0, to->mac, 6, 0) < 0)
		return TC_ACT_OK;
	count(C_POD_REDIRECTS);
	return bpf_redirect_peer(to->ifindex, 0);
}
