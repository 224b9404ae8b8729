#!/bin/bash
# mntns.sh ETC USR SPOOL COMMAND [ARGS...]
#
# Runs COMMAND in a new mount namespace where
#   /etc        shows ETC layered read-only over the host's /etc,
#   /usr        shows USR layered read-only over the host's /usr,
#   /var/spool  is SPOOL (a bind mount).
# "-" leaves that one alone. The host's own mounts are not touched and the
# namespace disappears with COMMAND. This lets nullmailer and dma, whose
# paths (/etc/nullmailer, /usr/lib/nullmailer, /var/spool/...) are compiled
# in, run from `dpkg -x` trees next to an installed postfix.
set -e
[ $# -ge 4 ] || { echo "usage: mntns.sh ETC|- USR|- SPOOL|- COMMAND [ARGS...]" >&2; exit 2; }
exec unshare --mount --propagation private -- /bin/sh -ec '
etc=$1 usr=$2 spool=$3; shift 3
[ "$etc" = - ] || mount -t overlay gmbench-etc -o "lowerdir=$etc:/etc" /etc
[ "$usr" = - ] || mount -t overlay gmbench-usr -o "lowerdir=$usr:/usr" /usr
[ "$spool" = - ] || mount --bind "$spool" /var/spool
exec "$@"' mntns "$@"
