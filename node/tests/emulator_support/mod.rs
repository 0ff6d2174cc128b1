//! Starts `fieldsync dataverse-emulator` as a child process on 127.0.0.1 with an ephemeral port
//! and talks to it over real HTTP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use reqwest::header::HeaderMap;
use reqwest::{Client, Method, StatusCode};
use serde_json::Value;

/// Tokens of the field-service example's users.
pub const ADMIN: &str = "admin-token";
pub const ANA: &str = "ana-token";
pub const BEN: &str = "ben-token";
pub const MARIA: &str = "maria-token";

pub struct Emulator {
    child: Child,
    /// `http://127.0.0.1:<port>/api/data/v9.2/`
    pub base: String,
    pub client: Client,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

impl Emulator {
    /// Start the emulator on `dir` with the field-service example and extra flags.
    pub fn start(dir: &Path, extra: &[&str]) -> Emulator {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fieldsync"))
            .args(["dataverse-emulator", "--listen", "127.0.0.1:0", "--data"])
            .arg(dir)
            .args(["--example", "field-service"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the emulator");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the address line");
        let base = line
            .trim()
            .rsplit(' ')
            .next()
            .expect("an address")
            .to_string();
        assert!(
            base.starts_with("http://127.0.0.1:"),
            "unexpected first line {line:?}"
        );
        Emulator {
            child,
            base,
            client: {
                // reqwest has TLS without a built-in crypto provider (the bridge's HTTPS).
                fieldsync_node::upstream::client::install_crypto_provider();
                Client::new()
            },
        }
    }

    /// Kill the process (SIGKILL: nothing gets a chance to flush) and wait for it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn url(&self, path: &str) -> String {
        if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{}", self.base, path)
        }
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Reply {
        let mut req = self
            .client
            .request(method, self.url(path))
            .header("Authorization", format!("Bearer {token}"))
            .header("Accept", "application/json")
            .header("OData-MaxVersion", "4.0")
            .header("OData-Version", "4.0");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().await.expect("HTTP request");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.expect("body").to_vec();
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str, token: &str, headers: &[(&str, &str)]) -> Reply {
        self.send(Method::GET, path, token, headers, None).await
    }

    pub async fn json(
        &self,
        method: Method,
        path: &str,
        token: &str,
        headers: &[(&str, &str)],
        body: Value,
    ) -> Reply {
        let mut h = vec![("Content-Type", "application/json")];
        h.extend_from_slice(headers);
        self.send(method, path, token, &h, Some(body.to_string().into_bytes()))
            .await
    }

    /// Create a row; returns its id (from `OData-EntityId`).
    pub async fn create(&self, set: &str, token: &str, body: Value) -> String {
        let r = self.json(Method::POST, set, token, &[], body).await;
        assert_eq!(r.status, 204, "create failed: {}", r.text());
        let url = r.header("OData-EntityId").expect("OData-EntityId");
        url.rsplit('(')
            .next()
            .unwrap()
            .trim_end_matches(')')
            .to_string()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Follow `@odata.nextLink`s; returns every page.
pub async fn all_pages(emu: &Emulator, first: &str, token: &str, prefer: &str) -> Vec<Value> {
    let mut pages = Vec::new();
    let mut next = Some(first.to_string());
    while let Some(url) = next {
        let r = emu.get(&url, token, &[("Prefer", prefer)]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let page = r.json();
        next = page["@odata.nextLink"].as_str().map(str::to_string);
        pages.push(page);
        assert!(pages.len() < 1000, "paging does not end");
    }
    pages
}
