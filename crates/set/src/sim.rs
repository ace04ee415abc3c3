//! A deterministic simulator of one set: members on nodes, clients, the metadata group's
//! epochs and failure detection, heal, leases and heartbeats, driven by one seeded random
//! source. The set's rules are the core's ([`crate::member`], [`crate::replica`],
//! [`crate::disperse`], [`crate::heal`], [`crate::lease`]); the simulator supplies the
//! network (drop, duplicate, delay and so reorder, partition), the disks (unsynced writes
//! lost at a crash, a full disk, a flipped bit that the member's checksums find on a read,
//! a copy or a scrub), crashes and pauses at any step.
//!
//! An oracle records the bytes of every version a primary makes and checks, after every
//! step: every read returns exactly the bytes of the version it names, and that version
//! contains every write acknowledged before the read began; a member's copy of a version
//! is the version's bytes (no copy, and no decode, ever combines versions); every member the
//! group counts in sync (and that is up and reported) holds every acknowledged write. At the
//! end, with faults over, every member heals and all copies agree.
//!
//! Model limits (stated, so that nobody reads more into a green run): the metadata group is
//! one linearizable actor whose operations take effect when a message reaches it; a
//! primary's reads and copies of other members (read-modify-write, repair, rollback, heal)
//! are immediate calls that fail when the member is down, paused, cut off or the call is
//! dropped, while mutation forwards travel as messages; at most one node is faulty (crashed,
//! paused, cut off, restarted, holding a flipped bit or not yet healed) at a time; disperse
//! sets are not truncated; a flipped bit counts as found by any read of the object (the
//! store checks blocks, not whole objects).

use crate::disperse::{self, Settle};
use crate::lease::Lease;
use crate::member::{self, Rule, Verdict};
use crate::replica::{Mutation, Step};
use crate::{ABSENT, Held, Refusal};
use brickfs_erasure::{ReedSolomonCodec, decode_stripes, encode_stripes};
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};

/// A protocol rule the simulator can be told to break, to show that its checks notice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutant {
    /// Members apply mutations of any epoch.
    NoFence,
    /// A member applies version v on top of any v-1 (not only the primary's).
    NoParentCheck,
    /// The lease runs from a heartbeat reply's arrival, not from its sending.
    LeaseFromReply,
    /// Members serve client reads whatever the group says of them.
    ReadsOutOfSync,
    /// A node back from a crash does not report its bricks before serving.
    NoRestartReport,
    /// Reconcile does not take members back to the version before a torn write (what they
    /// kept of it is ignored).
    NoUndo,
    /// The group takes a live member out of its set at once (a replace-brick) instead of
    /// first telling it to stop serving reads and waiting out the leases.
    NoDrain,
    /// Writes go on below the set's write quorum: clients do not check it and primaries do
    /// not refuse them.
    NoQuorum,
    /// Members do not check their blocks' checksums: a flipped bit on disk is served (and
    /// copied by heals) as the version's bytes, and no scrub finds it.
    NoChecksum,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Replica { members: usize },
    Disperse { k: usize, m: usize },
}

#[derive(Clone, Debug)]
pub struct Config {
    pub seed: u64,
    pub kind: Kind,
    /// Simulated milliseconds of faults and client work (then the set quiesces).
    pub duration_ms: u64,
    pub mutant: Option<Mutant>,
    /// How many of the last events a failure reports.
    pub trace_events: usize,
    /// Whether a forward may reach its member after the primary gave up on it (a long
    /// delay, a paused member). A disperse write that times out on members that then apply
    /// it can tear below K beyond what the primary's rollback undoes (see docs).
    pub late_forwards: bool,
    /// The set's write quorum (the volume's `quorum` option), when not the default.
    pub quorum: Option<usize>,
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub events: u64,
    /// Simulated milliseconds the run took (faults, then healing).
    pub end_ms: u64,
    pub writes: u64,
    pub acked: u64,
    pub failed: u64,
    pub reads: u64,
    pub crashes: u64,
    pub epochs: u64,
    pub heals: u64,
    pub rollbacks: u64,
    pub repairs: u64,
    pub flips: u64,
}

/// A check that failed: the seed replays it exactly.
#[derive(Clone, Debug)]
pub struct Failure {
    pub seed: u64,
    pub at_ms: u64,
    pub what: String,
    pub trace: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "seed {} at {} ms: {}", self.seed, self.at_ms, self.what)?;
        writeln!(f, "last events:")?;
        for t in &self.trace {
            writeln!(f, "  {t}")?;
        }
        Ok(())
    }
}

// Times in simulated milliseconds, in the proportions brickd uses.
const LEASE_MS: u64 = 3000;
const DOWN_AFTER_MS: u64 = 5000;
const HEARTBEAT_MS: u64 = 500;
const FORWARD_TIMEOUT_MS: u64 = 2000;
const CLIENT_TIMEOUT_MS: u64 = 4000;
const KEYS: u64 = 2;
const CLIENTS: usize = 4;
/// Replica objects are at most this long; disperse columns two stripes.
const REPLICA_MAX: u64 = 48;
const FRAGMENT: u64 = 4;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Obj {
    held: Held,
    bytes: Vec<u8>,
    /// What the last disperse write overwrote, kept by the member to go back on its own.
    undo: Option<Kept>,
}

/// A member's record of what its last write overwrote (`MemberWrite.undo`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Kept {
    from: Held,
    to: Held,
    frag_len: u64,
    offset: u64,
    old: Vec<u8>,
}

/// A change to one copy.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Change {
    Write { offset: u64, data: Vec<u8> },
    Truncate { len: u64 },
}

fn apply_change(bytes: &mut Vec<u8>, c: &Change) {
    match c {
        Change::Write { offset, data } => {
            let end = *offset as usize + data.len();
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[*offset as usize..end].copy_from_slice(data);
        }
        Change::Truncate { len } => bytes.resize(*len as usize, 0),
    }
}

#[derive(Default)]
struct Node {
    up: bool,
    /// Counts restarts: a message sent to an earlier run of the process is lost with its
    /// connections.
    incarnation: u64,
    paused_until: u64,
    cut_until: u64,
    full_until: u64,
    /// What the process sees (lost at a crash, but for what was written back).
    vol: BTreeMap<u64, Obj>,
    /// What is on disk.
    dur: BTreeMap<u64, Obj>,
    epoch: u64,
    unreported: bool,
    /// The group's last word: whether this node's brick is in sync (`None`: none yet).
    standing: Option<bool>,
    /// ... and what it said of the set (epoch, members in sync, quorum).
    known: Option<crate::quorum::Known>,
    /// Objects with a flipped bit on disk (and in what the process sees) that no read or
    /// scrub has found yet: their checksums no longer match.
    damaged: std::collections::BTreeSet<u64>,
    /// When the node last reported damage: it serves no reads on a heartbeat answer for a
    /// heartbeat sent before (brickd's `hold_reads`).
    reported_damage_at: u64,
    lease: Option<Lease>,
    tags: u64,
    /// Objects whose last mutation here did not settle cleanly: the next one reconciles
    /// first (`disperse::settle`'s `Settle::settled`), so that no write lands on top of a
    /// version fewer than K hold.
    unsettled: std::collections::HashSet<u64>,
    /// The primary's mutations in flight, and the requests waiting for an object.
    ops: HashMap<u64, Op>,
    busy: HashMap<u64, VecDeque<Request>>,
}

#[derive(Clone, Debug)]
struct Request {
    client: usize,
    attempt: u64,
    key: u64,
    change: Change,
    epoch: u64,
    /// The in-sync members as the client sees them.
    in_sync: Vec<usize>,
}

enum Op {
    Replica {
        req: Request,
        m: Mutation<String>,
        members: Vec<usize>,
    },
    Disperse {
        req: Request,
        takers: Vec<usize>,
        wrote: Held,
        parent: Held,
        outcomes: Vec<(usize, Result<(), Refusal<String>>)>,
        attempt: u32,
    },
}

#[derive(Clone, Debug)]
enum Msg {
    ToPrimary(Request),
    Reply {
        client: usize,
        attempt: u64,
        result: Result<Held, String>,
    },
    Forward {
        primary: usize,
        op: u64,
        member: usize,
        index: usize,
        key: u64,
        change: Change,
        rule: Rule,
        epoch: u64,
    },
    Answer {
        op: u64,
        index: usize,
        result: Result<(), Refusal<String>>,
    },
    Heartbeat {
        node: usize,
        incarnation: u64,
        sent: u64,
    },
    Standing {
        sent: u64,
        in_sync: bool,
        epoch: u64,
        set: crate::quorum::Known,
    },
    Report {
        node: usize,
        incarnation: u64,
    },
    Reported,
}

