"""Trace association: give every span a parent (or none) and a trace id, and say how
each link was made and how sure we are. See docs/association.md."""
