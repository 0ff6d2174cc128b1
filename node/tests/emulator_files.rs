//! File and image columns, and data surviving a restart, against the shapes in
//! `file-column-data.md` and `image-column-data.md` (MicrosoftDocs/powerapps-docs,
//! `powerapps-docs/developer/data-platform/`). Real HTTP on 127.0.0.1.

// Test helpers outside #[test] functions may unwrap too: a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod emulator_support;

use emulator_support::*;
use reqwest::Method;
use serde_json::json;

fn sample(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

// file-column-data.md, "Upload the file in chunks using Web API": the first PATCH with
// `x-ms-transfer-mode: chunked` → 200 with `Location: ...?sessiontoken=...` and
// `x-ms-chunk-size`; each chunk with `Content-Range: bytes a-b/total` → 206, the last → 204.
// "Download the file in chunks": `Range: bytes=0-...` → 206 with `x-ms-file-size`,
// `x-ms-file-name`.
#[tokio::test]
async fn chunked_upload_and_ranged_download() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emulator::start(dir.path(), &[]);
    let id = emu
        .create("accounts", ADMIN, json!({"name": "With contract"}))
        .await;
    let init = emu
        .send(
            Method::PATCH,
            &format!("accounts({id})/contract?x-ms-file-name=25mb.pdf"),
            ADMIN,
            &[("x-ms-transfer-mode", "chunked")],
            None,
        )
        .await;
    assert_eq!(init.status, 200);
    assert_eq!(init.header("x-ms-chunk-size").as_deref(), Some("4194304"));
    assert_eq!(init.header("Accept-Ranges").as_deref(), Some("bytes"));
    let location = init.header("Location").unwrap();
    assert!(
        location.starts_with(&format!(
            "{}accounts({id})/contract?sessiontoken=",
            emu.base
        )),
        "{location}"
    );

    let data = sample(700_000);
    let chunk = 256 * 1024;
    let total = data.len();
    let mut offset = 0;
    while offset < total {
        let end = (offset + chunk).min(total) - 1;
        let range = format!("bytes {offset}-{end}/{total}");
        let r = emu
            .send(
                Method::PATCH,
                &location,
                ADMIN,
                &[
                    ("x-ms-file-name", "25mb.pdf"),
                    ("Content-Type", "application/octet-stream"),
                    ("Content-Range", &range),
                ],
                Some(data[offset..=end].to_vec()),
            )
            .await;
        let expected = if end + 1 == total { 204 } else { 206 };
        assert_eq!(r.status, expected, "{range}: {}", r.text());
        offset = end + 1;
    }

    let full = emu
        .get(&format!("accounts({id})/contract/$value"), ADMIN, &[])
        .await;
    assert_eq!(full.status, 200);
    assert_eq!(full.header("x-ms-file-size").as_deref(), Some("700000"));
    assert_eq!(full.header("x-ms-file-name").as_deref(), Some("25mb.pdf"));
    assert_eq!(full.header("mimetype").as_deref(), Some("application/pdf"));
    assert!(full.body == data, "downloaded bytes differ");

    let part = emu
        .get(
            &format!("accounts({id})/contract/$value"),
            ADMIN,
            &[("Range", "bytes=0-4095")],
        )
        .await;
    assert_eq!(part.status, 206);
    assert_eq!(part.body, data[..4096]);
    assert_eq!(part.header("x-ms-file-size").as_deref(), Some("700000"));
    assert_eq!(
        part.header("Content-Range").as_deref(),
        Some("bytes 0-4095/700000")
    );
    let tail = emu
        .get(
            &format!("accounts({id})/contract/$value"),
            ADMIN,
            &[("Range", "bytes=699000-")],
        )
        .await;
    assert_eq!(tail.status, 206);
    assert_eq!(tail.body, data[699_000..]);

    // The row reports the file (file-column-data.md, "Behavior when retrieving").
    let row = emu
        .get(
            &format!("accounts({id})?$select=contract,contract_name"),
            ADMIN,
            &[],
        )
        .await
        .json();
    assert_eq!(row["contract_name"], "25mb.pdf");
    assert!(row["contract"].as_str().unwrap().len() == 36);

    // A chunk out of order is refused; an unknown session is 404.
    let init = emu
        .send(
            Method::PATCH,
            &format!("accounts({id})/contract?x-ms-file-name=b.txt"),
            ADMIN,
            &[("x-ms-transfer-mode", "chunked")],
            None,
        )
        .await;
    let loc = init.header("Location").unwrap();
    let r = emu
        .send(
            Method::PATCH,
            &loc,
            ADMIN,
            &[("Content-Range", "bytes 10-19/20")],
            Some(vec![0; 10]),
        )
        .await;
    assert_eq!(r.status, 400);
    let r = emu
        .send(
            Method::PATCH,
            &format!("accounts({id})/contract?sessiontoken=nope"),
            ADMIN,
            &[("Content-Range", "bytes 0-9/20")],
            Some(vec![0; 10]),
        )
        .await;
    assert_eq!(r.status, 404);

    // Single-request upload (`x-ms-file-name` header, raw bytes) → 204; DELETE → 204.
    let r = emu
        .send(
            Method::PATCH,
            &format!("accounts({id})/contract"),
            ADMIN,
            &[
                ("x-ms-file-name", "4094kb.txt"),
                ("Content-Type", "application/octet-stream"),
            ],
            Some(b"hello".to_vec()),
        )
        .await;
    assert_eq!(r.status, 204);
    let small = emu
        .get(&format!("accounts({id})/contract/$value"), ADMIN, &[])
        .await;
    assert_eq!(small.body, b"hello");
    assert_eq!(small.header("mimetype").as_deref(), Some("text/plain"));
    let r = emu
        .send(
            Method::DELETE,
            &format!("accounts({id})/contract"),
            ADMIN,
            &[],
            None,
        )
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        emu.get(&format!("accounts({id})/contract/$value"), ADMIN, &[])
            .await
            .status,
        404
    );

    // Images: `$value` is the thumbnail, `?size=full` the full image (image-column-data.md).
    // The emulator does not resize: its "thumbnail" is the full image, marked by a header.
    let png = sample(3000);
    let r = emu
        .send(
            Method::PATCH,
            &format!("accounts({id})/logo"),
            ADMIN,
            &[("x-ms-file-name", "logo.png")],
            Some(png.clone()),
        )
        .await;
    assert_eq!(r.status, 204);
    let thumb = emu
        .get(&format!("accounts({id})/logo/$value"), ADMIN, &[])
        .await;
    assert_eq!(
        thumb.header("x-fieldsync-emulator-thumbnail").as_deref(),
        Some("full-image")
    );
    let full = emu
        .get(&format!("accounts({id})/logo/$value?size=full"), ADMIN, &[])
        .await;
    assert_eq!(full.status, 200);
    assert!(full.header("x-fieldsync-emulator-thumbnail").is_none());
    assert_eq!(full.body, png);
    // No image stored: 204.
    let other = emu
        .create("accounts", ADMIN, json!({"name": "No logo"}))
        .await;
    let none = emu
        .get(
            &format!("accounts({other})/logo/$value?size=full"),
            ADMIN,
            &[],
        )
        .await;
    assert_eq!(none.status, 204);
}

