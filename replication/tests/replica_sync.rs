//! The real storages (`DeviceReplica`, `HubReplica`) over real stores, driven by the sans-IO
//! sessions: offline edits, conflicts, ownership changes, rejected writes, hostile pulls,
//! duplicated frames, and a proptest with loss, duplication, reordering and disconnects.
#![cfg(feature = "credential")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/driver.rs"]
mod driver;

use std::collections::{BTreeMap, BTreeSet};

use driver::{Faults, Net};
use fieldsync_replication::credential::{HubSigningKey, TokenVerifier};
use fieldsync_replication::proto::messages::{MAX_CHANGE_LEN, PULL_BATCH_ITEMS_MAX};
use fieldsync_replication::proto::{
    BatchLimits, ConflictPolicies, ConflictPolicy, Cursor, DeviceConfig, DeviceEvent, DeviceId,
    DeviceStorage, HubConfig, HubStorage, Millis, Principal, PushOp, PushOutcome, RejectionKind,
    StorageError, SyncSchedule, UploadOutcome,
};
use fieldsync_replication::replica::{
    DeviceReplica, HubReplica, HubReplicaError, ACTORS_PER_DEVICE, DEFAULT_COMPACT_BACKLOG,
    SHARED_FEED_HOLDERS, UPSTREAM_ACTOR,
};
use fieldsync_replication::{App, Environment, Profile};
use fieldsync_store::{
    ActorId, BlobRef, Durability, OwnerKind, OwnerRef, RowId, Schema, Store, StoreOptions, Value,
};
use proptest::prelude::*;
use sha2::{Digest, Sha256};
use uuid::Uuid;

const SCHEMA: &str = r#"
[tables.account]
offline = true
[tables.account.columns]
name = "text"
n = "integer"
[tables.task]
offline = true
[tables.task.columns]
title = "text"
n = "integer"
account = { lookup = "account", relationship = "task_account" }
photo = "image"
doc = { type = "file", max_size_kb = 65536 }

[tables.note]
offline = true
[tables.note.columns]
text = "text"
"#;

const ENV: &str = r#"
[[business_units]]
name = "Root"
[[business_units]]
name = "North"
parent = "Root"
[[business_units]]
name = "South"
parent = "Root"

[[users]]
name = "ana"
business_unit = "North"
roles = ["Tech"]
[[users]]
name = "ben"
business_unit = "North"
roles = ["Tech"]
[[users]]
name = "cat"
business_unit = "South"
roles = ["Tech"]

[[teams]]
name = "North Team"
business_unit = "North"
members = ["ana", "ben"]
roles = []

[[roles]]
name = "Tech"
[roles.privileges.task]
create = "user"
read = "user"
write = "user"
append = "user"
append_to = "user"
assign = "user"
[roles.privileges.account]
create = "user"
read = "business_unit"
write = "user"
append_to = "business_unit"
"#;

const PROFILE: &str = r#"
name = "Mobile"
[tables.task]
rows = "custom"
filter = "ownerid eq-useroruserteams"
images = ["photo"]
sync_interval_minutes = 5
[tables.account]
rows = "related"
relationships = ["task_account"]
sync_interval_minutes = 5
"#;

const APP: &str = "mobile";
const USERS: [&str; 3] = ["ana", "ben", "cat"];

fn opts() -> StoreOptions {
    StoreOptions {
        fsync: false,
        ..StoreOptions::default()
    }
}

struct World {
    net: Net<HubReplica, DeviceReplica>,
    env: Environment,
}

fn user(env: &Environment, name: &str) -> Uuid {
    env.user_by_name(name).unwrap().id
}

fn owner_user(id: Uuid) -> Value {
    Value::Owner(OwnerRef {
        kind: OwnerKind::User,
        id,
    })
}

fn owner_team(id: Uuid) -> Value {
    Value::Owner(OwnerRef {
        kind: OwnerKind::Team,
        id,
    })
}

fn device_id(i: usize) -> DeviceId {
    DeviceId(Uuid::from_u128(0xd000 + i as u128))
}

/// The app whose offline profile is `PROFILE`.
fn mobile_app() -> App {
    App {
        id: Uuid::from_u128(0xa99),
        name: APP.into(),
        tables: BTreeSet::new(),
        views: Vec::new(),
        offline: true,
        profile: Some("Mobile".into()),
    }
}

fn world(seed: u64, policies: ConflictPolicies) -> World {
    let schema = Schema::from_toml(SCHEMA).unwrap();
    let env = Environment::from_toml(ENV).unwrap();
    let profile = Profile::from_toml(PROFILE, &schema).unwrap();
    let app = mobile_app();
    let key = HubSigningKey::generate().unwrap();
    let hub_store = Store::temporary(schema.clone(), opts()).unwrap();
    let mut hub = HubReplica::open(
        hub_store,
        env.clone(),
        vec![app],
        vec![profile.clone()],
        key.verifier(),
        1_790_000_000_000,
    )
    .unwrap()
    .with_signing_key(key)
    // Odd seeds file every row in the profile's shared feed, even ones in per-user feeds.
    .with_shared_feed_holders(if seed % 2 == 1 {
        0
    } else {
        SHARED_FEED_HOLDERS
    });
    let mut devs = Vec::new();
    for (i, u) in USERS.iter().enumerate() {
        let token = hub.enroll(u, APP, device_id(i).0, 0).unwrap();
        let schedule = SyncSchedule::new([("task", Some(5)), ("account", Some(5))], &[]);
        let mut c = DeviceConfig::new(device_id(i), token.as_bytes().to_vec(), APP, schedule);
        c.rng_seed = seed ^ i as u64;
        c.push_limits.max_items = 3;
        let store = Store::temporary(schema.clone(), opts()).unwrap();
        // Seeds divisible by 3 compact the device's log after every acknowledgement.
        let backlog = if seed.is_multiple_of(3) {
            1
        } else {
            DEFAULT_COMPACT_BACKLOG
        };
        devs.push((
            c,
            DeviceReplica::new(store)
                .with_profile(&profile)
                .with_compact_backlog(backlog),
        ));
    }
    let mut hub_config = HubConfig::new(Uuid::from_u128(0xabc));
    hub_config.pull_limits.max_items = 4;
    hub_config.conflicts = policies;
    World {
        net: Net::new(hub, hub_config, devs, seed),
        env,
    }
}

/// Room for a whole test set in one pull.
const WIDE: BatchLimits = BatchLimits {
    max_items: 100,
    max_bytes: 1 << 20,
};

impl World {
    /// The principal of device `i`, whose user is `USERS[i]`.
    fn principal(&self, i: usize) -> Principal {
        Principal {
            device: device_id(i),
            user: user(&self.env, USERS[i]),
            app: APP.into(),
        }
    }

    /// Take the Tech role from device `i`'s user and tell the hub; returns the role.
    fn revoke_tech(&mut self, i: usize) -> Uuid {
        let who = self.principal(i).user;
        let tech = self.env.role_by_name("Tech").unwrap().id;
        self.env.remove_role(who, tech).unwrap();
        self.net.hub.handle_environment(self.env.clone()).unwrap();
        tech
    }

    fn dev(&self, i: usize) -> &Store {
        self.net.devs[i].storage.store()
    }
    fn hub(&self) -> &Store {
        self.net.hub.store()
    }

    fn write(&mut self, i: usize, table: &str, row: RowId, values: &[(&str, Value)]) {
        let store = self.dev(i).clone();
        let mut tx = store.begin();
        tx.update(table, row, values).unwrap();
        tx.commit().unwrap();
        self.net.local_ops(i);
    }

    fn insert(&mut self, i: usize, table: &str, values: &[(&str, Value)]) -> RowId {
        let store = self.dev(i).clone();
        let mut tx = store.begin();
        let id = tx.insert(table, values).unwrap();
        tx.commit().unwrap();
        self.net.local_ops(i);
        id
    }

    /// Device `i` attaches an image ([`photo_bytes`] of `salt`) to `task`; its content and ref.
    fn attach_photo(&mut self, i: usize, task: RowId, salt: u8) -> (Vec<u8>, BlobRef) {
        let content = photo_bytes(salt);
        let blob = self
            .dev(i)
            .put_blob(&format!("photo-{salt}.jpg"), &mut content.as_slice())
            .unwrap();
        self.write(i, "task", task, &[("photo", Value::Image(blob.clone()))]);
        (content, blob)
    }

    /// Device `i`'s pending ops, pushed straight to the hub as `who`; each must be accepted.
    fn push_by_hand(&mut self, i: usize, who: &Principal) {
        let ops = DeviceStorage::pending_ops(&self.net.devs[i].storage, 0, WIDE).unwrap();
        for op in &ops {
            let out = self
                .net
                .hub
                .apply_push(Millis(0), who, ConflictPolicy::MergePerColumn, op)
                .unwrap();
            assert_eq!(out, PushOutcome::Accepted);
        }
    }

    fn hub_insert(&mut self, table: &str, values: &[(&str, Value)]) -> RowId {
        let id = Uuid::new_v4();
        self.net.hub.local_write(table, id, values).unwrap();
        id
    }

    /// The rows a device holds (table, id) over the profile's tables.
    fn held(&self, i: usize) -> BTreeSet<(String, RowId)> {
        let mut out = BTreeSet::new();
        for t in ["task", "account"] {
            for r in self.dev(i).scan(t).unwrap() {
                out.insert((t.to_string(), r.unwrap().id));
            }
        }
        out
    }

