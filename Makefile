# virtkit: the two commands a newcomer needs are `make demo` and `make test`.
# Every target runs `setup` first; setup is idempotent and installs what it needs.

PYTHON     ?= python3
VENV       := .venv
VPY        := $(VENV)/bin/python
STAMPS     := build/.stamps
# Debian packages: gcc/binutils build the guests; QEMU, crun and runc are the peers we measure against;
# busybox-static is the built-in container image; iproute2 makes test network namespaces;
# iputils-ping pings the virtio-net guest; acpica-tools (iasl) checks the AML of the DSDT virtkit
# generates for Linux guests; lz4 (unlz4) takes the vmlinux out of Debian's bzImage;
# linux-source and the kernel build tools make the test Linux kernel (guests/linux/build.py).
DEB_PKGS   := gcc binutils make qemu-system-x86 busybox-static crun runc podman iproute2 iputils-ping acpica-tools lz4 \
	      linux-source bc bison flex libelf-dev libssl-dev cpio xz-utils
# Linux kernels for the tests, cached outside the clone: Debian's cloud kernel (keyed by package
# version: tools/fetch-debian-kernel.sh downloads only when it changes) and the test kernel and
# initramfs built from linux-source (built once per machine, ~16-25 min on 2 cores; keyed by source
# version, config fragment and build script); build/linux.json points the tests at them.
KERNEL_CACHE ?= $(or $(VIRTKIT_KERNEL_CACHE),/var/cache/virtkit/kernels)

.PHONY: all setup deps venv guests kernels linux pyc demo test test-unit test-integration bench lint typecheck clean help

all: setup

help:
	@echo "make demo   - set everything up and run the main demonstration"
	@echo "make test   - set everything up and run the whole test suite"
	@echo "make bench  - set everything up and run the benchmarks (results in bench/results/)"
	@echo "make lint   - ruff + mypy --strict"
	@echo "make clean  - remove build/ (keeps .venv)"

setup: deps venv guests kernels linux pyc

deps: $(STAMPS)/deb
$(STAMPS)/deb: Makefile
	@mkdir -p $(STAMPS)
	@missing=$$(for p in $(DEB_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "setup: installing Debian packages:" $$missing; \
	  if [ "$$(id -u)" != 0 ]; then echo "setup: need root to apt-get install $$missing (run as root or install them)"; exit 1; fi; \
	  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null; \
	fi
	@touch $@

venv: $(STAMPS)/venv
$(STAMPS)/venv: pyproject.toml
	@mkdir -p $(STAMPS)
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	@# compat mode: a plain path entry instead of an import hook (the hook costs ~10 ms per start)
	@$(VPY) -m pip install -q --disable-pip-version-check -e '.[dev]' --config-settings editable_mode=compat
	@touch $@

guests: deps
	@$(MAKE) -s -C guests OUT=$(CURDIR)/build/guests
	@$(MAKE) -s -C bench/native OUT=$(CURDIR)/build/native

# Fast when cached: the script (apt-cache takes seconds) runs again only when the kernel it last
# printed is gone or the package lists changed (apt-get update) and so may name a newer version.
kernels: deps
	@k=$$(cat $(STAMPS)/kernel 2>/dev/null); \
	if [ -z "$$k" ] || [ ! -s "$$k" ] || [ /var/lib/apt/lists -nt $(STAMPS)/kernel ]; then \
	  tools/fetch-debian-kernel.sh $(KERNEL_CACHE) > $(STAMPS)/kernel.tmp && mv $(STAMPS)/kernel.tmp $(STAMPS)/kernel; \
	fi

# Not a stamp: the script itself checks the cache (well under a second when warm) and rewrites
# build/linux.json, so a new fragment or source version is picked up.
linux: deps
	@$(PYTHON) guests/linux/build.py --cache $(KERNEL_CACHE) --json build/linux.json

# Byte-compile the package: with PYTHONDONTWRITEBYTECODE set (as on our machines) nothing else
# would, and `virtkit run` would recompile every module at each start.
pyc: venv
	@$(VPY) -m compileall -q virtkit bench >/dev/null

demo: setup
	@$(VENV)/bin/virtkit demo

test: setup
	@$(VPY) -m pytest -q -ra tests

test-unit: setup
	@$(VPY) -m pytest -q tests/unit

bench: setup
	@$(VPY) -m bench

lint: venv
	@$(VENV)/bin/ruff check virtkit tests bench
	@$(VENV)/bin/mypy

clean:
	rm -rf build
