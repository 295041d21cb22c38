// SPDX-License-Identifier: GPL-2.0
/* The floor: programs that do nothing, on the same 20 tracepoints as the agent's
 * data hooks. What they cost is the price of having any BPF program there. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

#define EMPTY(name)                                                     \
	SEC("tracepoint/syscalls/sys_enter_" #name)                     \
	int enter_##name(void *ctx) { return 0; }                       \
	SEC("tracepoint/syscalls/sys_exit_" #name)                      \
	int exit_##name(void *ctx) { return 0; }

EMPTY(read)
EMPTY(readv)
EMPTY(recvfrom)
EMPTY(recvmsg)
EMPTY(recvmmsg)
EMPTY(write)
EMPTY(writev)
EMPTY(sendto)
EMPTY(sendmsg)
EMPTY(sendmmsg)
