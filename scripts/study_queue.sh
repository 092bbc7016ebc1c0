#!/bin/bash
# The long studies in one queue on frozen code (git worktrees of the commits that made their
# earlier runs), for a developer machine: privacy, then chat, then Shakespeare; each resumes.
# Worktrees: git worktree add --detach /work/privsnap 42d74b0; git worktree add --detach /work/chatsnap 5ecf8d6
# Waits for the running privacy compare, then: privacy (snapshot 42d74b0), chat and Shakespeare
# (snapshot 5ecf8d6), each with main's config file (main's configs add points after the snapshots).
set -u
PY=/work/main/.venv/bin/python
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2
while pgrep -f 'hetlora.cli import main' >/dev/null; do sleep 20; done
seed_runs() {
  mkdir -p "$2"
  (cd "$1" && for done in $(find . -name summary.json); do run=$(dirname $done);
     [ -e "$2/$run" ] || { mkdir -p "$2/$run" && cp $run/metrics.jsonl $run/summary.json $run/config.toml "$2/$run/"; }; done)
}
run_study() { # $1 snapshot, $2 config (in main), $3 out, $4 docs
  seed_runs /work/main/$4 /work/main/$3
  cp /work/main/$2 /work/queue-$(basename $2)
  cd $1 && PYTHONPATH=$1/src nice -n 10 $PY -c "import sys; from hetlora.cli import main; sys.exit(main())" \
     compare --config /work/queue-$(basename $2) --out /work/main/$3 --resume
  echo "== $2 finished rc=$? at $(date)"
}
echo "start $(date)"
run_study /work/privsnap configs/privacy.toml runs/privacy docs/privacy
run_study /work/chatsnap configs/paper-chat.toml runs/paper-chat docs/reproduction/paper-chat
run_study /work/chatsnap configs/paper.toml runs/paper docs/reproduction/paper