    /// Every device holds exactly its set, with the hub's values and conflicts; every op the
    /// hub acknowledged is on the hub.
    fn check_converged(&self) {
        for (i, u) in USERS.iter().enumerate() {
            let d = &self.net.devs[i].storage;
            assert_eq!(
                d.acked_seq().unwrap(),
                d.last_local_seq().unwrap(),
                "device {i}: ops left unacknowledged"
            );
            assert!(
                d.deferred_evictions().unwrap().is_empty(),
                "device {i}: evictions still waiting"
            );
            let set = self.net.hub.device_set(user(&self.env, u), APP);
            assert_eq!(self.held(i), set, "device {i} ({u}) holds a different set");
            for (t, id) in &set {
                let mine = self.dev(i).get(t, *id).unwrap().unwrap();
                let hubs = self.hub().get(t, *id).unwrap().unwrap();
                assert_eq!(mine.values, hubs.values, "device {i}: {t}/{id}");
                assert_eq!(
                    self.dev(i).conflicts(t, *id).unwrap(),
                    self.hub().conflicts(t, *id).unwrap(),
                    "device {i}: conflicts of {t}/{id}"
                );
            }
        }
        self.check_acked_on_hub();
    }

    fn check_acked_on_hub(&self) {
        for (i, d) in self.net.devs.iter().enumerate() {
            let s = d.storage.store();
            let acked = d.storage.acked_seq().unwrap();
            let rejected: BTreeSet<u64> = d
                .storage
                .sync_errors()
                .unwrap()
                .into_iter()
                .map(|(_, e)| e.seq)
                .collect();
            for e in s.ops_since(0, usize::MAX).unwrap() {
                if e.actor != s.actor() || e.seq > acked || rejected.contains(&e.seq) {
                    continue;
                }
                let on_hub = self
                    .hub()
                    .inspect_change(&e.table, e.row, &e.change)
                    .unwrap()
                    .applied;
                if !on_hub {
                    let insp = self
                        .hub()
                        .inspect_change(&e.table, e.row, &e.change)
                        .unwrap();
                    eprintln!("insp {insp:?}");
                    eprintln!("errors {:?}", d.storage.sync_errors().unwrap());
                    for x in s.ops_since(0, usize::MAX).unwrap() {
                        eprintln!("dev log {} {} {} {:?}", x.seq, x.table, x.row, &x.hash[..4]);
                    }
                    for x in self.hub().ops_since(0, usize::MAX).unwrap() {
                        eprintln!("hub log {} {} {} {:?}", x.seq, x.table, x.row, &x.hash[..4]);
                    }
                    for (j, ev) in &self.net.hub_events {
                        if *j == i {
                            eprintln!("hub event {ev:?}");
                        }
                    }
                    for ev in &d.events {
                        eprintln!("dev event {ev:?}");
                    }
                }
                assert!(on_hub, "device {i}: acked op {} is not on the hub", e.seq);
            }
        }
    }
}

struct Seed {
    account: RowId,
    ana_task: RowId,
    team_task: RowId,
    cat_task: RowId,
}

fn seed(w: &mut World) -> Seed {
    let ana = user(&w.env, "ana");
    let cat = user(&w.env, "cat");
    let team = w.env.team_by_name("North Team").unwrap().id;
    let account = w.hub_insert(
        "account",
        &[
            ("name", Value::Text("Contoso".into())),
            ("ownerid", owner_user(ana)),
        ],
    );
    let ana_task = w.hub_insert(
        "task",
        &[
            ("title", Value::Text("fix pump".into())),
            ("ownerid", owner_user(ana)),
            ("account", Value::Lookup(account)),
        ],
    );
    let team_task = w.hub_insert(
        "task",
        &[
            ("title", Value::Text("inspect".into())),
            ("n", Value::Integer(1)),
            ("ownerid", owner_team(team)),
            ("account", Value::Lookup(account)),
        ],
    );
    let cat_task = w.hub_insert(
        "task",
        &[
            ("title", Value::Text("south job".into())),
            ("ownerid", owner_user(cat)),
        ],
    );
    Seed {
        account,
        ana_task,
        team_task,
        cat_task,
    }
}

#[test]
fn initial_sync_offline_edits_and_conflicts_converge() {
    let mut w = world(1, ConflictPolicies::default());
    let s = seed(&mut w);
    w.net.heal(3);
    w.check_converged();
    assert!(w.held(0).contains(&("task".into(), s.ana_task)));
    assert!(w.held(0).contains(&("account".into(), s.account)));
    assert!(w.held(1).contains(&("task".into(), s.team_task)));
    assert!(!w.held(1).contains(&("task".into(), s.ana_task)));
    assert_eq!(w.held(2), [("task".to_string(), s.cat_task)].into());

    // ana and ben edit the team's task offline, concurrently.
    w.net.set_online(0, false);
    w.net.set_online(1, false);
    w.write(0, "task", s.team_task, &[("n", Value::Integer(10))]);
    w.write(1, "task", s.team_task, &[("n", Value::Integer(20))]);
    w.write(
        0,
        "task",
        s.ana_task,
        &[("title", Value::Text("pump fixed".into()))],
    );
    let new = w.insert(
        1,
        "task",
        &[
            ("title", Value::Text("new".into())),
            (
                "ownerid",
                owner_team(w.env.team_by_name("North Team").unwrap().id),
            ),
        ],
    );
    w.net.heal(4);
    w.check_converged();
    let conflicts = w.hub().conflicts("task", s.team_task).unwrap();
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert!(w.held(0).contains(&("task".into(), new)));
    assert_eq!(
        w.dev(1).get("task", s.ana_task).unwrap(),
        None,
        "ben never sees ana's task"
    );
    assert!(!w.net.devs[0]
        .storage
        .rows_with_conflicts()
        .unwrap()
        .is_empty());
}

#[test]
fn an_owner_change_moves_a_row_after_its_pending_ops_are_pushed() {
    let mut w = world(2, ConflictPolicies::default());
    let s = seed(&mut w);
    w.net.heal(3);
    // ana edits her task offline, then gives it to cat: both ops go up, then the row leaves.
    w.net.set_online(0, false);
    let cat = user(&w.env, "cat");
    w.write(0, "task", s.ana_task, &[("n", Value::Integer(7))]);
    w.write(0, "task", s.ana_task, &[("ownerid", owner_user(cat))]);
    w.net.heal(4);
    w.check_converged();
    assert!(w.net.devs[0].storage.sync_errors().unwrap().is_empty());
    assert_eq!(
        w.dev(0).get("task", s.ana_task).unwrap(),
        None,
        "evicted on ana"
    );
    let at_cat = w.dev(2).get("task", s.ana_task).unwrap().unwrap();
    assert_eq!(
        at_cat.get("n"),
        &Value::Integer(7),
        "ana's edit reached cat"
    );
}

#[test]
fn a_device_compacts_its_acknowledged_log_and_keeps_what_is_pending() {
    // Seed 3: devices compact after every acknowledgement.
    let mut w = world(3, ConflictPolicies::default());
    let s = seed(&mut w);
    w.net.heal(3);
    let own = |w: &World| -> Vec<u64> {
        let d = w.dev(0);
        d.ops_since(0, usize::MAX)
            .unwrap()
            .into_iter()
            .filter(|e| e.actor == d.actor())
            .map(|e| e.seq)
            .collect()
    };
    // Edits that reach the hub leave the device's log; the rows keep their values.
    for n in 0..5 {
        w.write(0, "task", s.ana_task, &[("n", Value::Integer(n))]);
    }
    w.net.heal(3);
    w.check_converged();
    assert_eq!(
        own(&w),
        Vec::<u64>::new(),
        "acknowledged edits are compacted"
    );
    assert_eq!(w.dev(0).compaction_backlog().unwrap(), 0);
    // Offline edits stay in the log through pulls and compactions until the hub has them.
    w.net.set_online(0, false);
    w.write(0, "task", s.ana_task, &[("n", Value::Integer(40))]);
    w.write(0, "task", s.team_task, &[("n", Value::Integer(41))]);
    let pending = own(&w);
    assert_eq!(pending.len(), 2);
    w.net
        .hub
        .local_write("task", s.team_task, &[("title", Value::Text("hub".into()))])
        .unwrap();
    w.net.heal(3);
    w.check_converged();
    assert_eq!(own(&w), Vec::<u64>::new());
    let team = w.dev(0).get("task", s.team_task).unwrap().unwrap();
    assert_eq!(team.get("n"), &Value::Integer(41));
    assert_eq!(team.get("title"), &Value::Text("hub".into()));
    assert!(w.dev(0).check().unwrap().is_ok());
    // The compacted rows still leave the device when they leave its set.
    let cat = user(&w.env, "cat");
    w.write(0, "task", s.ana_task, &[("ownerid", owner_user(cat))]);
    w.net.heal(4);
    w.check_converged();
    assert_eq!(w.dev(0).get("task", s.ana_task).unwrap(), None);
}

#[test]
fn a_row_given_away_on_the_hub_rejects_the_old_owners_pending_edit() {
    let mut w = world(8, ConflictPolicies::default());
    let s = seed(&mut w);
    w.net.heal(3);
    w.net.set_online(0, false);
    w.write(0, "task", s.ana_task, &[("n", Value::Integer(7))]);
    let cat = user(&w.env, "cat");
    w.net
        .hub
        .local_write("task", s.ana_task, &[("ownerid", owner_user(cat))])
        .unwrap();
    w.net.heal(4);
    w.check_converged();
    assert_eq!(w.dev(0).get("task", s.ana_task).unwrap(), None);
    let errors = w.net.devs[0].storage.sync_errors().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].1.kind, RejectionKind::Permission);
    assert!(w.dev(2).get("task", s.ana_task).unwrap().is_some());
}

