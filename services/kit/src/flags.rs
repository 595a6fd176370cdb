//! Feature flags with OpenFeature semantics, evaluated in-process.
//!
//! A flag document (`kind = flag`) holds its variants — all booleans, all strings,
//! all numbers or all objects — a default variant, whether it is enabled, targeting
//! rules tried in order, and an optional fractional rollout:
//!
//! ```json
//! {
//!   "enabled": true,
//!   "variants": {"on": true, "off": false},
//!   "default_variant": "off",
//!   "rules": [
//!     {"when": {"attribute": "tenant", "op": "in", "value": ["acme", "globex"]}, "variant": "on"},
//!     {"when": {"all": [{"attribute": "app_version", "op": "semver_gte", "value": "2.1.0"},
//!                       {"not": {"attribute": "email", "op": "ends_with", "value": "@test.example"}}]},
//!      "rollout": [{"variant": "on", "weight": 20}, {"variant": "off", "weight": 80}]}
//!   ],
//!   "rollout": [{"variant": "on", "weight": 5}, {"variant": "off", "weight": 95}]
//! }
//! ```
//!
//! Operators: `equals`, `not_equals`, `in`, `not_in`, `starts_with`, `ends_with`,
//! `gt`, `gte`, `lt`, `lte` (numbers), `semver_eq`, `semver_gt`, `semver_gte`,
//! `semver_lt`, `semver_lte`; combinators `all`, `any`, `not`. The attribute
//! `targetingKey` is the context's targeting key. A missing attribute or a value of
//! the wrong type makes a condition false, never an error.
//!
//! Rollouts bucket the targeting key by consistent hashing: MurmurHash3 (x86, 32 bit,
//! seed 0) of `"<flag key>/<targeting key>"` scaled to 10,000 buckets, then
//! cumulative weights (whole percentages that sum to 100). The same key lands in the
//! same variant in every service and after every restart, and raising a variant's
//! weight only moves keys into it.
//!
//! [`Flag::parse`] checks a document and lists every problem with its JSON path (the
//! config service uses it to refuse bad flags); evaluation never fails on a parsed
//! flag except for a missing targeting key where a rollout needs one.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

/// The value type of a flag, from its variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagType {
    Boolean,
    String,
    Number,
    Object,
}

impl FlagType {
    fn of(v: &Value) -> Option<Self> {
        match v {
            Value::Bool(_) => Some(FlagType::Boolean),
            Value::String(_) => Some(FlagType::String),
            Value::Number(_) => Some(FlagType::Number),
            Value::Object(_) => Some(FlagType::Object),
            Value::Null | Value::Array(_) => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FlagType::Boolean => "boolean",
            FlagType::String => "string",
            FlagType::Number => "number",
            FlagType::Object => "object",
        }
    }
}

/// Why an evaluation gave its value (the OpenFeature reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No rules and no rollout: the default variant, always.
    Static,
    /// Rules exist but none matched, and there is no rollout.
    Default,
    TargetingMatch,
    /// A fractional rollout chose the variant.
    Split,
    Disabled,
    Error,
}

impl Reason {
    /// The OFREP / OpenFeature spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Static => "STATIC",
            Reason::Default => "DEFAULT",
            Reason::TargetingMatch => "TARGETING_MATCH",
            Reason::Split => "SPLIT",
            Reason::Disabled => "DISABLED",
            Reason::Error => "ERROR",
        }
    }
}

/// The OpenFeature error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    FlagNotFound,
    ParseError,
    TypeMismatch,
    TargetingKeyMissing,
    InvalidContext,
    General,
}

impl ErrorCode {
    /// The OFREP / OpenFeature spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::FlagNotFound => "FLAG_NOT_FOUND",
            ErrorCode::ParseError => "PARSE_ERROR",
            ErrorCode::TypeMismatch => "TYPE_MISMATCH",
            ErrorCode::TargetingKeyMissing => "TARGETING_KEY_MISSING",
            ErrorCode::InvalidContext => "INVALID_CONTEXT",
            ErrorCode::General => "GENERAL",
        }
    }
}

/// What an evaluation is about: the targeting key and any attributes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvaluationContext {
    pub targeting_key: Option<String>,
    pub attributes: Map<String, Value>,
}

impl EvaluationContext {
    fn attribute(&self, name: &str) -> Option<Value> {
        if name == TARGETING_KEY {
            return self.targeting_key.clone().map(Value::String);
        }
        self.attributes.get(name).cloned()
    }

    fn attribute_ref<'a>(&'a self, name: &str) -> Option<AttrRef<'a>> {
        if name == TARGETING_KEY {
            return self.targeting_key.as_deref().map(AttrRef::Str);
        }
        self.attributes.get(name).map(AttrRef::Value)
    }
}

enum AttrRef<'a> {
    Str(&'a str),
    Value(&'a Value),
}

impl AttrRef<'_> {
    fn as_str(&self) -> Option<&str> {
        match self {
            AttrRef::Str(s) => Some(s),
            AttrRef::Value(Value::String(s)) => Some(s),
            AttrRef::Value(_) => None,
        }
    }

    fn as_f64(&self) -> Option<f64> {
        match self {
            AttrRef::Str(_) => None,
            AttrRef::Value(v) => v.as_f64(),
        }
    }

    fn equals(&self, other: &Value) -> bool {
        match (self, other) {
            (AttrRef::Str(s), Value::String(o)) => s == o,
            (AttrRef::Str(_), _) => false,
            (AttrRef::Value(Value::Number(a)), Value::Number(b)) => a.as_f64() == b.as_f64(),
            (AttrRef::Value(v), o) => *v == o,
        }
    }
}

