//! Typed column values, and their text and JSON forms.

use std::fmt;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::schema::{ColumnType, SchemaError, Table};

/// The id of a row: a UUID, as Dataverse uses.
pub type RowId = Uuid;

/// Whether an owner is a user or a team.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum OwnerKind {
    /// A `systemuser`.
    User,
    /// A `team`.
    Team,
}

/// The owner of a row: a user or a team, by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OwnerRef {
    /// User or team.
    pub kind: OwnerKind,
    /// The user's or team's id.
    pub id: Uuid,
}

impl fmt::Display for OwnerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            OwnerKind::User => write!(f, "user:{}", self.id),
            OwnerKind::Team => write!(f, "team:{}", self.id),
        }
    }
}

/// A reference from a row to a content-addressed blob (file and image columns).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BlobRef {
    /// SHA-256 of the content.
    pub sha256: [u8; 32],
    /// Size in bytes.
    pub size: u64,
    /// The file name the content was uploaded with.
    pub name: String,
}

impl BlobRef {
    /// The hash as lower-case hex.
    pub fn hash_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

/// One column value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    /// No value.
    Null,
    /// Single-line text.
    Text(String),
    /// Multi-line text.
    Memo(String),
    /// 64-bit integer.
    Integer(i64),
    /// Exact decimal.
    Decimal(Decimal),
    /// Floating point.
    Float(f64),
    /// Boolean.
    Boolean(bool),
    /// UTC instant in milliseconds since the Unix epoch.
    DateTime(i64),
    /// Option-set value.
    Choice(i32),
    /// The id of a row in the lookup's target table.
    Lookup(RowId),
    /// A user or team.
    Owner(OwnerRef),
    /// A file blob.
    File(BlobRef),
    /// An image blob.
    Image(BlobRef),
}

impl Value {
    /// Whether this is [`Value::Null`].
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The column type this value belongs to (`None` for null, which fits any column).
    pub fn column_type(&self) -> Option<ColumnType> {
        Some(match self {
            Value::Null => return None,
            Value::Text(_) => ColumnType::Text,
            Value::Memo(_) => ColumnType::Memo,
            Value::Integer(_) => ColumnType::Integer,
            Value::Decimal(_) => ColumnType::Decimal,
            Value::Float(_) => ColumnType::Float,
            Value::Boolean(_) => ColumnType::Boolean,
            Value::DateTime(_) => ColumnType::DateTime,
            Value::Choice(_) => ColumnType::Choice,
            Value::Lookup(_) => ColumnType::Lookup,
            Value::Owner(_) => ColumnType::Owner,
            Value::File(_) => ColumnType::File,
            Value::Image(_) => ColumnType::Image,
        })
    }

