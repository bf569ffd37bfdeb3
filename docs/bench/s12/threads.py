import os, sys, time, collections
def snap():
    out = {}
    for pid in os.listdir('/proc'):
        if not pid.isdigit(): continue
        try:
            cmd = open(f'/proc/{pid}/cmdline','rb').read().split(b'\0')
        except Exception: continue
        if len(cmd) < 2 or not cmd[0].endswith(b'raftchat') or cmd[1] != b'serve': continue
        for tid in os.listdir(f'/proc/{pid}/task'):
            try:
                st = open(f'/proc/{pid}/task/{tid}/stat').read()
                name = st[st.index('(')+1:st.rindex(')')]
                f = st[st.rindex(')')+2:].split()
                cpu = int(f[11]) + int(f[12])
                sw = 0
                for l in open(f'/proc/{pid}/task/{tid}/status'):
                    if 'ctxt_switches' in l: sw += int(l.split()[1])
                out[(pid, tid)] = (name, cpu, sw)
            except Exception: pass
    return out
delay, dur = float(sys.argv[1]), float(sys.argv[2])
time.sleep(delay)
a = snap(); t0 = time.time(); time.sleep(dur); b = snap(); dt = time.time() - t0
agg = collections.defaultdict(lambda: [0, 0, 0])
for k, (n, c, s) in b.items():
    if k in a:
        n0, c0, s0 = a[k]
        g = agg[n]; g[0] += (c - c0) / 100 / dt; g[1] += (s - s0) / dt; g[2] += 1
tot = sum(v[0] for v in agg.values()); tsw = sum(v[1] for v in agg.values())
for n, (c, s, k) in sorted(agg.items(), key=lambda x: -x[1][0]):
    if c > 0.005 or s > 50:
        print(f'{n:24s} threads {k:3d}  cores {c:5.3f}  switches/s {s:8.0f}')
print(f'total cores {tot:.3f} switches/s {tsw:.0f}')