#[test]
fn an_unauthorized_write_is_rejected_rolled_back_and_listed() {
    let mut w = world(3, ConflictPolicies::default());
    let s = seed(&mut w);
    w.net.heal(3);
    // ben may read the account (same business unit) but not write it (ana owns it).
    assert!(w.held(1).contains(&("account".into(), s.account)));
    w.write(
        1,
        "account",
        s.account,
        &[("name", Value::Text("hacked".into()))],
    );
    w.net.heal(3);
    w.check_converged();
    let name = w.dev(1).get("account", s.account).unwrap().unwrap();
    assert_eq!(
        name.get("name"),
        &Value::Text("Contoso".into()),
        "rolled back"
    );
    let errors = w.net.devs[1].storage.sync_errors().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].1.kind, RejectionKind::Permission);
    assert_eq!(errors[0].1.table, "account");

    // Retry: pushed again, rejected again (a new error); discard: gone.
    let id = errors[0].0;
    w.net.devs[1].storage.retry_error(id).unwrap();
    w.net.local_ops(1);
    w.net.heal(3);
    let errors = w.net.devs[1].storage.sync_errors().unwrap();
    assert_eq!(errors.len(), 1);
    assert_ne!(errors[0].0, id);
    assert!(w.net.devs[1].storage.discard_error(errors[0].0).unwrap());
    assert!(w.net.devs[1].storage.sync_errors().unwrap().is_empty());
    w.check_converged();
}

#[test]
fn a_device_may_not_set_the_owning_business_unit() {
    // Dataverse derives it from the owner; a device that set it would move a row into another
    // unit's scopes.
    let mut w = world(21, ConflictPolicies::default());
    let s = seed(&mut w);
    w.net.heal(3);
    let ana = user(&w.env, "ana");
    let south = Value::Lookup(w.env.business_unit_by_name("South").unwrap().id);
    let created = w.insert(
        0,
        "task",
        &[
            ("title", Value::Text("moved south".into())),
            ("ownerid", owner_user(ana)),
            ("owningbusinessunit", south.clone()),
        ],
    );
    w.write(0, "task", s.ana_task, &[("owningbusinessunit", south)]);
    w.net.heal(3);
    let errors = w.net.devs[0].storage.sync_errors().unwrap();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors
        .iter()
        .all(|(_, e)| e.kind == RejectionKind::Permission
            && e.message.contains("owningbusinessunit")));
    assert!(w.hub().get("task", created).unwrap().is_none());
    let hubs = w.hub().get("task", s.ana_task).unwrap().unwrap();
    assert!(!hubs.values.contains_key("owningbusinessunit"));
    w.check_converged();
}

#[test]
fn an_owner_change_takes_the_rows_owning_business_unit_with_it() {
    // A row from Dataverse carries its unit explicitly; ana gives hers to cat (South).
    let mut w = world(27, ConflictPolicies::default());
    seed(&mut w);
    let (ana, cat) = (user(&w.env, "ana"), user(&w.env, "cat"));
    let north = w.env.business_unit_by_name("North").unwrap().id;
    let south = w.env.business_unit_by_name("South").unwrap().id;
    let task = w.hub_insert(
        "task",
        &[
            ("title", Value::Text("handed over".into())),
            ("ownerid", owner_user(ana)),
            ("owningbusinessunit", Value::Lookup(north)),
        ],
    );
    w.net.heal(3);
    w.write(0, "task", task, &[("ownerid", owner_user(cat))]);
    w.net.heal(3);
    let row = w.hub().get("task", task).unwrap().unwrap();
    assert_eq!(row.get("owningbusinessunit"), &Value::Lookup(south));
    assert!(w.held(2).contains(&("task".into(), task)));
    w.check_converged();
}

/// Revoking a device's last token drops what the hub kept for its sessions (the rows it held),
/// and only that device's; a device with another active token keeps it.
#[test]
fn revoking_a_devices_last_token_drops_what_the_hub_kept_for_it() {
    let mut w = world(19, ConflictPolicies::default());
    seed(&mut w);
    w.net.heal(2);
    let held = |w: &World, i: usize| {
        let mut p = b"hh/".to_vec();
        p.extend_from_slice(device_id(i).0.as_bytes());
        w.hub().aux_scan("hub", &p).unwrap().len()
    };
    let tokens_of = |w: &World, i: usize| -> Vec<Uuid> {
        w.net
            .hub
            .issued_tokens()
            .unwrap()
            .into_iter()
            .filter(|t| t.token.as_ref().map(|t| t.device_id) == Some(device_id(i).0))
            .map(|t| t.token_id)
            .collect()
    };
    let (held_0, held_1) = (held(&w, 0), held(&w, 1));
    assert!(held_0 > 0 && held_1 > 0, "{held_0} {held_1}");
    // Device 1 has a second token (another app of its profile): revoking the first keeps its
    // records.
    let first = tokens_of(&w, 1);
    w.net.hub.enroll(USERS[1], APP, device_id(1).0, 0).unwrap();
    assert!(w.net.hub.revoke(first[0]).unwrap());
    assert_eq!(held(&w, 1), held_1);
    // Device 0's only token: its records go, in the revocation's write.
    let only = tokens_of(&w, 0);
    assert_eq!(only.len(), 1);
    assert!(w.net.hub.revoke(only[0]).unwrap());
    assert_eq!(held(&w, 0), 0);
    assert_eq!(held(&w, 1), held_1);
    assert!(w
        .net
        .hub
        .device_lags()
        .iter()
        .all(|l| l.device != device_id(0)));
    // A session of device 0 still running (a frame read before the revocation) writes nothing
    // back: its storage calls fail.
    let ana = w.principal(0);
    assert!(w.net.hub.pull(&ana, "task", Cursor(0), WIDE).is_err());
    assert_eq!(held(&w, 0), 0);
    // And device 0 may not be enrolled again to come back with its old store.
    assert!(matches!(
        w.net.hub.enroll(USERS[0], APP, device_id(0).0, 0),
        Err(HubReplicaError::DeviceRevoked(_))
    ));
    // Nor provisioned out of band, which would write records no revocation drops.
    let row = ("task".to_string(), RowId::from_u128(1));
    assert!(matches!(
        w.net.hub.provision(device_id(0), &[row], Cursor(0)),
        Err(HubReplicaError::DeviceRevoked(_))
    ));
    assert_eq!(held(&w, 0), 0);
}

#[test]
fn junk_pushed_on_tables_outside_the_profile_leaves_no_record() {
    // A device with a valid credential pushing changes to a table its profile does not have
    // gets a rejection each time, and the hub keeps nothing of them (nor flushes for them).
    let mut w = world(28, ConflictPolicies::default());
    seed(&mut w);
    let ana = w.principal(0);
    let records = |w: &World| {
        ["dec/", "ho/"]
            .iter()
            .map(|p| w.hub().aux_scan("hub", p.as_bytes()).unwrap().len())
            .sum::<usize>()
    };
    let before = records(&w);
    let junk = Store::temporary(w.hub().schema().clone(), opts()).unwrap();
    for k in 0..50 {
        let mut tx = junk.begin();
        tx.insert("note", &[("text", Value::Text(format!("junk {k}")))])
            .unwrap();
        tx.commit().unwrap();
    }
    for e in junk.ops_since(0, 100).unwrap() {
        let op = PushOp {
            seq: e.seq,
            table: e.table,
            row: e.row,
            change: e.change,
        };
        for _ in 0..2 {
            let out = w
                .net
                .hub
                .apply_push(Millis(0), &ana, ConflictPolicy::MergePerColumn, &op)
                .unwrap();
            assert!(
                matches!(
                    out,
                    PushOutcome::Rejected {
                        kind: RejectionKind::Permission,
                        ..
                    }
                ),
                "{out:?}"
            );
        }
    }
    assert_eq!(records(&w), before, "junk left records on the hub");
}

/// A change made elsewhere with `actor`: a new task owned by `owner` (a fresh id: a store's
/// ids follow its actor).
fn change_by(schema: &Schema, actor: ActorId, owner: Uuid) -> PushOp {
    let other = Store::temporary(schema.clone(), opts().with_actor(actor)).unwrap();
    let mut tx = other.begin();
    let row = Uuid::new_v4();
    tx.insert_with_id(
        "task",
        row,
        &[
            ("title", Value::Text("forged?".into())),
            ("ownerid", owner_user(owner)),
        ],
    )
    .unwrap();
    tx.commit().unwrap();
    let e = other.ops_since(0, 1).unwrap().remove(0);
    PushOp {
        seq: 1,
        table: e.table,
        row,
        change: e.change,
    }
}

#[test]
fn a_rejected_write_gets_back_no_row_outside_the_devices_set() {
    // ben's role reads every account of his business unit, but his set holds only those his
    // tasks point at: a write to another one is refused with nothing of the row.
    let mut w = world(23, ConflictPolicies::default());
    seed(&mut w);
    w.net.heal(3);
    let ana = user(&w.env, "ana");
    let other = w.hub_insert(
        "account",
        &[
            ("name", Value::Text("Fabrikam".into())),
            ("ownerid", owner_user(ana)),
        ],
    );
    w.net.heal(3);
    assert!(!w.held(1).contains(&("account".into(), other)));
    let forged = Store::temporary(w.hub().schema().clone(), opts()).unwrap();
    let mut tx = forged.begin();
    tx.insert_with_id("account", other, &[("name", Value::Text("mine".into()))])
        .unwrap();
    tx.commit().unwrap();
    let e = forged.ops_since(0, 1).unwrap().remove(0);
    let op = PushOp {
        seq: 1,
        table: e.table,
        row: other,
        change: e.change,
    };
    let out = w
        .net
        .hub
        .apply_push(
            Millis(0),
            &w.principal(1),
            ConflictPolicy::MergePerColumn,
            &op,
        )
        .unwrap();
    match out {
        PushOutcome::Rejected {
            kind,
            authoritative,
            ..
        } => {
            assert_eq!(kind, RejectionKind::Permission);
            assert!(
                authoritative.is_none(),
                "the row went to a device outside its set"
            );
        }
        PushOutcome::Accepted => panic!("accepted"),
    }
}