/// The attribute name that means the context's targeting key.
pub const TARGETING_KEY: &str = "targetingKey";

/// The result of evaluating one flag.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub key: String,
    /// The chosen variant's value (`None` only when the flag does not exist).
    pub value: Option<Value>,
    pub variant: Option<String>,
    pub reason: Reason,
    pub error: Option<(ErrorCode, String)>,
}

/// One problem in a flag document, with its JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagProblem {
    pub path: String,
    pub problem: String,
}

impl fmt::Display for FlagProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.problem)
    }
}

/// A fractional rollout: cumulative bucket bounds (out of 10,000) per variant.
#[derive(Debug, Clone, PartialEq)]
struct Rollout {
    /// (exclusive upper bucket, variant index)
    slices: Vec<(u32, usize)>,
}

#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Variant(usize),
    Rollout(Rollout),
}

#[derive(Debug, Clone, PartialEq)]
struct Rule {
    when: Condition,
    then: Outcome,
}

#[derive(Debug, Clone, PartialEq)]
enum Condition {
    All(Vec<Condition>),
    Any(Vec<Condition>),
    Not(Box<Condition>),
    Compare { attribute: String, op: Op },
}

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Equals(Value),
    NotEquals(Value),
    In(Vec<Value>),
    NotIn(Vec<Value>),
    StartsWith(String),
    EndsWith(String),
    Num(NumOp, f64),
    Semver(NumOp, Semver),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NumOp {
    Eq,
    Gt,
    Gte,
    Lt,
    Lte,
}

impl NumOp {
    fn holds(self, ord: std::cmp::Ordering) -> bool {
        use std::cmp::Ordering::{Equal, Greater, Less};
        match self {
            NumOp::Eq => ord == Equal,
            NumOp::Gt => ord == Greater,
            NumOp::Gte => ord != Less,
            NumOp::Lt => ord == Less,
            NumOp::Lte => ord != Greater,
        }
    }
}

/// A semantic version (`1.2.3`, `v1.2.3-rc.1`; build metadata ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Semver {
    major: u64,
    minor: u64,
    patch: u64,
    pre: Vec<PreId>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum PreId {
    // Numeric identifiers sort before alphanumeric ones.
    Num(u64),
    Alpha(String),
}

impl Semver {
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.strip_prefix('v').unwrap_or(s);
        let s = s.split('+').next()?;
        let (core, pre) = match s.split_once('-') {
            Some((c, p)) => (c, Some(p)),
            None => (s, None),
        };
        let mut parts = core.split('.');
        let num = |p: Option<&str>| -> Option<u64> {
            let p = p?;
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            p.parse().ok()
        };
        let major = num(parts.next())?;
        let minor = num(parts.next())?;
        let patch = num(parts.next())?;
        if parts.next().is_some() {
            return None;
        }
        let pre = match pre {
            None => Vec::new(),
            Some(p) => p
                .split('.')
                .map(|id| {
                    if id.is_empty() {
                        None
                    } else if id.bytes().all(|b| b.is_ascii_digit()) {
                        id.parse().ok().map(PreId::Num)
                    } else {
                        Some(PreId::Alpha(id.to_owned()))
                    }
                })
                .collect::<Option<Vec<_>>>()?,
        };
        Some(Self {
            major,
            minor,
            patch,
            pre,
        })
    }
}

impl PartialOrd for Semver {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Semver {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.major, self.minor, self.patch)
            .cmp(&(other.major, other.minor, other.patch))
            .then_with(|| match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => std::cmp::Ordering::Equal,
                // A pre-release sorts before its release.
                (true, false) => std::cmp::Ordering::Greater,
                (false, true) => std::cmp::Ordering::Less,
                (false, false) => self.pre.cmp(&other.pre),
            })
    }
}

impl Condition {
    fn matches(&self, ctx: &EvaluationContext) -> bool {
        match self {
            Condition::All(cs) => cs.iter().all(|c| c.matches(ctx)),
            Condition::Any(cs) => cs.iter().any(|c| c.matches(ctx)),
            Condition::Not(c) => !c.matches(ctx),
            Condition::Compare { attribute, op } => {
                let Some(attr) = ctx.attribute_ref(attribute) else {
                    return false;
                };
                match op {
                    Op::Equals(v) => attr.equals(v),
                    Op::NotEquals(v) => !attr.equals(v),
                    Op::In(vs) => vs.iter().any(|v| attr.equals(v)),
                    Op::NotIn(vs) => !vs.iter().any(|v| attr.equals(v)),
                    Op::StartsWith(p) => attr.as_str().is_some_and(|s| s.starts_with(p.as_str())),
                    Op::EndsWith(p) => attr.as_str().is_some_and(|s| s.ends_with(p.as_str())),
                    Op::Num(op, n) => attr
                        .as_f64()
                        .and_then(|a| a.partial_cmp(n))
                        .is_some_and(|o| op.holds(o)),
                    Op::Semver(op, v) => attr
                        .as_str()
                        .and_then(Semver::parse)
                        .is_some_and(|a| op.holds(a.cmp(v))),
                }
            }
        }
    }
}

/// A checked flag, ready to evaluate.
#[derive(Debug, Clone, PartialEq)]
pub struct Flag {
    key: String,
    enabled: bool,
    flag_type: FlagType,
    variant_names: Vec<String>,
    variant_values: Vec<Value>,
    default_variant: usize,
    rules: Vec<Rule>,
    rollout: Option<Rollout>,
}

/// Buckets a rollout divides keys into.
pub const BUCKETS: u32 = 10_000;

