//! The custom row filter language: conditions with the expression builder's operators, joined
//! with `and` / `or` and parentheses.
//!
//! ```text
//! statecode eq 0 and (ownerid eq-useroruserteams or msdyn_priority in (1, 2))
//! name like '%contoso%' and revenue ge 1000000.50 and createdon last-x-days 30
//! parentaccountid null or owningbusinessunit eq-businessid
//! ```
//!
//! Operators (the FetchXML names): `eq`, `ne`, `lt`, `le`, `gt`, `ge` (one literal), `in`
//! (a parenthesised list), `like` (`%` any run, `_` one character), `null`, `not-null`,
//! `eq-userid`, `eq-userteams`, `eq-useroruserteams`, `eq-businessid` (no operand),
//! `last-x-days N`, `next-x-days N`. `and` binds tighter than `or`.
//!
//! Literals: numbers, `'text'` (a `''` inside is one quote), `true`, `false`. A literal is read
//! as the column's type: `'2026-01-31'` for a datetime column, a UUID string for a lookup.
//!
//! Semantics, as Dataverse's: a comparison with an empty (null) column is false (`ne` too);
//! text compares case-insensitively; numbers compare across integer, decimal and float;
//! `last-x-days N` holds for instants in `[now - N days, now]`, `next-x-days N` for
//! `[now, now + N days]`, with `now` given by the caller.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use fieldsync_store::{ColumnType, OwnerKind, Table, Value};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::ProfileError;

/// Milliseconds in a day.
pub const DAY_MS: i64 = 86_400_000;

/// The user a filter is evaluated for: the values `eq-userid` and friends compare with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserContext {
    /// The user's id.
    pub user: Uuid,
    /// The user's teams.
    pub teams: Vec<Uuid>,
    /// The user's business unit.
    pub business_unit: Uuid,
    /// The current instant, ms since the Unix epoch (for last/next X days).
    pub now_ms: i64,
}

/// An operator and its operand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// Equal to a value.
    Eq(Value),
    /// Not equal to a value (and not null).
    Ne(Value),
    /// Less than.
    Lt(Value),
    /// Less than or equal.
    Le(Value),
    /// Greater than.
    Gt(Value),
    /// Greater than or equal.
    Ge(Value),
    /// One of the values.
    In(Vec<Value>),
    /// Text matching a pattern with `%` and `_` wildcards.
    Like(String),
    /// Empty.
    Null,
    /// Not empty.
    NotNull,
    /// The current user (an owner or a lookup holding the user's id).
    EqUserId,
    /// One of the current user's teams.
    EqUserTeams,
    /// The current user or one of the user's teams.
    EqUserOrUserTeams,
    /// The current user's business unit.
    EqBusinessId,
    /// An instant in the last N days.
    LastXDays(u32),
    /// An instant in the next N days.
    NextXDays(u32),
}

impl Op {
    /// The FetchXML name of the operator.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Eq(_) => "eq",
            Op::Ne(_) => "ne",
            Op::Lt(_) => "lt",
            Op::Le(_) => "le",
            Op::Gt(_) => "gt",
            Op::Ge(_) => "ge",
            Op::In(_) => "in",
            Op::Like(_) => "like",
            Op::Null => "null",
            Op::NotNull => "not-null",
            Op::EqUserId => "eq-userid",
            Op::EqUserTeams => "eq-userteams",
            Op::EqUserOrUserTeams => "eq-useroruserteams",
            Op::EqBusinessId => "eq-businessid",
            Op::LastXDays(_) => "last-x-days",
            Op::NextXDays(_) => "next-x-days",
        }
    }

    /// Whether the result depends on who the user is.
    pub fn is_user_dependent(&self) -> bool {
        matches!(
            self,
            Op::EqUserId | Op::EqUserTeams | Op::EqUserOrUserTeams | Op::EqBusinessId
        )
    }

    /// Whether the result depends on the current time.
    pub fn is_time_dependent(&self) -> bool {
        matches!(self, Op::LastXDays(_) | Op::NextXDays(_))
    }
}

/// Every operator name fieldsync supports, as FetchXML spells them.
pub const SUPPORTED_OPERATORS: [&str; 16] = [
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "in",
    "like",
    "null",
    "not-null",
    "eq-userid",
    "eq-userteams",
    "eq-useroruserteams",
    "eq-businessid",
    "last-x-days",
    "next-x-days",
];

/// One condition: a column and an operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    /// The column's logical name.
    pub column: String,
    /// The operator with its operand.
    pub op: Op,
}