#[derive(Clone, Debug)]
enum Ev {
    Deliver {
        to: Dest,
        msg: Msg,
        incarnation: u64,
    },
    Timeout {
        node: usize,
        op: u64,
        index: usize,
    },
    ClientTick(usize),
    ClientTimeout {
        client: usize,
        attempt: u64,
    },
    Beat(usize),
    Detect,
    HealTick,
    Fault,
    Restart(usize),
    Writeback(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dest {
    Node(usize),
    Group,
    Client(usize),
}

struct Group {
    epoch: u64,
    primary: usize,
    in_sync: Vec<bool>,
    last_beat: Vec<u64>,
    reported: Vec<u64>,
    /// Live members being taken out of the set (a replace-brick of a live brick), since
    /// when: heartbeat answers already tell them to serve no reads, they still take writes,
    /// and they leave the in-sync members once every lease granted before has run out.
    draining: Vec<Option<u64>>,
}

struct Client {
    /// Client 0 only reads, and reads the sets again only every 10 s (a read-only mount).
    view: (u64, usize, Vec<usize>),
    refreshed: u64,
    attempt: u64,
    pending: Option<(Request, u64, u32)>,
}

/// The oracle: each version's bytes, its parent, and the acknowledged writes.
#[derive(Default)]
struct Oracle {
    images: HashMap<(u64, Held), (Vec<u8>, Held)>,
    /// Per object, the newest acknowledged write: every other acknowledged write of it is
    /// in this one (checked as each is acknowledged), so reads are checked against it.
    acked: BTreeMap<u64, Held>,
    /// The members that ever applied or got each version (whatever they lost since).
    applied: HashMap<(u64, Held), std::collections::BTreeSet<usize>>,
}

impl Oracle {
    fn contains(&self, key: u64, mut at: Held, w: Held) -> bool {
        loop {
            if at == w {
                return true;
            }
            if at == ABSENT || at.0 < w.0 {
                return false;
            }
            match self.images.get(&(key, at)) {
                Some((_, parent)) => at = *parent,
                None => return false,
            }
        }
    }
    fn image(&self, key: u64, h: Held) -> Option<&Vec<u8>> {
        if h == ABSENT {
            static EMPTY: Vec<u8> = Vec::new();
            return Some(&EMPTY);
        }
        self.images.get(&(key, h)).map(|(b, _)| b)
    }
}

struct Sim {
    cfg: Config,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<std::cmp::Reverse<(u64, u64, usize)>>,
    events: Vec<Option<Ev>>,
    nodes: Vec<Node>,
    group: Group,
    clients: Vec<Client>,
    oracle: Oracle,
    stats: Stats,
    trace: VecDeque<String>,
    next_op: u64,
    codec: Option<ReedSolomonCodec>,
    faults: bool,
    failure: Option<String>,
}

/// Runs one seed. `Err` names the first check that failed, with the events before it.
pub fn run(cfg: Config) -> Result<Stats, Failure> {
    let n = match cfg.kind {
        Kind::Replica { members } => members,
        Kind::Disperse { k, m } => k + m,
    };
    let codec = match cfg.kind {
        Kind::Disperse { k, m } => Some(ReedSolomonCodec::new(k, m).expect("geometry")),
        Kind::Replica { .. } => None,
    };
    let s = Sim {
        rng: Rng(cfg.seed),
        cfg,
        now: 0,
        seq: 0,
        queue: BinaryHeap::new(),
        events: Vec::new(),
        nodes: (0..n)
            .map(|_| Node {
                up: true,
                lease: Some(Lease::new(LEASE_MS)),
                standing: Some(true),
                known: None,
                ..Node::default()
            })
            .collect(),
        group: Group {
            epoch: 1,
            primary: 0,
            in_sync: vec![true; n],
            last_beat: vec![0; n],
            reported: vec![0; n],
            draining: vec![None; n],
        },
        clients: (0..CLIENTS)
            .map(|_| Client {
                view: (1, 0, (0..n).collect()),
                refreshed: 0,
                attempt: 0,
                pending: None,
            })
            .collect(),
        oracle: Oracle::default(),
        stats: Stats::default(),
        trace: VecDeque::new(),
        next_op: 1,
        codec,
        faults: true,
        failure: None,
    };
    s.main()
}

impl Sim {
    fn n(&self) -> usize {
        self.nodes.len()
    }

    fn k(&self) -> usize {
        match self.cfg.kind {
            Kind::Disperse { k, .. } => k,
            Kind::Replica { .. } => 1,
        }
    }

    fn quorum(&self) -> usize {
        if let Some(q) = self.cfg.quorum {
            return q.clamp(1, self.n());
        }
        match self.cfg.kind {
            Kind::Replica { members } => members / 2 + 1,
            Kind::Disperse { k, m } => (k + 1).min(k + m),
        }
    }

    fn mutant(&self, m: Mutant) -> bool {
        self.cfg.mutant == Some(m)
    }

    fn at(&mut self, delay: u64, ev: Ev) {
        self.seq += 1;
        self.events.push(Some(ev));
        let i = self.events.len() - 1;
        self.queue
            .push(std::cmp::Reverse((self.now + delay, self.seq, i)));
    }

    fn log(&mut self, s: String) {
        if self.trace.len() >= self.cfg.trace_events.max(1) {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("{:>7} {s}", self.now));
    }

    fn fail(&mut self, what: String) {
        if self.failure.is_none() {
            self.failure = Some(what);
        }
    }

    /// Whether `node` can take a call or a message now (up, running, not cut off).
    fn reachable(&self, node: usize) -> bool {
        let n = &self.nodes[node];
        n.up && n.paused_until <= self.now && n.cut_until <= self.now
    }

    /// Whether a node is faulty now (at most one is, see the module's limits).
    fn faulty(&self, node: usize) -> bool {
        let n = &self.nodes[node];
        !n.up
            || n.paused_until > self.now
            || n.cut_until > self.now
            || n.unreported
            || !self.group.in_sync[node]
            || self.group.draining[node].is_some()
            || !n.damaged.is_empty()
    }

    fn deliver_in(&mut self, delay: u64, to: Dest, msg: Msg, incarnation: u64) {
        self.at(
            delay,
            Ev::Deliver {
                to,
                msg,
                incarnation,
            },
        );
    }

    fn send(&mut self, to: Dest, msg: Msg) {
        let incarnation = match to {
            Dest::Node(n) => self.nodes[n].incarnation,
            _ => 0,
        };
        self.send_to(to, msg, incarnation);
    }

    /// Sends on a connection of process run `incarnation` of the destination: a reply goes
    /// back on the connection its request came in on, and is lost if that process is gone.
    fn send_to(&mut self, to: Dest, msg: Msg, incarnation: u64) {
        if !self.faults {
            let d = 1 + self.rng.below(5);
            self.deliver_in(d, to, msg, incarnation);
            return;
        }
        if self.rng.chance(2) {
            self.log(format!("drop {msg:?} to {to:?}"));
            return;
        }
        let copies = if self.rng.chance(2) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = if self.rng.chance(3) {
                let long = if self.cfg.late_forwards { 2800 } else { 1000 };
                200 + self.rng.below(long)
            } else {
                1 + self.rng.below(30)
            };
            self.deliver_in(delay, to, msg.clone(), incarnation);
        }
    }

    /// An immediate call from `from` to `to`: fails when either cannot be reached, or at
    /// random.
    fn call_ok(&mut self, from: usize, to: usize) -> bool {
        if from == to {
            return self.reachable(to);
        }
        self.reachable(to) && self.reachable(from) && !(self.faults && self.rng.chance(2))
    }

    fn main(mut self) -> Result<Stats, Failure> {
        for c in 0..CLIENTS {
            self.at(1 + c as u64, Ev::ClientTick(c));
        }
        for n in 0..self.n() {
            self.at(n as u64, Ev::Beat(n));
            self.at(100 + n as u64, Ev::Writeback(n));
        }
        self.at(250, Ev::Detect);
        self.at(1000, Ev::HealTick);
        self.at(500, Ev::Fault);
        let end = self.cfg.duration_ms;
        let settle_until = end + 60_000;
        while let Some(std::cmp::Reverse((t, _, i))) = self.queue.pop() {
            if t > settle_until {
                break;
            }
            self.now = t;
            if self.faults && self.now >= end {
                self.quiesce();
            }
            let ev = self.events[i].take().expect("each event runs once");
            self.stats.events += 1;
            self.step(ev);
            self.check_in_sync();
            if self.failure.is_some() {
                break;
            }
            if !self.faults && self.settled() {
                break;
            }
        }
        if self.failure.is_none() {
            self.final_checks();
        }
        match self.failure.take() {
            Some(what) => Err(Failure {
                seed: self.cfg.seed,
                at_ms: self.now,
                what,
                trace: self.trace.into_iter().collect(),
            }),
            None => Ok(Stats {
                end_ms: self.now,
                ..self.stats
            }),
        }
    }

    /// Faults end: every node comes back and runs.
    fn quiesce(&mut self) {
        self.faults = false;
        self.log("faults end".into());
        for n in 0..self.n() {
            let node = &mut self.nodes[n];
            node.paused_until = node.paused_until.min(self.now);
            node.cut_until = node.cut_until.min(self.now);
            node.full_until = node.full_until.min(self.now);
            if !node.up {
                self.restart(n);
            }
        }
        // Every brick's scrub passes once more.
        if !self.mutant(Mutant::NoChecksum) {
            for n in 0..self.n() {
                let found: Vec<u64> = self.nodes[n].damaged.iter().copied().collect();
                for key in found {
                    self.found_damage(n, key);
                }
            }
        }
    }

    fn settled(&self) -> bool {
        self.group.in_sync.iter().all(|b| *b)
            && self.group.draining.iter().all(Option::is_none)
            && self.clients.iter().all(|c| c.pending.is_none())
            && self.nodes.iter().all(|n| n.ops.is_empty() && !n.unreported)
            && self.now > self.cfg.duration_ms + 2 * DOWN_AFTER_MS
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver {
                to,
                msg,
                incarnation,
            } => self.deliver(to, msg, incarnation),
            Ev::Timeout { node, op, index } => {
                if self.nodes[node].ops.contains_key(&op) {
                    self.on_answer(node, op, index, Err(Refusal::Unknown("timed out".into())));
                }
            }
            Ev::ClientTick(c) => self.client_tick(c),
            Ev::ClientTimeout { client, attempt } => {
                if self.clients[client].attempt == attempt && self.clients[client].pending.is_some()
                {
                    self.log(format!("client {client} attempt {attempt} timed out"));
                    self.client_retry(client);
                }
            }
            Ev::Beat(n) => self.beat(n),
            Ev::Detect => self.detect(),
            Ev::HealTick => self.heal_tick(),
            Ev::Fault => self.fault(),
            Ev::Restart(n) => self.restart(n),
            Ev::Writeback(n) => {
                if self.nodes[n].up {
                    for (key, obj) in self.nodes[n].vol.clone() {
                        if self.rng.chance(50) {
                            self.nodes[n].dur.insert(key, obj);
                        }
                    }
                }
                let d = 200 + self.rng.below(800);
                self.at(d, Ev::Writeback(n));
            }
        }
    }

