//! Every admin operation for every built-in role; app publishing; the generated profile.
// Test helpers may unwrap: a panic there is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use fieldsync_replication::app::Missing;
use fieldsync_replication::security::{
    BASIC_USER, ENVIRONMENT_MAKER, SYSTEM_ADMINISTRATOR, SYSTEM_CUSTOMIZER,
};
use fieldsync_replication::{
    apps_from_toml, authorize, generate_profile, AdminError, AdminOperation, Catalog, Environment,
    Privilege, Profile, RowFilter,
};

fn env_with_role_users() -> (Environment, Vec<(&'static str, uuid::Uuid)>) {
    let mut env = Environment::new("root");
    let root = env.business_unit_by_name("root").unwrap().id;
    let mut users = Vec::new();
    for role in [
        SYSTEM_ADMINISTRATOR,
        SYSTEM_CUSTOMIZER,
        ENVIRONMENT_MAKER,
        BASIC_USER,
    ] {
        let rid = env.role_by_name(role).unwrap().id;
        users.push((role, env.add_user(role, root, &[rid]).unwrap()));
    }
    users.push(("(no role)", env.add_user("nobody", root, &[]).unwrap()));
    (env, users)
}

#[test]
fn every_admin_operation_for_every_built_in_role() {
    let (env, users) = env_with_role_users();
    for (role, user) in &users {
        for op in AdminOperation::ALL {
            let allowed = match *role {
                SYSTEM_ADMINISTRATOR | SYSTEM_CUSTOMIZER | ENVIRONMENT_MAKER => true,
                BASIC_USER => op == AdminOperation::ReadProfile,
                _ => false,
            };
            let got = authorize(&env, *user, op);
            assert_eq!(got.is_ok(), allowed, "{role} {op}: {got:?}");
            if let Err(e) = got {
                assert_eq!(e.operation, op);
                assert!(e.to_string().contains("may not"), "{e}");
            }
        }
    }
    // The same through the catalog, with real effects.
    let schema = example_schema();
    let apps = apps_from_toml(&example("apps.toml"), &schema).unwrap();
    let base = Profile::from_toml(&example("profile.toml"), &schema).unwrap();
    for (role, user) in &users {
        let mut cat = Catalog::new(apps.clone(), vec![base.clone()]);
        let maker = matches!(
            *role,
            SYSTEM_ADMINISTRATOR | SYSTEM_CUSTOMIZER | ENVIRONMENT_MAKER
        );
        let reader = maker || *role == BASIC_USER;
        let unauthorized = |r: Result<(), AdminError>| match r {
            Err(AdminError::Unauthorized(_)) => false,
            Err(e) => panic!("{role}: unexpected {e}"),
            Ok(()) => true,
        };
        let mut second = base.clone();
        second.name = "second".into();
        assert_eq!(
            unauthorized(cat.create_profile(&env, &schema, *user, second.clone())),
            maker,
            "{role} create"
        );
        assert_eq!(
            cat.read_profile(&env, *user, "Field Service Mobile")
                .is_ok(),
            reader,
            "{role} read"
        );
        let mut changed = base.clone();
        changed.description = "changed".into();
        assert_eq!(
            unauthorized(
                cat.update_profile(&env, &schema, *user, changed)
                    .map(|_| ())
            ),
            maker,
            "{role} update"
        );
        let other = users[0].1;
        assert_eq!(
            unauthorized(cat.share_profile(&env, *user, "Field Service Mobile", other)),
            maker,
            "{role} share"
        );
        assert_eq!(
            unauthorized(cat.set_app_offline(&env, &schema, *user, "Field Service Mobile", true)),
            maker,
            "{role} offline switch"
        );
        assert_eq!(
            unauthorized(cat.link_app_profile(&env, *user, "Back Office", None)),
            maker,
            "{role} link"
        );
        if maker {
            // A linked profile cannot be deleted; the unlinked one can.
            assert!(matches!(
                cat.delete_profile(&env, *user, "Field Service Mobile"),
                Err(AdminError::InUse { .. })
            ));
            cat.delete_profile(&env, *user, "second").unwrap();
        } else {
            assert!(matches!(
                cat.delete_profile(&env, *user, "Field Service Mobile"),
                Err(AdminError::Unauthorized(e)) if e.privilege == Privilege::Delete
            ));
        }
    }
}

#[test]
fn publishing_names_what_is_missing() {
    let schema = example_schema();
    let apps = apps_from_toml(&example("apps.toml"), &schema).unwrap();
    let profile = Profile::from_toml(&example("profile.toml"), &schema).unwrap();
    let fsm = apps
        .iter()
        .find(|a| a.name == "Field Service Mobile")
        .unwrap();
    fsm.check_publish(&schema, std::slice::from_ref(&profile))
        .unwrap();
    // No profile linked.
    let mut a = fsm.clone();
    a.profile = None;
    let e = a
        .check_publish(&schema, std::slice::from_ref(&profile))
        .unwrap_err();
    assert_eq!(e.missing, vec![Missing::NoProfile]);
    assert!(e.to_string().contains("no offline profile"), "{e}");
    // A profile without accounts: the view and the lookup both say so.
    let mut p = profile.clone();
    p.items.remove("account");
    let e = fsm.check_publish(&schema, &[p]).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("`account` (view `Active accounts`)"),
        "{text}"
    );
    assert!(
        text.contains("column `msdyn_serviceaccount` of view `My active work orders`"),
        "{text}"
    );
    // Not offline: always publishable.
    let back = apps.iter().find(|a| a.name == "Back Office").unwrap();
    back.check_publish(&schema, &[]).unwrap();
    // Switching offline on checks it.
    let (env, users) = env_with_role_users();
    let mut cat = Catalog::new(apps.clone(), vec![profile]);
    assert!(matches!(
        cat.set_app_offline(&env, &schema, users[0].1, "Back Office", true),
        Err(AdminError::Publish(_))
    ));
}