/// A filter expression.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Expr {
    /// Every part holds (an empty `And` is true).
    And(Vec<Expr>),
    /// Some part holds (an empty `Or` is false).
    Or(Vec<Expr>),
    /// A single condition.
    Cond(Condition),
}

impl Expr {
    /// Every condition, depth first.
    pub fn conditions(&self) -> Vec<&Condition> {
        let mut out = Vec::new();
        self.walk(&mut out);
        out
    }

    fn walk<'a>(&'a self, out: &mut Vec<&'a Condition>) {
        match self {
            Expr::And(v) | Expr::Or(v) => v.iter().for_each(|e| e.walk(out)),
            Expr::Cond(c) => out.push(c),
        }
    }

    /// Whether the expression depends on who the user is.
    pub fn is_user_dependent(&self) -> bool {
        self.conditions().iter().any(|c| c.op.is_user_dependent())
    }

    /// Whether the expression depends on the current time.
    pub fn is_time_dependent(&self) -> bool {
        self.conditions().iter().any(|c| c.op.is_time_dependent())
    }

    /// Evaluate for a row's values and a user.
    pub fn matches(&self, values: &BTreeMap<String, Value>, ctx: &UserContext) -> bool {
        match self {
            Expr::And(v) => v.iter().all(|e| e.matches(values, ctx)),
            Expr::Or(v) => v.iter().any(|e| e.matches(values, ctx)),
            Expr::Cond(c) => c.matches(values.get(&c.column).unwrap_or(&Value::Null), ctx),
        }
    }

    /// Parse the text form (see the module docs) and check it against a table.
    pub fn parse(text: &str, table: &Table) -> Result<Expr, ProfileError> {
        let tokens = tokenize(text)?;
        let mut p = Parser {
            tokens,
            pos: 0,
            table,
        };
        let e = p.or_expr()?;
        if p.pos != p.tokens.len() {
            return Err(p.error("unexpected text after the end of the expression"));
        }
        Ok(e)
    }

    /// Check columns, operand types and operator fitness against a table.
    pub fn check(&self, table: &Table) -> Result<(), ProfileError> {
        for c in self.conditions() {
            check_condition(table, c)?;
        }
        Ok(())
    }
}

fn check_condition(table: &Table, c: &Condition) -> Result<(), ProfileError> {
    let bad = |why: &str| ProfileError::InvalidFilter {
        table: table.name.clone(),
        reason: format!("`{} {}`: {why}", c.column, c.op.name()),
    };
    let col = table
        .column(&c.column)
        .ok_or_else(|| ProfileError::UnknownColumn {
            table: table.name.clone(),
            column: c.column.clone(),
        })?;
    let ty = col.ty;
    let fits = |v: &Value| v.is_null() || v.column_type() == Some(ty);
    match &c.op {
        Op::Eq(v) | Op::Ne(v) if !fits(v) => Err(bad("the value does not fit the column")),
        Op::Lt(v) | Op::Le(v) | Op::Gt(v) | Op::Ge(v) => {
            if matches!(
                ty,
                ColumnType::Lookup
                    | ColumnType::Owner
                    | ColumnType::File
                    | ColumnType::Image
                    | ColumnType::Boolean
            ) {
                Err(bad("the column's values have no order"))
            } else if !fits(v) {
                Err(bad("the value does not fit the column"))
            } else {
                Ok(())
            }
        }
        Op::In(vs) if !vs.iter().all(fits) => Err(bad("a value does not fit the column")),
        Op::Like(_) if !matches!(ty, ColumnType::Text | ColumnType::Memo) => {
            Err(bad("like applies to text columns"))
        }
        Op::EqUserId | Op::EqUserTeams | Op::EqUserOrUserTeams | Op::EqBusinessId
            if !matches!(ty, ColumnType::Lookup | ColumnType::Owner) =>
        {
            Err(bad("applies to owner and lookup columns"))
        }
        Op::LastXDays(_) | Op::NextXDays(_) if ty != ColumnType::DateTime => {
            Err(bad("applies to datetime columns"))
        }
        _ => Ok(()),
    }
}

fn id_of(v: &Value) -> Option<(Option<OwnerKind>, Uuid)> {
    match v {
        Value::Owner(o) => Some((Some(o.kind), o.id)),
        Value::Lookup(id) => Some((None, *id)),
        _ => None,
    }
}

