//! Rendering a [`SimReport`]: a text summary table and a self-contained HTML page with inline
//! SVG plots (no scripts, fonts or network).

use crate::metrics::SimReport;
use std::fmt::Write;

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Milliseconds as a short human duration (`850ms`, `12.3s`, `4.5m`, `2.1h`).
pub fn human_ms(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{:.1}s", ms as f64 / 1e3),
        60_000..=3_599_999 => format!("{:.1}m", ms as f64 / 6e4),
        _ => format!("{:.1}h", ms as f64 / 3.6e6),
    }
}

/// Bytes as a short human size.
pub fn human_bytes(b: u64) -> String {
    match b {
        0..=9_999 => format!("{b} B"),
        10_000..=9_999_999 => format!("{:.1} kB", b as f64 / 1e3),
        _ => format!("{:.1} MB", b as f64 / 1e6),
    }
}

/// The summary rows (label, value) shared by the text table and the HTML page.
pub fn summary_rows(r: &SimReport) -> Vec<(&'static str, String)> {
    let m = &r.metrics;
    let s = &m.staleness;
    vec![
        ("scenario", format!("{} (seed {})", r.scenario, r.seed)),
        ("devices", r.devices.to_string()),
        (
            "virtual time",
            format!(
                "{} (final heal at {})",
                human_ms(r.end_ms),
                human_ms(r.heal_ms)
            ),
        ),
        (
            "converged",
            match r.time_to_converge_ms {
                Some(t) if r.converged => format!("yes, {} after the final heal", human_ms(t)),
                _ => "NO".into(),
            },
        ),
        ("violations", r.violation_count.to_string()),
        (
            "staleness p50/p95/p99/max",
            format!(
                "{} / {} / {} / {}  ({} arrivals)",
                human_ms(s.p50_ms),
                human_ms(s.p95_ms),
                human_ms(s.p99_ms),
                human_ms(s.max_ms),
                s.count
            ),
        ),
        (
            "ops issued/committed/refused",
            format!(
                "{} / {} / {}",
                m.ops_issued, m.ops_committed, m.edits_refused
            ),
        ),
        (
            "ops acked/rejected/delivered",
            format!("{} / {} / {}", m.ops_acked, m.ops_rejected, m.ops_delivered),
        ),
        ("conflicts", m.conflicts.to_string()),
        ("evictions", m.evictions.to_string()),
        (
            "pending ops (max, all devices)",
            m.pending_ops_max.to_string(),
        ),
        (
            "bytes up / down",
            format!(
                "{} / {}",
                human_bytes(m.bytes_up),
                human_bytes(m.bytes_down)
            ),
        ),
        (
            "messages sent/delivered/dropped/dup",
            format!(
                "{} / {} / {} / {}",
                m.messages_sent, m.messages_delivered, m.messages_dropped, m.messages_duplicated
            ),
        ),
        ("connections opened", m.connections_opened.to_string()),
        ("syncs completed", m.syncs_completed.to_string()),
        ("trace digest", r.trace_digest.clone()),
    ]
}

/// A plain-text summary table (what `fieldsync sim run` prints).
pub fn summary_table(r: &SimReport) -> String {
    let rows = summary_rows(r);
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        let _ = writeln!(out, "  {k:<w$}  {v}");
    }
    for v in r.violations.iter().take(10) {
        let _ = writeln!(
            out,
            "  VIOLATION {} at {}: {}",
            v.invariant,
            human_ms(v.time_ms),
            v.detail
        );
        for s in v.steps.iter().rev().take(6).rev() {
            let _ = writeln!(out, "      {s}");
        }
    }
    out
}

const W: f64 = 860.0;

fn axis_time_labels(out: &mut String, x0: f64, w: f64, y: f64, end_ms: u64) {
    for k in 0..=4 {
        let t = end_ms as f64 * f64::from(k) / 4.0;
        let x = x0 + w * f64::from(k) / 4.0;
        let _ = write!(
            out,
            r#"<text x="{x:.1}" y="{y:.1}" font-size="10" text-anchor="middle">{}</text>"#,
            esc(&human_ms(t as u64))
        );
    }
}

