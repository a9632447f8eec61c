# imgconv: set-up, demo, tests. Everything works on a fresh Debian 12 machine, as root.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

# Debian packages: what each is for is in README.md ("Dependencies").
APT_PACKAGES := \
	libguestfs-tools python3-guestfs qemu-system-x86 qemu-utils linux-image-cloud-amd64 \
	extlinux syslinux-common busybox-static docker.io skopeo umoci mmdebstrap docker-registry \
	ovmf python3-venv gcc libc6-dev musl-tools zstd e2fsprogs xfsprogs lvm2 iproute2 ca-certificates \
	systemd-boot-efi binutils dosfstools mtools gdisk

.PHONY: setup demo test lint bench fuzz clean

setup: $(VENV)/.installed

$(VENV)/.apt-done: Makefile
	@missing=$$(dpkg-query -W -f='$${db:Status-Abbrev} $${Package}\n' $(APT_PACKAGES) 2>/dev/null \
		| awk '$$1 == "ii" {print $$2}' | sort | comm -13 - <(tr ' ' '\n' <<< "$(APT_PACKAGES)" | grep . | sort)); \
	if [ -n "$$missing" ]; then \
		echo "setup: installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@test -x $(BIN)/python || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	@touch $@

$(VENV)/.installed: $(VENV)/.apt-done pyproject.toml
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

demo: setup
	$(BIN)/python fixtures/demo.py

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check converter tests fixtures bench
	$(BIN)/mypy

bench: setup
	$(BIN)/python bench/run.py

fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest tests/unit/test_fuzz_layers.py tests/unit/test_fuzz_archives.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
