#!/bin/bash
# Paired A/B of the e2e benchmark: base (a78595b, before issue 18) vs main, order ABBA, alone on the machine.
for step in base:1 main:1 main:2 base:2; do
  code=${step%%:*}; round=${step##*:}
  cd /work/$code
  echo "$(date -u +%H:%M:%S) start $code round $round load $(cut -d' ' -f1-3 /proc/loadavg)" >> /tmp/ab/log
  PYTHONPATH=/work/$code /work/venv/bin/python jobs/benchmark.py --only e2e --json /tmp/ab/${code}_${round}.json > /tmp/ab/${code}_${round}.out 2>&1
  echo "$(date -u +%H:%M:%S) end $code round $round rc $? load $(cut -d' ' -f1-3 /proc/loadavg)" >> /tmp/ab/log
done
echo done >> /tmp/ab/log
