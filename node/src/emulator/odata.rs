//! OData query options: URL decoding, `Prefer`, `$select`, `$filter`, `$orderby`, `$top`.
//!
//! No I/O: a filter is parsed into a [`Filter`] tree and evaluated against a row through an
//! accessor that yields [`Lit`] values, so the same evaluator serves data rows and metadata.
//! String comparisons are case-insensitive, as in Dataverse (`webapi/query-data-web-api.md`).

use std::cmp::Ordering;

use uuid::Uuid;

use super::errors::ApiError;

/// Longest `$filter` the emulator parses (characters); Dataverse URLs are limited too.
const FILTER_LEN_MAX: usize = 32 * 1024;
/// Deepest nesting of parentheses and `not` in a `$filter`.
const FILTER_DEPTH_MAX: usize = 64;

/// Decode `%XX` escapes and `+` (as a space) in a query-string component.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encode a query-string component (unreserved characters and a few safe ones stay).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~$,()'".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Split a raw query string into decoded `(name, value)` pairs, in order.
pub fn parse_query(raw: &str) -> Vec<(String, String)> {
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

/// Build a query string from pairs, encoding values.
pub fn build_query(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", k, percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The `Prefer` preferences the emulator understands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prefer {
    /// `odata.maxpagesize=N`.
    pub max_page_size: Option<usize>,
    /// `odata.track-changes`.
    pub track_changes: bool,
    /// `return=representation`.
    pub return_representation: bool,
    /// `odata.continue-on-error`.
    pub continue_on_error: bool,
    /// `odata.include-annotations=...`.
    pub include_annotations: bool,
}

impl Prefer {
    /// Parse every `Prefer` header value (comma-separated preferences).
    pub fn parse<'a>(values: impl Iterator<Item = &'a str>) -> Prefer {
        let mut p = Prefer::default();
        for value in values {
            for pref in value.split(',') {
                let pref = pref.trim();
                let (name, arg) = match pref.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (pref, None),
                };
                match name.to_ascii_lowercase().as_str() {
                    "odata.maxpagesize" => {
                        p.max_page_size = arg.and_then(|a| a.parse().ok()).filter(|n| *n > 0)
                    }
                    "odata.track-changes" => p.track_changes = true,
                    "return" => p.return_representation = arg == Some("representation"),
                    "odata.continue-on-error" => p.continue_on_error = true,
                    "odata.include-annotations" => p.include_annotations = true,
                    _ => {}
                }
            }
        }
        p
    }
}

/// A value a filter compares: the emulator's view of a column value.
#[derive(Debug, Clone, PartialEq)]
pub enum Lit {
    /// No value.
    Null,
    /// true / false.
    Bool(bool),
    /// Any number; datetimes are milliseconds since the epoch.
    Num(f64),
    /// Text.
    Str(String),
    /// A GUID (lookups, owners, ids).
    Guid(Uuid),
}

impl Lit {
    /// Compare two values; `None` if they are not comparable (null or mixed types).
    pub fn compare(&self, other: &Lit) -> Option<Ordering> {
        match (self, other) {
            (Lit::Bool(a), Lit::Bool(b)) => Some(a.cmp(b)),
            (Lit::Num(a), Lit::Num(b)) => a.partial_cmp(b),
            (Lit::Str(a), Lit::Str(b)) => Some(a.to_lowercase().cmp(&b.to_lowercase())),
            (Lit::Guid(a), Lit::Guid(b)) => Some(a.cmp(b)),
            (Lit::Guid(a), Lit::Str(b)) | (Lit::Str(b), Lit::Guid(a)) => {
                Uuid::parse_str(b).ok().map(|b| a.cmp(&b))
            }
            _ => None,
        }
    }

    /// Order for `$orderby`: nulls first, then by value.
    pub fn sort_cmp(&self, other: &Lit) -> Ordering {
        match (self, other) {
            (Lit::Null, Lit::Null) => Ordering::Equal,
            (Lit::Null, _) => Ordering::Less,
            (_, Lit::Null) => Ordering::Greater,
            _ => self.compare(other).unwrap_or(Ordering::Equal),
        }
    }

