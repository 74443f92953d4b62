/* Connection records: what each connection dialed through a service VIP did, sent to user
 * space through a ring buffer (accel/flows/ reads it).
 *
 * One record per connection, from the client's end (both ends local: still one), built from
 * the client socket's own state at the moments the kernel calls us:
 *   TCP_CONNECT_CB     the client's connect() to a VIP (connect.c balanced it): start time
 *   ACTIVE_ESTABLISHED an "open" event
 *   RTT_CB / sk_msg    a "report" at most every FLOW_REPORT_NS while the connection carries
 *                      bytes (an idle connection sends none: no packets, no calls)
 *   STATE_CB CLOSE     the "close" event with the totals
 *   connect() refused  a "refused" event with a reason: connect.c's refuse(ctx, key, reason)
 *                      is the one exit of a refusal (no backend; a policy check passes
 *                      FLOW_R_POLICY or a reason of its own)
 *
 * Bytes as the client saw them. TCP's counters (bytes_acked, bytes_received) count only
 * bytes that went over TCP: a message sk_msg hands socket to socket never passes them. So
 * each end counts what it redirected (sock_state.redirected, redirect.c). The client's own
 * count adds to its bytes sent; the server's count is the client's redirected bytes
 * received, which the server publishes when it sends its FIN (STATE_CB to FIN_WAIT1 or
 * LAST_ACK: it sends nothing after; or its reset, straight to CLOSE) into the client's
 * pairing entry (conn_owner.handed, lib/sock.h), which lives until the client's close. The
 * client's TCP_CLOSE always comes after it received that FIN, whichever end closed first,
 * so the count it finds is final. Half-closes change nothing in this.
 *
 * A full ring drops the event and counts it (accel_flow_stats): the datapath never waits.
 * accel_flow_config.enabled = 0 turns every event off at run time: sockets dialed then
 * get no flow state and no extra callbacks (the bench compares both in one run).
 */
#ifndef ACCEL_FLOWS_H
#define ACCEL_FLOWS_H

#include "common.h"
#include "lb.h"
#include "sock.h"

#ifndef ACCEL_FLOW_RING
#define ACCEL_FLOW_RING (1 << 20) /* bytes, a power of two multiple of the page size */
#endif

#define FLOW_REPORT_NS (10ULL * 1000000000ULL)
#define FLOW_SVC_UNKNOWN 0xffffffff

/* flow_sock.flags */
#define FLOW_S_CLIENT 1    /* a recorded client end (dialed a VIP while events were on) */
#define FLOW_S_PASSIVE 2   /* the server end of a redirected connection */
#define FLOW_S_PUBLISHED 4 /* its redirected count is in the client's conn_owner */

enum flow_kind {
	FLOW_OPEN = 1,
	FLOW_CLOSE = 2,
	FLOW_REFUSED = 3,
	FLOW_REPORT = 4,
};

enum flow_path {
	FLOW_PATH_TCP = 0,        /* every byte over TCP */
	FLOW_PATH_REDIRECTED = 1, /* bytes handed socket to socket (sk_msg) */
};

enum flow_verdict {
	FLOW_FORWARDED = 0,
	FLOW_DROPPED = 1, /* refused at connect() */
};

/* Why a connect() was refused (verdict dropped). Later checks add their own. */
enum flow_reason {
	FLOW_R_NONE = 0,
	FLOW_R_NO_BACKEND = 1, /* the service has no usable endpoint */
	FLOW_R_POLICY = 2,     /* for the policy check: its verdict said no */
	FLOW_R_LIMIT = 3,      /* over the service's connection rate limit (lib/qos.h) */
};

/* One event. Times are CLOCK_BOOTTIME ns (bpf_ktime_get_boot_ns); addresses as everywhere
 * (lib/common.h), ports in host order. */
