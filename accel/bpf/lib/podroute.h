/* Pod routing: the local mesh pods, by address, as the agent found them in the
 * kernel (never learnt from packets, so a pod cannot claim another's address).
 *
 * Each entry names the host side of the pod's veth, the bridge it is a port of
 * (none for a routed pod, as with Calico or Cilium's veth mode), and the MACs of
 * both ends. A packet between two pods on the same bridge, or between two routed
 * pods, can then be handed straight to the peer pod's interface
 * (bpf_redirect_peer): no bridge or routing, no netfilter, no second backlog
 * queue.
 */
#ifndef ACCEL_PODROUTE_H
#define ACCEL_PODROUTE_H

#include "common.h"

#ifndef ACCEL_POD_EPS_MAX
#define ACCEL_POD_EPS_MAX 16384
#endif

struct pod_ep {
	__u32 ifindex;    /* host side of the pod's veth */
	__u32 bridge;     /* ifindex of the bridge that port belongs to; 0: routed */
	__u8 mac[6];      /* the pod's own interface */
	__u8 host_mac[6]; /* the host side: a routed pod's gateway */
};

ACCEL_MAP("hash", struct addr16, struct pod_ep, accel_pod_eps, ACCEL_POD_EPS_MAX);

#ifndef ACCEL_POD_FLOWS_MAX
#define ACCEL_POD_FLOWS_MAX 131072
#endif

/* TCP connections whose SYN went straight from one local pod to another, as the
 * initiator sent it (ports in network order). Only their packets are handed
 * over: a connection the host NATs (a pod dialing a ClusterIP or a published
 * host port that the host's DNAT sends to another local pod) never shows such
 * a SYN, and its replies must reach the host's conntrack to be translated
 * back. LRU: a flow that ages out simply goes back to the bridge. */
struct pod_flow {
	struct addr16 src;
	struct addr16 dst;
	__u16 sport;
	__u16 dport;
	__u32 pad;
};

/* The initiator's sequence number after its SYN: the SYN-ACK must acknowledge it.
 * An entry outlives its connection (LRU), so a later connection on the same
 * four-tuple that the host NATs (its SYN never passed pod to pod) would find a
 * stale one: its SYN-ACK does not acknowledge the recorded SYN, and the stale
 * entry goes before any of that connection's packets is handed over. */
struct pod_flow_val {
	__u32 syn_next; /* host order */
	__u32 pad;
};

ACCEL_MAP_F("lru_hash", struct pod_flow, struct pod_flow_val, accel_pod_flows,
	    ACCEL_POD_FLOWS_MAX, BPF_F_NO_COMMON_LRU);

#endif /* ACCEL_PODROUTE_H */
