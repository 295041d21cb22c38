// SPDX-License-Identifier: GPL-2.0
/* DeepTrace kernel side: syscall tracepoints -> socket records in a ring buffer.
 *
 * Enter hooks filter by process (PIDS or trace-all), resolve the fd to a TCP/UDP
 * socket and stash the arguments in INGRESS/EGRESS keyed by tgid<<32|pid. Exit
 * hooks read what the call moved (size, TCP seq, payload head) and write one
 * variable-length record per message. Only the kernel fields we use are read
 * (CO-RE), never whole structs. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "deeptrace.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define AF_INET6 10
#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define EINPROGRESS 115

/* Enter arguments kept for the exit hook. */
struct args {
	__u64 sk;        /* struct sock *, resolved at enter */
	__u64 buf;       /* buffer, iovec array, msghdr or mmsghdr array (user pointers) */
	__u64 addr;      /* sockaddr of sendto/recvfrom/connect/accept, or 0 */
	__u64 enter_ns;
	__u32 fd;
	__u32 count;     /* iovcnt for readv/writev */
	__u32 enter_seq;
	__u8 syscall;
	__u8 l4;
	__u8 pad[2];
};

struct conn {
	__u64 id;
	__u64 ino; /* the socket's inode number: tells a socket from an earlier one at its address */
	__u8 role;
	__u8 pad[7];
};

struct scratch {
	struct dt_record rec;
	/* Twice the largest capture so that offset + length always stays inside the
	 * buffer in a way the verifier can check (both are bounded by DT_MAX_CAPTURE). */
	__u8 data[2 * DT_MAX_CAPTURE];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32);   /* tgid */
	__type(value, __u32);
} PIDS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, char[DT_TASK_COMM_LEN]); /* processes exec'ing with this name are traced */
	__type(value, __u32);
} COMMS SEC(".maps");

/* LRU: a thread killed inside a syscall never reaches its exit hook. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 10240);
	__type(key, __u64); /* tgid<<32|pid */
	__type(value, struct args);
} INGRESS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 10240);
	__type(key, __u64);
	__type(value, struct args);
} EGRESS SEC(".maps");

/* LRU: a process that exits closes its sockets without a close() call. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64); /* struct sock * */
	__type(value, struct conn);
} CONNS SEC(".maps");

/* Load-time settings, read-only data that user space fills in before load: the
 * verifier knows their values, so a program reads a constant instead of looking up a
 * map on every call, and branches a setting rules out are not there at all. */
const volatile struct dt_config CFG = {};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DT_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} COUNTERS SEC(".maps");

/* Per-CPU scratch for the record being built (far over the 512-byte stack).
 * An ARRAY indexed by CPU rather than a PERCPU_ARRAY, whose values are capped
 * at 32 KiB; user space sets max_entries to the number of possible CPUs. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} SCRATCH SEC(".maps");

/* Size is set by user space before load (bpf_map__set_max_entries). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 24);
} RECORDS SEC(".maps");

/* ---- reading kernel memory ----
 * Default (kernel 6.2+): typed pointers from bpf_get_current_task_btf() and
 * bpf_rdonly_cast(), whose loads the JIT emits as plain loads with a fault
 * handler, about 1 ns each. With DT_COMPAT_READS (kernels 5.8 to 6.1): one
 * bpf_probe_read_kernel() call per field, about 35 ns each on our machines.
 * Both are CO-RE relocated; only the fields named here are ever read. */
#ifdef DT_COMPAT_READS
#define CURRENT_TASK() ((struct task_struct *)bpf_get_current_task())
#define AS(type, p) ((type *)(p))
#define RD(p, ...) BPF_CORE_READ(p, __VA_ARGS__)
#else
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;
#define CURRENT_TASK() bpf_get_current_task_btf()
#define AS(type, p) ((type *)bpf_rdonly_cast((void *)(p), bpf_core_type_id_kernel(type)))
#define RD(p, ...) (___arrow(p, __VA_ARGS__))
#endif

/* Bound a 64-bit value in a way the verifier sees: clang removes C bounds it
 * can prove redundant from its own analysis, which the verifier does not share. */
