"""The DeepTrace demo: a small shop of real services on real components, traced live.

`python -m demo.launch` (or `make demo`) starts it all; see demo/README.md.
"""
