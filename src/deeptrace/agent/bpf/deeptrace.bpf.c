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
#include <bpf/bpf_tracing.h>
#include "deeptrace.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define AF_INET6 10
#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define EINPROGRESS 115
#define E2BIG 7
#define EEXIST 17

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
	__u8 mode; /* enum xmode: who frames this connection's bytes */
	__u8 sample_shift; /* the sampling level at its first record: kept with 1/2^shift;
			      SHIFT_UNDECIDED before (a socket() has no endpoints yet) */
	__u8 sampled_out;  /* ... and not kept: its records are not written */
	__u32 hash;        /* of its two endpoints, the same on both sides (see sampling) */
	__u8 dns_held;     /* a DNS query of this socket was held in DNSPEND (see dns_closing) */
	__u8 tls;          /* its bytes are TLS: its syscalls are not written (see tls_inner) */
	__u8 sniffed;      /* data calls looked at for a TLS handshake (see TLS_SNIFF_CALLS) */
	__u8 pad[5];
};

/* A TLS library call in progress (uprobe at its entry to its return). */
struct tls_call {
	__u64 buf;       /* the plaintext */
	__u64 out_len;   /* SSL_*_ex: where the library writes the byte count; 0: the return value */
	__u64 session;   /* SSL *, gnutls_session_t, *tls.Conn */
	__u64 sk;        /* the socket its ciphertext moved on; 0: none seen yet */
	__u64 enter_ns;
	__u64 sp;        /* the stack pointer at its entry: what is deeper runs inside it (a nested
			    call, the socket syscall), what is not is after it (it never returned) */
	__u32 fd;
	__u32 enter_seq; /* with seq_set: TCP seq of the first ciphertext byte the call moved */
	__u8 syscall;    /* enum dt_syscall */
	__u8 direction;
	__u8 active;
	__u8 seq_set;
	__u8 pad[4];
};

/* A session's socket, as an earlier call on it found it (a call that returns bytes the
 * library read before makes no syscall). */
struct tls_session_key {
	__u64 session;
	__u32 tgid;
	__u32 pad;
};

struct tls_session {
	__u64 sk;
	__u32 fd;
	/* Per direction (enum dt_direction - 1): where the ciphertext of a call that moved some of
	 * it and returned no plaintext (WANT_READ, WANT_WRITE) began: the next call's bytes
	 * began there. */
	__u32 pending_seq[2];
	__u8 pending[2];
	__u8 pad[2];
};

/* A goroutine's call: Go moves goroutines between threads, so a thread id does not name it. */
struct go_call_key {
	__u64 g;
	__u32 tgid;
	__u32 pad;
};

/* Who frames a connection's bytes. Decided at its first data, for good: a connection
 * whose start we saw (connect or accept), carrying a protocol of exchange_protocols, is
 * assembled here; any other goes to user space as records. An assembled connection is
 * handed to user space when something is not simple (pipelining, 1xx, no length, a
 * header longer than DT_XSCAN), with what it holds of the exchange as records. */
enum xmode { XM_UNDECIDED = 0, XM_ASSEMBLED = 1, XM_RECORDS = 2 };

#define SHIFT_UNDECIDED 0xff

/* A record made from an xstate when its connection is handed over (its own scratch:
 * the record of the call being handled is in SCRATCH). */
struct handover {
	struct dt_record rec;
	__u8 data[DT_XHEAD_MAX];
};

/* Where a message in the scratch payload ends, as a search of its first bytes finds it.
 * Kept in the map, not on the stack: the verifier does not follow values through map
 * memory, so a search loop's position is not a different state on every step (which
 * made loading the programs take seconds longer). */
struct hscan {
	__u32 len;       /* bytes searched */
	__u32 pos;       /* where the search goes on */
	__u32 end;       /* HTTP: header length; RESP: the value's length; 0: not found */
	__u32 remaining; /* RESP: values still to walk */
	__u8 chunked;    /* HTTP: a Transfer-Encoding header */
	__u8 bad;        /* a length we do not frame by (repeated, unreadable, huge) */
	__u8 in_line;    /* RESP: inside a simple value's line */
	__u8 pad;
	__u32 line1;     /* HTTP: just past the first line's '\n'; 0: not found */
	__s64 length;    /* HTTP: Content-Length, or -1 */
	__u32 values;    /* memcached: VALUE blocks walked */
	__u32 key_end;   /* memcached: where the key of the VALUE line being walked ends */
	__u32 next;      /* memcached: where the line after that VALUE block starts */
	__u32 pad2;
};

/* What a walk of one call through a chunked body found. In the scratch map (see hscan). */
struct cwalk {
	__u32 pos;      /* offset in the call */
	__u32 size;     /* the call's bytes */
	__u32 captured; /* of which in the scratch payload */
	__u32 left;     /* bytes of the current chunk (data, line end) still to come */
	__u8 last;      /* left is the line end after the last chunk */
	__u8 end;       /* the body ended exactly at the call's end */
	__u8 bad;       /* a chunk-size line not here, not a size, or bytes after the end */
	__u8 pad;
};

struct scratch {
	struct dt_record rec;
	/* Twice the largest capture so that offset + length always stays inside the
	 * buffer in a way the verifier can check (both are bounded by DT_MAX_CAPTURE). */
	__u8 data[2 * DT_MAX_CAPTURE];
	struct hscan scan;
	struct cwalk walk;
	struct dt_dns_key dns; /* the DNS query a datagram is or answers (off the stack: see dns_or_record) */
	struct iovec iov[DT_IOV_BATCH]; /* a batch of a call's iovec array (off the stack: see copy_iovecs) */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32);   /* tgid */
	__type(value, __u32);
} PIDS SEC(".maps");

/* tgid -> the cgroup (v2 id) it opened its latest connection in: user space names a process's
 * container from /proc/PID/cgroup, and from this once a short-lived process is gone. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u64);
} CGROUPS SEC(".maps");

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

/* The sampling level: at level k a connection is kept with probability 1/2^k (0: all). Entry
 * 0 is the level, set by user space as it drains the rings and raised by the kernel itself
 * when a ring passes half full (see behind); entry 1 the highest level the kernel may raise
 * it to on its own, which user space sets a few steps above its own. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} SAMPLING SEC(".maps");

/* When the kernel last raised the level (ns). One entry. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} RAISED SEC(".maps");

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

/* struct dt_exchange + two heads per sample, all samples of one size. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22);
} EXCHANGES SEC(".maps");

/* Keyed by connection id. LRU: a process that exits leaves its entries behind; an
 * entry evicted while its connection is still assembled is a counted lost exchange. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct dt_xstate);
} XSTATE SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct handover);
} HANDOVER SEC(".maps");

/* DNS queries waiting for their response. A plain hash, not LRU: a query that finds it full
 * goes to user space as a record (counted), never out unseen; what no response takes out,
 * user space's timeout sweep does. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	/* Not preallocated: an element deleted (by a response, a retry's replace or the sweep)
	 * while another CPU still writes into it is not reused for a new query at once. */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct dt_dns_key);
	__type(value, struct dt_xstate);
} DNSPEND SEC(".maps");

/* Where a query's entry is made whole before it goes into DNSPEND, so that no response
 * on another CPU ever finds it half written. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct dt_xstate);
} XBUILD SEC(".maps");

/* LRU: a thread killed inside a TLS call never returns from it. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 10240);
	__type(key, __u64); /* tgid<<32|pid */
	__type(value, struct tls_call);
} TLS_CALLS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 10240);
	__type(key, struct go_call_key);
	__type(value, struct tls_call);
} GO_TLS_CALLS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct tls_session_key);
	__type(value, struct tls_session);
} TLS_SESSIONS SEC(".maps");

/* Go programs whose crypto/tls is probed: for each function, where the *net.TCPConn itab for
 * net.Conn lies relative to the function's own code (the same however the program is loaded,
 * PIE or not). A tls.Conn over anything else is not read: its fd would be a guess. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __s64);  /* itab address - function address */
	__type(value, __u8);
} GO_TCPCONN_ITABS SEC(".maps");

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
/* ---- sampling ----
 * Under overload user space raises the level (SAMPLING), and the kernel writes only what
 * hashes with its low `level` bits zero: never single records, so all it writes is whole.
 * A connection of records is decided once, when first seen, by its endpoints; an
 * assembled exchange when it starts, by its connection's endpoints and its TCP seq, so
 * the level reaches long-lived connections too and a few busy connections are sampled
 * as finely as many. Both hashes are the same on the client's and the server's end (at
 * one level), and what is kept at a level is kept at every lower one. */

static __always_inline __u32 sample_level(void)
{
	__u32 zero = 0, *level = bpf_map_lookup_elem(&SAMPLING, &zero);

	if (!level)
		return 0;
	return *level > DT_SAMPLE_SHIFT_MAX ? DT_SAMPLE_SHIFT_MAX : *level;
}

static __always_inline bool sampled_out(__u32 hash, __u32 level)
{
	return hash & ((1U << level) - 1);
}

/* MurmurHash3's 64-bit finalizer: every input bit moves every output bit (one multiply
 * alone left the high bits of small inputs, such as DNS ids 0, 1, 2, ..., in runs). */
static __always_inline __u64 mix(__u64 v)
{
	v ^= v >> 33;
	v *= 0xff51afd7ed558ccdULL;
	v ^= v >> 33;
	v *= 0xc4ceb9fe1a85ec53ULL;
	v ^= v >> 33;
	return v;
}

/* An address as the hash takes it: IPv4-mapped IPv6 (::ffff:a.b.c.d, a dual-stack socket's
 * view of an IPv4 peer) as the IPv4 address an IPv4 socket holds (a.b.c.d, then zeros). */
static __always_inline __u64 endpoint_key(const __u8 *addr, __u16 port)
{
	const __u64 *a = (const __u64 *)addr;
	__u64 lo = a[0], hi = a[1];

	if (lo == 0 && (hi & 0xffffffffULL) == 0xffff0000ULL) { /* bytes 8-11: 00 00 ff ff */
		lo = hi >> 32;
		hi = 0;
	}
	return mix(lo ^ mix(hi ^ port));
}

/* Symmetric in the two endpoints: the client and the server compute the same. */
static __always_inline __u32 endpoints_hash(const struct dt_record *rec)
{
	return mix(endpoint_key(rec->laddr, rec->lport) ^ endpoint_key(rec->raddr, rec->rport)) >> 32;
}

/* A connection's first record decides whether its records are written. */
static __always_inline void sample_connection(struct conn *c, const struct dt_record *rec)
{
	__u32 level = sample_level();

	c->hash = endpoints_hash(rec);
	c->sample_shift = level;
	c->sampled_out = sampled_out(c->hash, level);
	if (c->sampled_out)
		count(DT_CNT_CONN_SAMPLED_OUT);
}

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
		.sample_shift = SHIFT_UNDECIDED,
	};
	if (bpf_map_update_elem(&CONNS, &sk, &n, BPF_ANY)) {
		count(DT_CNT_DROP_CONN_MAP_FULL);
		return NULL;
	}
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u64 cgroup = bpf_get_current_cgroup_id();
	bpf_map_update_elem(&CGROUPS, &tgid, &cgroup, BPF_ANY);
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
						    bool fresh_conn, struct conn **conn)
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
		if (c->sample_shift == SHIFT_UNDECIDED)
			sample_connection(c, rec);
		rec->conn_id = c->id;
		rec->role = c->role;
		rec->sample_shift = c->sample_shift;
		if (c->sampled_out)
			rec->flags |= DT_FLAG_SAMPLED_OUT;
	}
	*conn = c;
	return s;
}