#define VERIFIER_MASK(v, mask) asm volatile("%0 &= %1" : "+r"(v) : "i"(mask))
#define VERIFIER_MIN(v, max) asm volatile("if %0 <= %1 goto +1; %0 = %1" : "+r"(v) : "i"(max))

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&COUNTERS, &idx);
	if (v)
		*v += 1;
}

static __always_inline bool traced(__u32 tgid)
{
	if (CFG.trace_all)
		return tgid != CFG.agent_tgid;
	return bpf_map_lookup_elem(&PIDS, &tgid) != NULL;
}

/* The TCP or UDP socket behind fd of the current task, or NULL (counted). */
static __always_inline struct sock *inet_sock_of_fd(int fd, __u8 *l4)
{
	struct task_struct *task = CURRENT_TASK();
	struct fdtable *fdt = RD(task, files, fdt);
	unsigned int max_fds = RD(fdt, max_fds);
	struct file **fds = (void *)RD(fdt, fd);
	__u64 fptr = 0;

	if (fd < 0 || (unsigned int)fd >= max_fds)
		return NULL;
	bpf_probe_read_kernel(&fptr, sizeof(fptr), &fds[fd]);
	struct file *file = AS(struct file, fptr);
	if (!file)
		return NULL;
	if ((RD(file, f_inode, i_mode) & S_IFMT) != S_IFSOCK) {
		count(DT_CNT_SKIP_NOT_SOCKET);
		return NULL;
	}
	struct socket *sock = AS(struct socket, RD(file, private_data));
	struct sock *sk = RD(sock, sk);
	if (!sk)
		return NULL;
	__u16 family = RD(sk, __sk_common.skc_family);
	__u16 proto = RD(sk, sk_protocol);
	if ((family != AF_INET && family != AF_INET6) ||
	    (proto != IPPROTO_TCP && proto != IPPROTO_UDP)) {
		count(DT_CNT_SKIP_NOT_INET);
		return NULL;
	}
	*l4 = proto;
	return sk;
}

static __always_inline __u32 tcp_seq(__u64 skp, __u8 l4, __u8 direction)
{
	struct tcp_sock *tp = AS(struct tcp_sock, skp);

	if (l4 != IPPROTO_TCP)
		return 0;
	if (direction == DT_DIR_INGRESS)
		return RD(tp, copied_seq);
	return RD(tp, write_seq);
}

/* Family, ports and addresses of the socket into the record. */
static __always_inline void read_endpoints(struct dt_record *rec, __u64 skp)
{
	struct sock *sk = AS(struct sock, skp);
	__u16 family = RD(sk, __sk_common.skc_family);

	rec->family = family;
	rec->lport = RD(sk, __sk_common.skc_num);
	rec->rport = bpf_ntohs(RD(sk, __sk_common.skc_dport));
	if (family == AF_INET) {
		__u32 l = RD(sk, __sk_common.skc_rcv_saddr), r = RD(sk, __sk_common.skc_daddr);
		__builtin_memcpy(rec->laddr, &l, 4);
		__builtin_memcpy(rec->raddr, &r, 4);
	} else {
		struct in6_addr l = RD(sk, __sk_common.skc_v6_rcv_saddr), r = RD(sk, __sk_common.skc_v6_daddr);
		__builtin_memcpy(rec->laddr, &l, 16);
		__builtin_memcpy(rec->raddr, &r, 16);
	}
}

/* The connection entry of sk; a fresh id when unseen or when `fresh` (a new
 * socket may reuse the memory, and so the key, of a closed one). An entry of
 * another inode is stale: a socket freed without a close we saw (its process was
 * killed) whose memory the kernel gave to this one, which predates tracing. */