    /// A short name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        self.column_type().map_or("null", ColumnType::name)
    }

    /// Parse the text form of a value for a column of type `ty` (CLI `COL=VALUE` arguments).
    ///
    /// Text forms: integers and decimals as usual; floats as Rust parses them; booleans
    /// `true`/`false`; datetimes RFC 3339 in UTC (`2026-11-26T08:30:00Z`) or milliseconds since
    /// the epoch; choices as integers; lookups as UUIDs; owners as `user:<uuid>` or
    /// `team:<uuid>` (a bare UUID is a user); `null` (or an empty string) for no value.
    pub fn parse(ty: ColumnType, text: &str) -> Result<Value, ValueParseError> {
        if text.is_empty() || text == "null" {
            return Ok(Value::Null);
        }
        let bad = || ValueParseError {
            expected: ty,
            value: text.to_string(),
        };
        Ok(match ty {
            ColumnType::Text => Value::Text(text.to_string()),
            ColumnType::Memo => Value::Memo(text.to_string()),
            ColumnType::Integer => Value::Integer(text.parse().map_err(|_| bad())?),
            ColumnType::Decimal => Value::Decimal(text.parse().map_err(|_| bad())?),
            ColumnType::Float => {
                let f: f64 = text.parse().map_err(|_| bad())?;
                if !f.is_finite() {
                    return Err(bad());
                }
                Value::Float(f)
            }
            ColumnType::Boolean => Value::Boolean(match text {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => return Err(bad()),
            }),
            ColumnType::DateTime => Value::DateTime(parse_datetime(text).ok_or_else(bad)?),
            ColumnType::Choice => Value::Choice(text.parse().map_err(|_| bad())?),
            ColumnType::Lookup => Value::Lookup(Uuid::parse_str(text).map_err(|_| bad())?),
            ColumnType::Owner => Value::Owner(parse_owner(text).ok_or_else(bad)?),
            ColumnType::File | ColumnType::Image => {
                // Blob columns take a reference `sha256hex:size:name`; the store's blob API
                // produces them.
                let mut parts = text.splitn(3, ':');
                let hash = parts.next().ok_or_else(bad)?;
                let size = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
                let name = parts.next().unwrap_or("").to_string();
                let mut sha256 = [0u8; 32];
                hex::decode_to_slice(hash, &mut sha256).map_err(|_| bad())?;
                let r = BlobRef { sha256, size, name };
                if ty == ColumnType::File {
                    Value::File(r)
                } else {
                    Value::Image(r)
                }
            }
        })
    }

    /// The JSON form (what `--json` prints and `import` reads).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::Null => J::Null,
            Value::Text(s) | Value::Memo(s) => J::String(s.clone()),
            Value::Integer(i) => J::from(*i),
            Value::Decimal(d) => J::String(d.to_string()),
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Value::Boolean(b) => J::Bool(*b),
            Value::DateTime(ms) => J::String(format_datetime(*ms)),
            Value::Choice(c) => J::from(*c),
            Value::Lookup(id) => J::String(id.to_string()),
            Value::Owner(o) => J::String(o.to_string()),
            Value::File(b) | Value::Image(b) => {
                J::String(format!("{}:{}:{}", b.hash_hex(), b.size, b.name))
            }
        }
    }

    /// Read the JSON form of a value for a column of type `ty`.
    pub fn from_json(ty: ColumnType, json: &serde_json::Value) -> Result<Value, ValueParseError> {
        use serde_json::Value as J;
        let bad = || ValueParseError {
            expected: ty,
            value: json.to_string(),
        };
        match json {
            J::Null => Ok(Value::Null),
            J::String(s) => match ty {
                // A JSON string is taken literally for text; other types parse its content.
                ColumnType::Text => Ok(Value::Text(s.clone())),
                ColumnType::Memo => Ok(Value::Memo(s.clone())),
                _ if s.is_empty() => Err(bad()),
                _ => Value::parse(ty, s),
            },
            J::Number(n) => match ty {
                ColumnType::Integer => n.as_i64().map(Value::Integer).ok_or_else(bad),
                ColumnType::Choice => n
                    .as_i64()
                    .and_then(|v| i32::try_from(v).ok())
                    .map(Value::Choice)
                    .ok_or_else(bad),
                ColumnType::Float => n.as_f64().map(Value::Float).ok_or_else(bad),
                ColumnType::Decimal => n.to_string().parse().map(Value::Decimal).map_err(|_| bad()),
                ColumnType::DateTime => n.as_i64().map(Value::DateTime).ok_or_else(bad),
                _ => Err(bad()),
            },
            J::Bool(b) if ty == ColumnType::Boolean => Ok(Value::Boolean(*b)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_json() {
            serde_json::Value::String(s) => f.write_str(&s),
            other => write!(f, "{other}"),
        }
    }
}

/// A value's text or JSON form did not parse for its column type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}` is not a valid {expected} value")]
pub struct ValueParseError {
    /// The column's type.
    pub expected: ColumnType,
    /// The offending text.
    pub value: String,
}

impl ValueParseError {
    /// Attach the table and column the value was meant for.
    pub fn in_column(self, table: &Table, column: &str) -> SchemaError {
        SchemaError::InvalidValue {
            table: table.name.clone(),
            column: column.to_string(),
            expected: self.expected,
            value: self.value,
        }
    }
}

fn parse_owner(text: &str) -> Option<OwnerRef> {
    let (kind, id) = match text.split_once(':') {
        Some(("user", id)) => (OwnerKind::User, id),
        Some(("team", id)) => (OwnerKind::Team, id),
        Some(_) => return None,
        None => (OwnerKind::User, text),
    };
    Some(OwnerRef {
        kind,
        id: Uuid::parse_str(id).ok()?,
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Parse `YYYY-MM-DDTHH:MM:SS[.fff]Z` (UTC only, as Dataverse returns), a bare date, or
/// milliseconds since the epoch.
pub fn parse_datetime(text: &str) -> Option<i64> {
    if let Ok(ms) = text.parse::<i64>() {
        return Some(ms);
    }
    let b = text.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = text.get(r)?;
        if s.bytes().all(|c| c.is_ascii_digit()) {
            s.parse().ok()
        } else {
            None
        }
    };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    let days = days_from_civil(y, mo, d);
    if b.len() == 10 {
        return Some(days * 86_400_000);
    }
    if b.len() < 20 || (b[10] != b'T' && b[10] != b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let mut ms = 0;
    let mut rest = &text[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let f = &frac[..digits];
        let padded = format!("{:0<3}", &f[..digits.min(3)]);
        ms = padded.parse().ok()?;
        rest = &frac[digits..];
    }
    if rest != "Z" && rest != "+00:00" {
        return None;
    }
    Some(((days * 24 + h) * 60 + mi) * 60_000 + s * 1000 + ms)
}

/// Format milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SS.fffZ` (or without the
/// fraction when it is zero).
pub fn format_datetime(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let (h, mi, s, f) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    if f == 0 {
        format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
    } else {
        format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{f:03}Z")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetimes_round_trip() {
        for ms in [
            0,
            1,
            999,
            86_399_999,
            1_790_000_000_123,
            -86_400_000,
            951_782_400_000,
        ] {
            assert_eq!(parse_datetime(&format_datetime(ms)), Some(ms), "{ms}");
        }
        assert_eq!(
            parse_datetime("2016-09-28T23:14:00Z"),
            Some(1_475_104_440_000)
        );
        assert_eq!(parse_datetime("2016-09-28"), Some(1_475_020_800_000));
        assert_eq!(parse_datetime("2016-13-28T23:14:00Z"), None);
        assert_eq!(parse_datetime("2016-09-28T23:14:00+02:00"), None);
        assert_eq!(parse_datetime("yesterday"), None);
    }

    #[test]
    fn parses_each_type() {
        let id = Uuid::new_v4();
        assert_eq!(
            Value::parse(ColumnType::Integer, "42"),
            Ok(Value::Integer(42))
        );
        assert!(Value::parse(ColumnType::Integer, "4.2").is_err());
        assert_eq!(
            Value::parse(ColumnType::Decimal, "12.50").map(|v| v.to_string()),
            Ok("12.50".into())
        );
        assert_eq!(
            Value::parse(ColumnType::Boolean, "true"),
            Ok(Value::Boolean(true))
        );
        assert!(Value::parse(ColumnType::Float, "NaN").is_err());
        assert_eq!(
            Value::parse(ColumnType::Lookup, &id.to_string()),
            Ok(Value::Lookup(id))
        );
        assert!(Value::parse(ColumnType::Lookup, "not-a-uuid").is_err());
        assert_eq!(
            Value::parse(ColumnType::Owner, &format!("team:{id}")),
            Ok(Value::Owner(OwnerRef {
                kind: OwnerKind::Team,
                id
            }))
        );
        assert_eq!(Value::parse(ColumnType::Text, "null"), Ok(Value::Null));
    }

    #[test]
    fn json_round_trips() {
        let id = Uuid::new_v4();
        let cases = [
            (ColumnType::Text, Value::Text("7".into())),
            (ColumnType::Integer, Value::Integer(-3)),
            (ColumnType::Decimal, Value::Decimal("1.25".parse().unwrap())),
            (ColumnType::Float, Value::Float(0.5)),
            (ColumnType::Boolean, Value::Boolean(false)),
            (ColumnType::DateTime, Value::DateTime(1_475_104_440_000)),
            (ColumnType::Choice, Value::Choice(2)),
            (ColumnType::Lookup, Value::Lookup(id)),
            (
                ColumnType::Owner,
                Value::Owner(OwnerRef {
                    kind: OwnerKind::User,
                    id,
                }),
            ),
        ];
        for (ty, v) in cases {
            assert_eq!(Value::from_json(ty, &v.to_json()), Ok(v));
        }
        assert!(Value::from_json(ColumnType::Integer, &serde_json::json!("x")).is_err());
        assert!(Value::from_json(ColumnType::Boolean, &serde_json::json!(1)).is_err());
    }
}
