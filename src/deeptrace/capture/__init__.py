"""Bytes to spans, shared by the live agent and `replay`: the record (the layout
mirrored from the kernel programs' one header, and its decoder), per-connection
byte streams put in TCP sequence order, the pipeline that turns records into
protocol messages and paired spans with bounded state, and the reader that turns a
pcap/pcapng capture into the same records a live agent would have produced."""