fn staleness_svg(r: &SimReport) -> String {
    let h = 220.0;
    let (x0, y0, pw, ph) = (50.0, 10.0, W - 70.0, h - 45.0);
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="plot" id="staleness" width="{W}" height="{h}" viewBox="0 0 {W} {h}" role="img"><title>Staleness distribution</title>"#
    );
    let _ = write!(
        out,
        r##"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#999"/>"##
    );
    let hist = &r.staleness_histogram;
    let total = hist.count();
    if total == 0 {
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">no arrivals</text>"#,
            x0 + pw / 2.0,
            y0 + ph / 2.0
        );
    } else {
        let max_v = (hist.percentiles().max_ms.max(1) as f64 + 1.0).log10();
        let xs = |v: u64| x0 + pw * ((v as f64 + 1.0).log10() / max_v).min(1.0);
        let buckets: Vec<(u64, u64, u64)> = hist.buckets().collect();
        // Re-bin into 60 bars evenly spaced on the log axis.
        const BINS: usize = 60;
        let mut bins = [0u64; BINS];
        for (lo, _, n) in &buckets {
            let f = ((*lo as f64 + 1.0).log10() / max_v).clamp(0.0, 1.0);
            bins[((f * BINS as f64) as usize).min(BINS - 1)] += n;
        }
        let peak = bins.iter().copied().max().unwrap_or(1).max(1) as f64;
        let bw = pw / BINS as f64;
        for (k, n) in bins.iter().enumerate() {
            if *n == 0 {
                continue;
            }
            let bh = ph * (*n as f64 / peak) * 0.9;
            let _ = write!(
                out,
                r##"<rect class="bar" x="{:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="#7aa6d6"><title>{n}</title></rect>"##,
                x0 + bw * k as f64,
                y0 + ph - bh,
                (bw - 1.0).max(1.0)
            );
        }
        let mut cum = 0u64;
        let mut pts = format!("{x0:.1},{:.1}", y0 + ph);
        for (lo, width, n) in &buckets {
            cum += n;
            let _ = write!(
                pts,
                " {:.1},{:.1}",
                xs(lo + width),
                y0 + ph - ph * (cum as f64 / total as f64)
            );
        }
        let _ = write!(
            out,
            r##"<polyline points="{pts}" fill="none" stroke="#c0392b" stroke-width="2"/>"##
        );
        for k in 0..=5 {
            let v = 10f64.powf(max_v * f64::from(k) / 5.0) - 1.0;
            let _ = write!(
                out,
                r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"#,
                x0 + pw * f64::from(k) / 5.0,
                y0 + ph + 14.0,
                esc(&human_ms(v as u64))
            );
        }
    }
    let _ = write!(
        out,
        r#"<text x="{x0}" y="{:.1}" font-size="11">bars: arrivals per bucket (log time axis); red: cumulative fraction</text></svg>"#,
        h - 6.0
    );
    out
}

fn line_chart(
    id: &str,
    title: &str,
    times: &[u64],
    series: &[(&str, &str, Vec<f64>)],
    end_ms: u64,
) -> String {
    let h = 200.0;
    let (x0, y0, pw, ph) = (60.0, 10.0, W - 80.0, h - 50.0);
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="plot" id="{id}" width="{W}" height="{h}" viewBox="0 0 {W} {h}" role="img"><title>{}</title>"#,
        esc(title)
    );
    let _ = write!(
        out,
        r##"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#999"/>"##
    );
    let peak = series
        .iter()
        .flat_map(|s| s.2.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1.0);
    let end = end_ms.max(1) as f64;
    for (name, color, vals) in series {
        let mut pts = String::new();
        for (t, v) in times.iter().zip(vals) {
            let _ = write!(
                pts,
                "{:.1},{:.1} ",
                x0 + pw * (*t as f64 / end),
                y0 + ph - ph * (v / peak)
            );
        }
        let _ = write!(
            out,
            r#"<polyline class="series" points="{}" fill="none" stroke="{color}" stroke-width="1.5"><title>{}</title></polyline>"#,
            pts.trim_end(),
            esc(name)
        );
    }
    let _ = write!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{peak:.0}</text>"#,
        x0 - 4.0,
        y0 + 10.0
    );
    axis_time_labels(&mut out, x0, pw, y0 + ph + 14.0, end_ms);
    let mut lx = x0;
    for (name, color, _) in series {
        let _ = write!(
            out,
            r#"<rect x="{lx:.1}" y="{:.1}" width="10" height="10" fill="{color}"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
            h - 18.0,
            lx + 14.0,
            h - 9.0,
            esc(name)
        );
        lx += 180.0;
    }
    out.push_str("</svg>");
    out
}