static __always_inline struct conn *conn_of(__u64 sk, __u8 role, bool fresh)
{
	struct sock *s = AS(struct sock, sk);
	__u64 ino = RD(s, sk_socket, file, f_inode, i_ino);
	struct conn *c = fresh ? NULL : bpf_map_lookup_elem(&CONNS, &sk);

	if (c && c->ino != ino)
		c = NULL;
	if (c) {
		if (role != DT_ROLE_UNKNOWN)
			c->role = role;
		return c;
	}
	/* Unique without atomics (which need a newer kernel): first-seen time with
	 * the CPU in the low byte; one CPU never sees two sockets in the same ns.
	 * Kept below 2^63, where spans store it as int64: the shift passes that
	 * after 417 days of uptime, and the top bit of a boot-relative time is
	 * never what tells two live connections apart. */
	struct conn n = {
		.id = ((bpf_ktime_get_ns() << 8) | (bpf_get_smp_processor_id() & 0xff)) & 0x7fffffffffffffffULL,
		.ino = ino,
		.role = role,
	};
	if (bpf_map_update_elem(&CONNS, &sk, &n, BPF_ANY)) {
		count(DT_CNT_DROP_CONN_MAP_FULL);
		return NULL;
	}
	return bpf_map_lookup_elem(&CONNS, &sk);
}

/* Peer address taken from a user sockaddr (unconnected UDP). */
static __always_inline void peer_from_sockaddr(struct dt_record *rec, __u64 uaddr)
{
	struct sockaddr_in6 sa = {};

	if (!uaddr || bpf_probe_read_user(&sa, sizeof(sa), (void *)uaddr))
		return;
	if (sa.sin6_family == AF_INET) {
		struct sockaddr_in *sin = (void *)&sa;
		__builtin_memcpy(rec->raddr, &sin->sin_addr, 4);
		rec->rport = bpf_ntohs(sin->sin_port);
	} else if (sa.sin6_family == AF_INET6) {
		__builtin_memcpy(rec->raddr, &sa.sin6_addr, 16);
		rec->rport = bpf_ntohs(sa.sin6_port);
	} else {
		return;
	}
	rec->flags |= DT_FLAG_ADDR_FROM_CALL;
}

static __always_inline struct scratch *cpu_scratch(void)
{
	__u32 cpu = bpf_get_smp_processor_id();

	return bpf_map_lookup_elem(&SCRATCH, &cpu);
}

/* Fill everything but payload, size and seq: who, when, which socket. */
static __always_inline struct scratch *begin_record(struct args *a, __u8 direction, __u8 role,
						    bool fresh_conn)
{
	struct scratch *s = cpu_scratch();
	__u64 id = bpf_get_current_pid_tgid();

	if (!s)
		return NULL;
	struct dt_record *rec = &s->rec;
	__builtin_memset(rec, 0, sizeof(*rec));
	rec->enter_ns = a->enter_ns;
	rec->exit_ns = bpf_ktime_get_ns();
	rec->tgid = id >> 32;
	rec->tid = (__u32)id;
	rec->fd = a->fd;
	rec->syscall = a->syscall;
	rec->direction = direction;
	rec->l4 = a->l4;
	bpf_get_current_comm(rec->comm, sizeof(rec->comm));

	read_endpoints(rec, a->sk);
	struct conn *c = conn_of(a->sk, role, fresh_conn);
	if (c) {
		rec->conn_id = c->id;
		rec->role = c->role;
	}
	return s;
}

static __always_inline void submit(struct scratch *s, __u64 captured)
{
	__u32 idx = DT_CNT_SUBMITTED;
	__u64 *submitted = bpf_map_lookup_elem(&COUNTERS, &idx);
	__u64 len, flags = BPF_RB_NO_WAKEUP;

	if (!submitted)
		return;
	VERIFIER_MIN(captured, DT_MAX_CAPTURE);
	s->rec.captured = captured;
	if (captured < s->rec.size)
		s->rec.flags |= DT_FLAG_TRUNCATED;
	if (s->rec.flags & DT_FLAG_TRUNCATED)
		count(DT_CNT_TRUNCATED);
	len = sizeof(struct dt_record) + captured;
	/* One wake-up per wakeup_records records of this CPU, not one per record; the
	 * reader also polls on a short timeout so a quiet trickle is not held back.
	 * (Asking the ring for its backlog instead costs a cross-CPU cache miss on
	 * every record: measured at ~400 ns.) */
	if (*submitted % CFG.wakeup_records == CFG.wakeup_records - 1)
		flags = BPF_RB_FORCE_WAKEUP;
	if (bpf_ringbuf_output(&RECORDS, s, len, flags))
		count(DT_CNT_DROP_RINGBUF_FULL);
	else
		*submitted += 1;
}

