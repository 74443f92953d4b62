/* Service load balancing at connect()/sendmsg() time, shared by the socket
 * programs (connect.c) and read by the control plane (accel/datapath/services.py).
 *
 * A service points at a run of backend slots. The writer builds a new run for
 * every change, flips the service entry to it, then frees the old run, so a
 * connect() never sees a half-written service. Weights are expressed by how
 * many slots an endpoint gets; the program picks a slot at random.
 */
#ifndef ACCEL_LB_H
#define ACCEL_LB_H

#include "common.h"

#ifndef ACCEL_SERVICES_MAX
#define ACCEL_SERVICES_MAX 16384
#endif
#ifndef ACCEL_SLOTS_MAX
#define ACCEL_SLOTS_MAX 262144
#endif
#ifndef ACCEL_REVNAT_MAX
#define ACCEL_REVNAT_MAX 262144
#endif

/* svc_key.port of a service on every port of its VIP (ANY_PORT in accel/model.py: a
 * transparent proxy's chain for a VIP/32 without a destination port, Consul's upstreams).
 * connect() looks up VIP:port first, then VIP:any; the endpoint keeps its own port. */
#define SVC_ANY_PORT 0

struct svc_key {
	struct addr16 vip;
	__u16 port;   /* host order; SVC_ANY_PORT: every port */
	__u8 proto;   /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad;
};

struct svc_val {
	__u32 slots_id; /* which run of accel_slots is live */
	__u32 nslots;   /* 0: the service has no usable endpoint */
	__u32 index;    /* slot in accel_svc_stats */
	__u32 flags;    /* SVC_F_* */
};

/* The service's connections are handed socket to socket (its fastpath: redirect); without
 * it they stay on TCP (balanced at connect(), pod-routed). */
#define SVC_F_REDIRECT 1

struct slot_key {
	__u32 slots_id;
	__u32 slot;
};

struct backend {
	struct addr16 addr;
	__u16 port; /* host order */
	__u16 pad;
};

/* Which VIP a socket dialed, so getpeername()/recvmsg() can show it. */
struct revnat_key {
	__u64 cookie; /* socket cookie */
	struct addr16 backend;
	__u16 port;   /* backend port, host order */
	__u16 pad;
	__u32 pad2;
};

struct revnat_val {
	struct addr16 vip;
	__u16 port;
	__u16 pad;
};

struct svc_stats {
	__u64 connects;    /* connect()/sendmsg() balanced to an endpoint */
	__u64 no_backend;  /* refused: no usable endpoint */
};

/* VIP:port/proto -> its live slot run. */
ACCEL_MAP_F("hash", struct svc_key, struct svc_val, accel_services, ACCEL_SERVICES_MAX,
	    BPF_F_NO_PREALLOC);
/* (run, slot) -> endpoint. */
ACCEL_MAP_F("hash", struct slot_key, struct backend, accel_slots, ACCEL_SLOTS_MAX,
	    BPF_F_NO_PREALLOC);
/* (socket, endpoint) -> VIP it was dialed as, for unconnected UDP (one socket,
 * many peers); LRU: old entries age out. A connected socket keeps its VIP in its
 * own storage instead (sock_state.vip, lib/sock.h). */
ACCEL_MAP("lru_hash", struct revnat_key, struct revnat_val, accel_revnat, ACCEL_REVNAT_MAX);
/* Per-service counters, indexed by svc_val.index. */
ACCEL_MAP("percpu_array", u32, struct svc_stats, accel_svc_stats, ACCEL_SERVICES_MAX);

#endif /* ACCEL_LB_H */
