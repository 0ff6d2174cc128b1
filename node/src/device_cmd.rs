//! `fieldsync device ...`: the device's local store from the command line.
//!
//! Every command that writes commits durably before it prints: a printed id is a promise.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use fieldsync_replication::proto::messages::BLOB_UPLOAD_MAX;
use fieldsync_store::{
    BulkRow, ColumnType, Durability, ImageFormat, Row, RowId, Schema, Store, StoreOptions, Table,
    Value, WriteError,
};
use uuid::Uuid;

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Create a device store: enrolled with a hub (`--credential`: schema and profile come
    /// from the hub), or standalone with a schema file.
    Init {
        /// The device's data directory (created; must not hold a store yet, unless enrolling
        /// it for a second app with the same offline profile).
        #[arg(long)]
        data: PathBuf,
        /// Schema TOML file (see examples/field-service/schema.toml), for a standalone store.
        #[arg(
            long,
            conflicts_with = "credential",
            required_unless_present = "credential"
        )]
        schema: Option<PathBuf>,
        /// Credential file written by `fieldsync hub enroll`.
        #[arg(long)]
        credential: Option<PathBuf>,
    },
    /// Sync with the hub: `--once` pushes, pulls every table to the end and exits; `--watch`
    /// stays connected in live mode and reconnects with backoff (until SIGINT/SIGTERM).
    Sync {
        #[arg(long)]
        data: PathBuf,
        #[arg(long, conflicts_with = "watch")]
        once: bool,
        #[arg(long)]
        watch: bool,
    },
    /// List sync errors (ops the hub rejected, rolled back), or retry or discard one.
    Errors {
        #[arg(long)]
        data: PathBuf,
        /// Re-apply the rejected op as a new local edit.
        #[arg(long, conflicts_with = "discard")]
        retry: Option<u64>,
        /// Forget the error; the edit stays rolled back.
        #[arg(long)]
        discard: Option<u64>,
    },
    /// Show or change the device's sync settings.
    Config {
        #[arg(long)]
        data: PathBuf,
        /// Sync only when a Wi-Fi link is up.
        #[arg(long)]
        wifi_only: Option<bool>,
    },
    /// Create a row, or update columns of an existing one; prints the row id.
    Put {
        #[arg(long)]
        data: PathBuf,
        /// Table logical name.
        table: String,
        /// Row id: updates that row if it exists, creates it with this id otherwise.
        #[arg(long)]
        id: Option<String>,
        /// Column values as COL=VALUE (`null` clears a column; a file or image column takes
        /// `@PATH`, the file to attach, uploaded with the next sync).
        #[arg(value_name = "COL=VALUE")]
        values: Vec<String>,
    },
    /// Write the content of a row's file or image column to a file.
    File {
        #[arg(long)]
        data: PathBuf,
        table: String,
        id: String,
        column: String,
        /// Where to write the content.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print one row.
    Get {
        #[arg(long)]
        data: PathBuf,
        table: String,
        id: String,
        /// Print the row as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print the rows of a table that match every --where, one per line.
    Query {
        #[arg(long)]
        data: PathBuf,
        table: String,
        /// COL=VALUE equality filters (indexed columns use their index).
        #[arg(long = "where", value_name = "COL=VALUE")]
        filters: Vec<String>,
        /// Print JSON lines (one object per row).
        #[arg(long)]
        json: bool,
    },
    /// Delete a row (a tombstone that replicates).
    Delete {
        #[arg(long)]
        data: PathBuf,
        table: String,
        id: String,
    },
    /// Bulk-load rows from a JSON lines file (one object per line, column → value).
    Import {
        #[arg(long)]
        data: PathBuf,
        table: String,
        file: PathBuf,
    },
    /// Print the event log.
    Log {
        #[arg(long)]
        data: PathBuf,
        /// Only entries after this sequence number.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Print the conflicting values of a row's columns.
    Conflicts {
        #[arg(long)]
        data: PathBuf,
        table: String,
        id: String,
    },
    /// Summarize the store: rows per table, log, acknowledgements, integrity.
    Status {
        #[arg(long)]
        data: PathBuf,
    },
}

pub fn run(cmd: DeviceCommand) -> Result<()> {
    match cmd {
        DeviceCommand::Init {
            data,
            schema,
            credential,
        } => match (schema, credential) {
            (_, Some(cred)) => crate::device_sync::init_with_credential(&data, &cred),
            (Some(schema), None) => init(&data, &schema),
            (None, None) => Err(anyhow!("give --schema or --credential")),
        },
        DeviceCommand::Sync { data, once, watch } => {
            let _ = once;
            crate::device_sync::sync(&data, watch)
        }
        DeviceCommand::Errors {
            data,
            retry,
            discard,
        } => crate::device_sync::errors(&data, retry, discard),
        DeviceCommand::Config { data, wifi_only } => crate::device_sync::config(&data, wifi_only),
        DeviceCommand::Put {
            data,
            table,
            id,
            values,
        } => put(&data, &table, id.as_deref(), &values),
        DeviceCommand::Get {
            data,
            table,
            id,
            json,
        } => get(&data, &table, &id, json),
        DeviceCommand::Query {
            data,
            table,
            filters,
            json,
        } => query(&data, &table, &filters, json),
        DeviceCommand::Delete { data, table, id } => delete(&data, &table, &id),
        DeviceCommand::File {
            data,
            table,
            id,
            column,
            out,
        } => file(&data, &table, &id, &column, &out),
        DeviceCommand::Import { data, table, file } => import(&data, &table, &file),
        DeviceCommand::Log { data, since, json } => log(&data, since, json),
        DeviceCommand::Conflicts { data, table, id } => conflicts(&data, &table, &id),
        DeviceCommand::Status { data } => status(&data),
    }
}

/// Open an existing device store, with a clear message when there is none.
pub fn open_store(data: &Path) -> Result<Store> {
    Store::open(data, StoreOptions::default())
        .with_context(|| format!("cannot open the device store in {}", data.display()))
}

fn init(data: &Path, schema_path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(schema_path)
        .with_context(|| format!("cannot read schema file {}", schema_path.display()))?;
    let schema = Schema::from_toml(&text)
        .with_context(|| format!("schema file {}", schema_path.display()))?;
    let tables = schema.tables().count();
    let store = Store::create(data, schema, StoreOptions::default())
        .with_context(|| format!("cannot create a device store in {}", data.display()))?;
    println!(
        "initialized device store in {} ({} tables, actor {})",
        data.display(),
        tables,
        store.actor()
    );
    Ok(())
}

fn parse_id(text: &str) -> Result<RowId> {
    Uuid::parse_str(text).map_err(|_| anyhow!("`{text}` is not a valid row id (expected a UUID)"))
}

/// Parse `COL=VALUE` arguments against a table's column types.
fn parse_assignments(table: &Table, args: &[String]) -> Result<Vec<(String, Value)>> {
    args.iter()
        .map(|arg| {
            let (col, text) = arg
                .split_once('=')
                .ok_or_else(|| anyhow!("`{arg}` is not of the form COL=VALUE"))?;
            let column = table
                .column(col)
                .ok_or_else(|| anyhow!("unknown column `{col}` in table `{}`", table.name))?;
            let value = Value::parse(column.ty, text).map_err(|e| e.in_column(table, col))?;
            Ok((col.to_string(), value))
        })
        .collect()
}

fn as_refs(values: &[(String, Value)]) -> Vec<(&str, Value)> {
    values
        .iter()
        .map(|(c, v)| (c.as_str(), v.clone()))
        .collect()
}

/// Whether `column` of `table` holds a file or an image.
fn is_blob_column(table: &Table, column: &str) -> bool {
    table.blob_columns().any(|c| c.name == column)
}

/// `COL=@PATH` for a file or image column: the column and the file to attach.
fn attachment<'a>(table: &Table, arg: &'a str) -> Option<(&'a str, &'a Path)> {
    let (col, path) = arg.split_once("=@")?;
    is_blob_column(table, col).then(|| (col, Path::new(path)))
}

/// The largest file this device may attach to `column`: the column's maximum, and no more than
/// the hub takes in one upload.
fn attach_limit(table: &Table, column: &str) -> u64 {
    table
        .column(column)
        .and_then(|c| c.max_file_bytes())
        .map_or(BLOB_UPLOAD_MAX, |max| max.min(BLOB_UPLOAD_MAX))
}

/// Refuses file and image values that name content this device does not hold (typed as
/// `HASH:SIZE:NAME` text or in an import): the hub would be told of a file that never comes.
fn check_blob_refs(store: &Store, table: &Table, values: &[(String, Value)]) -> Result<()> {
    for (col, v) in values {
        if let Value::File(b) | Value::Image(b) = v {
            table.check_file_size(col, v)?;
            if b.size > attach_limit(table, col) || !store.has_blob(b)? {
                bail!(
                    "`{col}` refers to content this device does not hold; attach a file with {col}=@PATH"
                );
            }
        }
    }
    Ok(())
}

/// Reads at most `limit` bytes; more is an error (a file that grows while it is read, a pipe).
struct AtMost<R> {
    inner: R,
    limit: u64,
    read: u64,
}

impl<R: Read> Read for AtMost<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.limit {
            return Err(std::io::Error::other(format!(
                "more than {} bytes",
                self.limit
            )));
        }
        Ok(n)
    }
}

