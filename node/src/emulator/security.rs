//! Callers and what they may read: business units, users (each with a bearer token), teams and
//! roles, stored in the emulator's database.
//!
//! The rule (a simplification of Dataverse's, `security-concepts.md`): a role grants **read** on
//! every table at one depth. A caller's depth is the deepest over the caller's roles and the
//! caller's teams' roles.
//! - `user` (Basic): rows owned by the caller or by one of the caller's teams;
//! - `business_unit` (Local): also rows whose owning business unit is the caller's;
//! - `parent_child` (Deep): also rows of business units below the caller's;
//! - `organization` (Global): every row.
//!
//! Organization-owned tables are readable by every caller holding any role. Writes need the
//! same visibility (you may update or delete what you may read); anyone may create. Sharing,
//! the manager hierarchy, per-table and per-privilege depths are not modelled.
//!
//! Plugging in the fuller model: `replication::security` (in progress on main: business units,
//! users, teams, roles with per-table privileges and depths) answers
//! `Environment::read_scope(user, table) -> ReadScope { all, owners, business_units }` and
//! `ReadScope::allows(owner, owning_business_unit)`. [`Caller::can_read`] is the only place the
//! routes ask, with the row's `ownerid` and `owningbusinessunit`; holding an `Environment`
//! instead of a [`Directory`] and answering `can_read` from `read_scope(user, table)` (cached
//! per request) swaps the rule without touching the routes. Its environment TOML would then
//! replace `--directory`.

use std::collections::BTreeSet;

use fieldsync_store::{OwnerKind, OwnerRef, Ownership, Value};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// How far a role's read privilege reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Depth {
    /// Nothing.
    None,
    /// Rows owned by the user or the user's teams.
    User,
    /// Rows of the user's business unit.
    BusinessUnit,
    /// Rows of the user's business unit and the units below it.
    ParentChild,
    /// Every row.
    Organization,
}

/// A business unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusinessUnit {
    /// `businessunitid`.
    pub id: Uuid,
    /// `name`.
    pub name: String,
    /// `parentbusinessunitid` (none for the root).
    pub parent: Option<Uuid>,
}

/// A user (`systemuser`) and the bearer token that authenticates as it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// `systemuserid`.
    pub id: Uuid,
    /// `domainname`, e.g. `ana@contoso.com`.
    pub domain_name: String,
    /// `fullname`.
    pub full_name: String,
    /// `businessunitid`.
    pub business_unit: Uuid,
    /// Security roles (`systemuserroles`).
    pub roles: Vec<Uuid>,
    /// The bearer token that authenticates as this user.
    pub token: String,
}

/// A team.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Team {
    /// `teamid`.
    pub id: Uuid,
    /// `name`.
    pub name: String,
    /// `businessunitid`.
    pub business_unit: Uuid,
    /// Member users (`teammembership`).
    pub members: Vec<Uuid>,
    /// Roles held by the team.
    pub roles: Vec<Uuid>,
}

/// A security role with one read depth for every table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    /// `roleid`.
    pub id: Uuid,
    /// `name`.
    pub name: String,
    /// `businessunitid` (the root unit).
    pub business_unit: Uuid,
    /// The read depth granted on every table.
    pub read: Depth,
}

/// Everything about who may call and what they may read.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Directory {
    /// Business units; the first is the root.
    pub business_units: Vec<BusinessUnit>,
    /// Users.
    pub users: Vec<User>,
    /// Teams.
    pub teams: Vec<Team>,
    /// Roles.
    pub roles: Vec<Role>,
}

/// The system administrator's `domainname`.
pub const ADMIN_DOMAIN_NAME: &str = "admin@fieldsync.local";

