//! Latency and throughput over time, fault windows shaded, as SVG (in the manner of
//! Jepsen's performance graphs). Top: one dot per completed operation at its completion
//! time, log-scale latency, coloured by outcome. Bottom: completed operations per second.

use crate::checker::calls;
use crate::history::{Op, Type, Value};
use crate::nemesis::Window;
use std::fmt::Write;

const W: f64 = 1100.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP_Y: f64 = 40.0;
const TOP_H: f64 = 300.0;
const BOT_Y: f64 = 390.0;
const BOT_H: f64 = 160.0;
const H: f64 = 600.0;

pub fn svg(ops: &[Op], windows: &[Window], title: &str) -> String {
    let calls = calls(ops);
    let points: Vec<(f64, f64, Type, &'static str)> = calls
        .iter()
        .filter_map(|c| {
            let d = c.done?;
            let f = match c.invoke.value {
                Value::Send { .. } => "send",
                Value::Read { .. } => "read",
                Value::Recent { .. } => "recent",
                _ => "other",
            };
            Some((d.time as f64 / 1e9, (d.time - c.invoke.time) as f64 / 1e6, d.kind, f))
        })
        .collect();
    let t_max =
        points.iter().map(|p| p.0).fold(1.0_f64, f64::max).max(windows.iter().map(|w| w.end).fold(0.0, f64::max));
    let x = |t: f64| LEFT + (W - LEFT - RIGHT) * t / t_max;
    let (lmin, lmax) = (-1.0_f64, 4.0_f64); // 0.1 ms .. 10 s
    let ly = |ms: f64| TOP_Y + TOP_H - TOP_H * ((ms.max(0.1).log10() - lmin) / (lmax - lmin)).clamp(0.0, 1.0);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        s,
        r#"<rect width="{W}" height="{H}" fill="white"/><text x="{LEFT}" y="20" font-size="14">{}</text>"#,
        escape(title)
    );
    for w in windows {
        let (x0, x1) = (x(w.start), x(w.end));
        let _ = write!(
            s,
            r##"<rect x="{x0:.1}" y="{TOP_Y}" width="{:.1}" height="{:.1}" fill="#f4a6a6" opacity="0.35"><title>{}</title></rect>"##,
            (x1 - x0).max(1.0),
            BOT_Y + BOT_H - TOP_Y,
            escape(&w.fault)
        );
        let _ = write!(
            s,
            r##"<text x="{x0:.1}" y="{:.1}" fill="#a33" font-size="9">{}</text>"##,
            TOP_Y - 4.0,
            escape(&w.family)
        );
    }
    // Latency axis.
    for e in -1..=4 {
        let y = ly(10f64.powi(e));
        let label = if e < 0 {
            "0.1 ms".to_string()
        } else if e < 3 {
            format!("{} ms", 10i64.pow(e as u32))
        } else {
            format!("{} s", 10i64.pow(e as u32 - 3))
        };
        let _ = write!(
            s,
            r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="4" y="{:.1}">{label}</text>"##,
            W - RIGHT,
            y + 4.0
        );
    }
    for (t, ms, kind, f) in &points {
        let color = match kind {
            Type::Ok => "#3366cc",
            Type::Info => "#ff9900",
            _ => "#cc0000",
        };
        let r = if *f == "send" { 1.6 } else { 1.1 };
        let _ = write!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="{r}" fill="{color}" opacity="0.6"/>"#, x(*t), ly(*ms));
    }
    // Throughput per second.
    let buckets = t_max.ceil() as usize + 1;
    let mut ok = vec![0u32; buckets];
    for (t, _, kind, _) in &points {
        if *kind == Type::Ok {
            ok[*t as usize] += 1;
        }
    }
    let peak = ok.iter().copied().max().unwrap_or(1).max(1) as f64;
    let by = |v: f64| BOT_Y + BOT_H - BOT_H * v / peak;
    let path: Vec<String> =
        ok.iter().enumerate().map(|(i, v)| format!("{:.1},{:.1}", x(i as f64 + 0.5), by(*v as f64))).collect();
    let _ = write!(s, r##"<polyline points="{}" fill="none" stroke="#2a7" stroke-width="1.5"/>"##, path.join(" "));
    let _ = write!(
        s,
        r##"<text x="4" y="{:.1}">{peak:.0}/s</text><text x="4" y="{:.1}">0/s</text>"##,
        BOT_Y + 4.0,
        BOT_Y + BOT_H
    );
    let _ = write!(
        s,
        r##"<line x1="{LEFT}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#999"/>"##,
        W - RIGHT,
        BOT_Y + BOT_H,
        BOT_Y + BOT_H
    );
    for i in (0..=t_max as usize).step_by(10.max(t_max as usize / 12 / 10 * 10)) {
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{i}s</text>"#,
            x(i as f64),
            BOT_Y + BOT_H + 14.0
        );
    }
    let _ = write!(
        s,
        r##"<text x="{LEFT}" y="{:.1}">latency per operation (blue ok, orange info, red fail); below: ok operations per second; shaded: faults</text></svg>"##,
        BOT_Y - 14.0
    );
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
