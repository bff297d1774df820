#!/usr/bin/env bash
# Stop the single-node cluster of scripts/slurm-up.sh: slurmd, slurmctld, slurmdbd, then the MariaDB and
# munged it started, each by its PID file. Removes the /etc/slurm links to profiles/slurm/cluster/;
# keeps job state and accounting (/var/lib/tunelab-slurm, MariaDB), so the next slurm-up.sh resumes.
set -euo pipefail
RUN=/run/tunelab-slurm

stop() {  # stop NAME PIDFILE: SIGTERM, then wait up to 30 s for the process to exit
  local pid
  [ -s "$2" ] && pid=$(cat "$2") && kill -0 "$pid" 2>/dev/null || return 0
  kill "$pid"
  for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || { echo "slurm-down: stopped $1" >&2; return 0; }; sleep 0.25; done
  echo "slurm-down: error: $1 (pid $pid) still running after 30 s" >&2
  return 1
}

stop slurmd "$RUN/slurmd.pid"
stop slurmctld "$RUN/slurmctld.pid"
stop slurmdbd "$RUN/slurmdbd.pid"
# Only a MariaDB that slurm-up.sh started logs to its directory; a system one (systemd) is left alone.
if [ -s /run/mysqld/mysqld.pid ] && grep -qs tunelab-slurm "/proc/$(cat /run/mysqld/mysqld.pid)/cmdline"; then
  stop mariadbd /run/mysqld/mysqld.pid
fi
[ -d /run/systemd/system ] || stop munged /run/munge/munged.pid
# slurm.conf and gres.conf are links to the repo's files, slurmdbd.conf a copy (slurmdbd wants it owned by slurm).
for conf in slurm.conf gres.conf; do
  case "$(readlink "/etc/slurm/$conf" 2>/dev/null)" in */profiles/slurm/cluster/"$conf") rm -f "/etc/slurm/$conf" ;; esac
done
grep -qs '^StoragePass=tunelab-local$' /etc/slurm/slurmdbd.conf && rm -f /etc/slurm/slurmdbd.conf
