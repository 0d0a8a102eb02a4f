#!/usr/bin/env bash
# Called by tests/run.sh before pytest: make SLURM + munge available (apt-get install, idempotent,
# about 15 s the first time). The cluster itself is started and stopped by the tests' session
# fixture (tests/slurm/cluster.py -> start.sh / stop.sh, well under a second each).
# Exit 0 = SLURM can be used; run.sh then exports LONGCAT_REQUIRE_SLURM=1 so that the SLURM tests
# fail rather than skip if the cluster does not come up.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/install.sh"