#[test]
fn rejected_ops_whose_row_copies_overflow_the_acknowledgement_still_converge() {
    // ben may read his team's accounts but not write them: three rejections whose rows
    // (900 KB each) do not all fit in one acknowledgement. The row whose copy stays behind
    // leaves ben's device, and his next pull brings it back whole.
    let mut w = world(26, ConflictPolicies::default());
    seed(&mut w);
    let ana = user(&w.env, "ana");
    let team = w.env.team_by_name("North Team").unwrap().id;
    let mut accounts = Vec::new();
    for k in 0..3 {
        let big: String = std::iter::repeat_n(char::from(b'a' + k), 900_000).collect();
        let account = w.hub_insert(
            "account",
            &[("name", Value::Text(big)), ("ownerid", owner_user(ana))],
        );
        w.hub_insert(
            "task",
            &[
                ("title", Value::Text(format!("visit {k}"))),
                ("ownerid", owner_team(team)),
                ("account", Value::Lookup(account)),
            ],
        );
        accounts.push(account);
    }
    w.net.heal(3);
    for a in &accounts {
        assert!(w.held(1).contains(&("account".into(), *a)));
    }
    w.net.set_online(1, false);
    for a in &accounts {
        w.write(1, "account", *a, &[("n", Value::Integer(7))]);
    }
    w.net.heal(4);
    let errors = w.net.devs[1].storage.sync_errors().unwrap();
    assert_eq!(errors.len(), 3, "{errors:?}");
    w.check_converged();
}

#[test]
fn changes_claiming_another_writers_actor_are_refused() {
    let mut w = world(22, ConflictPolicies::default());
    let s = seed(&mut w);
    w.net.heal(3);
    // ana's device pushes: its actor is hers from now on.
    w.write(0, "task", s.ana_task, &[("n", Value::Integer(2))]);
    w.net.heal(3);
    let (ben, ben_id) = (w.principal(1), user(&w.env, "ben"));
    let now = Millis(0);
    let merge = ConflictPolicy::MergePerColumn;
    let refused = |o: PushOutcome| match o {
        PushOutcome::Rejected { kind, message, .. } => {
            assert_eq!(kind, RejectionKind::Permission, "{message}");
            true
        }
        PushOutcome::Accepted => false,
    };
    let ana_actor = w.dev(0).actor();
    let hub_actor = w.hub().actor();
    for actor in [ana_actor, UPSTREAM_ACTOR, hub_actor] {
        let op = change_by(w.hub().schema(), actor, ben_id);
        assert!(
            refused(w.net.hub.apply_push(now, &ben, merge, &op).unwrap()),
            "a change by {actor:?} from ben's device"
        );
        assert!(w.hub().get("task", op.row).unwrap().is_none());
    }
    // Fresh actors are ben's, up to the limit (his device's own included).
    let mut accepted = 0;
    loop {
        let op = change_by(w.hub().schema(), ActorId::random(), ben_id);
        if refused(w.net.hub.apply_push(now, &ben, merge, &op).unwrap()) {
            break;
        }
        accepted += 1;
        assert!(accepted <= ACTORS_PER_DEVICE, "no limit on actors");
    }
    assert!(accepted >= ACTORS_PER_DEVICE - 1, "{accepted}");
}

#[test]
fn forged_cursors_and_foreign_tables_get_nothing_outside_the_set() {
    let mut w = world(4, ConflictPolicies::default());
    let s = seed(&mut w);
    let cat = w.principal(2);
    let limits = WIDE;
    let hub = &mut w.net.hub;
    let mut seen = BTreeSet::new();
    let end = hub.store().last_seq();
    // The hub's own cursors, at every seq of its log; then forged ones: a wrong check of the
    // entry a cursor names, raw seqs, past the log's end.
    let mut cursors: Vec<(Cursor, bool)> = Vec::new();
    for seq in 0..=end {
        let valid = hub.cursor_at(seq).unwrap();
        cursors.push((valid, false));
        if seq > 0 {
            cursors.push((Cursor(valid.0 ^ 1), true));
            cursors.push((Cursor(valid.0 ^ 0x8000), true));
        }
    }
    let past_end = Cursor(hub.cursor_at(end).unwrap().0 + (1 << 16));
    for c in [
        past_end,
        Cursor(1),
        Cursor(5),
        Cursor(1000),
        Cursor(u64::MAX),
    ] {
        cursors.push((c, true));
    }
    for (c, forged) in cursors {
        let chunk = hub.pull(&cat, "task", c, limits).unwrap();
        // A cursor this log does not hold restarts the device's feed, and carries nothing
        // else.
        assert_eq!(chunk.restart, forged, "cursor {c:?}, log end {end}");
        assert!(!chunk.restart || chunk.is_empty());
        for r in chunk.entering.iter().map(|d| d.row) {
            seen.insert(r);
        }
        for r in chunk.ops.iter().map(|o| o.row) {
            seen.insert(r);
        }
        for r in &chunk.leaving {
            seen.insert(*r);
        }
        assert!(chunk.cursor >= c);
    }
    assert_eq!(seen, [s.cat_task].into());
    // Cursors this log does not hold (for one table) are counted once: a hub restored from a
    // backup, or a forged cursor.
    assert_eq!(hub.cursors_not_in_log(), 1);
    for t in ["account", "note", "secret", ""] {
        let chunk = hub.pull(&cat, t, Cursor(0), limits).unwrap();
        assert!(chunk.is_empty(), "{t}: {chunk:?}");
    }
}

#[test]
fn duplicated_batches_and_resent_ops_change_nothing() {
    let mut w = world(5, ConflictPolicies::default());
    let s = seed(&mut w);
    w.net.heal(2);
    let ana = w.principal(0);
    // A re-sent op gets the same answer, and applying it twice adds nothing.
    let store = w.dev(0).clone();
    let mut tx = store.begin();
    tx.update("task", s.ana_task, &[("n", Value::Integer(3))])
        .unwrap();
    tx.commit().unwrap();
    let e = store.ops_since(store.last_seq() - 1, 1).unwrap().remove(0);
    let op = PushOp {
        seq: e.seq,
        table: e.table.clone(),
        row: e.row,
        change: e.change.clone(),
    };
    let hub_seq = w.hub().last_seq();
    let a = w
        .net
        .hub
        .apply_push(Millis(0), &ana, ConflictPolicy::MergePerColumn, &op)
        .unwrap();
    let b = w
        .net
        .hub
        .apply_push(Millis(0), &ana, ConflictPolicy::MergePerColumn, &op)
        .unwrap();
    assert_eq!(a, PushOutcome::Accepted);
    assert_eq!(a, b);
    assert_eq!(w.hub().last_seq(), hub_seq + 1);
    // A pull batch applied twice on the device changes nothing.
    let chunk = w.net.hub.pull(&ana, "task", Cursor(0), WIDE).unwrap();
    let dev = &mut w.net.devs[0].storage;
    dev.import_rows("task", &chunk.entering).unwrap();
    dev.apply_ops("task", &chunk.ops).unwrap();
    let before = dev.store().last_seq();
    dev.import_rows("task", &chunk.entering).unwrap();
    dev.apply_ops("task", &chunk.ops).unwrap();
    assert_eq!(dev.store().last_seq(), before);
    // Duplicated and reordered frames.
    w.net.faults = Faults {
        loss_pct: 0,
        dup_pct: 30,
        reorder_pct: 30,
    };
    w.write(1, "task", s.team_task, &[("n", Value::Integer(5))]);
    w.net.run_for(Millis::from_minutes(10));
    w.net.heal(4);
    w.check_converged();
}

#[test]
fn server_wins_rejects_a_concurrent_write_and_client_wins_resolves_it() {
    let policies = ConflictPolicies {
        default: ConflictPolicy::MergePerColumn,
        tables: [("task".to_string(), ConflictPolicy::ServerWins)]
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
    };
    let mut w = world(6, policies);
    let s = seed(&mut w);
    w.net.heal(3);
    w.net.set_online(0, false);
    w.write(0, "task", s.ana_task, &[("n", Value::Integer(1))]);
    w.net
        .hub
        .local_write("task", s.ana_task, &[("n", Value::Integer(2))])
        .unwrap();
    w.net.heal(4);
    w.check_converged();
    let errors = w.net.devs[0].storage.sync_errors().unwrap();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].1.kind, RejectionKind::Conflict);
    assert_eq!(
        w.dev(0).get("task", s.ana_task).unwrap().unwrap().get("n"),
        &Value::Integer(2)
    );

    let policies = ConflictPolicies {
        default: ConflictPolicy::ClientWins,
        tables: BTreeMap::new(),
    };
    let mut w = world(7, policies);
    let s = seed(&mut w);
    w.net.heal(3);
    w.net.set_online(0, false);
    w.write(0, "task", s.ana_task, &[("n", Value::Integer(1))]);
    w.net
        .hub
        .local_write("task", s.ana_task, &[("n", Value::Integer(2))])
        .unwrap();
    w.net.heal(4);
    w.check_converged();
    assert_eq!(
        w.hub().get("task", s.ana_task).unwrap().unwrap().get("n"),
        &Value::Integer(1)
    );
    assert!(w.hub().conflicts("task", s.ana_task).unwrap().is_empty());
}

#[test]
fn images_the_profile_selects_download_in_chunks_to_devices_that_hold_the_row() {
    let mut w = world(9, ConflictPolicies::default());
    let s = seed(&mut w);
    let content = photo_bytes(0);
    let blob = w
        .net
        .hub
        .store()
        .put_blob("pump.jpg", &mut content.as_slice())
        .unwrap();
    w.net
        .hub
        .local_write("task", s.ana_task, &[("photo", Value::Image(blob.clone()))])
        .unwrap();
    w.net.heal(2);
    w.net.fetch_blob(0, blob.sha256);
    w.net.run_for(Millis::from_minutes(1));
    assert_eq!(w.dev(0).read_blob(&blob).unwrap(), content);
    // cat's device does not hold the row: nothing, however it asks.
    let cat = w.principal(2);
    assert_eq!(
        w.net.hub.blob_chunk(&cat, &blob.sha256, 0, 1024).unwrap(),
        None
    );
    w.check_converged();
}

