/* Pod routing: the local mesh pods, by address, as the agent found them in the
 * kernel (never learnt from packets, so a pod cannot claim another's address).
 *
 * Each entry names the host side of the pod's veth, the bridge it is a port of
 * and the MAC of the pod's own interface. A packet between two pods on the same
 * bridge can then be handed straight to the peer pod's interface
 * (bpf_redirect_peer): no bridge, no bridge netfilter, no second backlog queue.
 */
#ifndef ACCEL_PODROUTE_H
#define ACCEL_PODROUTE_H

#include "common.h"

#ifndef ACCEL_POD_EPS_MAX
#define ACCEL_POD_EPS_MAX 16384
#endif

struct pod_ep {
	__u32 ifindex; /* host side of the pod's veth */
	__u32 bridge;  /* ifindex of the bridge that port belongs to */
	__u8 mac[6];   /* the pod's own interface */
	__u16 pad;
};

ACCEL_MAP("hash", struct addr16, struct pod_ep, accel_pod_eps, ACCEL_POD_EPS_MAX);

#endif /* ACCEL_PODROUTE_H */