/* One sample to a ring, counted as written or lost. One wake-up per wakeup_records
 * samples of this CPU, not one per sample; the reader also polls on a short timeout so
 * a quiet trickle is not held back. (Asking the ring for its backlog instead costs a
 * cross-CPU cache miss on every sample: measured at ~400 ns.) */
/* Time between two raises of the sampling level by the kernel: time for a step to show in
 * how fast a ring fills. */
#define RAISE_GAP_NS 16000000ULL
/* Look at a ring's backlog once per this many samples a CPU writes (a look costs ~400 ns). */
#define WATCH_EVERY 64

/* A reader that looks at its rings only a few times a second (held to a CPU quota) finds
 * them full before it can raise the level: the kernel raises it one step itself when a ring
 * is past half full, or full, at most once per RAISE_GAP; user space takes the level over
 * from there (agent/sampling.py) and lowers it when calm. */
static __always_inline void behind(void *ring, bool full)
{
	__u32 zero = 0, one = 1;

	if (!full && bpf_ringbuf_query(ring, BPF_RB_AVAIL_DATA) * 2 < bpf_ringbuf_query(ring, BPF_RB_RING_SIZE))
		return;
	__u32 *level = bpf_map_lookup_elem(&SAMPLING, &zero), *ceiling = bpf_map_lookup_elem(&SAMPLING, &one);
	__u64 *last = bpf_map_lookup_elem(&RAISED, &zero);
	/* A reader stalled for a while (a CPU quota) leaves the ring full whatever the level: the
	 * kernel goes only so far on its own, and user space, which measures the loss, on from there. */
	if (!level || !ceiling || !last || *level >= *ceiling)
		return;
	__u64 now = bpf_ktime_get_ns(), was = *last;
	if (now - was < RAISE_GAP_NS)
		return;
#ifndef DT_COMPAT_READS
	/* One CPU raises per gap: the one whose swap of the time succeeds. */
	if (__sync_val_compare_and_swap(last, was, now) != was)
		return;
#else
	*last = now; /* no compare-and-swap before 5.12: two CPUs may both raise, now and then */
#endif
	__sync_fetch_and_add(level, 1);
}

static __always_inline void output(void *ring, void *data, __u64 len, __u32 written, __u32 lost)
{
	__u64 *n = bpf_map_lookup_elem(&COUNTERS, &written);
	__u64 flags = BPF_RB_NO_WAKEUP;

	if (!n)
		return;
	if (*n % CFG.wakeup_records == CFG.wakeup_records - 1)
		flags = BPF_RB_FORCE_WAKEUP;
	if (bpf_ringbuf_output(ring, data, len, flags)) {
		count(lost);
		if (CFG.sample_on_fill)
			behind(ring, true);
	} else {
		*n += 1;
		if (CFG.sample_on_fill && *n % WATCH_EVERY == 0)
			behind(ring, false);
	}
}