#[test]
fn a_hub_that_lies_about_a_files_size_cannot_fill_the_device() {
    let mut w = world(9, ConflictPolicies::default());
    let s = seed(&mut w);
    // A photo whose content the hub does not have (yet): the device holds the row and
    // wants the file.
    let content = photo_bytes(0);
    let elsewhere = Store::temporary(w.hub().schema().clone(), opts()).unwrap();
    let blob = elsewhere
        .put_blob("pump.jpg", &mut content.as_slice())
        .unwrap();
    w.net
        .hub
        .local_write("task", s.ana_task, &[("photo", Value::Image(blob.clone()))])
        .unwrap();
    w.net.heal(2);
    assert!(w.dev(0).get("task", s.ana_task).unwrap().is_some());
    assert!(w.net.devs[0]
        .storage
        .blobs_to_fetch()
        .unwrap()
        .contains(&blob.sha256));
    // The row says 200,000 bytes; a chunk claiming a terabyte is refused and nothing kept.
    let dev = &mut w.net.devs[0].storage;
    let lie = dev.write_blob_chunk(&blob.sha256, 0, &content[..65_536], 1 << 40);
    assert!(matches!(lie, Err(StorageError::BlobMismatch)), "{lie:?}");
    assert_eq!(dev.blob_progress(&blob.sha256).unwrap(), 0);
    assert!(dev.blobs_to_fetch().unwrap().contains(&blob.sha256));
    // The honest size is taken.
    dev.write_blob_chunk(&blob.sha256, 0, &content, content.len() as u64)
        .unwrap();
    assert_eq!(w.dev(0).read_blob(&blob).unwrap(), content);
}

/// 200,000 bytes (four protocol chunks) that start like a JPEG: image columns take images only.
fn photo_bytes(salt: u8) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8 ^ salt).collect();
    bytes[..4].copy_from_slice(&[0xFF, 0xD8, 0xFF, 0xE0]);
    bytes
}

#[test]
fn an_image_attached_offline_goes_up_and_down_to_the_devices_that_hold_the_row() {
    let mut w = world(11, ConflictPolicies::default());
    let s = seed(&mut w);
    w.net.heal(2);
    w.net.set_online(0, false);
    let (content, blob) = w.attach_photo(0, s.team_task, 1);
    w.net.run_for(Millis::from_minutes(1));
    assert!(
        !w.hub().has_blob(&blob).unwrap(),
        "offline: nothing went up"
    );
    w.net.heal(3);
    assert_eq!(w.hub().read_blob(&blob).unwrap(), content);
    assert!(w.net.devs[0].events.contains(&DeviceEvent::BlobUploaded {
        sha256: blob.sha256
    }));
    // ben holds the team's task: the image came down with it, unasked.
    assert_eq!(w.dev(1).read_blob(&blob).unwrap(), content);
    // cat does not hold the row: no image, and the hub would not give it.
    assert!(!w.dev(2).has_blob(&blob).unwrap());
    let cat = w.principal(2);
    assert_eq!(
        w.net.hub.blob_chunk(&cat, &blob.sha256, 0, 1024).unwrap(),
        None
    );
    w.check_converged();
}

#[test]
fn an_interrupted_upload_resumes_where_the_hub_stopped() {
    let mut w = world(12, ConflictPolicies::default());
    let s = seed(&mut w);
    w.net.heal(2);
    let (content, blob) = w.attach_photo(0, s.ana_task, 2);
    // Cut the link as soon as the hub holds part of the content.
    let ana = device_id(0);
    let mut guard = 0;
    while w.net.hub.upload_progress(ana, &blob.sha256).unwrap() == 0 {
        w.net.pump();
        w.net.now = w.net.now + Millis(1);
        guard += 1;
        assert!(guard < 10_000, "the upload never started");
    }
    w.net.set_online(0, false);
    let held = w.net.hub.upload_progress(ana, &blob.sha256).unwrap();
    assert!(held > 0 && held < content.len() as u64, "{held}");
    assert!(!w.hub().has_blob(&blob).unwrap());
    assert_eq!(w.net.devs[0].storage.pending_files().unwrap(), (1, 0));
    let before = w.net.stats.blob_put_bytes;
    w.net.heal(3);
    assert_eq!(w.hub().read_blob(&blob).unwrap(), content);
    assert_eq!(w.net.hub.upload_progress(ana, &blob.sha256).unwrap(), 0);
    assert_eq!(w.net.devs[0].storage.pending_files().unwrap(), (0, 0));
    // Resumed, not restarted: after the reconnect the device sent the first piece once more
    // (the hub answers it with where its copy ends) and then only what the hub lacked.
    let resent = w.net.stats.blob_put_bytes - before;
    assert_eq!(resent, 65_536 + content.len() as u64 - held, "{resent}");
    w.check_converged();
}

#[test]
fn duplicated_and_late_upload_acks_do_not_multiply_the_pieces() {
    let mut w = world(14, ConflictPolicies::default());
    let s = seed(&mut w);
    w.net.heal(2);
    let (content, blob) = w.attach_photo(0, s.ana_task, 4);
    w.net.faults = Faults {
        loss_pct: 0,
        dup_pct: 60,
        reorder_pct: 0,
    };
    w.net.run_for(Millis::from_minutes(3));
    w.net.heal(2);
    assert_eq!(w.hub().read_blob(&blob).unwrap(), content);
    // Four pieces; each answer the device no longer waits for is ignored, so duplicates
    // cannot start parallel streams of pieces.
    assert!(w.net.stats.duplicated > 0);
    assert!(
        w.net.stats.blob_puts <= 6,
        "{} BlobPuts",
        w.net.stats.blob_puts
    );
}

#[test]
fn the_hub_takes_only_uploads_a_row_of_the_devices_set_refers_to() {
    let mut w = world(13, ConflictPolicies::default());
    let s = seed(&mut w);
    w.net.heal(2);
    let (ana, ben, cat) = (w.principal(0), w.principal(1), w.principal(2));
    let content = photo_bytes(3);
    let blob = w.dev(0).put_blob("a.jpg", &mut content.as_slice()).unwrap();
    let first = &content[..65_536];
    let rest = &content[65_536..];
    let now = Millis(0);
    let refused = |o: UploadOutcome| matches!(o, UploadOutcome::Refused(_));
    let total = content.len() as u64;
    // No row refers to it yet.
    assert!(refused(
        w.net
            .hub
            .put_blob_chunk(now, &ana, &blob.sha256, 0, total, first)
            .unwrap()
    ));
    w.net.set_online(0, false); // the op and the pieces go over by hand below
    w.write(
        0,
        "task",
        s.team_task,
        &[("photo", Value::Image(blob.clone()))],
    );
    w.push_by_hand(0, &ana);
    let hub = &mut w.net.hub;
    // cat's set does not hold the team's task.
    assert!(refused(
        hub.put_blob_chunk(now, &cat, &blob.sha256, 0, total, first)
            .unwrap()
    ));
    // The size must be the row's.
    assert!(refused(
        hub.put_blob_chunk(now, &ana, &blob.sha256, 0, total + 1, first)
            .unwrap()
    ));
    // A piece that is not the next one is not stored; the answer says where to go on from.
    let put = |hub: &mut HubReplica, who: &Principal, offset: u64, data: &[u8]| {
        hub.put_blob_chunk(now, who, &blob.sha256, offset, total, data)
            .unwrap()
    };
    assert_eq!(put(hub, &ana, 65_536, first), UploadOutcome::Continue(0));
    assert_eq!(put(hub, &ana, 0, first), UploadOutcome::Continue(65_536));
    assert_eq!(
        put(hub, &ana, 0, first),
        UploadOutcome::Continue(65_536),
        "a repeated piece changes nothing"
    );
    // ben holds the team's task too: his junk is his own upload and spoils nothing of ana's.
    let junk = vec![0u8; rest.len()];
    assert_eq!(put(hub, &ben, 65_536, &junk), UploadOutcome::Continue(0));
    assert_eq!(
        put(hub, &ben, 0, &junk[..65_536]),
        UploadOutcome::Continue(65_536)
    );
    assert!(refused(put(hub, &ben, 65_536, &junk)));
    // Bytes that do not hash to the content are dropped whole, and stored as nothing.
    let mut forged = content.clone();
    forged[70_000] ^= 0xff;
    let forged_sha: [u8; 32] = Sha256::digest(&forged).into();
    let mut w2 = put(hub, &ana, 65_536, &forged[65_536..]);
    assert!(refused(w2.clone()), "{w2:?}");
    assert!(!hub.store().has_blob(&blob).unwrap());
    assert_eq!(hub.store().blob_size(&forged_sha).unwrap(), None);
    assert_eq!(hub.upload_progress(ana.device, &blob.sha256).unwrap(), 0);
    // The real bytes, in two pieces.
    assert_eq!(put(hub, &ana, 0, first), UploadOutcome::Continue(65_536));
    w2 = put(hub, &ana, 65_536, rest);
    assert_eq!(w2, UploadOutcome::Complete);
    assert_eq!(hub.store().read_blob(&blob).unwrap(), content);
    // Once the hub has it, any device that may upload it is told so at once.
    assert_eq!(put(hub, &ben, 0, first), UploadOutcome::Complete);
}

