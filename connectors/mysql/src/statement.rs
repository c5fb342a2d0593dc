//! The few facts tailgate reads from statement text in the binlog (Query events): the first word
//! (BEGIN, COMMIT, XA …) and the table of a TRUNCATE.

use tailgate_core::TableId;

pub(crate) fn first_word(stmt: &[u8]) -> String {
    let end = stmt.iter().position(|b| !b.is_ascii_alphabetic()).unwrap_or(stmt.len());
    String::from_utf8_lossy(&stmt[..end]).to_ascii_uppercase()
}

pub(crate) fn skip_word(stmt: &[u8]) -> &[u8] {
    let end = stmt.iter().position(|b| !b.is_ascii_alphabetic()).unwrap_or(stmt.len());
    stmt[end..].trim_ascii_start()
}

/// The table of `TRUNCATE [TABLE] [db.]name`, with `default_db` when unqualified.
pub(crate) fn truncated_table(stmt: &[u8], default_db: &[u8]) -> Option<TableId> {
    let rest = skip_word(stmt);
    let rest = if first_word(rest) == "TABLE" { skip_word(rest) } else { rest };
    let text = String::from_utf8_lossy(rest);
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = text.trim().chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '`' => {
                while let Some(c) = chars.next() {
                    if c == '`' {
                        if chars.peek() == Some(&'`') {
                            chars.next();
                            current.push('`');
                        } else {
                            break;
                        }
                    } else {
                        current.push(c);
                    }
                }
            }
            '.' => parts.push(std::mem::take(&mut current)),
            c if c.is_whitespace() || c == ';' => break,
            c => current.push(c),
        }
    }
    parts.push(current);
    match parts.as_slice() {
        [table] if !table.is_empty() => {
            Some(TableId { schema: String::from_utf8_lossy(default_db).into_owned(), table: table.clone() })
        }
        [db, table] if !table.is_empty() => Some(TableId { schema: db.clone(), table: table.clone() }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_statements_name_their_table() {
        let t = |s: &str| truncated_table(s.as_bytes(), b"shop").map(|t| t.to_string());
        assert_eq!(t("TRUNCATE TABLE orders").as_deref(), Some("shop.orders"));
        assert_eq!(t("truncate `a``b`.`c d`").as_deref(), Some("a`b.c d"));
        assert_eq!(t("TRUNCATE x.y;").as_deref(), Some("x.y"));
    }
}
