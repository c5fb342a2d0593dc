//! Column projection and masking: the per-table column plan, and the row rebuild it drives.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tailgate_core::envelope::{DecimalHandling, ValueFormat, write_value};
use tailgate_core::{TableSchema, Value};

use super::rules::Mask;

#[derive(Debug)]
pub(crate) struct ColumnPlan {
    pub(crate) schema: Arc<TableSchema>,
    pub(crate) keep: Vec<usize>,
    /// (position in the output row, mask)
    pub(crate) masks: Vec<(usize, Mask)>,
}

/// Keeps the planned columns, in place: `keep` is ascending, so each kept value moves left or
/// stays, and the row's allocation is reused.
pub(crate) fn project(mut row: Vec<Value>, plan: &ColumnPlan) -> Vec<Value> {
    if plan.keep.len() != row.len() {
        for (out, &i) in plan.keep.iter().enumerate() {
            row.swap(out, i);
        }
        row.truncate(plan.keep.len());
    }
    for (i, mask) in &plan.masks {
        row[*i] = apply_mask(&row[*i], mask);
    }
    row
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xF)] as char);
    }
    out
}

pub(crate) fn apply_mask(value: &Value, mask: &Mask) -> Value {
    if matches!(value, Value::Null | Value::Unavailable { .. }) {
        return value.clone();
    }
    let Some(text) = value_text(value) else { return value.clone() };
    match mask {
        Mask::Hash { salt } => {
            let mut h = Sha256::new();
            h.update(salt.as_bytes());
            h.update(text.as_bytes());
            Value::String(hex(&h.finalize()))
        }
        Mask::Stars => Value::String("*".repeat(text.chars().count())),
        Mask::Truncate(n) => match value {
            Value::String(s) => Value::String(s.chars().take(*n).collect()),
            other => other.clone(),
        },
    }
}

/// A value as plain text (strings unquoted), for keys, headers and masks.
pub(crate) fn value_text(value: &Value) -> Option<String> {
    match value {
        Value::Null | Value::Unavailable { .. } => None,
        Value::String(s) => Some(s.clone()),
        Value::Decimal(d) => Some(d.text.clone()),
        other => {
            let mut out = Vec::new();
            write_value(&mut out, other, ValueFormat { decimals: DecimalHandling::String, ..ValueFormat::default() });
            Some(String::from_utf8_lossy(&out).into_owned())
        }
    }
}
