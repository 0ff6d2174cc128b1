//! The security model of an environment: business units, users, teams and security roles.
//!
//! It follows Dataverse (`security-concepts.md`, `how-record-access-determined.md`):
//!
//! - Business units form a tree with one root. Every user belongs to exactly one business unit;
//!   every team is owned by one business unit and has members.
//! - A security role grants, per table, each [`Privilege`] at a [`Depth`]. Rights add up across
//!   a user's own roles and the roles of the user's teams.
//! - Read access to a row of a user- or team-owned table, for a role held **by the user**:
//!   [`Depth::User`] reads rows owned by the user or by one of the user's teams;
//!   [`Depth::BusinessUnit`] rows whose owning business unit is the user's;
//!   [`Depth::ParentChild`] that unit and every unit below it; [`Depth::Organization`] all rows.
//!   For a role held **by a team** the depths are relative to the team: rows owned by the team or
//!   the member (user depth), the team's business unit, its subtree, or all rows.
//! - Organization-owned tables have no owner: any depth other than [`Depth::None`] reads every
//!   row.
//! - Sharing and the manager hierarchy are not modelled (a later issue).
//!
//! A row's owning business unit is its `owningbusinessunit` column when set, otherwise the
//! business unit of its owner.
//!
//! # Environment file
//!
//! ```toml
//! [[business_units]]
//! name = "Contoso"                  # the root: no parent
//! [[business_units]]
//! name = "Contoso North"
//! parent = "Contoso"
//!
//! [[users]]
//! name = "ana@contoso.com"
//! business_unit = "Contoso North"
//! roles = ["Basic User", "Field Technician"]
//! # id = "…uuid…"                   # optional; by default derived from the name
//!
//! [[teams]]
//! name = "North technicians"
//! business_unit = "Contoso North"
//! members = ["ana@contoso.com"]
//! roles = []
//!
//! [[roles]]
//! name = "Field Technician"
//! [roles.privileges.msdyn_workorder]
//! read = "user"                      # none | user | business_unit | parent_child | organization
//! write = "user"                     # (Dataverse's basic | local | deep | global also accepted)
//! [roles.privileges."*"]            # `*`: every table not listed
//! read = "none"
//! ```
//!
//! The built-in roles ([`SYSTEM_ADMINISTRATOR`], [`SYSTEM_CUSTOMIZER`], [`ENVIRONMENT_MAKER`],
//! [`BASIC_USER`]) always exist; a file may not redefine them. Ids default to a UUID derived
//! from the kind and name (`uuid` v5), so files stay readable and ids stay stable.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;

use fieldsync_store::{OwnerKind, OwnerRef, Ownership, Table, Value};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The table that holds offline profiles in Dataverse; roles grant privileges on it.
pub const PROFILE_TABLE: &str = "mobileofflineprofile";
/// The table that holds model-driven apps in Dataverse; switching an app offline writes it.
pub const APP_TABLE: &str = "appmodule";
/// The built-in role with every privilege on every table at organization depth.
pub const SYSTEM_ADMINISTRATOR: &str = "System Administrator";
/// The built-in customizer role: full control of profiles and apps.
pub const SYSTEM_CUSTOMIZER: &str = "System Customizer";
/// The built-in maker role: full control of profiles and apps.
pub const ENVIRONMENT_MAKER: &str = "Environment Maker";
/// The built-in role every app user holds: reads profiles and apps.
pub const BASIC_USER: &str = "Basic User";

/// The id of a business unit.
pub type BusinessUnitId = Uuid;
/// The id of a user (`systemuserid`).
pub type UserId = Uuid;
/// The id of a team.
pub type TeamId = Uuid;
/// The id of a security role.
pub type RoleId = Uuid;

/// What a role allows on a table's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Privilege {
    /// Create rows.
    Create,
    /// Read rows.
    Read,
    /// Change rows.
    Write,
    /// Delete rows.
    Delete,
    /// Associate a row with another (set its lookups).
    Append,
    /// Be the target of another row's lookup.
    AppendTo,
    /// Give a row to another owner.
    Assign,
    /// Share a row with users and teams.
    Share,
}

