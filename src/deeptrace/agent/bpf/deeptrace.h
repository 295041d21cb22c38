/* The one header shared by the kernel programs and mirrored by capture/records.py.
 * Any change here must be made in records.py too; tests/test_layout.py checks every
 * struct, enum and bound of the two against the compiler's BTF. */
#ifndef DEEPTRACE_H
#define DEEPTRACE_H

#define DT_MAX_CAPTURE 16384 /* largest payload head one record can carry; power of 2 */
#define DT_MAX_IOV 64        /* iovecs gathered per message; bytes past them are not captured */
#define DT_IOV_BATCH 16      /* iovecs read from user memory at a time */
#define DT_MAX_MMSG 8        /* messages reported per sendmmsg/recvmmsg call */
#define DT_TASK_COMM_LEN 16
#define DT_XHEAD_MAX 512     /* payload head per message an exchange event carries, at most */
#define DT_XSCAN 1024        /* first bytes of a message searched for the end of its header */
#define DT_SAMPLE_SHIFT_MAX 10 /* sampling keeps 1 connection in 2^shift, at most 1 in 1024 */
#define DT_DNS_PORTS 4       /* UDP ports whose datagrams the kernel pairs as DNS, at most */

enum dt_syscall {
	DT_SYS_READ = 1,
	DT_SYS_READV,
	DT_SYS_RECVFROM,
	DT_SYS_RECVMSG,
	DT_SYS_RECVMMSG,
	DT_SYS_WRITE,
	DT_SYS_WRITEV,
	DT_SYS_SENDTO,
	DT_SYS_SENDMSG,
	DT_SYS_SENDMMSG,
	DT_SYS_CONNECT,
	DT_SYS_ACCEPT,
	DT_SYS_CLOSE,
	/* Plaintext at a TLS library (uprobes), one per library and direction; every record of
	 * these carries DT_FLAG_TLS. */
	DT_SYS_SSL_READ,      /* OpenSSL SSL_read, SSL_read_ex */
	DT_SYS_SSL_WRITE,     /* OpenSSL SSL_write, SSL_write_ex */
	DT_SYS_GNUTLS_RECV,   /* gnutls_record_recv */
	DT_SYS_GNUTLS_SEND,   /* gnutls_record_send */
	DT_SYS_GO_TLS_READ,   /* Go crypto/tls.(*Conn).Read */
	DT_SYS_GO_TLS_WRITE,  /* Go crypto/tls.(*Conn).Write */
};

enum dt_direction {
	DT_DIR_NONE = 0, /* connection life-cycle records */
	DT_DIR_INGRESS = 1,
	DT_DIR_EGRESS = 2,
};

enum dt_role {
	DT_ROLE_UNKNOWN = 0, /* connection existed before tracing began */
	DT_ROLE_CLIENT = 1,  /* this side called connect() */
	DT_ROLE_SERVER = 2,  /* this side accepted */
};

enum dt_flags {
	DT_FLAG_TRUNCATED = 1,     /* captured < size */
	DT_FLAG_PAYLOAD_FAULT = 2, /* user memory could not be read; captured bytes are zero */
	DT_FLAG_ADDR_FROM_CALL = 4, /* peer address came from the syscall's sockaddr (unconnected UDP) */
	DT_FLAG_ASSEMBLED = 8,      /* a message (or its start) the kernel held when it handed the
				       connection to user space: enter_ns is when its first byte moved,
				       exit_ns when its last did, size all its bytes, payload the head
				       the kernel kept of it (exchange_head bytes at most) */
	DT_FLAG_HANDED_OVER = 16,   /* no bytes: the kernel hands this connection to user space from
				       here on; msg_index is the enum dt_xproto it framed it as */
	DT_FLAG_TLS = 32,           /* plaintext a TLS library call moved (syscall says which library);
				       [enter_seq, exit_seq) is the TCP range of the ciphertext the
				       call moved on its socket (empty if it moved none: it returned
				       bytes the library had read before) */
	DT_FLAG_SAMPLED_OUT = 128   /* the kernel's own mark of a record not to write (its connection
				       is sampled away); no written record carries it */
};

/* Protocols whose exchanges the kernel can assemble; bit (1 << p) of CFG.exchange_protocols. */
enum dt_xproto {
	DT_XP_NONE = 0,
	DT_XP_HTTP1 = 1,
	DT_XP_REDIS = 2,
	DT_XP_MEMCACHED = 3, /* text protocol */
	DT_XP_DNS = 4,       /* over UDP, on CFG.dns_ports: a query and its response pair by socket, peer and id */
};