fn num(v: &Value) -> Option<f64> {
    use rust_decimal::prelude::ToPrimitive;
    match v {
        Value::Integer(i) => Some(*i as f64),
        Value::Decimal(d) => d.to_f64(),
        Value::Float(f) => Some(*f),
        _ => None,
    }
}

/// Compare two non-null values of compatible types (`None`: not comparable).
pub fn compare(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Text(x) | Value::Memo(x), Value::Text(y) | Value::Memo(y)) => {
            Some(x.to_lowercase().cmp(&y.to_lowercase()))
        }
        (Value::Decimal(x), Value::Decimal(y)) => Some(x.cmp(y)),
        (Value::Integer(x), Value::Integer(y)) => Some(x.cmp(y)),
        (Value::Boolean(x), Value::Boolean(y)) => Some(x.cmp(y)),
        (Value::DateTime(x), Value::DateTime(y)) => Some(x.cmp(y)),
        (Value::Choice(x), Value::Choice(y)) => Some(x.cmp(y)),
        (Value::Lookup(x), Value::Lookup(y)) => Some(x.cmp(y)),
        (Value::Owner(x), Value::Owner(y)) => Some(x.cmp(y)),
        (Value::Owner(x), Value::Lookup(y)) | (Value::Lookup(y), Value::Owner(x)) => {
            Some(x.id.cmp(y))
        }
        _ => num(a)?.partial_cmp(&num(b)?),
    }
}

/// `%` matches any run of characters, `_` exactly one; case-insensitive.
pub fn like(text: &str, pattern: &str) -> bool {
    let t: Vec<char> = text.to_lowercase().chars().collect();
    let p: Vec<char> = pattern.to_lowercase().chars().collect();
    // Classic wildcard matching with backtracking on the last `%`.
    let (mut ti, mut pi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '_' || (p[pi] != '%' && p[pi] == t[ti])) {
            ti += 1;
            pi += 1;
        } else if pi < p.len() && p[pi] == '%' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '%')
}

impl Condition {
    /// Whether a column value satisfies the condition for a user.
    pub fn matches(&self, v: &Value, ctx: &UserContext) -> bool {
        let cmp = |x: &Value| if v.is_null() { None } else { compare(v, x) };
        match &self.op {
            Op::Null => v.is_null(),
            Op::NotNull => !v.is_null(),
            Op::Eq(x) => cmp(x) == Some(Ordering::Equal),
            Op::Ne(x) => matches!(cmp(x), Some(o) if o != Ordering::Equal),
            Op::Lt(x) => cmp(x) == Some(Ordering::Less),
            Op::Le(x) => matches!(cmp(x), Some(Ordering::Less | Ordering::Equal)),
            Op::Gt(x) => cmp(x) == Some(Ordering::Greater),
            Op::Ge(x) => matches!(cmp(x), Some(Ordering::Greater | Ordering::Equal)),
            Op::In(xs) => xs.iter().any(|x| cmp(x) == Some(Ordering::Equal)),
            Op::Like(p) => match v {
                Value::Text(s) | Value::Memo(s) => like(s, p),
                _ => false,
            },
            Op::EqUserId => {
                matches!(id_of(v), Some((k, id)) if k != Some(OwnerKind::Team) && id == ctx.user)
            }
            Op::EqUserTeams => {
                matches!(id_of(v), Some((k, id)) if k != Some(OwnerKind::User) && ctx.teams.contains(&id))
            }
            Op::EqUserOrUserTeams => match id_of(v) {
                Some((Some(OwnerKind::User), id)) => id == ctx.user,
                Some((Some(OwnerKind::Team), id)) => ctx.teams.contains(&id),
                Some((None, id)) => id == ctx.user || ctx.teams.contains(&id),
                None => false,
            },
            Op::EqBusinessId => matches!(id_of(v), Some((None, id)) if id == ctx.business_unit),
            Op::LastXDays(n) => match v {
                Value::DateTime(t) => *t <= ctx.now_ms && *t >= ctx.now_ms - i64::from(*n) * DAY_MS,
                _ => false,
            },
            Op::NextXDays(n) => match v {
                Value::DateTime(t) => *t >= ctx.now_ms && *t <= ctx.now_ms + i64::from(*n) * DAY_MS,
                _ => false,
            },
        }
    }
}

