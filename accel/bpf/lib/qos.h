/* Per-service QoS: a connection-rate limit checked at connect() and a bandwidth limit
 * enforced by TCP's own pacing. Written by accel/datapath/qos.py, indexed like the
 * service counters (svc_val.index, lib/lb.h).
 *
 * Connection rate: a token bucket per service kept as GCRA (lib/gcra.h: exact across
 * CPUs; bucket = burst, refill = rate). Over the limit, connect() fails at once with
 * EPERM (a cgroup connect hook returning 0), never a timeout.
 *
 * Bandwidth: this kernel may lack fq (no EDT), so the service's rate is split among its
 * active client connections and each gets its share as SO_MAX_PACING_RATE from sock_ops:
 * TCP paces internally (Linux >= 4.13, no qdisc needed), nothing queues behind it, other
 * traffic is untouched. A paced connection never enters the sockhash (a redirected send
 * skips TCP and its pacing). "Active" = had an RTT sample (i.e. sent data that was acked)
 * in the current or the previous window of QOS_WINDOW_NS: an idle connection (a control
 * channel, a pooled connection) does not hold a share. Each connection re-reads its share
 * on every RTT sample, so a connection starting or stopping, or a changed limit, reaches
 * the others within a window.
 *
 * The split is work-conserving, as one aggregate limit (Cilium's bandwidth manager, a
 * token bucket) is: once a window each connection measures what it sent since its last
 * count (bytes acked over time, struct qos_meter). One that used under 3/4 of its rate is
 * "light": it claims 1.5x its use (room to grow by half each window) and is paced at the
 * larger of that and the even share, so it can always take its fair part at once. The
 * others ("heavy") share what the light ones leave: (limit - claims) / heavies, never less
 * than the even share. The claims and counts of the current and the previous window are
 * both kept and the smaller taken (struct qos_split): a connection turning heavy cuts the
 * others' rates at once, one turning light raises them a window later. The aggregate can
 * exceed the limit only while a light connection bursts up to its even share, until its
 * next count (one window).
 *
 * bcc rewrites map calls only in a program's own file: each program that includes this
 * defines the accessors declared below (one line each, over the maps declared here).
 */
#ifndef ACCEL_QOS_H
#define ACCEL_QOS_H

#include "common.h"
#include "gcra.h"
#include "lb.h"

#define QOS_WINDOW_NS 200000000ULL /* 200 ms */
#ifndef SO_MAX_PACING_RATE
#define SO_MAX_PACING_RATE 47
#endif
#ifndef SOL_SOCKET
#define SOL_SOCKET 1
#endif
/* SO_MAX_PACING_RATE via bpf_setsockopt takes an int: ~0U is "unlimited". */
#define QOS_UNPACED 0xffffffffU

/* What the agent sets (accel_qos_limits[service index]). */
struct qos_limit {
	__u64 conn_interval_ns;  /* 1e9 / connections per second; 0: no connection limit */
	__u64 conn_tolerance_ns; /* burst * conn_interval_ns */
	__u64 bandwidth;         /* bytes/s of the service's aggregate; 0: unlimited */
	__u64 gen;               /* bumped when the connection limit changes: bucket refilled */
};

/* What the programs keep (accel_qos_state[service index]); the agent zeroes it when the
 * index goes to another service. */
struct qos_state {
	__u64 tat;  /* GCRA theoretical arrival time, ns (bpf_ktime_get_ns) */
	__s64 live; /* paced connections of the service now open */
	__u64 win_start; /* the current activity window began (ns) */
	__u64 win_cur;   /* connections active in it so far */
	__u64 win_prev;  /* connections active in the previous one */
	__u64 gen;       /* qos_limit.gen the bucket (tat) is for */
};

struct qos_stats {
	__u64 admitted;  /* connect() within the connection limit */
	__u64 refused;   /* connect() over the connection limit: EPERM */
	__u64 paced;     /* connections paced (kept off the socket redirect) */
	__u64 repaced;   /* pacing rate changed on a live connection (share or limit) */
};