static __always_inline __u32 capture_limit(void)
{
	__u32 cap = CFG.capture_bytes;

	return cap > DT_MAX_CAPTURE ? DT_MAX_CAPTURE : cap;
}

/* Copy up to `want` bytes of one user buffer to the payload at `off`. */
static __always_inline __u32 copy_user(struct scratch *s, __u64 off, __u64 want, __u64 ubuf)
{
	if (off >= DT_MAX_CAPTURE)
		return 0;
	if (want > DT_MAX_CAPTURE)
		want = DT_MAX_CAPTURE;
	VERIFIER_MASK(off, DT_MAX_CAPTURE - 1);
	if (bpf_probe_read_user(&s->data[off], want, (void *)ubuf)) {
		s->rec.flags |= DT_FLAG_PAYLOAD_FAULT;
		count(DT_CNT_PAYLOAD_FAULT);
		return 0;
	}
	return want;
}

/* Gather the first bytes of `total` bytes spread over an iovec array, in order,
 * into this CPU's scratch payload; returns the bytes captured. A global (not
 * static) function: the verifier checks it once, not once per call site, which
 * keeps the mmsg loop within the verifier's budget. */
__noinline int copy_iovecs(__u64 uiov, __u64 iovcnt, __u64 total, __u64 cap)
{
	struct scratch *s = cpu_scratch();
	struct iovec iovs[DT_IOV_BATCH];
	__u64 off = 0;

	if (!s)
		return 0;
	/* The array is read a batch at a time (one user-memory read costs ~100 ns here;
	 * the stack holds one batch). gRPC and nginx write with dozens of iovecs. */
	for (int b = 0; b < DT_MAX_IOV / DT_IOV_BATCH; b++) {
		__u64 first = b * DT_IOV_BATCH;
		__u64 n = iovcnt - first;

		if (first >= iovcnt || total == 0 || off >= cap)
			break;
		VERIFIER_MIN(n, DT_IOV_BATCH);
		if (bpf_probe_read_user(iovs, n * sizeof(iovs[0]), (void *)(uiov + first * sizeof(iovs[0])))) {
			s->rec.flags |= DT_FLAG_PAYLOAD_FAULT;
			count(DT_CNT_PAYLOAD_FAULT);
			break;
		}
		for (int i = 0; i < DT_IOV_BATCH; i++) {
			if (i >= n || total == 0 || off >= cap)
				break;
			__u64 len = iovs[i].iov_len < total ? iovs[i].iov_len : total;
			total -= len;
			if (len > cap - off)
				len = cap - off;
			off += copy_user(s, off, len, (__u64)iovs[i].iov_base);
		}
	}
	return off;
}

/* The call's TCP byte range: from the stashed enter value to the socket's value
 * now. Read, not computed, so a MSG_PEEK shows as an empty range. */
static __always_inline void set_seq(struct dt_record *rec, struct args *a)
{
	if (rec->l4 == IPPROTO_TCP) {
		rec->enter_seq = a->enter_seq;
		rec->exit_seq = tcp_seq(a->sk, IPPROTO_TCP, rec->direction);
	}
}

/* ---- enter: filter, resolve the socket, stash the arguments ---- */

/* A thread keeps its slot between calls and it is rewritten in place: a lookup
 * and a store cost about half of an update plus a delete per call (measured).
 * take_args() marks a slot used (syscall = 0), so a stale slot never pairs with
 * an exit whose enter was filtered out. Only the owning thread touches it. */
static __always_inline void stash_args(void *map, __u64 id, struct args *a)
{
	struct args *slot = bpf_map_lookup_elem(map, &id);

	if (slot)
		*slot = *a;
	else if (bpf_map_update_elem(map, &id, a, BPF_NOEXIST))
		count(DT_CNT_DROP_ARGS_MAP_FULL);
}

