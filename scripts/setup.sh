#!/usr/bin/env bash
# Sets up vamos on a fresh Debian machine with Python 3.11: the Bible modules, a virtual
# environment in .venv, and the package with its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

apt_packages=(sword-text-web sword-text-sparv)   # the World English Bible and Reina-Valera 1909
# The King James Version (engKJV2006eb), small: the README's multi-version recipe (variant: kjv).
apt_packages+=(sword-text-kjv)
# Headless Chromium for the MLflow UI browser test (tests/test_mlflow_ui.py), driven by Playwright
# from PyPI with executable_path=/usr/bin/chromium: never `playwright install` (no browser download).
apt_packages+=(chromium)
# nginx and openssl for the reverse-proxy test, which runs deploy/nginx-serve.conf
# (tests/test_team.py) in a process of its own on 127.0.0.1.
apt_packages+=(nginx openssl)
# tcmalloc, which `vamos train` runs under: less than half glibc malloc's peak memory, and faster
# (pipeline/allocator.py).
apt_packages+=(libtcmalloc-minimal4)
# A font with Chinese and Japanese glyphs for the plots' labels (pipeline/storage.py's pyplot).
apt_packages+=(fonts-droid-fallback)
# Apertium's English-Spanish, the rule-based baseline of benchmarks/score.py --apertium.
apt_packages+=(apertium-eng-spa)
# The packages whose Spanish gettext catalogs are the default corpus's software text: the ones
# params.yaml's gettext sources name (tests/test_gettext.py checks that the lists agree).
apt_packages+=(coreutils findutils diffutils grep sed gawk make bash xz-utils wget login
  libpam-runtime adduser procps psmisc libpopt0 libc-l10n libidn2-0 libgnutls30 gnupg-l10n man-db
  systemd dpkg libdpkg-perl gettext-base gettext git libglib2.0-data libgtk2.0-common
  libgtk-3-common libgdk-pixbuf2.0-common libgstreamer1.0-0 gsettings-desktop-schemas
  at-spi2-common libavahi-common-data libhandy-1-0 libsecret-common notification-daemon packagekit
  appstream shared-mime-info xdg-user-dirs xkb-data iso-codes apt libapt-pkg6.0 python-apt-common
  software-properties-common system-config-printer-common cups-pk-helper tar)
python3 -c "import ensurepip" 2>/dev/null || apt_packages+=(python3-venv)
if ! dpkg -s "${apt_packages[@]}" >/dev/null 2>&1; then
  had_nginx=$([ -x /usr/sbin/nginx ] && echo yes || echo no)
  # Debian starts the services that a package installs: nginx's default site would take port 80 of
  # every address, and where that port is taken the start fails and with it the install. vamos needs
  # no such service, so none starts while set-up installs (policy-rc.d, which invoke-rc.d and
  # deb-systemd-invoke obey), unless the machine already has a policy of its own.
  own_policy=no
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    own_policy=yes
    trap 'sudo_if_needed rm -f /usr/sbin/policy-rc.d' EXIT
    printf '#!/bin/sh\nexit 101\n' | sudo_if_needed tee /usr/sbin/policy-rc.d >/dev/null
    sudo_if_needed chmod 755 /usr/sbin/policy-rc.d
  fi
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_packages[@]}"
  if [ "$own_policy" = yes ]; then
    sudo_if_needed rm -f /usr/sbin/policy-rc.d
    trap - EXIT
  fi
  if [ "$had_nginx" = no ]; then  # nor at the next boot
    if [ -d /run/systemd/system ]; then
      sudo_if_needed systemctl disable nginx >/dev/null 2>&1 || true
    else
      sudo_if_needed update-rc.d nginx disable >/dev/null 2>&1 || true
    fi
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned to the version this project is tested with (a CPU build where the pip index
# offers one; PyPI's default Linux wheel is the CUDA build). A machine with a GPU can install its
# own CUDA build of torch before running this: the project only asks for torch>=2.4.
# Every other package at the version that made the committed dvc.lock (constraints.txt): a newer
# numpy or scipy changes the word2vec vectors' last bits, and every md5 from embed on.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
# The default corpus's catalogs: an image whose dpkg excludes /usr/share/locale (path-exclude, as
# slim images do) has the packages but not the files. Say so now, not at ingest; tests need none.
.venv/bin/python - <<'PY' || true
import sys
from pipeline.config import GettextSource, load_params
from pipeline.sources import CorpusError, gettext_files
for source in (s for s in load_params().ingest.sources if isinstance(s, GettextSource)):
    try:
        gettext_files(source)
    except CorpusError as error:
        print(f"warning: {error}\n  the default corpus reads these catalogs: check dpkg's path-exclude rules in "
              "/etc/dpkg/dpkg.cfg.d/ and reinstall the packages params.yaml names", file=sys.stderr)
PY
echo "vamos is set up in .venv (activate it with: . .venv/bin/activate)"