/* A client socket of a bandwidth-limited service (connect() marks it, sock_ops paces it). */
struct qos_sock {
	__u32 index;  /* service index */
	__u32 state;  /* QOS_SOCK_* */
	__u32 rate;   /* SO_MAX_PACING_RATE last set, bytes/s */
	__u32 claim;  /* light: bytes/s it claims (1.5x its use); 0: heavy, or not measured yet */
	__u64 win;    /* the window (qos_state.win_start) this connection counted itself in */
};

/* A paced connection's use at its last count (accel_qos_meter, per socket; touched once a
 * window). */
struct qos_meter {
	__u64 acked;  /* bytes_acked then */
	__u64 at_ns;  /* when */
};

/* The light connections of a service (accel_qos_split[service index]), this window and the
 * previous one; rolled with qos_state's window, zeroed with it. */
struct qos_split {
	__u64 claims_cur;  /* bytes/s the light connections counted so far claim */
	__u64 light_cur;   /* how many */
	__u64 claims_prev;
	__u64 light_prev;
};

#define QOS_SOCK_MARKED 1 /* dialed a limited service, not yet established */
#define QOS_SOCK_PACED 2  /* counted in qos_state.live */
#define QOS_SOCK_DONE 3   /* closed: uncounted */

ACCEL_MAP("array", u32, struct qos_limit, accel_qos_limits, ACCEL_SERVICES_MAX);
ACCEL_MAP("array", u32, struct qos_state, accel_qos_state, ACCEL_SERVICES_MAX);
ACCEL_MAP("percpu_array", u32, struct qos_stats, accel_qos_stats, ACCEL_SERVICES_MAX);
ACCEL_MAP_F("sk_storage", int, struct qos_sock, accel_qos_sock, 0, BPF_F_NO_PREALLOC);
ACCEL_MAP_F("sk_storage", int, struct qos_meter, accel_qos_meter, 0, BPF_F_NO_PREALLOC);
ACCEL_MAP("array", u32, struct qos_split, accel_qos_split, ACCEL_SERVICES_MAX);

/* Defined by the including program, one line each. */
static __always_inline struct qos_limit *qos_limit_get(__u32 *index);
static __always_inline struct qos_state *qos_state_get(__u32 *index);
static __always_inline struct qos_stats *qos_stats_get(__u32 *index);
static __always_inline struct qos_sock *qos_sock_get(struct bpf_sock *sk, int create);
static __always_inline struct qos_meter *qos_meter_get(struct bpf_sock *sk);
static __always_inline struct qos_split *qos_split_get(__u32 *index);

/* connect(): 1 when the connection is over the service's connection limit (refuse it),
 * 0 to go on. A bandwidth-limited service's socket is marked for sock_ops. */
static __always_inline int qos_connect_refused(struct bpf_sock_addr *ctx, __u32 index)
{
	struct qos_limit *lim = qos_limit_get(&index);
	struct qos_stats *stats;
	struct qos_state *st;
	struct qos_sock *qs;
	__u64 now;

	if (!lim || (!lim->conn_interval_ns && !lim->bandwidth))
		return 0;
	stats = qos_stats_get(&index);
	if (lim->conn_interval_ns) {
		st = qos_state_get(&index);
		if (!st)
			return 0;
		now = bpf_ktime_get_ns();
		if (st->gen != lim->gen) {
			/* A changed limit starts with a full bucket (an old tat could be minutes
			 * ahead under a slower rate). Two CPUs may both reset: one extra burst at
			 * most, once per change. */
			st->tat = 0;
			st->gen = lim->gen;
		}
		if (!gcra_admit(&st->tat, lim->conn_interval_ns, lim->conn_tolerance_ns, now)) {
			if (stats)
				stats->refused++;
			return 1;
		}
	}
	if (stats)
		stats->admitted++;
	if (lim->bandwidth && ctx->sk) {
		qs = qos_sock_get(ctx->sk, 1);
		if (qs && qs->state != QOS_SOCK_PACED) {
			qs->index = index;
			qs->state = QOS_SOCK_MARKED;
		}
	}
	return 0;
}