    fn text(&self) -> Option<String> {
        match self {
            Lit::Str(s) => Some(s.to_lowercase()),
            _ => None,
        }
    }
}

/// Comparison operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// `eq`
    Eq,
    /// `ne`
    Ne,
    /// `lt`
    Lt,
    /// `le`
    Le,
    /// `gt`
    Gt,
    /// `ge`
    Ge,
}

/// Which caller-relative query function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserFn {
    /// `Microsoft.Dynamics.CRM.EqualUserId`: the owner is the caller.
    EqualUserId,
    /// `Microsoft.Dynamics.CRM.NotEqualUserId`.
    NotEqualUserId,
    /// `Microsoft.Dynamics.CRM.EqualUserTeams`: the owner is one of the caller's teams.
    EqualUserTeams,
    /// `Microsoft.Dynamics.CRM.EqualUserOrUserTeams`.
    EqualUserOrUserTeams,
    /// `Microsoft.Dynamics.CRM.EqualBusinessId`: the value is the caller's business unit.
    EqualBusinessId,
    /// `Microsoft.Dynamics.CRM.NotEqualBusinessId`.
    NotEqualBusinessId,
}

/// An operand of a comparison.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// A property (column) name, e.g. `name` or `_ownerid_value`.
    Prop(String),
    /// A literal.
    Lit(Lit),
}

/// A parsed `$filter`.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// `a op b`
    Cmp(Operand, CmpOp, Operand),
    /// `a and b`
    And(Box<Filter>, Box<Filter>),
    /// `a or b`
    Or(Box<Filter>, Box<Filter>),
    /// `not a`
    Not(Box<Filter>),
    /// `contains(prop, 'x')`
    Contains(String, String),
    /// `startswith(prop, 'x')`
    StartsWith(String, String),
    /// `endswith(prop, 'x')`
    EndsWith(String, String),
    /// A caller-relative function on a property.
    User(UserFn, String),
}

/// What caller-relative functions compare against.
#[derive(Debug, Clone, Default)]
pub struct CallerIds {
    /// The caller's `systemuserid`.
    pub user: Uuid,
    /// The caller's teams.
    pub teams: Vec<Uuid>,
    /// The caller's business unit.
    pub business_unit: Uuid,
}

impl Filter {
    /// Every property the filter reads.
    pub fn props(&self, out: &mut Vec<String>) {
        match self {
            Filter::Cmp(a, _, b) => {
                for o in [a, b] {
                    if let Operand::Prop(p) = o {
                        out.push(p.clone());
                    }
                }
            }
            Filter::And(a, b) | Filter::Or(a, b) => {
                a.props(out);
                b.props(out);
            }
            Filter::Not(a) => a.props(out),
            Filter::Contains(p, _)
            | Filter::StartsWith(p, _)
            | Filter::EndsWith(p, _)
            | Filter::User(_, p) => out.push(p.clone()),
        }
    }

