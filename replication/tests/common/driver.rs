//! A Pair-style driver for the sans-IO sessions over any storages: one hub, N devices, frames
//! on queues, a fake clock, loss, duplication, reordering and disconnects. (The reference
//! storages' own driver stays in `proto_sessions.rs`; this one is generic so the real store
//! implementations run under the same conditions.)
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::{BTreeSet, VecDeque};

use fieldsync_replication::proto::{
    CloseCode, DeviceConfig, DeviceEvent, DeviceSession, DeviceState, DeviceStorage, HubConfig,
    HubEvent, HubSession, HubStorage, Message, Millis,
};
use fieldsync_replication::wire::{self, FrameDecoder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What a run went through.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub wire_closes: u64,
    pub entering: u64,
    pub leaving: u64,
    pub rejected: u64,
    pub reconnects: u64,
    /// `BlobPut`s the device sessions sent, and the bytes they carried.
    pub blob_puts: u64,
    pub blob_put_bytes: u64,
}

/// Fault rates in percent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    pub loss_pct: u32,
    pub dup_pct: u32,
    pub reorder_pct: u32,
}

pub struct Link {
    pub hub: HubSession,
    to_hub: VecDeque<(Vec<u8>, bool)>,
    to_dev: VecDeque<(Vec<u8>, bool)>,
    hub_dec: FrameDecoder,
    dev_dec: FrameDecoder,
}

pub struct Dev<D> {
    pub session: DeviceSession,
    pub storage: D,
    pub config: DeviceConfig,
    pub link: Option<Link>,
    pub events: Vec<DeviceEvent>,
    /// Whether the device may connect (false: offline).
    pub online: bool,
}

pub struct Net<H, D> {
    pub now: Millis,
    pub hub: H,
    pub hub_config: HubConfig,
    pub devs: Vec<Dev<D>>,
    pub faults: Faults,
    pub rng: ChaCha8Rng,
    pub stats: Stats,
    pub hub_events: Vec<(usize, HubEvent)>,
}

