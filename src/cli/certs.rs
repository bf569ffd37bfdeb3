//! `raftchat certs`: a cluster CA and node certificates for TLS (see `crate::tls`).

use anyhow::{bail, Context};
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Folder for ca.pem/ca.key and <name>.pem/<name>.key (an existing CA there is reused).
    #[arg(long, default_value = "raftchat-tls")]
    pub dir: PathBuf,
    /// A certificate to make: NAME=ADDR[,ADDR...] with the IP addresses and DNS names the
    /// node is reached at, e.g. `--cert node1=10.0.0.1,chat1.example.org`. Repeat per node.
    #[arg(long = "cert", value_name = "NAME=ADDRS")]
    pub certs: Vec<String>,
    /// Print the SHA-256 fingerprint of a certificate (a line for `tls_revoked_file`).
    #[arg(long, value_name = "PEM")]
    pub fingerprint: Option<PathBuf>,
}

pub fn run(a: CertsArgs) -> anyhow::Result<()> {
    if let Some(p) = &a.fingerprint {
        println!("{}  # {}", crate::tls::fingerprint_file(p)?, p.display());
        return Ok(());
    }
    if a.certs.is_empty() {
        bail!("name the certificates to make: --cert node1=127.0.0.1 --cert node2=... (or --fingerprint FILE)");
    }
    let mut certs = Vec::new();
    for c in &a.certs {
        let (name, addrs) = c.split_once('=').with_context(|| format!("--cert {c:?}: expected NAME=ADDR[,ADDR...]"))?;
        let sans: Vec<String> = addrs.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        if sans.is_empty() {
            bail!("--cert {c:?}: give at least one address or DNS name");
        }
        certs.push((name.to_string(), sans));
    }
    for f in crate::tls::generate(&a.dir, &certs)? {
        println!("wrote {}", f.display());
    }
    println!(
        "node N needs tls_cert_file = <dir>/<name>.pem, tls_key_file = <dir>/<name>.key, tls_ca_file = <dir>/ca.pem; keep ca.key offline"
    );
    Ok(())
}
