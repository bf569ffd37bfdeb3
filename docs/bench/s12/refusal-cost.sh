#!/bin/bash
# Front runtime CPU per request at 4,000 offered: docs/bench/s12/refusal-cost.sh BIN OUT_PREFIX,
# run from a scratch folder; prints accepted and refused per second and the front threads' CPU.
BIN=$1; OUT=$2
HERE=$(cd "$(dirname "$0")" && pwd)
(python3 "$HERE/threads.py" 8 6 > $OUT.threads &)
$BIN bench --local --rates 4000 --duration 16 --quiet --out $OUT.json > $OUT.log 2>&1
python3 - $OUT <<'PY'
import json,sys
o=sys.argv[1]; s=json.load(open(o+'.json'))['steps'][0]
t={l.split()[0]:float(l.split()[4]) for l in open(o+'.threads') if 'cores' in l and not l.startswith('total')}
ref=s['refused']/16
print(f"{o.split('/')[-1]}: accepted {s['achieved_per_s']:.0f}/s p99 {s['p99_ms']:.0f} refused {ref:.0f}/s rp99 {s['refused_p99_ms']:.0f} | front {t.get('raftchat-front',0):.3f} workers {t.get('tokio-rt-worker',0):.3f} cores | front us per request {1e6*t.get('raftchat-front',0)/(ref+s['achieved_per_s']):.0f}")
PY