/* struct dt_exchange's flags. */
enum dt_xflags {
	DT_XF_DATAGRAM = 1,   /* over UDP: no TCP sequence numbers (req_seq and resp_seq are 0) */
	DT_XF_UNANSWERED = 2, /* a request alone, ended at end_ns: another of the same id took its place
				 (as the records path ends it: "too many requests waiting") */
	DT_XF_CLOSED = 4,     /* with DT_XF_UNANSWERED: not displaced, its socket closed first
				 (as the records path ends it: "connection closed") */
};

/* Every counter is a per-CPU u64 in the COUNTERS map, indexed by this enum. */
enum dt_counter {
	DT_CNT_SUBMITTED = 0,       /* records written to the ring buffer */
	DT_CNT_DROP_RINGBUF_FULL,   /* record lost: ring buffer had no room */
	DT_CNT_DROP_ARGS_MAP_FULL,  /* syscall lost: INGRESS/EGRESS had no room for its enter args */
	DT_CNT_DROP_CONN_MAP_FULL,  /* connection not tracked: CONNS had no room */
	DT_CNT_DROP_MMSG_OVERFLOW,  /* messages of a *mmsg call past DT_MAX_MMSG */
	DT_CNT_DROP_PIDS_MAP_FULL,  /* forked or exec'd process not traced: PIDS had no room */
	DT_CNT_SKIP_NOT_SOCKET,     /* traced I/O on a file, pipe, ...: not reported by design */
	DT_CNT_SKIP_NOT_INET,       /* socket that is not TCP/UDP over IPv4/IPv6 */
	DT_CNT_TRUNCATED,           /* records whose payload was cut at the capture limit */
	DT_CNT_PAYLOAD_FAULT,       /* records whose payload could not be read */
	DT_CNT_EXCHANGES,           /* exchange events written to the EXCHANGES ring */
	DT_CNT_DROP_EXCHANGE_RINGBUF_FULL, /* exchange lost: EXCHANGES had no room */
	DT_CNT_DROP_EXCHANGE_STATE_LOST,   /* an assembled connection's state left XSTATE (full), with the
					      exchange in progress if there was one; the connection goes on
					      as records */
	DT_CNT_CONN_ASSEMBLED,      /* connections whose exchanges the kernel assembles */
	DT_CNT_CONN_HANDED_OVER,    /* ... of which later handed to user space (pipelining, 1xx, ...) */
	DT_CNT_SAMPLED_RECORDS,     /* records not written: their connection was sampled away */
	DT_CNT_SAMPLED_EXCHANGES,   /* exchanges not written: their connection was sampled away */
	DT_CNT_CONN_SAMPLED_OUT,    /* connections whose records are sampled away (decided when first seen) */
	DT_CNT_DNS_PENDING_FULL,    /* DNS query not held in DNSPEND (full): it and its response go as records */
	DT_CNT_TLS_CIPHERTEXT,      /* calls on a TLS connection not written: ciphertext (the plaintext
				       comes from the library's uprobes, where they are attached) */
	DT_CNT_TLS_PLAINTEXT,       /* records of plaintext written from TLS library calls */
	DT_CNT_DROP_TLS_NO_SOCKET,  /* TLS library call whose socket was never seen (no socket syscall
				       inside it or an earlier call on its session): not written */
	DT_CNT_MAX,
};

/* Set by user space before load, as the programs' read-only global CFG. */
struct dt_config {
	__u32 capture_bytes; /* payload head per record, 0..DT_MAX_CAPTURE */
	__u32 trace_all;     /* 1: every process but agent_tgid */
	__u32 agent_tgid;
	__u32 follow_forks;  /* 1: children of traced processes are traced */
	__u64 wakeup_records; /* wake the reader once per this many records of a CPU (>= 1) */
	__u32 exchange_protocols; /* bit (1 << enum dt_xproto): assembled in the kernel; 0: records only */
	__u32 exchange_head;      /* payload head per message of an exchange, multiple of 8, <= DT_XHEAD_MAX */
	__u16 dns_ports[DT_DNS_PORTS]; /* DT_XP_DNS: datagrams to or from these ports (0: none) */
	__u32 sample_on_fill; /* 1: a ring past half full raises the sampling level (see SAMPLING) */
	__u32 pad;
};