impl Privilege {
    /// Every privilege, in Dataverse's order.
    pub const ALL: [Privilege; 8] = [
        Privilege::Create,
        Privilege::Read,
        Privilege::Write,
        Privilege::Delete,
        Privilege::Append,
        Privilege::AppendTo,
        Privilege::Assign,
        Privilege::Share,
    ];

    /// The name used in environment files.
    pub fn name(self) -> &'static str {
        match self {
            Privilege::Create => "create",
            Privilege::Read => "read",
            Privilege::Write => "write",
            Privilege::Delete => "delete",
            Privilege::Append => "append",
            Privilege::AppendTo => "append_to",
            Privilege::Assign => "assign",
            Privilege::Share => "share",
        }
    }
}

impl fmt::Display for Privilege {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How far a privilege reaches, narrowest first (ordered).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Depth {
    /// Not granted.
    #[default]
    None,
    /// Rows owned by the user or the user's teams (Dataverse "Basic").
    User,
    /// Rows of the user's business unit (Dataverse "Local").
    BusinessUnit,
    /// Rows of the user's business unit and every unit below it (Dataverse "Deep").
    ParentChild,
    /// Every row (Dataverse "Global").
    Organization,
}

impl Depth {
    /// Every depth, narrowest first.
    pub const ALL: [Depth; 5] = [
        Depth::None,
        Depth::User,
        Depth::BusinessUnit,
        Depth::ParentChild,
        Depth::Organization,
    ];

    /// The name used in environment files.
    pub fn name(self) -> &'static str {
        match self {
            Depth::None => "none",
            Depth::User => "user",
            Depth::BusinessUnit => "business_unit",
            Depth::ParentChild => "parent_child",
            Depth::Organization => "organization",
        }
    }

    /// Dataverse's `privilegedepthmask` bit (0 for none).
    pub fn dataverse_mask(self) -> u8 {
        match self {
            Depth::None => 0,
            Depth::User => 1,
            Depth::BusinessUnit => 2,
            Depth::ParentChild => 4,
            Depth::Organization => 8,
        }
    }
}

impl fmt::Display for Depth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Depth {
    type Err = EnvironmentError;
    fn from_str(s: &str) -> Result<Depth, EnvironmentError> {
        Ok(match s {
            "none" => Depth::None,
            "user" | "basic" => Depth::User,
            "business_unit" | "local" => Depth::BusinessUnit,
            "parent_child" | "deep" => Depth::ParentChild,
            "organization" | "global" => Depth::Organization,
            other => return Err(EnvironmentError::UnknownDepth(other.to_string())),
        })
    }
}

/// A business unit: a node of the environment's tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusinessUnit {
    /// Its id (`businessunitid`).
    pub id: BusinessUnitId,
    /// Its name, unique in the environment.
    pub name: String,
    /// The parent unit; `None` for the root.
    pub parent: Option<BusinessUnitId>,
}

/// A user (`systemuser`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Its id (`systemuserid`).
    pub id: UserId,
    /// Its name (e.g. the sign-in address), unique in the environment.
    pub name: String,
    /// The one business unit the user belongs to.
    pub business_unit: BusinessUnitId,
    /// Roles assigned to the user directly.
    pub roles: BTreeSet<RoleId>,
}

/// A team: an owner of rows with members and roles of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Team {
    /// Its id (`teamid`).
    pub id: TeamId,
    /// Its name, unique in the environment.
    pub name: String,
    /// The business unit that owns the team.
    pub business_unit: BusinessUnitId,
    /// Its members.
    pub members: BTreeSet<UserId>,
    /// Roles assigned to the team (its members get them, relative to the team).
    pub roles: BTreeSet<RoleId>,
}

/// A security role: per table, a depth for each privilege.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    /// Its id (`roleid`).
    pub id: RoleId,
    /// Its name, unique in the environment.
    pub name: String,
    /// Per table logical name (or `*` for every table not listed), the depth per privilege.
    pub privileges: BTreeMap<String, BTreeMap<Privilege, Depth>>,
}