    /// Evaluate against a row, reading properties through `get`.
    pub fn eval(&self, get: &dyn Fn(&str) -> Lit, caller: &CallerIds) -> bool {
        let value = |o: &Operand| match o {
            Operand::Prop(p) => get(p),
            Operand::Lit(l) => l.clone(),
        };
        match self {
            Filter::Cmp(a, op, b) => {
                let (a, b) = (value(a), value(b));
                match (op, &a, &b) {
                    (CmpOp::Eq, Lit::Null, _) | (CmpOp::Eq, _, Lit::Null) => a == b,
                    (CmpOp::Ne, Lit::Null, _) | (CmpOp::Ne, _, Lit::Null) => a != b,
                    _ => match a.compare(&b) {
                        None => false,
                        Some(ord) => match op {
                            CmpOp::Eq => ord == Ordering::Equal,
                            CmpOp::Ne => ord != Ordering::Equal,
                            CmpOp::Lt => ord == Ordering::Less,
                            CmpOp::Le => ord != Ordering::Greater,
                            CmpOp::Gt => ord == Ordering::Greater,
                            CmpOp::Ge => ord != Ordering::Less,
                        },
                    },
                }
            }
            Filter::And(a, b) => a.eval(get, caller) && b.eval(get, caller),
            Filter::Or(a, b) => a.eval(get, caller) || b.eval(get, caller),
            Filter::Not(a) => !a.eval(get, caller),
            Filter::Contains(p, s) => get(p).text().is_some_and(|t| t.contains(&s.to_lowercase())),
            Filter::StartsWith(p, s) => get(p)
                .text()
                .is_some_and(|t| t.starts_with(&s.to_lowercase())),
            Filter::EndsWith(p, s) => get(p)
                .text()
                .is_some_and(|t| t.ends_with(&s.to_lowercase())),
            Filter::User(f, p) => {
                let id = match get(p) {
                    Lit::Guid(g) => Some(g),
                    Lit::Str(s) => Uuid::parse_str(&s).ok(),
                    _ => None,
                };
                match f {
                    UserFn::EqualUserId => id == Some(caller.user),
                    UserFn::NotEqualUserId => id != Some(caller.user),
                    UserFn::EqualUserTeams => id.is_some_and(|i| caller.teams.contains(&i)),
                    UserFn::EqualUserOrUserTeams => {
                        id == Some(caller.user) || id.is_some_and(|i| caller.teams.contains(&i))
                    }
                    UserFn::EqualBusinessId => id == Some(caller.business_unit),
                    UserFn::NotEqualBusinessId => id != Some(caller.business_unit),
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(f64),
    Open,
    Close,
    Comma,
    Eq,
}

fn tokenize(s: &str) -> Result<Vec<Tok>, ApiError> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' | '\n' | '\r' => i += 1,
            '(' => {
                out.push(Tok::Open);
                i += 1;
            }
            ')' => {
                out.push(Tok::Close);
                i += 1;
            }
            ',' => {
                out.push(Tok::Comma);
                i += 1;
            }
            '=' => {
                out.push(Tok::Eq);
                i += 1;
            }
            '\'' => {
                let mut text = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => {
                            return Err(ApiError::query("Unterminated string literal in $filter."))
                        }
                        Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                            text.push('\'');
                            i += 2;
                        }
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some(ch) => {
                            text.push(*ch);
                            i += 1;
                        }
                    }
                }
                out.push(Tok::Str(text));
            }
            _ => {
                // A word: identifier, keyword, number, GUID or datetime literal.
                let start = i;
                while i < chars.len() && !" \t\n\r(),='".contains(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let numeric = word
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_digit() || c == '-');
                if numeric && word.len() != 36 && !word.contains('T') {
                    let n: f64 = word
                        .trim_end_matches(['m', 'M', 'd', 'D', 'L'])
                        .parse()
                        .map_err(|_| {
                            ApiError::query(format!("Syntax error at '{word}' in $filter."))
                        })?;
                    out.push(Tok::Num(n));
                } else {
                    out.push(Tok::Ident(word));
                }
            }
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn expect(&mut self, t: Tok) -> Result<(), ApiError> {
        match self.next() {
            Some(x) if x == t => Ok(()),
            other => Err(ApiError::query(format!(
                "Syntax error in $filter: expected {t:?}, found {other:?}."
            ))),
        }
    }

