//! The Dataverse side of a simulated run, in the replication crate's own types: the security
//! model ([`Environment`]), one model-driven [`App`] and offline [`Profile`] per group, so that
//! the hub's `HubReplica` decides every push and every pull with its real privilege checks,
//! conflict policy and routing.
//!
//! It is derived from the scenario so that it means exactly what the simulator's oracle
//! ([`World`]) means: every device is one user (`device-N`) in one business unit; the hot
//! rows are owned by the team `Everyone`, of which every user is a member; per scenario table
//! there is one security role granting every privilege on that table at user depth (the
//! user's own rows and their teams' rows), and a user holds the role of every table their
//! role does not deny; each group's profile selects, per table its devices' profile keeps,
//! the rows owned by the user or their teams. So "entitled" in the oracle and "in the set" in
//! the router coincide, and a scenario's reassignments, profile changes and role changes
//! become owner writes, `HubReplica::handle_profile` and `HubReplica::handle_environment`.

use std::collections::BTreeMap;

use fieldsync_replication::security::{derived_id, TeamId, UserId};
use fieldsync_replication::{App, Depth, Environment, Privilege, Profile, Role};
use fieldsync_store::{OwnerKind, OwnerRef, Schema, Value};

use super::RealError;
use crate::node::NodeId;
use crate::world::{Owner, World};

/// The business unit every simulated user is in.
const BUSINESS_UNIT: &str = "Field";
/// The team that owns the hot (shared) rows.
const EVERYONE: &str = "Everyone";

/// A device's user name.
fn user_name(d: NodeId) -> String {
    format!("device-{}", d.0)
}

/// A device's user id in the environment.
pub fn device_user(d: NodeId) -> UserId {
    derived_id("user", &user_name(d))
}

fn everyone() -> TeamId {
    derived_id("team", EVERYONE)
}

/// The `ownerid` of a row the oracle says `owner` owns.
pub fn owner_value(owner: Owner) -> Value {
    Value::Owner(match owner {
        Owner::Device(d) => OwnerRef {
            kind: OwnerKind::User,
            id: device_user(d),
        },
        Owner::Shared => OwnerRef {
            kind: OwnerKind::Team,
            id: everyone(),
        },
    })
}

/// The app a group's devices are enrolled for.
pub fn app_name(group: &str) -> String {
    format!("sim {group}")
}

fn role_name(table: &str) -> String {
    format!("Sim {table}")
}

/// The environment, apps and per-group profiles of one run.
#[derive(Debug, Clone)]
pub struct SimEnvironment {
    schema: Schema,
    env: Environment,
    tables: Vec<String>,
    groups: Vec<String>,
    device_groups: Vec<usize>,
    apps: Vec<App>,
    /// Per group: the profile's table mask (bit = table index) and the profile.
    profiles: Vec<(u64, Profile)>,
    interval_minutes: u32,
}

impl SimEnvironment {
    /// The environment of `world`'s devices, with the groups' profiles selecting every table.
    pub fn new(
        schema: &Schema,
        tables: &[String],
        groups: &[String],
        device_groups: &[usize],
        world: &World,
        interval_minutes: u32,
    ) -> Result<SimEnvironment, RealError> {
        let env_err = |e: fieldsync_replication::EnvironmentError| RealError::Schema(e.to_string());
        let mut env = Environment::new(BUSINESS_UNIT);
        let bu = derived_id("business_unit", BUSINESS_UNIT);
        let mut roles = Vec::new();
        for t in tables {
            let mut role = Role {
                id: derived_id("role", &role_name(t)),
                name: role_name(t),
                privileges: BTreeMap::new(),
            };
            for p in Privilege::ALL {
                role.grant(t, p, Depth::User);
            }
            roles.push(role.id);
            env.put_role(role);
        }
        let mut users = Vec::new();
        for d in 1..=world.devices() {
            let d = NodeId(d);
            let granted: Vec<_> = roles
                .iter()
                .enumerate()
                .filter(|(t, _)| world.denied(d) & (1u64 << (*t % 64)) == 0)
                .map(|(_, r)| *r)
                .collect();
            users.push(env.add_user(&user_name(d), bu, &granted).map_err(env_err)?);
        }
        env.add_team(EVERYONE, bu, &users, &[]).map_err(env_err)?;
        let mut sim = SimEnvironment {
            schema: schema.clone(),
            env,
            tables: tables.to_vec(),
            groups: groups.to_vec(),
            device_groups: device_groups.to_vec(),
            apps: Vec::new(),
            profiles: Vec::new(),
            interval_minutes,
        };
        for (g, name) in groups.iter().enumerate() {
            // The oracle starts every device with the same profile; a group takes its first
            // device's.
            let mask = device_groups
                .iter()
                .position(|x| *x == g)
                .map_or(u64::MAX, |i| world.profile(NodeId(i as u32 + 1)));
            let profile = sim.profile(name, mask)?;
            sim.profiles.push((mask, profile));
            sim.apps.push(App {
                id: derived_id("app", &app_name(name)),
                name: app_name(name),
                tables: tables.iter().cloned().collect(),
                views: Vec::new(),
                offline: true,
                profile: Some(app_name(name)),
            });
        }
        Ok(sim)
    }