/* Fixed header of every ring-buffer record; `captured` payload bytes follow it. */
struct dt_record {
	__u64 enter_ns; /* CLOCK_MONOTONIC (bpf_ktime_get_ns) */
	__u64 exit_ns;
	__u64 conn_id;  /* per-connection id, unique while the agent runs */
	__s64 ret;      /* syscall return: true byte count, or the fd for accept, or -errno */
	__u32 tgid;
	__u32 tid;
	__u32 enter_seq; /* TCP copied_seq (reads) or write_seq (writes) at enter */
	__u32 exit_seq;  /* ... and at exit: [enter_seq, exit_seq) are this call's bytes */
	__u32 size;      /* bytes this message carried (== ret except for *mmsg) */
	__u32 captured;  /* payload bytes following this header */
	__u32 fd;
	__u16 lport;     /* host byte order */
	__u16 rport;
	__u8 laddr[16];  /* IPv4 in the first 4 bytes */
	__u8 raddr[16];
	__u8 syscall;    /* enum dt_syscall */
	__u8 direction;  /* enum dt_direction */
	__u8 family;     /* AF_INET 2, AF_INET6 10 */
	__u8 l4;         /* IPPROTO_TCP 6, IPPROTO_UDP 17 */
	__u8 role;       /* enum dt_role */
	__u8 flags;      /* enum dt_flags */
	__u8 msg_index;  /* position in a sendmmsg/recvmmsg batch, else 0 */
	__u8 sample_shift; /* its connection was kept with probability 1/2^sample_shift */
	char comm[DT_TASK_COMM_LEN];
};

/* One request and its response, assembled in the kernel (the EXCHANGES ring). Fixed
 * size: `exchange_head` bytes of the request's head, then as many of the response's,
 * follow it, so every sample of that ring has the same length and user space reads a
 * batch as one array. Times are CLOCK_MONOTONIC. */
struct dt_exchange {
	__u64 start_ns;  /* the request's first byte: write enter, or read exit */
	__u64 end_ns;    /* the response's last byte: exit of its last call */
	__u64 conn_id;
	__u32 tgid;
	__u32 req_tid;   /* thread that moved the request's first byte */
	__u32 resp_tid;  /* thread that moved the response's last byte */
	__u32 req_seq;   /* TCP seq of the request's first byte; it ends at req_seq + req_size */
	__u32 resp_seq;
	__u32 req_size;  /* bytes on the wire */
	__u32 resp_size;
	__u16 lport;
	__u16 rport;
	__u8 laddr[16];
	__u8 raddr[16];
	__u16 status;        /* HTTP status code; Redis: 1 if the reply is an error; memcached: VALUE blocks;
				DNS: the response code */
	__u16 req_captured;  /* head bytes that are the request's (<= exchange_head) */
	__u16 resp_captured;
	__u8 family;
	__u8 role;           /* enum dt_role */
	__u8 protocol;       /* enum dt_xproto */
	__u8 flags;          /* enum dt_xflags */
	__u8 sample_shift;   /* kept with probability 1/2^sample_shift (its connection, at its start) */
	__u8 pad[5];
	char comm[DT_TASK_COMM_LEN];
};

/* Where an assembled connection is within its exchange (struct dt_xstate's phase). */
enum dt_xphase {
	DT_PHASE_IDLE = 0,     /* between exchanges */
	DT_PHASE_REQ,          /* request begun, `left` bytes of it to come */
	DT_PHASE_WAIT,         /* request whole, no response yet */
	DT_PHASE_RESP,         /* response begun, `left` bytes of it to come */
	DT_PHASE_RESP_CHUNKED, /* response begun, chunked: ends with its last chunk */
	DT_PHASE_HANDED        /* handed over to user space: nothing more is done with it */
};

/* An assembled connection's exchange in the making, the value of the XSTATE map. The heads
 * follow `x` directly, so that x and both heads go to the ring in one copy (and so that
 * user space, looking for requests that wait too long for their response, reads an entry's
 * start as it reads an exchange event). */
struct dt_xstate {
	struct dt_exchange x;
	__u8 heads[2 * DT_XHEAD_MAX]; /* request head at 0, response head at CFG.exchange_head */
	__u64 req_end_ns;    /* for handing over: the request's last byte */
	__u64 resp_start_ns; /* ... and the response's first */
	__u64 owner;         /* thread whose hook works on this state now, 0 if none (see claim) */
	__u64 broken;        /* another hook found it claimed: hand over when let go */
	__u32 left;
	__u32 chunk_left;    /* chunked: bytes of the current chunk (data and line end) to come */
	__u8 phase;          /* enum dt_xphase */
	__u8 head_request;   /* a HEAD request: its response has no body */
	__u8 last_chunk;     /* chunked: chunk_left is the line end after the last chunk */
	__u8 sampled_out;    /* the exchange in progress is not to be written (see sampling) */
	__u32 hash;          /* the connection's */
	__u8 with_cas;       /* memcached: a gets, whose VALUE lines end in a cas token */
	__u8 framed;         /* an exchange of it was framed here: its protocol is known */
	__u8 pad[6];
};

/* A DNS query waiting for its response (the DNSPEND map's key): the socket, the peer (an
 * unconnected socket talks to many), the message id and the process (workers may share a
 * socket). */
struct dt_dns_key {
	__u64 conn_id;
	__u8 raddr[16];
	__u16 rport;
	__u16 id;
	__u32 tgid;
};

#endif