/// Stores the file at `path` on the device; the value to put in `column`.
fn attach_file(store: &Store, table: &Table, column: &str, path: &Path) -> Result<Value> {
    let mut f = std::fs::File::open(path)
        .with_context(|| format!("cannot open {} for column `{column}`", path.display()))?;
    let meta = f
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?;
    // A pipe or a device has no size to check and may never end.
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    let size = meta.len();
    let limit = attach_limit(table, column);
    if size > limit {
        bail!(
            "{} is {size} bytes; column `{column}` takes files of at most {limit} bytes",
            path.display()
        );
    }
    let image = table.column(column).map(|c| c.ty) == Some(ColumnType::Image);
    let mut head = Vec::with_capacity(ImageFormat::SNIFF_BYTES);
    (&mut f)
        .take(ImageFormat::SNIFF_BYTES as u64)
        .read_to_end(&mut head)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if image {
        // Checked before the content is stored (the store would refuse the write after).
        if let Err(e) = ImageFormat::check(size, &head) {
            bail!("{} for image column `{column}`: {e}", path.display());
        }
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut capped = AtMost {
        inner: std::io::Cursor::new(head).chain(f),
        limit,
        read: 0,
    };
    let blob = store
        .put_blob(&name, &mut capped)
        .with_context(|| format!("cannot store {}", path.display()))?;
    Ok(if image {
        Value::Image(blob)
    } else {
        Value::File(blob)
    })
}

/// `device file`: a row's file or image content, as stored on this device.
fn file(data: &Path, table_name: &str, id: &str, column: &str, out: &Path) -> Result<()> {
    let store = open_store(data)?;
    let table = store.schema().table(table_name)?;
    if !is_blob_column(table, column) {
        bail!("`{column}` is not a file or image column of `{table_name}`");
    }
    let id = parse_id(id)?;
    let row = store
        .get(table_name, id)?
        .ok_or_else(|| anyhow!("no row {id} in table `{table_name}`"))?;
    let (Value::File(blob) | Value::Image(blob)) = row.get(column) else {
        bail!("row {id} has nothing in `{column}`");
    };
    if !store.has_blob(blob)? {
        bail!(
            "the content of `{column}` ({}, {} bytes) is not on this device yet: run `device sync`",
            blob.name,
            blob.size
        );
    }
    let content = store.read_blob(blob)?;
    std::fs::write(out, &content).with_context(|| format!("cannot write {}", out.display()))?;
    println!(
        "{} bytes ({}) written to {}",
        content.len(),
        blob.name,
        out.display()
    );
    Ok(())
}

fn put(data: &Path, table_name: &str, id: Option<&str>, args: &[String]) -> Result<()> {
    let store = open_store(data)?;
    let table = store.schema().table(table_name)?.clone();
    // Every other argument is checked before a file is read or stored.
    let (files, rest): (Vec<&String>, Vec<&String>) =
        args.iter().partition(|a| attachment(&table, a).is_some());
    let rest: Vec<String> = rest.into_iter().cloned().collect();
    let mut values = parse_assignments(&table, &rest)?;
    let id = id.map(parse_id).transpose()?;
    // A reference the row already holds is saved as it is (`check_one`).
    let current = match id {
        Some(id) => store.get(table_name, id)?,
        None => None,
    };
    let set_now: Vec<(String, Value)> = values
        .iter()
        .filter(|(c, v)| current.as_ref().is_none_or(|row| row.get(c) != v))
        .cloned()
        .collect();
    check_blob_refs(&store, &table, &set_now)?;
    // A write that cannot succeed stores no file first (stored content is never removed).
    if let Some(id) = id {
        if !files.is_empty() && store.is_deleted(table_name, id)? {
            bail!("row {id} of `{table_name}` has been deleted; nothing was written");
        }
    }
    for arg in files {
        if let Some((col, path)) = attachment(&table, arg) {
            values.push((col.to_string(), attach_file(&store, &table, col, path)?));
        }
    }
    let mut tx = store.begin();
    let row_id = match id {
        Some(id) if store.get(table_name, id)?.is_some() => {
            tx.update(table_name, id, &as_refs(&values))?;
            id
        }
        Some(id) => {
            tx.insert_with_id(table_name, id, &as_refs(&values))?;
            id
        }
        None => tx.insert(table_name, &as_refs(&values))?,
    };
    tx.commit_with(Durability::Immediate)?;
    println!("{row_id}");
    Ok(())
}

/// A value for the plain-text output: control characters (newlines, tabs, terminal escapes)
/// escaped, so a value written by anyone the device syncs with cannot fake a field or a row
/// or drive the terminal. `--json` is exact.
fn plain(value: &Value) -> String {
    let mut out = String::new();
    for c in value.to_string().chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn row_json(row: &Row) -> serde_json::Value {
    let mut obj = serde_json::Map::new();
    obj.insert(format!("{}id", row.table), row.id.to_string().into());
    for (col, value) in &row.values {
        obj.insert(col.clone(), value.to_json());
    }
    if row.has_conflicts {
        obj.insert("@fieldsync.conflicts".into(), true.into());
    }
    serde_json::Value::Object(obj)
}

fn get(data: &Path, table: &str, id: &str, json: bool) -> Result<()> {
    let store = open_store(data)?;
    store.schema().table(table)?;
    let id = parse_id(id)?;
    let row = store
        .get(table, id)?
        .ok_or_else(|| anyhow!("no row {id} in table `{table}`"))?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", row_json(&row))?;
    } else {
        writeln!(out, "{}id: {}", row.table, row.id)?;
        for (col, value) in &row.values {
            writeln!(out, "{col}: {}", plain(value))?;
        }
        if row.has_conflicts {
            writeln!(
                out,
                "(this row has conflicting edits: `fieldsync device conflicts` shows them)"
            )?;
        }
    }
    Ok(())
}

fn query(data: &Path, table_name: &str, filters: &[String], json: bool) -> Result<()> {
    let store = open_store(data)?;
    let table = store.schema().table(table_name)?.clone();
    let mut q = fieldsync_store::Query::table(table_name);
    for (col, value) in parse_assignments(&table, filters)? {
        q = q.eq(&col, value);
    }
    let rows = store.query(&q)?;
    let mut out = std::io::stdout().lock();
    for row in &rows {
        if json {
            writeln!(out, "{}", row_json(row))?;
        } else {
            let cols: Vec<String> = row
                .values
                .iter()
                .map(|(c, v)| format!("{c}={}", plain(v)))
                .collect();
            writeln!(out, "{}\t{}", row.id, cols.join("\t"))?;
        }
    }
    Ok(())
}

fn delete(data: &Path, table: &str, id: &str) -> Result<()> {
    let store = open_store(data)?;
    store.schema().table(table)?;
    let id = parse_id(id)?;
    let mut tx = store.begin();
    tx.delete(table, id)?;
    tx.commit_with(Durability::Immediate)?;
    println!("deleted {id}");
    Ok(())
}

/// One line of an import file: its line number, the row's id if it names one, and its column
/// values.
type ImportRow = (usize, Option<RowId>, Vec<(String, Value)>);

/// Read and check the whole file before writing anything, so a bad line leaves the store as
/// it was (the ids and the size of each row's change are checked by `bulk_insert`, before it
/// writes anything: see `import`).
fn read_import_file(table: &Table, file: &Path) -> Result<Vec<ImportRow>> {
    let reader = BufReader::new(
        std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?,
    );
    let primary = table.primary_id_column();
    let mut rows = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line_no = n + 1;
        let line =
            line.with_context(|| format!("{}: cannot read line {line_no}", file.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&line)
            .with_context(|| format!("{}:{line_no}: not a JSON object", file.display()))?;
        let mut id = None;
        let mut values = Vec::with_capacity(obj.len());
        for (col, json) in &obj {
            if *col == primary {
                let text = json.as_str().ok_or_else(|| {
                    anyhow!(
                        "{}:{line_no}: `{col}` must be a UUID string",
                        file.display()
                    )
                })?;
                id = Some(parse_id(text).with_context(|| format!("{}:{line_no}", file.display()))?);
                continue;
            }
            let column = table.column(col).ok_or_else(|| {
                anyhow!(
                    "{}:{line_no}: unknown column `{col}` in table `{}`",
                    file.display(),
                    table.name
                )
            })?;
            let value = Value::from_json(column.ty, json)
                .map_err(|e| e.in_column(table, col))
                .with_context(|| format!("{}:{line_no}", file.display()))?;
            table
                .check_value(col, &value)
                .with_context(|| format!("{}:{line_no}", file.display()))?;
            values.push((col.clone(), value));
        }
        rows.push((line_no, id, values));
    }
    Ok(rows)
}

/// Names the lines of an import file that a refused bulk insert points at.
fn import_error(file: &Path, rows: &[(usize, RowId)], error: WriteError) -> anyhow::Error {
    let row = match &error {
        WriteError::RowExists { id, .. } | WriteError::RowDeleted { id, .. } => Some(*id),
        WriteError::ChangeTooLarge { row, .. } => Some(*row),
        _ => None,
    };
    let lines: Vec<usize> = rows
        .iter()
        .filter(|(_, id)| Some(*id) == row)
        .map(|(line, _)| *line)
        .collect();
    let file = file.display();
    match (&error, lines.as_slice()) {
        (WriteError::RowExists { id, .. }, [first, again, ..]) => {
            anyhow!("{file}:{again}: row id {id} repeats line {first}; nothing was imported")
        }
        (_, [line, ..]) => anyhow!("{file}:{line}: {error}; nothing was imported"),
        _ => anyhow!("{file}: {error}; nothing was imported"),
    }
}

fn import(data: &Path, table_name: &str, file: &Path) -> Result<()> {
    let store = open_store(data)?;
    let table = store.schema().table(table_name)?.clone();
    let rows = read_import_file(&table, file)?;
    for (line, _, values) in &rows {
        check_blob_refs(&store, &table, values)
            .map_err(|e| anyhow!("{}:{line}: {e}; nothing was imported", file.display()))?;
    }
    let total = rows.len();
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} importing [{bar:40}] {pos}/{len} rows ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    // One bulk insert: it checks every row (ids that repeat or exist, changes over the size
    // limit) before it writes anything.
    // Every row gets its id here (as the store would give it), so that any error about a
    // row names the row's line.
    let mut lines: Vec<(usize, RowId)> = Vec::with_capacity(rows.len());
    let rows: Vec<BulkRow> = rows
        .into_iter()
        .map(|(line, id, values)| {
            let id = id.unwrap_or_else(|| store.new_row_id());
            lines.push((line, id));
            BulkRow {
                id: Some(id),
                values,
            }
        })
        .collect();
    store
        .bulk_insert(table_name, rows, &mut |done| bar.set_position(done as u64))
        .map_err(|e| import_error(file, &lines, e))?;
    store.sync().context("cannot make the import durable")?;
    bar.finish_and_clear();
    println!("imported {total} rows into {table_name}");
    Ok(())
}

