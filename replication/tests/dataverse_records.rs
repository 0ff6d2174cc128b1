//! Import and export of the Dataverse profile records, and FetchXML filters.
// Test helpers may unwrap: a panic there is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use fieldsync_replication::dataverse_records::{parse_fetchxml, to_fetchxml};
use fieldsync_replication::profile::Expr;
use fieldsync_replication::{
    export_records, import_records, Profile, ProfileError, RecordsError, RowFilter,
};
use serde_json::json;

#[test]
fn example_profile_round_trips_through_dataverse_records() {
    let schema = example_schema();
    let p = Profile::from_toml(&example("profile.toml"), &schema).unwrap();
    let records = export_records(&p);
    // Dataverse's field names and option values.
    let items = records["mobileofflineprofileitems"].as_array().unwrap();
    let wo = items
        .iter()
        .find(|i| i["selectedentitytypecode"] == "msdyn_workorder")
        .unwrap();
    assert_eq!(wo["recorddistributioncriteria"], 3);
    assert!(wo["profileitementityfilter"]
        .as_str()
        .unwrap()
        .contains("operator=\"eq-useroruserteams\""));
    assert_eq!(wo["syncintervalinminutes"], 5);
    let acc = items
        .iter()
        .find(|i| i["selectedentitytypecode"] == "account")
        .unwrap();
    assert_eq!(acc["recorddistributioncriteria"], 0);
    assert_eq!(acc["getrelatedentityrecords"], true);
    assert!(acc["selectedcolumns"]
        .as_str()
        .unwrap()
        .contains("\"Columns\""));
    let booking = items
        .iter()
        .find(|i| i["selectedentitytypecode"] == "bookableresourcebooking")
        .unwrap();
    assert_eq!(booking["recorddistributioncriteria"], 2);
    assert_eq!(booking["recordsownedbyme"], true);
    assert_eq!(booking["recordsownedbymyteam"], false);
    let product = items
        .iter()
        .find(|i| i["selectedentitytypecode"] == "product")
        .unwrap();
    assert_eq!(product["recorddistributioncriteria"], 1);
    assert!(records["mobileofflineprofileitemassociations"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["relationshipname"] == "account_parent_account"));
    // And back, without loss.
    let back = import_records(&records.to_string(), &schema).unwrap();
    assert_eq!(back, p);
    // Twice over.
    assert_eq!(export_records(&back), records);
}

#[test]
fn imports_a_profile_written_by_dataverse() {
    let schema = example_schema();
    let pid = "6a9f3f2e-1c1e-4f7a-9c43-5d5f0a0b0c01";
    let item = "0b6c7e1a-2d3e-4f50-8a9b-0c1d2e3f4a5b";
    let text = json!({
        "mobileofflineprofile": {"mobileofflineprofileid": format!("{{{pid}}}"), "name": "From Dataverse"},
        "mobileofflineprofileitems": [
            {
                "mobileofflineprofileitemid": item,
                "selectedentitytypecode": "incident",
                "recorddistributioncriteria": 3,
                "profileitementityfilter": "<fetch version=\"1.0\" output-format=\"xml-platform\" mapping=\"logical\" distinct=\"false\"><entity name=\"incident\"><attribute name=\"title\" /><filter type=\"and\"><condition attribute=\"statecode\" operator=\"eq\" value=\"0\" /><filter type=\"or\"><condition attribute=\"ownerid\" operator=\"eq-useroruserteams\" /><condition attribute=\"prioritycode\" operator=\"in\"><value>1</value><value>2</value></condition></filter></filter></entity></fetch>",
                "syncintervalinminutes": 30,
                "getrelatedentityrecords": 1
            },
            {
                "mobileofflineprofileitemid": "1b6c7e1a-2d3e-4f50-8a9b-0c1d2e3f4a5b",
                "selectedentitytypecode": "account",
                "recorddistributioncriteria": 2,
                "recordsownedbyme": false,
                "recordsownedbymyteam": true,
                "recordsownedbymybusinessunit": true
            }
        ],
        "mobileofflineprofileitemassociations": [
            {"_mobileofflineprofileitemid_value": item, "relationshipname": "incident_customer_accounts"}
        ]
    })
    .to_string();
    let p = import_records(&text, &schema).unwrap();
    assert_eq!(p.id.to_string(), pid);
    let inc = &p.items["incident"];
    assert_eq!(inc.sync_interval_minutes, 30);
    assert_eq!(inc.relationships, vec!["incident_customer_accounts"]);
    let RowFilter::Custom(e) = &inc.filter else {
        panic!("custom expected")
    };
    assert_eq!(
        e.to_string(),
        "statecode eq 0 and (ownerid eq-useroruserteams or prioritycode in (1, 2))"
    );
    assert_eq!(
        p.items["account"].filter,
        RowFilter::Organization {
            owned_by_me: false,
            owned_by_my_teams: true,
            owned_by_my_business_unit: true
        }
    );
    assert_eq!(p.items["account"].sync_interval_minutes, 10);
}

