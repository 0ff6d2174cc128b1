//! Admin operations on profiles and apps, checked against the acting user's roles.
//!
//! | operation | privilege needed |
//! |---|---|
//! | create / read / update / delete / share a profile | create / read / write / delete / share on `mobileofflineprofile` |
//! | switch an app's "can be used offline", link its profile | write on `appmodule`, read on `mobileofflineprofile` |
//!
//! With the built-in roles: System Administrator, System Customizer and Environment Maker may do
//! everything; Basic User may only read profiles. Profiles and apps are organization-owned, so
//! any depth other than none grants the privilege.

use std::collections::BTreeMap;
use std::fmt;

use fieldsync_store::Schema;
use uuid::Uuid;

use crate::app::{App, PublishError};
use crate::profile::{Profile, ProfileError};
use crate::security::{Depth, Environment, Privilege, UserId, APP_TABLE, PROFILE_TABLE};

/// An operation an admin, maker or user asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AdminOperation {
    /// Create a profile.
    CreateProfile,
    /// Read a profile.
    ReadProfile,
    /// Change a profile.
    UpdateProfile,
    /// Delete a profile.
    DeleteProfile,
    /// Share a profile with users.
    ShareProfile,
    /// Switch an app's "can be used offline".
    SetAppOffline,
    /// Link an app to a profile.
    LinkAppProfile,
}

impl AdminOperation {
    /// Every operation.
    pub const ALL: [AdminOperation; 7] = [
        AdminOperation::CreateProfile,
        AdminOperation::ReadProfile,
        AdminOperation::UpdateProfile,
        AdminOperation::DeleteProfile,
        AdminOperation::ShareProfile,
        AdminOperation::SetAppOffline,
        AdminOperation::LinkAppProfile,
    ];

    /// The privileges the operation needs, as (table, privilege).
    pub fn required(self) -> &'static [(&'static str, Privilege)] {
        match self {
            AdminOperation::CreateProfile => &[(PROFILE_TABLE, Privilege::Create)],
            AdminOperation::ReadProfile => &[(PROFILE_TABLE, Privilege::Read)],
            AdminOperation::UpdateProfile => &[(PROFILE_TABLE, Privilege::Write)],
            AdminOperation::DeleteProfile => &[(PROFILE_TABLE, Privilege::Delete)],
            AdminOperation::ShareProfile => &[(PROFILE_TABLE, Privilege::Share)],
            AdminOperation::SetAppOffline => &[(APP_TABLE, Privilege::Write)],
            AdminOperation::LinkAppProfile => &[
                (APP_TABLE, Privilege::Write),
                (PROFILE_TABLE, Privilege::Read),
            ],
        }
    }
}

impl fmt::Display for AdminOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AdminOperation::CreateProfile => "create a profile",
            AdminOperation::ReadProfile => "read a profile",
            AdminOperation::UpdateProfile => "update a profile",
            AdminOperation::DeleteProfile => "delete a profile",
            AdminOperation::ShareProfile => "share a profile",
            AdminOperation::SetAppOffline => "switch an app's offline use",
            AdminOperation::LinkAppProfile => "link an app to a profile",
        })
    }
}

/// A user tried an operation their roles do not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("user {user} may not {operation}: it needs the {privilege} privilege on `{table}`")]
pub struct AuthorizationError {
    /// The acting user.
    pub user: UserId,
    /// What was attempted.
    pub operation: AdminOperation,
    /// The table whose privilege is missing.
    pub table: &'static str,
    /// The missing privilege.
    pub privilege: Privilege,
}

/// Check that `user` may perform `operation`.
pub fn authorize(
    env: &Environment,
    user: UserId,
    operation: AdminOperation,
) -> Result<(), AuthorizationError> {
    for (table, privilege) in operation.required() {
        if env.max_depth(user, table, *privilege) == Depth::None {
            return Err(AuthorizationError {
                user,
                operation,
                table,
                privilege: *privilege,
            });
        }
    }
    Ok(())
}

/// Why an admin operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The acting user's roles do not allow the operation.
    #[error(transparent)]
    Unauthorized(#[from] AuthorizationError),
    /// The profile is not valid for the schema.
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// No profile with this name.
    #[error("no profile named `{0}`")]
    UnknownProfile(String),
    /// A profile with this name exists already.
    #[error("a profile named `{0}` exists already")]
    DuplicateProfile(String),
    /// No app with this name.
    #[error("no app named `{0}`")]
    UnknownApp(String),
    /// No user with this id.
    #[error("no user with id {0}")]
    UnknownUser(Uuid),
    /// The profile is linked to apps and cannot be deleted.
    #[error("profile `{profile}` is linked to app `{app}`")]
    InUse {
        /// The profile.
        profile: String,
        /// An app linked to it.
        app: String,
    },
    /// Switching the app offline would leave it unpublishable.
    #[error(transparent)]
    Publish(#[from] PublishError),
}

/// The profiles and apps of an environment, changed only through checked operations.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// Profiles by name.
    profiles: BTreeMap<String, Profile>,
    /// Apps by name.
    apps: BTreeMap<String, App>,
    /// Users each profile is shared with, by profile name.
    shared_with: BTreeMap<String, Vec<UserId>>,
}