fn log(data: &Path, since: u64, json: bool) -> Result<()> {
    let store = open_store(data)?;
    let mut out = std::io::stdout().lock();
    let mut after = since;
    loop {
        let entries = store.ops_since(after, 1_000)?;
        let Some(last) = entries.last() else { break };
        after = last.seq;
        for e in &entries {
            if json {
                let line = serde_json::json!({
                    "seq": e.seq,
                    "table": e.table,
                    "row": e.row.to_string(),
                    "actor": e.actor.to_string(),
                    "hash": hex_string(&e.hash),
                    "change_bytes": e.change.len(),
                });
                writeln!(out, "{line}")?;
            } else {
                writeln!(
                    out,
                    "{:>8}  {:<24} {}  actor {}  {} B",
                    e.seq,
                    e.table,
                    e.row,
                    e.actor,
                    e.change.len()
                )?;
            }
        }
    }
    Ok(())
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn conflicts(data: &Path, table: &str, id: &str) -> Result<()> {
    let store = open_store(data)?;
    store.schema().table(table)?;
    let id = parse_id(id)?;
    if store.get(table, id)?.is_none() {
        bail!("no row {id} in table `{table}`");
    }
    let conflicts = store.conflicts(table, id)?;
    if conflicts.is_empty() {
        println!("no conflicts on {table} {id}");
    }
    for c in conflicts {
        println!("{}: shows {} (deterministic winner)", c.column, c.winner);
        for (value, actor) in &c.values {
            println!("  {value}  written by actor {actor}");
        }
    }
    Ok(())
}

fn status(data: &Path) -> Result<()> {
    let store = open_store(data)?;
    let status = store.status()?;
    let by_table: BTreeMap<_, _> = status.rows_per_table.iter().collect();
    println!("actor         {}", store.actor());
    println!("last seq      {}", status.last_seq);
    println!("acked seq     {}", status.acked_seq);
    // Own edits the hub has not acknowledged: the log also holds pulled changes, which are
    // never pushed.
    let pending = fieldsync_replication::replica::DeviceReplica::new(store.clone())
        .pending_op_count()
        .map_err(|e| anyhow!(e))?;
    println!("pending ops   {pending}");
    println!("log entries   {}", status.log_entries);
    println!("disk bytes    {}", status.disk_bytes);
    println!("rows:");
    for (table, n) in by_table {
        println!("  {table:<28} {n}");
    }
    println!("tombstones    {}", status.deleted_rows);
    println!("held changes  {}", status.held_changes);
    let report = store.check()?;
    if report.is_ok() {
        println!(
            "integrity     ok ({} rows, {} log entries, {} index entries checked)",
            report.rows, report.log_entries, report.index_entries
        );
    } else {
        println!("integrity     {} problem(s):", report.problems.len());
        for problem in &report.problems {
            println!("  {problem:?}");
        }
    }
    crate::device_sync::status_lines(data, &store)?;
    Ok(())
}