/// The literal text form of a value in the expression language.
pub fn literal(v: &Value) -> String {
    match v {
        Value::Integer(_)
        | Value::Decimal(_)
        | Value::Float(_)
        | Value::Boolean(_)
        | Value::Choice(_) => v.to_string(),
        Value::Null => "null".to_string(),
        other => format!("'{}'", other.to_string().replace('\'', "''")),
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.column, self.op.name())?;
        match &self.op {
            Op::Eq(v) | Op::Ne(v) | Op::Lt(v) | Op::Le(v) | Op::Gt(v) | Op::Ge(v) => {
                write!(f, " {}", literal(v))
            }
            Op::In(vs) => {
                let parts: Vec<String> = vs.iter().map(literal).collect();
                write!(f, " ({})", parts.join(", "))
            }
            Op::Like(p) => write!(f, " '{}'", p.replace('\'', "''")),
            Op::LastXDays(n) | Op::NextXDays(n) => write!(f, " {n}"),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn part(e: &Expr, f: &mut fmt::Formatter<'_>, parent_and: bool) -> fmt::Result {
            match e {
                Expr::Cond(c) => write!(f, "{c}"),
                Expr::And(v) | Expr::Or(v) => {
                    let is_and = matches!(e, Expr::And(_));
                    if let [only] = v.as_slice() {
                        // A group of one is its part (parsing normalizes it the same way).
                        return part(only, f, parent_and);
                    }
                    // `or` inside `and` needs parentheses; so does an empty group.
                    let paren = (parent_and && !is_and) || v.is_empty();
                    if paren {
                        f.write_str("(")?;
                    }
                    if v.is_empty() {
                        f.write_str(if is_and { "and" } else { "or" })?;
                    }
                    for (i, x) in v.iter().enumerate() {
                        if i > 0 {
                            f.write_str(if is_and { " and " } else { " or " })?;
                        }
                        let nested_same = matches!(
                            (e, x),
                            (Expr::And(_), Expr::And(_)) | (Expr::Or(_), Expr::Or(_))
                        );
                        if nested_same {
                            f.write_str("(")?;
                            part(x, f, false)?;
                            f.write_str(")")?;
                        } else {
                            part(x, f, is_and)?;
                        }
                    }
                    if paren {
                        f.write_str(")")?;
                    }
                    Ok(())
                }
            }
        }
        part(self, f, false)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    Open,
    Close,
    Comma,
}

fn tokenize(text: &str) -> Result<Vec<Tok>, ProfileError> {
    let mut out = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '(' {
            out.push(Tok::Open);
            i += 1;
        } else if c == ')' {
            out.push(Tok::Close);
            i += 1;
        } else if c == ',' {
            out.push(Tok::Comma);
            i += 1;
        } else if c == '\'' {
            let mut s = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => {
                        return Err(ProfileError::FilterSyntax {
                            text: text.to_string(),
                            reason: "unterminated 'text'".into(),
                        })
                    }
                    Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                        s.push('\'');
                        i += 2;
                    }
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some(ch) => {
                        s.push(*ch);
                        i += 1;
                    }
                }
            }
            out.push(Tok::Str(s));
        } else {
            let start = i;
            while i < chars.len()
                && !chars[i].is_whitespace()
                && !matches!(chars[i], '(' | ')' | ',' | '\'')
            {
                i += 1;
            }
            out.push(Tok::Word(chars[start..i].iter().collect()));
        }
    }
    Ok(out)
}

struct Parser<'a> {
    tokens: Vec<Tok>,
    pos: usize,
    table: &'a Table,
}

