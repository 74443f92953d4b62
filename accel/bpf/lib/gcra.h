/* A token bucket kept as GCRA (the generic cell rate algorithm): one "theoretical
 * arrival time" word per bucket, refill = one token per `interval` ns, size = tolerance /
 * interval tokens. Admit when tat' = max(tat, now) + interval is at most now +
 * tolerance, then store tat'. The store is a compare-and-swap retried a few times, so
 * two CPUs never both spend the last token: the limit is exact (losing the race
 * GCRA_CAS_TRIES times in a row refuses, i.e. errs on the strict side).
 * Used by lib/qos.h (connect()) and edge_lb.c (SYNs into an edge VIP). Map-free. */
#ifndef ACCEL_GCRA_H
#define ACCEL_GCRA_H

#include "common.h"

#define GCRA_CAS_TRIES 4

/* 1: admitted (a token spent), 0: over the limit. */
static __always_inline int gcra_admit(__u64 *tat_p, __u64 interval, __u64 tolerance, __u64 now)
{
	__u64 tat, next;

#pragma unroll
	for (int i = 0; i < GCRA_CAS_TRIES; i++) {
		tat = *(volatile __u64 *)tat_p;
		next = (tat > now ? tat : now) + interval;
		if (next - now > tolerance)
			return 0;
		if (__sync_val_compare_and_swap(tat_p, tat, next) == tat)
			return 1;
	}
	return 0;
}

#endif /* ACCEL_GCRA_H */