/// The bucket (0..[`BUCKETS`]) of a targeting key for a flag: stable everywhere.
pub fn bucket(flag_key: &str, targeting_key: &str) -> u32 {
    let mut buf = [0u8; 256];
    let total = flag_key.len() + 1 + targeting_key.len();
    let hash = if total <= buf.len() {
        buf[..flag_key.len()].copy_from_slice(flag_key.as_bytes());
        buf[flag_key.len()] = b'/';
        buf[flag_key.len() + 1..total].copy_from_slice(targeting_key.as_bytes());
        murmur3_32(&buf[..total], 0)
    } else {
        murmur3_32(format!("{flag_key}/{targeting_key}").as_bytes(), 0)
    };
    u32::try_from((u64::from(hash) * u64::from(BUCKETS)) >> 32).unwrap_or(BUCKETS - 1)
}

/// MurmurHash3, x86 32-bit variant.
pub fn murmur3_32(data: &[u8], seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mut h = seed;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let tail = chunks.remainder();
    let mut k: u32 = 0;
    for (i, b) in tail.iter().enumerate() {
        k ^= u32::from(*b) << (8 * i);
    }
    if !tail.is_empty() {
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
    }
    // Lengths above 4 GiB wrap, as in the reference implementation.
    h ^= data.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

impl Rollout {
    fn pick(&self, bucket: u32) -> usize {
        for (upper, variant) in &self.slices {
            if bucket < *upper {
                return *variant;
            }
        }
        // Weights sum to 100, so the last slice ends at BUCKETS.
        self.slices.last().map_or(0, |s| s.1)
    }
}

struct Parser<'a> {
    problems: Vec<FlagProblem>,
    variants: &'a [String],
}