#[test]
fn fetchxml_operators_round_trip_and_unsupported_ones_are_named() {
    let schema = example_schema();
    let t = schema.table("msdyn_workorder").unwrap();
    for f in [
        "msdyn_name eq 'a&b <c>'",
        "msdyn_priority ne 2",
        "msdyn_estimatedduration lt 60 and msdyn_estimatedduration le 90",
        "msdyn_totalamount gt 10.5 or msdyn_totalamount ge 11",
        "msdyn_systemstatus in (690970000, 690970001)",
        "msdyn_name like '%pump%'",
        "msdyn_serviceaccount null and msdyn_reportedbycontact not-null",
        "ownerid eq-userid or ownerid eq-userteams or ownerid eq-useroruserteams",
        "owningbusinessunit eq-businessid",
        "msdyn_datewindowstart last-x-days 7 or msdyn_datewindowstart next-x-days 14",
        "msdyn_datewindowstart ge '2026-11-01T00:00:00Z'",
        "msdyn_serviceaccount eq '6a9f3f2e-1c1e-4f7a-9c43-5d5f0a0b0c01'",
        "(statecode eq 0 or statecode eq 1) and (msdyn_priority eq 1 or (msdyn_priority eq 2 and ownerid eq-userid))",
    ] {
        let e = Expr::parse(f, t).unwrap();
        let xml = to_fetchxml("msdyn_workorder", &e);
        let back = parse_fetchxml(&xml, t).unwrap_or_else(|err| panic!("{f}: {err}\n{xml}"));
        // A single condition comes back as a one-part `and`, which means the same.
        let same = back == e || back == Expr::And(vec![e.clone()]);
        assert!(same, "{f}\n{xml}\n{back:?}");
    }
    for op in [
        "between",
        "eq-useroruserhierarchy",
        "not-like",
        "olderthan-x-days",
    ] {
        let xml = format!(
            "<filter><condition attribute=\"msdyn_priority\" operator=\"{op}\" value=\"1\"/></filter>"
        );
        match parse_fetchxml(&xml, t) {
            Err(RecordsError::Profile(ProfileError::UnsupportedOperator { operator })) => {
                assert_eq!(operator, op)
            }
            other => panic!("{op}: {other:?}"),
        }
        let msg = parse_fetchxml(&xml, t).unwrap_err().to_string();
        assert!(msg.contains(op), "{msg}");
    }
    let bad = [
        "<filter><condition attribute=\"nope\" operator=\"eq\" value=\"1\"/></filter>",
        "<filter><condition attribute=\"msdyn_priority\" operator=\"eq\" value=\"x\"/></filter>",
        "<filter type=\"xor\"/>",
        "<fetch><entity name=\"msdyn_workorder\"><link-entity name=\"account\"/></entity></fetch>",
        "<fetch><entity name=\"account\"><filter/></entity></fetch>",
        "<filter><condition attribute=\"msdyn_priority\" operator=\"eq\" value=\"1\"></filter>",
        "<filter><condition entityname=\"a\" attribute=\"msdyn_priority\" operator=\"eq\" value=\"1\"/></filter>",
        "not xml",
    ];
    for xml in bad {
        assert!(parse_fetchxml(xml, t).is_err(), "{xml}");
    }
}

#[test]
fn bad_records_are_refused() {
    let schema = example_schema();
    let bad = [
        "{",
        "{}",
        r#"{"mobileofflineprofile": {"name": "x"}}"#,
        r#"{"mobileofflineprofile": {"mobileofflineprofileid": "6a9f3f2e-1c1e-4f7a-9c43-5d5f0a0b0c01", "name": "x"},
            "mobileofflineprofileitems": [{"selectedentitytypecode": "account", "recorddistributioncriteria": 7}]}"#,
        r#"{"mobileofflineprofile": {"mobileofflineprofileid": "6a9f3f2e-1c1e-4f7a-9c43-5d5f0a0b0c01", "name": "x"},
            "mobileofflineprofileitems": [{"selectedentitytypecode": "systemaudit", "recorddistributioncriteria": 1}]}"#,
        r#"{"mobileofflineprofile": {"mobileofflineprofileid": "6a9f3f2e-1c1e-4f7a-9c43-5d5f0a0b0c01", "name": "x"},
            "mobileofflineprofileitems": [{"selectedentitytypecode": "account", "recorddistributioncriteria": 1, "syncintervalinminutes": 2}]}"#,
        r#"{"mobileofflineprofile": {"mobileofflineprofileid": "6a9f3f2e-1c1e-4f7a-9c43-5d5f0a0b0c01", "name": "x"},
            "mobileofflineprofileitemassociations": [{"_mobileofflineprofileitemid_value": "6a9f3f2e-1c1e-4f7a-9c43-5d5f0a0b0c01", "relationshipname": "r"}]}"#,
    ];
    for text in bad {
        assert!(import_records(text, &schema).is_err(), "{text}");
    }
}