impl Role {
    /// The depth this role grants for a privilege on a table (a named table entry wins over `*`).
    pub fn depth(&self, table: &str, privilege: Privilege) -> Depth {
        self.privileges
            .get(table)
            .or_else(|| self.privileges.get("*"))
            .and_then(|p| p.get(&privilege))
            .copied()
            .unwrap_or(Depth::None)
    }

    /// Grant a privilege on a table at a depth (replacing what was there).
    pub fn grant(&mut self, table: &str, privilege: Privilege, depth: Depth) {
        self.privileges
            .entry(table.to_string())
            .or_default()
            .insert(privilege, depth);
    }
}

/// Why an environment file or an environment change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvironmentError {
    /// The file is not valid TOML of the expected shape.
    #[error("environment file is not valid: {0}")]
    Parse(String),
    /// A depth name that is not one of none, user, business_unit, parent_child, organization.
    #[error("unknown privilege depth `{0}` (expected none, user, business_unit, parent_child or organization)")]
    UnknownDepth(String),
    /// A privilege name that is not one of the eight privileges.
    #[error("unknown privilege `{0}` (expected create, read, write, delete, append, append_to, assign or share)")]
    UnknownPrivilege(String),
    /// A business unit named but not defined.
    #[error("unknown business unit `{0}`")]
    UnknownBusinessUnit(String),
    /// A user named but not defined.
    #[error("unknown user `{0}`")]
    UnknownUser(String),
    /// A team named but not defined.
    #[error("unknown team `{0}`")]
    UnknownTeam(String),
    /// A role named but not defined.
    #[error("unknown security role `{0}`")]
    UnknownRole(String),
    /// Two things of one kind with the same name or id.
    #[error("{kind} `{name}` is defined twice")]
    Duplicate {
        /// business unit, user, team or role.
        kind: &'static str,
        /// The repeated name.
        name: String,
    },
    /// The business units do not form one tree (no root, several roots, or a cycle).
    #[error("business units must form one tree: {0}")]
    NotATree(String),
    /// A file tried to redefine a built-in role.
    #[error("the built-in role `{0}` cannot be redefined")]
    BuiltInRole(String),
    /// An id that is not a UUID.
    #[error("`{0}` is not a valid id (UUID)")]
    InvalidId(String),
}

/// Per table, what a user may read: the union over the user's and the user's teams' roles.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadScope {
    /// Every row is readable.
    pub all: bool,
    /// Rows owned by one of these users or teams are readable.
    pub owners: BTreeSet<OwnerRef>,
    /// Rows whose owning business unit is one of these are readable.
    pub business_units: BTreeSet<BusinessUnitId>,
}

impl ReadScope {
    /// Whether a row with this owner and owning business unit is readable.
    pub fn allows(&self, owner: Option<OwnerRef>, business_unit: Option<BusinessUnitId>) -> bool {
        self.all
            || owner.is_some_and(|o| self.owners.contains(&o))
            || business_unit.is_some_and(|b| self.business_units.contains(&b))
    }

    /// Whether nothing is readable.
    pub fn is_empty(&self) -> bool {
        !self.all && self.owners.is_empty() && self.business_units.is_empty()
    }
}

/// Business units, users, teams and roles of one environment.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Environment {
    business_units: BTreeMap<BusinessUnitId, BusinessUnit>,
    users: BTreeMap<UserId, User>,
    teams: BTreeMap<TeamId, Team>,
    roles: BTreeMap<RoleId, Role>,
}

/// A UUID derived from a kind and a name, stable across runs.
pub fn derived_id(kind: &str, name: &str) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("fieldsync:{kind}:{name}").as_bytes(),
    )
}

