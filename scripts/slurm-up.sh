#!/usr/bin/env bash
# Bring up a real single-node SLURM 22.05 cluster on this machine (Debian/Ubuntu, as root, no systemd needed):
# munge, MariaDB + slurmdbd (so `sacct` works), slurmctld and slurmd. The node is `localhost`, with the
# static config in profiles/slurm/cluster/. Idempotent: installs only missing packages, starts only
# daemons that are not running, and returns once `srun true` works. Stop it with scripts/slurm-down.sh.
#   bash scripts/slurm-up.sh && snakemake --profile profiles/slurm --config study=studies/tiny.yaml
# Exit status 75 means the packages are missing and apt could not install them (e.g. offline).
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER="$PWD/profiles/slurm/cluster"
STATE=/var/lib/tunelab-slurm RUN=/run/tunelab-slurm LOG=/var/log/tunelab-slurm
PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)

say() { echo "slurm-up: $*" >&2; }
die() { say "error: $*"; exit 1; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll every 0.25 s
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "$what not ready after ${deadline}s; see $LOG/"
    sleep 0.25
  done
}

[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and starts daemons)"

missing=()
for package in "${PACKAGES[@]}"; do
  dpkg-query -W -f '${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  # The postinst scripts try to start services through invoke-rc.d; without systemd that is refused, harmlessly.
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null; }; then
    say "error: apt-get could not install ${missing[*]} (no network to the apt mirror?)"
    exit 75
  fi
fi

# slurm.conf's node has 2 CPUs; the tiny study needs 4000 MB of memory (slurm.conf schedules with 8000).
read -r cpus memory < <(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*RealMemory=\([0-9]*\).*/\1 \2/p')
[ "${cpus:-0}" -ge 2 ] && [ "${memory:-0}" -ge 4000 ] ||
  die "this machine has ${cpus:-?} CPUs and ${memory:-?} MB; the local cluster needs 2 CPUs and 4000 MB"

install -d -o slurm -g slurm "$STATE/ctld" "$LOG" "$RUN"
install -d "$STATE/d"
install -d /etc/slurm
ln -sfn "$CLUSTER/slurm.conf" /etc/slurm/slurm.conf
ln -sfn "$CLUSTER/gres.conf" /etc/slurm/gres.conf
install -o slurm -g slurm -m 600 "$CLUSTER/slurmdbd.conf" /etc/slurm/slurmdbd.conf

# munge: systemd's RuntimeDirectory would normally create /run/munge.
if ! alive /run/munge/munged.pid; then
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
fi
wait_for 10 munged sh -c 'munge -n | unmunge'

# MariaDB: reuse a running server (a laptop's), else start the one the package initialised.
if ! mariadb-admin ping >/dev/null 2>&1; then
  install -d -o mysql -g mysql /run/mysqld "$LOG/mysql"
  nohup /usr/sbin/mariadbd --user=mysql --log-error="$LOG/mysql/mariadb.err" >/dev/null 2>&1 &
  wait_for 30 MariaDB mariadb-admin ping
fi
mariadb <<'SQL'
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'tunelab-local';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL

alive "$RUN/slurmdbd.pid" || /usr/sbin/slurmdbd
wait_for 30 slurmdbd sacctmgr -n list cluster
alive "$RUN/slurmctld.pid" || /usr/sbin/slurmctld
alive "$RUN/slurmd.pid" || /usr/sbin/slurmd -N localhost
wait_for 60 "the node" sh -c 'sinfo -h -n localhost -o %T | grep -Eqx "idle|mixed|allocated"'
wait_for 60 "srun" srun --time=1 true
say "up: $(sinfo -h -o '%P %D %T %C') (partition nodes state CPUs A/I/O/T); logs in $LOG"