impl Parser<'_> {
    fn add(&mut self, path: impl Into<String>, problem: impl Into<String>) {
        self.problems.push(FlagProblem {
            path: path.into(),
            problem: problem.into(),
        });
    }

    fn variant(&mut self, v: Option<&Value>, path: &str) -> Option<usize> {
        match v {
            Some(Value::String(name)) => match self.variants.iter().position(|n| n == name) {
                Some(i) => Some(i),
                None => {
                    self.add(path, format!("{name:?} is not one of the variants"));
                    None
                }
            },
            Some(other) => {
                self.add(
                    path,
                    format!("must be a variant name, not {}", type_name(other)),
                );
                None
            }
            None => {
                self.add(path, "is required");
                None
            }
        }
    }

    fn rollout(&mut self, v: &Value, path: &str) -> Option<Rollout> {
        let Value::Array(items) = v else {
            self.add(path, format!("must be an array, not {}", type_name(v)));
            return None;
        };
        if items.is_empty() {
            self.add(path, "must not be empty");
            return None;
        }
        let mut slices = Vec::with_capacity(items.len());
        let mut total: u64 = 0;
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let p = format!("{path}[{i}]");
            let Value::Object(o) = item else {
                self.add(&p, format!("must be an object, not {}", type_name(item)));
                ok = false;
                continue;
            };
            for k in o.keys() {
                if k != "variant" && k != "weight" {
                    self.add(format!("{p}.{k}"), "is not a known field (variant, weight)");
                    ok = false;
                }
            }
            let variant = self.variant(o.get("variant"), &format!("{p}.variant"));
            let weight = match o.get("weight") {
                Some(Value::Number(n)) => match n.as_u64() {
                    Some(w) if w <= 100 => Some(w),
                    _ => {
                        self.add(
                            format!("{p}.weight"),
                            "must be a whole percentage from 0 to 100",
                        );
                        None
                    }
                },
                Some(other) => {
                    self.add(
                        format!("{p}.weight"),
                        format!("must be a number, not {}", type_name(other)),
                    );
                    None
                }
                None => {
                    self.add(format!("{p}.weight"), "is required");
                    None
                }
            };
            match (variant, weight) {
                (Some(v), Some(w)) => {
                    total += w;
                    let upper = u32::try_from(total.min(100)).unwrap_or(100) * (BUCKETS / 100);
                    slices.push((upper, v));
                }
                _ => ok = false,
            }
        }
        if ok && total != 100 {
            self.add(
                path,
                format!("weights must sum to 100 (they sum to {total})"),
            );
            return None;
        }
        ok.then_some(Rollout { slices })
    }

    fn condition(&mut self, v: &Value, path: &str, depth: usize) -> Option<Condition> {
        if depth > 32 {
            self.add(path, "is nested more than 32 levels deep");
            return None;
        }
        let Value::Object(o) = v else {
            self.add(path, format!("must be an object, not {}", type_name(v)));
            return None;
        };
        for combinator in ["all", "any"] {
            if let Some(list) = o.get(combinator) {
                if o.len() != 1 {
                    self.add(path, format!("`{combinator}` must be the only field"));
                    return None;
                }
                let Value::Array(items) = list else {
                    self.add(
                        format!("{path}.{combinator}"),
                        format!("must be an array, not {}", type_name(list)),
                    );
                    return None;
                };
                let mut out = Vec::with_capacity(items.len());
                let mut ok = true;
                for (i, item) in items.iter().enumerate() {
                    match self.condition(item, &format!("{path}.{combinator}[{i}]"), depth + 1) {
                        Some(c) => out.push(c),
                        None => ok = false,
                    }
                }
                return ok.then(|| {
                    if combinator == "all" {
                        Condition::All(out)
                    } else {
                        Condition::Any(out)
                    }
                });
            }
        }
        if let Some(inner) = o.get("not") {
            if o.len() != 1 {
                self.add(path, "`not` must be the only field");
                return None;
            }
            return self
                .condition(inner, &format!("{path}.not"), depth + 1)
                .map(|c| Condition::Not(Box::new(c)));
        }
        for k in o.keys() {
            if !matches!(k.as_str(), "attribute" | "op" | "value") {
                self.add(
                    format!("{path}.{k}"),
                    "is not a known field (attribute, op, value; or all, any, not)",
                );
            }
        }
        let attribute = match o.get("attribute") {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(_) => {
                self.add(format!("{path}.attribute"), "must be a non-empty string");
                None
            }
            None => {
                self.add(format!("{path}.attribute"), "is required");
                None
            }
        };
        let value = o.get("value");
        let vpath = format!("{path}.value");
        let op = match o.get("op") {
            Some(Value::String(op)) => self.op(op, value, &vpath, &format!("{path}.op")),
            Some(_) => {
                self.add(format!("{path}.op"), "must be a string");
                None
            }
            None => {
                self.add(format!("{path}.op"), "is required");
                None
            }
        };
        Some(Condition::Compare {
            attribute: attribute?,
            op: op?,
        })
    }

    fn op(&mut self, op: &str, value: Option<&Value>, vpath: &str, opath: &str) -> Option<Op> {
        let Some(value) = value else {
            self.add(vpath, "is required");
            return None;
        };
        let scalar = |p: &mut Self| -> Option<Value> {
            match value {
                Value::String(_) | Value::Number(_) | Value::Bool(_) => Some(value.clone()),
                other => {
                    p.add(
                        vpath,
                        format!(
                            "must be a string, number or boolean, not {}",
                            type_name(other)
                        ),
                    );
                    None
                }
            }
        };
        let list = |p: &mut Self| -> Option<Vec<Value>> {
            match value {
                Value::Array(items) => Some(items.clone()),
                other => {
                    p.add(vpath, format!("must be an array, not {}", type_name(other)));
                    None
                }
            }
        };
        let string = |p: &mut Self| -> Option<String> {
            match value {
                Value::String(s) => Some(s.clone()),
                other => {
                    p.add(vpath, format!("must be a string, not {}", type_name(other)));
                    None
                }
            }
        };
        let number = |p: &mut Self| -> Option<f64> {
            match value.as_f64() {
                Some(n) => Some(n),
                None => {
                    p.add(vpath, format!("must be a number, not {}", type_name(value)));
                    None
                }
            }
        };
        let semver = |p: &mut Self| -> Option<Semver> {
            match value {
                Value::String(s) => match Semver::parse(s) {
                    Some(v) => Some(v),
                    None => {
                        p.add(
                            vpath,
                            format!("{s:?} is not a semantic version (e.g. \"1.2.3\")"),
                        );
                        None
                    }
                },
                other => {
                    p.add(
                        vpath,
                        format!("must be a version string, not {}", type_name(other)),
                    );
                    None
                }
            }
        };
        Some(match op {
            "equals" => Op::Equals(scalar(self)?),
            "not_equals" => Op::NotEquals(scalar(self)?),
            "in" => Op::In(list(self)?),
            "not_in" => Op::NotIn(list(self)?),
            "starts_with" => Op::StartsWith(string(self)?),
            "ends_with" => Op::EndsWith(string(self)?),
            "gt" => Op::Num(NumOp::Gt, number(self)?),
            "gte" => Op::Num(NumOp::Gte, number(self)?),
            "lt" => Op::Num(NumOp::Lt, number(self)?),
            "lte" => Op::Num(NumOp::Lte, number(self)?),
            "semver_eq" => Op::Semver(NumOp::Eq, semver(self)?),
            "semver_gt" => Op::Semver(NumOp::Gt, semver(self)?),
            "semver_gte" => Op::Semver(NumOp::Gte, semver(self)?),
            "semver_lt" => Op::Semver(NumOp::Lt, semver(self)?),
            "semver_lte" => Op::Semver(NumOp::Lte, semver(self)?),
            other => {
                self.add(
                    opath,
                    format!(
                        "{other:?} is not an operator; use one of equals, not_equals, in, not_in, starts_with, ends_with, gt, gte, lt, lte, semver_eq, semver_gt, semver_gte, semver_lt, semver_lte"
                    ),
                );
                return None;
            }
        })
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

const FLAG_FIELDS: &[&str] = &[
    "enabled",
    "variants",
    "default_variant",
    "rules",
    "rollout",
    "description",
];

impl Flag {
    /// Checks a flag document; every problem is reported with its JSON path.
    pub fn parse(key: &str, spec: &Map<String, Value>) -> Result<Flag, Vec<FlagProblem>> {
        let mut top = Parser {
            problems: Vec::new(),
            variants: &[],
        };
        for k in spec.keys() {
            if !FLAG_FIELDS.contains(&k.as_str()) {
                top.add(
                    k.clone(),
                    format!("is not a known field ({})", FLAG_FIELDS.join(", ")),
                );
            }
        }
        let enabled = match spec.get("enabled") {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                top.add(
                    "enabled",
                    format!("must be a boolean, not {}", type_name(other)),
                );
                true
            }
        };
        if let Some(d) = spec.get("description")
            && !d.is_string()
        {
            top.add("description", "must be a string");
        }
        let mut names = Vec::new();
        let mut values = Vec::new();
        let mut flag_type = None;
        match spec.get("variants") {
            Some(Value::Object(vs)) if !vs.is_empty() => {
                for (name, v) in vs {
                    let path = format!("variants.{name}");
                    match FlagType::of(v) {
                        None => top.add(
                            path,
                            format!(
                                "must be a boolean, string, number or object, not {}",
                                type_name(v)
                            ),
                        ),
                        Some(t) => match flag_type {
                            None => flag_type = Some(t),
                            Some(ft) if ft != t => top.add(
                                path,
                                format!(
                                    "is {} but the flag's variants are {}s",
                                    t.as_str(),
                                    ft.as_str()
                                ),
                            ),
                            Some(_) => {}
                        },
                    }
                    names.push(name.clone());
                    values.push(v.clone());
                }
            }
            Some(Value::Object(_)) => top.add("variants", "must not be empty"),
            Some(other) => top.add(
                "variants",
                format!(
                    "must be an object of variant name to value, not {}",
                    type_name(other)
                ),
            ),
            None => top.add("variants", "is required"),
        }
        let mut p = Parser {
            problems: top.problems,
            variants: &names,
        };
        let default_variant = p.variant(spec.get("default_variant"), "default_variant");
        let mut rules = Vec::new();
        match spec.get("rules") {
            None => {}
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let path = format!("rules[{i}]");
                    let Value::Object(r) = item else {
                        p.add(&path, format!("must be an object, not {}", type_name(item)));
                        continue;
                    };
                    for k in r.keys() {
                        if !matches!(k.as_str(), "when" | "variant" | "rollout") {
                            p.add(
                                format!("{path}.{k}"),
                                "is not a known field (when, variant, rollout)",
                            );
                        }
                    }
                    let when = match r.get("when") {
                        Some(w) => p.condition(w, &format!("{path}.when"), 0),
                        None => {
                            p.add(format!("{path}.when"), "is required");
                            None
                        }
                    };
                    let then = match (r.get("variant"), r.get("rollout")) {
                        (Some(v), None) => p
                            .variant(Some(v), &format!("{path}.variant"))
                            .map(Outcome::Variant),
                        (None, Some(ro)) => p
                            .rollout(ro, &format!("{path}.rollout"))
                            .map(Outcome::Rollout),
                        (Some(_), Some(_)) => {
                            p.add(&path, "give either variant or rollout, not both");
                            None
                        }
                        (None, None) => {
                            p.add(&path, "needs a variant or a rollout");
                            None
                        }
                    };
                    if let (Some(when), Some(then)) = (when, then) {
                        rules.push(Rule { when, then });
                    }
                }
            }
            Some(other) => p.add(
                "rules",
                format!("must be an array, not {}", type_name(other)),
            ),
        }
        let rollout = spec.get("rollout").and_then(|r| p.rollout(r, "rollout"));
        if !p.problems.is_empty() {
            return Err(p.problems);
        }
        match (flag_type, default_variant) {
            (Some(flag_type), Some(default_variant)) => Ok(Flag {
                key: key.to_owned(),
                enabled,
                flag_type,
                variant_names: names,
                variant_values: values,
                default_variant,
                rules,
                rollout,
            }),
            _ => Err(vec![FlagProblem {
                path: "variants".into(),
                problem: "is required".into(),
            }]),
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn flag_type(&self) -> FlagType {
        self.flag_type
    }

    fn result(&self, variant: usize, reason: Reason) -> Evaluation {
        Evaluation {
            key: self.key.clone(),
            value: Some(self.variant_values[variant].clone()),
            variant: Some(self.variant_names[variant].clone()),
            reason,
            error: None,
        }
    }

    /// Evaluates the flag for `ctx`.
    pub fn evaluate(&self, ctx: &EvaluationContext) -> Evaluation {
        self.evaluate_index(ctx)
            .map_or_else(|e| e, |(variant, reason)| self.result(variant, reason))
    }

    /// The chosen variant index and reason, without building the result (no
    /// allocation on the hot path).
    pub fn evaluate_index(&self, ctx: &EvaluationContext) -> Result<(usize, Reason), Evaluation> {
        if !self.enabled {
            return Ok((self.default_variant, Reason::Disabled));
        }
        for rule in &self.rules {
            if rule.when.matches(ctx) {
                return match &rule.then {
                    Outcome::Variant(v) => Ok((*v, Reason::TargetingMatch)),
                    Outcome::Rollout(r) => self.split(r, ctx),
                };
            }
        }
        match &self.rollout {
            Some(r) => self.split(r, ctx),
            None if self.rules.is_empty() => Ok((self.default_variant, Reason::Static)),
            None => Ok((self.default_variant, Reason::Default)),
        }
    }

    fn split(
        &self,
        rollout: &Rollout,
        ctx: &EvaluationContext,
    ) -> Result<(usize, Reason), Evaluation> {
        match ctx.targeting_key.as_deref() {
            Some(tk) if !tk.is_empty() => Ok((rollout.pick(bucket(&self.key, tk)), Reason::Split)),
            _ => {
                let mut e = self.result(self.default_variant, Reason::Error);
                e.error = Some((
                    ErrorCode::TargetingKeyMissing,
                    format!(
                        "flag {:?} has a percentage rollout: the context needs a targetingKey",
                        self.key
                    ),
                ));
                Err(e)
            }
        }
    }

    /// Which attributes this flag reads (for documentation and debugging).
    pub fn attributes(&self) -> Vec<String> {
        fn walk(c: &Condition, out: &mut Vec<String>) {
            match c {
                Condition::All(cs) | Condition::Any(cs) => cs.iter().for_each(|c| walk(c, out)),
                Condition::Not(c) => walk(c, out),
                Condition::Compare { attribute, .. } => {
                    if !out.contains(attribute) {
                        out.push(attribute.clone());
                    }
                }
            }
        }
        let mut out = Vec::new();
        for r in &self.rules {
            walk(&r.when, &mut out);
        }
        out
    }
}

