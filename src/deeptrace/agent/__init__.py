"""The per-host agent: eBPF collector and the user-space pipeline behind it."""
