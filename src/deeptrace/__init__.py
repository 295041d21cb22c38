"""DeepTrace: non-intrusive distributed tracing for microservices, with eBPF."""

__version__ = "0.1.0"
