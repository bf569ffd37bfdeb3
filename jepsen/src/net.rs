//! The test network: one Linux network namespace per node, each with a veth on a bridge
//! in the root namespace (`10.77.0.1/24`), node `i` at `10.77.0.(11 + i)`. The harness's
//! clients live in the root namespace and reach every node; partitions drop packets
//! between nodes with iptables inside the nodes' namespaces, as Jepsen does.

use anyhow::{bail, Context};
use std::process::Command;

pub const BRIDGE: &str = "rcjbr0";
const SUBNET: &str = "10.77.0";

pub fn sh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fails with a clear message unless we are root with `ip` and `iptables`.
pub fn preflight() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the harness needs root: it creates network namespaces, a bridge and iptables rules. Run it as root (e.g. `sudo -E cargo run -p jepsen -- test ...`)");
    }
    for tool in ["ip", "iptables"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("`{tool}` not found: install iproute2 and iptables (apt-get install iproute2 iptables)");
        }
    }
    Ok(())
}

/// The root-namespace end of node `i`'s veth pair.
fn veth(i: usize) -> String {
    format!("rcj-v{}", i + 1)
}

#[derive(Debug, Clone)]
pub struct Net {
    pub nodes: usize,
}

impl Net {
    pub fn ip(&self, i: usize) -> String {
        format!("{SUBNET}.{}", 11 + i)
    }
    pub fn ns(&self, i: usize) -> String {
        format!("rcj-n{}", i + 1)
    }

    /// Creates the bridge and the namespaces (removing leftovers of an earlier run first).
    pub fn setup(&self) -> anyhow::Result<()> {
        self.teardown();
        sh(&["ip", "link", "add", BRIDGE, "type", "bridge"])?;
        sh(&["ip", "addr", "add", &format!("{SUBNET}.1/24"), "dev", BRIDGE])?;
        sh(&["ip", "link", "set", BRIDGE, "up"])?;
        // Docker's FORWARD policy is DROP; let our bridge forward between its ports.
        sh(&["iptables", "-I", "FORWARD", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT"])?;
        for i in 0..self.nodes {
            let ns = self.ns(i);
            let veth = veth(i);
            sh(&["ip", "netns", "add", &ns])?;
            sh(&["ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            sh(&["ip", "link", "set", &veth, "master", BRIDGE, "up"])?;
            sh(&["ip", "netns", "exec", &ns, "ip", "addr", "add", &format!("{}/24", self.ip(i)), "dev", "eth0"])?;
            sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "eth0", "up"])?;
            sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// Removes everything `setup` made; ignores what is already gone.
    ///
    /// The kernel destroys a deleted namespace (and the veth end inside it) asynchronously,
    /// so the root-side veth ends are deleted explicitly (a synchronous `ip link del`, which
    /// removes both ends): otherwise the next `setup` can find `rcj-v<i>` still there
    /// ("File exists").
    pub fn teardown(&self) {
        for i in 0..self.nodes.max(9) {
            let _ = sh(&["ip", "link", "del", &veth(i)]);
            let _ = sh(&["ip", "netns", "del", &self.ns(i)]);
        }
        let _ = sh(&["ip", "link", "del", BRIDGE]);
        while sh(&["iptables", "-D", "FORWARD", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT"]).is_ok() {}
    }

    /// Cuts every link between nodes of different groups (nodes in no group keep all links).
    pub fn partition(&self, groups: &[Vec<usize>]) -> anyhow::Result<()> {
        let group_of = |n: usize| groups.iter().position(|g| g.contains(&n));
        let mut cuts = Vec::new();
        for a in 0..self.nodes {
            for b in 0..self.nodes {
                if let (Some(x), Some(y)) = (group_of(a), group_of(b)) {
                    if a != b && x != y {
                        cuts.push((a, b));
                    }
                }
            }
        }
        self.cut(&cuts)
    }

    /// Drops packets from `b` arriving at `a` for each `(a, b)`.
    pub fn cut(&self, links: &[(usize, usize)]) -> anyhow::Result<()> {
        for (a, b) in links {
            sh(&["ip", "netns", "exec", &self.ns(*a), "iptables", "-A", "INPUT", "-s", &self.ip(*b), "-j", "DROP"])?;
        }
        Ok(())
    }

    pub fn heal(&self) -> anyhow::Result<()> {
        for i in 0..self.nodes {
            sh(&["ip", "netns", "exec", &self.ns(i), "iptables", "-F", "INPUT"])?;
        }
        Ok(())
    }
}

/// Jepsen's "majorities ring": every node sees a majority (itself and its nearest ring
/// neighbours) but no two nodes see the same majority. Returns the links to cut.
pub fn majorities_ring(order: &[usize]) -> Vec<(usize, usize)> {
    let n = order.len();
    let reach = (n / 2) / 2 + (n / 2) % 2; // neighbours on each side
    let mut cuts = Vec::new();
    for (ia, a) in order.iter().enumerate() {
        for (ib, b) in order.iter().enumerate() {
            let d = (ia as isize - ib as isize).unsigned_abs();
            let ring = d.min(n - d);
            if a != b && ring > reach {
                cuts.push((*a, *b));
            }
        }
    }
    cuts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_gives_every_node_a_distinct_majority() {
        let order = [0, 1, 2, 3, 4];
        let cuts = majorities_ring(&order);
        let sees = |a: usize| (0..5).filter(|b| !cuts.contains(&(a, *b))).collect::<Vec<_>>();
        let views: Vec<Vec<usize>> = (0..5).map(sees).collect();
        for v in &views {
            assert_eq!(v.len(), 3, "{views:?}");
        }
        let mut d = views.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), 5, "distinct majorities: {views:?}");
    }
}
