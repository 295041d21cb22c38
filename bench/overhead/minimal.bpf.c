// SPDX-License-Identifier: GPL-2.0
/* The least a tracer that captures payloads must do per call, on the same 20 tracepoints as
 * the agent's data hooks: enter looks the process up (one hash lookup) and keeps the call's
 * buffer pointer and time for its thread (one more); exit takes them back, reserves a slot
 * in a ring buffer, copies up to 128 bytes of the payload from user memory into it (through
 * the iovec array, and the msghdr, for the vectored calls) and submits it. No socket check,
 * no connection, no endpoints, no TCP sequence numbers, no framing: what it costs over the
 * empty programs is a lower bound for any design that reads payloads in the kernel.
 * A record is the two times, the return value and the bytes. */
#include <linux/bpf.h>
#include <linux/types.h>
#include <linux/uio.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

#define CAPTURE 128

struct args {
	__u64 buf;
	__u64 enter_ns;
	__u32 kind;
};

struct record {
	__u64 enter_ns;
	__u64 exit_ns;
	__s64 ret;
	__u8 data[CAPTURE];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u32);
} TRACED SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10240);
	__type(key, __u64);
	__type(value, struct args);
} CALLS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 26);
} RING SEC(".maps");

enum { FLAT, IOVEC, MSGHDR, MMSG };

/* The start of struct msghdr as user space lays it out on 64-bit: up to its iovec pointer. */
struct msghdr_head {
	__u64 name;
	__u32 namelen;
	__u32 pad;
	__u64 iov;
};

struct trace_event_raw_sys_enter {
	__u64 unused;
	long id;
	unsigned long args[6];
};

struct trace_event_raw_sys_exit {
	__u64 unused;
	long id;
	long ret;
};

static __always_inline int enter(struct trace_event_raw_sys_enter *ctx, __u32 kind)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;

	if (!bpf_map_lookup_elem(&TRACED, &tgid))
		return 0;
	struct args a = { .buf = ctx->args[1], .enter_ns = bpf_ktime_get_ns(), .kind = kind + 1 };
	struct args *slot = bpf_map_lookup_elem(&CALLS, &id);
	if (slot) /* a thread's slot rewritten in place: cheaper than an update */
		*slot = a;
	else
		bpf_map_update_elem(&CALLS, &id, &a, BPF_ANY);
	return 0;
}

static __always_inline int exit_(struct trace_event_raw_sys_exit *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct args *a = bpf_map_lookup_elem(&CALLS, &id);
	long ret = ctx->ret;

	if (!a || !a->kind) /* kind is kept + 1: 0 marks a slot already taken */
		return 0;
	__u32 kind = a->kind - 1;
	a->kind = 0;
	if (ret <= 0)
		return 0;
	__u64 buf = a->buf;
	if (kind == MMSG) /* ret counts messages; the first one's header starts the array */
		ret = CAPTURE;
	if (kind == MSGHDR || kind == MMSG) {
		struct msghdr_head m;
		if (bpf_probe_read_user(&m, sizeof(m), (void *)buf))
			return 0;
		buf = m.iov;
	}
	if (kind != FLAT) {
		struct iovec v;
		if (bpf_probe_read_user(&v, sizeof(v), (void *)buf))
			return 0;
		buf = (__u64)v.iov_base;
	}
	struct record *r = bpf_ringbuf_reserve(&RING, sizeof(*r), 0);
	if (!r)
		return 0;
	r->enter_ns = a->enter_ns;
	r->exit_ns = bpf_ktime_get_ns();
	r->ret = ret;
	__u32 n = ret < CAPTURE ? ret : CAPTURE;
	if (bpf_probe_read_user(r->data, n, (void *)buf))
		r->ret = -1;
	bpf_ringbuf_submit(r, BPF_RB_NO_WAKEUP); /* the reader polls: no wake-up per record */
	return 0;
}

#define HOOKS(name, kind)                                                                  \
	SEC("tracepoint/syscalls/sys_enter_" #name)                                         \
	int enter_##name(struct trace_event_raw_sys_enter *ctx) { return enter(ctx, kind); } \
	SEC("tracepoint/syscalls/sys_exit_" #name)                                          \
	int exit_##name(struct trace_event_raw_sys_exit *ctx) { return exit_(ctx); }

HOOKS(read, FLAT)
HOOKS(readv, IOVEC)
HOOKS(recvfrom, FLAT)
HOOKS(recvmsg, MSGHDR)
HOOKS(recvmmsg, MMSG)
HOOKS(write, FLAT)
HOOKS(writev, IOVEC)
HOOKS(sendto, FLAT)
HOOKS(sendmsg, MSGHDR)
HOOKS(sendmmsg, MMSG)