/// A UUID derived from a kind and a name, stable across runs.
pub fn derived_id(kind: &str, name: &str) -> Uuid {
    let digest = Sha256::digest(format!("{kind}:{name}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    // Mark it as a version 4 / RFC 4122 variant UUID so it looks like any other GUID.
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    Uuid::from_bytes(bytes)
}

impl Directory {
    /// A directory with one root business unit, the built-in roles and the administrator.
    pub fn with_root(root: &str, admin_token: &str) -> Directory {
        let root_id = derived_id("businessunit", root);
        let role = |name: &str, read| Role {
            id: derived_id("role", name),
            name: name.to_string(),
            business_unit: root_id,
            read,
        };
        let roles = vec![
            role("System Administrator", Depth::Organization),
            role("Basic User", Depth::User),
            role("Field Technician", Depth::User),
            role("Field Manager", Depth::BusinessUnit),
            role("Regional Manager", Depth::ParentChild),
        ];
        let admin = User {
            id: derived_id("systemuser", ADMIN_DOMAIN_NAME),
            domain_name: ADMIN_DOMAIN_NAME.to_string(),
            full_name: "System Administrator".to_string(),
            business_unit: root_id,
            roles: vec![roles[0].id],
            token: admin_token.to_string(),
        };
        Directory {
            business_units: vec![BusinessUnit {
                id: root_id,
                name: root.to_string(),
                parent: None,
            }],
            users: vec![admin],
            teams: Vec::new(),
            roles,
        }
    }

    /// Add a business unit under `parent`; returns its id.
    pub fn add_business_unit(&mut self, name: &str, parent: Uuid) -> Uuid {
        let id = derived_id("businessunit", name);
        self.business_units.push(BusinessUnit {
            id,
            name: name.to_string(),
            parent: Some(parent),
        });
        id
    }

    /// Add a user with roles (by name) and a token; returns its id.
    pub fn add_user(
        &mut self,
        domain_name: &str,
        full_name: &str,
        business_unit: Uuid,
        roles: &[&str],
        token: &str,
    ) -> Uuid {
        let id = derived_id("systemuser", domain_name);
        let roles = roles.iter().filter_map(|r| self.role_id(r)).collect();
        self.users.push(User {
            id,
            domain_name: domain_name.to_string(),
            full_name: full_name.to_string(),
            business_unit,
            roles,
            token: token.to_string(),
        });
        id
    }

    /// Add a team; returns its id.
    pub fn add_team(&mut self, name: &str, business_unit: Uuid, members: Vec<Uuid>) -> Uuid {
        let id = derived_id("team", name);
        self.teams.push(Team {
            id,
            name: name.to_string(),
            business_unit,
            members,
            roles: Vec::new(),
        });
        id
    }

    /// The id of the role with this name.
    pub fn role_id(&self, name: &str) -> Option<Uuid> {
        self.roles.iter().find(|r| r.name == name).map(|r| r.id)
    }

    /// The root business unit.
    pub fn root(&self) -> Option<Uuid> {
        self.business_units
            .iter()
            .find(|b| b.parent.is_none())
            .map(|b| b.id)
    }

    /// Make sure the administrator exists and authenticates with `token`.
    pub fn set_admin_token(&mut self, token: &str) {
        if let Some(admin) = self
            .users
            .iter_mut()
            .find(|u| u.domain_name == ADMIN_DOMAIN_NAME)
        {
            admin.token = token.to_string();
        }
    }

    /// The user a bearer token authenticates as.
    pub fn user_by_token(&self, token: &str) -> Option<&User> {
        if token.is_empty() {
            return None;
        }
        self.users.iter().find(|u| u.token == token)
    }

    /// The user with this id.
    pub fn user(&self, id: Uuid) -> Option<&User> {
        self.users.iter().find(|u| u.id == id)
    }

    /// The team with this id.
    pub fn team(&self, id: Uuid) -> Option<&Team> {
        self.teams.iter().find(|t| t.id == id)
    }

    /// The business unit that owns a user's or a team's rows.
    pub fn owner_business_unit(&self, owner: OwnerRef) -> Option<Uuid> {
        match owner.kind {
            OwnerKind::User => self.user(owner.id).map(|u| u.business_unit),
            OwnerKind::Team => self.team(owner.id).map(|t| t.business_unit),
        }
    }

    /// A business unit and every unit below it.
    pub fn subtree(&self, root: Uuid) -> BTreeSet<Uuid> {
        let mut out = BTreeSet::from([root]);
        loop {
            let before = out.len();
            for bu in &self.business_units {
                if bu.parent.is_some_and(|p| out.contains(&p)) {
                    out.insert(bu.id);
                }
            }
            if out.len() == before {
                return out;
            }
        }
    }

    /// The caller a user id acts as: teams, unit and read depth resolved.
    pub fn caller(&self, user: &User) -> Caller {
        let teams: Vec<Uuid> = self
            .teams
            .iter()
            .filter(|t| t.members.contains(&user.id))
            .map(|t| t.id)
            .collect();
        let depth = user
            .roles
            .iter()
            .chain(
                self.teams
                    .iter()
                    .filter(|t| teams.contains(&t.id))
                    .flat_map(|t| t.roles.iter()),
            )
            .filter_map(|r| self.roles.iter().find(|x| x.id == *r))
            .map(|r| r.read)
            .max()
            .unwrap_or(Depth::None);
        let business_units = match depth {
            Depth::BusinessUnit => BTreeSet::from([user.business_unit]),
            Depth::ParentChild => self.subtree(user.business_unit),
            _ => BTreeSet::new(),
        };
        Caller {
            user: user.id,
            business_unit: user.business_unit,
            teams,
            depth,
            business_units,
        }
    }
}

/// An authenticated caller and its read scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The caller's `systemuserid`.
    pub user: Uuid,
    /// The caller's business unit.
    pub business_unit: Uuid,
    /// The teams the caller belongs to.
    pub teams: Vec<Uuid>,
    /// The deepest read depth over the caller's and the caller's teams' roles.
    pub depth: Depth,
    /// Business units whose rows the caller reads (for unit and parent-child depths).
    pub business_units: BTreeSet<Uuid>,
}

impl Caller {
    /// Whether the caller may read a row of a table with this ownership and these values.
    pub fn can_read(
        &self,
        ownership: Ownership,
        values: &std::collections::BTreeMap<String, Value>,
    ) -> bool {
        if self.depth == Depth::None {
            return false;
        }
        if ownership == Ownership::Organization || self.depth == Depth::Organization {
            return true;
        }
        let owner = match values.get("ownerid") {
            Some(Value::Owner(o)) => Some(*o),
            _ => None,
        };
        let owned = owner.is_some_and(|o| match o.kind {
            OwnerKind::User => o.id == self.user,
            OwnerKind::Team => self.teams.contains(&o.id),
        });
        let unit = match values.get("owningbusinessunit") {
            Some(Value::Lookup(b)) => Some(*b),
            _ => None,
        };
        owned || unit.is_some_and(|b| self.business_units.contains(&b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn depths_decide_visibility() {
        let mut d = Directory::with_root("Contoso", "admin");
        let root = d.root().unwrap();
        let north = d.add_business_unit("North", root);
        let ana = d.add_user("ana", "Ana", north, &["Field Technician"], "t-ana");
        let maria = d.add_user("maria", "Maria", north, &["Field Manager"], "t-maria");
        let boss = d.add_user("boss", "Boss", root, &["Regional Manager"], "t-boss");
        let team = d.add_team("North techs", north, vec![ana]);
        let row = |owner: OwnerRef, bu: Uuid| {
            BTreeMap::from([
                ("ownerid".to_string(), Value::Owner(owner)),
                ("owningbusinessunit".to_string(), Value::Lookup(bu)),
            ])
        };
        let by_team = row(
            OwnerRef {
                kind: OwnerKind::Team,
                id: team,
            },
            north,
        );
        let by_maria = row(
            OwnerRef {
                kind: OwnerKind::User,
                id: maria,
            },
            north,
        );
        let caller = |id| d.caller(d.user(id).unwrap());
        let ua = Ownership::UserOrTeam;
        assert!(caller(ana).can_read(ua, &by_team));
        assert!(!caller(ana).can_read(ua, &by_maria));
        assert!(caller(maria).can_read(ua, &by_team));
        assert!(caller(boss).can_read(ua, &by_maria));
        assert!(caller(ana).can_read(Ownership::Organization, &BTreeMap::new()));
        assert_eq!(d.user_by_token("t-ana").map(|u| u.id), Some(ana));
        assert!(d.user_by_token("").is_none());
    }
}