static __always_inline int enter_io(void *map, __u8 syscall, __u8 direction, long fd, __u64 buf,
				    __u64 addr, __u32 count_)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u8 l4 = 0;

	if (!traced(id >> 32))
		return 0;
	struct sock *sk = inet_sock_of_fd(fd, &l4);
	if (!sk)
		return 0;
	struct args a = {
		.sk = (__u64)sk,
		.buf = buf,
		.addr = addr,
		.enter_ns = bpf_ktime_get_ns(),
		.fd = fd,
		.count = count_,
		.enter_seq = tcp_seq((__u64)sk, l4, direction),
		.syscall = syscall,
		.l4 = l4,
	};
	stash_args(map, id, &a);
	return 0;
}

/* Take the stashed arguments of the current thread, marking its slot used. */
static __always_inline bool take_args(void *map, struct args *out)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct args *a = bpf_map_lookup_elem(map, &id);

	if (!a || !a->syscall)
		return false;
	*out = *a;
	a->syscall = 0;
	return true;
}

/* ---- exit: one record per message ---- */

/* One message of a msghdr: its iovecs and, on unconnected sockets, its address. */
static __always_inline void emit_msghdr(struct scratch *s, __u64 umsg, __u64 size)
{
	struct user_msghdr msg;

	s->rec.size = size;
	if (bpf_probe_read_user(&msg, sizeof(msg), (void *)umsg)) {
		s->rec.flags |= DT_FLAG_PAYLOAD_FAULT;
		count(DT_CNT_PAYLOAD_FAULT);
		submit(s, 0);
		return;
	}
	if (s->rec.rport == 0)
		peer_from_sockaddr(&s->rec, (__u64)msg.msg_name);
	submit(s, copy_iovecs((__u64)msg.msg_iov, msg.msg_iovlen, size, capture_limit()));
}

/* Where a single-message call keeps its bytes; a constant at every call site, so
 * each program carries only its own branch. */
enum buf_kind { BUF_FLAT, BUF_IOVEC, BUF_MSGHDR };

/* read/write/recvfrom/sendto (flat), readv/writev (iovec), recvmsg/sendmsg (msghdr). */
static __always_inline int exit_single(void *map, __u8 direction, long ret, enum buf_kind kind)
{
	struct args a;

	if (!take_args(map, &a) || ret <= 0)
		return 0;
	struct scratch *s = begin_record(&a, direction, DT_ROLE_UNKNOWN, false);
	if (!s)
		return 0;
	s->rec.ret = ret;
	s->rec.size = ret;
	set_seq(&s->rec, &a);
	if (kind == BUF_MSGHDR) {
		emit_msghdr(s, a.buf, ret);
	} else if (kind == BUF_IOVEC) {
		submit(s, copy_iovecs(a.buf, a.count, ret, capture_limit()));
	} else {
		if (a.addr && s->rec.rport == 0)
			peer_from_sockaddr(&s->rec, a.addr);
		__u32 cap = capture_limit();
		submit(s, copy_user(s, 0, (__u64)ret < cap ? (__u64)ret : cap, a.buf));
	}
	return 0;
}

/* recvmmsg, sendmmsg: ret is the number of messages; each has its own msg_len. */
static __always_inline int exit_mmsg(void *map, __u8 direction, long ret)
{
	struct args a;
	__u32 seq, end;

	if (!take_args(map, &a) || ret <= 0)
		return 0;
	/* Per message: consecutive slices of the call's range (empty if it was a peek). */
	seq = a.enter_seq;
	end = a.l4 == IPPROTO_TCP ? tcp_seq(a.sk, a.l4, direction) : 0;
	for (int i = 0; i < DT_MAX_MMSG; i++) {
		__u64 um = a.buf + i * sizeof(struct mmsghdr);
		unsigned int len = 0;

		if (i >= ret)
			break;
		bpf_probe_read_user(&len, sizeof(len), (void *)(um + offsetof(struct mmsghdr, msg_len)));
		struct scratch *s = begin_record(&a, direction, DT_ROLE_UNKNOWN, false);
		if (!s)
			return 0;
		s->rec.ret = ret;
		s->rec.msg_index = i;
		if (a.l4 == IPPROTO_TCP) {
			s->rec.enter_seq = seq;
			if (seq != end)
				seq += len;
			s->rec.exit_seq = seq;
		}
		emit_msghdr(s, um, len);
	}
	if (ret > DT_MAX_MMSG) {
		__u32 idx = DT_CNT_DROP_MMSG_OVERFLOW;
		__u64 *v = bpf_map_lookup_elem(&COUNTERS, &idx);
		if (v)
			*v += ret - DT_MAX_MMSG;
	}
	return 0;
}