fn strip_chart(r: &SimReport) -> String {
    let s = &r.series;
    let n = s.device_link.len();
    let shown: Vec<usize> = if n <= 80 {
        (0..n).collect()
    } else {
        (0..80).map(|k| k * n / 80).collect()
    };
    let row_h = 8.0;
    let (x0, y0) = (60.0, 10.0);
    let pw = W - 80.0;
    let h = y0 + row_h * shown.len() as f64 + 40.0;
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="plot" id="strip" width="{W}" height="{h:.0}" viewBox="0 0 {W} {h:.0}" role="img"><title>Connectivity and pending ops per device</title>"#
    );
    let samples = s.times_ms.len().max(1);
    let end = r.end_ms.max(1) as f64;
    let peak = s
        .device_pending
        .iter()
        .flat_map(|v| v.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let x_of = |k: usize| {
        let t = s.times_ms.get(k).copied().unwrap_or(r.end_ms) as f64;
        x0 + pw * (t / end)
    };
    for (row, d) in shown.iter().enumerate() {
        let y = y0 + row_h * row as f64;
        let link = &s.device_link[*d];
        let pend = &s.device_pending[*d];
        // connectivity: merge runs of equal state
        let mut k = 0;
        while k < link.len() {
            let st = link[k];
            let mut e = k + 1;
            while e < link.len() && link[e] == st {
                e += 1;
            }
            let color = match st {
                0 => "#dddddd",
                1 => "#b9d7ea",
                _ => "#6ab04c",
            };
            let xa = x_of(k);
            let xb = if e < samples { x_of(e) } else { x0 + pw };
            let _ = write!(
                out,
                r#"<rect x="{xa:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{color}"/>"#,
                (xb - xa).max(0.5),
                row_h * 0.5
            );
            k = e;
        }
        let mut k = 0;
        while k < pend.len() {
            let v = pend[k];
            let mut e = k + 1;
            while e < pend.len() && pend[e] == v {
                e += 1;
            }
            if v > 0 {
                let xa = x_of(k);
                let xb = if e < samples { x_of(e) } else { x0 + pw };
                let _ = write!(
                    out,
                    r##"<rect x="{xa:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#c0392b" fill-opacity="{:.2}"/>"##,
                    y + row_h * 0.5,
                    (xb - xa).max(0.5),
                    row_h * 0.4,
                    0.15 + 0.85 * (f64::from(v) / peak)
                );
            }
            k = e;
        }
        if row % 10 == 0 {
            let _ = write!(
                out,
                r#"<text x="{:.1}" y="{:.1}" font-size="8" text-anchor="end">d{}</text>"#,
                x0 - 4.0,
                y + row_h - 1.0,
                d + 1
            );
        }
    }
    let yb = y0 + row_h * shown.len() as f64;
    axis_time_labels(&mut out, x0, pw, yb + 12.0, r.end_ms);
    let _ = write!(
        out,
        r#"<text x="{x0}" y="{:.1}" font-size="11">top half: grey network down, blue up, green connected; bottom half: pending ops (darker = more, max {peak:.0}){}</text></svg>"#,
        yb + 30.0,
        if n > shown.len() {
            format!("; {} of {n} devices shown", shown.len())
        } else {
            String::new()
        }
    );
    out
}