/// A client that puts other bytes in an image column (the store refuses that only for content
/// it holds) has its upload refused by the hub, which keeps nothing of it.
#[test]
fn the_hub_refuses_an_upload_that_is_not_an_image_for_an_image_column() {
    let mut w = world(16, ConflictPolicies::default());
    let s = seed(&mut w);
    w.net.heal(2);
    let ana = w.principal(0);
    let text = b"a text file, not a photo".repeat(100);
    let sha: [u8; 32] = Sha256::digest(&text).into();
    let blob = BlobRef {
        sha256: sha,
        size: text.len() as u64,
        name: "notes.jpg".into(),
    };
    // The device store does not hold the content: the write goes through.
    w.net.set_online(0, false);
    w.write(
        0,
        "task",
        s.ana_task,
        &[("photo", Value::Image(blob.clone()))],
    );
    let now = Millis(0);
    w.push_by_hand(0, &ana);
    let hub = &mut w.net.hub;
    let out = hub
        .put_blob_chunk(now, &ana, &sha, 0, text.len() as u64, &text)
        .unwrap();
    let UploadOutcome::Refused(message) = out else {
        panic!("{out:?}")
    };
    assert!(
        message.contains("not a GIF, JPEG, TIFF, BMP or PNG"),
        "{message}"
    );
    assert!(!hub.store().has_blob(&blob).unwrap());
    assert_eq!(hub.upload_progress(ana.device, &sha).unwrap(), 0);
    // Content the hub already holds (uploaded for a file column, say) needs no upload: an op
    // that puts it in an image column is checked, and refused, when it is pushed.
    let held = b"%PDF-1.7 a contract".repeat(40);
    let held_ref = hub
        .store()
        .put_blob("contract.pdf", &mut held.as_slice())
        .unwrap();
    w.write(0, "task", s.ana_task, &[("photo", Value::Image(held_ref))]);
    let ops = DeviceStorage::pending_ops(&w.net.devs[0].storage, 0, WIDE).unwrap();
    let op = ops.last().unwrap();
    let out = w
        .net
        .hub
        .apply_push(now, &ana, ConflictPolicy::MergePerColumn, op)
        .unwrap();
    assert!(
        matches!(&out, PushOutcome::Rejected { kind: RejectionKind::Validation, message, .. }
            if message.contains("image column `photo`: not a GIF")),
        "{out:?}"
    );
}

/// The hub holds a pushed file or image reference to its column's maximum (a device whose
/// schema allows more is refused), a reference to content it holds to that content's size, and
/// content a device would have to upload to one upload's size, whatever the column allows.
#[test]
fn the_hub_refuses_file_references_over_the_columns_maximum_or_an_uploads_size() {
    let mut w = world(17, ConflictPolicies::default());
    let s = seed(&mut w);
    w.net.heal(2);
    let ana = w.principal(0);
    let now = Millis(0);
    let absent = |size: u64, name: &str| BlobRef {
        sha256: [size as u8; 32],
        size,
        name: name.into(),
    };
    let rejected_with = |out: &PushOutcome, text: &str| {
        matches!(out, PushOutcome::Rejected { kind: RejectionKind::Validation, message, .. }
            if message.contains(text))
    };
    // A store with device 0's actor and a schema that lets `doc` take 128 MiB writes a 100 MiB
    // reference; the hub's schema (64 MiB) refuses it.
    let loose = Schema::from_toml(&SCHEMA.replace(
        "doc = { type = \"file\", max_size_kb = 65536 }",
        "doc = { type = \"file\", max_size_kb = 131072 }",
    ))
    .unwrap();
    let other = Store::temporary(loose, opts().with_actor(w.dev(0).actor())).unwrap();
    let row = w.dev(0).export_row("task", s.ana_task).unwrap().unwrap();
    other.import_row(&row, Durability::Immediate).unwrap();
    let mut tx = other.begin();
    tx.update(
        "task",
        s.ana_task,
        &[("doc", Value::File(absent(100 << 20, "big.pdf")))],
    )
    .unwrap();
    tx.commit().unwrap();
    let e = other.ops_since(other.last_seq() - 1, 1).unwrap().remove(0);
    let op = PushOp {
        seq: 1_000,
        table: e.table.clone(),
        row: e.row,
        change: e.change.clone(),
    };
    let out = w
        .net
        .hub
        .apply_push(now, &ana, ConflictPolicy::MergePerColumn, &op)
        .unwrap();
    assert!(
        rejected_with(&out, "`task.doc` takes files of at most 67108864 bytes"),
        "{out:?}"
    );
    assert_eq!(
        w.hub().get("task", s.ana_task).unwrap().unwrap().get("doc"),
        &Value::Null
    );

    // A reference to content the hub holds that gives a smaller size (the device does not
    // hold the content, so its store cannot tell).
    let held = w
        .net
        .hub
        .store()
        .put_blob("contract.pdf", &mut [7u8; 5_000].as_slice())
        .unwrap();
    let mut short = held.clone();
    short.size = 10;
    w.write(0, "task", s.ana_task, &[("doc", Value::File(short))]);
    let ops = DeviceStorage::pending_ops(&w.net.devs[0].storage, 0, WIDE).unwrap();
    let out = w
        .net
        .hub
        .apply_push(
            now,
            &ana,
            ConflictPolicy::MergePerColumn,
            ops.last().unwrap(),
        )
        .unwrap();
    assert!(
        rejected_with(
            &out,
            "`doc`: the reference gives 10 bytes for content held at 5000"
        ),
        "{out:?}"
    );

    // `doc` takes 64 MiB, but a device uploads at most 32: a 40 MiB reference to content the
    // hub does not hold could never arrive.
    let mut w = world(18, ConflictPolicies::default());
    let s = seed(&mut w);
    w.net.heal(2);
    w.write(
        0,
        "task",
        s.ana_task,
        &[("doc", Value::File(absent(40 << 20, "big.pdf")))],
    );
    let ops = DeviceStorage::pending_ops(&w.net.devs[0].storage, 0, WIDE).unwrap();
    let out = w
        .net
        .hub
        .apply_push(
            now,
            &ana,
            ConflictPolicy::MergePerColumn,
            ops.last().unwrap(),
        )
        .unwrap();
    assert!(
        rejected_with(&out, "a device uploads at most 33554432"),
        "{out:?}"
    );
}

#[test]
fn the_device_that_attached_a_file_may_upload_it_after_the_row_left_its_set() {
    let mut w = world(15, ConflictPolicies::default());
    let s = seed(&mut w);
    w.net.heal(2);
    // ana attaches a photo and hands the task to cat in the same offline session.
    w.net.set_online(0, false);
    let cat = user(&w.env, "cat");
    let (content, blob) = w.attach_photo(0, s.ana_task, 5);
    w.write(0, "task", s.ana_task, &[("ownerid", owner_user(cat))]);
    w.net.heal(3);
    assert_eq!(w.hub().read_blob(&blob).unwrap(), content);
    // cat now holds the task, and its photo came down with it.
    assert_eq!(w.dev(2).read_blob(&blob).unwrap(), content);
    assert!(!w.held(0).contains(&("task".to_string(), s.ana_task)));
    w.check_converged();
}

#[test]
fn revoked_and_foreign_tokens_are_refused() {
    let mut w = world(10, ConflictPolicies::default());
    let token = w
        .net
        .hub
        .enroll("ben", APP, Uuid::from_u128(77), 5)
        .unwrap();
    let dev = DeviceId(Uuid::from_u128(77));
    assert!(w
        .net
        .hub
        .authenticate(dev, token.as_bytes(), APP)
        .unwrap()
        .is_ok());
    assert!(w
        .net
        .hub
        .authenticate(DeviceId(Uuid::from_u128(78)), token.as_bytes(), APP)
        .unwrap()
        .is_err());
    assert!(w
        .net
        .hub
        .authenticate(dev, token.as_bytes(), "other")
        .unwrap()
        .is_err());
    assert!(w.net.hub.revoke(token.token().token_id).unwrap());
    let refused = w
        .net
        .hub
        .authenticate(dev, token.as_bytes(), APP)
        .unwrap()
        .unwrap_err();
    assert_eq!(
        refused.code,
        fieldsync_replication::proto::CloseCode::REVOKED
    );
    let other_key = HubSigningKey::generate().unwrap();
    let forged = other_key.sign(token.token()).unwrap();
    assert!(w
        .net
        .hub
        .authenticate(dev, forged.as_bytes(), APP)
        .unwrap()
        .is_err());
}

#[derive(Debug, Clone)]
enum Action {
    Edit { dev: usize, n: i64 },
    Create { dev: usize },
    Toggle { dev: usize },
    Restart { dev: usize },
    Reassign { to: usize },
    GiveAway { dev: usize, to: usize },
    Unauthorized { dev: usize, n: i64 },
    HubEdit { n: i64 },
    Run { secs: u64 },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (0..3usize, 0..100i64).prop_map(|(dev, n)| Action::Edit { dev, n }),
        1 => (0..3usize).prop_map(|dev| Action::Create { dev }),
        2 => (0..3usize).prop_map(|dev| Action::Toggle { dev }),
        1 => (0..3usize).prop_map(|dev| Action::Restart { dev }),
        1 => (0..3usize).prop_map(|to| Action::Reassign { to }),
        1 => (0..3usize, 0..3usize).prop_map(|(dev, to)| Action::GiveAway { dev, to }),
        1 => (0..3usize, 0..100i64).prop_map(|(dev, n)| Action::Unauthorized { dev, n }),
        1 => (0..100i64).prop_map(|n| Action::HubEdit { n }),
        3 => (1..120u64).prop_map(|secs| Action::Run { secs }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(24),
        ..ProptestConfig::default()
    })]
    #[test]
    fn real_replicas_converge_under_faults(
        seed_n in any::<u64>(),
        loss in 0..25u32,
        dup in 0..25u32,
        reorder in 0..25u32,
        actions in proptest::collection::vec(action(), 1..14),
    ) {
        let mut w = world(seed_n, ConflictPolicies::default());
        let s = seed(&mut w);
        w.net.faults = Faults { loss_pct: loss, dup_pct: dup, reorder_pct: reorder };
        let users: Vec<Uuid> = USERS.iter().map(|u| user(&w.env, u)).collect();
        for a in actions {
            match a {
                Action::Edit { dev, n } => {
                    let held: Vec<RowId> = w.held(dev).into_iter()
                        .filter(|(t, _)| t == "task").map(|(_, r)| r).collect();
                    if let Some(r) = held.get(n as usize % held.len().max(1)) {
                        w.write(dev, "task", *r, &[("n", Value::Integer(n))]);
                    }
                }
                Action::Create { dev } => {
                    w.insert(dev, "task", &[("title", Value::Text(format!("t{dev}"))),
                        ("ownerid", owner_user(users[dev]))]);
                }
                Action::Toggle { dev } => {
                    let on = !w.net.devs[dev].online;
                    w.net.set_online(dev, on);
                }
                Action::Restart { dev } => w.net.restart(dev),
                Action::Reassign { to } => {
                    w.net.hub.local_write("task", s.ana_task,
                        &[("ownerid", owner_user(users[to]))]).unwrap();
                }
                Action::GiveAway { dev, to } => {
                    let held: Vec<RowId> = w.held(dev).into_iter()
                        .filter(|(t, _)| t == "task").map(|(_, r)| r).collect();
                    if let Some(r) = held.first() {
                        w.write(dev, "task", *r, &[("ownerid", owner_user(users[to]))]);
                    }
                }
                Action::Unauthorized { dev, n } => {
                    // Only ana may write the account; others' writes are rejected.
                    if w.dev(dev).get("account", s.account).unwrap().is_some() {
                        w.write(dev, "account", s.account, &[("n", Value::Integer(n))]);
                    }
                }
                Action::HubEdit { n } => {
                    w.net.hub.local_write("task", s.team_task,
                        &[("n", Value::Integer(n))]).unwrap();
                }
                Action::Run { secs } => w.net.run_for(Millis::from_secs(secs)),
            }
            w.check_acked_on_hub();
        }
        w.net.heal(6);
        w.check_converged();
    }
}