#define ENTER(name) SEC("tracepoint/syscalls/sys_enter_" #name) \
	int enter_##name(struct trace_event_raw_sys_enter *ctx)
#define EXIT(name) SEC("tracepoint/syscalls/sys_exit_" #name) \
	int exit_##name(struct trace_event_raw_sys_exit *ctx)

#define A(i) (ctx->args[i])

ENTER(read) { return enter_io(&INGRESS, DT_SYS_READ, DT_DIR_INGRESS, A(0), A(1), 0, 0); }
EXIT(read) { return exit_single(&INGRESS, DT_DIR_INGRESS, ctx->ret, BUF_FLAT); }
ENTER(readv) { return enter_io(&INGRESS, DT_SYS_READV, DT_DIR_INGRESS, A(0), A(1), 0, A(2)); }
EXIT(readv) { return exit_single(&INGRESS, DT_DIR_INGRESS, ctx->ret, BUF_IOVEC); }
ENTER(recvfrom) { return enter_io(&INGRESS, DT_SYS_RECVFROM, DT_DIR_INGRESS, A(0), A(1), A(4), 0); }
EXIT(recvfrom) { return exit_single(&INGRESS, DT_DIR_INGRESS, ctx->ret, BUF_FLAT); }
ENTER(recvmsg) { return enter_io(&INGRESS, DT_SYS_RECVMSG, DT_DIR_INGRESS, A(0), A(1), 0, 0); }
EXIT(recvmsg) { return exit_single(&INGRESS, DT_DIR_INGRESS, ctx->ret, BUF_MSGHDR); }
ENTER(recvmmsg) { return enter_io(&INGRESS, DT_SYS_RECVMMSG, DT_DIR_INGRESS, A(0), A(1), 0, A(2)); }
EXIT(recvmmsg) { return exit_mmsg(&INGRESS, DT_DIR_INGRESS, ctx->ret); }

ENTER(write) { return enter_io(&EGRESS, DT_SYS_WRITE, DT_DIR_EGRESS, A(0), A(1), 0, 0); }
EXIT(write) { return exit_single(&EGRESS, DT_DIR_EGRESS, ctx->ret, BUF_FLAT); }
ENTER(writev) { return enter_io(&EGRESS, DT_SYS_WRITEV, DT_DIR_EGRESS, A(0), A(1), 0, A(2)); }
EXIT(writev) { return exit_single(&EGRESS, DT_DIR_EGRESS, ctx->ret, BUF_IOVEC); }
ENTER(sendto) { return enter_io(&EGRESS, DT_SYS_SENDTO, DT_DIR_EGRESS, A(0), A(1), A(4), 0); }
EXIT(sendto) { return exit_single(&EGRESS, DT_DIR_EGRESS, ctx->ret, BUF_FLAT); }
ENTER(sendmsg) { return enter_io(&EGRESS, DT_SYS_SENDMSG, DT_DIR_EGRESS, A(0), A(1), 0, 0); }
EXIT(sendmsg) { return exit_single(&EGRESS, DT_DIR_EGRESS, ctx->ret, BUF_MSGHDR); }
ENTER(sendmmsg) { return enter_io(&EGRESS, DT_SYS_SENDMMSG, DT_DIR_EGRESS, A(0), A(1), 0, A(2)); }
EXIT(sendmmsg) { return exit_mmsg(&EGRESS, DT_DIR_EGRESS, ctx->ret); }

/* ---- connection life cycle ---- */

/* A new socket gets a fresh connection id even if it reuses a closed one's memory. */
SEC("tracepoint/syscalls/sys_exit_socket")
int exit_socket(struct trace_event_raw_sys_exit *ctx)
{
	__u8 l4 = 0;

	if (ctx->ret < 0 || !traced(bpf_get_current_pid_tgid() >> 32))
		return 0;
	struct sock *sk = inet_sock_of_fd(ctx->ret, &l4);
	if (sk)
		conn_of((__u64)sk, DT_ROLE_UNKNOWN, true);
	return 0;
}