/* Light (its claim, bytes/s) or heavy (0), from what the connection sent since its last
 * measure: under 3/4 of the rate it was paced at is light. The first count, and one after
 * a long silence, say heavy: it may be a bulk sender. Counts closer than half a window
 * keep the last verdict and measure on from the same point. */
static __always_inline __u32 qos_measure(struct bpf_sock_ops *skops, struct qos_sock *qs,
					 __u64 now)
{
	struct qos_meter *m = skops->sk ? qos_meter_get(skops->sk) : NULL;
	__u64 acked = skops->bytes_acked, used, dt, claim = 0;

	if (!m)
		return 0;
	dt = now - m->at_ns;
	if (m->at_ns && dt < QOS_WINDOW_NS / 2)
		return qs->claim;
	if (m->at_ns && dt <= 4 * QOS_WINDOW_NS && qs->rate) {
		used = (acked - m->acked) * 1000000000ULL / dt;
		if (used * 4 < (__u64)qs->rate * 3)
			claim = used + used / 2 + 1;
	}
	m->acked = acked;
	m->at_ns = now;
	return claim >= QOS_UNPACED ? 0 : (__u32)claim;
}

/* Count this connection active in its service's current window (rolling it when due), and
 * as light or heavy in it. */
static __always_inline void qos_active(struct bpf_sock_ops *skops, struct qos_sock *qs,
				       struct qos_state *st, struct qos_split *sp)
{
	__u64 now = bpf_ktime_get_ns(), start = st->win_start;

	if (now - start >= QOS_WINDOW_NS &&
	    __sync_val_compare_and_swap(&st->win_start, start, now) == start) {
		/* This CPU rolled it; a count racing the roll lands in either window. */
		int next = now - start < 2 * QOS_WINDOW_NS;
		st->win_prev = next ? st->win_cur : 0;
		st->win_cur = 0;
		sp->claims_prev = next ? sp->claims_cur : 0;
		sp->light_prev = next ? sp->light_cur : 0;
		sp->claims_cur = 0;
		sp->light_cur = 0;
	}
	start = st->win_start;
	if (qs->win != start) {
		qs->win = start;
		__sync_fetch_and_add(&st->win_cur, 1);
		qs->claim = qos_measure(skops, qs, now);
		if (qs->claim) {
			__sync_fetch_and_add(&sp->claims_cur, qs->claim);
			__sync_fetch_and_add(&sp->light_cur, 1);
		}
	}
}

/* This connection's share of its service's bandwidth, bytes/s (QOS_UNPACED: none). */
static __always_inline __u32 qos_share(struct bpf_sock_ops *skops, struct qos_sock *qs,
				       int active)
{
	struct qos_limit *lim = qos_limit_get(&qs->index);
	struct qos_state *st = qos_state_get(&qs->index);
	struct qos_split *sp = qos_split_get(&qs->index);
	__u64 n, rate, light, claims, b;

	if (!lim || !st || !sp || !lim->bandwidth)
		return QOS_UNPACED;
	b = lim->bandwidth;
	if (active)
		qos_active(skops, qs, st, sp);
	n = st->win_cur > st->win_prev ? st->win_cur : st->win_prev;
	if (!active)
		n++; /* a new connection: counted once it sends */
	if (n < 1)
		n = 1;
	rate = b / n;
	if (active && qs->claim) {
		if (qs->claim > rate)
			rate = qs->claim;
	} else if (active) {
		light = sp->light_cur < sp->light_prev ? sp->light_cur : sp->light_prev;
		claims = sp->claims_cur < sp->claims_prev ? sp->claims_cur : sp->claims_prev;
		if (light && light < n && claims < b && (b - claims) / (n - light) > rate)
			rate = (b - claims) / (n - light);
	}
	if (rate > b)
		rate = b;
	if (rate < 1)
		rate = 1;
	return rate >= QOS_UNPACED ? QOS_UNPACED - 1 : (__u32)rate;
}

