"""Algorithm names, importable without loading the algorithms (the CLI's --help)."""

ALGORITHM_NAMES = ("joint", "fifo", "wap5", "vpath", "txn")
DEFAULT_ALGORITHM = "joint"
