// SPDX-License-Identifier: GPL-2.0
/* A program the verifier must reject (a map value used without a NULL check),
 * with the maps the collector sizes and the settings it sets before load, to test
 * how a rejection is shown. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "../../src/deeptrace/agent/bpf/deeptrace.h"

char LICENSE[] SEC("license") = "GPL";

const volatile struct dt_config CFG = {};

struct {
	__uint(type, BPF_MAP_TYPE_HASH); /* a hash lookup may return NULL; newer kernels know a constant-key array lookup cannot */
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} SCRATCH SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} RECORDS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} EXCHANGES SEC(".maps");

SEC("tracepoint/syscalls/sys_enter_read")
int unchecked(void *ctx)
{
	__u32 key = 0;
	__u64 *v = bpf_map_lookup_elem(&SCRATCH, &key);

	*v += 1; /* no NULL check: the verifier refuses this */
	return 0;
}
