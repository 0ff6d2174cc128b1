//! `fieldsync profile ...`: offline profiles over files — validate, show, generate from an
//! app, estimate download sizes, and convert to and from Dataverse's profile records.
//!
//! Rows for `estimate` come from a device or hub store directory (`--data`) or from a JSON
//! lines file (`--rows`): one object per line with `table`, the row id as `id` (or
//! `<table>id`), and columns in the store's JSON forms (owners as `user:<uuid>` or
//! `team:<uuid>`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use fieldsync_replication::app::App;
use fieldsync_replication::{
    apps_from_toml, estimate, export_records, generate_profile, import_records, Environment,
    Profile, RowView,
};
use fieldsync_store::{RowId, Schema, Store, StoreOptions, Value};
use uuid::Uuid;

/// Where the schema comes from when no `--schema` is given.
const DEFAULT_SCHEMA_HINT: &str = "pass --schema FILE (e.g. examples/field-service/schema.toml)";

#[derive(Debug, Subcommand)]
pub enum ProfileCommand {
    /// Check a profile against the schema; with --apps, check every offline app publishes;
    /// with --env, check the environment loads.
    Validate {
        /// Schema TOML file.
        #[arg(long)]
        schema: PathBuf,
        /// Profile TOML file.
        #[arg(long)]
        profile: PathBuf,
        /// Apps TOML file: each offline app linked to this profile must publish with it.
        #[arg(long)]
        apps: Option<PathBuf>,
        /// Environment TOML file.
        #[arg(long)]
        env: Option<PathBuf>,
    },
    /// Print a profile: readable summary, or `--format toml|records`.
    Show {
        /// Schema TOML file.
        #[arg(long)]
        schema: PathBuf,
        /// Profile TOML file.
        #[arg(long)]
        profile: PathBuf,
        /// `summary` (default), `toml` or `records` (Dataverse JSON).
        #[arg(long, default_value = "summary")]
        format: String,
    },
    /// Generate a default profile from an app, like "+ New profile with current app data".
    Generate {
        /// Schema TOML file.
        #[arg(long)]
        schema: PathBuf,
        /// Apps TOML file.
        #[arg(long)]
        apps: PathBuf,
        /// The app's name (default: the only app, or the first offline one).
        #[arg(long)]
        app: Option<String>,
        /// Write the profile TOML here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Rows and bytes per table each user's device would download, and the largest ones.
    Estimate {
        /// Schema TOML file (default: the store's own schema with --data).
        #[arg(long)]
        schema: Option<PathBuf>,
        /// Environment TOML file.
        #[arg(long)]
        env: PathBuf,
        /// Profile TOML file.
        #[arg(long)]
        profile: PathBuf,
        /// A store directory holding the rows.
        #[arg(long, conflicts_with = "rows")]
        data: Option<PathBuf>,
        /// A JSON lines file holding the rows.
        #[arg(long)]
        rows: Option<PathBuf>,
        /// Only this user (name or id); default every user.
        #[arg(long)]
        user: Option<String>,
        /// How many users and tables to list.
        #[arg(long, default_value_t = 5)]
        top: usize,
        /// The instant for time-relative filters (RFC 3339; default now).
        #[arg(long)]
        now: Option<String>,
    },
    /// Read Dataverse profile records (JSON) and print the profile as TOML.
    Import {
        /// Schema TOML file.
        #[arg(long)]
        schema: PathBuf,
        /// The records: {"mobileofflineprofile": …, "mobileofflineprofileitems": […], …}.
        #[arg(long)]
        records: PathBuf,
        /// Write the profile TOML here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print a profile as Dataverse profile records (JSON).
    Export {
        /// Schema TOML file.
        #[arg(long)]
        schema: PathBuf,
        /// Profile TOML file.
        #[arg(long)]
        profile: PathBuf,
        /// Write the JSON here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Run one `profile` subcommand.
pub fn run(cmd: ProfileCommand) -> Result<()> {
    match cmd {
        ProfileCommand::Validate {
            schema,
            profile,
            apps,
            env,
        } => validate(&schema, &profile, apps.as_deref(), env.as_deref()),
        ProfileCommand::Show {
            schema,
            profile,
            format,
        } => show(&schema, &profile, &format),
        ProfileCommand::Generate {
            schema,
            apps,
            app,
            out,
        } => generate(&schema, &apps, app.as_deref(), out.as_deref()),
        ProfileCommand::Estimate {
            schema,
            env,
            profile,
            data,
            rows,
            user,
            top,
            now,
        } => estimate_cmd(EstimateArgs {
            schema: schema.as_deref(),
            env: &env,
            profile: &profile,
            data: data.as_deref(),
            rows: rows.as_deref(),
            user: user.as_deref(),
            top,
            now: now.as_deref(),
        }),
        ProfileCommand::Import {
            schema,
            records,
            out,
        } => import(&schema, &records, out.as_deref()),
        ProfileCommand::Export {
            schema,
            profile,
            out,
        } => export(&schema, &profile, out.as_deref()),
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn load_schema(path: &Path) -> Result<Schema> {
    Schema::from_toml(&read(path)?).with_context(|| format!("in {}", path.display()))
}

fn load_profile(path: &Path, schema: &Schema) -> Result<Profile> {
    Profile::from_toml(&read(path)?, schema).with_context(|| format!("in {}", path.display()))
}

fn load_env(path: &Path) -> Result<Environment> {
    Environment::from_toml(&read(path)?).with_context(|| format!("in {}", path.display()))
}

fn load_apps(path: &Path, schema: &Schema) -> Result<Vec<App>> {
    apps_from_toml(&read(path)?, schema).with_context(|| format!("in {}", path.display()))
}

fn write_out(out: Option<&Path>, text: &str) -> Result<()> {
    match out {
        Some(p) => {
            std::fs::write(p, text).with_context(|| format!("cannot write {}", p.display()))?;
            eprintln!("wrote {}", p.display());
            Ok(())
        }
        None => {
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
            }
            Ok(())
        }
    }
}

fn validate(schema: &Path, profile: &Path, apps: Option<&Path>, env: Option<&Path>) -> Result<()> {
    let schema = load_schema(schema)?;
    let p = load_profile(profile, &schema)?;
    println!(
        "profile `{}`: {} tables, valid for the schema",
        p.name,
        p.items.len()
    );
    if let Some(env) = env {
        let e = load_env(env)?;
        println!(
            "environment: {} business units, {} users, {} teams, {} roles",
            e.business_units().count(),
            e.users().count(),
            e.teams().count(),
            e.roles().count()
        );
    }
    if let Some(apps) = apps {
        let apps = load_apps(apps, &schema)?;
        let mut failures = Vec::new();
        for a in &apps {
            if !a.offline {
                println!("app `{}`: not used offline", a.name);
                continue;
            }
            if a.profile.as_deref().is_some_and(|n| n != p.name) {
                println!(
                    "app `{}`: linked to another profile ({})",
                    a.name,
                    a.profile.as_deref().unwrap_or("")
                );
                continue;
            }
            match a.check_publish(&schema, std::slice::from_ref(&p)) {
                Ok(()) => println!("app `{}`: publishes offline with this profile", a.name),
                Err(e) => {
                    println!("{e}");
                    failures.push(a.name.clone());
                }
            }
        }
        if !failures.is_empty() {
            bail!(
                "{} app(s) cannot be published: {}",
                failures.len(),
                failures.join(", ")
            );
        }
    }
    Ok(())
}

fn show(schema: &Path, profile: &Path, format: &str) -> Result<()> {
    let schema = load_schema(schema)?;
    let p = load_profile(profile, &schema)?;
    match format {
        "summary" => write_out(None, &p.to_string()),
        "toml" => write_out(None, &p.to_toml()),
        "records" => write_out(None, &serde_json::to_string_pretty(&export_records(&p))?),
        other => bail!("unknown format `{other}` (expected summary, toml or records)"),
    }
}

fn generate(schema: &Path, apps: &Path, app: Option<&str>, out: Option<&Path>) -> Result<()> {
    let schema = load_schema(schema)?;
    let apps = load_apps(apps, &schema)?;
    let a = match app {
        Some(name) => apps
            .iter()
            .find(|a| a.name == name)
            .ok_or_else(|| anyhow!("no app named `{name}`"))?,
        None => apps
            .iter()
            .find(|a| a.offline)
            .or_else(|| apps.first())
            .ok_or_else(|| anyhow!("the apps file has no apps"))?,
    };
    let (p, report) = generate_profile(a, &schema);
    for s in &report.not_set_up {
        eprintln!("not set up: {s}");
    }
    for s in &report.review {
        eprintln!("review: {s}");
    }
    let header = format!(
        "# Generated by `fieldsync profile generate` from app `{}`.\n# Review the filters: organization rows download everything the user owns.\n",
        a.name
    );
    write_out(out, &format!("{header}{}", p.to_toml()))
}

struct EstimateArgs<'a> {
    schema: Option<&'a Path>,
    env: &'a Path,
    profile: &'a Path,
    data: Option<&'a Path>,
    rows: Option<&'a Path>,
    user: Option<&'a str>,
    top: usize,
    now: Option<&'a str>,
}

type OwnedRow = (String, RowId, BTreeMap<String, Value>);

fn rows_from_store(dir: &Path, tables: &[String]) -> Result<(Schema, Vec<OwnedRow>)> {
    let store = Store::open(dir, StoreOptions::default())
        .with_context(|| format!("cannot open the store in {}", dir.display()))?;
    let schema = store.schema().clone();
    let mut out = Vec::new();
    for t in tables {
        if schema.table(t).is_err() {
            continue;
        }
        for row in store.scan(t)? {
            let row = row?;
            out.push((row.table, row.id, row.values));
        }
    }
    Ok((schema, out))
}

fn rows_from_jsonl(path: &Path, schema: &Schema) -> Result<Vec<OwnedRow>> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in BufReader::new(f).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), n + 1);
        let obj: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&line).with_context(at)?;
        let table_name = obj
            .get("table")
            .and_then(|v| v.as_str())
            .ok_or_else(|| anyhow!("{}: no \"table\"", at()))?;
        let table = schema.table(table_name).with_context(at)?;
        let pk = table.primary_id_column();
        let id = obj
            .get("id")
            .or_else(|| obj.get(&pk))
            .and_then(|v| v.as_str())
            .map(Uuid::parse_str)
            .transpose()
            .with_context(at)?
            .unwrap_or_else(Uuid::new_v4);
        let mut values = BTreeMap::new();
        for (k, v) in &obj {
            if k == "table" || k == "id" || *k == pk {
                continue;
            }
            let col = table
                .column(k)
                .ok_or_else(|| anyhow!("{}: no column `{k}` in `{table_name}`", at()))?;
            let value = Value::from_json(col.ty, v)
                .map_err(|e| e.in_column(table, k))
                .with_context(at)?;
            if !value.is_null() {
                values.insert(k.clone(), value);
            }
        }
        out.push((table_name.to_string(), id, values));
    }
    Ok(out)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn estimate_cmd(a: EstimateArgs<'_>) -> Result<()> {
    let env = load_env(a.env)?;
    let (schema, rows) = match (a.data, a.rows) {
        (Some(dir), _) => {
            let probe = match a.schema {
                Some(s) => Some(load_schema(s)?),
                None => None,
            };
            let tables: Vec<String> = match &probe {
                Some(s) => s.tables().map(|t| t.name.clone()).collect(),
                None => Store::open(dir, StoreOptions::default())
                    .with_context(|| format!("cannot open the store in {}", dir.display()))?
                    .schema()
                    .tables()
                    .map(|t| t.name.clone())
                    .collect(),
            };
            let (store_schema, rows) = rows_from_store(dir, &tables)?;
            (probe.unwrap_or(store_schema), rows)
        }
        (None, Some(file)) => {
            let schema = load_schema(
                a.schema
                    .ok_or_else(|| anyhow!("--rows needs --schema; {DEFAULT_SCHEMA_HINT}"))?,
            )?;
            let rows = rows_from_jsonl(file, &schema)?;
            (schema, rows)
        }
        (None, None) => bail!("estimate needs rows: --data STORE_DIR or --rows FILE.jsonl"),
    };
    let profile = load_profile(a.profile, &schema)?;
    let now = match a.now {
        Some(t) => fieldsync_store::parse_datetime(t)
            .ok_or_else(|| anyhow!("--now `{t}` is not an RFC 3339 UTC instant"))?,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64),
    };
    let users: Vec<Uuid> = match a.user {
        Some(u) => vec![env
            .user_by_name(u)
            .map(|x| x.id)
            .or_else(|| Uuid::parse_str(u).ok().filter(|id| env.user(*id).is_some()))
            .ok_or_else(|| anyhow!("no user `{u}` in the environment"))?],
        None => Vec::new(),
    };
    let views: Vec<RowView<'_>> = rows
        .iter()
        .map(|(t, id, v)| RowView {
            table: t,
            id: *id,
            values: v,
        })
        .collect();
    let est = estimate(&schema, &env, &profile, &users, now, &views)?;
    println!(
        "profile `{}` over {} rows, {} user(s)",
        profile.name,
        rows.len(),
        est.users.len()
    );
    let total: u64 = est.users.iter().map(|u| u.total.total_bytes()).sum();
    let total_rows: u64 = est.users.iter().map(|u| u.total.rows).sum();
    if let Some(avg) = total.checked_div(est.users.len() as u64) {
        println!(
            "all devices: {total_rows} rows, {} (average {} per device)",
            human(total),
            human(avg)
        );
    }
    println!("\nper table, all devices (largest first):");
    println!(
        "  {:<28} {:>10} {:>12} {:>12}",
        "table", "rows", "data", "files+images"
    );
    for (t, _) in est.largest_tables.iter().take(a.top.max(1) * 4) {
        let e = est.tables.get(t).copied().unwrap_or_default();
        println!(
            "  {:<28} {:>10} {:>12} {:>12}",
            t,
            e.rows,
            human(e.bytes),
            human(e.blob_bytes)
        );
    }
    println!(
        "\nlargest devices{}:",
        if est.users.len() > a.top {
            format!(" (top {} of {})", a.top, est.users.len())
        } else {
            String::new()
        }
    );
    for u in est.users.iter().take(a.top) {
        let biggest = u
            .tables
            .iter()
            .max_by_key(|(_, e)| e.total_bytes())
            .map(|(t, e)| {
                format!(
                    "; largest: {t} ({} rows, {})",
                    e.rows,
                    human(e.total_bytes())
                )
            })
            .unwrap_or_default();
        println!(
            "  {:<28} {:>8} rows {:>12}{biggest}",
            u.name,
            u.total.rows,
            human(u.total.total_bytes())
        );
    }
    Ok(())
}

