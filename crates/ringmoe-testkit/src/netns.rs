//! A test network of the test's own hosts: one Linux network namespace per host, each with one
//! interface (`eth0`) and its own IPv4 address, all plugged into a bridge that lives in a
//! namespace of its own; the test process itself (in the root namespace) joins the bridge
//! through one more veth, so it can reach every host as a client would. Nothing else is
//! touched: every address, route and interface is on the test's own veths, and everything is
//! deleted when the [`TestNet`] is dropped, also when the test fails (`ip netns list` shows
//! nothing of it afterwards).
//!
//! Faults: a host's link down and up ([`TestNet::link_down`], a partition of that host from
//! everyone, established connections stalling rather than reset), and a pair of hosts cut off
//! from each other only ([`TestNet::isolate`], blackhole routes on both sides).
//!
//! Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and `ip` from iproute2 (`scripts/test.sh`
//! installs it); without them [`TestNet::new`] fails saying so — a test never skips.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// One host of a [`TestNet`].
#[derive(Debug, Clone)]
pub struct Host {
    /// Its network namespace.
    pub ns: String,
    /// Its address on the test network.
    pub addr: Ipv4Addr,
    /// The bridge-side end of its veth (in the bridge's namespace).
    port: String,
}

/// The test's network (see the module docs).
#[derive(Debug)]
pub struct TestNet {
    prefix: String,
    bridge_ns: String,
    root_veth: String,
    /// The test process's own address on the network.
    pub client: Ipv4Addr,
    pub hosts: Vec<Host>,
}

fn ip(args: &[&str]) -> std::io::Result<()> {
    let out = Command::new("ip").args(args).output().map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("running `ip` (install iproute2; scripts/test.sh does): {e}"),
        )
    })?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "ip {}: {} (network namespaces need root: CAP_NET_ADMIN and CAP_SYS_ADMIN)",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

