#!/bin/bash
# Intermediate privacy-study tables while scripts/study_queue.sh runs: the finished runs copied to
# /tmp/privrep, the snapshot's comparison.json with the main-code "HomLoRA r=4, no DP" rows put
# back (the snapshot pass writes it without them), hetlora report and tools/privacy_report.py
# there, the results copied into docs/privacy. The study's end: make privacy-results.
set -e
cd "$(dirname "$0")/.."
docs=$PWD/docs/privacy
rm -rf /tmp/privrep && mkdir -p /tmp/privrep
(cd runs/privacy && for done in $(find . -name summary.json); do run=$(dirname $done);
   mkdir -p /tmp/privrep/$run && cp $run/metrics.jsonl $run/summary.json $run/config.toml /tmp/privrep/$run/; done)
.venv/bin/python - <<'PY'
import json
m = json.load(open("runs/privacy/comparison.json"))["runs"]
if not any(r["name"] == "HomLoRA r=4, no DP" for r in m):
    at = next(i for i, r in enumerate(m) if r["name"] == "HomLoRA r=4 data-size weights, no DP")
    m[at:at] = [{"name": "HomLoRA r=4, no DP", "dir": f"homlora-r-4-no-dp/seed-{s}", "method": "homlora", "group": "", "seed": s} for s in (0, 1)]
json.dump({"runs": m}, open("/tmp/privrep/comparison.json", "w"), indent=2)
open("/tmp/privrep/comparison.json", "a").write("\n")
PY
nice .venv/bin/hetlora report /tmp/privrep > /tmp/privrep.log 2>&1
nice .venv/bin/python tools/privacy_report.py /tmp/privrep >> /tmp/privrep.log 2>&1
cp /tmp/privrep/*.csv /tmp/privrep/*.md /tmp/privrep/comparison.json /tmp/privrep/*.png docs/privacy/
(cd /tmp/privrep && for done in $(find . -name summary.json); do run=$(dirname $done);
   mkdir -p "$docs/$run" && cp $run/metrics.jsonl $run/summary.json $run/config.toml "$docs/$run/"; done)
echo done