/// A hub on disk with the test schema, closed and opened again by the tests (a restart).
struct DiskHub {
    dir: tempfile::TempDir,
    schema: Schema,
    env: Environment,
    verifier: TokenVerifier,
}

impl DiskHub {
    fn new() -> DiskHub {
        let dir = tempfile::tempdir().unwrap();
        let schema = Schema::from_toml(SCHEMA).unwrap();
        drop(Store::create(dir.path(), schema.clone(), opts()).unwrap());
        DiskHub {
            dir,
            schema,
            env: Environment::from_toml(ENV).unwrap(),
            verifier: HubSigningKey::generate().unwrap().verifier(),
        }
    }

    fn profile(&self, toml: &str) -> Profile {
        Profile::from_toml(toml, &self.schema).unwrap()
    }

    fn open(&self, env: &Environment, profile: &Profile, now_ms: i64) -> HubReplica {
        let store = Store::open(self.dir.path(), opts()).unwrap();
        HubReplica::open(
            store,
            env.clone(),
            vec![mobile_app()],
            vec![profile.clone()],
            self.verifier.clone(),
            now_ms,
        )
        .unwrap()
    }

    /// Device `i` of the user named `name`.
    fn principal(&self, i: usize, name: &str) -> Principal {
        Principal {
            device: device_id(i),
            user: user(&self.env, name),
            app: APP.into(),
        }
    }
}

#[test]
fn a_role_or_filter_changed_while_the_hub_was_down_moves_rows_on_the_next_pull() {
    let h = DiskHub::new();
    let profile = h.profile(PROFILE);
    let who = h.principal(0, "ana");
    let (task, cursor) = {
        let mut hub = h.open(&h.env, &profile, 0);
        let task = Uuid::new_v4();
        hub.local_write(
            "task",
            task,
            &[
                ("title", Value::Text("fix pump".into())),
                ("ownerid", owner_user(who.user)),
            ],
        )
        .unwrap();
        let chunk = hub.pull(&who, "task", Cursor(0), WIDE).unwrap();
        assert!(chunk.entering.iter().any(|r| r.row == task));
        (task, chunk.cursor)
    };
    // Reopened unchanged: nothing moves.
    let chunk = h
        .open(&h.env, &profile, 0)
        .pull(&who, "task", cursor, WIDE)
        .unwrap();
    assert!(chunk.is_empty(), "{chunk:?}");
    // The operator took the role away in the environment file and restarted the hub.
    let mut less = h.env.clone();
    let tech = less.role_by_name("Tech").unwrap().id;
    less.remove_role(who.user, tech).unwrap();
    let chunk = h
        .open(&less, &profile, 0)
        .pull(&who, "task", cursor, WIDE)
        .unwrap();
    assert_eq!(chunk.leaving, vec![task], "{chunk:?}");
    // Given back with a narrower filter: still out (the filter), then in (the old filter).
    let narrow = h.profile(&PROFILE.replace("ownerid eq-useroruserteams", "ownerid eq-userteams"));
    let chunk = h
        .open(&h.env, &narrow, 0)
        .pull(&who, "task", chunk.cursor, WIDE)
        .unwrap();
    assert!(chunk.entering.is_empty(), "{chunk:?}");
    let chunk = h
        .open(&h.env, &profile, 0)
        .pull(&who, "task", chunk.cursor, WIDE)
        .unwrap();
    assert!(chunk.entering.iter().any(|r| r.row == task), "{chunk:?}");
}

#[test]
fn a_row_that_aged_out_of_a_time_filter_while_the_hub_was_down_leaves() {
    let h = DiskHub::new();
    let profile = h.profile(&PROFILE.replace(
        "ownerid eq-useroruserteams",
        "ownerid eq-useroruserteams and createdon last-x-days 1",
    ));
    let who = h.principal(0, "ana");
    let day = 86_400_000;
    let t0 = 1_790_000_000_000;
    let (task, cursor) = {
        let mut hub = h.open(&h.env, &profile, t0);
        let task = Uuid::new_v4();
        hub.local_write(
            "task",
            task,
            &[
                ("ownerid", owner_user(who.user)),
                ("createdon", Value::DateTime(t0 - day / 2)),
            ],
        )
        .unwrap();
        let chunk = hub.pull(&who, "task", Cursor(0), WIDE).unwrap();
        assert!(chunk.entering.iter().any(|r| r.row == task));
        (task, chunk.cursor)
    };
    let chunk = h
        .open(&h.env, &profile, t0 + day)
        .pull(&who, "task", cursor, WIDE)
        .unwrap();
    assert_eq!(chunk.leaving, vec![task], "{chunk:?}");
}

#[test]
fn actors_that_pushed_before_owners_were_kept_are_claimed_at_open() {
    // A hub from before actors had owners holds `act/` records only: at open each actor goes
    // to the device that pushed with it, so another device cannot take it first.
    let h = DiskHub::new();
    let profile = h.profile(PROFILE);
    let (ana, ben) = (h.principal(0, "ana"), h.principal(1, "ben"));
    let actor = ActorId::random();
    let by = |owner: Uuid| change_by(&h.schema, actor, owner);
    let merge = ConflictPolicy::MergePerColumn;
    {
        let mut hub = h.open(&h.env, &profile, 0);
        let out = hub
            .apply_push(Millis(0), &ana, merge, &by(ana.user))
            .unwrap();
        assert_eq!(out, PushOutcome::Accepted);
        // What an older hub would have kept: no owner record, and no claim made yet.
        let mut owner = b"aa/".to_vec();
        owner.extend_from_slice(&actor.0);
        hub.store()
            .aux_apply(
                "hub",
                &[
                    fieldsync_store::AuxWrite::Remove(owner),
                    fieldsync_store::AuxWrite::Remove(b"cfg/actors-claimed".to_vec()),
                ],
                fieldsync_store::Durability::Immediate,
            )
            .unwrap();
    }
    let mut hub = h.open(&h.env, &profile, 0);
    let out = hub
        .apply_push(Millis(0), &ben, merge, &by(ben.user))
        .unwrap();
    assert!(
        matches!(
            out,
            PushOutcome::Rejected {
                kind: RejectionKind::Permission,
                ..
            }
        ),
        "{out:?}"
    );
}

#[test]
fn a_row_written_but_not_routed_before_a_crash_is_looked_at_again() {
    // The hub writes a row, then routes it (records whose sets it entered or left). A crash
    // in between left devices holding a row that had left their set: at open it is looked
    // at again for every user.
    let h = DiskHub::new();
    let profile = h.profile(PROFILE);
    let who = h.principal(0, "ana");
    let cat = user(&h.env, "cat");
    let (task, cursor) = {
        let mut hub = h.open(&h.env, &profile, 0);
        let task = Uuid::new_v4();
        hub.local_write("task", task, &[("ownerid", owner_user(who.user))])
            .unwrap();
        let chunk = hub.pull(&who, "task", Cursor(0), WIDE).unwrap();
        assert!(chunk.entering.iter().any(|r| r.row == task));
        // The crash: the row given to cat is written, its routing never happens.
        let store = hub.store().clone();
        let mut marker = b"rr/task\0".to_vec();
        marker.extend_from_slice(task.as_bytes());
        store
            .aux_put("hub", &marker, &[], fieldsync_store::Durability::Group)
            .unwrap();
        let mut tx = store.begin();
        tx.update("task", task, &[("ownerid", owner_user(cat))])
            .unwrap();
        tx.commit().unwrap();
        (task, chunk.cursor)
    };
    let chunk = h
        .open(&h.env, &profile, 0)
        .pull(&who, "task", cursor, WIDE)
        .unwrap();
    assert_eq!(chunk.leaving, vec![task], "{chunk:?}");
}