ENTER(connect) { return enter_io(&EGRESS, DT_SYS_CONNECT, DT_DIR_NONE, A(0), 0, A(1), 0); }

EXIT(connect)
{
	struct args a;
	long ret = ctx->ret;

	if (!take_args(&EGRESS, &a) || (ret != 0 && ret != -EINPROGRESS))
		return 0;
	struct scratch *s = begin_record(&a, DT_DIR_NONE, DT_ROLE_CLIENT, false);
	if (!s)
		return 0;
	s->rec.ret = ret;
	if (s->rec.rport == 0)
		peer_from_sockaddr(&s->rec, a.addr);
	submit(s, 0);
	return 0;
}

/* accept resolves the new fd at exit; the listening fd is not needed. */
static __always_inline int accept_enter(void)
{
	__u64 id = bpf_get_current_pid_tgid();

	if (!traced(id >> 32))
		return 0;
	struct args a = { .enter_ns = bpf_ktime_get_ns(), .syscall = DT_SYS_ACCEPT };
	stash_args(&INGRESS, id, &a);
	return 0;
}

static __always_inline int accept_exit(long ret)
{
	struct args a;
	__u8 l4 = 0;

	if (!take_args(&INGRESS, &a) || ret < 0)
		return 0;
	struct sock *sk = inet_sock_of_fd(ret, &l4);
	if (!sk)
		return 0;
	a.sk = (__u64)sk;
	a.fd = ret;
	a.l4 = l4;
	struct scratch *s = begin_record(&a, DT_DIR_NONE, DT_ROLE_SERVER, true);
	if (!s)
		return 0;
	s->rec.ret = ret;
	submit(s, 0);
	return 0;
}

ENTER(accept) { return accept_enter(); }
EXIT(accept) { return accept_exit(ctx->ret); }
ENTER(accept4) { return accept_enter(); }
EXIT(accept4) { return accept_exit(ctx->ret); }

/* close: reported at enter, while the fd still names the socket. */
ENTER(close)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u8 l4 = 0;

	if (!traced(id >> 32))
		return 0;
	struct sock *sk = inet_sock_of_fd(A(0), &l4);
	if (!sk)
		return 0;
	struct args a = {
		.sk = (__u64)sk,
		.enter_ns = bpf_ktime_get_ns(),
		.fd = A(0),
		.syscall = DT_SYS_CLOSE,
		.l4 = l4,
	};
	struct scratch *s = begin_record(&a, DT_DIR_NONE, DT_ROLE_UNKNOWN, false);
	if (!s)
		return 0;
	submit(s, 0);
	bpf_map_delete_elem(&CONNS, &a.sk);
	return 0;
}

/* ---- process selection that must not wait for user space ---- */

/* Children forked by a traced process are traced from their first instruction. */
SEC("raw_tracepoint/sched_process_fork")
int on_fork(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *parent = (void *)ctx->args[0];
	struct task_struct *child = (void *)ctx->args[1];
	__u32 ptgid = BPF_CORE_READ(parent, tgid);
	__u32 ctgid = BPF_CORE_READ(child, tgid);
	__u32 one = 1;

	if (CFG.trace_all || !CFG.follow_forks || ptgid == ctgid)
		return 0;
	if (!bpf_map_lookup_elem(&PIDS, &ptgid))
		return 0;
	if (bpf_map_update_elem(&PIDS, &ctgid, &one, BPF_ANY))
		count(DT_CNT_DROP_PIDS_MAP_FULL);
	return 0;
}

/* A process that becomes one of the --comm names is traced before it runs. */
SEC("tracepoint/sched/sched_process_exec")
int on_exec(void *ctx)
{
	char comm[DT_TASK_COMM_LEN] = {};
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u32 one = 1;

	bpf_get_current_comm(comm, sizeof(comm));
	if (bpf_map_lookup_elem(&COMMS, comm) && bpf_map_update_elem(&PIDS, &tgid, &one, BPF_ANY))
		count(DT_CNT_DROP_PIDS_MAP_FULL);
	return 0;
}