/// Every flag a process knows, by key.
#[derive(Debug, Clone, Default)]
pub struct FlagSet {
    flags: HashMap<String, Arc<Flag>>,
    /// Flags whose documents did not parse, with why (evaluations say PARSE_ERROR).
    broken: HashMap<String, String>,
}

impl FlagSet {
    /// Builds the set from `(key, spec_json)` pairs; a later pair replaces an earlier
    /// one with the same key (pass global flags first, then the tenant's own).
    pub fn from_documents<'a>(docs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut set = FlagSet::default();
        for (key, spec_json) in docs {
            let parsed = serde_json::from_str::<Value>(spec_json)
                .map_err(|e| format!("not JSON: {e}"))
                .and_then(|v| match v {
                    Value::Object(o) => Flag::parse(key, &o).map_err(|ps| {
                        ps.iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join("; ")
                    }),
                    _ => Err("not a JSON object".to_owned()),
                });
            match parsed {
                Ok(flag) => {
                    set.broken.remove(key);
                    set.flags.insert(key.to_owned(), Arc::new(flag));
                }
                Err(e) => {
                    set.flags.remove(key);
                    set.broken.insert(key.to_owned(), e);
                }
            }
        }
        set
    }

    pub fn get(&self, key: &str) -> Option<&Arc<Flag>> {
        self.flags.get(key)
    }

    /// Every key, sorted (broken flags included).
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .flags
            .keys()
            .chain(self.broken.keys())
            .cloned()
            .collect();
        keys.sort();
        keys
    }

    /// Evaluates one flag; a missing or broken flag gives an error evaluation.
    pub fn evaluate(&self, key: &str, ctx: &EvaluationContext) -> Evaluation {
        if let Some(flag) = self.flags.get(key) {
            return flag.evaluate(ctx);
        }
        let (code, message) = match self.broken.get(key) {
            Some(why) => (
                ErrorCode::ParseError,
                format!("flag {key:?} is invalid: {why}"),
            ),
            None => (ErrorCode::FlagNotFound, format!("flag {key:?} not found")),
        };
        Evaluation {
            key: key.to_owned(),
            value: None,
            variant: None,
            reason: Reason::Error,
            error: Some((code, message)),
        }
    }

    /// An attribute from the context, for callers that log what was evaluated.
    pub fn context_attribute(ctx: &EvaluationContext, name: &str) -> Option<Value> {
        ctx.attribute(name)
    }
}

