//! Prometheus metrics without a dependency: per-operation counters (calls, errors, bytes in
//! and out) with a latency histogram, rendered in the text exposition format, and a minimal
//! HTTP server for `GET /metrics`. brickd counts the requests it serves, mountd the volume
//! calls it makes; each adds its own gauges when rendering.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
pub const BUCKETS: [f64; 14] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One operation's counters.
#[derive(Default)]
struct Op {
    calls: AtomicU64,
    errors: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    buckets: [AtomicU64; BUCKETS.len()],
    sum_ns: AtomicU64,
}

/// Counters per operation name.
#[derive(Default)]
pub struct OpMetrics {
    /// Read-locked on every call; written once per new operation name.
    ops: RwLock<BTreeMap<&'static str, Arc<Op>>>,
}

impl OpMetrics {
    fn op(&self, name: &'static str) -> Arc<Op> {
        if let Some(op) = self.ops.read().unwrap_or_else(|p| p.into_inner()).get(name) {
            return op.clone();
        }
        self.ops
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name)
            .or_default()
            .clone()
    }

    /// Records one call of `name`: how long it took, whether it failed, the bytes it took in
    /// and gave out.
    pub fn record(
        &self,
        name: &'static str,
        took: Duration,
        ok: bool,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        let op = self.op(name);
        op.calls.fetch_add(1, Ordering::Relaxed);
        if !ok {
            op.errors.fetch_add(1, Ordering::Relaxed);
        }
        op.bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
        op.bytes_out.fetch_add(bytes_out, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        for (b, bound) in op.buckets.iter().zip(BUCKETS) {
            if secs <= bound {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        op.sum_ns.fetch_add(
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Appends the counters as `PREFIX_ops_total`, `PREFIX_op_errors_total`,
    /// `PREFIX_bytes_in_total`, `PREFIX_bytes_out_total` and the histogram
    /// `PREFIX_op_seconds`, each labelled `op="NAME"`.
    pub fn render(&self, prefix: &str, out: &mut String) {
        let ops: Vec<(&'static str, Arc<Op>)> = self
            .ops
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let counter = |out: &mut String, name: &str, help: &str, get: &dyn Fn(&Op) -> u64| {
            let _ = writeln!(out, "# HELP {prefix}_{name} {help}");
            let _ = writeln!(out, "# TYPE {prefix}_{name} counter");
            for (op, o) in &ops {
                let _ = writeln!(out, "{prefix}_{name}{{op=\"{op}\"}} {}", get(o));
            }
        };
        counter(out, "ops_total", "Operations served.", &|o| {
            o.calls.load(Ordering::Relaxed)
        });
        counter(out, "op_errors_total", "Operations that failed.", &|o| {
            o.errors.load(Ordering::Relaxed)
        });
        counter(out, "bytes_in_total", "Data bytes received.", &|o| {
            o.bytes_in.load(Ordering::Relaxed)
        });
        counter(out, "bytes_out_total", "Data bytes sent.", &|o| {
            o.bytes_out.load(Ordering::Relaxed)
        });
        let _ = writeln!(out, "# HELP {prefix}_op_seconds Operation latency.");
        let _ = writeln!(out, "# TYPE {prefix}_op_seconds histogram");
        for (op, o) in &ops {
            for (b, bound) in o.buckets.iter().zip(BUCKETS) {
                let _ = writeln!(
                    out,
                    "{prefix}_op_seconds_bucket{{op=\"{op}\",le=\"{bound}\"}} {}",
                    b.load(Ordering::Relaxed)
                );
            }
            let calls = o.calls.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{prefix}_op_seconds_bucket{{op=\"{op}\",le=\"+Inf\"}} {calls}"
            );
            let _ = writeln!(
                out,
                "{prefix}_op_seconds_sum{{op=\"{op}\"}} {}",
                o.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
            );
            let _ = writeln!(out, "{prefix}_op_seconds_count{{op=\"{op}\"}} {calls}");
        }
    }
}

/// Appends one gauge.
pub fn gauge(out: &mut String, name: &str, help: &str, labels: &str, value: f64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// Serves `GET /metrics` on `listener` with what `render` returns, until the task is dropped.
/// Anything else gets 404; a request head over 16 KiB or slower than 5 s is dropped. In a
/// cluster with a key: HTTPS and the `metrics` token (see `crate::http`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) {
    use crate::http;
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let served = async {
                let (mut conn, tls) = http::accept(conn).await.ok()?;
                let req = http::read_request(&mut conn, 0).await.ok()??;
                Some((conn, tls, req))
            };
            let Ok(Some((mut conn, tls, req))) =
                tokio::time::timeout(Duration::from_secs(5), served).await
            else {
                return;
            };
            let (status, extra, body) = match http::authorize(&req, tls, "metrics") {
                Err((status, why)) => (status, Vec::new(), format!("{why}\n")),
                Ok(extra) if req.method == "GET" && req.path == "/metrics" => {
                    (200, extra, render())
                }
                Ok(extra) => (404, extra, "not found: try GET /metrics\n".to_string()),
            };
            let _ = http::reply(
                &mut conn,
                status,
                "text/plain; version=0.0.4",
                &extra,
                &body,
            )
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_histograms_render_in_the_text_format() {
        let m = OpMetrics::default();
        m.record("Write", Duration::from_millis(3), true, 100, 0);
        m.record("Write", Duration::from_millis(30), false, 50, 0);
        m.record("Read", Duration::from_micros(100), true, 0, 4096);
        let mut out = String::new();
        m.render("brickd", &mut out);
        for line in [
            "brickd_ops_total{op=\"Write\"} 2",
            "brickd_op_errors_total{op=\"Write\"} 1",
            "brickd_bytes_in_total{op=\"Write\"} 150",
            "brickd_bytes_out_total{op=\"Read\"} 4096",
            "brickd_op_seconds_bucket{op=\"Write\",le=\"0.005\"} 1",
            "brickd_op_seconds_bucket{op=\"Write\",le=\"0.05\"} 2",
            "brickd_op_seconds_bucket{op=\"Write\",le=\"+Inf\"} 2",
            "brickd_op_seconds_count{op=\"Read\"} 1",
            "# TYPE brickd_op_seconds histogram",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing from\n{out}");
        }
        gauge(&mut out, "brickd_raft_term", "Term.", "", 3.0);
        assert!(out.ends_with("brickd_raft_term 3\n"), "{out}");
    }
}
