// SPDX-License-Identifier: GPL-2.0
/* The uprobe floor: an entry program and a return program that do nothing, attached
 * (bench/overhead/tls.py) to the same OpenSSL functions as the agent's TLS programs.
 * What they cost is the price of the uprobe mechanism itself: the breakpoint trap at the
 * function's entry, the return address hijacked and trapped again at its return. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

SEC("uprobe")
int empty_enter(void *ctx) { return 0; }

SEC("uretprobe")
int empty_return(void *ctx) { return 0; }
