//! The open-loop generator: operations start at a fixed offered rate whatever the system
//! does, and each latency is measured from the operation's *intended* start, so time spent
//! queued (in the system or in the generator) is counted (no coordinated omission).

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How one operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Refused at once by admission control (`503 overloaded`): not an error of the system,
    /// but not goodput either.
    Refused,
    /// Anything else, by kind (e.g. `504 timeout`, `transport`).
    Error(String),
}

/// One step of a sweep: one system, one operation kind, one offered rate.
pub struct Step {
    pub system: String,
    pub op: String,
    pub offered: f64,
    pub seconds: f64,
    pub ok: u64,
    pub refused: u64,
    pub errors: BTreeMap<String, u64>,
    /// Latencies of successful operations, microseconds from the intended start.
    pub hist: Histogram<u64>,
    /// Latencies of refused operations (how fast the refusal came).
    pub refused_hist: Histogram<u64>,
}

/// The figures of a step, as printed and written to JSON.
#[derive(Debug, Clone, Serialize)]
pub struct StepSummary {
    pub system: String,
    pub op: String,
    pub offered_per_s: f64,
    pub achieved_per_s: f64,
    pub ok: u64,
    pub refused: u64,
    pub errors: u64,
    pub error_kinds: BTreeMap<String, u64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub refused_p99_ms: Option<f64>,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl Step {
    pub fn summary(&self) -> StepSummary {
        let q = |h: &Histogram<u64>, p: f64| if h.is_empty() { 0.0 } else { ms(h.value_at_quantile(p)) };
        StepSummary {
            system: self.system.clone(),
            op: self.op.clone(),
            offered_per_s: self.offered,
            achieved_per_s: self.ok as f64 / self.seconds,
            ok: self.ok,
            refused: self.refused,
            errors: self.errors.values().sum(),
            error_kinds: self.errors.clone(),
            p50_ms: q(&self.hist, 0.5),
            p99_ms: q(&self.hist, 0.99),
            p999_ms: q(&self.hist, 0.999),
            max_ms: if self.hist.is_empty() { 0.0 } else { ms(self.hist.max()) },
            refused_p99_ms: (!self.refused_hist.is_empty()).then(|| q(&self.refused_hist, 0.99)),
        }
    }
}

/// Runs `op(i)` for i = 0.. at `rate` per second for `seconds`, each started at its intended
/// time (late ones at once), at most `max_inflight` outstanding (beyond that an operation
/// counts as the error `generator saturated`). Waits up to `drain` for stragglers.
pub async fn open_loop<F, Fut>(
    label: (&str, &str),
    rate: f64,
    seconds: f64,
    max_inflight: usize,
    drain: Duration,
    progress: bool,
    op: F,
) -> Step
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let total = (rate * seconds).round().max(1.0) as u64;
    let bar = if progress { ProgressBar::new(total) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{prefix:>22} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{} {} @{rate}/s", label.0, label.1));
    let op = Arc::new(op);
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, Outcome)>();
    let inflight = Arc::new(tokio::sync::Semaphore::new(max_inflight));
    let t0 = Instant::now();
    let interval = 1.0 / rate;
    let mut step = Step {
        system: label.0.to_string(),
        op: label.1.to_string(),
        offered: rate,
        seconds,
        ok: 0,
        refused: 0,
        errors: BTreeMap::new(),
        hist: hist(),
        refused_hist: hist(),
    };
    let record = |step: &mut Step, us: u64, o: Outcome| match o {
        Outcome::Ok => {
            step.ok += 1;
            let _ = step.hist.record(us.max(1));
        }
        Outcome::Refused => {
            step.refused += 1;
            let _ = step.refused_hist.record(us.max(1));
        }
        Outcome::Error(kind) => *step.errors.entry(kind).or_default() += 1,
    };
    let mut done = 0u64;
    let mut i = 0u64;
    while i < total {
        let due = ((t0.elapsed().as_secs_f64() / interval) as u64 + 1).min(total);
        while i < due {
            let intended = t0 + Duration::from_secs_f64(i as f64 * interval);
            match inflight.clone().try_acquire_owned() {
                Ok(permit) => {
                    let (op, tx) = (op.clone(), tx.clone());
                    tokio::spawn(async move {
                        let o = op(i).await;
                        let _ = tx.send((intended.elapsed().as_micros() as u64, o));
                        drop(permit);
                    });
                }
                Err(_) => {
                    let _ = tx.send((0, Outcome::Error("generator saturated".into())));
                }
            }
            i += 1;
        }
        while let Ok((us, o)) = rx.try_recv() {
            record(&mut step, us, o);
            done += 1;
        }
        bar.set_position(done);
        bar.set_message(format!("ok {} refused {} err {}", step.ok, step.refused, step.errors.values().sum::<u64>()));
        if i < total {
            tokio::time::sleep_until(t0 + Duration::from_secs_f64(i as f64 * interval)).await;
        }
    }
    drop(tx);
    let deadline = Instant::now() + drain;
    while done < total {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((us, o))) => {
                record(&mut step, us, o);
                done += 1;
                bar.set_position(done);
            }
            _ => break,
        }
    }
    if done < total {
        *step.errors.entry("no reply before the drain deadline".into()).or_default() += total - done;
    }
    bar.finish_and_clear();
    step
}