/// The whole report as one self-contained HTML page with inline SVG.
pub fn html(r: &SimReport) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>fieldsync sim: {}</title>\n<style>body{{font-family:sans-serif;margin:2em;max-width:960px}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:13px}}.bad{{color:#c0392b}}pre{{font-size:11px;background:#f4f4f4;padding:6px;overflow-x:auto}}</style>\n</head>\n<body>\n",
        esc(&r.scenario)
    );
    let _ = write!(
        out,
        "<h1>Simulation: {}</h1>\n<p>seed {}, {} devices, trace digest <code>{}</code>: <b class=\"{}\">{}</b></p>\n",
        esc(&r.scenario),
        r.seed,
        r.devices,
        esc(&r.trace_digest),
        if r.failed() || !r.converged { "bad" } else { "ok" },
        if r.failed() {
            format!("{} invariant violation(s)", r.violation_count)
        } else if r.converged {
            "converged, no violation".to_string()
        } else {
            "did not converge".to_string()
        }
    );
    out.push_str("<h2>Summary</h2>\n<table>\n");
    for (k, v) in summary_rows(r) {
        let _ = writeln!(out, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(&v));
    }
    out.push_str("</table>\n");
    if !r.violations.is_empty() {
        out.push_str("<h2>Violations</h2>\n");
        for v in &r.violations {
            let _ = write!(
                out,
                "<h3 class=\"bad\">{} at {}{}</h3>\n<p>{}</p>\n<pre>{}</pre>\n",
                esc(v.invariant.name()),
                esc(&human_ms(v.time_ms)),
                v.row
                    .as_ref()
                    .map(|r| format!(", row {}", esc(r)))
                    .unwrap_or_default(),
                esc(&v.detail),
                esc(&v.steps.join("\n"))
            );
        }
    }
    out.push_str("<h2>Staleness (edit to arrival on each device that should see it)</h2>\n");
    out.push_str(&staleness_svg(r));
    out.push_str("\n<h2>Connectivity and pending ops per device</h2>\n");
    out.push_str(&strip_chart(r));
    let s = &r.series;
    out.push_str("\n<h2>Pending ops and devices up over time</h2>\n");
    out.push_str(&line_chart(
        "pending",
        "Pending ops, all devices",
        &s.times_ms,
        &[
            (
                "pending ops",
                "#c0392b",
                s.pending_ops.iter().map(|v| *v as f64).collect(),
            ),
            (
                "devices with network",
                "#2980b9",
                s.devices_up.iter().map(|v| f64::from(*v)).collect(),
            ),
        ],
        r.end_ms,
    ));
    out.push_str("\n<h2>Bytes per sample interval</h2>\n");
    out.push_str(&line_chart(
        "bytes",
        "Bytes over time",
        &s.times_ms,
        &[
            (
                "bytes up",
                "#8e44ad",
                s.bytes_up.iter().map(|v| *v as f64).collect(),
            ),
            (
                "bytes down",
                "#27ae60",
                s.bytes_down.iter().map(|v| *v as f64).collect(),
            ),
        ],
        r.end_ms,
    ));
    out.push_str("\n<h2>Per device</h2>\n<table>\n<tr><th>device</th><th>group</th><th>staleness p50</th><th>p99</th><th>max</th><th>bytes up</th><th>bytes down</th><th>connections</th><th>rejected</th><th>evictions</th><th>pending max</th><th>network up</th></tr>\n");
    for d in r.metrics.per_device.iter().take(500) {
        let _ = writeln!(
            out,
            "<tr><td>d{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            d.device,
            esc(&d.group),
            esc(&human_ms(d.staleness.p50_ms)),
            esc(&human_ms(d.staleness.p99_ms)),
            esc(&human_ms(d.staleness.max_ms)),
            esc(&human_bytes(d.bytes_up)),
            esc(&human_bytes(d.bytes_down)),
            d.connections_opened,
            d.ops_rejected,
            d.evictions,
            d.pending_ops_max,
            esc(&human_ms(d.link_up_ms))
        );
    }
    out.push_str("</table>\n</body>\n</html>\n");
    out
}