#[test]
fn hub_and_device_state_survive_a_reopen() {
    let schema = Schema::from_toml(SCHEMA).unwrap();
    let env = Environment::from_toml(ENV).unwrap();
    let profile = Profile::from_toml(PROFILE, &schema).unwrap();
    let app = mobile_app();
    let key = HubSigningKey::generate().unwrap();
    let verifier = key.verifier();
    let hub_dir = tempfile::tempdir().unwrap();
    let dev_dir = tempfile::tempdir().unwrap();
    let dev = DeviceId(Uuid::from_u128(5));
    let ana = user(&env, "ana");
    let (token, op, first) = {
        let store = Store::create(hub_dir.path(), schema.clone(), opts()).unwrap();
        let mut hub = HubReplica::open(
            store,
            env.clone(),
            vec![app.clone()],
            vec![profile.clone()],
            verifier.clone(),
            0,
        )
        .unwrap()
        .with_signing_key(key);
        let token = hub.enroll("ana", APP, dev.0, 0).unwrap();
        let who = hub
            .authenticate(dev, token.as_bytes(), APP)
            .unwrap()
            .unwrap();
        // A device op creating a task for cat: refused (ana may not create for cat).
        let d = Store::create(dev_dir.path(), schema.clone(), opts()).unwrap();
        let mut tx = d.begin();
        tx.insert("task", &[("ownerid", owner_user(user(&env, "cat")))])
            .unwrap();
        tx.commit().unwrap();
        let e = d.ops_since(0, 1).unwrap().remove(0);
        let op = PushOp {
            seq: e.seq,
            table: e.table,
            row: e.row,
            change: e.change,
        };
        let first = hub
            .apply_push(Millis(0), &who, ConflictPolicy::MergePerColumn, &op)
            .unwrap();
        assert!(matches!(first, PushOutcome::Rejected { .. }));
        let mut replica = DeviceReplica::new(d);
        let rejection = fieldsync_replication::proto::Rejection {
            seq: op.seq,
            table: op.table.clone(),
            row: op.row,
            operation: fieldsync_replication::proto::Operation::Create,
            kind: RejectionKind::Permission,
            message: "no".into(),
            authoritative: None,
        };
        replica.record_ack(Millis(9), op.seq, &[rejection]).unwrap();
        replica
            .set_cursor("task", Cursor(3), Some(Millis(7)))
            .unwrap();
        (token, op, first)
    };
    let store = Store::open(hub_dir.path(), opts()).unwrap();
    let mut hub = HubReplica::open(store, env, vec![app], vec![profile], verifier, 0).unwrap();
    let who = hub
        .authenticate(dev, token.as_bytes(), APP)
        .unwrap()
        .unwrap();
    assert_eq!(who.user, ana);
    let again = hub
        .apply_push(Millis(0), &who, ConflictPolicy::MergePerColumn, &op)
        .unwrap();
    assert_eq!(again, first, "the same answer after a restart");
    let d = DeviceReplica::new(Store::open(dev_dir.path(), opts()).unwrap());
    assert_eq!(d.acked_seq().unwrap(), op.seq);
    assert_eq!(d.cursor("task").unwrap(), Cursor(3));
    assert_eq!(d.last_sync("task").unwrap(), Some(Millis(7)));
    let errors = d.sync_errors().unwrap();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].1.at, Millis(9));
    assert_eq!(d.store().get("task", op.row).unwrap(), None, "rolled back");
    assert_eq!(d.pending_op_count().unwrap(), 0);
}

#[test]
fn a_role_change_moving_more_rows_than_a_batch_holds_syncs() {
    // Rows that leave or enter a set at once share one feed position, which a cursor cannot
    // split: the hub sends them as several batches, the device's cursor moving at the last.
    let mut w = world(24, ConflictPolicies::default());
    seed(&mut w);
    let ana = user(&w.env, "ana");
    let many = PULL_BATCH_ITEMS_MAX + 150;
    let rows: BTreeSet<(String, RowId)> = (0..many)
        .map(|k| {
            let id = w.hub_insert(
                "task",
                &[
                    ("title", Value::Text(format!("job {k}"))),
                    ("ownerid", owner_user(ana)),
                ],
            );
            ("task".to_string(), id)
        })
        .collect();
    w.net.heal(3);
    assert!(w.held(0).is_superset(&rows));
    let tech = w.revoke_tech(0);
    w.net.heal(3);
    assert!(w.held(0).is_disjoint(&rows), "the rows left at once");
    w.check_converged();
    w.env.assign_role(ana, tech).unwrap();
    w.net.hub.handle_environment(w.env.clone()).unwrap();
    w.net.heal(3);
    assert!(w.held(0).is_superset(&rows), "the rows came back at once");
    w.check_converged();
}

#[test]
fn a_row_whose_history_outgrows_a_batch_arrives_in_its_saved_form() {
    let mut w = world(25, ConflictPolicies::default());
    seed(&mut w);
    let ana = user(&w.env, "ana");
    // Three writes of 400 KB: 1.2 MB of change chunks, a few KB saved (automerge compresses).
    let big = |c: char| Value::Text(std::iter::repeat_n(c, 400_000).collect());
    let row = w.hub_insert("task", &[("title", big('a')), ("ownerid", owner_user(ana))]);
    for c in ['b', 'c'] {
        w.net
            .hub
            .local_write("task", row, &[("title", big(c))])
            .unwrap();
    }
    let export = w.hub().export_row("task", row).unwrap().unwrap();
    assert!(export.doc.len() > MAX_CHANGE_LEN, "{}", export.doc.len());
    w.net.heal(3);
    let held = w.dev(0).get("task", row).unwrap().expect("the row arrived");
    assert_eq!(held.get("title"), &big('c'));
    w.check_converged();
}

#[test]
fn a_role_change_evicts_on_a_device_that_had_pulled_everything() {
    let mut w = world(5, ConflictPolicies::default());
    let s = seed(&mut w);
    w.net.heal(3);
    w.check_converged();
    assert!(w.dev(0).get("task", s.ana_task).unwrap().is_some());
    // No write follows the change: it has no log entry of its own, and ana's cursor is
    // already at the end of the log.
    let ana = user(&w.env, "ana");
    let tech = w.revoke_tech(0);
    w.net.heal(3);
    w.check_converged();
    assert_eq!(w.dev(0).get("task", s.ana_task).unwrap(), None);
    assert_eq!(w.dev(0).get("account", s.account).unwrap(), None);
    // Given back: the rows come back whole.
    w.env.assign_role(ana, tech).unwrap();
    w.net.hub.handle_environment(w.env.clone()).unwrap();
    w.net.heal(3);
    w.check_converged();
    assert!(w.dev(0).get("task", s.ana_task).unwrap().is_some());
}

#[test]
fn a_table_leaving_the_profile_is_evicted_from_devices() {
    let mut w = world(6, ConflictPolicies::default());
    let s = seed(&mut w);
    w.net.heal(3);
    assert!(w.dev(0).get("account", s.account).unwrap().is_some());
    let schema = w.hub().schema().clone();
    let narrower = PROFILE
        .split("[tables.account]")
        .next()
        .unwrap()
        .to_string();
    let profile = Profile::from_toml(&narrower, &schema).unwrap();
    w.net.hub.handle_profile(profile).unwrap();
    w.net.heal(3);
    w.check_converged();
    assert_eq!(w.dev(0).get("account", s.account).unwrap(), None);
    assert!(w.dev(0).get("task", s.ana_task).unwrap().is_some());
}

#[test]
fn a_role_change_is_pulled_again_after_a_lost_batch_and_a_quick_reversal() {
    let mut w = world(7, ConflictPolicies::default());
    let s = seed(&mut w);
    w.net.heal(3);
    let ana = w.principal(0);
    let limits = WIDE;
    let last = w.net.hub.cursor_at(w.hub().last_seq()).unwrap();
    let tech = w.revoke_tech(0);
    // The batch is lost on the link: the same pull again still says the row left.
    for _ in 0..2 {
        let chunk = w.net.hub.pull(&ana, "task", last, limits).unwrap();
        assert!(chunk.leaving.contains(&s.ana_task), "{chunk:?}");
        assert_eq!(chunk.cursor, last, "the cursor cannot pass the log");
    }
    // Given back before any write: the row enters again, whole.
    w.env.assign_role(ana.user, tech).unwrap();
    w.net.hub.handle_environment(w.env.clone()).unwrap();
    let chunk = w.net.hub.pull(&ana, "task", last, limits).unwrap();
    assert!(
        chunk.entering.iter().any(|d| d.row == s.ana_task),
        "{chunk:?}"
    );
    assert!(chunk.leaving.is_empty(), "{chunk:?}");
}

#[test]
fn a_row_that_left_and_came_back_while_writes_went_on_is_sent_whole_again() {
    let mut w = world(9, ConflictPolicies::default());
    let s = seed(&mut w);
    w.net.heal(3);
    let ana = w.principal(0);
    let limits = WIDE;
    let last = w.net.hub.cursor_at(w.hub().last_seq()).unwrap();
    let tech = w.revoke_tech(0);
    // The device applies the eviction; its cursor stays at `last`.
    let chunk = w.net.hub.pull(&ana, "task", last, limits).unwrap();
    assert!(chunk.leaving.contains(&s.ana_task), "{chunk:?}");
    // Other writes move the log on, then the role comes back.
    w.net
        .hub
        .local_write("task", s.cat_task, &[("n", Value::Integer(9))])
        .unwrap();
    w.env.assign_role(ana.user, tech).unwrap();
    w.net.hub.handle_environment(w.env.clone()).unwrap();
    let chunk = w.net.hub.pull(&ana, "task", chunk.cursor, limits).unwrap();
    assert!(
        chunk.entering.iter().any(|d| d.row == s.ana_task),
        "{chunk:?}"
    );
}

/// The per-user feed holds no op written while the row was out of the user's set: a row that
/// left and came back between two pulls must be sent whole (found by the proptest above:
/// `Reassign { to: 1 }, Reassign { to: 0 }` with no sync in between).
#[test]
fn a_row_given_away_and_back_between_pulls_arrives_with_every_op() {
    let mut w = world(10, ConflictPolicies::default());
    let s = seed(&mut w);
    w.net.heal(3);
    let users: Vec<Uuid> = USERS.iter().map(|u| user(&w.env, u)).collect();
    let ana = w.principal(0);
    let cursor = w.net.hub.cursor_at(w.hub().last_seq()).unwrap();
    w.net
        .hub
        .local_write("task", s.ana_task, &[("ownerid", owner_user(users[1]))])
        .unwrap();
    w.net
        .hub
        .local_write("task", s.ana_task, &[("ownerid", owner_user(users[0]))])
        .unwrap();
    let chunk = w.net.hub.pull(&ana, "task", cursor, WIDE).unwrap();
    assert!(
        chunk.entering.iter().any(|d| d.row == s.ana_task),
        "{chunk:?}"
    );
    w.net.heal(3);
    w.check_converged();
}
