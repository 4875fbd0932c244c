//! Placeholder until the sqlparser classifier lands.
#![allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    Primary,
    Replica,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatementKind {
    Read,
    Write,
    BeginReadOnly,
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    pub kind: StatementKind,
    pub hint: Option<Hint>,
    pub functions: Vec<String>,
}
pub fn classify(sql: &str) -> Classification {
    let kind = if sql.trim_start().to_ascii_lowercase().starts_with("select") {
        StatementKind::Read
    } else {
        StatementKind::Write
    };
    Classification {
        kind,
        hint: None,
        functions: Vec::new(),
    }
}
