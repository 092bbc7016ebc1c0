#!/bin/bash
# The long studies in one queue on frozen code (git worktrees of the commits that made their
# earlier runs), for a developer machine: privacy, then chat, then Shakespeare; each resumes.
# Worktrees: git worktree add --detach /work/privsnap 42d74b0; git worktree add --detach /work/chatsnap 5ecf8d6
# Waits for a running compare, then: privacy (snapshot 42d74b0; its rows with
# aggregation = "uniform" on HomLoRA, which 42d74b0 refuses, run on main's code), chat and
# Shakespeare (snapshot 5ecf8d6), each with main's config file (main's configs add points after
# the snapshots). A last pass of each study on main's code writes comparison.json over every row.
set -u
PY=/work/main/.venv/bin/python
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2
while pgrep -f 'hetlora.cli import main' >/dev/null; do sleep 20; done
seed_runs() {
  mkdir -p "$2"
  (cd "$1" && for done in $(find . -name summary.json); do run=$(dirname $done);
     [ -e "$2/$run" ] || { mkdir -p "$2/$run" && cp $run/metrics.jsonl $run/summary.json $run/config.toml "$2/$run/"; }; done)
}
compare() { # $1 code tree, $2 config file, $3 out
  (cd $1 && PYTHONPATH=$1/src nice -n 10 $PY -c "import sys; from hetlora.cli import main; sys.exit(main())" \
     compare --config $2 --out /work/main/$3 --resume)
  local rc=$?
  echo "== $2 on $1 finished rc=$rc at $(date)"
  return $rc
}
# Rows for main's code: HomLoRA rows that set aggregation (the snapshots refuse the key), with
# every row of their tuning group; $1 1 keeps those, 0 the others. Blocks are cut at each
# [[compare]] line and each read as TOML, so comments and quoting do not decide.
split_config() {
  $PY - "$1" "$2" "$3" <<'PY'
import re, sys, tomllib
keep, src, dst = sys.argv[1] == "1", sys.argv[2], sys.argv[3]
head, *blocks = re.split(r"(?m)^(?=\[\[compare\]\])", open(src).read())
rows = [tomllib.loads(b)["compare"][0] for b in blocks]
new = lambda r: r.get("method") == "homlora" and "aggregation" in r
groups = {r.get("group") or r["name"] for r in rows if new(r)}
picked = [b for b, r in zip(blocks, rows) if ((r.get("group") or r["name"]) in groups) == keep]
open(dst, "w").write(head + "".join(picked))
PY
}
run_study() { # $1 snapshot, $2 config (in main), $3 out, $4 docs
  seed_runs /work/main/$4 /work/main/$3
  local base=/work/queue-$(basename $2 .toml)
  cp /work/main/$2 $base.toml
  split_config 1 $base.toml $base-main.toml
  split_config 0 $base.toml $base-snap.toml
  if grep -q '^\[\[compare\]\]' $base-main.toml; then
    compare /work/main $base-main.toml $3 || return
    if grep -q '^\[\[compare\]\]' $base-snap.toml; then compare $1 $base-snap.toml $3 || return; fi
    compare /work/main $base.toml $3  # trains nothing: every row has run
  else
    compare $1 $base.toml $3
  fi
}
echo "start $(date)"
run_study /work/privsnap configs/privacy.toml runs/privacy docs/privacy
run_study /work/chatsnap configs/paper-chat.toml runs/paper-chat docs/reproduction/paper-chat
run_study /work/chatsnap configs/paper.toml runs/paper docs/reproduction/paper
