//! The benchmark's peer: a 3-member etcd cluster on loopback, started from the `etcd`
//! binary (Debian's `etcd-server`) with its data under a temporary folder, so that
//! raftchat and etcd are measured by the same generator in the same run.

use crate::etcdpb::kv_client::KvClient;
use crate::etcdpb::PutRequest;
use crate::fixture::free_port;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tonic::transport::Channel;

pub struct EtcdCluster {
    children: Vec<Child>,
    pub client_urls: Vec<String>,
    pub data_dirs: Vec<PathBuf>,
}

impl EtcdCluster {
    /// Starts `members` etcd processes under `dir` and waits until a put succeeds.
    pub async fn start(bin: &Path, dir: &Path, members: usize) -> anyhow::Result<Self> {
        let ports: Vec<(u16, u16)> =
            (0..members).map(|_| Ok((free_port()?, free_port()?))).collect::<anyhow::Result<_>>()?;
        let initial: Vec<String> =
            ports.iter().enumerate().map(|(i, (_, p))| format!("e{}=http://127.0.0.1:{p}", i + 1)).collect();
        let mut children = Vec::new();
        let mut client_urls = Vec::new();
        let mut data_dirs = Vec::new();
        for (i, (c, p)) in ports.iter().enumerate() {
            let data = dir.join(format!("e{}", i + 1));
            std::fs::create_dir_all(&data)?;
            let log = std::fs::File::create(dir.join(format!("e{}.log", i + 1)))?;
            let child = Command::new(bin)
                .arg("--name")
                .arg(format!("e{}", i + 1))
                .arg("--data-dir")
                .arg(&data)
                .arg("--listen-client-urls")
                .arg(format!("http://127.0.0.1:{c}"))
                .arg("--advertise-client-urls")
                .arg(format!("http://127.0.0.1:{c}"))
                .arg("--listen-peer-urls")
                .arg(format!("http://127.0.0.1:{p}"))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://127.0.0.1:{p}"))
                .arg("--initial-cluster")
                .arg(initial.join(","))
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--initial-cluster-token")
                .arg("raftchat-bench")
                .arg("--quota-backend-bytes")
                .arg((8u64 << 30).to_string())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {} (install Debian's etcd-server)", bin.display()))?;
            children.push(child);
            client_urls.push(format!("http://127.0.0.1:{c}"));
            data_dirs.push(data);
        }
        let cl = Self { children, client_urls, data_dirs };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match cl.clients().await {
                Ok(mut cs) => {
                    let probe = PutRequest { key: b"bench/probe".to_vec(), value: b"1".to_vec(), ..Default::default() };
                    if cs[0].put(probe).await.is_ok() {
                        return Ok(cl);
                    }
                }
                Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
                Err(_) => {}
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "etcd did not become ready within 30 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn clients(&self) -> anyhow::Result<Vec<KvClient<Channel>>> {
        let mut out = Vec::new();
        for u in &self.client_urls {
            let ch = Channel::from_shared(u.clone())?.tcp_nodelay(true).connect().await?;
            out.push(KvClient::new(ch));
        }
        Ok(out)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
