#!/usr/bin/env bash
# Side by side: the evaluation before (commit 64b2ba9, checked out in /tmp/old) and after (f859e16 and on), same bank, same facts, one after the other.
set -e
ARGS="--bank /work/runs/bank_zo --methods r2f,exact_multiview,lora_mul --facts 2 --fact-offset 1 --neighbours 8 --sequential 0 --rap-steps 2 --mia-prompts 16"
PY=/work/main/.venv/bin/python
date
(cd /tmp/old && /usr/bin/time -v $PY benchmarks/unlearning.py $ARGS --out /work/runs/sbs_old) > /work/runs/sbs_old.log 2>&1
date
(cd /work/main && /usr/bin/time -v $PY benchmarks/unlearning.py $ARGS --out /work/runs/sbs_new) > /work/runs/sbs_new.log 2>&1
date