    // ---- faults ----

    fn fault(&mut self) {
        if !self.faults {
            return;
        }
        let d = 300 + self.rng.below(1500);
        self.at(d, Ev::Fault);
        let victim = self.rng.below(self.n() as u64) as usize;
        if (0..self.n()).any(|x| x != victim && self.faulty(x)) {
            return;
        }
        let node = &self.nodes[victim];
        if !node.up || node.paused_until > self.now || node.cut_until > self.now {
            return;
        }
        match self.rng.below(12) {
            11 => self.flip(victim),
            10 => self.replace_live(victim),
            0..=2 => {
                self.stats.crashes += 1;
                self.log(format!("crash node {victim}"));
                let node = &mut self.nodes[victim];
                node.up = false;
                node.vol = node.dur.clone();
                node.ops.clear();
                node.busy.clear();
                node.unsettled.clear();
                node.standing = None;
                node.lease = Some(Lease::new(LEASE_MS));
                let d = 500 + self.rng.below(8000);
                self.at(d, Ev::Restart(victim));
            }
            3..=5 if self.cfg.late_forwards => {
                let d = 500 + self.rng.below(9000);
                self.log(format!("pause node {victim} for {d} ms"));
                self.nodes[victim].paused_until = self.now + d;
            }
            3..=7 => {
                let d = 500 + self.rng.below(9000);
                self.log(format!("cut node {victim} off for {d} ms"));
                self.nodes[victim].cut_until = self.now + d;
            }
            _ => {
                let d = 200 + self.rng.below(3000);
                self.log(format!("disk of node {victim} full for {d} ms"));
                self.nodes[victim].full_until = self.now + d;
            }
        }
    }

    fn restart(&mut self, n: usize) {
        if self.nodes[n].up {
            return;
        }
        self.log(format!("restart node {n} (unclean)"));
        let report = !self.mutant(Mutant::NoRestartReport);
        let node = &mut self.nodes[n];
        node.up = true;
        node.incarnation += 1;
        node.unreported = report;
        if !report {
            node.standing = Some(true);
        }
    }

    /// A bit flips in one object on `victim`'s disk (one the process sees as on disk, so
    /// both views hold the flip).
    fn flip(&mut self, victim: usize) {
        let node = &self.nodes[victim];
        let keys: Vec<u64> = node
            .dur
            .iter()
            .filter(|(k, o)| {
                !o.bytes.is_empty()
                    && node
                        .vol
                        .get(k)
                        .is_some_and(|v| v.held == o.held && v.bytes == o.bytes)
            })
            .map(|(k, _)| *k)
            .collect();
        if keys.is_empty() {
            return;
        }
        let key = keys[self.rng.below(keys.len() as u64) as usize];
        let len = self.nodes[victim].dur[&key].bytes.len() as u64;
        let at = self.rng.below(len) as usize;
        let bit = 1u8 << self.rng.below(8);
        let node = &mut self.nodes[victim];
        for view in [&mut node.dur, &mut node.vol] {
            if let Some(o) = view.get_mut(&key) {
                o.bytes[at] ^= bit;
            }
        }
        self.nodes[victim].damaged.insert(key);
        self.stats.flips += 1;
        self.log(format!(
            "bit flip in node {victim}'s copy of {key} at byte {at}"
        ));
    }

    /// Member `t` found `key` damaged (a checksum mismatch): it reports it, and once the
    /// group has taken it out of the set's in-sync members (a new epoch, which it then
    /// fences), it quarantines the object, which the heal then copies afresh. The set's last
    /// in-sync member keeps it (its other blocks stay readable).
    fn found_damage(&mut self, t: usize, key: u64) {
        self.log(format!("node {t} found {key} damaged; reports it"));
        self.nodes[t].standing = None;
        self.nodes[t].reported_damage_at = self.now;
        self.out_of_sync(t, "damaged object");
        if self.group.in_sync[t] {
            return;
        }
        let e = self.group.epoch;
        let node = &mut self.nodes[t];
        node.epoch = node.epoch.max(e);
        node.vol.remove(&key);
        node.dur.remove(&key);
        node.damaged.remove(&key);
    }

    /// What member `t` serves of `key` (its version and bytes), checked: `None` when the
    /// object is damaged (found, and reported).
    fn read_copy(&mut self, t: usize, key: u64) -> Option<(Held, Vec<u8>)> {
        if self.nodes[t].damaged.contains(&key) && !self.mutant(Mutant::NoChecksum) {
            self.found_damage(t, key);
            return None;
        }
        Some(self.copy_of(t, key))
    }

    // ---- the metadata group ----

    fn beat(&mut self, n: usize) {
        self.at(HEARTBEAT_MS, Ev::Beat(n));
        if !self.nodes[n].up || self.nodes[n].paused_until > self.now {
            return;
        }
        if self.nodes[n].cut_until > self.now {
            return;
        }
        if self.nodes[n].unreported {
            let incarnation = self.nodes[n].incarnation;
            self.send(
                Dest::Group,
                Msg::Report {
                    node: n,
                    incarnation,
                },
            );
            return;
        }
        let (sent, incarnation) = (self.now, self.nodes[n].incarnation);
        self.send(
            Dest::Group,
            Msg::Heartbeat {
                node: n,
                incarnation,
                sent,
            },
        );
    }

