#!/bin/bash
# Starts one launcher per node of a Slurm allocation; called by the sbatch scripts in this folder
# (and by the ones `python -m launcher cluster=slurm` renders). Arguments are launcher overrides.
#
# - master address: the allocation's first host (its NodeAddr); port: derived from the job id (same on every node)
# - node rank: SLURM_NODEID of each srun task; nodes: SLURM_NNODES
# - run_dir: runs/<job name>-<job id> unless given, so a requeued job finds its checkpoints; run_name: its name
# - resume=auto unless given: a requeued (or resubmitted) job continues from the newest complete checkpoint
# - the warning signal (sbatch --signal=B:USR1@...) writes <run_dir>/STOP: every rank checkpoints at the end
#   of its step and exits 75, and the job requeues itself
set -uo pipefail
# The Python that runs the launcher: LAUNCHER_PYTHON, else that of the environment this file belongs to, else python3
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
case $here in
  */lib/python3*/*-packages/launcher/slurm) env_py=${here%/lib/python3*}/bin/python3 ;;  # installed: <env>/lib/...
  *) env_py=$(dirname "$here")/.venv/bin/python ;;  # a checkout: its .venv
esac
py=${LAUNCHER_PYTHON:-$env_py}
command -v "$py" >/dev/null || py=python3

args=("$@")
value_of() {  # the last KEY=value among the arguments
  local v=""
  for a in "${args[@]}"; do case $a in "$1="*) v=${a#"$1="};; esac; done
  printf '%s' "$v"
}
run_dir=${LAUNCHER_RUN_DIR:-$(value_of run_dir)}  # a rendered job.sbatch exports the plain path
if [ -z "$run_dir" ]; then run_dir="runs/${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID}"; args+=("run_dir=$run_dir"); fi
# one run_name on every node (its default is a time stamp each node would take for itself): the run_dir's name
name=$(basename "$run_dir")
if [ -z "$(value_of run_name)" ] && [[ $name =~ ^[A-Za-z0-9._-]+$ ]]; then args+=("run_name=$name"); fi
[ -n "$(value_of resume)" ] || args+=("resume=auto")
first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# the first node's address as Slurm reaches it (NodeAddr), which every node can resolve; its name otherwise
master=$(scontrol show node "$first" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
master=${master:-$first}
port=$((20000 + SLURM_JOB_ID % 20000))
stop_file="$run_dir/STOP"
rm -f "$stop_file" "$run_dir/STOPPED"

echo "launcher(slurm): job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_NNODES node(s), master $master:$port, run_dir $run_dir"
trap 'echo "launcher(slurm): warning signal: checkpoint, then requeue"; mkdir -p "$run_dir"; touch "$stop_file"' USR1

# One task per node; each starts the launcher with its own node rank. Arguments travel as arguments,
# never through a shell string, so a value with spaces or $(...) stays a value.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
  bash -c 'exec "$0" -m launcher "$@" node_rank="$SLURM_NODEID"' \
  "$py" "${args[@]}" nodes="$SLURM_NNODES" master_addr="$master" master_port="$port" &
pid=$!
while true; do  # `wait` returns early when the trap runs: keep waiting for srun itself
  wait "$pid" && rc=0 || rc=$?
  kill -0 "$pid" 2>/dev/null || break
done

# 75: stopped at a checkpoint. On several nodes srun may report another code: the first node's 75 ends the step
# (--kill-on-bad-exit) while the others are still exiting; rank 0's STOPPED marker says the checkpoint is complete.
if [ "$rc" -eq 75 ] || { [ -f "$stop_file" ] && [ -f "$run_dir/STOPPED" ]; }; then
  echo "launcher(slurm): stopped at a checkpoint; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