static __always_inline void qos_set_rate(struct bpf_sock_ops *skops, struct qos_sock *qs,
					 int active)
{
	__u32 rate = qos_share(skops, qs, active);
	struct qos_stats *stats;
	int val = (int)rate;

	if (rate == qs->rate)
		return;
	if (bpf_setsockopt(skops, SOL_SOCKET, SO_MAX_PACING_RATE, &val, sizeof(val)) != 0)
		return;
	if (qs->rate) {
		stats = qos_stats_get(&qs->index);
		if (stats)
			stats->repaced++;
	}
	qs->rate = rate;
}

/* sock_ops, connection established: 1 when it is paced (keep it off the sockhash). */
/* A marked connection starts being paced: it joins its service's share. 1: paced. */
static __always_inline int qos_start(struct bpf_sock_ops *skops, struct qos_sock *qs)
{
	struct qos_stats *stats;
	struct qos_state *st;

	st = qos_state_get(&qs->index);
	if (!st)
		return 0;
	__sync_fetch_and_add(&st->live, 1);
	qs->state = QOS_SOCK_PACED;
	qs->rate = 0;
	qs->claim = 0;
	qs->win = 0;
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
				  BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG);
	qos_set_rate(skops, qs, 0);
	stats = qos_stats_get(&qs->index);
	if (stats)
		stats->paced++;
	return 1;
}

/* sock_ops, ACTIVE_ESTABLISHED: a connection connect() marked is paced from its start. */
static __always_inline int qos_established(struct bpf_sock_ops *skops)
{
	struct qos_sock *qs;

	if (!skops->sk || skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 0;
	qs = qos_sock_get(skops->sk, 0);
	if (!qs || qs->state != QOS_SOCK_MARKED)
		return 0;
	return qos_start(skops, qs);
}

/* Whether service `index` has a bandwidth limit now. */
static __always_inline int qos_bandwidth_limited(__u32 index)
{
	struct qos_limit *lim = qos_limit_get(&index);

	return lim && lim->bandwidth;
}

/* sock_ops, an RTT sample of a client connection of service `index` that is not paced: its
 * service got a bandwidth limit after it opened (a redirected one was moved to TCP by the
 * sk_msg program for this). It is paced from now on. */
static __always_inline void qos_late(struct bpf_sock_ops *skops, __u32 index)
{
	struct bpf_sock *sk = skops->sk;
	struct qos_sock *qs;

	if (!sk || !qos_bandwidth_limited(index))
		return;
	qs = qos_sock_get(sk, 0);
	if (qs && qs->state)
		return; /* marked at connect(), paced, or closed */
	qs = qos_sock_get(sk, 1);
	if (!qs)
		return;
	qs->index = index;
	qs->state = QOS_SOCK_MARKED;
	qos_start(skops, qs);
}

/* sock_ops, each RTT sample of a paced connection: follow its current share. */
static __always_inline void qos_rtt(struct bpf_sock_ops *skops)
{
	struct qos_sock *qs;

	if (!skops->sk)
		return;
	qs = qos_sock_get(skops->sk, 0);
	if (qs && qs->state == QOS_SOCK_PACED)
		qos_set_rate(skops, qs, 1);
}

/* sock_ops, TCP_CLOSE: a paced connection leaves its service's share. */
static __always_inline void qos_closed(struct bpf_sock_ops *skops)
{
	struct qos_state *st;
	struct qos_sock *qs;

	if (!skops->sk)
		return;
	qs = qos_sock_get(skops->sk, 0);
	if (!qs || qs->state != QOS_SOCK_PACED)
		return;
	qs->state = QOS_SOCK_DONE;
	st = qos_state_get(&qs->index);
	if (st)
		__sync_fetch_and_add(&st->live, -1);
}

#endif /* ACCEL_QOS_H */