    fn out_of_sync(&mut self, n: usize, why: &str) {
        let in_sync = self.group.in_sync.iter().filter(|b| **b).count();
        if !self.group.in_sync[n] || in_sync <= 1 {
            return;
        }
        self.group.in_sync[n] = false;
        self.group.epoch += 1;
        self.stats.epochs += 1;
        if self.group.primary == n {
            self.group.primary = (0..self.n())
                .find(|x| self.group.in_sync[*x])
                .expect("one in sync");
        }
        let (e, p) = (self.group.epoch, self.group.primary);
        self.log(format!(
            "group: node {n} out of sync ({why}); epoch {e}, primary {p}"
        ));
    }

    /// A replace-brick of live member `n` (it comes back through a full heal, as the new
    /// brick would).
    fn replace_live(&mut self, n: usize) {
        let in_sync = self.group.in_sync.iter().filter(|b| **b).count();
        if !self.group.in_sync[n] || in_sync <= 1 || self.group.draining.iter().any(Option::is_some)
        {
            return;
        }
        if self.mutant(Mutant::NoDrain) {
            return self.out_of_sync(n, "replaced");
        }
        self.log(format!("group: node {n} draining reads (replaced)"));
        self.group.draining[n] = Some(self.now);
    }

    fn detect(&mut self) {
        self.at(250, Ev::Detect);
        // Every lease a node holds was granted for a heartbeat sent before its answer, and
        // leases are shorter than the down-after time: a drain that old has no reader left.
        for n in 0..self.n() {
            if self.group.draining[n].is_some_and(|t| self.now > t + DOWN_AFTER_MS) {
                self.group.draining[n] = None;
                self.out_of_sync(n, "replaced, drained");
            }
        }
        for n in 0..self.n() {
            if self.group.in_sync[n] && self.now > self.group.last_beat[n] + DOWN_AFTER_MS {
                self.out_of_sync(n, "no heartbeat");
            }
        }
    }

    fn group_deliver(&mut self, msg: Msg) {
        match msg {
            Msg::Heartbeat {
                node,
                incarnation,
                sent,
            } => {
                self.group.last_beat[node] = self.group.last_beat[node].max(self.now);
                let in_sync = self.group.in_sync[node] && self.group.draining[node].is_none();
                let epoch = self.group.epoch;
                let set = crate::quorum::Known {
                    epoch,
                    in_sync: self.group.in_sync.iter().filter(|b| **b).count(),
                    quorum: self.quorum(),
                };
                self.send_to(
                    Dest::Node(node),
                    Msg::Standing {
                        sent,
                        in_sync,
                        epoch,
                        set,
                    },
                    incarnation,
                );
            }
            Msg::Report { node, incarnation } => {
                // A report is handled once per restart: a late duplicate must not take a
                // member healed since out of sync while it serves reads (brickd sends it in
                // its session, which the group applies once).
                if incarnation > self.group.reported[node] {
                    self.group.reported[node] = incarnation;
                    self.out_of_sync(node, "restarted after an unclean stop");
                }
                self.send_to(Dest::Node(node), Msg::Reported, incarnation);
            }
            other => self.fail(format!("the group got {other:?}")),
        }
    }

    // ---- heal (the metadata leader's duty) ----

    fn heal_tick(&mut self) {
        self.at(1000, Ev::HealTick);
        let Some(t) = (0..self.n()).find(|t| !self.group.in_sync[*t]) else {
            return;
        };
        let p = self.group.primary;
        if !self.reachable(t) || self.nodes[t].unreported || !self.reachable(p) {
            return;
        }
        if !self.lease_held(p) {
            return;
        }
        let e = self.group.epoch;
        // The first pass, at the set's epoch; then the barrier pass, with no mutation of
        // the primary's in flight, at the next epoch (which fences the primary's writes of
        // the old one); then the group takes the member back if the epoch did not move.
        if !self.heal_pass(p, t, e) {
            return;
        }
        if !self.nodes[p].ops.is_empty() {
            return;
        }
        if !self.heal_pass(p, t, e + 1) {
            // The barrier pass fenced members at the next epoch: a heal that stops there
            // raises the set's epoch so that writes go on (`RaiseEpoch`, as brickd's healer).
            if self.group.epoch == e {
                self.group.epoch = e + 1;
                self.log(format!("group: heal of node {t} stopped; epoch {}", e + 1));
            }
            return;
        }
        if self.group.epoch == e {
            self.group.in_sync[t] = true;
            self.group.epoch = e + 1;
            self.stats.heals += 1;
            self.log(format!(
                "group: node {t} healed, back in sync at epoch {}",
                e + 1
            ));
        } else {
            self.group.epoch = self.group.epoch.max(e + 1);
        }
    }

    /// Copies every object of the primary's that the target lacks; false when a call failed.
    fn heal_pass(&mut self, p: usize, t: usize, epoch: u64) -> bool {
        if !self.call_ok(p, p) || self.fence_on(p, epoch).is_err() {
            return false;
        }
        let keys: Vec<u64> = self.nodes[p].vol.keys().copied().collect();
        let dispersed = matches!(self.cfg.kind, Kind::Disperse { .. });
        for key in keys {
            // A disperse primary's own fragment is not the object: it may have missed
            // writes that K others applied. The takers are reconciled first, under the
            // object's ordering lock (a key with a mutation in flight waits: the pass fails).
            if dispersed {
                if self.nodes[p].busy.get(&key).is_some_and(|q| !q.is_empty()) {
                    return false;
                }
                let takers: Vec<usize> = (0..self.n())
                    .filter(|x| *x != t && self.group.in_sync[*x])
                    .collect();
                if !self.reconcile(p, key, epoch, &takers, &[t]) {
                    return false;
                }
            }
            let Some(mine) = self.nodes[p].vol.get(&key).cloned() else {
                continue;
            };
            if self.nodes[p].damaged.contains(&key) && !self.mutant(Mutant::NoChecksum) {
                self.found_damage(p, key);
                return false;
            }
            let theirs = self.nodes[t]
                .vol
                .get(&key)
                .map(|o| (o.held, o.bytes.len() as u64));
            if !crate::heal::needs_copy((mine.held, mine.bytes.len() as u64), theirs) {
                continue;
            }
            let copy = match self.cfg.kind {
                Kind::Replica { .. } => Some(mine),
                Kind::Disperse { .. } => {
                    let from: Vec<usize> = (0..self.n()).filter(|x| *x != t).collect();
                    self.rebuild(p, key, mine.held, &from, t)
                }
            };
            let Some(copy) = copy else {
                return false;
            };
            if !self.install(p, t, key, epoch, copy) {
                return false;
            }
        }
        true
    }

    // ---- members ----

    fn lease_held(&self, n: usize) -> bool {
        self.nodes[n].lease.is_some_and(|l| l.held(self.now))
    }

    fn fence_on(&mut self, n: usize, epoch: u64) -> Result<(), String> {
        if self.mutant(Mutant::NoFence) {
            return Ok(());
        }
        match member::fence(self.nodes[n].epoch, epoch) {
            Ok(member::Fence::Pass) => Ok(()),
            Ok(member::Fence::Record(e)) => {
                self.nodes[n].epoch = e;
                Ok(())
            }
            Err(s) => Err(format!("stale epoch {} < {}", s.got, s.have)),
        }
    }

    /// What member `t` holds of `key`: version and bytes (`ABSENT` and none for nothing).
    fn copy_of(&self, t: usize, key: u64) -> (Held, Vec<u8>) {
        self.nodes[t]
            .vol
            .get(&key)
            .map_or((ABSENT, Vec::new()), |o| (o.held, o.bytes.clone()))
    }

    fn held(&self, n: usize, key: u64) -> Held {
        self.nodes[n].vol.get(&key).map_or(ABSENT, |o| o.held)
    }

