//! The end of a benchmark run: a table on stdout, a JSON file, and an SVG plot of p99
//! latency against achieved throughput for every system measured.

use super::load::StepSummary;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

#[derive(Debug, Clone, Serialize)]
pub struct DiskUsage {
    pub node: String,
    pub bytes: u64,
    pub bytes_per_message: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub started_at: String,
    pub machine: String,
    pub command: String,
    pub steps: Vec<StepSummary>,
    pub disk: Vec<DiskUsage>,
    /// Per system: the highest offered rate with no errors and p99 ≤ 50 ms.
    pub best_rate_at_p99_50ms: BTreeMap<String, f64>,
}

/// Highest offered rate per system (send/put steps) with no errors, nothing refused, and
/// p99 ≤ `p99_ms`.
pub fn best_rates(steps: &[StepSummary], p99_ms: f64) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in steps.iter().filter(|s| s.op != "history") {
        if s.errors == 0 && s.refused == 0 && s.p99_ms <= p99_ms {
            let e = out.entry(s.system.clone()).or_insert(0.0f64);
            *e = e.max(s.offered_per_s);
        }
    }
    out
}

pub fn table(steps: &[StepSummary]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<10} {:<8} {:>9} {:>9} {:>8} {:>7} {:>8} {:>8} {:>8} {:>9} {:>9}",
        "system",
        "op",
        "offered/s",
        "achieved",
        "refused",
        "errors",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "max ms",
        "refuse p99"
    );
    for s in steps {
        let _ = writeln!(
            t,
            "{:<10} {:<8} {:>9.0} {:>9.0} {:>8} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>9.1} {:>9}",
            s.system,
            s.op,
            s.offered_per_s,
            s.achieved_per_s,
            s.refused,
            s.errors,
            s.p50_ms,
            s.p99_ms,
            s.p999_ms,
            s.max_ms,
            s.refused_p99_ms.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into()),
        );
    }
    t
}

/// p99 latency (log scale) against achieved throughput, one line per system.
pub fn svg(steps: &[StepSummary], title: &str) -> String {
    let (w, h, ml, mb, mt, mr) = (760.0, 440.0, 70.0, 50.0, 40.0, 150.0);
    let mut series: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for s in steps.iter().filter(|s| s.op != "history" && s.ok > 0) {
        series.entry(&s.system).or_default().push((s.achieved_per_s, s.p99_ms.max(0.1)));
    }
    let xmax = steps.iter().map(|s| s.achieved_per_s).fold(1.0, f64::max) * 1.1;
    let (ymin, ymax) = (0.1f64, steps.iter().map(|s| s.p99_ms).fold(100.0, f64::max) * 1.5);
    let x = |v: f64| ml + v / xmax * (w - ml - mr);
    let y = |v: f64| h - mb - (v.max(ymin).ln() - ymin.ln()) / (ymax.ln() - ymin.ln()) * (h - mb - mt);
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(o, r#"<text x="{}" y="22" font-size="15">{}</text>"#, ml, xml(title));
    let _ = writeln!(o, r#"<line x1="{ml}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#, h - mb, w - mr, h - mb);
    let _ = writeln!(o, r#"<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{}" stroke="black"/>"#, h - mb);
    for i in 0..=5 {
        let v = xmax / 5.0 * i as f64;
        let _ = writeln!(o, r#"<text x="{:.1}" y="{}" text-anchor="middle">{:.0}</text>"#, x(v), h - mb + 16.0, v);
    }
    let mut tick = 0.1;
    while tick <= ymax {
        let _ = writeln!(o, r##"<line x1="{ml}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#ddd"/>"##, y(tick), w - mr);
        let _ = writeln!(o, r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#, ml - 6.0, y(tick) + 4.0, tick);
        tick *= 10.0;
    }
    let _ = writeln!(
        o,
        r#"<line x1="{ml}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="red" stroke-dasharray="4 3"/>"#,
        y(50.0),
        w - mr
    );
    let _ = writeln!(o, r#"<text x="{}" y="{:.1}" fill="red">p99 50 ms</text>"#, w - mr + 4.0, y(50.0) + 4.0);
    let _ = writeln!(
        o,
        r#"<text x="{}" y="{}" text-anchor="middle">achieved operations per second</text>"#,
        (ml + w - mr) / 2.0,
        h - 12.0
    );
    let _ = writeln!(
        o,
        r#"<text x="16" y="{}" transform="rotate(-90 16 {0})" text-anchor="middle">p99 latency, ms (log)</text>"#,
        (mt + h - mb) / 2.0
    );
    let colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"];
    for (k, (name, pts)) in series.iter().enumerate() {
        let c = colours[k % colours.len()];
        let path: Vec<String> = pts.iter().map(|(a, b)| format!("{:.1},{:.1}", x(*a), y(*b))).collect();
        let _ = writeln!(o, r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#, path.join(" "));
        for (a, b) in pts {
            let _ = writeln!(o, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"/>"#, x(*a), y(*b));
        }
        let ly = mt + 20.0 * k as f64;
        let _ = writeln!(o, r#"<rect x="{}" y="{}" width="12" height="12" fill="{c}"/>"#, w - mr + 10.0, ly);
        let _ = writeln!(o, r#"<text x="{}" y="{}">{}</text>"#, w - mr + 28.0, ly + 11.0, xml(name));
    }
    o.push_str("</svg>\n");
    o
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(system: &str, offered: f64, p99: f64, errors: u64, refused: u64) -> StepSummary {
        StepSummary {
            system: system.into(),
            op: "send".into(),
            offered_per_s: offered,
            achieved_per_s: offered,
            ok: 10,
            refused,
            errors,
            error_kinds: BTreeMap::new(),
            p50_ms: 1.0,
            p99_ms: p99,
            p999_ms: p99,
            max_ms: p99,
            refused_p99_ms: None,
        }
    }

    #[test]
    fn best_rate_needs_p99_within_bound_and_no_errors_or_refusals() {
        let steps = vec![
            step("a", 1000.0, 5.0, 0, 0),
            step("a", 2000.0, 40.0, 0, 0),
            step("a", 4000.0, 45.0, 3, 0),
            step("a", 8000.0, 30.0, 0, 9),
            step("b", 1000.0, 60.0, 0, 0),
        ];
        let best = best_rates(&steps, 50.0);
        assert_eq!(best.get("a"), Some(&2000.0));
        assert_eq!(best.get("b"), None);
        let plot = svg(&steps, "t <x>");
        assert!(plot.starts_with("<svg") && plot.contains("t &lt;x&gt;") && plot.contains("polyline"));
    }
}
