//! Runs the set simulator over many seeds (a fresh base seed each run, printed; set
//! `BRICKFS_SIM_SEED` to replay one, `BRICKFS_SIM_BASE` to sweep from a given base,
//! `BRICKFS_SIM_SEEDS` for how many, `BRICKFS_SIM_TRACE` for how many events a failure
//! shows), and shows that each broken rule is caught.

use brickfs_set::sim::{Config, Kind, Mutant, run};

/// The first seed: `BRICKFS_SIM_SEED` (replay that one seed), else `BRICKFS_SIM_BASE`, else
/// fresh from the clock.
fn base_seed() -> u64 {
    for var in ["BRICKFS_SIM_SEED", "BRICKFS_SIM_BASE"] {
        if let Ok(s) = std::env::var(var) {
            return s.parse().unwrap_or_else(|_| panic!("{var} is a number"));
        }
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    t.as_nanos() as u64 % 1_000_000_007
}

/// How many seeds: one to replay, else `BRICKFS_SIM_SEEDS`, else `default`.
fn seeds(default: u64) -> u64 {
    if std::env::var("BRICKFS_SIM_SEED").is_ok() {
        return 1;
    }
    std::env::var("BRICKFS_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// How many events a failure shows (`BRICKFS_SIM_TRACE`, 80 by default).
fn trace_events() -> usize {
    std::env::var("BRICKFS_SIM_TRACE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(80)
}

fn sweep(kind: Kind, n: u64) {
    let base = base_seed();
    eprintln!("{kind:?}: {n} seeds from BRICKFS_SIM_BASE={base}");
    let mut total = brickfs_set::sim::Stats::default();
    for seed in base..base + n {
        let cfg = Config {
            seed,
            kind,
            duration_ms: 60_000,
            mutant: None,
            trace_events: trace_events(),
            late_forwards: true,
            quorum: None,
        };
        match run(cfg) {
            Ok(s) => {
                total.acked += s.acked;
                total.reads += s.reads;
                total.crashes += s.crashes;
                total.epochs += s.epochs;
                total.heals += s.heals;
                total.rollbacks += s.rollbacks;
                total.repairs += s.repairs;
                total.flips += s.flips;
                total.events += s.events;
            }
            Err(f) => panic!(
                "{f}\nreplay: BRICKFS_SIM_SEED={seed} cargo test -p brickfs-set --test simulate {}",
                match kind {
                    Kind::Replica { .. } => "a_replicated",
                    Kind::Disperse { .. } => "a_dispersed",
                }
            ),
        }
    }
    eprintln!("{total:?}");
    assert!(
        total.acked > n * 10,
        "the clients got few writes through: {total:?}"
    );
    assert!(
        total.heals > 0 && total.epochs > 0,
        "no member ever left and healed: {total:?}"
    );
    assert!(n < 50 || total.flips > 0, "no bit ever flipped: {total:?}");
}

/// A replica-3 set, 300 fresh seeds a run (the base is printed).
#[test]
fn a_replicated_set_never_loses_or_misreads_an_acknowledged_write() {
    sweep(Kind::Replica { members: 3 }, seeds(300));
}

/// A dispersed 4+2 set, 150 fresh seeds a run (the base is printed).
#[test]
fn a_dispersed_set_never_loses_or_misreads_an_acknowledged_write() {
    sweep(Kind::Disperse { k: 4, m: 2 }, seeds(150));
}

/// Each broken rule makes the simulator fail within a bounded number of seeds.
#[test]
fn the_simulator_catches_each_broken_rule() {
    let base = base_seed();
    let cases = [
        (Mutant::NoFence, Kind::Replica { members: 3 }),
        (Mutant::NoParentCheck, Kind::Replica { members: 3 }),
        (Mutant::LeaseFromReply, Kind::Replica { members: 3 }),
        (Mutant::ReadsOutOfSync, Kind::Replica { members: 3 }),
        (Mutant::NoRestartReport, Kind::Replica { members: 3 }),
        (Mutant::NoUndo, Kind::Disperse { k: 4, m: 2 }),
        (Mutant::NoDrain, Kind::Replica { members: 3 }),
        (Mutant::NoQuorum, Kind::Replica { members: 3 }),
        (Mutant::NoQuorum, Kind::Disperse { k: 4, m: 2 }),
        (Mutant::NoChecksum, Kind::Replica { members: 3 }),
        (Mutant::NoChecksum, Kind::Disperse { k: 4, m: 2 }),
    ];
    let mut missed = Vec::new();
    for (mutant, kind) in cases {
        let caught = (base..base + 2000).find_map(|seed| {
            run(Config {
                seed,
                kind,
                duration_ms: 60_000,
                mutant: Some(mutant),
                trace_events: trace_events(),
                late_forwards: true,
                // Writing below quorum needs the set below it: with one fault at a time
                // that happens at once only with every member required.
                quorum: (mutant == Mutant::NoQuorum).then_some(match kind {
                    Kind::Replica { members } => members,
                    Kind::Disperse { k, m } => k + m,
                }),
            })
            .err()
        });
        match caught {
            Some(f) => eprintln!("{mutant:?} caught at seed {}: {}", f.seed, f.what),
            None => missed.push(mutant),
        }
    }
    assert!(
        missed.is_empty(),
        "not caught in 2000 seeds from {base}: {missed:?}"
    );
}