    /// A group's profile: the user's and their teams' rows of every table in `mask`.
    fn profile(&self, group: &str, mask: u64) -> Result<Profile, RealError> {
        let mut toml = format!("name = \"{}\"\n", app_name(group));
        for (t, table) in self.tables.iter().enumerate() {
            if mask & (1u64 << (t % 64)) == 0 {
                continue;
            }
            toml.push_str(&format!(
                "[tables.\"{table}\"]\nrows = \"organization\"\nowned_by = [\"me\", \"my_teams\"]\n\
                 sync_interval_minutes = {}\n",
                self.interval_minutes
            ));
        }
        Profile::from_toml(&toml, &self.schema).map_err(|e| RealError::Schema(e.to_string()))
    }

    /// The environment.
    pub fn environment(&self) -> &Environment {
        &self.env
    }

    /// The apps, one per group.
    pub fn apps(&self) -> Vec<App> {
        self.apps.clone()
    }

    /// The groups' current profiles.
    pub fn profiles(&self) -> Vec<Profile> {
        self.profiles.iter().map(|(_, p)| p.clone()).collect()
    }

    /// A device's group index.
    pub fn group_of(&self, d: NodeId) -> Option<usize> {
        self.device_groups
            .get((d.0 as usize).checked_sub(1)?)
            .copied()
    }

    /// A device's app.
    pub fn app_of(&self, d: NodeId) -> Option<String> {
        self.groups.get(self.group_of(d)?).map(|g| app_name(g))
    }

    /// The device's profile now selects the tables of `mask`: its group's profile, changed
    /// (a profile belongs to an app, so the change applies to the device's whole group).
    /// `None` when the group already has it.
    pub fn set_profile(&mut self, d: NodeId, mask: u64) -> Result<Option<Profile>, RealError> {
        let Some(g) = self.group_of(d) else {
            return Ok(None);
        };
        let Some(name) = self.groups.get(g).cloned() else {
            return Ok(None);
        };
        if self.profiles.get(g).is_some_and(|(m, _)| *m == mask) {
            return Ok(None);
        }
        let profile = self.profile(&name, mask)?;
        if let Some(slot) = self.profiles.get_mut(g) {
            *slot = (mask, profile.clone());
        }
        Ok(Some(profile))
    }

    /// The device's user holds the roles of every table not in `denied`. Whether that changed
    /// anything.
    pub fn set_denied(&mut self, d: NodeId, denied: u64) -> Result<bool, RealError> {
        let env_err = |e: fieldsync_replication::EnvironmentError| RealError::Schema(e.to_string());
        let user = device_user(d);
        let mut changed = false;
        for (t, table) in self.tables.iter().enumerate() {
            let role = derived_id("role", &role_name(table));
            changed |= if denied & (1u64 << (t % 64)) == 0 {
                self.env.assign_role(user, role).map_err(env_err)?
            } else {
                self.env.remove_role(user, role).map_err(env_err)?
            };
        }
        Ok(changed)
    }

    /// The user name the hub enrolls device `d` under.
    pub fn user_of(d: NodeId) -> String {
        user_name(d)
    }
}