impl<H: HubStorage, D: DeviceStorage> Net<H, D> {
    pub fn new(hub: H, hub_config: HubConfig, devs: Vec<(DeviceConfig, D)>, seed: u64) -> Self {
        Net {
            now: Millis(1_000),
            hub,
            hub_config,
            devs: devs
                .into_iter()
                .map(|(config, storage)| Dev {
                    session: DeviceSession::new(config.clone()),
                    storage,
                    config,
                    link: None,
                    events: Vec::new(),
                    online: true,
                })
                .collect(),
            faults: Faults::default(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            stats: Stats::default(),
            hub_events: Vec::new(),
        }
    }

    pub fn connect(&mut self, i: usize) {
        let now = self.now;
        let d = &mut self.devs[i];
        d.link = Some(Link {
            hub: HubSession::new(self.hub_config.clone(), now),
            to_hub: VecDeque::new(),
            to_dev: VecDeque::new(),
            hub_dec: FrameDecoder::new(),
            dev_dec: FrameDecoder::new(),
        });
        d.session.handle_connected(now);
    }

    pub fn disconnect(&mut self, i: usize) {
        let now = self.now;
        let d = &mut self.devs[i];
        if d.link.take().is_some() {
            d.session.handle_disconnected(now);
        }
    }

    /// The app restarts: a fresh session over the same storage.
    pub fn restart(&mut self, i: usize) {
        self.devs[i].link = None;
        let mut c = self.devs[i].config.clone();
        c.rng_seed = self.rng.gen();
        self.devs[i].session = DeviceSession::new(c);
    }

    pub fn set_online(&mut self, i: usize, online: bool) {
        self.devs[i].online = online;
        if !online {
            self.disconnect(i);
        }
    }

    fn take(&mut self, i: usize, to_hub: bool) -> Option<Vec<u8>> {
        let f = self.faults;
        let link = self.devs[i].link.as_mut()?;
        let q = if to_hub {
            &mut link.to_hub
        } else {
            &mut link.to_dev
        };
        loop {
            let (frame, copy) = q.pop_front()?;
            if f.loss_pct > 0 && self.rng.gen_range(0..100) < f.loss_pct {
                self.stats.lost += 1;
                continue;
            }
            if f.reorder_pct > 0 && !q.is_empty() && self.rng.gen_range(0..100) < f.reorder_pct {
                let (other, _) = q.pop_front()?;
                q.push_front((frame, copy));
                self.stats.reordered += 1;
                return Some(other);
            }
            if !copy && f.dup_pct > 0 && self.rng.gen_range(0..100) < f.dup_pct {
                q.push_front((frame.clone(), true));
                self.stats.duplicated += 1;
            }
            return Some(frame);
        }
    }

    /// Moves frames and timers at `now`; returns whether anything happened.
    pub fn pump(&mut self) -> bool {
        let now = self.now;
        let mut busy = false;
        let mut changed: BTreeSet<String> = BTreeSet::new();
        for i in 0..self.devs.len() {
            if self.devs[i].link.is_none() {
                let d = &self.devs[i];
                if !d.online {
                    continue;
                }
                match d.session.wants_connection_at(&d.storage) {
                    Some(at) if at <= now => {}
                    _ => continue,
                }
                self.connect(i);
                busy = true;
            }
            {
                let d = &mut self.devs[i];
                let Some(link) = d.link.as_mut() else {
                    continue;
                };
                if d.session.poll_timeout().is_some_and(|t| t <= now) {
                    d.session.handle_timeout(now, &mut d.storage);
                }
                if link.hub.poll_timeout().is_some_and(|t| t <= now) {
                    link.hub.handle_timeout(now);
                }
                while let Some(m) = d.session.poll_transmit(now) {
                    if let Message::BlobPut(p) = &m {
                        self.stats.blob_puts += 1;
                        self.stats.blob_put_bytes += p.data.len() as u64;
                    }
                    link.to_hub.push_back((wire::encode(&m).unwrap(), false));
                }
                while let Some(m) = link.hub.poll_transmit(now) {
                    link.to_dev.push_back((wire::encode(&m).unwrap(), false));
                }
            }
            while let Some(frame) = self.take(i, true) {
                busy = true;
                let d = &mut self.devs[i];
                let Some(link) = d.link.as_mut() else { break };
                link.hub_dec.feed(&frame);
                loop {
                    match link.hub_dec.next_message() {
                        Ok(Some(m)) => link.hub.handle_message(now, m, &mut self.hub),
                        Ok(None) => break,
                        Err(e) => {
                            link.hub.handle_wire_error(now, &e);
                            break;
                        }
                    }
                }
                while let Some(m) = link.hub.poll_transmit(now) {
                    link.to_dev.push_back((wire::encode(&m).unwrap(), false));
                }
            }
            while let Some(frame) = self.take(i, false) {
                busy = true;
                let d = &mut self.devs[i];
                let Some(link) = d.link.as_mut() else { break };
                link.dev_dec.feed(&frame);
                loop {
                    match link.dev_dec.next_message() {
                        Ok(Some(m)) => d.session.handle_message(now, m, &mut d.storage),
                        Ok(None) => break,
                        Err(e) => {
                            d.session.handle_wire_error(now, &e);
                            break;
                        }
                    }
                }
                while let Some(m) = d.session.poll_transmit(now) {
                    if let Message::BlobPut(p) = &m {
                        self.stats.blob_puts += 1;
                        self.stats.blob_put_bytes += p.data.len() as u64;
                    }
                    link.to_hub.push_back((wire::encode(&m).unwrap(), false));
                }
            }
            let d = &mut self.devs[i];
            let Some(link) = d.link.as_mut() else {
                continue;
            };
            while let Some(e) = link.hub.poll_event() {
                match &e {
                    HubEvent::OpsApplied {
                        accepted, tables, ..
                    } if *accepted > 0 => changed.extend(tables.iter().cloned()),
                    HubEvent::Closed { code, .. } if code.0 >= CloseCode::WIRE_BASE => {
                        self.stats.wire_closes += 1
                    }
                    _ => {}
                }
                self.hub_events.push((i, e));
            }
            while let Some(e) = d.session.poll_event() {
                match &e {
                    DeviceEvent::BatchApplied {
                        entering, leaving, ..
                    } => {
                        self.stats.entering += *entering as u64;
                        self.stats.leaving += *leaving as u64;
                    }
                    DeviceEvent::PushAcked { rejected, .. } => {
                        self.stats.rejected += rejected.len() as u64;
                    }
                    DeviceEvent::Connected { .. } => self.stats.reconnects += 1,
                    _ => {}
                }
                d.events.push(e);
            }
            let over = link.hub.is_closed()
                || matches!(d.session.state(), DeviceState::Closed | DeviceState::Halted);
            if over && link.to_hub.is_empty() && link.to_dev.is_empty() {
                let pending_dev = d.session.poll_transmit(now);
                let pending_hub = link.hub.poll_transmit(now);
                if pending_dev.is_none() && pending_hub.is_none() {
                    d.link = None;
                    d.session.handle_disconnected(now);
                } else {
                    if let Some(m) = pending_dev {
                        link.to_hub.push_back((wire::encode(&m).unwrap(), false));
                    }
                    if let Some(m) = pending_hub {
                        link.to_dev.push_back((wire::encode(&m).unwrap(), false));
                    }
                }
                busy = true;
            }
        }
        if !changed.is_empty() {
            let tables: Vec<String> = changed.into_iter().collect();
            self.notify(&tables);
        }
        busy
    }

    /// Tells every hub session that these tables changed.
    pub fn notify(&mut self, tables: &[String]) {
        let now = self.now;
        for d in &mut self.devs {
            if let Some(link) = d.link.as_mut() {
                link.hub.handle_changes(now, tables, &mut self.hub);
            }
        }
    }

    fn next_time(&self) -> Millis {
        let mut t: Option<Millis> = None;
        let mut consider = |x: Option<Millis>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        for d in &self.devs {
            match &d.link {
                Some(l) => {
                    consider(d.session.poll_timeout());
                    consider(l.hub.poll_timeout());
                }
                None if d.online => consider(d.session.wants_connection_at(&d.storage)),
                None => {}
            }
        }
        t.unwrap_or(self.now + Millis::from_secs(60))
            .max(self.now + Millis(1))
    }

    /// Runs for `span` of fake time.
    pub fn run_for(&mut self, span: Millis) {
        let end = self.now + span;
        let mut guard = 0;
        while self.now < end {
            guard += 1;
            assert!(guard < 100_000, "livelock");
            if !self.pump() {
                self.now = self.next_time().min(end);
            }
        }
        while self.pump() {
            guard += 1;
            assert!(guard < 100_000, "livelock");
        }
    }

    pub fn local_ops(&mut self, i: usize) {
        let d = &mut self.devs[i];
        d.session.handle_local_ops(self.now, &mut d.storage);
    }

    pub fn fetch_blob(&mut self, i: usize, sha256: [u8; 32]) {
        let d = &mut self.devs[i];
        d.session.fetch_blob(self.now, &mut d.storage, sha256);
    }

    pub fn sync_now(&mut self, i: usize) {
        let d = &mut self.devs[i];
        d.session.sync_now(self.now, &mut d.storage, &[]);
    }

    /// Faults off, everyone online, several full syncs.
    pub fn heal(&mut self, rounds: usize) {
        self.faults = Faults::default();
        for i in 0..self.devs.len() {
            self.devs[i].online = true;
        }
        for _ in 0..rounds {
            for i in 0..self.devs.len() {
                self.sync_now(i);
            }
            self.run_for(Millis::from_minutes(2));
        }
    }
}
