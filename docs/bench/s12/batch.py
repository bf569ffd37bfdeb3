import subprocess, re, time, sys, urllib.request
def ports():
    out = subprocess.run(['ss', '-ltnpH'], capture_output=True, text=True).stdout
    ps = sorted({int(m.group(1)) for l in out.splitlines() if 'raftchat' in l for m in [re.search(r':(\d+)\s', l)] if m})
    res=[]
    for p in ps:
        try:
            r = urllib.request.urlopen(f'http://127.0.0.1:{p}/metrics', timeout=1).read().decode()
            if 'admission_limit' in r: res.append(p)
        except Exception: pass
    return res
def snap(hs):
    s=c=0
    for p in hs:
        r = urllib.request.urlopen(f'http://127.0.0.1:{p}/metrics', timeout=2).read().decode()
        for l in r.splitlines():
            if l.startswith('raftchat_proposal_batch_size_sum'): s+=float(l.split()[-1])
            if l.startswith('raftchat_proposal_batch_size_count'): c+=float(l.split()[-1])
    return s,c
time.sleep(float(sys.argv[1])); hs=ports(); a=snap(hs); time.sleep(float(sys.argv[2])); b=snap(hs)
dc=b[1]-a[1]; ds=b[0]-a[0]
print(f'entries/s {dc/float(sys.argv[2]):.0f} commands/s {ds/float(sys.argv[2]):.0f} per entry {ds/max(dc,1):.2f}', end=' ')
