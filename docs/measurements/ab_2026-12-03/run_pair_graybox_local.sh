#!/bin/bash
for code in base main; do
  cd /work/$code
  echo "$(date -u +%H:%M:%S) start $code load $(cut -d' ' -f1-3 /proc/loadavg)" >> /tmp/ab/diag.log
  PYTHONPATH=/work/$code /work/venv/bin/python jobs/benchmark.py --only e2e --preset gray-box --source local --json /tmp/ab/diag_${code}.json > /tmp/ab/diag_${code}.out 2>&1
  echo "$(date -u +%H:%M:%S) end $code rc $?" >> /tmp/ab/diag.log
done