    /// A member applying a mutation under a rule, fenced at `epoch`: the version made and
    /// the one it replaced.
    fn member_apply(
        &mut self,
        n: usize,
        key: u64,
        change: &Change,
        rule: Rule,
        epoch: u64,
    ) -> Result<(Held, u64), Refusal<String>> {
        self.fence_on(n, epoch).map_err(Refusal::Failed)?;
        let have = self.held(n, key);
        let rule = match rule {
            Rule::Exactly { version, tag, .. } if self.mutant(Mutant::NoParentCheck) => {
                Rule::Exactly {
                    version,
                    tag,
                    parent: have.1,
                }
            }
            r => r,
        };
        let made = match member::check(have, rule) {
            Ok(Verdict::Retry) => return Ok((have, 0)),
            Ok(Verdict::Apply(made)) => made,
            Err(_) => return Err(Refusal::Gap),
        };
        // As the store: the version is checked before the disk is written.
        if self.nodes[n].full_until > self.now {
            return Err(Refusal::Failed("no space".into()));
        }
        let dispersed = matches!(self.cfg.kind, Kind::Disperse { .. });
        let obj = self.nodes[n].vol.entry(key).or_insert(Obj {
            held: ABSENT,
            bytes: Vec::new(),
            undo: None,
        });
        // A disperse member keeps what the write overwrites.
        obj.undo = match change {
            Change::Write { offset, data } if dispersed => {
                let (o, len) = (*offset as usize, obj.bytes.len());
                let end = (o + data.len()).min(len);
                Some(Kept {
                    from: made,
                    to: have,
                    frag_len: len as u64,
                    offset: *offset,
                    old: obj.bytes.get(o..end).map_or(Vec::new(), <[u8]>::to_vec),
                })
            }
            _ => None,
        };
        apply_change(&mut obj.bytes, change);
        obj.held = made;
        self.oracle
            .applied
            .entry((key, made))
            .or_default()
            .insert(n);
        Ok((made, have.1))
    }

    /// The primary `p` installs `copy` on member `t` (fenced at `epoch`), durably.
    fn install(&mut self, p: usize, t: usize, key: u64, epoch: u64, copy: Obj) -> bool {
        if !self.call_ok(p, t) || self.nodes[t].full_until > self.now {
            return false;
        }
        if self.fence_on(t, epoch).is_err() {
            return false;
        }
        self.nodes[t].damaged.remove(&key);
        self.check_copy(t, key, &copy);
        self.oracle
            .applied
            .entry((key, copy.held))
            .or_default()
            .insert(t);
        self.nodes[t].vol.insert(key, copy.clone());
        self.nodes[t].dur.insert(key, copy);
        true
    }

    /// Checks that a copy about to be held is its version's bytes (a fragment: its share).
    fn check_copy(&mut self, n: usize, key: u64, copy: &Obj) {
        // A flipped bit not found yet is the disk's doing: reads must find it (checked
        // there), writes on top of it carry it until then.
        if self.nodes[n].damaged.contains(&key) {
            return;
        }
        let Some(image) = self.oracle.image(key, copy.held).cloned() else {
            self.fail(format!(
                "node {n} got {key}@{:?}, a version no primary made",
                copy.held
            ));
            return;
        };
        let expect = match self.cfg.kind {
            Kind::Replica { .. } => image,
            Kind::Disperse { .. } => {
                let frags = self.fragments_of(&image);
                frags[n][..(copy.bytes.len()).min(frags[n].len())].to_vec()
            }
        };
        let have = &copy.bytes[..copy.bytes.len().min(expect.len())];
        if have != expect.as_slice() || copy.bytes[have.len()..].iter().any(|b| *b != 0) {
            self.fail(format!(
                "node {n}'s copy of {key}@{:?} is not that version's bytes: it combines versions",
                copy.held
            ));
        }
    }

    fn fragments_of(&self, image: &[u8]) -> Vec<Vec<u8>> {
        let codec = self.codec.as_ref().expect("dispersed");
        let sb = (self.k() as u64 * FRAGMENT) as usize;
        let mut buf = image.to_vec();
        buf.resize(image.len().div_ceil(sb).max(1) * sb, 0);
        encode_stripes(codec, &buf, FRAGMENT as usize).expect("encode")
    }

    fn deliver(&mut self, to: Dest, msg: Msg, incarnation: u64) {
        match to {
            Dest::Group => self.group_deliver(msg),
            Dest::Client(_) => {
                if let Msg::Reply {
                    client,
                    attempt,
                    result,
                } = msg
                {
                    self.client_reply(client, attempt, result);
                }
            }
            Dest::Node(n) => {
                if !self.nodes[n].up || self.nodes[n].incarnation != incarnation {
                    return;
                }
                if self.nodes[n].paused_until > self.now {
                    // A stopped process reads its socket when it runs again.
                    let d = self.nodes[n].paused_until - self.now;
                    self.deliver_in(d, to, msg, incarnation);
                    return;
                }
                if self.nodes[n].cut_until > self.now {
                    return;
                }
                self.node_deliver(n, msg);
            }
        }
        let _ = to;
    }

    fn node_deliver(&mut self, n: usize, msg: Msg) {
        match msg {
            Msg::Standing {
                sent,
                in_sync,
                epoch,
                set,
            } => {
                // The node fences its brick at the set's epoch (brickd's `fence_epochs`)
                // and keeps the set's quorum standing.
                let _ = self.fence_on(n, epoch);
                self.nodes[n].known = Some(set);
                if sent >= self.nodes[n].reported_damage_at {
                    self.nodes[n].standing = Some(in_sync);
                }
                let from = if self.mutant(Mutant::LeaseFromReply) {
                    self.now
                } else {
                    sent
                };
                if let Some(l) = self.nodes[n].lease.as_mut() {
                    l.acknowledged(from);
                }
            }
            Msg::Reported => self.nodes[n].unreported = false,
            Msg::ToPrimary(req) => self.primary_request(n, req),
            Msg::Forward {
                primary,
                op,
                member,
                index,
                key,
                change,
                rule,
                epoch,
            } => {
                let r = self.member_apply(member, key, &change, rule, epoch);
                if let Ok((made, _)) = r {
                    let copy = self.nodes[member].vol[&key].clone();
                    if made == copy.held {
                        self.check_copy(member, key, &copy);
                    }
                }
                let result = r.map(|_| ());
                if primary == n {
                    self.on_answer(n, op, index, result);
                } else {
                    self.send(Dest::Node(primary), Msg::Answer { op, index, result });
                }
            }
            Msg::Answer { op, index, result } => {
                if self.nodes[n].ops.contains_key(&op) {
                    self.on_answer(n, op, index, result);
                }
            }
            other => self.fail(format!("node {n} got {other:?}")),
        }
    }

    // ---- the primary ----

    fn primary_request(&mut self, n: usize, req: Request) {
        let q = self.nodes[n].busy.entry(req.key).or_default();
        q.push_back(req.clone());
        if q.len() == 1 {
            self.start_next(n, req.key);
        }
    }

    /// Starts the request at the head of the object's queue (the ordering lock).
    fn start_next(&mut self, n: usize, key: u64) {
        let Some(req) = self.nodes[n]
            .busy
            .get(&key)
            .and_then(|q| q.front().cloned())
        else {
            return;
        };
        match self.cfg.kind {
            Kind::Replica { .. } => self.replica_start(n, req),
            Kind::Disperse { .. } => self.disperse_start(n, req, 0),
        }
    }

    fn finish(&mut self, n: usize, op: Option<u64>, req: &Request, result: Result<Held, String>) {
        if let Some(op) = op {
            self.nodes[n].ops.remove(&op);
        }
        if let Some(q) = self.nodes[n].busy.get_mut(&req.key) {
            q.pop_front();
        }
        self.send(
            Dest::Client(req.client),
            Msg::Reply {
                client: req.client,
                attempt: req.attempt,
                result,
            },
        );
        self.start_next(n, req.key);
    }

    fn new_tag(&mut self, n: usize) -> u64 {
        self.nodes[n].tags += 1;
        ((n as u64 + 1) << 48) | (self.rng.below(1 << 16) << 32) | self.nodes[n].tags
    }