static __always_inline void submit(struct scratch *s, __u64 captured)
{
	if (s->rec.flags & DT_FLAG_SAMPLED_OUT) {
		count(DT_CNT_SAMPLED_RECORDS);
		return;
	}
	VERIFIER_MIN(captured, DT_MAX_CAPTURE);
	s->rec.captured = captured;
	if (captured < s->rec.size)
		s->rec.flags |= DT_FLAG_TRUNCATED;
	if (s->rec.flags & DT_FLAG_TRUNCATED)
		count(DT_CNT_TRUNCATED);
	output(&RECORDS, s, sizeof(struct dt_record) + captured, DT_CNT_SUBMITTED, DT_CNT_DROP_RINGBUF_FULL);
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
	__u64 off = 0;

	if (!s)
		return 0;
	struct iovec *iovs = s->iov;
	/* The array is read a batch at a time (one user-memory read costs ~100 ns here).
	 * gRPC and nginx write with dozens of iovecs. The batch is kept in the scratch map,
	 * not on the stack, whose 512 bytes this function shares with the *mmsg loop's. */
	for (int b = 0; b < DT_MAX_IOV / DT_IOV_BATCH; b++) {
		__u64 first = b * DT_IOV_BATCH;
		__u64 n = iovcnt - first;

		if (first >= iovcnt || total == 0 || off >= cap)
			break;
		VERIFIER_MIN(n, DT_IOV_BATCH);
		if (bpf_probe_read_user(iovs, n * sizeof(*iovs), (void *)(uiov + first * sizeof(*iovs)))) {
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

#ifndef DT_COMPAT_READS /* bpf_loop (5.17+), atomics (5.12+): the compat object leaves assembly out */

/* ---- handing an assembled connection to user space ---- */

/* Payload head per message of an exchange. */
static __always_inline __u32 xhead(void)
{
	__u32 h = CFG.exchange_head;

	return h > DT_XHEAD_MAX ? DT_XHEAD_MAX : h;
}


/* Up to exchange_head bytes of this call's payload into the state's head at `at`. */
static __always_inline __u16 keep_head(struct dt_xstate *xs, __u64 at, struct scratch *s, __u64 captured)
{
	__u64 n = captured < xhead() ? captured : xhead();

	VERIFIER_MIN(n, DT_XHEAD_MAX);
	VERIFIER_MIN(at, DT_XHEAD_MAX);
	if (n && bpf_probe_read_kernel(&xs->heads[at], n, s->data))
		return 0;
	return n;
}

/* Every record of this connection is written from now on, `cur` included: the sampling of
 * records (by connection, when first seen) no longer applies to it. */
static __always_inline void write_all_records(struct conn *c, struct dt_record *cur)
{
	c->sampled_out = 0;
	c->sample_shift = 0;
	cur->flags &= ~DT_FLAG_SAMPLED_OUT;
	cur->sample_shift = 0;
}

/* Where a record of a handed-over exchange says it was: as the exchange began. A close's own
 * record may come from a socket already taken apart (lport 0). */
static __always_inline void exchange_endpoint(struct dt_record *r, const struct dt_exchange *x)
{
	r->lport = x->lport;
	r->rport = x->rport;
	__builtin_memcpy(r->laddr, x->laddr, 16);
	__builtin_memcpy(r->raddr, x->raddr, 16);
}

/* One record standing for what the state holds of one message of its exchange. */
static __always_inline void hand_over_part(struct dt_xstate *xs, struct dt_record *cur, bool request)
{
	__u32 zero = 0;
	struct handover *h = bpf_map_lookup_elem(&HANDOVER, &zero);
	struct dt_exchange *x = &xs->x;
	__u64 n, at;

	if (!h)
		return;
	struct dt_record *r = &h->rec;
	__builtin_memcpy(r, cur, sizeof(*r)); /* who: the same connection */
	exchange_endpoint(r, x);
	r->family = x->family;
	r->role = x->role;
	r->l4 = IPPROTO_TCP;
	bool ingress = request == (x->role == DT_ROLE_SERVER);
	r->direction = ingress ? DT_DIR_INGRESS : DT_DIR_EGRESS;
	r->syscall = ingress ? DT_SYS_READ : DT_SYS_WRITE;
	r->flags = DT_FLAG_ASSEMBLED;
	r->msg_index = 0;
	r->sample_shift = 0; /* handed over, it is written whatever the level */
	if (request) {
		r->enter_ns = x->start_ns;
		r->exit_ns = xs->req_end_ns;
		r->tid = x->req_tid;
		r->enter_seq = x->req_seq;
		r->size = x->req_size;
		n = x->req_captured;
		at = 0;
	} else {
		r->enter_ns = xs->resp_start_ns;
		r->exit_ns = x->end_ns;
		r->tid = x->resp_tid;
		r->enter_seq = x->resp_seq;
		r->size = x->resp_size;
		n = x->resp_captured;
		at = xhead();
	}
	r->exit_seq = r->enter_seq + r->size;
	r->ret = r->size;
	VERIFIER_MIN(n, DT_XHEAD_MAX);
	VERIFIER_MIN(at, DT_XHEAD_MAX);
	if (n && bpf_probe_read_kernel(h->data, n, &xs->heads[at]))
		n = 0;
	r->captured = n;
	if (n < r->size) {
		r->flags |= DT_FLAG_TRUNCATED;
		count(DT_CNT_TRUNCATED);
	}
	output(&RECORDS, h, sizeof(*r) + n, DT_CNT_SUBMITTED, DT_CNT_DROP_RINGBUF_FULL);
}

/* A record of no bytes that tells user space the protocol the connection was framed as,
 * once an exchange of it was: its next bytes may be a message no detection by content
 * would take for that protocol (an unknown command). Before that, what its first bytes
 * looked like to the kernel is no more than a guess: user space detects it itself. */
static __always_inline void hand_over_mark(struct dt_xstate *xs, struct dt_record *cur)
{
	__u32 zero = 0;
	struct handover *h = xs->framed ? bpf_map_lookup_elem(&HANDOVER, &zero) : NULL;
	struct dt_exchange *x = &xs->x;

	if (!h)
		return;
	struct dt_record *r = &h->rec;
	__builtin_memcpy(r, cur, sizeof(*r));
	if (xs->phase != DT_PHASE_IDLE)
		exchange_endpoint(r, x);
	r->direction = cur->role == DT_ROLE_SERVER ? DT_DIR_INGRESS : DT_DIR_EGRESS; /* its requests' */
	r->syscall = r->direction == DT_DIR_INGRESS ? DT_SYS_READ : DT_SYS_WRITE;
	r->flags = DT_FLAG_HANDED_OVER;
	r->msg_index = x->protocol;
	r->sample_shift = 0;
	r->ret = r->size = r->captured = 0;
	r->exit_seq = r->enter_seq; /* no bytes: a place in the stream, not data */
	output(&RECORDS, h, sizeof(*r), DT_CNT_SUBMITTED, DT_CNT_DROP_RINGBUF_FULL);
}

/* From now on the connection's bytes go to user space as records, beginning with what
 * the kernel holds of the exchange in progress. `cur` is a record of the connection. */
static __always_inline void hand_over(struct conn *c, struct dt_xstate *xs, struct dt_record *cur)
{
	if (xs->phase == DT_PHASE_HANDED)
		return;
	hand_over_mark(xs, cur);
	if (xs->phase != DT_PHASE_IDLE)
		hand_over_part(xs, cur, true);
	if (xs->phase >= DT_PHASE_RESP)
		hand_over_part(xs, cur, false);
	xs->phase = DT_PHASE_HANDED; /* kept, not deleted, until close: another CPU's hook may hold it */
	c->mode = XM_RECORDS;
	write_all_records(c, cur); /* they go on from the exchange handed over */
	count(DT_CNT_CONN_HANDED_OVER);
}

/* One hook at a time works on a connection's state: a connection read by one thread and
 * written by another has hooks running at once on two CPUs (measured: one exchange sent
 * twice, then every later pair shifted by one). The loser does not wait: its call goes to
 * user space as a record and it marks the state broken; the holder, letting go, hands the
 * connection over, and user space, which puts each direction back in TCP order, frames all
 * of it from there. */
static __always_inline bool claim(struct dt_xstate *xs, __u32 tid)
{
	return __sync_val_compare_and_swap(&xs->owner, 0, tid) == 0;
}

static __always_inline void let_go(struct conn *c, struct dt_xstate *xs, struct dt_record *cur)
{
	if (xs->broken)
		hand_over(c, xs, cur);
	__sync_lock_test_and_set(&xs->owner, 0);
}

static __always_inline void refuse(struct conn *c, struct dt_xstate *xs)
{
	__sync_fetch_and_or(&xs->broken, 1);
	c->mode = XM_RECORDS;
}

/* The connection goes to user space as records from now on. */
static __always_inline void records_only(struct conn *c, struct dt_record *cur)
{
	struct dt_xstate *xs = c->mode == XM_ASSEMBLED ? bpf_map_lookup_elem(&XSTATE, &cur->conn_id) : NULL;

	if (xs && claim(xs, cur->tid)) {
		hand_over(c, xs, cur);
		let_go(c, xs, cur);
	} else if (xs) {
		refuse(c, xs);
	}
	c->mode = XM_RECORDS;
}

/* A closing connection's state goes; an exchange in progress goes to user space first,
 * which ends it as the close says (a response that runs until close, or none). */
static __always_inline void closing(struct conn *c, struct dt_record *cur)
{
	struct dt_xstate *xs = bpf_map_lookup_elem(&XSTATE, &cur->conn_id);

	if (!xs)
		return;
	if (!claim(xs, cur->tid)) {
		refuse(c, xs); /* the holder hands over; the entry stays for the LRU to take */
		return;
	}
	if (xs->phase != DT_PHASE_IDLE)
		hand_over(c, xs, cur);
	bpf_map_delete_elem(&XSTATE, &cur->conn_id);
}

/* ---- exchanges assembled in the kernel (HTTP/1) ----
 * A request is framed here when its start line and header are in its first call (within
 * the exchange head) and its length is known from them (no body, or Content-Length); a
 * response when, besides, it is a final one (status >= 200) with a length of its own
 * (Content-Length, chunked walked chunk by chunk, or none by rule: HEAD, 204, 304). A
 * call carrying more than the message (pipelining), a call of the wrong side, a gap in
 * the TCP sequence, or a message not framed here hands the connection to user space,
 * exchange so far included: the kernel never guesses where a message ends. */


/* Little-endian words of up to 8 characters, for comparing bytes 8 at a time. */
#define CH(c, i) ((__u64)(__u8)(c) << (8 * (i)))
#define W4(a, b, c, d) (CH(a, 0) | CH(b, 1) | CH(c, 2) | CH(d, 3))
#define W8(a, b, c, d, e, f, g, h) (W4(a, b, c, d) | CH(e, 4) | CH(f, 5) | CH(g, 6) | CH(h, 7))
#define LOW(n) ((n) == 8 ? ~0ULL : (1ULL << (8 * (n))) - 1)
#define LOWER 0x2020202020202020ULL /* ORed in: ASCII letters to lower case */

static __always_inline __u64 load8(const __u8 *p)
{
	return *(const __u64 *)p;
}

enum { NOT_FRAMED = 0, METHOD = 1, METHOD_HEAD = 2 };

/* The request methods framed here; any other goes to user space. */
static __always_inline int http_method(__u64 w)
{
	if ((w & LOW(4)) == W4('G', 'E', 'T', ' ') || (w & LOW(4)) == W4('P', 'U', 'T', ' ') ||
	    (w & LOW(5)) == W8('P', 'O', 'S', 'T', ' ', 0, 0, 0) ||
	    (w & LOW(7)) == W8('D', 'E', 'L', 'E', 'T', 'E', ' ', 0) ||
	    (w & LOW(6)) == W8('P', 'A', 'T', 'C', 'H', ' ', 0, 0) ||
	    w == W8('O', 'P', 'T', 'I', 'O', 'N', 'S', ' '))
		return METHOD;
	if ((w & LOW(5)) == W8('H', 'E', 'A', 'D', ' ', 0, 0, 0))
		return METHOD_HEAD;
	return NOT_FRAMED;
}

static __always_inline bool is_digit(__u8 c)
{
	return c >= '0' && c <= '9';
}

/* A header line at p: Content-Length and Transfer-Encoding are what framing needs. */
static __always_inline void header_line(struct scratch *s, __u64 p)
{
	struct hscan *h = &s->scan;
	__u8 *d = s->data;

	VERIFIER_MASK(p, 2 * DT_XSCAN - 1);
	/* Case is folded on the letters' positions only: folded, '\r' would read as '-'. */
	__u64 a = load8(&d[p]), b = load8(&d[p + 8]);
	if ((a | LOWER) == W8('t', 'r', 'a', 'n', 's', 'f', 'e', 'r') &&
	    (b | (LOWER << 8)) == W8('-', 'e', 'n', 'c', 'o', 'd', 'i', 'n')) {
		h->chunked = 1;
		return;
	}
	if ((a | (LOWER >> 8)) != W8('c', 'o', 'n', 't', 'e', 'n', 't', '-') ||
	    ((b | LOWER) & LOW(6)) != W8('l', 'e', 'n', 'g', 't', 'h', 0, 0) || d[p + 14] != ':')
		return;
	if (h->length >= 0) {
		h->bad = 1; /* repeated: user space decides what that means */
		return;
	}
	__u64 q = p + 15, v = 0;
	int digits = 0;
#pragma unroll
	for (int i = 0; i < 4; i++)
		if (d[q] == ' ' || d[q] == '\t')
			q++;
#pragma unroll
	for (int i = 0; i < 10; i++) {
		if (!is_digit(d[q]))
			break;
		v = v * 10 + (d[q] - '0');
		q++;
		digits++;
	}
#pragma unroll
	for (int i = 0; i < 4; i++)
		if (d[q] == ' ' || d[q] == '\t')
			q++;
	/* Digits, then only the line end: "5 6" or "5x" is for user space to judge. */
	if (!digits || v >= (1U << 31) || (d[q] != '\r' && d[q] != '\n'))
		h->bad = 1;
	else
		h->length = v;
}

/* Whether any of the 8 bytes in w is c. */
static __always_inline bool has_byte(__u64 w, __u8 c)
{
	__u64 x = w ^ (0x0101010101010101ULL * c);

	return (x - 0x0101010101010101ULL) & ~x & 0x8080808080808080ULL;
}

/* The offset just past the first '\n' in the 8 bytes at d[pos], or 0 if there is none. */
static __always_inline __u64 after_newline(__u8 *d, __u64 pos)
{
	__u64 w = load8(&d[pos]), p = 0;

	if (!has_byte(w, '\n'))
		return 0;
#pragma unroll
	for (int j = 7; j >= 0; j--)
		if (((w >> (8 * j)) & 0xff) == '\n')
			p = pos + j + 1; /* the first '\n' wins: it is set last */
	return p;
}

#define PAST_SEARCH (~0ULL)

/* One step of a walk through the search's bytes to the next line: just past the first '\n'
 * in the 8 bytes at h->pos; 0 if there is none (h->pos moves on by 8); PAST_SEARCH if h->pos
 * is past the bytes searched. */
static __always_inline __u64 next_newline(struct scratch *s)
{
	struct hscan *h = &s->scan;
	__u64 pos = h->pos;

	if (pos >= h->len)
		return PAST_SEARCH;
	VERIFIER_MASK(pos, DT_XSCAN - 1);
	__u64 p = after_newline(s->data, pos);
	if (!p)
		h->pos = pos + 8;
	return p;
}

/* bpf_loop callback: from `pos` to the start of the next line, 8 bytes at a time
 * where there is no '\n' in them; each line's header is looked at. */
static long scan_step(__u32 i, void *ctx)
{
	struct scratch *s = *(struct scratch **)ctx;
	struct hscan *h = &s->scan;
	__u8 *d = s->data;
	__u64 p = next_newline(s);

	if (p == PAST_SEARCH)
		return 1;
	if (!p)
		return 0;
	h->pos = p;
	if (!h->line1)
		h->line1 = p;
	if (p >= h->len)
		return 1;
	VERIFIER_MASK(p, 2 * DT_XSCAN - 1);
	__u32 end = 0;
	if (d[p] == '\n')
		end = p + 1;
	else if (d[p] == '\r' && d[p + 1] == '\n')
		end = p + 2;
	if (end) {
		if (end <= h->len)
			h->end = end;
		return 1;
	}
	header_line(s, p);
	return 0;
}

static __always_inline bool scan_header(struct scratch *s, __u32 captured)
{
	struct hscan *h = &s->scan;

	h->len = captured < DT_XSCAN ? captured : DT_XSCAN;
	h->pos = 0;
	h->end = 0;
	h->length = -1;
	h->chunked = 0;
	h->bad = 0;
	h->line1 = 0;
	bpf_loop(DT_XSCAN, scan_step, &s, 0); /* each step moves on by at least a byte */
	return h->end && !h->bad;
}

/* ---- Redis (RESP2/3): a request is an array of bulk strings; a reply any value ---- */

#define RESP_MAX_VALUES 1024 /* values walked in one message; more is user space's */

static __always_inline bool resp_length_type(__u8 t)
{
	return t == '$' || t == '!' || t == '=' || t == '*' || t == '~' || t == '%';
}

static __always_inline bool resp_line_type(__u8 t)
{
	return t == '+' || t == '-' || t == ':' || t == '_' || t == ',' || t == '#' || t == '(';
}

/* bpf_loop callback: one step of walking RESP values from `pos`, until `remaining` is
 * none. A bulk value's bytes are skipped by its length, so the last may run past the
 * bytes searched; anything else must be within them. */
static long resp_step(__u32 i, void *ctx)
{
	struct scratch *s = *(struct scratch **)ctx;
	struct hscan *h = &s->scan;
	__u64 pos = h->pos;

	if (!h->remaining) {
		h->end = pos;
		return 1;
	}
	if (pos >= h->len)
		return 1; /* its bytes are past what was searched: not framed here */
	VERIFIER_MASK(pos, DT_XSCAN - 1);
	__u8 *d = s->data;
	if (h->in_line) { /* to the end of a simple value's line */
		__u64 p = next_newline(s);
		if (!p)
			return 0;
		if (p > h->len)
			return 1;
		h->in_line = 0;
		h->remaining--;
		h->pos = p;
		return 0;
	}
	__u8 t = d[pos];
	if (resp_line_type(t)) {
		h->in_line = 1;
		h->pos = pos + 1;
		return 0;
	}
	if (!resp_length_type(t)) {
		h->bad = 1;
		return 1;
	}
	__u64 q = pos + 1, v = 0;
	bool negative = d[q] == '-';
	int digits = 0;
	if (negative)
		q++;
#pragma unroll
	for (int k = 0; k < 10; k++) {
		if (!is_digit(d[q]))
			break;
		v = v * 10 + (d[q] - '0');
		q++;
		digits++;
	}
	if (q + 2 > h->len)
		return 1; /* the length line is not all here */
	if (!digits || d[q] != '\r' || d[q + 1] != '\n' || (negative && v != 1) || v >= (1U << 31)) {
		h->bad = 1;
		return 1;
	}
	pos = q + 2;
	h->remaining--;
	if (negative) {
		/* nil */
	} else if (t == '$' || t == '!' || t == '=') {
		pos += v + 2;
	} else {
		if (v > RESP_MAX_VALUES) {
			h->bad = 1;
			return 1;
		}
		h->remaining += t == '%' ? 2 * v : v;
		if (h->remaining > RESP_MAX_VALUES) {
			h->bad = 1;
			return 1;
		}
	}
	h->pos = pos;
	return 0;
}

/* The length of the RESP value at the start of the scratch payload; 0: not framed here. */
static __always_inline __u64 resp_length(struct scratch *s, __u32 captured)
{
	struct hscan *h = &s->scan;

	h->len = captured < DT_XSCAN ? captured : DT_XSCAN;
	h->pos = 0;
	h->end = 0;
	h->remaining = 1;
	h->in_line = 0;
	h->bad = 0;
	bpf_loop(DT_XSCAN, resp_step, &s, 0); /* each step moves on, or ends a line */
	return h->bad ? 0 : h->end;
}

/* A command framed here: an array (as clients send them) whose name is not one that
 * changes what the connection carries (subscriptions, MONITOR, replication). */
static __always_inline bool redis_command(struct scratch *s, __u32 captured)
{
	__u8 *d = s->data;

	if (captured < 8 || d[0] != '*' || !is_digit(d[1]))
		return false;
	/* "*N\r\n$L\r\nNAME": the name starts after the second line end, within 14 bytes. */
	__u64 at = 0;
	int ends = 0;
#pragma unroll
	for (int k = 2; k < 14; k++) {
		if (ends < 2 && k < captured && d[k] == '\n') {
			ends++;
			at = k + 1;
		}
	}
	if (ends < 2)
		return false;
	VERIFIER_MASK(at, 15);
	__u64 w = load8(&d[at]) | LOWER;
	return w != W8('s', 'u', 'b', 's', 'c', 'r', 'i', 'b') && w != W8('p', 's', 'u', 'b', 's', 'c', 'r', 'i') &&
	       w != W8('s', 's', 'u', 'b', 's', 'c', 'r', 'i') && w != W8('u', 'n', 's', 'u', 'b', 's', 'c', 'r') &&
	       w != W8('p', 'u', 'n', 's', 'u', 'b', 's', 'c') && w != W8('s', 'u', 'n', 's', 'u', 'b', 's', 'c') &&
	       (w & LOW(7)) != W8('m', 'o', 'n', 'i', 't', 'o', 'r', 0) &&
	       (w & LOW(5)) != W8('s', 'y', 'n', 'c', '\r' | 0x20, 0, 0, 0) &&
	       (w & LOW(6)) != W8('p', 's', 'y', 'n', 'c', '\r' | 0x20, 0, 0);
}

/* ---- Memcached text: a command line (and a storage command's data block); a reply line,
 * or VALUE blocks up to END, all in the reply's first call ---- */

enum { MC_NONE = 0, MC_RETRIEVAL, MC_STORAGE, MC_OTHER };

/* The commands framed here (lower case, as memcached takes them); any other is user space's. */
static __always_inline int memcached_command(__u64 w)
{
	if ((w & LOW(4)) == W4('g', 'e', 't', ' ') || (w & LOW(5)) == W8('g', 'e', 't', 's', ' ', 0, 0, 0))
		return MC_RETRIEVAL;
	if ((w & LOW(4)) == W4('s', 'e', 't', ' ') || (w & LOW(4)) == W4('a', 'd', 'd', ' ') ||
	    (w & LOW(4)) == W4('c', 'a', 's', ' ') || w == W8('r', 'e', 'p', 'l', 'a', 'c', 'e', ' ') ||
	    w == W8('p', 'r', 'e', 'p', 'e', 'n', 'd', ' ') || (w & LOW(7)) == W8('a', 'p', 'p', 'e', 'n', 'd', ' ', 0))
		return MC_STORAGE;
	if ((w & LOW(7)) == W8('d', 'e', 'l', 'e', 't', 'e', ' ', 0) || (w & LOW(6)) == W8('t', 'o', 'u', 'c', 'h', ' ', 0, 0))
		return MC_OTHER;
	return MC_NONE;
}

/* bpf_loop callback: from `pos` to just past the next '\n' (h->end), 8 bytes at a time. */
static long line_step(__u32 i, void *ctx)
{
	struct scratch *s = *(struct scratch **)ctx;
	struct hscan *h = &s->scan;
	__u64 p = next_newline(s);

	if (p == PAST_SEARCH)
		return 1;
	if (!p)
		return 0;
	if (p <= h->len)
		h->end = p;
	return 1;
}

/* Just past the "\r\n" ending the line at `from`, within the first `len` bytes; 0: none. */
static __always_inline __u32 line_end(struct scratch *s, __u32 from, __u32 len)
{
	struct hscan *h = &s->scan;
	__u64 e;

	h->len = len < DT_XSCAN ? len : DT_XSCAN;
	h->pos = from;
	h->end = 0;
	bpf_loop(DT_XSCAN / 8, line_step, &s, 0);
	e = h->end;
	VERIFIER_MASK(e, 2 * DT_XSCAN - 1);
	if (e < 2 || s->data[e - 2] != '\r')
		return 0;
	return e;
}

/* The decimal number ending just before d[end] and starting after a space: its value, its
 * first digit's offset in *start; -1 if there is none. */
static __always_inline __s64 number_before(__u8 *d, __u64 end, __u64 *start)
{
	__u64 v = 0, scale = 1, q = end;
	int digits = 0;

#pragma unroll
	for (int k = 0; k < 10; k++) {
		VERIFIER_MASK(q, 2 * DT_XSCAN - 1);
		if (q == 0 || !is_digit(d[q - 1]))
			break;
		v += (d[q - 1] - '0') * scale;
		scale *= 10;
		q--;
		digits++;
	}
	VERIFIER_MASK(q, 2 * DT_XSCAN - 1);
	if (!digits || q == 0 || d[q - 1] != ' ' || v >= (1U << 31))
		return -1;
	*start = q;
	return v;
}

/* bpf_loop callback: one step of splitting a storage command's line into words, to its
 * 5th (the data block's length). Words are split by single spaces only: other white space
 * (tabs, runs of spaces) is for user space to read; any other byte is a word's, as there. */
static long mc_word_step(__u32 i, void *ctx)
{
	struct scratch *s = *(struct scratch **)ctx;
	struct hscan *h = &s->scan;
	__u64 pos = h->pos;

	if (pos >= h->len)
		return 1; /* the line's end */
	VERIFIER_MASK(pos, DT_XSCAN - 1);
	__u8 c = s->data[pos];
	h->pos = pos + 1;
	if (c == ' ') {
		if (s->data[pos + 1] == ' ') {
			h->bad = 1;
			return 1;
		}
		h->values++;
		return h->values > 4; /* past the length word: done */
	}
	if (c == '\t' || c == '\n' || c == '\r' || c == 0x0b || c == 0x0c) { /* more of what splits words */
		h->bad = 1;
		return 1;
	}
	if (h->values == 4) {
		__s64 v = (h->length < 0 ? 0 : h->length) * 10 + (c - '0');
		if (!is_digit(c) || v >= (1U << 30)) { /* 1 GiB: far past any item memcached stores */
			h->bad = 1;
			return 1;
		}
		h->length = v;
	}
	return 0;
}

/* The memcached command at the start of the scratch payload: its length; 0: not framed. */
static __always_inline __u64 memcached_request_length(struct dt_xstate *xs, struct scratch *s, __u32 captured)
{
	struct hscan *h = &s->scan;
	int kind = captured >= 7 ? memcached_command(load8(s->data)) : MC_NONE;
	__u64 line = kind == MC_NONE ? 0 : line_end(s, 0, captured);

	/* The line within the head (names come from it); noreply commands get no reply. */
	if (!line || line > xhead())
		return 0;
	VERIFIER_MASK(line, DT_XSCAN - 1);
	if (kind != MC_RETRIEVAL && line >= 10 && load8(&s->data[line - 10]) == W8(' ', 'n', 'o', 'r', 'e', 'p', 'l', 'y'))
		return 0;
	xs->with_cas = (load8(s->data) & LOW(5)) == W8('g', 'e', 't', 's', ' ', 0, 0, 0);
	if (kind != MC_STORAGE)
		return line;
	h->len = line - 2;
	h->pos = 0;
	h->values = 0; /* words begun */
	h->length = -1;
	h->bad = 0;
	bpf_loop(DT_XSCAN, mc_word_step, &s, 0);
	if (h->bad || h->values < 4 || h->length < 0)
		return 0;
	return line + h->length + 2; /* the line, the data block and its CRLF */
}

/* What user space splits a line's words at. */
static __always_inline bool has_space(__u64 w)
{
	return has_byte(w, ' ') || has_byte(w, '\t') || has_byte(w, '\n') || has_byte(w, 0x0b) ||
	       has_byte(w, 0x0c) || has_byte(w, '\r');
}

enum { MC_AT_LINE = 0, MC_IN_VALUE_LINE, MC_IN_KEY };

/* bpf_loop callback: one step through a reply, line by line, to END. A VALUE line must be
 * "VALUE key flags bytes" (and " cas" after a gets) with single spaces, as user space takes
 * its 4th word for the block's length: its numbers are read back from the line's end, then
 * its key is searched for white space, 8 bytes at a time; its block is skipped by length. */
static long mc_reply_step(__u32 i, void *ctx)
{
	struct scratch *s = *(struct scratch **)ctx;
	struct hscan *h = &s->scan;
	__u64 pos = h->pos, start = 0;
	__u8 *d = s->data;

	if (h->in_line == MC_IN_VALUE_LINE) {
		__u64 p = next_newline(s);
		if (p == PAST_SEARCH)
			return 1;
		if (!p)
			return 0;
		VERIFIER_MASK(p, 2 * DT_XSCAN - 1);
		if (p > h->len || p < 3 || d[p - 2] != '\r') {
			h->bad = 1;
			return 1;
		}
		__u64 end = p - 2;
		if (h->chunked) { /* gets: the cas word last */
			if (number_before(d, end, &start) < 0) {
				h->bad = 1;
				return 1;
			}
			end = start - 1;
		}
		__s64 n = number_before(d, end, &start);
		if (n < 0 || number_before(d, start - 1, &start) < 0 || start < h->key_end + 2) {
			h->bad = 1; /* no bytes or flags word, or no key before them */
			return 1;
		}
		h->pos = h->key_end; /* the key's first byte, noted at "VALUE " */
		h->key_end = start - 1;
		h->next = p + n + 2;
		h->in_line = MC_IN_KEY;
		return 0;
	}
	if (h->in_line == MC_IN_KEY) {
		if (pos >= h->key_end) {
			h->values++;
			h->pos = h->next;
			h->in_line = MC_AT_LINE;
			return 0;
		}
		VERIFIER_MASK(pos, DT_XSCAN - 1);
		__u64 w = load8(&d[pos]), left = h->key_end - pos;
		if (left < 8)
			w |= ~LOW(left) & 0x6161616161616161ULL; /* past the key: letters */
		if (has_space(w)) {
			h->bad = 1;
			return 1;
		}
		h->pos = pos + 8;
		return 0;
	}
	if (pos + 8 > h->len) {
		if (pos + 5 <= h->len) { /* "END\r\n" at the very end */
			VERIFIER_MASK(pos, DT_XSCAN - 1);
			if (d[pos] == 'E' && d[pos + 1] == 'N' && d[pos + 2] == 'D' && d[pos + 3] == '\r' && d[pos + 4] == '\n')
				h->end = pos + 5;
		}
		return 1;
	}
	VERIFIER_MASK(pos, DT_XSCAN - 1);
	__u64 w = load8(&d[pos]);
	if ((w & LOW(5)) == W8('E', 'N', 'D', '\r', '\n', 0, 0, 0)) {
		h->end = pos + 5;
		return 1;
	}
	if ((w & LOW(6)) == W8('V', 'A', 'L', 'U', 'E', ' ', 0, 0)) {
		h->in_line = MC_IN_VALUE_LINE;
		h->pos = pos + 6;
		h->key_end = pos + 6; /* for now: where the key starts */
		return 0;
	}
	h->bad = 1;
	return 1;
}

/* A reply that is one line (`len` bytes with its CRLF) of a word memcached answers the
 * commands framed here with: the word whole, then the line's end (or an error's text). */
static __always_inline bool memcached_reply_line(const __u8 *d, __u64 len)
{
	__u64 w = load8(d);

	if (len == 8 && w == W8('S', 'T', 'O', 'R', 'E', 'D', '\r', '\n'))
		return true;
	if (len == 9 && (w == W8('D', 'E', 'L', 'E', 'T', 'E', 'D', '\r') || w == W8('T', 'O', 'U', 'C', 'H', 'E', 'D', '\r')))
		return true;
	if (len == 8 && (w & LOW(7)) == W8('E', 'X', 'I', 'S', 'T', 'S', '\r', 0))
		return true;
	if (len == 7 && (w & LOW(6)) == W8('E', 'R', 'R', 'O', 'R', '\r', 0, 0))
		return true;
	if (len == 12 && w == W8('N', 'O', 'T', '_', 'S', 'T', 'O', 'R') && d[8] == 'E' && d[9] == 'D')
		return true;
	if (len == 11 && w == W8('N', 'O', 'T', '_', 'F', 'O', 'U', 'N') && d[8] == 'D')
		return true;
	return len >= 14 && (w == W8('C', 'L', 'I', 'E', 'N', 'T', '_', 'E') || w == W8('S', 'E', 'R', 'V', 'E', 'R', '_', 'E')) &&
	       d[8] == 'R' && d[9] == 'R' && d[10] == 'O' && d[11] == 'R' && (d[12] == ' ' || d[12] == '\r');
}

/* A memcached reply, whole in its first call (the kernel sees its END); its length, 0: not
 * framed here. Its VALUE blocks are counted in the exchange's status. */
static __always_inline __u64 memcached_reply_length(struct dt_xstate *xs, struct scratch *s, __u32 captured)
{
	struct hscan *h = &s->scan;
	__u64 first;

	if (captured < 5)
		return 0;
	first = line_end(s, 0, captured);
	/* Its first line within the head: the reply's word and an error's text come from it. */
	if (!first || first > xhead())
		return 0;
	if (memcached_reply_line(s->data, first)) {
		xs->x.status = 0;
		return first;
	}
	h->len = captured < DT_XSCAN ? captured : DT_XSCAN;
	h->pos = 0;
	h->end = 0;
	h->in_line = MC_AT_LINE;
	h->values = 0;
	h->chunked = xs->with_cas;
	h->bad = 0;
	bpf_loop(DT_XSCAN, mc_reply_step, &s, 0);
	if (h->bad || !h->end || h->values > 0xffff)
		return 0;
	xs->x.status = h->values;
	return h->end;
}

/* ---- chunked bodies: walked chunk by chunk, by their sizes ---- */

static __always_inline int hex_value(__u8 c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	c |= 0x20;
	return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* bpf_loop callback: one chunk (or the rest of one) of the call. */
static long chunk_step(__u32 i, void *ctx)
{
	struct scratch *s = *(struct scratch **)ctx;
	struct cwalk *w = &s->walk;
	__u32 pos = w->pos;

	if (w->left) {
		__u32 take = w->size - pos < w->left ? w->size - pos : w->left;
		w->pos = pos + take;
		w->left -= take;
		if (!w->left && w->last) { /* the body's last byte: the call must end with it */
			w->end = w->pos == w->size;
			w->bad = !w->end;
			return 1;
		}
		return w->pos >= w->size;
	}
	if (pos >= w->size)
		return 1;
	if (pos + 20 > w->captured && w->captured < w->size) {
		w->bad = 1; /* a chunk-size line past what was captured */
		return 1;
	}
	__u64 q = pos;
	VERIFIER_MASK(q, DT_MAX_CAPTURE - 1);
	__u8 *d = s->data;
	__u64 v = 0;
	int digits = 0;
#pragma unroll
	for (int k = 0; k < 8; k++) {
		int h = hex_value(d[q]);
		if (h < 0)
			break;
		v = v * 16 + h;
		q++;
		digits++;
	}
	/* A size and its line end; extensions and trailers are user space's. */
	if (!digits || q + 2 > w->captured || d[q] != '\r' || d[q + 1] != '\n' || v >= (1U << 31)) {
		w->bad = 1;
		return 1;
	}
	w->pos = q + 2;
	w->left = v + 2; /* the data and its line end; after the last chunk, the empty line */
	w->last = v == 0;
	return 0;
}

enum { CHUNKS_BAD = -1, CHUNKS_GO_ON = 0, CHUNKS_END = 1 };

/* Walks this call's bytes from `from` through the chunked body. */
static __always_inline int walk_chunks(struct dt_xstate *xs, struct scratch *s, __u32 captured, __u32 from)
{
	struct cwalk *w = &s->walk;

	w->pos = from;
	w->size = s->rec.size;
	w->captured = captured;
	w->left = xs->chunk_left;
	w->last = xs->last_chunk;
	w->end = 0;
	w->bad = 0;
	bpf_loop(64, chunk_step, &s, 0);
	if (w->bad || (!w->end && w->pos < w->size))
		return CHUNKS_BAD; /* more than 64 chunks in one call are user space's too */
	xs->chunk_left = w->left;
	xs->last_chunk = w->last;
	return w->end ? CHUNKS_END : CHUNKS_GO_ON;
}

/* The exchange and its two heads to the EXCHANGES ring, unless sampling left it out. */
static __always_inline void write_exchange(struct dt_xstate *xs)
{
	if (xs->sampled_out)
		count(DT_CNT_SAMPLED_EXCHANGES);
	else
		output(&EXCHANGES, &xs->x, sizeof(xs->x) + 2 * xhead(), DT_CNT_EXCHANGES,
		       DT_CNT_DROP_EXCHANGE_RINGBUF_FULL);
}

static __always_inline void emit_exchange(struct dt_xstate *xs)
{
	xs->framed = 1;
	write_exchange(xs);
	xs->phase = DT_PHASE_IDLE;
}

/* An exchange's request side from the call that begins it: who, where, when; nothing of a
 * response yet. */
static __always_inline void begin_exchange(struct dt_xstate *xs, const struct dt_record *rec)
{
	struct dt_exchange *x = &xs->x;

	x->start_ns = rec->direction == DT_DIR_EGRESS ? rec->enter_ns : rec->exit_ns;
	x->end_ns = rec->exit_ns;
	x->conn_id = rec->conn_id;
	x->tgid = rec->tgid;
	x->req_tid = rec->tid;
	x->resp_tid = 0;
	x->req_seq = rec->enter_seq;
	x->req_size = rec->size;
	x->resp_seq = 0;
	x->resp_size = 0;
	x->lport = rec->lport;
	x->rport = rec->rport;
	__builtin_memcpy(x->laddr, rec->laddr, 16);
	__builtin_memcpy(x->raddr, rec->raddr, 16);
	__builtin_memcpy(x->comm, rec->comm, DT_TASK_COMM_LEN);
	x->status = 0;
	x->resp_captured = 0;
	x->family = rec->family;
	x->role = rec->role;
	x->flags = 0;
	xs->req_end_ns = rec->exit_ns;
}

/* The length of the HTTP request at the start of the scratch payload; 0: not framed here. */
static __always_inline __u64 http_request_length(struct dt_xstate *xs, struct scratch *s, __u32 captured)
{
	struct hscan *h = &s->scan;
	int method = captured >= 8 ? http_method(load8(s->data)) : NOT_FRAMED;

	/* A header longer than the head is user space's: its fields past the head would be lost. */
	if (method == NOT_FRAMED || !scan_header(s, captured) || h->chunked || h->end > xhead())
		return 0;
	/* The request line ends in " HTTP/1.x" (what user space detects HTTP by, and more). */
	__u64 e = h->line1 - 1; /* its '\n' */
	VERIFIER_MASK(e, DT_XSCAN - 1);
	if (e < 14)
		return 0;
	if (s->data[e - 1] == '\r')
		e--;
	if (load8(&s->data[e - 9]) != W8(' ', 'H', 'T', 'T', 'P', '/', '1', '.') || !is_digit(s->data[e - 1]))
		return 0;
	xs->head_request = method == METHOD_HEAD;
	return h->end + (h->length > 0 ? h->length : 0);
}

/* The request's first call: who, where, and how long the request is. */
static __always_inline bool begin_request(struct dt_xstate *xs, struct scratch *s, __u32 captured)
{
	struct dt_record *rec = &s->rec;
	struct dt_exchange *x = &xs->x;
	__u64 total;

	if (x->protocol == DT_XP_REDIS)
		total = redis_command(s, captured) ? resp_length(s, captured) : 0;
	else if (x->protocol == DT_XP_MEMCACHED)
		total = memcached_request_length(xs, s, captured);
	else
		total = http_request_length(xs, s, captured);
	if (!total || rec->size > total)
		return false; /* not framed here, or more than one request in the call: pipelined */
	begin_exchange(xs, rec);
	/* Decided per exchange, by its connection and its first byte's TCP seq, which both ends
	 * see alike; framed either way: the next exchange starts where this one ends. */
	__u32 level = sample_level();
	x->sample_shift = level;
	xs->sampled_out = sampled_out(mix(xs->hash ^ x->req_seq) >> 32, level);
	x->req_captured = keep_head(xs, 0, s, captured);
	xs->left = total - rec->size;
	xs->phase = xs->left ? DT_PHASE_REQ : DT_PHASE_WAIT;
	return true;
}

/* The first call of an HTTP response: its status and length (RESP_CHUNKED: chunked);
 * 0: not framed here. */
#define RESP_CHUNKED (~0ULL)
static __always_inline __u64 http_response_length(struct dt_xstate *xs, struct scratch *s, __u32 captured)
{
	struct hscan *h = &s->scan;
	__u8 *d = s->data;

	/* Three digits and then the reason's space or the line's end, as user space reads it. */
	if (captured < 13 || (load8(d) & LOW(7)) != W8('H', 'T', 'T', 'P', '/', '1', '.', 0) || d[8] != ' ' ||
	    !is_digit(d[9]) || !is_digit(d[10]) || !is_digit(d[11]) ||
	    (d[12] != ' ' && d[12] != '\r' && d[12] != '\n'))
		return 0;
	__u16 status = (d[9] - '0') * 100 + (d[10] - '0') * 10 + (d[11] - '0');
	if (status < 200 || !scan_header(s, captured) || h->end > xhead())
		return 0; /* interim (100 Continue, 101 Switching Protocols), or a header past the head */
	xs->x.status = status;
	if (xs->head_request || status == 204 || status == 304)
		return h->end;
	if (h->chunked)
		return RESP_CHUNKED;
	if (h->length >= 0)
		return h->end + h->length;
	return 0; /* its body runs until the connection closes */
}

/* The first call of a Redis reply; pushes (RESP3 '>') and attributes ('|') are not
 * replies to a request, and are user space's. */
static __always_inline __u64 redis_reply_length(struct dt_xstate *xs, struct scratch *s, __u32 captured)
{
	__u8 t = captured ? s->data[0] : 0;

	if (!resp_line_type(t) && !resp_length_type(t))
		return 0;
	xs->x.status = t == '-' || t == '!';
	return resp_length(s, captured);
}

/* The response's first call: its status and how long it is. */
static __always_inline bool begin_response(struct dt_xstate *xs, struct scratch *s, __u32 captured)
{
	struct dt_record *rec = &s->rec;
	struct dt_exchange *x = &xs->x;
	__u64 total;

	if (x->protocol == DT_XP_REDIS)
		total = redis_reply_length(xs, s, captured);
	else if (x->protocol == DT_XP_MEMCACHED)
		total = memcached_reply_length(xs, s, captured);
	else
		total = http_response_length(xs, s, captured);
	if (!total)
		return false;
	x->resp_seq = rec->enter_seq;
	x->resp_size = rec->size;
	x->resp_tid = rec->tid;
	x->end_ns = rec->exit_ns;
	x->resp_captured = keep_head(xs, xhead(), s, captured);
	xs->resp_start_ns = rec->direction == DT_DIR_EGRESS ? rec->enter_ns : rec->exit_ns;
	if (total == RESP_CHUNKED) {
		xs->chunk_left = 0;
		xs->last_chunk = 0;
		int walked = walk_chunks(xs, s, captured, s->scan.end);
		if (walked == CHUNKS_BAD)
			return false; /* (in DT_PHASE_WAIT still: handed over without this call, which goes as a record) */
		xs->phase = DT_PHASE_RESP_CHUNKED;
		if (walked == CHUNKS_END)
			emit_exchange(xs);
		return true;
	}
	if (rec->size > total)
		return false;
	xs->left = total - rec->size;
	xs->phase = DT_PHASE_RESP;
	if (!xs->left)
		emit_exchange(xs);
	return true;
}

/* A call goes on the message being framed only where the last one ended. */
static __always_inline bool continues(struct dt_xstate *xs, struct dt_record *rec, bool request)
{
	struct dt_exchange *x = &xs->x;

	return rec->enter_seq == (request ? x->req_seq + x->req_size : x->resp_seq + x->resp_size);
}

/* The call's bytes into the message: its size, its end, and, for Redis and chunked bodies,
 * its first bytes into the head where the message's first calls left it short (as user
 * space keeps heads: it frames those once all of them is here, other HTTP messages at the
 * end of their header). */
static __always_inline void take(struct dt_xstate *xs, struct scratch *s, __u32 captured, bool request)
{
	struct dt_record *rec = &s->rec;
	struct dt_exchange *x = &xs->x;
	__u64 have = request ? x->req_captured : x->resp_captured, at = request ? 0 : xhead();
	__u64 n = xhead() - have;

	if (request) {
		x->req_size += rec->size;
		xs->req_end_ns = rec->exit_ns;
	} else {
		x->resp_size += rec->size;
		x->resp_tid = rec->tid;
		x->end_ns = rec->exit_ns;
	}
	/* As user space's heads: a message framed by lengths in its first bytes (HTTP, memcached)
	 * has those bytes as its head; one framed only when whole (Redis) its first bytes. */
	if ((x->protocol != DT_XP_REDIS && xs->phase != DT_PHASE_RESP_CHUNKED) || have >= xhead() ||
	    (request ? x->req_size : x->resp_size) - rec->size != have)
		return; /* head full, or a byte of it was not captured: what follows is not its next */
	n = captured < n ? captured : n;
	VERIFIER_MIN(have, DT_XHEAD_MAX);
	VERIFIER_MIN(at, DT_XHEAD_MAX);
	VERIFIER_MIN(n, DT_XHEAD_MAX);
	if (n && !bpf_probe_read_kernel(&xs->heads[at + have], n, s->data)) {
		if (request)
			x->req_captured += n;
		else
			x->resp_captured += n;
	}
}

/* The call, in the exchange's phase; false: not framed here (the caller hands over). */
static __always_inline bool step(struct dt_xstate *xs, struct scratch *s, __u32 captured, bool request)
{
	struct dt_record *rec = &s->rec;
	__u32 left = xs->left;
	int walked;

	switch (xs->phase) {
	case DT_PHASE_IDLE:
		return request && begin_request(xs, s, captured);
	case DT_PHASE_REQ:
		if (!request || rec->size > left || !continues(xs, rec, true))
			return false;
		take(xs, s, captured, true);
		xs->left = left - rec->size;
		if (!xs->left)
			xs->phase = DT_PHASE_WAIT;
		return true;
	case DT_PHASE_WAIT:
		return !request && begin_response(xs, s, captured);
	case DT_PHASE_RESP:
		if (request || rec->size > left || !continues(xs, rec, false))
			return false;
		take(xs, s, captured, false);
		xs->left = left - rec->size;
		if (!xs->left)
			emit_exchange(xs);
		return true;
	case DT_PHASE_RESP_CHUNKED:
		if (request || !continues(xs, rec, false))
			return false;
		walked = walk_chunks(xs, s, captured, 0);
		if (walked == CHUNKS_BAD)
			return false;
		take(xs, s, captured, false);
		if (walked == CHUNKS_END)
			emit_exchange(xs);
		return true;
	}
	return false; /* DT_PHASE_HANDED: a hook that lost the race to hand over; the call is a record */
}

/* Frames this call into the connection's exchange; false: its bytes are user space's,
 * as a record (the connection is, or has just been, handed over). */
static __always_inline bool assemble(struct conn *c, struct scratch *s, __u32 captured)
{
	struct dt_record *rec = &s->rec;
	bool request = (rec->direction == DT_DIR_INGRESS) == (c->role == DT_ROLE_SERVER);
	struct dt_xstate *xs;

	if (rec->enter_seq == rec->exit_seq)
		return c->mode == XM_ASSEMBLED; /* MSG_PEEK: the same bytes come again */
	if (c->mode == XM_UNDECIDED) {
		c->mode = XM_RECORDS;
		if (c->role == DT_ROLE_UNKNOWN || !request || captured < 7) /* "get k\r\n" */
			return false;
		__u8 protocol = DT_XP_NONE;
		if (http_method(load8(s->data)))
			protocol = DT_XP_HTTP1;
		else if (s->data[0] == '*' && is_digit(s->data[1]))
			protocol = DT_XP_REDIS;
		else if (memcached_command(load8(s->data)))
			protocol = DT_XP_MEMCACHED;
		if (!protocol || !(CFG.exchange_protocols & (1 << protocol)))
			return false;
		/* Any bytes do as the new entry's value: begin_request sets what is read. */
		if (bpf_map_update_elem(&XSTATE, &rec->conn_id, &s->data[DT_MAX_CAPTURE], BPF_ANY))
			return false;
		xs = bpf_map_lookup_elem(&XSTATE, &rec->conn_id);
		if (!xs)
			return false;
		xs->phase = DT_PHASE_IDLE;
		xs->x.protocol = protocol;
		xs->hash = c->hash;
		xs->framed = 0;
		c->mode = XM_ASSEMBLED;
		write_all_records(c, rec); /* sampled exchange by exchange from now on */
		count(DT_CNT_CONN_ASSEMBLED);
	} else {
		xs = bpf_map_lookup_elem(&XSTATE, &rec->conn_id);
		if (!xs) {
			c->mode = XM_RECORDS;
			count(DT_CNT_DROP_EXCHANGE_STATE_LOST);
			return false;
		}
	}
	if (!claim(xs, rec->tid)) {
		refuse(c, xs);
		return false;
	}
	bool framed = !(rec->flags & DT_FLAG_PAYLOAD_FAULT) && step(xs, s, captured, request);
	if (!framed)
		hand_over(c, xs, rec);
	let_go(c, xs, rec);
	return framed;
}

/* A global function: the verifier checks it once per program, apart from the paths of
 * its callers, which keeps loading fast. */
__noinline int assemble_call(struct conn *c, struct scratch *s, __u32 captured)
{
	if (!c || !s)
		return 0;
	return assemble(c, s, captured);
}

#else

static __always_inline int assemble_call(struct conn *c, struct scratch *s, __u32 captured)
{
	c->mode = XM_RECORDS;
	return 0;
}

/* No connection is ever assembled here: nothing to hand over. */
static __always_inline void records_only(struct conn *c, struct dt_record *cur)
{
	c->mode = XM_RECORDS;
}

static __always_inline void closing(struct conn *c, struct dt_record *cur)
{
}

#endif

#ifndef DT_COMPAT_READS /* bpf_for_each_map_elem (5.13+), global functions with pointers (5.12+) */

/* ---- DNS over UDP: one message per datagram; a query and its response pair by socket,
 * peer and id ----
 * Only datagrams to or from CFG.dns_ports: on any port a header check alone would take
 * other protocols' datagrams for DNS now and then. A query is held in DNSPEND until its
 * response comes the other way; anything else (not a DNS header as user space reads one,
 * a second query of a held id, a response to no held query) goes to user space as a
 * record, where the records path pairs what it can: the kernel never guesses. */

static __always_inline bool dns_port(__u16 port)
{
	return port && (port == CFG.dns_ports[0] || port == CFG.dns_ports[1] || port == CFG.dns_ports[2] ||
			port == CFG.dns_ports[3]);
}

static __always_inline __u16 be16(const __u8 *d)
{
	return (__u16)d[0] << 8 | d[1];
}

/* A query: held until its response, as an exchange whose response is still to come. */
static __always_inline bool dns_query(struct scratch *s, __u32 captured, struct dt_dns_key *k)
{
	struct dt_record *rec = &s->rec;
	__u32 zero = 0;
	struct dt_xstate *xs = bpf_map_lookup_elem(&XBUILD, &zero);

	if (!xs)
		return false;
	struct dt_exchange *x = &xs->x;
	begin_exchange(xs, rec); /* req_seq 0: a UDP record has no TCP sequence numbers */
	x->role = rec->direction == DT_DIR_INGRESS ? DT_ROLE_SERVER : DT_ROLE_CLIENT;
	x->protocol = DT_XP_DNS;
	x->flags = DT_XF_DATAGRAM;
	/* By the id alone, which both ends see alike: an unconnected socket's own address is
	 * the wildcard, and a NAT between them changes the client's. */
	__u32 level = sample_level();
	x->sample_shift = level;
	xs->sampled_out = sampled_out(mix(0x10000 | k->id) >> 32, level); /* mix(0) is 0: id 0 would always stay */
	x->req_captured = keep_head(xs, 0, s, captured);
	xs->owner = 0;
	xs->phase = DT_PHASE_WAIT;
	long err = bpf_map_update_elem(&DNSPEND, k, xs, BPF_NOEXIST);
	if (err == -E2BIG)
		count(DT_CNT_DNS_PENDING_FULL);
	if (err != -EEXIST)
		return err == 0;
	/* A query of an id already held (a resolver's retry): the new one takes its place, and
	 * the one held goes to user space alone, as the records path ends it (spans.Pairing). */
	struct dt_xstate *held = bpf_map_lookup_elem(&DNSPEND, k);
	if (!held || !claim(held, rec->tid))
		return false; /* a response is taking it right now: this query goes as a record */
	held->x.flags |= DT_XF_UNANSWERED;
	write_exchange(held);
	return bpf_map_update_elem(&DNSPEND, k, xs, BPF_ANY) == 0;
}

/* A response: with the query it answers, one exchange. */
static __always_inline bool dns_response(struct scratch *s, __u32 captured, struct dt_dns_key *k, __u16 rcode)
{
	struct dt_record *rec = &s->rec;
	struct dt_xstate *xs = bpf_map_lookup_elem(&DNSPEND, k);

	/* It comes the other way than its query, and one response takes it (claim). */
	if (!xs || (rec->direction == DT_DIR_INGRESS) == (xs->x.role == DT_ROLE_SERVER) || !claim(xs, rec->tid))
		return false;
	struct dt_exchange *x = &xs->x;
	x->resp_size = rec->size;
	x->resp_tid = rec->tid;
	x->end_ns = rec->exit_ns;
	x->status = rcode;
	x->resp_captured = keep_head(xs, xhead(), s, captured);
	write_exchange(xs);
	bpf_map_delete_elem(&DNSPEND, k);
	return true;
}

/* Whether the first question (its name's labels, type and class) lies within the exchange
 * head user space gets, so that it names the span as the records path does. */
static __always_inline bool question_in_head(const __u8 *d, __u32 captured)
{
	__u64 end = captured < xhead() ? captured : xhead(), pos = 12;

	for (int i = 0; i < 128; i++) { /* a name has at most 127 labels */
		if (pos + 5 > end)
			return false;
		VERIFIER_MASK(pos, DT_XHEAD_MAX - 1);
		__u8 n = d[pos];
		if (n == 0)
			return true; /* its type and class (4 bytes) follow: pos + 5 <= end */
		if (n > 63)
			return false; /* a pointer, or no label: user space reads it */
		pos += n + 1;
	}
	return false;
}

/* One datagram; false: its bytes are user space's, as a record. */
static __always_inline bool dns_datagram(struct conn *c, struct scratch *s, __u32 captured)
{
	struct dt_record *rec = &s->rec;
	__u8 *d = s->data;

	if ((rec->flags & DT_FLAG_PAYLOAD_FAULT) || captured < 12 || !(dns_port(rec->lport) || dns_port(rec->rport)))
		return false;
	/* The header as dns.py takes one: a known operation, the reserved bit clear, no error
	 * in a query, a question, no more records than the message could hold. */
	__u16 flags = be16(&d[2]), opcode = (flags >> 11) & 0xf, rcode = flags & 0xf;
	__u32 qd = be16(&d[4]), records = (__u32)be16(&d[6]) + be16(&d[8]) + be16(&d[10]);
	bool response = flags & 0x8000;
	if (opcode == 3 || opcode > 5 || (flags & 0x0040) || (rcode && !response) || qd < 1 ||
	    qd > rec->size - 12 || records > rec->size)
		return false;
	if (!question_in_head(d, captured))
		return false; /* a name past the head: user space, which has all of --capture of it, names it */
	struct dt_dns_key *k = &s->dns;
	k->conn_id = rec->conn_id;
	__builtin_memcpy(k->raddr, rec->raddr, 16);
	k->rport = rec->rport;
	k->id = be16(d);
	k->tgid = rec->tgid; /* processes that share a socket pair their own, as the records path does */
	if (response)
		return dns_response(s, captured, k, rcode);
	if (!dns_query(s, captured, k))
		return false;
	c->dns_held = 1;
	return true;
}

/* A datagram paired as DNS, or else written as a record. A global function, checked once
 * (see assemble_call); its stack adds to its callers', which the *mmsg loop keeps small. */
__noinline int dns_or_record(struct conn *c, struct scratch *s, __u32 captured)
{
	if (!c || !s)
		return 0;
	if (!dns_datagram(c, s, captured))
		submit(s, captured);
	return 0;
}

/* bpf_for_each_map_elem callback: a held query of the closing socket ends unanswered, as the
 * records path ends a request whose connection closes first. */
static long dns_closed(struct bpf_map *map, const struct dt_dns_key *k, struct dt_xstate *xs, __u64 *conn_id)
{
	if (k->conn_id != *conn_id || !claim(xs, 1))
		return 0;
	xs->x.flags |= DT_XF_UNANSWERED | DT_XF_CLOSED;
	write_exchange(xs);
	bpf_map_delete_elem(map, k);
	return 0;
}

/* A socket that held DNS queries closes: what it still holds goes (one walk of DNSPEND). */
static __always_inline void dns_closing(__u64 conn_id)
{
	bpf_for_each_map_elem(&DNSPEND, dns_closed, &conn_id, 0);
}

static __always_inline bool dns_assembled(void)
{
	return CFG.exchange_protocols & (1 << DT_XP_DNS);
}

#else /* the compat object: DNS is framed in user space */

static __always_inline int dns_or_record(struct conn *c, struct scratch *s, __u32 captured)
{
	submit(s, captured);
	return 0;
}

static __always_inline void dns_closing(__u64 conn_id)
{
}

static __always_inline bool dns_assembled(void)
{
	return false;
}

#endif

/* ---- TLS: the plaintext comes from the library, the ciphertext is not written ----
 * A connection is TLS once a TLS library call is seen moving its bytes, or once one of its
 * first data calls carries a TLS handshake record (a handshake is done before the first
 * SSL_read/SSL_write, and after a few plaintext calls where a protocol asks for TLS first:
 * PostgreSQL, MySQL). From then on its syscalls are counted, not written: where the
 * library's uprobes are attached its plaintext is written instead; where they are not
 * (a library we do not cover) there was never anything to parse. */

#define TLS_SNIFF_CALLS 8 /* data calls of a connection looked at for a handshake */

/* A TLS handshake record: content type 22, record version 3.1-3.4, and (when seen) a
 * ClientHello or ServerHello of version 3.x that fits in the record. A library that reads the
 * 5-byte record header first shows nothing more. (Other protocols' first bytes that could
 * look alike, a MySQL or MongoDB length of 0x0316 or 0x010316, fail the version or the
 * handshake's own length.) */
static __always_inline bool tls_handshake(const __u8 *d, __u32 captured, __u32 size)
{
	if (captured < 5 || d[0] != 22 || d[1] != 3 || d[2] < 1 || d[2] > 4)
		return false;
	__u32 len = ((__u32)d[3] << 8) | d[4];
	if (len < 4 || len > (1 << 14) + 2048)
		return false;
	if (size == 5)
		return true;
	if (captured < 10 || (d[5] != 1 && d[5] != 2) || d[9] != 3)
		return false;
	__u32 hello = ((__u32)d[6] << 16) | ((__u32)d[7] << 8) | d[8];
	return hello + 4 <= len;
}

/* Whether the thread, now in a syscall, is inside the library call `t` (its stack is deeper
 * than at the call's entry). A call that never returned (its thread left it by a longjmp, or
 * the entry was probed before its return was) is over once the thread is back above it. */
static __always_inline bool inside(struct tls_call *t)
{
#ifndef DT_COMPAT_READS /* bpf_task_pt_regs: 5.15+ */
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());

	if (regs && PT_REGS_SP(regs) >= t->sp) {
		t->active = 0;
		return false;
	}
#endif
	return true;
}

/* A socket syscall made inside a TLS library call of this thread: its socket is the call's,
 * its bytes are ciphertext. */
static __always_inline void tls_inner(struct tls_call *t, struct sock *sk, __u8 direction, long fd)
{
	if (!t->sk) {
		t->sk = (__u64)sk;
		t->fd = fd;
	}
	if (t->sk == (__u64)sk && direction == t->direction && !t->seq_set) {
		t->enter_seq = tcp_seq((__u64)sk, IPPROTO_TCP, direction);
		t->seq_set = 1;
	}
	struct conn *c = conn_of((__u64)sk, DT_ROLE_UNKNOWN, false);
	if (c)
		c->tls = 1;
	count(DT_CNT_TLS_CIPHERTEXT);
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
	if (l4 == IPPROTO_TCP && direction != DT_DIR_NONE) {
		struct tls_call *t = bpf_map_lookup_elem(&TLS_CALLS, &id);
		if (t && t->active && inside(t)) {
			tls_inner(t, sk, direction, fd);
			return 0;
		}
	}
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
static __always_inline __u32 capture_msghdr(struct scratch *s, __u64 umsg, __u64 size)
{
	struct user_msghdr msg;

	s->rec.size = size;
	if (bpf_probe_read_user(&msg, sizeof(msg), (void *)umsg)) {
		s->rec.flags |= DT_FLAG_PAYLOAD_FAULT;
		count(DT_CNT_PAYLOAD_FAULT);
		return 0;
	}
	if (s->rec.rport == 0)
		peer_from_sockaddr(&s->rec, (__u64)msg.msg_name);
	return copy_iovecs((__u64)msg.msg_iov, msg.msg_iovlen, size, capture_limit());
}

/* Where a single-message call keeps its bytes; a constant at every call site, so
 * each program carries only its own branch. */
enum buf_kind { BUF_FLAT, BUF_IOVEC, BUF_MSGHDR };

/* read/write/recvfrom/sendto (flat), readv/writev (iovec), recvmsg/sendmsg (msghdr):
 * the payload head into the scratch record, then either into the connection's
 * exchange (assembled here) or to user space as that record. */
static __always_inline int exit_single(void *map, __u8 direction, long ret, enum buf_kind kind)
{
	struct args a;
	struct conn *c;
	__u32 captured;

	if (!take_args(map, &a) || ret <= 0)
		return 0;
	struct scratch *s = begin_record(&a, direction, DT_ROLE_UNKNOWN, false, &c);
	if (!s)
		return 0;
	if (c && c->tls) {
		count(DT_CNT_TLS_CIPHERTEXT);
		return 0;
	}
	s->rec.ret = ret;
	s->rec.size = ret;
	set_seq(&s->rec, &a);
	if (kind == BUF_MSGHDR) {
		captured = capture_msghdr(s, a.buf, ret);
	} else if (kind == BUF_IOVEC) {
		captured = copy_iovecs(a.buf, a.count, ret, capture_limit());
	} else {
		if (a.addr && s->rec.rport == 0)
			peer_from_sockaddr(&s->rec, a.addr);
		__u32 cap = capture_limit();
		captured = copy_user(s, 0, (__u64)ret < cap ? (__u64)ret : cap, a.buf);
	}
	if (c && a.l4 == IPPROTO_TCP && c->sniffed < TLS_SNIFF_CALLS) {
		c->sniffed++;
		if (tls_handshake(s->data, captured, ret)) {
			c->tls = 1;
			if (c->mode != XM_RECORDS)
				records_only(c, &s->rec);
			count(DT_CNT_TLS_CIPHERTEXT);
			return 0;
		}
	}
	if (c && a.l4 == IPPROTO_TCP && c->mode != XM_RECORDS && assemble_call(c, s, captured))
		return 0;
	if (c && a.l4 == IPPROTO_UDP && dns_assembled())
		dns_or_record(c, s, captured);
	else
		submit(s, captured);
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
		struct conn *c;
		struct scratch *s = begin_record(&a, direction, DT_ROLE_UNKNOWN, false, &c);
		if (!s)
			return 0;
		if (c && c->tls) {
			count(DT_CNT_TLS_CIPHERTEXT);
			continue;
		}
		if (c && a.l4 == IPPROTO_TCP && c->mode != XM_RECORDS)
			records_only(c, &s->rec); /* batches of TCP messages are user space's to frame */
		s->rec.ret = ret;
		s->rec.msg_index = i;
		if (a.l4 == IPPROTO_TCP) {
			s->rec.enter_seq = seq;
			if (seq != end)
				seq += len;
			s->rec.exit_seq = seq;
		}
		__u32 captured = capture_msghdr(s, um, len);
		if (c && a.l4 == IPPROTO_UDP && dns_assembled())
			dns_or_record(c, s, captured); /* a resolver's A and AAAA queries go out in one sendmmsg */
		else
			submit(s, captured);
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
	struct conn *c;
	struct scratch *s = begin_record(&a, DT_DIR_NONE, DT_ROLE_CLIENT, false, &c);
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
	struct conn *c;
	struct scratch *s = begin_record(&a, DT_DIR_NONE, DT_ROLE_SERVER, true, &c);
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
	struct conn *c;
	struct scratch *s = begin_record(&a, DT_DIR_NONE, DT_ROLE_UNKNOWN, false, &c);
	if (!s)
		return 0;
	if (c && c->mode == XM_ASSEMBLED)
		closing(c, &s->rec);
	if (c && c->dns_held)
		dns_closing(c->id);
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

/* ---- TLS libraries: plaintext at their read and write calls (uprobes) ----
 * User space attaches these to the libraries its traced processes map (agent/tls.py); one
 * attachment per library file serves every process using it, and the programs keep to the
 * traced ones. The call's socket is the one a socket syscall inside the call moved its
 * ciphertext on (tls_inner), else the one an earlier call of the same session used. */

static __always_inline int tls_enter(struct pt_regs *ctx, __u64 session, __u64 buf, __u64 out_len, __u8 syscall,
				     __u8 direction)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u64 sp = PT_REGS_SP(ctx);

	if (!traced(id >> 32))
		return 0;
	struct tls_call *t = bpf_map_lookup_elem(&TLS_CALLS, &id);
	if (t && t->active && sp < t->sp)
		return 0; /* called inside a call in progress (one library function calling another) */
	struct tls_call n = {
		.buf = buf,
		.out_len = out_len,
		.session = session,
		.enter_ns = bpf_ktime_get_ns(),
		.sp = sp,
		.syscall = syscall,
		.direction = direction,
		.active = 1,
	};
	if (t)
		*t = n;
	else if (bpf_map_update_elem(&TLS_CALLS, &id, &n, BPF_NOEXIST))
		count(DT_CNT_DROP_ARGS_MAP_FULL);
	return 0;
}

/* One record of the plaintext a call moved, on its socket, with the TCP range of the
 * ciphertext it moved. */
static __always_inline void tls_record(struct tls_call *t, __u64 n)
{
	struct args a = {
		.sk = t->sk,
		.buf = t->buf,
		.enter_ns = t->enter_ns,
		.fd = t->fd,
		.syscall = t->syscall,
		.l4 = IPPROTO_TCP,
	};
	/* A call that moved no ciphertext (its plaintext was read ahead, inside the handshake or
	 * an earlier call) gets an empty range: the socket's seq now numbers later bytes, and
	 * would give it the key of the next request's span. */
	a.enter_seq = t->seq_set ? t->enter_seq : tcp_seq(a.sk, IPPROTO_TCP, t->direction);
	struct conn *c;
	struct scratch *s = begin_record(&a, t->direction, DT_ROLE_UNKNOWN, false, &c);
	if (!s)
		return;
	if (c) {
		c->tls = 1;
		if (c->mode != XM_RECORDS)
			records_only(c, &s->rec); /* a TLS connection's plaintext is user space's to frame */
	}
	s->rec.flags |= DT_FLAG_TLS;
	s->rec.ret = n;
	s->rec.size = n;
	s->rec.enter_seq = a.enter_seq;
	s->rec.exit_seq = t->seq_set ? tcp_seq(a.sk, IPPROTO_TCP, t->direction) : a.enter_seq;
	__u32 cap = capture_limit();
	__u32 captured = copy_user(s, 0, n < cap ? n : cap, a.buf);
	if (!(s->rec.flags & DT_FLAG_SAMPLED_OUT))
		count(DT_CNT_TLS_PLAINTEXT);
	submit(s, captured);
}

/* The session's entry (made if new) when the call found its socket; else the remembered
 * one if its fd still names that socket (a session's memory may serve a later one). */
static __always_inline struct tls_session *tls_session_of(struct tls_call *t, struct tls_session_key *k)
{
	struct tls_session *v = bpf_map_lookup_elem(&TLS_SESSIONS, k);
	__u8 l4 = 0;

	if (t->sk) {
		if (v && v->sk == t->sk)
			return v;
		struct tls_session n = { .sk = t->sk, .fd = t->fd };
		bpf_map_update_elem(&TLS_SESSIONS, k, &n, BPF_ANY);
		return bpf_map_lookup_elem(&TLS_SESSIONS, k);
	}
	if (!v || (__u64)inet_sock_of_fd(v->fd, &l4) != v->sk)
		return NULL;
	t->sk = v->sk;
	t->fd = v->fd;
	return v;
}

/* The return of a C library's call: `ret` bytes (or, for SSL_*_ex, 1 and the count at out_len).
 * `sp`: the stack pointer after the return, above the entry's for the call's own return. */
static __always_inline int tls_exit(long ret, __u64 sp)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct tls_call *p = bpf_map_lookup_elem(&TLS_CALLS, &id);

	if (!p || !p->active || sp <= p->sp)
		return 0; /* none, or a nested call's return */
	p->active = 0;
	struct tls_call t = *p;
	__u64 n = ret;
	if (t.out_len) {
		n = 0;
		if (ret != 1 || bpf_probe_read_user(&n, sizeof(n), (void *)t.out_len))
			n = 0;
	}
	struct tls_session_key k = { .session = t.session, .tgid = id >> 32 };
	struct tls_session *v = tls_session_of(&t, &k);
	if (!t.syscall)
		return 0; /* a handshake: it tied the session to its socket, it has no plaintext */
	__u32 d = t.direction == DT_DIR_EGRESS;
	if (ret <= 0 || n == 0 || n > (1ULL << 31)) {
		/* No plaintext (yet): what ciphertext it moved belongs to the next call's bytes. */
		if (v && t.seq_set && !v->pending[d]) {
			v->pending[d] = 1;
			v->pending_seq[d] = t.enter_seq;
		}
		return 0;
	}
	if (!v) {
		count(DT_CNT_DROP_TLS_NO_SOCKET);
		return 0;
	}
	if (v->pending[d]) {
		t.enter_seq = v->pending_seq[d];
		t.seq_set = 1;
		v->pending[d] = 0;
	}
	tls_record(&t, n);
	return 0;
}

/* OpenSSL 1.1 and 3: int SSL_read(SSL *, void *, int), int SSL_read_ex(SSL *, void *,
 * size_t, size_t *readbytes), and the same for writing. */
SEC("uprobe")
int BPF_KPROBE(ssl_read_enter, void *ssl, void *buf)
{
	return tls_enter(ctx, (__u64)ssl, (__u64)buf, 0, DT_SYS_SSL_READ, DT_DIR_INGRESS);
}

SEC("uprobe")
int BPF_KPROBE(ssl_read_ex_enter, void *ssl, void *buf, __u64 num, void *readbytes)
{
	return tls_enter(ctx, (__u64)ssl, (__u64)buf, (__u64)readbytes, DT_SYS_SSL_READ, DT_DIR_INGRESS);
}

SEC("uprobe")
int BPF_KPROBE(ssl_write_enter, void *ssl, void *buf)
{
	return tls_enter(ctx, (__u64)ssl, (__u64)buf, 0, DT_SYS_SSL_WRITE, DT_DIR_EGRESS);
}

SEC("uprobe")
int BPF_KPROBE(ssl_write_ex_enter, void *ssl, void *buf, __u64 num, void *written)
{
	return tls_enter(ctx, (__u64)ssl, (__u64)buf, (__u64)written, DT_SYS_SSL_WRITE, DT_DIR_EGRESS);
}

/* int SSL_do_handshake(SSL *) (SSL_accept and SSL_connect call it): no plaintext, but its
 * socket syscalls tie the session to its socket, for a first SSL_read that returns what the
 * handshake already read (nginx reads ahead) and so makes none. */
SEC("uprobe")
int BPF_KPROBE(ssl_handshake_enter, void *ssl)
{
	return tls_enter(ctx, (__u64)ssl, 0, 0, 0, DT_DIR_NONE);
}

/* int gnutls_handshake(gnutls_session_t), likewise. */
SEC("uprobe")
int BPF_KPROBE(gnutls_handshake_enter, void *session)
{
	return tls_enter(ctx, (__u64)session, 0, 0, 0, DT_DIR_NONE);
}

/* ssize_t gnutls_record_recv(gnutls_session_t, void *, size_t), and _send. */
SEC("uprobe")
int BPF_KPROBE(gnutls_recv_enter, void *session, void *buf)
{
	return tls_enter(ctx, (__u64)session, (__u64)buf, 0, DT_SYS_GNUTLS_RECV, DT_DIR_INGRESS);
}

SEC("uprobe")
int BPF_KPROBE(gnutls_send_enter, void *session, void *buf)
{
	return tls_enter(ctx, (__u64)session, (__u64)buf, 0, DT_SYS_GNUTLS_SEND, DT_DIR_EGRESS);
}

/* Every C library's read and write functions return here. */
SEC("uretprobe")
int BPF_KRETPROBE(tls_return, long ret)
{
	return tls_exit(ret, PT_REGS_SP(ctx));
}

#if defined(__TARGET_ARCH_x86)
/* Go's crypto/tls, amd64 register ABI (Go 1.17+): (*Conn).Read(b []byte) (int, error) has
 * the receiver in RAX, b's pointer and length in RBX and RCX, and returns n in RAX; the
 * running goroutine is in R14. Its return is probed at each RET instruction (user space
 * finds them), never with a uretprobe: Go moves goroutine stacks, and a uretprobe's
 * rewritten return address breaks that. */

/* The fd behind a *tls.Conn: its conn field (a net.Conn interface, the first field) holds a
 * *net.TCPConn in its data word, whose first word is its *netFD, whose poll.FD keeps Sysfd
 * after a 16-byte fdMutex. The same layout from Go 1.12 to today. */
#define GO_IFACE_DATA 8
#define GO_NETFD_SYSFD 16

static __always_inline long go_tls_fd(__u64 conn, __u64 ip)
{
	__u64 itab = 0, data = 0, netfd = 0;
	__s64 fd = -1;

	if (bpf_probe_read_user(&itab, sizeof(itab), (void *)conn))
		return -1;
	__s64 delta = itab - ip;
	if (!bpf_map_lookup_elem(&GO_TCPCONN_ITABS, &delta))
		return -1; /* not a *net.TCPConn: a wrapper, a pipe, TLS inside TLS */
	if (bpf_probe_read_user(&data, sizeof(data), (void *)(conn + GO_IFACE_DATA)) || !data ||
	    bpf_probe_read_user(&netfd, sizeof(netfd), (void *)data) || !netfd ||
	    bpf_probe_read_user(&fd, sizeof(fd), (void *)(netfd + GO_NETFD_SYSFD)))
		return -1;
	return fd;
}

static __always_inline int go_tls_enter(struct pt_regs *ctx, __u8 syscall, __u8 direction)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u8 l4 = 0;

	if (!traced(id >> 32))
		return 0;
	long fd = go_tls_fd(ctx->ax, ctx->ip);
	struct sock *sk = inet_sock_of_fd(fd, &l4);
	if (!sk || l4 != IPPROTO_TCP)
		return 0;
	struct conn *c = conn_of((__u64)sk, DT_ROLE_UNKNOWN, false);
	if (c)
		c->tls = 1; /* the goroutine's own syscalls may run on another thread: not tied by tid */
	struct go_call_key k = { .g = ctx->r14, .tgid = id >> 32 };
	struct tls_call n = {
		.buf = ctx->bx,
		.session = ctx->ax,
		.sk = (__u64)sk,
		.enter_ns = bpf_ktime_get_ns(),
		.fd = fd,
		.enter_seq = tcp_seq((__u64)sk, IPPROTO_TCP, direction),
		.syscall = syscall,
		.direction = direction,
		.active = 1,
		.seq_set = 1,
	};
	if (bpf_map_update_elem(&GO_TLS_CALLS, &k, &n, BPF_ANY))
		count(DT_CNT_DROP_ARGS_MAP_FULL);
	return 0;
}

static __always_inline int go_tls_return(struct pt_regs *ctx)
{
	struct go_call_key k = { .g = ctx->r14, .tgid = bpf_get_current_pid_tgid() >> 32 };
	struct tls_call *p = bpf_map_lookup_elem(&GO_TLS_CALLS, &k);

	if (!p || !p->active)
		return 0;
	struct tls_call t = *p;
	bpf_map_delete_elem(&GO_TLS_CALLS, &k);
	long n = ctx->ax;
	if (n > 0 && n < (1L << 31))
		tls_record(&t, n);
	return 0;
}

SEC("uprobe")
int go_tls_read_enter(struct pt_regs *ctx) { return go_tls_enter(ctx, DT_SYS_GO_TLS_READ, DT_DIR_INGRESS); }

SEC("uprobe")
int go_tls_write_enter(struct pt_regs *ctx) { return go_tls_enter(ctx, DT_SYS_GO_TLS_WRITE, DT_DIR_EGRESS); }

SEC("uprobe")
int go_tls_return_probe(struct pt_regs *ctx) { return go_tls_return(ctx); }
#endif
