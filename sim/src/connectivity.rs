//! Connectivity models (when a device's network is available) and link quality.
//!
//! A model is an iterator of [`LinkChange`]s in time order; the simulator schedules each one.
//! Every random draw comes from a ChaCha8 stream derived from the run's seed, and only IEEE
//! basic operations are used on floats (see [`det_ln`]), so the changes are the same on every
//! machine.

use crate::digest::Fnv64;
use crate::scenario::{Connectivity, LinkConfig, ScenarioError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;

/// One line of a connectivity trace file.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TraceRow {
    /// Virtual time the line takes effect (ms since the start).
    pub t_ms: u64,
    /// Whether the network is available.
    pub up: bool,
    /// One-way latency (ms).
    pub latency_ms: u64,
    /// Bandwidth (kbit/s, 0 = unlimited).
    pub bandwidth_kbps: u64,
    /// Loss probability.
    pub loss: f64,
}

/// Parse a connectivity trace (`t_ms,state,latency_ms,bandwidth_kbps,loss`; see the scenario
/// module docs). `path` is only used in errors.
pub fn parse_trace(text: &str, path: &Path) -> Result<Vec<TraceRow>, ScenarioError> {
    let err = |line: usize, reason: String| ScenarioError::Trace {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let mut rows: Vec<TraceRow> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with("t_ms") {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != 5 {
            return Err(err(n, format!("expected 5 fields, found {}", fields.len())));
        }
        let t_ms: u64 = fields[0]
            .parse()
            .map_err(|_| err(n, format!("t_ms `{}` is not an integer", fields[0])))?;
        let up = match fields[1] {
            "up" => true,
            "down" => false,
            s => return Err(err(n, format!("state `{s}` is neither `up` nor `down`"))),
        };
        let latency_ms: u64 = fields[2]
            .parse()
            .map_err(|_| err(n, format!("latency_ms `{}` is not an integer", fields[2])))?;
        let bandwidth_kbps: u64 = fields[3].parse().map_err(|_| {
            err(
                n,
                format!("bandwidth_kbps `{}` is not an integer", fields[3]),
            )
        })?;
        let loss: f64 = fields[4]
            .parse()
            .map_err(|_| err(n, format!("loss `{}` is not a number", fields[4])))?;
        if !(0.0..1.0).contains(&loss) {
            return Err(err(n, format!("loss {loss} is not in [0, 1)")));
        }
        if latency_ms > 600_000 {
            return Err(err(n, "latency_ms above 600000".into()));
        }
        if let Some(prev) = rows.last() {
            if t_ms < prev.t_ms {
                return Err(err(n, format!("t_ms {t_ms} goes back in time")));
            }
        }
        rows.push(TraceRow {
            t_ms,
            up,
            latency_ms,
            bandwidth_kbps,
            loss,
        });
    }
    if rows.is_empty() {
        return Err(err(0, "no rows".into()));
    }
    Ok(rows)
}

/// A change of a device's network: availability, and for traces the link quality too.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkChange {
    /// Virtual time.
    pub at_ms: u64,
    /// Whether the network is available from then on.
    pub up: bool,
    /// New latency / bandwidth / loss (traces only).
    pub quality: Option<(u64, u64, f64)>,
}

/// A ChaCha8 stream for one purpose and index, derived from the run's seed.
pub fn sub_rng(seed: u64, purpose: &str, index: u64) -> ChaCha8Rng {
    let mut h = Fnv64::new();
    h.write_u64(seed);
    h.write_bytes(purpose.as_bytes());
    h.write_u64(index);
    ChaCha8Rng::seed_from_u64(h.finish())
}