impl Catalog {
    /// A catalog holding these apps and profiles (as loaded from files).
    pub fn new(apps: Vec<App>, profiles: Vec<Profile>) -> Catalog {
        Catalog {
            profiles: profiles.into_iter().map(|p| (p.name.clone(), p)).collect(),
            apps: apps.into_iter().map(|a| (a.name.clone(), a)).collect(),
            shared_with: BTreeMap::new(),
        }
    }

    /// Every profile, for code that has already checked rights (the hub's own use).
    pub fn profiles(&self) -> impl Iterator<Item = &Profile> {
        self.profiles.values()
    }

    /// Every app.
    pub fn apps(&self) -> impl Iterator<Item = &App> {
        self.apps.values()
    }

    /// Create a profile.
    pub fn create_profile(
        &mut self,
        env: &Environment,
        schema: &Schema,
        actor: UserId,
        profile: Profile,
    ) -> Result<(), AdminError> {
        authorize(env, actor, AdminOperation::CreateProfile)?;
        profile.validate(schema)?;
        if self.profiles.contains_key(&profile.name) {
            return Err(AdminError::DuplicateProfile(profile.name));
        }
        self.profiles.insert(profile.name.clone(), profile);
        Ok(())
    }

    /// Read a profile.
    pub fn read_profile(
        &self,
        env: &Environment,
        actor: UserId,
        name: &str,
    ) -> Result<&Profile, AdminError> {
        authorize(env, actor, AdminOperation::ReadProfile)?;
        self.profiles
            .get(name)
            .ok_or_else(|| AdminError::UnknownProfile(name.to_string()))
    }

    /// Replace a profile (matched by name), returning the previous version.
    pub fn update_profile(
        &mut self,
        env: &Environment,
        schema: &Schema,
        actor: UserId,
        profile: Profile,
    ) -> Result<Profile, AdminError> {
        authorize(env, actor, AdminOperation::UpdateProfile)?;
        profile.validate(schema)?;
        match self.profiles.get_mut(&profile.name) {
            Some(p) => Ok(std::mem::replace(p, profile)),
            None => Err(AdminError::UnknownProfile(profile.name)),
        }
    }

    /// Delete a profile no app is linked to.
    pub fn delete_profile(
        &mut self,
        env: &Environment,
        actor: UserId,
        name: &str,
    ) -> Result<Profile, AdminError> {
        authorize(env, actor, AdminOperation::DeleteProfile)?;
        if let Some(app) = self
            .apps
            .values()
            .find(|a| a.profile.as_deref() == Some(name))
        {
            return Err(AdminError::InUse {
                profile: name.to_string(),
                app: app.name.clone(),
            });
        }
        self.shared_with.remove(name);
        self.profiles
            .remove(name)
            .ok_or_else(|| AdminError::UnknownProfile(name.to_string()))
    }

    /// Share a profile with a user.
    pub fn share_profile(
        &mut self,
        env: &Environment,
        actor: UserId,
        name: &str,
        with: UserId,
    ) -> Result<(), AdminError> {
        authorize(env, actor, AdminOperation::ShareProfile)?;
        if !self.profiles.contains_key(name) {
            return Err(AdminError::UnknownProfile(name.to_string()));
        }
        if env.user(with).is_none() {
            return Err(AdminError::UnknownUser(with));
        }
        let v = self.shared_with.entry(name.to_string()).or_default();
        if !v.contains(&with) {
            v.push(with);
        }
        Ok(())
    }

    /// The users a profile is shared with.
    pub fn shared_with(&self, name: &str) -> &[UserId] {
        self.shared_with.get(name).map_or(&[], Vec::as_slice)
    }

    /// Switch an app's "can be used offline". Switching it on checks the app can be published.
    pub fn set_app_offline(
        &mut self,
        env: &Environment,
        schema: &Schema,
        actor: UserId,
        app: &str,
        offline: bool,
    ) -> Result<(), AdminError> {
        authorize(env, actor, AdminOperation::SetAppOffline)?;
        let profiles: Vec<Profile> = self.profiles.values().cloned().collect();
        let a = self
            .apps
            .get_mut(app)
            .ok_or_else(|| AdminError::UnknownApp(app.to_string()))?;
        let mut changed = a.clone();
        changed.offline = offline;
        changed.check_publish(schema, &profiles)?;
        *a = changed;
        Ok(())
    }

    /// Link an app to a profile (or unlink it with `None`).
    pub fn link_app_profile(
        &mut self,
        env: &Environment,
        actor: UserId,
        app: &str,
        profile: Option<&str>,
    ) -> Result<(), AdminError> {
        authorize(env, actor, AdminOperation::LinkAppProfile)?;
        if let Some(p) = profile {
            if !self.profiles.contains_key(p) {
                return Err(AdminError::UnknownProfile(p.to_string()));
            }
        }
        let a = self
            .apps
            .get_mut(app)
            .ok_or_else(|| AdminError::UnknownApp(app.to_string()))?;
        a.profile = profile.map(str::to_string);
        Ok(())
    }
}