/// The built-in roles, as Power Apps ships them for offline use.
pub fn built_in_roles() -> Vec<Role> {
    let mut admin = Role {
        id: derived_id("role", SYSTEM_ADMINISTRATOR),
        name: SYSTEM_ADMINISTRATOR.to_string(),
        privileges: BTreeMap::new(),
    };
    for p in Privilege::ALL {
        admin.grant("*", p, Depth::Organization);
    }
    let maker = |name: &str| {
        let mut r = Role {
            id: derived_id("role", name),
            name: name.to_string(),
            privileges: BTreeMap::new(),
        };
        for p in [
            Privilege::Create,
            Privilege::Read,
            Privilege::Write,
            Privilege::Delete,
            Privilege::Share,
        ] {
            r.grant(PROFILE_TABLE, p, Depth::Organization);
        }
        for p in [Privilege::Read, Privilege::Write, Privilege::Create] {
            r.grant(APP_TABLE, p, Depth::Organization);
        }
        r
    };
    let mut basic = Role {
        id: derived_id("role", BASIC_USER),
        name: BASIC_USER.to_string(),
        privileges: BTreeMap::new(),
    };
    basic.grant(PROFILE_TABLE, Privilege::Read, Depth::Organization);
    basic.grant(APP_TABLE, Privilege::Read, Depth::Organization);
    vec![
        admin,
        maker(SYSTEM_CUSTOMIZER),
        maker(ENVIRONMENT_MAKER),
        basic,
    ]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvFile {
    #[serde(default)]
    business_units: Vec<BuFile>,
    #[serde(default)]
    users: Vec<UserFile>,
    #[serde(default)]
    teams: Vec<TeamFile>,
    #[serde(default)]
    roles: Vec<RoleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BuFile {
    name: String,
    id: Option<String>,
    parent: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserFile {
    name: String,
    id: Option<String>,
    business_unit: String,
    #[serde(default)]
    roles: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TeamFile {
    name: String,
    id: Option<String>,
    business_unit: String,
    #[serde(default)]
    members: Vec<String>,
    #[serde(default)]
    roles: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleFile {
    name: String,
    id: Option<String>,
    #[serde(default)]
    privileges: BTreeMap<String, BTreeMap<String, String>>,
}

fn parse_id(kind: &str, name: &str, id: Option<&str>) -> Result<Uuid, EnvironmentError> {
    match id {
        Some(s) => Uuid::parse_str(s).map_err(|_| EnvironmentError::InvalidId(s.to_string())),
        None => Ok(derived_id(kind, name)),
    }
}

fn parse_privilege(s: &str) -> Result<Privilege, EnvironmentError> {
    Privilege::ALL
        .into_iter()
        .find(|p| p.name() == s || (s == "appendto" && *p == Privilege::AppendTo))
        .ok_or_else(|| EnvironmentError::UnknownPrivilege(s.to_string()))
}

impl Environment {
    /// An environment with one root business unit and the built-in roles, and nothing else.
    pub fn new(root_business_unit: &str) -> Environment {
        let mut env = Environment::default();
        let root = BusinessUnit {
            id: derived_id("business_unit", root_business_unit),
            name: root_business_unit.to_string(),
            parent: None,
        };
        env.business_units.insert(root.id, root);
        for r in built_in_roles() {
            env.roles.insert(r.id, r);
        }
        env
    }

    /// Parse an environment from TOML text (see the module docs for the shape).
    pub fn from_toml(text: &str) -> Result<Environment, EnvironmentError> {
        let file: EnvFile =
            toml::from_str(text).map_err(|e| EnvironmentError::Parse(e.to_string()))?;
        let mut env = Environment::default();
        for r in built_in_roles() {
            env.roles.insert(r.id, r);
        }
        let mut bu_by_name: HashMap<String, BusinessUnitId> = HashMap::new();
        for b in &file.business_units {
            let id = parse_id("business_unit", &b.name, b.id.as_deref())?;
            if bu_by_name.insert(b.name.clone(), id).is_some() {
                return Err(EnvironmentError::Duplicate {
                    kind: "business unit",
                    name: b.name.clone(),
                });
            }
        }
        for b in &file.business_units {
            let parent = match &b.parent {
                Some(p) => Some(
                    *bu_by_name
                        .get(p)
                        .ok_or_else(|| EnvironmentError::UnknownBusinessUnit(p.clone()))?,
                ),
                None => None,
            };
            let id = bu_by_name[&b.name];
            env.business_units.insert(
                id,
                BusinessUnit {
                    id,
                    name: b.name.clone(),
                    parent,
                },
            );
        }
        let mut role_by_name: HashMap<String, RoleId> =
            env.roles.values().map(|r| (r.name.clone(), r.id)).collect();
        for rf in &file.roles {
            if role_by_name.contains_key(&rf.name) {
                return Err(if built_in_roles().iter().any(|b| b.name == rf.name) {
                    EnvironmentError::BuiltInRole(rf.name.clone())
                } else {
                    EnvironmentError::Duplicate {
                        kind: "role",
                        name: rf.name.clone(),
                    }
                });
            }
            let mut role = Role {
                id: parse_id("role", &rf.name, rf.id.as_deref())?,
                name: rf.name.clone(),
                privileges: BTreeMap::new(),
            };
            for (table, privs) in &rf.privileges {
                for (p, d) in privs {
                    role.grant(table, parse_privilege(p)?, d.parse()?);
                }
            }
            role_by_name.insert(role.name.clone(), role.id);
            env.roles.insert(role.id, role);
        }
        let roles_of = |names: &[String]| -> Result<BTreeSet<RoleId>, EnvironmentError> {
            names
                .iter()
                .map(|n| {
                    role_by_name
                        .get(n)
                        .copied()
                        .ok_or_else(|| EnvironmentError::UnknownRole(n.clone()))
                })
                .collect()
        };
        let bu = |n: &str| {
            bu_by_name
                .get(n)
                .copied()
                .ok_or_else(|| EnvironmentError::UnknownBusinessUnit(n.to_string()))
        };
        let mut user_by_name: HashMap<String, UserId> = HashMap::new();
        for uf in &file.users {
            let user = User {
                id: parse_id("user", &uf.name, uf.id.as_deref())?,
                name: uf.name.clone(),
                business_unit: bu(&uf.business_unit)?,
                roles: roles_of(&uf.roles)?,
            };
            if user_by_name.insert(user.name.clone(), user.id).is_some()
                || env.users.contains_key(&user.id)
            {
                return Err(EnvironmentError::Duplicate {
                    kind: "user",
                    name: uf.name.clone(),
                });
            }
            env.users.insert(user.id, user);
        }
        for tf in &file.teams {
            let members = tf
                .members
                .iter()
                .map(|m| {
                    user_by_name
                        .get(m)
                        .copied()
                        .ok_or_else(|| EnvironmentError::UnknownUser(m.clone()))
                })
                .collect::<Result<_, _>>()?;
            let team = Team {
                id: parse_id("team", &tf.name, tf.id.as_deref())?,
                name: tf.name.clone(),
                business_unit: bu(&tf.business_unit)?,
                members,
                roles: roles_of(&tf.roles)?,
            };
            if env.teams.values().any(|t| t.name == team.name) || env.teams.contains_key(&team.id) {
                return Err(EnvironmentError::Duplicate {
                    kind: "team",
                    name: tf.name.clone(),
                });
            }
            env.teams.insert(team.id, team);
        }
        env.check_tree()?;
        Ok(env)
    }

    fn check_tree(&self) -> Result<(), EnvironmentError> {
        let roots: Vec<_> = self
            .business_units
            .values()
            .filter(|b| b.parent.is_none())
            .collect();
        if roots.len() != 1 {
            return Err(EnvironmentError::NotATree(format!(
                "{} root business units (exactly one has no parent)",
                roots.len()
            )));
        }
        for b in self.business_units.values() {
            let mut seen = BTreeSet::new();
            let mut cur = Some(b.id);
            while let Some(id) = cur {
                if !seen.insert(id) {
                    return Err(EnvironmentError::NotATree(format!(
                        "`{}` is its own ancestor",
                        b.name
                    )));
                }
                cur = self.business_units.get(&id).and_then(|x| x.parent);
            }
        }
        Ok(())
    }

    /// Every business unit, by id.
    pub fn business_units(&self) -> impl Iterator<Item = &BusinessUnit> {
        self.business_units.values()
    }
    /// Every user, by id.
    pub fn users(&self) -> impl Iterator<Item = &User> {
        self.users.values()
    }
    /// Every team, by id.
    pub fn teams(&self) -> impl Iterator<Item = &Team> {
        self.teams.values()
    }
    /// Every role, by id.
    pub fn roles(&self) -> impl Iterator<Item = &Role> {
        self.roles.values()
    }
    /// The business unit with this id.
    pub fn business_unit(&self, id: BusinessUnitId) -> Option<&BusinessUnit> {
        self.business_units.get(&id)
    }
    /// The user with this id.
    pub fn user(&self, id: UserId) -> Option<&User> {
        self.users.get(&id)
    }
    /// The team with this id.
    pub fn team(&self, id: TeamId) -> Option<&Team> {
        self.teams.get(&id)
    }
    /// The role with this id.
    pub fn role(&self, id: RoleId) -> Option<&Role> {
        self.roles.get(&id)
    }
    /// The user with this name.
    pub fn user_by_name(&self, name: &str) -> Option<&User> {
        self.users.values().find(|u| u.name == name)
    }
    /// The role with this name.
    pub fn role_by_name(&self, name: &str) -> Option<&Role> {
        self.roles.values().find(|r| r.name == name)
    }
    /// The team with this name.
    pub fn team_by_name(&self, name: &str) -> Option<&Team> {
        self.teams.values().find(|t| t.name == name)
    }
    /// The business unit with this name.
    pub fn business_unit_by_name(&self, name: &str) -> Option<&BusinessUnit> {
        self.business_units.values().find(|b| b.name == name)
    }

    /// Add a business unit under `parent` (an existing unit).
    pub fn add_business_unit(
        &mut self,
        name: &str,
        parent: BusinessUnitId,
    ) -> Result<BusinessUnitId, EnvironmentError> {
        if !self.business_units.contains_key(&parent) {
            return Err(EnvironmentError::UnknownBusinessUnit(parent.to_string()));
        }
        let id = derived_id("business_unit", name);
        if self.business_units.contains_key(&id) {
            return Err(EnvironmentError::Duplicate {
                kind: "business unit",
                name: name.to_string(),
            });
        }
        self.business_units.insert(
            id,
            BusinessUnit {
                id,
                name: name.to_string(),
                parent: Some(parent),
            },
        );
        Ok(id)
    }

    /// Add a user in a business unit, with roles.
    pub fn add_user(
        &mut self,
        name: &str,
        business_unit: BusinessUnitId,
        roles: &[RoleId],
    ) -> Result<UserId, EnvironmentError> {
        if !self.business_units.contains_key(&business_unit) {
            return Err(EnvironmentError::UnknownBusinessUnit(
                business_unit.to_string(),
            ));
        }
        for r in roles {
            if !self.roles.contains_key(r) {
                return Err(EnvironmentError::UnknownRole(r.to_string()));
            }
        }
        let id = derived_id("user", name);
        if self.users.contains_key(&id) {
            return Err(EnvironmentError::Duplicate {
                kind: "user",
                name: name.to_string(),
            });
        }
        self.users.insert(
            id,
            User {
                id,
                name: name.to_string(),
                business_unit,
                roles: roles.iter().copied().collect(),
            },
        );
        Ok(id)
    }

    /// Add a team owned by a business unit, with members and roles.
    pub fn add_team(
        &mut self,
        name: &str,
        business_unit: BusinessUnitId,
        members: &[UserId],
        roles: &[RoleId],
    ) -> Result<TeamId, EnvironmentError> {
        if !self.business_units.contains_key(&business_unit) {
            return Err(EnvironmentError::UnknownBusinessUnit(
                business_unit.to_string(),
            ));
        }
        for m in members {
            if !self.users.contains_key(m) {
                return Err(EnvironmentError::UnknownUser(m.to_string()));
            }
        }
        for r in roles {
            if !self.roles.contains_key(r) {
                return Err(EnvironmentError::UnknownRole(r.to_string()));
            }
        }
        let id = derived_id("team", name);
        if self.teams.contains_key(&id) {
            return Err(EnvironmentError::Duplicate {
                kind: "team",
                name: name.to_string(),
            });
        }
        self.teams.insert(
            id,
            Team {
                id,
                name: name.to_string(),
                business_unit,
                members: members.iter().copied().collect(),
                roles: roles.iter().copied().collect(),
            },
        );
        Ok(id)
    }

    /// Add a role, or replace the role with the same id (a role change).
    pub fn put_role(&mut self, role: Role) {
        self.roles.insert(role.id, role);
    }

    /// Give a user a role (`true` if it was not held already).
    pub fn assign_role(&mut self, user: UserId, role: RoleId) -> Result<bool, EnvironmentError> {
        if !self.roles.contains_key(&role) {
            return Err(EnvironmentError::UnknownRole(role.to_string()));
        }
        let u = self
            .users
            .get_mut(&user)
            .ok_or_else(|| EnvironmentError::UnknownUser(user.to_string()))?;
        Ok(u.roles.insert(role))
    }

    /// Take a role from a user (`true` if it was held).
    pub fn remove_role(&mut self, user: UserId, role: RoleId) -> Result<bool, EnvironmentError> {
        let u = self
            .users
            .get_mut(&user)
            .ok_or_else(|| EnvironmentError::UnknownUser(user.to_string()))?;
        Ok(u.roles.remove(&role))
    }

    /// Give a team a role (`true` if it was not held already).
    pub fn assign_team_role(
        &mut self,
        team: TeamId,
        role: RoleId,
    ) -> Result<bool, EnvironmentError> {
        if !self.roles.contains_key(&role) {
            return Err(EnvironmentError::UnknownRole(role.to_string()));
        }
        let t = self
            .teams
            .get_mut(&team)
            .ok_or_else(|| EnvironmentError::UnknownTeam(team.to_string()))?;
        Ok(t.roles.insert(role))
    }

    /// Add a user to a team (`true` if not a member already).
    pub fn add_team_member(
        &mut self,
        team: TeamId,
        user: UserId,
    ) -> Result<bool, EnvironmentError> {
        if !self.users.contains_key(&user) {
            return Err(EnvironmentError::UnknownUser(user.to_string()));
        }
        let t = self
            .teams
            .get_mut(&team)
            .ok_or_else(|| EnvironmentError::UnknownTeam(team.to_string()))?;
        Ok(t.members.insert(user))
    }

    /// Remove a user from a team (`true` if it was a member).
    pub fn remove_team_member(
        &mut self,
        team: TeamId,
        user: UserId,
    ) -> Result<bool, EnvironmentError> {
        let t = self
            .teams
            .get_mut(&team)
            .ok_or_else(|| EnvironmentError::UnknownTeam(team.to_string()))?;
        Ok(t.members.remove(&user))
    }

    /// The teams a user is a member of.
    pub fn teams_of(&self, user: UserId) -> impl Iterator<Item = &Team> {
        self.teams
            .values()
            .filter(move |t| t.members.contains(&user))
    }

    /// The users whose business unit is `bu`.
    pub fn users_in(&self, bu: BusinessUnitId) -> impl Iterator<Item = &User> {
        self.users.values().filter(move |u| u.business_unit == bu)
    }

    /// `bu` and every business unit below it.
    pub fn subtree(&self, bu: BusinessUnitId) -> BTreeSet<BusinessUnitId> {
        let mut out = BTreeSet::new();
        let mut stack = vec![bu];
        while let Some(b) = stack.pop() {
            if out.insert(b) {
                stack.extend(
                    self.business_units
                        .values()
                        .filter(|c| c.parent == Some(b))
                        .map(|c| c.id),
                );
            }
        }
        out
    }

    /// The deepest depth a user holds for a privilege on a table, over the user's roles and the
    /// user's teams' roles (an upper bound: team depths are relative to the team).
    pub fn max_depth(&self, user: UserId, table: &str, privilege: Privilege) -> Depth {
        let Some(u) = self.users.get(&user) else {
            return Depth::None;
        };
        let team_roles = self.teams_of(user).flat_map(|t| t.roles.iter());
        u.roles
            .iter()
            .chain(team_roles)
            .filter_map(|r| self.roles.get(r))
            .map(|r| r.depth(table, privilege))
            .max()
            .unwrap_or(Depth::None)
    }

    /// The business unit that owns a user's or team's rows.
    pub fn owner_business_unit(&self, owner: OwnerRef) -> Option<BusinessUnitId> {
        match owner.kind {
            OwnerKind::User => self.users.get(&owner.id).map(|u| u.business_unit),
            OwnerKind::Team => self.teams.get(&owner.id).map(|t| t.business_unit),
        }
    }

    /// A row's owning business unit: its `owningbusinessunit` column, else its owner's unit.
    pub fn row_business_unit(&self, values: &BTreeMap<String, Value>) -> Option<BusinessUnitId> {
        match values.get("owningbusinessunit") {
            Some(Value::Lookup(id)) => Some(*id),
            _ => row_owner(values).and_then(|o| self.owner_business_unit(o)),
        }
    }

    /// What `user` may read of `table` (empty for an unknown user).
    pub fn read_scope(&self, user: UserId, table: &Table) -> ReadScope {
        let teams: Vec<&Team> = self.teams_of(user).collect();
        self.read_scope_with_teams(user, &teams, table)
    }

    /// [`Environment::read_scope`] with the user's teams already looked up.
    pub(crate) fn read_scope_with_teams(
        &self,
        user: UserId,
        teams: &[&Team],
        table: &Table,
    ) -> ReadScope {
        let mut scope = ReadScope::default();
        let Some(u) = self.users.get(&user) else {
            return scope;
        };
        let me = OwnerRef {
            kind: OwnerKind::User,
            id: user,
        };
        let org_owned = table.ownership == Ownership::Organization;
        let mut apply = |depth: Depth, owners: &[OwnerRef], bu: BusinessUnitId| {
            if depth == Depth::None {
                return;
            }
            if org_owned {
                scope.all = true;
                return;
            }
            match depth {
                Depth::None => {}
                Depth::User => scope.owners.extend(owners.iter().copied()),
                Depth::BusinessUnit => {
                    scope.business_units.insert(bu);
                }
                Depth::ParentChild => scope.business_units.extend(self.subtree(bu)),
                Depth::Organization => scope.all = true,
            }
        };
        let mut own: Vec<OwnerRef> = vec![me];
        own.extend(teams.iter().map(|t| OwnerRef {
            kind: OwnerKind::Team,
            id: t.id,
        }));
        for r in u.roles.iter().filter_map(|r| self.roles.get(r)) {
            apply(r.depth(&table.name, Privilege::Read), &own, u.business_unit);
        }
        for t in teams {
            let owners = [
                me,
                OwnerRef {
                    kind: OwnerKind::Team,
                    id: t.id,
                },
            ];
            for r in t.roles.iter().filter_map(|r| self.roles.get(r)) {
                apply(
                    r.depth(&table.name, Privilege::Read),
                    &owners,
                    t.business_unit,
                );
            }
        }
        if scope.all {
            scope.owners.clear();
            scope.business_units.clear();
        }
        scope
    }

    /// Whether `user` may read this row of `table`.
    pub fn can_read(&self, user: UserId, table: &Table, values: &BTreeMap<String, Value>) -> bool {
        self.read_scope(user, table)
            .allows(row_owner(values), self.row_business_unit(values))
    }
}

/// A row's owner (`ownerid`), if set.
pub fn row_owner(values: &BTreeMap<String, Value>) -> Option<OwnerRef> {
    match values.get("ownerid") {
        Some(Value::Owner(o)) => Some(*o),
        _ => None,
    }
}
