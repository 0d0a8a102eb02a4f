#!/usr/bin/env bash
# Install SLURM + munge for the local test cluster (Debian/Ubuntu, root). Idempotent: does nothing
# when slurmctld, slurmd and munged are already installed. Exit 0 = installed, non-zero = could not.
set -euo pipefail
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
if have slurmctld && have slurmd && have munged && have sbatch; then
  echo "slurm + munge already installed"; exit 0
fi
[ "$(id -u)" = 0 ] || { echo "installing slurm needs root (apt-get)" >&2; exit 1; }
command -v apt-get >/dev/null || { echo "no apt-get on this machine: install slurm-wlm and munge by hand" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
# The package index may be missing in a fresh container; update only when the packages are unknown.
apt-cache show slurm-wlm >/dev/null 2>&1 || apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
have slurmctld && have slurmd && have munged && have sbatch
echo "slurm + munge installed"
