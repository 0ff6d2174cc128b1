//! The hub's change bus: which live sessions to wake when the hub's data changed.
//!
//! A session registers when its connection is accepted and learns its user when it
//! authenticates; a push, an upstream page or an admin write publishes the hub's
//! [`FeedChanges`], and only the sessions whose user's feeds moved are woken, with the tables
//! to look at. Listeners (the upstream bridge) are woken by every change.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::replica::FeedChanges;
use crate::security::UserId;

#[derive(Debug, Default)]
struct BusEntry {
    notify: Arc<Notify>,
    tables: BTreeSet<String>,
    /// The session's user once it has authenticated: only changes to that user's feeds wake it.
    user: Option<UserId>,
    listener: bool,
}

/// Tells live sessions that the hub's data changed, and asks them to close on shutdown.
#[derive(Debug, Default)]
pub struct ChangeBus {
    next: AtomicU64,
    sessions: Mutex<HashMap<u64, BusEntry>>,
    shutdown: AtomicBool,
}

impl ChangeBus {
    fn sessions(&self) -> MutexGuard<'_, HashMap<u64, BusEntry>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session; returns its id and the notify the driver waits on.
    pub fn register(&self) -> (u64, Arc<Notify>) {
        self.register_entry(false)
    }

    /// Registers a listener that only wants to be woken (the upstream bridge): it is not a
    /// session, so its tables are not kept and it counts neither as a session nor in the
    /// queue depth.
    pub fn register_listener(&self) -> (u64, Arc<Notify>) {
        self.register_entry(true)
    }

    fn register_entry(&self, listener: bool) -> (u64, Arc<Notify>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        self.sessions().insert(
            id,
            BusEntry {
                notify: notify.clone(),
                tables: BTreeSet::new(),
                user: None,
                listener,
            },
        );
        (id, notify)
    }

    /// Forgets a session.
    pub fn unregister(&self, id: u64) {
        self.sessions().remove(&id);
    }

    /// The session `id` authenticated as `user`.
    pub fn set_user(&self, id: u64, user: UserId) {
        if let Some(e) = self.sessions().get_mut(&id) {
            e.user = Some(user);
        }
    }

    /// The hub's data changed: wake every session whose user's feeds moved (the pusher's own
    /// too: its other tables' feeds may have moved, e.g. a row it created entering a related
    /// table) and every listener. Sessions of other users stay asleep: with a thousand
    /// devices connected, one push costs the few pulls it concerns, not a thousand.
    pub fn publish(&self, changes: &FeedChanges) {
        self.publish_except(changes, None);
    }

    /// `publish`, without waking `skip`: a listener publishing its own changes (the bridge
    /// would otherwise wake itself for one more round after every round that wrote).
    pub fn publish_except(&self, changes: &FeedChanges, skip: Option<u64>) {
        if changes.is_empty() {
            return;
        }
        for (id, entry) in self.sessions().iter_mut() {
            if Some(*id) == skip {
                continue;
            }
            if entry.listener {
                entry.notify.notify_one();
                continue;
            }
            // A session not yet authenticated pulls everything once it is.
            let Some(user) = entry.user else {
                continue;
            };
            let tables = changes.tables_for(user);
            if !tables.is_empty() {
                entry.tables.extend(tables);
                entry.notify.notify_one();
            }
        }
    }

    /// The tables changed for session `id` since it last looked (clears them).
    pub fn take(&self, id: u64) -> Vec<String> {
        self.sessions()
            .get_mut(&id)
            .map(|e| std::mem::take(&mut e.tables).into_iter().collect())
            .unwrap_or_default()
    }

    /// Tables waiting to be looked at, summed over sessions (a queue depth for `/metrics`).
    pub fn queue_depth(&self) -> usize {
        self.sessions().values().map(|e| e.tables.len()).sum()
    }

    /// Asks every session to close (drain).
    pub fn shut_down(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        for entry in self.sessions().values() {
            entry.notify.notify_one();
        }
    }

    /// Device sessions registered (listeners not counted).
    pub fn session_count(&self) -> usize {
        self.sessions().values().filter(|e| !e.listener).count()
    }

    /// Whether [`shut_down`](Self::shut_down) was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn only_the_sessions_whose_feeds_moved_get_the_tables() {
        let bus = ChangeBus::default();
        let (ana_id, _) = bus.register();
        let (bo_id, _) = bus.register();
        let (anon, _) = bus.register();
        let (bridge, _) = bus.register_listener();
        let (ana, bo) = (Uuid::from_u128(1), Uuid::from_u128(2));
        bus.set_user(ana_id, ana);
        bus.set_user(bo_id, bo);
        let mut changes = FeedChanges::default();
        changes.record_feed(ana, "task");
        changes.record_table("account");
        bus.publish(&changes);
        assert_eq!(bus.take(ana_id), vec!["task".to_string()]);
        assert!(bus.take(bo_id).is_empty(), "bo's feeds did not move");
        assert!(bus.take(anon).is_empty(), "not authenticated yet");
        assert!(bus.take(bridge).is_empty(), "listeners keep no tables");
        assert_eq!(bus.queue_depth(), 0);
        assert_eq!(bus.session_count(), 3);
    }
}
