# GOTG PACS: `make run` starts a local appliance, `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ENV_FILE ?= pacs.dev.env
# Debian packages the appliance and its tests need (Debian 12 for development, 13 on the image);
# iproute2 builds the bad networks of the sync tests (namespaces, veth, tbf); HQ's Orthanc keeps
# its index in PostgreSQL (orthanc-postgresql), and the tests run a throw-away server of their own.
# mmdebstrap and systemd-nspawn build and boot the appliance's Debian 13 tree (roles, images);
# mkfs/mtools/sfdisk/zstd lay out the disk images, qemu with OVMF boots them; the Pi 4's arm64
# tree is built through qemu-user (binfmt_misc) and booted by qemu-system-aarch64. nginx is the
# appliance's one HTTPS origin (started by `pacs run` and the tests with their own configuration);
# chromium is the real browser the page tests drive with Playwright; cryptsetup formats the data
# disk's LUKS2 header in the tests (opening it needs device-mapper: only the NUC image does).
DEB_PACKAGES := orthanc orthanc-dicomweb orthanc-gdcm orthanc-postgresql postgresql dcmtk nginx \
	python3-venv python3-dev gcc iproute2 mmdebstrap systemd-container curl \
	e2fsprogs dosfstools mtools fdisk zstd qemu-system-x86 ovmf openssh-client openssh-server \
	qemu-user-static binfmt-support arch-test qemu-system-arm borgbackup chromium cryptsetup-bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test deps system-deps bench-ingest bench-sync bench-backup bench-image bench-ris bench-report reference constraints clean \
	wheelhouse image

deps: system-deps $(VENV)/.installed

system-deps:
	@# arm64 programs (the Pi image's tree) run through qemu-user once the kernel knows them: a
	@# fresh machine may not have binfmt_misc mounted before qemu-user-static registers them.
	@[ -e /proc/sys/fs/binfmt_misc/register ] || \
	  $(SUDO) mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
	@missing=$$(for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages:" $$missing; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	  if echo " $$missing " | grep -q " orthanc " && [ -d /run/systemd/system ]; then \
	    echo "Disabling the Debian orthanc service: the appliance runs its own Orthanc on 4242/8042"; \
	    $(SUDO) systemctl disable --now orthanc || true; \
	  fi; \
	  if echo " $$missing " | grep -q " nginx " && [ -d /run/systemd/system ]; then \
	    echo "Disabling the Debian nginx service: the appliance runs its own on HTTPS_PORT"; \
	    $(SUDO) systemctl disable --now nginx || true; \
	  fi; \
	  if echo " $$missing " | grep -q " postgresql " && [ -d /run/systemd/system ]; then \
	    echo "Disabling the Debian postgresql service: the tests start their own PostgreSQL"; \
	    $(SUDO) systemctl disable --now postgresql || true; \
	  fi; \
	fi
	@[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || $(SUDO) update-binfmts --enable qemu-aarch64

$(VENV)/.installed: pyproject.toml constraints.txt | system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

run: deps
	$(BIN)/pacs --env-file $(ENV_FILE) run

test: deps
	$(BIN)/ruff check services tests bench image-build molecule
	cd ansible && ../$(BIN)/ansible-lint -q --profile production ../roles . ../molecule
	@# Two workers, whole modules each (module fixtures build trees and images once); the image
	@# modules are collected first so they run beside the rest. The slowest 25 are listed.
	$(BIN)/pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=25

bench-ingest: deps
	mkdir -p build && $(BIN)/python bench/ingest.py

# Needs root: it builds network namespaces and shapes a veth link (design brief section 5).
bench-sync: deps
	mkdir -p build && $(BIN)/python bench/sync.py

# Root too; two hours offline by default (HOURS=0.1 for a quick look).
HOURS ?= 2
bench-sync-offline: deps
	mkdir -p build && $(BIN)/python bench/sync_offline.py --hours $(HOURS)

# gotg-pacs and its dependencies as wheels for the image's Python, shipped with every push.
ARCH ?= amd64
wheelhouse: deps
	$(BIN)/python image-build/wheelhouse.py --arch $(ARCH)

# A flashable image in build/images: make image TARGET=nuc|pi4. Optional SITE_VARS=
# site.json (pacs_config_* variables) bakes one site's settings in; otherwise the first boot
# takes them from gotg-site.txt on the boot partition.
TARGET ?= nuc
image: deps
	$(BIN)/python image-build/wheelhouse.py --arch $(if $(filter pi4,$(TARGET)),arm64,amd64)
	$(BIN)/python image-build/image.py --target $(TARGET) $(if $(SITE_VARS),--vars $(SITE_VARS))

# Builds the NUC image and a bare Debian one, boots both under qemu (TCG); about 20 minutes.
# Root: it loop-mounts the backup disk and drops page caches between timed reads.
bench-backup: deps
	mkdir -p build && $(BIN)/python bench/backup.py

bench-ris: deps
	mkdir -p build && $(BIN)/python bench/ris.py

bench-image: deps
	mkdir -p build && $(BIN)/python bench/image.py --target $(TARGET)

bench-report: deps
	$(BIN)/python bench/report.py

# Regenerate the files derived from the settings model (README reference, sample env, role defaults).
reference: deps
	$(BIN)/pacs config reference --write

constraints: deps
	{ head -2 constraints.txt; $(BIN)/pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# Never removes ./var: that is the development archive, kept across runs like a real site's.
clean:
	rm -rf $(VENV) build .pytest_cache