impl TestNet {
    /// `n` hosts, addresses `10.A.B.1` … `10.A.B.n` (A.B unique to this process and call),
    /// the test process at `10.A.B.254`.
    pub fn new(n: usize) -> std::io::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        if n == 0 || n > 200 {
            return Err(std::io::Error::other(format!("{n} hosts: want 1 to 200")));
        }
        let id = (std::process::id() % 10_000) * 8 + NEXT.fetch_add(1, Ordering::Relaxed) % 8;
        let prefix = format!("rm{id}");
        let (a, b) = (200 + (id / 256) % 50, id % 256);
        let subnet = |host: u32| Ipv4Addr::new(10, a as u8, b as u8, host as u8);
        let mut net = Self {
            bridge_ns: format!("{prefix}-br"),
            root_veth: format!("{prefix}r"),
            client: subnet(254),
            hosts: Vec::new(),
            prefix,
        };
        // From here on, Drop removes whatever was made, also after an error.
        net.build(n, subnet)?;
        Ok(net)
    }

    fn build(&mut self, n: usize, subnet: impl Fn(u32) -> Ipv4Addr) -> std::io::Result<()> {
        let br = self.bridge_ns.clone();
        ip(&["netns", "add", &br])?;
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        ip(&["-n", &br, "link", "set", "lo", "up"])?;
        for i in 0..n {
            let ns = format!("{}-h{i}", self.prefix);
            let port = format!("p{i}");
            let addr = subnet(i as u32 + 1);
            ip(&["netns", "add", &ns])?;
            self.hosts.push(Host {
                ns: ns.clone(),
                addr,
                port: port.clone(),
            });
            ip(&[
                "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &br, "link", "set", &port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let rv = self.root_veth.clone();
        ip(&[
            "link", "add", &rv, "type", "veth", "peer", "name", "root", "netns", &br,
        ])?;
        ip(&["-n", &br, "link", "set", "root", "master", "br0", "up"])?;
        ip(&["addr", "add", &format!("{}/24", self.client), "dev", &rv])?;
        ip(&["link", "set", &rv, "up"])?;
        Ok(())
    }

    /// `program` to run inside host `i`'s namespace (`ip netns exec`, which execs it: the
    /// child's pid is the program's, so killing or stopping it reaches the program).
    pub fn command(&self, i: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i].ns, program]);
        c
    }

    /// Takes host `i`'s link down: it is cut off from every other host and from the test;
    /// connections to it stall (no reset), as in a real partition.
    pub fn link_down(&self, i: usize) -> std::io::Result<()> {
        ip(&[
            "-n",
            &self.bridge_ns,
            "link",
            "set",
            &self.hosts[i].port,
            "down",
        ])
    }

    /// Brings host `i`'s link back up (heals [`TestNet::link_down`]).
    pub fn link_up(&self, i: usize) -> std::io::Result<()> {
        ip(&[
            "-n",
            &self.bridge_ns,
            "link",
            "set",
            &self.hosts[i].port,
            "up",
        ])
    }

    /// Cuts hosts `a` and `b` off from each other only (packets between them are dropped
    /// silently); both still reach everyone else.
    pub fn isolate(&self, a: usize, b: usize) -> std::io::Result<()> {
        self.blackholes("add", a, b)
    }

    /// Undoes [`TestNet::isolate`].
    pub fn reconnect(&self, a: usize, b: usize) -> std::io::Result<()> {
        self.blackholes("del", a, b)
    }

    /// Adds or deletes (`op`) the blackhole routes between hosts `a` and `b`, both ways.
    fn blackholes(&self, op: &str, a: usize, b: usize) -> std::io::Result<()> {
        for (from, to) in [(a, b), (b, a)] {
            let (ns, dst) = (&self.hosts[from].ns, self.hosts[to].addr);
            ip(&["-n", ns, "route", op, "blackhole", &format!("{dst}/32")])?;
        }
        Ok(())
    }

    /// The namespaces of this network that still exist (none after drop).
    pub fn namespaces_left(prefix: &str) -> std::io::Result<Vec<String>> {
        let out = Command::new("ip").args(["netns", "list"]).output()?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&format!("{prefix}-")))
            .map(str::to_string)
            .collect())
    }

    /// This network's name prefix (its namespaces are `PREFIX-br`, `PREFIX-h0`, …).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        // Deleting a namespace deletes its interfaces, and a veth goes with either end.
        let _ = ip(&["link", "del", &self.root_veth]);
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["netns", "del", &self.bridge_ns]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two hosts reach each other and the test; a downed link and an isolated pair do not;
    /// nothing is left behind.
    #[test]
    fn hosts_reach_each_other_until_cut_off_and_nothing_is_left_behind() -> std::io::Result<()> {
        let prefix;
        {
            let net = TestNet::new(3)?;
            prefix = net.prefix().to_string();
            let reaches = |from: usize, to: Ipv4Addr| -> std::io::Result<bool> {
                Ok(net
                    .command(from, "ping")
                    .args(["-c", "1", "-W", "1", &to.to_string()])
                    .output()?
                    .status
                    .success())
            };
            let (h1, h2) = (net.hosts[1].addr, net.hosts[2].addr);
            assert!(reaches(0, h1)? && reaches(0, h2)? && reaches(1, h2)?);
            assert!(
                reaches(0, net.client)?,
                "the test process is on the network"
            );
            net.isolate(1, 2)?;
            assert!(!reaches(1, h2)? && reaches(0, h2)? && reaches(0, h1)?);
            net.reconnect(1, 2)?;
            assert!(reaches(1, h2)?);
            net.link_down(2)?;
            assert!(!reaches(0, h2)? && reaches(0, h1)?);
            net.link_up(2)?;
            assert!(reaches(0, h2)?);
        }
        assert_eq!(TestNet::namespaces_left(&prefix)?, Vec::<String>::new());
        Ok(())
    }
}