struct flow_event {
	__u64 time_start;     /* connect() */
	__u64 time_end;       /* this event */
	__u64 cookie;         /* the client socket's cookie: the connection's id */
	__u64 client_netns;   /* netns cookie of the client's end */
	__u64 server_netns;   /* of the server's end when local and known, else 0 */
	__u64 bytes_sent;     /* client to server, as the client saw them */
	__u64 bytes_received; /* server to client */
	__u64 bytes_redirected; /* of those, handed socket to socket (both ways) */
	struct addr16 client;
	struct addr16 server; /* the endpoint chosen */
	struct addr16 vip;
	__u16 client_port;
	__u16 server_port;
	__u16 vip_port;
	__u8 kind;    /* enum flow_kind */
	__u8 path;    /* enum flow_path */
	__u32 svc_index; /* accel_svc_stats index of the service */
	__u32 srtt_us;
	__u32 retransmits;
	__u8 verdict; /* enum flow_verdict */
	__u8 reason;  /* enum flow_reason */
	__u16 pad;
};

struct flow_config {
	__u32 enabled; /* 0: no events, no flow state for new sockets */
	__u32 pad;
};

struct flow_stats {
	__u64 events;  /* written to the ring */
	__u64 dropped; /* not written: the ring was full */
};

/* BPF_MAP_TYPE_RINGBUF, pinned (bcc's BPF_RINGBUF_OUTPUT cannot be). A ring has no key or
 * value; `leaf` names the record type all the same, so that the BTF of the programs holds
 * its layout for user space (the map's btf_id; accel/flows/record.py). */
#define ACCEL_RINGBUF(_name, _record, _size)                               \
	struct _name##_table_t {                                           \
		int key;                                                   \
		_record leaf;                                              \
		int (*ringbuf_output)(void *, u64, u64);                   \
		void *(*ringbuf_reserve)(u64);                             \
		void (*ringbuf_discard)(void *, u64);                      \
		void (*ringbuf_submit)(void *, u64);                       \
		u64 (*ringbuf_query)(u64);                                 \
		u32 max_entries;                                           \
	};                                                                 \
	__attribute__((section("maps/ringbuf:" ACCEL_PIN(_name))))        \
	struct _name##_table_t _name = { .max_entries = (_size) }

ACCEL_RINGBUF(accel_flows, struct flow_event, ACCEL_FLOW_RING);
ACCEL_MAP("array", u32, struct flow_config, accel_flow_config, 1);
ACCEL_MAP("percpu_array", u32, struct flow_stats, accel_flow_stats, 1);

/* bcc rewrites map calls only in a program's own file (and never in a macro): each program
 * that emits defines these over the maps above, the same way:
 *   flows_on()       whether events are on (accel_flow_config)
 *   flow_reserve()   room for one event in the ring, or NULL (counted as dropped)
 *   flow_submit(ev)  the event to the reader (counted), who polls: no wake-up
 * Events are built in place in the ring: nothing shared with another context on the CPU. */

static __always_inline void flow_clear(struct flow_event *ev)
{
	__builtin_memset(ev, 0, sizeof(*ev));
}

/* The parts of an event every kind shares, from the client socket's state. */
static __always_inline void flow_fill(struct flow_event *ev, const struct sock_state *st,
				      __u8 kind, __u64 now)
{
	flow_clear(ev);
	ev->kind = kind;
	ev->time_start = st->flow.start;
	ev->time_end = now;
	ev->cookie = st->flow.cookie;
	ev->client_netns = st->flow.netns;
	ev->svc_index = st->flow.svc;
	ev->vip = st->vip.vip;
	ev->vip_port = st->vip.vip_port;
	ev->server = st->vip.backend;
	ev->server_port = st->vip.backend_port;
}

/* Whether a recorded connection is due for a report (and note that it gets one). */
static __always_inline int flow_report_due(struct sock_state *st, __u64 now)
{
	if (!(st->flow.flags & FLOW_S_CLIENT) || now - st->flow.reported < FLOW_REPORT_NS)
		return 0;
	st->flow.reported = now;
	return 1;
}

/* A refused connect(): what the client asked for, and why not. */
static __always_inline void flow_fill_refused(struct flow_event *ev, const struct addr16 *vip,
					      __u16 vip_port, __u32 svc_index, __u8 reason,
					      __u64 cookie, __u64 netns, __u64 now)
{
	flow_clear(ev);
	ev->kind = FLOW_REFUSED;
	ev->time_start = now;
	ev->time_end = now;
	ev->cookie = cookie;
	ev->client_netns = netns;
	ev->vip = *vip;
	ev->vip_port = vip_port;
	ev->svc_index = svc_index;
	ev->verdict = FLOW_DROPPED;
	ev->reason = reason;
}

#endif /* ACCEL_FLOWS_H */