    fn replica_start(&mut self, n: usize, req: Request) {
        if !self.lease_held(n) {
            return self.finish(n, None, &req, Err("busy: lease lapsed".into()));
        }
        if let Err(e) = crate::quorum::admit(self.nodes[n].known, req.epoch)
            && !self.mutant(Mutant::NoQuorum)
        {
            return self.finish(n, None, &req, Err(format!("read-only: {e}")));
        }
        let members: Vec<usize> = req.in_sync.iter().copied().filter(|m| *m != n).collect();
        let tag = self.new_tag(n);
        let (mut m, first) = Mutation::start(members.len(), tag);
        let Step::ApplyLocal(rule) = first else {
            unreachable!("a mutation starts with its local apply")
        };
        let parent = self.held(n, req.key);
        let r = self.member_apply(n, req.key, &req.change, rule, req.epoch);
        if let Ok((made, _)) = r {
            // The oracle: the version's bytes are its parent's with the change applied.
            let mut image = self
                .oracle
                .image(req.key, parent)
                .cloned()
                .unwrap_or_default();
            apply_change(&mut image, &req.change);
            self.oracle
                .images
                .insert((req.key, made), (image.clone(), parent));
            if self.nodes[n].vol[&req.key].bytes != image
                && !self.nodes[n].damaged.contains(&req.key)
            {
                self.fail(format!("primary {n}'s copy of {} diverged", req.key));
            }
        }
        let op = self.next_op;
        self.next_op += 1;
        let steps = m.applied(r.map_err(|e| match e {
            Refusal::Gap => "gap".to_string(),
            Refusal::Failed(e) | Refusal::Unknown(e) => e,
        }));
        self.nodes[n]
            .ops
            .insert(op, Op::Replica { req, m, members });
        self.replica_steps(n, op, steps);
    }

    fn replica_steps(&mut self, n: usize, op: u64, steps: Vec<Step<String>>) {
        for s in steps {
            let Some(Op::Replica { req, members, .. }) = self.nodes[n].ops.get_mut(&op) else {
                return;
            };
            match s {
                Step::ApplyLocal(_) => unreachable!("applied once"),
                Step::Forward { member, rule } => {
                    let (to, key, change, epoch) =
                        (members[member], req.key, req.change.clone(), req.epoch);
                    self.send(
                        Dest::Node(to),
                        Msg::Forward {
                            primary: n,
                            op,
                            member: to,
                            index: member,
                            key,
                            change,
                            rule,
                            epoch,
                        },
                    );
                    self.at(
                        FORWARD_TIMEOUT_MS,
                        Ev::Timeout {
                            node: n,
                            op,
                            index: member,
                        },
                    );
                }
                Step::Replace { member, held } => {
                    let (to, key, epoch) = (members[member], req.key, req.epoch);
                    let copy = self.nodes[n].vol.get(&key).cloned();
                    let unreadable =
                        self.nodes[n].damaged.contains(&key) && !self.mutant(Mutant::NoChecksum);
                    if unreadable {
                        self.found_damage(n, key);
                    }
                    let ok = match copy {
                        Some(c) if c.held == held && !unreadable => {
                            self.stats.repairs += 1;
                            self.install(n, to, key, epoch, c)
                        }
                        _ => false,
                    };
                    let r = if ok {
                        Ok(())
                    } else {
                        Err("repair failed".to_string())
                    };
                    let Some(Op::Replica { m, .. }) = self.nodes[n].ops.get_mut(&op) else {
                        return;
                    };
                    let next = m.replaced(member, r);
                    self.replica_steps(n, op, next);
                }
                Step::Reply(result) => {
                    let req = req.clone();
                    self.finish(n, Some(op), &req, result);
                    return;
                }
            }
        }
    }

    fn on_answer(&mut self, n: usize, op: u64, index: usize, r: Result<(), Refusal<String>>) {
        match self.nodes[n].ops.get_mut(&op) {
            Some(Op::Replica { m, .. }) => {
                if m.done() {
                    return;
                }
                let steps = m.forwarded(index, r);
                self.replica_steps(n, op, steps);
            }
            Some(Op::Disperse {
                takers, outcomes, ..
            }) => {
                if outcomes.iter().any(|(i, _)| *i == index) {
                    return;
                }
                outcomes.push((index, r));
                if outcomes.len() == takers.len() {
                    self.disperse_settle(n, op);
                }
            }
            None => {}
        }
    }

    // ---- disperse ----

    /// Reads member `t`'s fragment of `key` for the primary `p`.
    fn read_frag(&mut self, p: usize, t: usize, key: u64) -> Option<(Held, Vec<u8>)> {
        if !self.call_ok(p, t) {
            return None;
        }
        self.read_copy(t, key)
    }

    /// Decodes the column from the members `from` (others unread): its version and bytes.
    fn decode(&mut self, p: usize, key: u64, from: &[usize]) -> Result<(Held, Vec<u8>), usize> {
        let mut frags = Vec::new();
        for x in 0..self.n() {
            frags.push(if from.contains(&x) {
                self.read_frag(p, x, key)
            } else {
                None
            });
        }
        let answered = frags.iter().flatten().count();
        self.decode_frags(&frags).map_err(|_| answered)
    }

    /// Decodes whole fragments as read (`None`: not read) into the column.
    fn decode_frags(
        &self,
        frags: &[Option<(Held, Vec<u8>)>],
    ) -> Result<(Held, Vec<u8>), brickfs_erasure::CodecError> {
        let longest = frags
            .iter()
            .flatten()
            .map(|(_, b)| b.len())
            .max()
            .unwrap_or(0);
        let stripes = (longest as u64).div_ceil(FRAGMENT).max(1) as usize;
        let codec = self.codec.as_ref().expect("dispersed");
        decode_stripes(codec, frags, FRAGMENT as usize, stripes)
    }

    /// Rebuilds member `t`'s fragment at `held` from `from`.
    fn rebuild(&mut self, p: usize, key: u64, held: Held, from: &[usize], t: usize) -> Option<Obj> {
        if held == ABSENT {
            return Some(Obj {
                held,
                bytes: Vec::new(),
                undo: None,
            });
        }
        let (v, data) = self.decode(p, key, from).ok()?;
        if v != held {
            return None;
        }
        let frags = encode_stripes(self.codec.as_ref()?, &data, FRAGMENT as usize).ok()?;
        Some(Obj {
            held,
            bytes: frags[t].clone(),
            undo: None,
        })
    }

    fn disperse_start(&mut self, n: usize, req: Request, attempt: u32) {
        if !self.lease_held(n) {
            return self.finish(n, None, &req, Err("busy: lease lapsed".into()));
        }
        if let Err(e) = crate::quorum::admit(self.nodes[n].known, req.epoch)
            && !self.mutant(Mutant::NoQuorum)
        {
            return self.finish(n, None, &req, Err(format!("read-only: {e}")));
        }
        if self.fence_on(n, req.epoch).is_err() {
            return self.finish(n, None, &req, Err("stale epoch".into()));
        }
        let takers: Vec<usize> = req.in_sync.clone();
        if takers.len() < self.k() {
            return self.finish(n, None, &req, Err("read-only".into()));
        }

        let Change::Write { offset, data } = req.change.clone() else {
            return self.finish(n, None, &req, Err("not simulated".into()));
        };
        if self.nodes[n].unsettled.contains(&req.key) {
            if !self.reconcile(n, req.key, req.epoch, &takers, &[]) {
                return self.finish(n, None, &req, Err("busy: fragments disagree".into()));
            }
            self.nodes[n].unsettled.remove(&req.key);
        }
        let k = self.k() as u64;
        let sb = k * FRAGMENT;
        let have = self.held(n, req.key);
        let plan = disperse::plan_write(k, FRAGMENT, offset, data.len() as u64, have);
        // The column as it is, when it exists: decoded from the takers, at the primary's
        // version, else the fragments disagree and are reconciled.
        let old = if have == ABSENT {
            Vec::new()
        } else {
            match self.decode(n, req.key, &takers) {
                Ok((v, bytes)) if v == have => bytes,
                Ok(_) if attempt < 2 => {
                    self.reconcile(n, req.key, req.epoch, &takers, &[]);
                    return self.disperse_start(n, req, attempt + 1);
                }
                Ok(_) => return self.finish(n, None, &req, Err("fragments disagree".into())),
                Err(answered) if answered >= self.k() && attempt < 2 => {
                    self.reconcile(n, req.key, req.epoch, &takers, &[]);
                    return self.disperse_start(n, req, attempt + 1);
                }
                Err(_) => return self.finish(n, None, &req, Err("busy: too few fragments".into())),
            }
        };
        if let Some(image) = self.oracle.image(req.key, have).cloned() {
            let mut padded = image.clone();
            padded.resize(old.len().max(image.len()), 0);
            if old[..] != padded[..old.len()] || padded[old.len()..].iter().any(|b| *b != 0) {
                return self.fail(format!(
                    "primary {n} decoded {}@{have:?} as bytes that are not that version's",
                    req.key
                ));
            }
        }
        let mut column = old.clone();
        let mut image = self
            .oracle
            .image(req.key, have)
            .cloned()
            .unwrap_or_default();
        apply_change(&mut image, &req.change);
        apply_change(&mut column, &req.change);
        let (first, last) = (plan.first, plan.last);
        let mut buf = column;
        buf.resize(((last + 1) * sb) as usize, 0);
        let buf = buf[(first * sb) as usize..((last + 1) * sb) as usize].to_vec();
        let codec = self.codec.as_ref().expect("dispersed");
        let frags = encode_stripes(codec, &buf, FRAGMENT as usize).expect("encode");
        let tag = self.new_tag(n);
        let wrote = (have.0 + 1, tag);
        self.oracle.images.insert((req.key, wrote), (image, have));
        let rule = Rule::Exactly {
            version: wrote.0,
            tag,
            parent: have.1,
        };
        let op = self.next_op;
        self.next_op += 1;
        self.nodes[n].ops.insert(
            op,
            Op::Disperse {
                req: req.clone(),
                takers: takers.clone(),
                wrote,
                parent: have,
                outcomes: Vec::new(),
                attempt,
            },
        );
        for t in takers {
            let msg = Msg::Forward {
                primary: n,
                op,
                member: t,
                index: t,
                key: req.key,
                change: Change::Write {
                    offset: first * FRAGMENT,
                    data: frags[t].clone(),
                },
                rule,
                epoch: req.epoch,
            };
            if t == n {
                self.node_deliver(n, msg);
            } else {
                self.send(Dest::Node(t), msg);
                self.at(
                    FORWARD_TIMEOUT_MS,
                    Ev::Timeout {
                        node: n,
                        op,
                        index: t,
                    },
                );
            }
            if !self.nodes[n].ops.contains_key(&op) {
                return;
            }
        }
    }