    fn keyword(&self, kw: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(w)) if w == kw)
    }

    fn or(&mut self) -> Result<Filter, ApiError> {
        let mut left = self.and()?;
        while self.keyword("or") {
            self.pos += 1;
            let right = self.and()?;
            left = Filter::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Filter, ApiError> {
        let mut left = self.unary()?;
        while self.keyword("and") {
            self.pos += 1;
            let right = self.unary()?;
            left = Filter::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Filter, ApiError> {
        self.depth += 1;
        if self.depth > FILTER_DEPTH_MAX {
            return Err(ApiError::query("The $filter is nested too deeply."));
        }
        let result = if self.keyword("not") {
            self.pos += 1;
            self.unary().map(|f| Filter::Not(Box::new(f)))
        } else {
            self.primary()
        };
        self.depth -= 1;
        result
    }

    fn primary(&mut self) -> Result<Filter, ApiError> {
        if self.peek() == Some(&Tok::Open) {
            self.pos += 1;
            let inner = self.or()?;
            self.expect(Tok::Close)?;
            return Ok(inner);
        }
        if let Some(Tok::Ident(word)) = self.peek().cloned() {
            if self.toks.get(self.pos + 1) == Some(&Tok::Open) {
                return self.function(&word);
            }
        }
        let left = self.operand()?;
        let op = match self.next() {
            Some(Tok::Ident(w)) => match w.as_str() {
                "eq" => CmpOp::Eq,
                "ne" => CmpOp::Ne,
                "lt" => CmpOp::Lt,
                "le" => CmpOp::Le,
                "gt" => CmpOp::Gt,
                "ge" => CmpOp::Ge,
                other => {
                    return Err(ApiError::query(format!(
                        "Syntax error in $filter: unknown operator '{other}'."
                    )))
                }
            },
            other => {
                return Err(ApiError::query(format!(
                    "Syntax error in $filter: expected an operator, found {other:?}."
                )))
            }
        };
        let right = self.operand()?;
        Ok(Filter::Cmp(left, op, right))
    }

    fn operand(&mut self) -> Result<Operand, ApiError> {
        match self.next() {
            Some(Tok::Str(s)) => Ok(Operand::Lit(Lit::Str(s))),
            Some(Tok::Num(n)) => Ok(Operand::Lit(Lit::Num(n))),
            Some(Tok::Ident(w)) => Ok(match w.as_str() {
                "null" => Operand::Lit(Lit::Null),
                "true" => Operand::Lit(Lit::Bool(true)),
                "false" => Operand::Lit(Lit::Bool(false)),
                _ => {
                    if let Ok(g) = Uuid::parse_str(&w) {
                        Operand::Lit(Lit::Guid(g))
                    } else if let Some(ms) = w
                        .chars()
                        .next()
                        .filter(char::is_ascii_digit)
                        .and_then(|_| fieldsync_store::parse_datetime(&w))
                    {
                        Operand::Lit(Lit::Num(ms as f64))
                    } else if w
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '/')
                    {
                        Operand::Prop(w)
                    } else {
                        return Err(ApiError::query(format!(
                            "Syntax error at '{w}' in $filter."
                        )));
                    }
                }
            }),
            other => Err(ApiError::query(format!(
                "Syntax error in $filter: expected a property or a literal, found {other:?}."
            ))),
        }
    }

    fn function(&mut self, name: &str) -> Result<Filter, ApiError> {
        self.pos += 2; // name and '('
        let short = name.strip_prefix("Microsoft.Dynamics.CRM.").unwrap_or(name);
        let user_fn = match short {
            "EqualUserId" => Some(UserFn::EqualUserId),
            "NotEqualUserId" => Some(UserFn::NotEqualUserId),
            "EqualUserTeams" => Some(UserFn::EqualUserTeams),
            "EqualUserOrUserTeams" => Some(UserFn::EqualUserOrUserTeams),
            "EqualBusinessId" => Some(UserFn::EqualBusinessId),
            "NotEqualBusinessId" => Some(UserFn::NotEqualBusinessId),
            _ => None,
        };
        if let Some(f) = user_fn {
            // Microsoft.Dynamics.CRM.EqualUserId(PropertyName='ownerid')
            match self.next() {
                Some(Tok::Ident(p)) if p == "PropertyName" => {}
                other => {
                    return Err(ApiError::query(format!(
                        "{name} expects PropertyName='...', found {other:?}."
                    )))
                }
            }
            self.expect(Tok::Eq)?;
            let prop = match self.next() {
                Some(Tok::Str(s)) => s,
                other => {
                    return Err(ApiError::query(format!(
                        "{name} expects a quoted property name, found {other:?}."
                    )))
                }
            };
            self.expect(Tok::Close)?;
            return Ok(Filter::User(f, prop));
        }
        let prop = match self.next() {
            Some(Tok::Ident(p)) => p,
            other => {
                return Err(ApiError::query(format!(
                    "{name} expects a property, found {other:?}."
                )))
            }
        };
        self.expect(Tok::Comma)?;
        let text = match self.next() {
            Some(Tok::Str(s)) => s,
            other => {
                return Err(ApiError::query(format!(
                    "{name} expects a string literal, found {other:?}."
                )))
            }
        };
        self.expect(Tok::Close)?;
        match name {
            "contains" => Ok(Filter::Contains(prop, text)),
            "startswith" => Ok(Filter::StartsWith(prop, text)),
            "endswith" => Ok(Filter::EndsWith(prop, text)),
            other => Err(ApiError::query(format!(
                "The function '{other}' is not supported by the emulator."
            ))),
        }
    }
}

/// Parse a `$filter` expression.
pub fn parse_filter(text: &str) -> Result<Filter, ApiError> {
    if text.len() > FILTER_LEN_MAX {
        return Err(ApiError::query("The $filter is too long."));
    }
    let mut p = Parser {
        toks: tokenize(text)?,
        pos: 0,
        depth: 0,
    };
    let f = p.or()?;
    if p.pos != p.toks.len() {
        return Err(ApiError::query(format!(
            "Syntax error in $filter: unexpected {:?}.",
            p.peek()
        )));
    }
    Ok(f)
}

/// One `$orderby` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderBy {
    /// The property.
    pub prop: String,
    /// `desc`.
    pub descending: bool,
}

/// Parse `$orderby=name asc,createdon desc`.
pub fn parse_orderby(text: &str) -> Result<Vec<OrderBy>, ApiError> {
    text.split(',')
        .map(|part| {
            let mut words = part.split_whitespace();
            let prop = words
                .next()
                .ok_or_else(|| ApiError::query("Empty $orderby clause."))?
                .to_string();
            let descending = match words.next() {
                None | Some("asc") => false,
                Some("desc") => true,
                Some(other) => {
                    return Err(ApiError::query(format!(
                        "Syntax error in $orderby: '{other}'."
                    )))
                }
            };
            Ok(OrderBy { prop, descending })
        })
        .collect()
}

/// Parse `$select=a,b,c`.
pub fn parse_select(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(p: &str) -> Lit {
        match p {
            "name" => Lit::Str("Contoso Ltd".into()),
            "revenue" => Lit::Num(1000.0),
            "_ownerid_value" | "ownerid" => Lit::Guid(Uuid::from_u128(1)),
            "telephone1" => Lit::Null,
            _ => Lit::Null,
        }
    }

    #[test]
    fn parses_and_evaluates_filters() {
        let caller = CallerIds {
            user: Uuid::from_u128(1),
            teams: vec![],
            business_unit: Uuid::from_u128(9),
        };
        let cases = [
            ("name eq 'contoso ltd'", true),
            ("revenue gt 500 and revenue le 1000", true),
            ("revenue lt 500 or contains(name,'toso')", true),
            ("not (startswith(name,'Fab'))", true),
            ("endswith(name,'LTD') and telephone1 eq null", true),
            ("telephone1 ne null", false),
            (
                "Microsoft.Dynamics.CRM.EqualUserId(PropertyName='ownerid')",
                true,
            ),
            (
                "Microsoft.Dynamics.CRM.EqualBusinessId(PropertyName='ownerid')",
                false,
            ),
            (
                "Microsoft.Dynamics.CRM.EqualUserId(PropertyName='_ownerid_value')",
                true,
            ),
            (
                "_ownerid_value eq 00000000-0000-0000-0000-000000000001",
                true,
            ),
            ("name eq 'it''s'", false),
        ];
        for (text, expected) in cases {
            let f = parse_filter(text).unwrap();
            assert_eq!(f.eval(&row, &caller), expected, "{text}");
        }
        assert!(parse_filter("name eq").is_err());
        assert!(parse_filter("name xx 'a'").is_err());
        assert!(parse_filter("(name eq 'a'").is_err());
        assert!(parse_filter(&"(".repeat(200)).is_err());
    }

    #[test]
    fn decodes_queries_and_prefer() {
        let q = parse_query("$select=name,revenue&$filter=name%20eq%20'a+b'&$top=3");
        assert_eq!(q[1], ("$filter".into(), "name eq 'a b'".into()));
        let p = Prefer::parse(["odata.track-changes, odata.maxpagesize=10"].into_iter());
        assert!(p.track_changes);
        assert_eq!(p.max_page_size, Some(10));
        assert_eq!(percent_decode(&percent_encode("a b/c!%")), "a b/c!%");
    }
}