/// Conversions between `google.protobuf.Struct`/`Value` and JSON, for the
/// `EvaluateFlags` RPC and its callers.
pub mod wire {
    use crewmesh_proto::prost_types::{self, value::Kind};
    use serde_json::{Map, Value};

    pub fn from_struct(s: &prost_types::Struct) -> Map<String, Value> {
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), from_value(v)))
            .collect()
    }

    pub fn from_value(v: &prost_types::Value) -> Value {
        match &v.kind {
            None | Some(Kind::NullValue(_)) => Value::Null,
            Some(Kind::BoolValue(b)) => Value::Bool(*b),
            Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
                .map(|n| {
                    // Whole numbers stay integers so they compare equal to JSON ints.
                    if n.as_f64()
                        .is_some_and(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                    {
                        Value::from(n.as_f64().unwrap_or_default() as i64)
                    } else {
                        Value::Number(n)
                    }
                })
                .unwrap_or(Value::Null),
            Some(Kind::StringValue(s)) => Value::String(s.clone()),
            Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(from_value).collect()),
            Some(Kind::StructValue(s)) => Value::Object(from_struct(s)),
        }
    }

    pub fn to_struct(m: &Map<String, Value>) -> prost_types::Struct {
        prost_types::Struct {
            fields: m.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
        }
    }

    pub fn to_value(v: &Value) -> prost_types::Value {
        let kind = match v {
            Value::Null => Kind::NullValue(0),
            Value::Bool(b) => Kind::BoolValue(*b),
            Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
            Value::String(s) => Kind::StringValue(s.clone()),
            Value::Array(a) => Kind::ListValue(prost_types::ListValue {
                values: a.iter().map(to_value).collect(),
            }),
            Value::Object(o) => Kind::StructValue(to_struct(o)),
        };
        prost_types::Value { kind: Some(kind) }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn flag(spec: Value) -> Flag {
        Flag::parse("f", spec.as_object().unwrap()).unwrap()
    }

    fn problems(spec: Value) -> Vec<String> {
        match Flag::parse("f", spec.as_object().unwrap()) {
            Ok(_) => Vec::new(),
            Err(ps) => ps.iter().map(ToString::to_string).collect(),
        }
    }

    fn ctx(key: Option<&str>, attrs: Value) -> EvaluationContext {
        EvaluationContext {
            targeting_key: key.map(str::to_owned),
            attributes: attrs.as_object().cloned().unwrap_or_default(),
        }
    }

    fn pick(f: &Flag, c: &EvaluationContext) -> (String, Reason) {
        let e = f.evaluate(c);
        (e.variant.unwrap(), e.reason)
    }

    #[test]
    fn murmur3_matches_reference_vectors() {
        assert_eq!(murmur3_32(b"", 0), 0);
        assert_eq!(murmur3_32(b"", 1), 0x514e_28b7);
        assert_eq!(murmur3_32(b"hello", 0), 0x248b_fa47);
        assert_eq!(murmur3_32(b"Hello, world!", 1234), 0xfaf6_cdb3);
        assert_eq!(
            murmur3_32(b"The quick brown fox jumps over the lazy dog", 0),
            0x2e4f_f723
        );
    }

    #[test]
    fn static_default_disabled_and_targeting() {
        let f = flag(json!({"variants": {"on": true, "off": false}, "default_variant": "off"}));
        assert_eq!(
            pick(&f, &ctx(None, json!({}))),
            ("off".into(), Reason::Static)
        );
        assert_eq!(f.flag_type(), FlagType::Boolean);

        let f = flag(json!({
            "variants": {"a": "model-a", "b": "model-b", "c": "model-c"},
            "default_variant": "a",
            "rules": [
                {"when": {"attribute": "tenant", "op": "in", "value": ["acme", "globex"]}, "variant": "b"},
                {"when": {"all": [
                    {"attribute": "app_version", "op": "semver_gte", "value": "2.1.0"},
                    {"not": {"attribute": "email", "op": "ends_with", "value": "@test.example"}},
                    {"any": [
                        {"attribute": "plan", "op": "equals", "value": "pro"},
                        {"attribute": "seats", "op": "gt", "value": 10}
                    ]}
                ]}, "variant": "c"}
            ]
        }));
        assert_eq!(
            pick(&f, &ctx(None, json!({"tenant": "acme"}))),
            ("b".into(), Reason::TargetingMatch)
        );
        assert_eq!(
            pick(&f, &ctx(None, json!({"tenant": "initech"}))),
            ("a".into(), Reason::Default)
        );
        let c = |v: &str, email: &str, plan: &str, seats: i64| {
            ctx(
                None,
                json!({"app_version": v, "email": email, "plan": plan, "seats": seats}),
            )
        };
        assert_eq!(pick(&f, &c("2.1.0", "x@corp.example", "pro", 1)).0, "c");
        assert_eq!(pick(&f, &c("v2.10.0", "x@corp.example", "free", 11)).0, "c");
        assert_eq!(
            pick(&f, &c("2.1.0-rc.1", "x@corp.example", "pro", 1)).0,
            "a"
        );
        assert_eq!(pick(&f, &c("2.1.0", "x@test.example", "pro", 1)).0, "a");
        assert_eq!(pick(&f, &c("2.1.0", "x@corp.example", "free", 10)).0, "a");
        // Wrong types and missing attributes never match, never fail.
        assert_eq!(
            pick(&f, &ctx(None, json!({"app_version": 3, "seats": "many"}))).0,
            "a"
        );

        let mut disabled = f.clone();
        disabled.enabled = false;
        assert_eq!(
            pick(&disabled, &ctx(None, json!({"tenant": "acme"}))),
            ("a".into(), Reason::Disabled)
        );
    }

    #[test]
    fn every_operator() {
        let check = |op: &str, value: Value, attr: Value| -> bool {
            let f = flag(json!({
                "variants": {"y": 1, "n": 0}, "default_variant": "n",
                "rules": [{"when": {"attribute": "x", "op": op, "value": value}, "variant": "y"}]
            }));
            f.evaluate(&ctx(None, json!({"x": attr})))
                .variant
                .as_deref()
                == Some("y")
        };
        assert!(check("equals", json!("a"), json!("a")));
        assert!(check("equals", json!(2), json!(2.0)));
        assert!(!check("equals", json!("2"), json!(2)));
        assert!(check("not_equals", json!("a"), json!("b")));
        assert!(check("in", json!([1, "b"]), json!("b")));
        assert!(check("not_in", json!([1, "b"]), json!("c")));
        assert!(check("starts_with", json!("ab"), json!("abc")));
        assert!(!check("starts_with", json!("ab"), json!(5)));
        assert!(check("ends_with", json!("bc"), json!("abc")));
        assert!(check("gt", json!(1.5), json!(2)));
        assert!(!check("gt", json!(2), json!(2)));
        assert!(check("gte", json!(2), json!(2)));
        assert!(check("lt", json!(2), json!(1)));
        assert!(check("lte", json!(2), json!(2)));
        assert!(check("semver_eq", json!("1.2.3"), json!("v1.2.3+build.5")));
        assert!(check("semver_gt", json!("1.2.3"), json!("1.10.0")));
        assert!(check("semver_lt", json!("1.0.0"), json!("1.0.0-alpha")));
        assert!(check(
            "semver_lt",
            json!("1.0.0-beta"),
            json!("1.0.0-alpha.1")
        ));
        assert!(check(
            "semver_lt",
            json!("1.0.0-alpha.beta"),
            json!("1.0.0-alpha.1")
        ));
        assert!(check("semver_lte", json!("1.0.0"), json!("1.0.0")));
        assert!(check("semver_gte", json!("1.0.0"), json!("2.0.0")));
        assert!(!check("semver_gte", json!("1.0.0"), json!("not-a-version")));
        // The targeting key is an attribute too.
        let f = flag(json!({
            "variants": {"y": {"v": 1}, "n": {"v": 0}}, "default_variant": "n",
            "rules": [{"when": {"attribute": "targetingKey", "op": "starts_with", "value": "user-"}, "variant": "y"}]
        }));
        assert_eq!(
            f.evaluate(&ctx(Some("user-1"), json!({}))).value,
            Some(json!({"v": 1}))
        );
        assert_eq!(f.flag_type(), FlagType::Object);
    }

    #[test]
    fn rollouts_split_by_targeting_key_and_need_one() {
        let f = flag(json!({
            "variants": {"a": "A", "b": "B"}, "default_variant": "a",
            "rollout": [{"variant": "a", "weight": 30}, {"variant": "b", "weight": 70}]
        }));
        let e = f.evaluate(&ctx(None, json!({})));
        assert_eq!(e.reason, Reason::Error);
        assert_eq!(e.variant.as_deref(), Some("a"));
        assert_eq!(e.error.unwrap().0, ErrorCode::TargetingKeyMissing);
        let mut counts = [0u32; 2];
        for i in 0..10_000 {
            let e = f.evaluate(&ctx(Some(&format!("user-{i}")), json!({})));
            assert_eq!(e.reason, Reason::Split);
            counts[usize::from(e.variant.as_deref() == Some("b"))] += 1;
        }
        // 30/70 within 2 points over 10,000 keys.
        assert!((2800..=3200).contains(&counts[0]), "{counts:?}");
    }

    #[test]
    fn bad_flags_list_every_problem_with_its_path() {
        assert_eq!(
            problems(json!({
                "variants": {"a": true, "b": "x", "c": null},
                "default_variant": "z",
                "colour": 1,
                "rules": [
                    {"when": {"attribute": "t", "op": "like", "value": "x"}, "variant": "a"},
                    {"when": {"all": [{"attribute": "v", "op": "semver_gt", "value": "1.x"}]}, "rollout": [{"variant": "a", "weight": 60}, {"variant": "b", "weight": 30}]},
                    {"variant": "a", "rollout": []}
                ],
                "rollout": [{"variant": "q", "weight": 101}]
            })),
            vec![
                "colour: is not a known field (enabled, variants, default_variant, rules, rollout, description)",
                "variants.b: is string but the flag's variants are booleans",
                "variants.c: must be a boolean, string, number or object, not null",
                "default_variant: \"z\" is not one of the variants",
                "rules[0].when.op: \"like\" is not an operator; use one of equals, not_equals, in, not_in, starts_with, ends_with, gt, gte, lt, lte, semver_eq, semver_gt, semver_gte, semver_lt, semver_lte",
                "rules[1].when.all[0].value: \"1.x\" is not a semantic version (e.g. \"1.2.3\")",
                "rules[1].rollout: weights must sum to 100 (they sum to 90)",
                "rules[2].when: is required",
                "rules[2]: give either variant or rollout, not both",
                "rollout[0].variant: \"q\" is not one of the variants",
                "rollout[0].weight: must be a whole percentage from 0 to 100",
            ]
        );
        assert_eq!(
            problems(json!({})),
            vec!["variants: is required", "default_variant: is required"]
        );
    }

    #[test]
    fn struct_round_trip() {
        let v = json!({"a": 1, "b": [true, null, "x", 1.5], "c": {"d": -2}});
        let back = wire::from_struct(&wire::to_struct(v.as_object().unwrap()));
        assert_eq!(Value::Object(back), v);
    }

    #[test]
    fn flag_sets_report_missing_and_broken_flags() {
        let set = FlagSet::from_documents([
            (
                "good",
                r#"{"variants":{"on":true,"off":false},"default_variant":"on"}"#,
            ),
            ("broken", r#"{"variants":{}}"#),
        ]);
        assert_eq!(set.keys(), vec!["broken", "good"]);
        assert_eq!(
            set.evaluate("good", &EvaluationContext::default()).value,
            Some(json!(true))
        );
        let missing = set.evaluate("nope", &EvaluationContext::default());
        assert_eq!(missing.error.unwrap().0, ErrorCode::FlagNotFound);
        let broken = set.evaluate("broken", &EvaluationContext::default());
        assert_eq!(broken.reason, Reason::Error);
        assert_eq!(broken.error.unwrap().0, ErrorCode::ParseError);
    }

    /// A small deterministic generator for the property tests (no extra crates).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 11
        }

        fn key(&mut self) -> String {
            let len = (self.next() % 40) as usize;
            (0..len)
                .map(|_| char::from(b' ' + (self.next() % 95) as u8))
                .collect()
        }
    }

    #[test]
    fn property_buckets_are_in_range_stable_and_uniform() {
        let mut rng = Lcg(7);
        let mut hist = [0u32; 10];
        for _ in 0..50_000 {
            let (flag_key, tk) = (rng.key(), rng.key());
            let b = bucket(&flag_key, &tk);
            assert!(b < BUCKETS);
            assert_eq!(b, bucket(&flag_key, &tk), "stable");
            hist[(b / 1000) as usize] += 1;
        }
        // Each decile holds 10% of keys within 1 point.
        for h in hist {
            assert!((4500..=5500).contains(&h), "{hist:?}");
        }
        // Long keys take the allocating path and agree with the short one's hash.
        let long = "k".repeat(300);
        assert_eq!(
            bucket(&long, "u"),
            u32::try_from(
                (u64::from(murmur3_32(format!("{long}/u").as_bytes(), 0)) * 10_000) >> 32
            )
            .unwrap()
        );
    }

    #[test]
    fn property_raising_a_weight_only_moves_keys_into_that_variant() {
        let mut rng = Lcg(42);
        let spec = |w: u64| {
            json!({
                "variants": {"a": 1, "b": 2, "c": 3}, "default_variant": "a",
                "rollout": [{"variant": "b", "weight": w}, {"variant": "a", "weight": 50 - w}, {"variant": "c", "weight": 50}]
            })
        };
        for w in [0, 10, 25, 40] {
            let before = flag(spec(w));
            let after = flag(spec(w + 10));
            for _ in 0..2_000 {
                let c = ctx(
                    Some(&rng.key())
                        .filter(|k| !k.is_empty())
                        .map(String::as_str)
                        .or(Some("x")),
                    json!({}),
                );
                let (b, a) = (pick(&before, &c).0, pick(&after, &c).0);
                assert!(b == a || a == "b", "{b} -> {a} when b grew from {w}");
            }
        }
    }
}
