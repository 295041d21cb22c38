"""The shop's services: plain applications with no tracing library and no propagated ids."""
