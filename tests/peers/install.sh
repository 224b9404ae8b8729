#!/bin/bash
# tests/peers/install.sh - install the real MTAs the interop tests (tests/interop/) talk to.
#
# Idempotent; run as root on Debian 12 ("bookworm"); needs only the Debian package mirror.
# Called from .ci/run before the tests; by hand: `bash tests/peers/install.sh`.
#
# * postfix + openssl: `apt-get install`.  postfix is preseeded to "No configuration"
#   (no /etc/postfix/main.cf) and a policy-rc.d denies service starts while it installs,
#   so nothing runs afterwards; each test module starts its own instance with
#   `postfix -c <tmpdir>` on a free 127.0.0.1 port (tests/interop/peers.py).
# * exim4 (exim4-daemon-light, GnuTLS): a second, independent SMTP server.  All Debian
#   MTAs "Conflict: mail-transport-agent" with postfix, so exim is NOT installed:
#   `apt-get download` + `dpkg -x` unpack it into $GREENMAIL_PEERS/exim (default
#   /opt/greenmail-peers/exim).  Its libraries (ordinary packages, no conflict) are
#   installed with apt.  The tests run $GREENMAIL_PEERS/exim/usr/sbin/exim4 with
#   `-C <their config>`; every compiled-in path it needs (spool, log, pid, exim_path,
#   user) is overridden in that config, so no mount namespace is needed.  The one change
#   on the host for it: the system account "Debian-exim" that the binary looks up at start
#   (what exim4-base's postinst would create).
#
# Re-running is cheap: nothing is downloaded or installed when everything is in place.
set -euo pipefail

PEERS=${GREENMAIL_PEERS:-/opt/greenmail-peers}
EXIM_DIR=$PEERS/exim
EXIM=$EXIM_DIR/usr/sbin/exim4
export DEBIAN_FRONTEND=noninteractive

[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 1; }
say() { echo "peers/install.sh: $*"; }

installed() {  # installed PKG...: true when every package is installed
    local p
    for p; do
        [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || return 1
    done
}

updated=
apt_update() {
    if [ -z "$updated" ]; then
        say "apt-get update"
        apt-get update -qq
        updated=1
    fi
}

# Packages with a service must not start it (no init system here, and the tests run
# their own instances): a policy-rc.d that denies, only while we install.
deny_service_starts() {
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\n# installed by greenmail tests/peers/install.sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
}

apt_install() {  # apt_install PKG...
    deny_service_starts
    apt_update
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- postfix, openssl ----------------------------------------------------------------
missing=()
for p in postfix openssl; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then  # only what is missing: nothing already there gets upgraded
    say "installing ${missing[*]}"
    debconf-set-selections <<'EOF'
postfix postfix/main_mailer_type select No configuration
EOF
    apt_install "${missing[@]}"
fi
for f in /usr/sbin/postfix /usr/sbin/postconf /usr/lib/postfix/sbin/smtpd /usr/bin/openssl; do
    [ -x "$f" ] || { echo "install.sh: $f missing after install" >&2; exit 1; }
done
getent passwd postfix >/dev/null && getent group postdrop >/dev/null

# --- exim4, unpacked (conflicts with postfix) -------------------------------------------
# exim looks up its compiled-in user "Debian-exim" at start-up (exim4-base's postinst would
# create it; we do not install exim4-base): the same system account, nothing else.
if ! getent passwd Debian-exim >/dev/null; then
    say "adding the system user Debian-exim"
    adduser --system --group --quiet --home /nonexistent --no-create-home --disabled-login \
        --allow-bad-names Debian-exim
fi

exim_works() { [ -x "$EXIM" ] && "$EXIM" -C /dev/null -bV >/dev/null 2>&1; }

if ! exim_works; then
    say "unpacking exim4-daemon-light into $EXIM_DIR"
    mkdir -p "$PEERS/debs"
    chmod 755 "$PEERS"
    cd "$PEERS/debs"
    if ! ls exim4-daemon-light_*.deb >/dev/null 2>&1; then
        apt-cache show exim4-daemon-light >/dev/null 2>&1 || apt_update
        # apt's _apt user cannot write here: that is only a warning
        apt-get download exim4-daemon-light 2>&1 | grep -v -i 'unsandboxed' || true
    fi
    deb=$(ls -t exim4-daemon-light_*.deb | head -1)
    # its shared libraries: the Depends that are not exim's own (conflicting) packages
    libs=$(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed -e 's/(.*)//' -e 's/|.*//' -e 's/ //g' |
        grep -v -E '^(exim4|debconf|adduser|$)' || true)
    missing=()
    for p in $libs; do installed "$p" || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
    rm -rf "$EXIM_DIR.new"
    dpkg -x "$deb" "$EXIM_DIR.new"
    rm -rf "$EXIM_DIR"
    mv "$EXIM_DIR.new" "$EXIM_DIR"
    cd /
fi
if ! exim_works; then
    echo "install.sh: $EXIM does not run:" >&2
    "$EXIM" -C /dev/null -bV >&2 || true
    exit 1
fi

say "ready: $(dpkg-query -W -f='postfix ${Version}' postfix), $("$EXIM" -C /dev/null -bV 2>/dev/null |
    head -1), $(openssl version)"