    fn disperse_settle(&mut self, n: usize, op: u64) {
        let Some(Op::Disperse {
            req,
            wrote,
            parent,
            outcomes,
            attempt,
            ..
        }) = self.nodes[n].ops.remove(&op)
        else {
            return;
        };
        let k = self.k();
        let decision = disperse::settle(k, outcomes, true);
        if !decision.settled() {
            self.nodes[n].unsettled.insert(req.key);
        }
        self.log(format!(
            "primary {n}: {}@{wrote:?} settles as {decision:?}",
            req.key
        ));
        match decision {
            Settle::Ack => self.finish(n, None, &req, Ok(wrote)),
            Settle::Fail { roll_back, error } => {
                self.roll_back(n, &req, wrote, parent, &roll_back);
                self.finish(n, None, &req, Err(error));
            }
            Settle::Reconcile { roll_back } => {
                self.roll_back(n, &req, wrote, parent, &roll_back);
                self.reconcile(n, req.key, req.epoch, &req.in_sync.clone(), &[]);
                if attempt < 2 {
                    self.disperse_start(n, req, attempt + 1);
                } else {
                    self.finish(n, None, &req, Err("fragments disagree".into()));
                }
            }
            Settle::Repair { from, to, error } => {
                for t in to {
                    self.stats.repairs += 1;
                    let copy = self.rebuild(n, req.key, wrote, &from, t);
                    let ok = copy.is_some_and(|c| self.install(n, t, req.key, req.epoch, c));
                    if !ok {
                        return self.finish(n, None, &req, Err("repair failed".into()));
                    }
                }
                self.finish(n, None, &req, error.map_or(Ok(wrote), Err));
            }
        }
    }

    /// The primary `n` asks members `to` to go back from `wrote` to `parent` on their own
    /// (`MemberRollback`).
    fn roll_back(&mut self, n: usize, req: &Request, wrote: Held, parent: Held, to: &[usize]) {
        for &t in to {
            if !self.call_ok(n, t) || self.fence_on(t, req.epoch).is_err() {
                self.log(format!(
                    "roll back {}@{wrote:?} did not reach node {t}",
                    req.key
                ));
                continue;
            }
            self.undo_on(t, req.key, wrote, parent);
        }
    }

    /// Member `t` goes back from `from` to `to` on what it kept.
    fn undo_on(&mut self, t: usize, key: u64, from: Held, to: Held) -> bool {
        let Some(obj) = self.nodes[t].vol.get(&key).cloned() else {
            return to == ABSENT;
        };
        let kept = obj.undo.as_ref().map(|k| (k.from, k.to));
        self.log(format!(
            "roll back {key}@{from:?} to {to:?} on node {t} (holds {:?}, kept {kept:?})",
            obj.held
        ));
        match member::rollback(obj.held, kept, from, to) {
            Ok(member::Undo::Apply) => {
                self.stats.rollbacks += 1;
                if to == ABSENT {
                    self.nodes[t].vol.remove(&key);
                    self.nodes[t].dur.remove(&key);
                    return true;
                }
                let k = obj.undo.expect("kept");
                let mut back = Obj {
                    held: to,
                    bytes: obj.bytes,
                    undo: None,
                };
                apply_change(
                    &mut back.bytes,
                    &Change::Write {
                        offset: k.offset,
                        data: k.old,
                    },
                );
                back.bytes.resize(k.frag_len as usize, 0);
                self.check_copy(t, key, &back);
                self.nodes[t].vol.insert(key, back.clone());
                self.nodes[t].dur.insert(key, back);
                true
            }
            Ok(member::Undo::Done) => true,
            Err(_) => false,
        }
    }

    /// The primary `n` reconciles `key`'s fragments on `takers` (and `healing`, members out
    /// of sync being healed) at `epoch`: false when the column could not be brought to one
    /// version on K.
    fn reconcile(
        &mut self,
        n: usize,
        key: u64,
        epoch: u64,
        takers: &[usize],
        healing: &[usize],
    ) -> bool {
        let ignore_kept = self.mutant(Mutant::NoUndo);
        let members: Vec<(usize, bool)> = takers
            .iter()
            .map(|t| (*t, true))
            .chain(healing.iter().map(|t| (*t, false)))
            .collect();
        // Each member is fenced at the reconciling primary's epoch as it is read
        // (`MemberStat.set`): a deposed primary's forwards still on their way are refused
        // from then on, so it can no longer count as applied a write this reconcile takes
        // back (seed 805514802 of the 4+2 set, before).
        let mut read: Vec<(usize, Option<bool>)> = Vec::new();
        for (t, taker) in members {
            let reachable = self.call_ok(n, t) && self.fence_on(t, epoch).is_ok();
            read.push((t, reachable.then_some(taker)));
        }
        let stats: Vec<(usize, Option<disperse::Copy>)> = read
            .into_iter()
            .map(|(t, taker)| {
                let st = if let Some(taker) = taker {
                    Some(self.nodes[t].vol.get(&key).map_or(
                        disperse::Copy {
                            held: ABSENT,
                            frag_len: 0,
                            undo: None,
                            taker,
                        },
                        |o| {
                            disperse::Copy {
                                held: o.held,
                                frag_len: o.bytes.len() as u64,
                                undo: o
                                    .undo
                                    .as_ref()
                                    .filter(|_| !ignore_kept)
                                    .map(|k| (k.to, k.frag_len)),
                                taker,
                            }
                        },
                    ))
                } else {
                    None
                };
                (t, st)
            })
            .collect();
        let Some(r) = disperse::reconcile(self.k(), &stats) else {
            self.log(format!("reconcile of {}: no version on K: {stats:?}", key));
            return false;
        };
        self.log(format!("reconcile of {}: {r:?}", key));
        for &t in &r.undo {
            let from = self.held(t, key);
            if !self.call_ok(n, t)
                || self.fence_on(t, epoch).is_err()
                || !self.undo_on(t, key, from, r.held)
            {
                // Not back: the sources are short; a later attempt reconciles again.
                return false;
            }
        }
        for t in r.fix {
            self.stats.repairs += 1;
            let copy = self.rebuild(n, key, r.held, &r.sources, t);
            if !copy.is_some_and(|c| self.install(n, t, key, epoch, c)) {
                return false;
            }
        }
        true
    }

    // ---- clients ----

    fn refresh(&mut self, c: usize) {
        self.clients[c].refreshed = self.now;
        let in_sync = (0..self.n()).filter(|x| self.group.in_sync[*x]).collect();
        self.clients[c].view = (self.group.epoch, self.group.primary, in_sync);
    }