/// Natural logarithm from IEEE basic operations only (bit-identical everywhere, unlike libm).
pub fn det_ln(x: f64) -> f64 {
    if x.is_nan() || x <= 0.0 {
        return f64::NEG_INFINITY;
    }
    let bits = x.to_bits();
    let mut exp = ((bits >> 52) & 0x7ff) as i64;
    let mut mant_bits = bits & 0x000f_ffff_ffff_ffff;
    if exp == 0 {
        // subnormal: normalize
        let shift = mant_bits.leading_zeros() as i64 - 11;
        mant_bits = (mant_bits << shift) & 0x000f_ffff_ffff_ffff;
        exp = 1 - shift;
    }
    let mut m = f64::from_bits(mant_bits | 0x3ff0_0000_0000_0000); // [1, 2)
    let mut e = exp - 1023;
    if m > std::f64::consts::SQRT_2 {
        m /= 2.0;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut term = s;
    let mut sum = 0.0;
    let mut k = 1.0;
    for _ in 0..30 {
        sum += term / k;
        term *= s2;
        k += 2.0;
    }
    2.0 * sum + (e as f64) * std::f64::consts::LN_2
}

/// An exponentially distributed duration with the given mean (at least 1 ms).
pub fn exp_ms(rng: &mut ChaCha8Rng, mean_ms: u64) -> u64 {
    let u: f64 = rng.gen::<f64>(); // [0, 1)
    let v = -(mean_ms as f64) * det_ln(1.0 - u);
    (v.round() as u64).max(1)
}

/// The network-availability schedule of one device, as an iterator of changes.
#[derive(Debug)]
pub struct ConnectivityModel {
    kind: ModelKind,
    rng: ChaCha8Rng,
    started: bool,
}

#[derive(Debug)]
enum ModelKind {
    AlwaysOn,
    Changes {
        changes: Vec<(u64, bool)>,
        next: usize,
    },
    Markov {
        mean_up: u64,
        mean_down: u64,
        at: u64,
        up: bool,
    },
    Trace {
        rows: Vec<TraceRow>,
        offset: u64,
        next: usize,
    },
}

impl ConnectivityModel {
    /// The model of one device (its random stream is `rng`).
    pub fn new(cfg: &Connectivity, mut rng: ChaCha8Rng) -> ConnectivityModel {
        let kind = match cfg {
            Connectivity::AlwaysOn => ModelKind::AlwaysOn,
            Connectivity::Scheduled { outages, stagger } => {
                let shift = if stagger.0 > 0 {
                    rng.gen_range(0..=stagger.0)
                } else {
                    0
                };
                let mut iv: Vec<(u64, u64)> = outages
                    .iter()
                    .map(|o| (o.start.0 + shift, o.end.0 + shift))
                    .collect();
                iv.sort_unstable();
                // merge overlaps
                let mut merged: Vec<(u64, u64)> = Vec::new();
                for (s, e) in iv {
                    match merged.last_mut() {
                        Some(last) if s <= last.1 => last.1 = last.1.max(e),
                        _ => merged.push((s, e)),
                    }
                }
                let mut changes = Vec::new();
                if merged.first().map(|m| m.0) != Some(0) {
                    changes.push((0, true));
                }
                for (s, e) in merged {
                    changes.push((s, false));
                    changes.push((e, true));
                }
                ModelKind::Changes { changes, next: 0 }
            }
            Connectivity::GilbertElliott { mean_up, mean_down } => {
                let (mu, md) = (mean_up.0.max(1), mean_down.0.max(1));
                let p_up = mu as f64 / (mu + md) as f64;
                let up = rng.gen::<f64>() < p_up;
                ModelKind::Markov {
                    mean_up: mu,
                    mean_down: md,
                    at: 0,
                    up,
                }
            }
            Connectivity::Trace { rows, offset, .. } => {
                let off = if offset.0 > 0 {
                    rng.gen_range(0..=offset.0)
                } else {
                    0
                };
                ModelKind::Trace {
                    rows: rows.clone(),
                    offset: off,
                    next: 0,
                }
            }
        };
        ConnectivityModel {
            kind,
            rng,
            started: false,
        }
    }

    /// Whether this model replays a trace (and so also sets the link quality).
    pub fn is_trace(&self) -> bool {
        matches!(self.kind, ModelKind::Trace { .. })
    }
}

impl Iterator for ConnectivityModel {
    type Item = LinkChange;

    fn next(&mut self) -> Option<LinkChange> {
        let first = !self.started;
        self.started = true;
        match &mut self.kind {
            ModelKind::AlwaysOn => first.then_some(LinkChange {
                at_ms: 0,
                up: true,
                quality: None,
            }),
            ModelKind::Changes { changes, next } => {
                let c = changes.get(*next)?;
                *next += 1;
                Some(LinkChange {
                    at_ms: c.0,
                    up: c.1,
                    quality: None,
                })
            }
            ModelKind::Markov {
                mean_up,
                mean_down,
                at,
                up,
            } => {
                if !first {
                    let mean = if *up { *mean_up } else { *mean_down };
                    *at = at.saturating_add(exp_ms(&mut self.rng, mean));
                    *up = !*up;
                }
                Some(LinkChange {
                    at_ms: *at,
                    up: *up,
                    quality: None,
                })
            }
            ModelKind::Trace { rows, offset, next } => {
                let r = rows.get(*next)?;
                let at_ms = if *next == 0 { 0 } else { r.t_ms + *offset };
                *next += 1;
                Some(LinkChange {
                    at_ms,
                    up: r.up,
                    quality: Some((r.latency_ms, r.bandwidth_kbps, r.loss)),
                })
            }
        }
    }
}

/// Link quality in force on one device's link (both directions).
#[derive(Clone, Debug, PartialEq)]
pub struct LinkParams {
    /// One-way latency (ms).
    pub latency_ms: u64,
    /// Extra delay uniform in [0, jitter_ms].
    pub jitter_ms: u64,
    /// kbit/s, 0 = unlimited.
    pub bandwidth_kbps: u64,
    /// Loss probability.
    pub loss: f64,
    /// Duplication probability.
    pub duplicate: f64,
    /// Reordering probability.
    pub reorder: f64,
}

impl From<&LinkConfig> for LinkParams {
    fn from(c: &LinkConfig) -> Self {
        LinkParams {
            latency_ms: c.latency.0,
            jitter_ms: c.jitter.0,
            bandwidth_kbps: c.bandwidth_kbps,
            loss: c.loss,
            duplicate: c.duplicate,
            reorder: c.reorder,
        }
    }
}

impl LinkParams {
    /// Serialization delay of `bytes` at this bandwidth (ms, rounded up).
    pub fn serialization_ms(&self, bytes: usize) -> u64 {
        if self.bandwidth_kbps == 0 {
            return 0;
        }
        // bits / (kbit/s) = ms
        (bytes as u64 * 8).div_ceil(self.bandwidth_kbps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{Dur, Outage};

    #[test]
    fn det_ln_matches_libm_closely() {
        for x in [
            1e-300, 1e-10, 0.001, 0.5, 0.999, 1.0, 1.5, 2.0, 10.0, 12345.678, 1e300,
        ] {
            let a = det_ln(x);
            let b = f64::ln(x);
            assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "{x}: {a} vs {b}");
        }
    }

    #[test]
    fn scheduled_merges_and_orders() {
        let cfg = Connectivity::Scheduled {
            outages: vec![
                Outage {
                    start: Dur(100),
                    end: Dur(200),
                },
                Outage {
                    start: Dur(150),
                    end: Dur(300),
                },
                Outage {
                    start: Dur(0),
                    end: Dur(10),
                },
            ],
            stagger: Dur(0),
        };
        let ch: Vec<(u64, bool)> = ConnectivityModel::new(&cfg, sub_rng(1, "x", 0))
            .map(|c| (c.at_ms, c.up))
            .collect();
        assert_eq!(ch, vec![(0, false), (10, true), (100, false), (300, true)]);
    }

    #[test]
    fn trace_parse_errors() {
        let p = Path::new("t.csv");
        assert!(parse_trace(
            "t_ms,state,latency_ms,bandwidth_kbps,loss\n0,up,10,100,0\n",
            p
        )
        .is_ok());
        assert!(matches!(
            parse_trace("0,sideways,10,100,0\n", p),
            Err(ScenarioError::Trace { line: 1, .. })
        ));
        assert!(matches!(
            parse_trace("5,up,10,100,0\n1,up,10,100,0\n", p),
            Err(ScenarioError::Trace { line: 2, .. })
        ));
        assert!(parse_trace("# nothing\n", p).is_err());
        assert!(parse_trace("0,up,10,100,1.5\n", p).is_err());
    }
}
