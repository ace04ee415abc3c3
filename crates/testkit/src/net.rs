//! Test hosts in network namespaces: each host is a namespace with one veth whose other end is
//! a port of a bridge in a switch namespace of its own, all made with iproute2 and removed when
//! the [`TestNet`] drops. Nothing touches the machine's own network: the hosts talk only to
//! each other, on 10.213.0.0/24. A partition takes a host's switch port down (its packets go
//! nowhere, as when a cable is pulled) and a mend brings it back.

use anyhow::{Context, bail};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One test host: its namespace's name and its address.
#[derive(Clone, Debug)]
pub struct Host {
    pub netns: String,
    pub ip: IpAddr,
}

impl Host {
    /// The namespace's file, for `nsenter --net=` and `setns`.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }
}

/// Several test hosts on one private switch.
pub struct TestNet {
    switch: String,
    hosts: Vec<Host>,
}

static NETS: AtomicUsize = AtomicUsize::new(0);

/// Runs `ip ARGS`; an error names the command and what it printed.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("run ip (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl TestNet {
    /// Makes `hosts` hosts, 10.213.0.1 upwards, all connected.
    pub fn new(hosts: usize) -> anyhow::Result<TestNet> {
        anyhow::ensure!((1..=200).contains(&hosts), "1 to 200 hosts, not {hosts}");
        let prefix = format!(
            "bfs{}x{}",
            std::process::id(),
            NETS.fetch_add(1, Ordering::Relaxed)
        );
        let mut net = TestNet {
            switch: format!("{prefix}sw"),
            hosts: Vec::new(),
        };
        // From here on, Drop removes whatever was made.
        ip(&["netns", "add", &net.switch])?;
        let sw = net.switch.clone();
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for i in 0..hosts {
            let host = Host {
                netns: format!("{prefix}h{i}"),
                ip: IpAddr::V4(Ipv4Addr::new(10, 213, 0, i as u8 + 1)),
            };
            ip(&["netns", "add", &host.netns])?;
            net.hosts.push(host.clone());
            let (port, nic) = (format!("s{i}"), format!("v{i}"));
            ip(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", &nic,
            ])?;
            ip(&["-n", &sw, "link", "set", &nic, "netns", &host.netns])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &sw, "link", "set", &port, "up"])?;
            let cidr = format!("{}/24", host.ip);
            ip(&["-n", &host.netns, "addr", "add", &cidr, "dev", &nic])?;
            ip(&["-n", &host.netns, "link", "set", &nic, "up"])?;
            ip(&["-n", &host.netns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// Cuts host `i` off from every other host.
    pub fn cut(&self, i: usize) -> anyhow::Result<()> {
        ip(&["-n", &self.switch, "link", "set", &format!("s{i}"), "down"])
    }

    /// Connects host `i` again.
    pub fn mend(&self, i: usize) -> anyhow::Result<()> {
        ip(&["-n", &self.switch, "link", "set", &format!("s{i}"), "up"])
    }

    /// Moves the calling thread into host `i`'s network: sockets it opens from then on, and
    /// threads it starts (a runtime's workers), are on that host.
    pub fn enter(&self, i: usize) -> anyhow::Result<()> {
        let path = self.hosts[i].netns_path();
        let f = std::fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("enter {}", path.display()))
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.netns]);
        }
        let _ = ip(&["netns", "del", &self.switch]);
    }
}