// The emulator's data lives in --data: a killed emulator restarted on the same directory
// still serves the rows, the files and the delta links it handed out.
#[tokio::test]
async fn data_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emulator::start(dir.path(), &[]);
    let id = emu
        .create(
            "accounts",
            ADMIN,
            json!({"name": "Durable", "revenue": 12.5}),
        )
        .await;
    let r = emu
        .send(
            Method::PATCH,
            &format!("accounts({id})/contract"),
            ADMIN,
            &[("x-ms-file-name", "d.bin")],
            Some(sample(5000)),
        )
        .await;
    assert_eq!(r.status, 204);
    let first = emu
        .get(
            "accounts?$select=name",
            ADMIN,
            &[("Prefer", "odata.track-changes")],
        )
        .await
        .json();
    let delta_link = first["@odata.deltaLink"].as_str().unwrap().to_string();
    let etag_before =
        emu.get(&format!("accounts({id})"), ADMIN, &[]).await.json()["@odata.etag"].clone();
    let old_base = emu.base.clone();
    emu.kill();

    // Links are absolute; the restarted emulator listens on another ephemeral port.
    let emu = Emulator::start(dir.path(), &[]);
    let delta_link = delta_link.replace(&old_base, &emu.base);
    let row = emu.get(&format!("accounts({id})"), ADMIN, &[]).await.json();
    assert_eq!(row["name"], "Durable");
    assert_eq!(row["revenue"], 12.5);
    assert_eq!(row["@odata.etag"], etag_before);
    let file = emu
        .get(&format!("accounts({id})/contract/$value"), ADMIN, &[])
        .await;
    assert_eq!(file.body, sample(5000));
    // Seed rows are not duplicated by a second start with --example.
    let all = emu.get("accounts?$select=name", ADMIN, &[]).await.json();
    assert_eq!(all["value"].as_array().unwrap().len(), 4);
    // The old delta link still works and sees a change made after the restart.
    let r = emu
        .json(
            Method::PATCH,
            &format!("accounts({id})"),
            ADMIN,
            &[("If-Match", "*")],
            json!({"name": "Durable 2"}),
        )
        .await;
    assert_eq!(r.status, 204);
    let d = emu.get(&delta_link, ADMIN, &[]).await.json();
    let value = d["value"].as_array().unwrap();
    assert_eq!(value.len(), 1, "{d}");
    assert_eq!(value[0]["name"], "Durable 2");
    let v_after: u64 = value[0]["@odata.etag"]
        .as_str()
        .unwrap()
        .trim_start_matches("W/\"")
        .trim_end_matches('"')
        .parse()
        .unwrap();
    let v_before: u64 = etag_before
        .as_str()
        .unwrap()
        .trim_start_matches("W/\"")
        .trim_end_matches('"')
        .parse()
        .unwrap();
    assert!(v_after > v_before, "versions keep growing across restarts");
}