impl Parser<'_> {
    fn error(&self, reason: &str) -> ProfileError {
        ProfileError::FilterSyntax {
            text: format!("{:?}", self.tokens.get(self.pos)),
            reason: format!("{reason} (table `{}`)", self.table.name),
        }
    }

    fn peek_word(&self, w: &str) -> bool {
        matches!(self.tokens.get(self.pos), Some(Tok::Word(x)) if x.eq_ignore_ascii_case(w))
    }

    fn or_expr(&mut self) -> Result<Expr, ProfileError> {
        let mut parts = vec![self.and_expr()?];
        while self.peek_word("or") {
            self.pos += 1;
            parts.push(self.and_expr()?);
        }
        Ok(if parts.len() == 1 {
            parts.pop().unwrap_or(Expr::Or(Vec::new()))
        } else {
            Expr::Or(parts)
        })
    }

    fn and_expr(&mut self) -> Result<Expr, ProfileError> {
        let mut parts = vec![self.unary()?];
        while self.peek_word("and") {
            self.pos += 1;
            parts.push(self.unary()?);
        }
        Ok(if parts.len() == 1 {
            parts.pop().unwrap_or(Expr::And(Vec::new()))
        } else {
            Expr::And(parts)
        })
    }

    fn unary(&mut self) -> Result<Expr, ProfileError> {
        match self.tokens.get(self.pos).cloned() {
            Some(Tok::Open) => {
                self.pos += 1;
                // `(and)` / `(or)`: the empty groups, as Display writes them.
                let e = if matches!(self.tokens.get(self.pos + 1), Some(Tok::Close))
                    && (self.peek_word("and") || self.peek_word("or"))
                {
                    let is_and = self.peek_word("and");
                    self.pos += 1;
                    if is_and {
                        Expr::And(Vec::new())
                    } else {
                        Expr::Or(Vec::new())
                    }
                } else {
                    self.or_expr()?
                };
                if self.tokens.get(self.pos) != Some(&Tok::Close) {
                    return Err(self.error("expected `)`"));
                }
                self.pos += 1;
                Ok(e)
            }
            Some(Tok::Word(column)) => {
                self.pos += 1;
                self.condition(column).map(Expr::Cond)
            }
            _ => Err(self.error("expected a condition or `(`")),
        }
    }

    fn literal(&mut self, ty: ColumnType) -> Result<Value, ProfileError> {
        let tok = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        let text = match tok {
            Some(Tok::Word(w)) | Some(Tok::Str(w)) => w,
            _ => return Err(self.error("expected a value")),
        };
        if ty == ColumnType::Text || ty == ColumnType::Memo {
            return Ok(Value::Text(text));
        }
        Value::parse(ty, &text).map_err(|e| ProfileError::InvalidFilter {
            table: self.table.name.clone(),
            reason: e.to_string(),
        })
    }

    fn condition(&mut self, column: String) -> Result<Condition, ProfileError> {
        let col = self
            .table
            .column(&column)
            .ok_or_else(|| ProfileError::UnknownColumn {
                table: self.table.name.clone(),
                column: column.clone(),
            })?;
        let ty = col.ty;
        let op_name = match self.tokens.get(self.pos) {
            Some(Tok::Word(w)) => w.to_ascii_lowercase(),
            _ => return Err(self.error("expected an operator")),
        };
        self.pos += 1;
        let days = |p: &mut Self| -> Result<u32, ProfileError> {
            match p.tokens.get(p.pos).cloned() {
                Some(Tok::Word(w)) => {
                    p.pos += 1;
                    w.parse().map_err(|_| p.error("expected a number of days"))
                }
                _ => Err(p.error("expected a number of days")),
            }
        };
        let op = match op_name.as_str() {
            "eq" => Op::Eq(self.literal(ty)?),
            "ne" => Op::Ne(self.literal(ty)?),
            "lt" => Op::Lt(self.literal(ty)?),
            "le" => Op::Le(self.literal(ty)?),
            "gt" => Op::Gt(self.literal(ty)?),
            "ge" => Op::Ge(self.literal(ty)?),
            "like" => match self.tokens.get(self.pos).cloned() {
                Some(Tok::Str(s)) | Some(Tok::Word(s)) => {
                    self.pos += 1;
                    Op::Like(s)
                }
                _ => return Err(self.error("expected a 'pattern'")),
            },
            "in" => {
                if self.tokens.get(self.pos) != Some(&Tok::Open) {
                    return Err(self.error("expected `(` after in"));
                }
                self.pos += 1;
                let mut vs = Vec::new();
                loop {
                    vs.push(self.literal(ty)?);
                    match self.tokens.get(self.pos) {
                        Some(Tok::Comma) => self.pos += 1,
                        Some(Tok::Close) => {
                            self.pos += 1;
                            break;
                        }
                        _ => return Err(self.error("expected `,` or `)` in a list")),
                    }
                }
                Op::In(vs)
            }
            "null" => Op::Null,
            "not-null" => Op::NotNull,
            "eq-userid" => Op::EqUserId,
            "eq-userteams" => Op::EqUserTeams,
            "eq-useroruserteams" => Op::EqUserOrUserTeams,
            "eq-businessid" => Op::EqBusinessId,
            "last-x-days" => Op::LastXDays(days(self)?),
            "next-x-days" => Op::NextXDays(days(self)?),
            other => {
                return Err(ProfileError::UnsupportedOperator {
                    operator: other.to_string(),
                })
            }
        };
        let c = Condition { column, op };
        check_condition(self.table, &c)?;
        Ok(c)
    }
}
