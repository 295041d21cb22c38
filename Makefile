# DeepTrace build: system packages, the virtualenv, the BPF object, tests, demo.
# Everything here runs as root on Debian 12 (the agent loads eBPF programs).

PYTHON    ?= python3
VENV      := .venv
VPY       := $(VENV)/bin/python
BPF_DIR   := src/deeptrace/agent/bpf
BPF_OBJ   := $(BPF_DIR)/deeptrace.bpf.o
BPF_COMPAT := $(BPF_DIR)/deeptrace-compat.bpf.o
VMLINUX   := build/vmlinux.h
ARCH      := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')

# Build tools, libbpf, and the real servers and clients the tests trace.
APT_PACKAGES := clang llvm libbpf1 libbpf-dev bpftool gcc libc6-dev make \
                nginx-light redis-server redis-tools memcached libmemcached-tools postgresql mariadb-server mariadb-client \
                curl wget openssl libssl-dev wrk dnsmasq-base bind9-dnsutils tshark \
                rabbitmq-server nats-server mosquitto \
                iproute2 procps chromium golang-go clickhouse-server clickhouse-client
# deploy/ (tests/test_deploy.py): the systemd unit run under its capabilities, the Helm chart's renderer.
APT_PACKAGES += util-linux strace systemd golang-github-masterminds-sprig-dev golang-gopkg-yaml.v3-dev

.PHONY: all setup deps node venv web bpf test demo demo-two-hosts demo-cluster bench bench-accuracy bench-accuracy-foreign bench-app-impact bench-server clean

all: setup

setup: deps venv web bpf

# apt only when something is missing, so repeated runs are fast.
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The web UI has no build step; npm only fetches the libraries it serves under /vendor/.
# Node.js comes with the machine; Debian's is installed only where there is none.
node:
	@command -v npm >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm)

WEB_DIR := src/deeptrace/server/web
web: $(WEB_DIR)/node_modules/.installed

$(WEB_DIR)/node_modules/.installed: $(WEB_DIR)/package.json $(WEB_DIR)/package-lock.json | node
	npm ci --prefix $(WEB_DIR) --no-audit --no-fund --loglevel=error
	touch $@

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[server,test]'
	touch $@

bpf: $(BPF_OBJ) $(BPF_COMPAT)

# The header is generated from the running kernel's BTF, never committed.
$(VMLINUX):
	mkdir -p build
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > $@.tmp && mv $@.tmp $@

# -g emits BTF (needed for CO-RE relocations); llvm-strip -g then drops only the DWARF.
BPF_CFLAGS := -O2 -g -Wall -Werror -target bpf -D__TARGET_ARCH_$(ARCH) -I build

$(BPF_OBJ): $(BPF_DIR)/deeptrace.bpf.c $(BPF_DIR)/deeptrace.h $(VMLINUX)
	clang $(BPF_CFLAGS) -c $< -o $@
	llvm-strip -g $@

# Kernels 5.8-6.1 have no bpf_rdonly_cast: the same programs reading each field
# through bpf_probe_read_kernel. The agent picks the object that fits the kernel.
$(BPF_COMPAT): $(BPF_DIR)/deeptrace.bpf.c $(BPF_DIR)/deeptrace.h $(VMLINUX)
	clang $(BPF_CFLAGS) -DDT_COMPAT_READS -c $< -o $@
	llvm-strip -g $@

test: setup
	DEEPTRACE_REQUIRE_BPF=1 DEEPTRACE_REQUIRE_BROWSER=1 $(VPY) -m pytest -v

demo: setup
	bash scripts/demo.sh $(ARGS)

# `make demo`'s shop split over two network namespaces ("hosts"), an agent in each
# (demo/README.md). ARGS passes options to demo/launch.py in both, e.g. ARGS="--seconds 60".
demo-two-hosts: setup
	bash scripts/demo-two-hosts.sh $(ARGS)

# The two-host demo with two servers sharing one ClickHouse store (a private clickhouse-server in
# the demo's temp dir), hostA's agent shipping to one, hostB's to the other (demo/README.md).
demo-cluster: setup
	bash scripts/demo-cluster.sh $(ARGS)

bench: setup
	$(VPY) bench/overhead/run.py
	$(VPY) bench/overhead/hook_times.py
	$(VPY) bench/overhead/tls.py
	$(VPY) bench/throughput/run.py
	$(VPY) bench/spans/run.py

# Trace association accuracy on a traced microservice workload (about 15 minutes); its services
# need the `bench` extra. ARGS passes options, e.g. make bench-accuracy ARGS="--seconds 10".
bench-accuracy: setup $(VENV)/.bench-installed
	$(VPY) bench/accuracy/run.py $(ARGS)

# The same benchmark on the mesh written in Go, Java and Node.js (bench/accuracy/foreign/;
# about 25 minutes): Go comes from Debian (make setup), Java 17 and Node.js with the machine.
bench-accuracy-foreign: setup $(VENV)/.bench-installed
	@command -v javac >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openjdk-17-jdk-headless)
	$(VPY) bench/accuracy/run.py --workloads go,java-mix,node-mix --scale-spans 0 $(ARGS)

$(VENV)/.bench-installed: pyproject.toml
	$(VPY) -m pip install -q -e '.[server,test,bench]'
	touch $@

# The agent under saturating nginx over http and https (wrk), redis-server (redis-benchmark) and
# memcached (memcaslap), A/B/A in one run (bench/app_impact/run.py; as root, about 3 minutes).
# ARGS passes options, e.g. ARGS="--quick".
bench-app-impact: setup
	$(VPY) bench/app_impact/run.py $(ARGS)

# The server's ingest, linking, query and UI budgets (bench/server/run.py; about 10 minutes).
bench-server: setup
	$(VPY) bench/server/run.py $(ARGS)

clean:
	rm -rf build $(BPF_OBJ) $(BPF_COMPAT) .pytest_cache
