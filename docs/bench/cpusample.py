import os,time,sys
out=open(sys.argv[1],'w')
hz=os.sysconf('SC_CLK_TCK')
while True:
    tot={'node':0,'etcd':0,'gen':0}
    for p in os.listdir('/proc'):
        if not p.isdigit(): continue
        try:
            cmd=open(f'/proc/{p}/cmdline','rb').read().split(b'\0')
            st=open(f'/proc/{p}/stat').read().rsplit(')',1)[1].split()
        except Exception: continue
        t=(int(st[11])+int(st[12]))/hz
        exe=os.path.basename(cmd[0].decode(errors='replace')) if cmd and cmd[0] else ''
        if exe=='raftchat' and b'serve' in cmd: tot['node']+=t
        elif exe=='raftchat' and b'bench' in cmd: tot['gen']+=t
        elif exe=='etcd': tot['etcd']+=t
    out.write('%.1f %.2f %.2f %.2f\n'%(time.time(),tot['node'],tot['gen'],tot['etcd'])); out.flush()
    time.sleep(1)
