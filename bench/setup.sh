#!/bin/bash
# bench/setup.sh - install what bench/run.py needs (Debian 12, as root; idempotent).
#
#   postfix      apt-get install, debconf answer "No configuration": binaries,
#                smtp-sink and smtp-source, but no /etc/postfix/main.cf and no
#                running daemon. run.py starts private instances of its own.
#   nullmailer,  conflict with postfix (all provide mail-transport-agent), so
#   dma          they are fetched with `apt-get download` and unpacked with
#                `dpkg -x` into $BENCH_WORK/pkg/<name>; run.py runs them in a
#                private mount namespace (bench/mntns.sh).
#   postgresql-15  the server binaries for the greenmail_pg peers (run.py starts a private
#                server of its own; tests/pgserver.py), and psycopg in the venv.
#   greenmail    the project venv (.venv) with greenmail installed editable,
#                plus py-spy for `run.py profile` (bench-only, not a runtime dep).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
work=${BENCH_WORK:-/tmp/greenmail-bench}
[ "$(id -u)" = 0 ] || { echo "setup.sh: run as root" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive

step() { echo "== $*"; }

step "apt packages"
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
need=()
for p in postfix python3 python3-venv util-linux iproute2 procps postgresql-15; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# the postinst of "No configuration" starts nothing; make sure of it
if [ -e /var/spool/postfix/pid/master.pid ] && postfix status >/dev/null 2>&1; then
    echo "note: a system postfix is running; the benchmark does not use it"
fi

step "nullmailer and dma unpacked into $work/pkg"
mkdir -p "$work/debs" "$work/pkg"
chmod 755 "$work"
for p in nullmailer dma; do
    deb=$(ls "$work/debs/${p}"_*.deb 2>/dev/null | head -1 || true)
    if [ -z "$deb" ]; then
        # apt's _apt user cannot write to this directory: download as root, quietly
        (cd "$work/debs" && apt-get download -qq "$p" 2>&1 | grep -v -i unsandboxed || true)
        deb=$(ls "$work/debs/${p}"_*.deb | head -1)
    fi
    if [ ! -e "$work/pkg/$p/.unpacked" ] || [ "$(cat "$work/pkg/$p/.unpacked")" != "$(basename "$deb")" ]; then
        rm -rf "$work/pkg/$p"
        dpkg -x "$deb" "$work/pkg/$p"
        basename "$deb" > "$work/pkg/$p/.unpacked"
    fi
    echo "   $(basename "$deb")"
done
test -x "$work/pkg/nullmailer/usr/sbin/nullmailer-send"
test -x "$work/pkg/dma/usr/sbin/dma"
getent passwd mail postfix nobody >/dev/null

step "greenmail venv ($repo/.venv)"
if [ ! -x "$repo/.venv/bin/python" ]; then
    python3 -m venv "$repo/.venv"
    "$repo/.venv/bin/pip" install -q --upgrade pip
fi
"$repo/.venv/bin/python" -c 'import greenmail' 2>/dev/null || "$repo/.venv/bin/pip" install -q -e "$repo" --config-settings editable_mode=compat && "$repo/.venv/bin/python" -m compileall -q "$repo/greenmail"
[ -x "$repo/.venv/bin/py-spy" ] || "$repo/.venv/bin/pip" install -q py-spy
"$repo/.venv/bin/python" -c 'import psycopg' 2>/dev/null || "$repo/.venv/bin/pip" install -q "psycopg[binary]>=3.2,<4"

step "self-check: mount namespace with overlay /etc"
t=$(mktemp -d "$work/probe.XXXX")
mkdir -p "$t/etc"; echo ok > "$t/etc/greenmail-bench-probe"
"$here/mntns.sh" "$t/etc" - - cat /etc/greenmail-bench-probe >/dev/null
[ ! -e /etc/greenmail-bench-probe ]
rm -rf "$t"

step "versions"
dpkg-query -W -f='   ${Package} ${Version}\n' postfix
"$repo/.venv/bin/python" -c 'import greenmail, gevent, sys; print("   greenmail", greenmail.__version__, "gevent", gevent.__version__, "python", sys.version.split()[0])'
echo "ready: $here/run.py smoke   (or: $here/run.py all)"