fn import(schema: &Path, records: &Path, out: Option<&Path>) -> Result<()> {
    let schema = load_schema(schema)?;
    let p = import_records(&read(records)?, &schema)
        .with_context(|| format!("in {}", records.display()))?;
    write_out(out, &p.to_toml())
}

fn export(schema: &Path, profile: &Path, out: Option<&Path>) -> Result<()> {
    let schema = load_schema(schema)?;
    let p = load_profile(profile, &schema)?;
    write_out(out, &serde_json::to_string_pretty(&export_records(&p))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(f: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/field-service")
            .join(f)
    }

    #[test]
    fn commands_run_on_the_example() {
        let schema = example("schema.toml");
        run(ProfileCommand::Validate {
            schema: schema.clone(),
            profile: example("profile.toml"),
            apps: Some(example("apps.toml")),
            env: Some(example("environment.toml")),
        })
        .unwrap();
        for format in ["summary", "toml", "records"] {
            run(ProfileCommand::Show {
                schema: schema.clone(),
                profile: example("profile.toml"),
                format: format.into(),
            })
            .unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let generated = dir.path().join("generated.toml");
        run(ProfileCommand::Generate {
            schema: schema.clone(),
            apps: example("apps.toml"),
            app: None,
            out: Some(generated.clone()),
        })
        .unwrap();
        run(ProfileCommand::Validate {
            schema: schema.clone(),
            profile: generated,
            apps: None,
            env: None,
        })
        .unwrap();
        let records = dir.path().join("records.json");
        run(ProfileCommand::Export {
            schema: schema.clone(),
            profile: example("profile.toml"),
            out: Some(records.clone()),
        })
        .unwrap();
        let back = dir.path().join("back.toml");
        run(ProfileCommand::Import {
            schema: schema.clone(),
            records,
            out: Some(back.clone()),
        })
        .unwrap();
        let s = Schema::from_toml(&std::fs::read_to_string(&schema).unwrap()).unwrap();
        assert_eq!(
            load_profile(&back, &s).unwrap(),
            load_profile(&example("profile.toml"), &s).unwrap()
        );
        run(ProfileCommand::Estimate {
            schema: Some(schema.clone()),
            env: example("environment.toml"),
            profile: example("profile.toml"),
            data: None,
            rows: Some(example("rows.jsonl")),
            user: None,
            top: 3,
            now: Some("2026-11-26T08:00:00Z".into()),
        })
        .unwrap();
        // The same rows from a store directory.
        let store_dir = dir.path().join("store");
        let store = Store::create(&store_dir, s.clone(), StoreOptions::default()).unwrap();
        let rows = rows_from_jsonl(&example("rows.jsonl"), &s).unwrap();
        let mut tx = store.begin();
        for (t, id, v) in &rows {
            let vals: Vec<(&str, Value)> = v.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            tx.insert_with_id(t, *id, &vals).unwrap();
        }
        tx.commit().unwrap();
        drop(store);
        run(ProfileCommand::Estimate {
            schema: None,
            env: example("environment.toml"),
            profile: example("profile.toml"),
            data: Some(store_dir),
            rows: None,
            user: Some("ana@contoso.com".into()),
            top: 3,
            now: Some("2026-11-26T08:00:00Z".into()),
        })
        .unwrap();
    }
}