#[test]
fn apps_files_are_checked() {
    let schema = example_schema();
    let bad = [
        "[[apps]]\nname = \"x\"\n[[apps.views]]\ntable = \"nope\"\nname = \"v\"\n",
        "[[apps]]\nname = \"x\"\n[[apps.views]]\ntable = \"account\"\nname = \"v\"\ncolumns = [\"zz\"]\n",
        "[[apps]]\nname = \"x\"\n[[apps.views]]\ntable = \"account\"\nname = \"v\"\nfilter = \"name between 1\"\n",
        "[[apps]]\nname = \"x\"\n[[apps.views]]\ntable = \"account\"\nname = \"v\"\nsort = [\"name sideways\"]\n",
        "[[apps]]\nname = \"x\"\n[[apps]]\nname = \"x\"\n",
    ];
    for text in bad {
        assert!(apps_from_toml(text, &schema).is_err(), "{text}");
    }
}

#[test]
fn generated_profile_follows_the_app() {
    let schema = example_schema();
    let apps = apps_from_toml(&example("apps.toml"), &schema).unwrap();
    let fsm = apps
        .iter()
        .find(|a| a.name == "Field Service Mobile")
        .unwrap();
    let (p, report) = generate_profile(fsm, &schema);
    p.validate(&schema).unwrap();
    assert_eq!(
        p.items["product"].filter,
        RowFilter::All,
        "organization-owned"
    );
    for t in ["msdyn_workorder", "bookableresourcebooking", "account"] {
        assert!(
            matches!(p.items[t].filter, RowFilter::Organization { .. }),
            "{t}"
        );
    }
    // Contacts are only reached through the account view's primary contact lookup.
    assert_eq!(p.items["contact"].filter, RowFilter::RelatedOnly);
    assert_eq!(
        p.items["contact"].relationships,
        vec!["account_primary_contact".to_string()]
    );
    assert!(!report.review.is_empty());
    // The app it was generated from publishes with it.
    let mut a = fsm.clone();
    a.profile = Some(p.name.clone());
    a.check_publish(&schema, &[p]).unwrap();
    // Tables that are not offline-enabled are reported, not added.
    let back = apps.iter().find(|a| a.name == "Back Office").unwrap();
    let (p, report) = generate_profile(back, &schema);
    assert!(!p.items.contains_key("systemaudit"));
    assert!(report.not_set_up.iter().any(|s| s.contains("systemaudit")));
}