    fn client_tick(&mut self, c: usize) {
        if self.clients[c].pending.is_some() {
            return;
        }
        let stop = !self.faults && self.now > self.cfg.duration_ms + 10_000;
        if stop {
            return;
        }
        let reader = c == 0;
        if (!reader && self.rng.chance(10)) || self.now > self.clients[c].refreshed + 10_000 {
            self.refresh(c);
        }
        let key = self.rng.below(KEYS);
        if reader || self.rng.chance(40) {
            self.client_read(c, key);
            let d = 1 + self.rng.below(50);
            self.at(d, Ev::ClientTick(c));
            return;
        }
        let change = match self.cfg.kind {
            Kind::Replica { .. } if self.rng.chance(10) => Change::Truncate {
                len: self.rng.below(REPLICA_MAX),
            },
            Kind::Replica { .. } => {
                let offset = self.rng.below(REPLICA_MAX - 8);
                let len = 1 + self.rng.below(8);
                Change::Write {
                    offset,
                    data: (0..len).map(|_| self.rng.below(255) as u8 + 1).collect(),
                }
            }
            Kind::Disperse { k, .. } => {
                let sb = k as u64 * FRAGMENT;
                let offset = self.rng.below(2 * sb - 1);
                let len = 1 + self.rng.below((2 * sb - offset).min(sb + 3));
                Change::Write {
                    offset,
                    data: (0..len).map(|_| self.rng.below(255) as u8 + 1).collect(),
                }
            }
        };
        let req = Request {
            client: c,
            attempt: 0,
            key,
            change,
            epoch: 0,
            in_sync: Vec::new(),
        };
        self.stats.writes += 1;
        self.clients[c].pending = Some((req, self.now, 0));
        self.client_send(c);
    }

    fn client_send(&mut self, c: usize) {
        let (epoch, primary, in_sync) = self.clients[c].view.clone();
        let Some((mut req, since, tries)) = self.clients[c].pending.clone() else {
            return;
        };
        if (in_sync.len() < self.quorum() && !self.mutant(Mutant::NoQuorum)) || tries > 12 {
            // Read-only as this client sees the set, or out of retries: give up (the
            // outcome of earlier attempts stays unknown).
            self.stats.failed += 1;
            self.clients[c].pending = None;
            self.refresh(c);
            let d = 100 + self.rng.below(400);
            self.at(d, Ev::ClientTick(c));
            return;
        }
        self.clients[c].attempt += 1;
        req.attempt = self.clients[c].attempt;
        req.epoch = epoch;
        req.in_sync = in_sync;
        self.clients[c].pending = Some((req.clone(), since, tries + 1));
        self.send(Dest::Node(primary), Msg::ToPrimary(req.clone()));
        self.at(
            CLIENT_TIMEOUT_MS,
            Ev::ClientTimeout {
                client: c,
                attempt: req.attempt,
            },
        );
    }

    fn client_retry(&mut self, c: usize) {
        self.refresh(c);
        self.client_send(c);
    }

    fn client_reply(&mut self, c: usize, attempt: u64, result: Result<Held, String>) {
        if self.clients[c].attempt != attempt {
            return;
        }
        let Some((req, _, _)) = self.clients[c].pending.clone() else {
            return;
        };
        match result {
            Ok(held) => {
                self.stats.acked += 1;
                self.log(format!("client {c} acked {}@{held:?}", req.key));
                if !self.oracle.images.contains_key(&(req.key, held)) {
                    return self.fail(format!(
                        "acknowledged {}@{held:?}, which no primary made",
                        req.key
                    ));
                }
                // An acknowledged write reached at least the write quorum, so that it
                // survives one fault more than the set can take.
                let reached = self
                    .oracle
                    .applied
                    .get(&(req.key, held))
                    .map_or(0, |m| m.len());
                if reached < self.quorum() {
                    return self.fail(format!(
                        "acknowledged {}@{held:?}, which reached {reached} members, below the write quorum of {}",
                        req.key,
                        self.quorum()
                    ));
                }
                match self.oracle.acked.get(&req.key).copied() {
                    Some(top) if self.oracle.contains(req.key, top, held) => {}
                    Some(top) if !self.oracle.contains(req.key, held, top) => {
                        return self.fail(format!(
                            "acknowledged {}@{held:?}, which lacks the acknowledged {top:?}",
                            req.key
                        ));
                    }
                    _ => {
                        self.oracle.acked.insert(req.key, held);
                    }
                }
                // Every member the write went to holds it now (the in-sync check follows).
                self.clients[c].pending = None;
                let d = 1 + self.rng.below(50);
                self.at(d, Ev::ClientTick(c));
            }
            Err(e) => {
                self.log(format!("client {c} attempt {attempt}: {e}"));
                self.client_retry(c);
            }
        }
    }

    /// Whether member `t` serves a client read now (lease, standing, reported).
    fn serves_reads(&self, t: usize) -> bool {
        if !self.reachable(t) || !self.lease_held(t) {
            return false;
        }
        if self.mutant(Mutant::ReadsOutOfSync) {
            return true;
        }
        !self.nodes[t].unreported && self.nodes[t].standing == Some(true)
    }

    fn client_read(&mut self, c: usize, key: u64) {
        let (_, _, in_sync) = self.clients[c].view.clone();
        let result = match self.cfg.kind {
            Kind::Replica { .. } => {
                let mut order = in_sync.clone();
                let start = self.rng.below(order.len() as u64) as usize;
                order.rotate_left(start);
                let mut got = None;
                for t in order {
                    if self.faults && self.rng.chance(2) {
                        continue;
                    }
                    if self.serves_reads(t) {
                        got = self.read_copy(t, key);
                        if got.is_some() {
                            break;
                        }
                    }
                }
                got
            }
            Kind::Disperse { .. } => {
                let mut frags = Vec::new();
                for t in 0..self.n() {
                    let ok = in_sync.contains(&t) && self.serves_reads(t);
                    frags.push(if ok { self.read_copy(t, key) } else { None });
                }
                self.decode_frags(&frags).ok()
            }
        };
        let Some((held, bytes)) = result else {
            return;
        };
        self.stats.reads += 1;
        self.check_read(c, key, held, &bytes);
    }

    fn check_read(&mut self, c: usize, key: u64, held: Held, bytes: &[u8]) {
        let Some(image) = self.oracle.image(key, held).cloned() else {
            return self.fail(format!(
                "client {c} read {key}@{held:?}, a version no primary made"
            ));
        };
        let mut padded = image.clone();
        padded.resize(padded.len().max(bytes.len()), 0);
        let same = match self.cfg.kind {
            Kind::Replica { .. } => bytes == image.as_slice(),
            Kind::Disperse { .. } => padded[..bytes.len()] == *bytes && bytes.len() >= image.len(),
        };
        if !same {
            return self.fail(format!(
                "client {c} read {key}@{held:?} as bytes that are not that version's"
            ));
        }
        if let Some(w) = self.oracle.acked.get(&key).copied()
            && !self.oracle.contains(key, held, w)
        {
            self.fail(format!(
                "client {c} read {key}@{held:?}, which lacks the acknowledged write {w:?}"
            ));
        }
    }

    /// Every member the group counts in sync, up and reported, holds every acknowledged
    /// write (a disperse member: its fragment of a version that contains them).
    fn check_in_sync(&mut self) {
        if self.failure.is_some() {
            return;
        }
        let acked: Vec<(u64, Held)> = self.oracle.acked.iter().map(|(k, h)| (*k, *h)).collect();
        for t in 0..self.n() {
            if !self.group.in_sync[t] || !self.nodes[t].up || self.nodes[t].unreported {
                continue;
            }
            for &(key, w) in &acked {
                let h = self.held(t, key);
                if !self.oracle.contains(key, h, w) {
                    return self.fail(format!(
                        "node {t} is counted in sync but holds {key}@{h:?}, without the acknowledged {w:?}"
                    ));
                }
            }
        }
    }

    fn final_checks(&mut self) {
        if !self.settled() {
            let in_sync = self.group.in_sync.clone();
            return self.fail(format!(
                "the set did not heal after the faults ended (in sync: {in_sync:?})"
            ));
        }
        for key in 0..KEYS {
            let copies: Vec<Held> = (0..self.n()).map(|t| self.held(t, key)).collect();
            if copies.iter().any(|h| *h != copies[0]) {
                return self.fail(format!(
                    "after heal the copies of {key} disagree: {copies:?}"
                ));
            }
            for t in 0..self.n() {
                if let Some(o) = self.nodes[t].vol.get(&key).cloned() {
                    self.check_copy(t, key, &o);
                }
            }
            for c in 0..CLIENTS {
                self.refresh(c);
                self.client_read(c, key);
            }
        }
    }
}
