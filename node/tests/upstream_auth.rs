//! Entra ID client credentials against a local fake token endpoint, then the emulator.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod upstream_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::routing::post;
use fieldsync_node::upstream::{AuthConfig, SecretSource, UpstreamConfig, UpstreamError};
use upstream_support::{bridge, config, Emulator, EmulatorAndHub, ADMIN_TOKEN};

/// Serves `/<tenant>/oauth2/v2.0/token`: answers the emulator's admin token when the form
/// carries the expected client id and secret; records every form it got.
async fn fake_token_endpoint(forms: Arc<Mutex<Vec<String>>>) -> String {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/tenant-1/oauth2/v2.0/token",
        post(move |body: String| {
            let forms = forms.clone();
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::Relaxed);
                forms.lock().unwrap().push(body.clone());
                let ok = body.contains("grant_type=client_credentials")
                    && body.contains("client_id=app-1")
                    && body.contains("client_secret=s3cret%21");
                if ok {
                    (
                        axum::http::StatusCode::OK,
                        format!(
                            r#"{{"token_type":"Bearer","expires_in":3599,"access_token":"{ADMIN_TOKEN}"}}"#
                        ),
                    )
                } else {
                    (
                        axum::http::StatusCode::UNAUTHORIZED,
                        r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided."}"#.to_string(),
                    )
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/tenant-1/oauth2/v2.0/token")
}

/// The bridge's config for the emulator, authenticated as app `app-1` of `tenant-1` with
/// `secret` (in a file) at the token `endpoint`.
fn entra_config(
    emu: &Emulator,
    dir: &std::path::Path,
    secret: &str,
    endpoint: String,
) -> UpstreamConfig {
    let secret_file = dir.join("secret");
    std::fs::write(&secret_file, secret).unwrap();
    let mut cfg = config(emu, dir);
    cfg.auth = AuthConfig::Entra {
        tenant_id: "tenant-1".into(),
        client_id: "app-1".into(),
        secret: SecretSource::File(secret_file),
        token_endpoint: Some(endpoint),
        scope: None,
    };
    cfg
}

#[tokio::test]
async fn client_credentials_token_is_fetched_once_and_used() {
    let EmulatorAndHub { dir, emu, replica } = EmulatorAndHub::start(&[]);
    let forms = Arc::new(Mutex::new(Vec::new()));
    let endpoint = fake_token_endpoint(forms.clone()).await;
    let cfg = entra_config(&emu, dir.path(), "s3cret!\n", endpoint);
    let b = bridge(cfg.clone(), &replica);
    b.pull_table("account").await.unwrap();
    b.pull_table("contact").await.unwrap();
    let forms = forms.lock().unwrap().clone();
    assert_eq!(
        forms.len(),
        1,
        "the token is cached until shortly before it expires"
    );
    let scope = format!("scope={}", "http%3A%2F%2F127.0.0.1");
    assert!(
        forms[0].contains(&scope),
        "default scope <url>/.default: {}",
        forms[0]
    );
    assert!(forms[0].contains("%2F.default"));
    assert!(
        replica
            .lock()
            .unwrap()
            .store()
            .scan("account")
            .unwrap()
            .count()
            > 0
    );
    // The config (what hub.toml holds and what gets logged) names the secret, never holds it.
    assert!(!format!("{cfg:?}").contains("s3cret"));
    assert!(!format!("{b:?}").contains("s3cret"));
}

#[tokio::test]
async fn a_wrong_secret_is_an_auth_error_naming_no_secret() {
    let EmulatorAndHub { dir, emu, replica } = EmulatorAndHub::start(&[]);
    let endpoint = fake_token_endpoint(Arc::new(Mutex::new(Vec::new()))).await;
    let cfg = entra_config(&emu, dir.path(), "wrong-secret", endpoint);
    let b = bridge(cfg, &replica);
    let err = b.pull_table("account").await.unwrap_err();
    assert!(matches!(err, UpstreamError::Auth(_)), "{err}");
    assert!(err.to_string().contains("AADSTS7000215"));
    assert!(!err.to_string().contains("wrong-secret"));
    // A missing environment variable is a clear error too.
    let mut cfg2 = config(&emu, dir.path());
    cfg2.auth = AuthConfig::Bearer {
        token: SecretSource::Env("FIELDSYNC_TEST_UNSET_TOKEN_VAR".into()),
    };
    let b2 = bridge(cfg2, &replica);
    let err = b2.pull_table("account").await.unwrap_err();
    assert!(err
        .to_string()
        .contains("FIELDSYNC_TEST_UNSET_TOKEN_VAR is not set"));
}
