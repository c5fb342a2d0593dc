//! Names as NATS accepts them: topics become subjects, Kafka-style headers become NATS headers.
//!
//! A topic is `<topic_prefix>.<schema>.<table>` (or an outbox/route/dead-letter topic); its dots stay
//! subject token separators. NATS forbids whitespace in subjects, gives `*` and `>` tokens wildcard
//! meaning, and refuses empty tokens: those are replaced by `_`, so that every topic has exactly one
//! valid subject (the mapping is the same on every run; two topics differing only there share a
//! subject). Header values that NATS cannot carry (not UTF-8, or with CR/LF) are sent base64-encoded
//! under the header name with `-Base64` appended; names are ASCII without `:` (others become `_`).

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

/// The subject for `topic` (see the module doc).
pub fn subject_for_topic(topic: &str) -> String {
    let mut out = String::with_capacity(topic.len());
    for (i, token) in topic.split('.').enumerate() {
        if i > 0 {
            out.push('.');
        }
        if token.is_empty() || token == "*" || token == ">" {
            out.push('_');
            continue;
        }
        for c in token.chars() {
            out.push(if c.is_whitespace() || c.is_control() { '_' } else { c });
        }
    }
    out
}

/// Whether subject `pattern` (with `*` and `>` wildcards) matches the literal `subject`.
pub fn matches(pattern: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for p in pattern.split('.') {
        match (p, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (p, Some(t)) if p == t => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

/// A stream name from `prefix`: stream names may not hold `.`, `*`, `>`, path separators or
/// whitespace.
pub fn stream_name_for(prefix: &str) -> String {
    prefix.chars().map(|c| if valid_stream_char(c) { c } else { '_' }).collect()
}

pub fn valid_stream_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.chars().all(valid_stream_char)
}

fn valid_stream_char(c: char) -> bool {
    !(c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
}

/// A subject pattern as a stream's `subjects` accepts it: dot-separated non-empty tokens without
/// whitespace; `>` only as the last token.
pub fn valid_subject_pattern(pattern: &str) -> bool {
    let tokens: Vec<&str> = pattern.split('.').collect();
    tokens.iter().enumerate().all(|(i, t)| {
        !t.is_empty() && !t.chars().any(|c| c.is_whitespace() || c.is_control()) && (*t != ">" || i == tokens.len() - 1)
    })
}

/// A header name NATS accepts (printable ASCII, no `:`).
pub fn header_name(name: &str) -> Cow<'_, str> {
    if !name.is_empty() && name.chars().all(|c| c.is_ascii_graphic() && c != ':') {
        Cow::Borrowed(name)
    } else if name.is_empty() {
        Cow::Borrowed("_")
    } else {
        Cow::Owned(name.chars().map(|c| if c.is_ascii_graphic() && c != ':' { c } else { '_' }).collect())
    }
}

/// A header value as NATS can carry it: the text itself, or `None` when it must be base64-encoded
/// (see [`base64_value`]).
pub fn header_text(value: &[u8]) -> Option<&str> {
    std::str::from_utf8(value).ok().filter(|s| !s.contains(['\r', '\n']))
}

pub fn base64_value(value: &[u8]) -> String {
    BASE64.encode(value)
}

/// The `Nats-Msg-Id` for a record id: the id itself when it is short and header-safe, else
/// `sha256:<hex>` of it (same input, same id).
pub fn msg_id(record_id: &str, tombstone: bool) -> String {
    let suffix = if tombstone { "/t" } else { "" };
    if record_id.len() + suffix.len() <= 256 && header_text(record_id.as_bytes()).is_some() {
        let mut id = String::with_capacity(record_id.len() + suffix.len());
        id.push_str(record_id);
        id.push_str(suffix);
        return id;
    }
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    hasher.update(record_id.as_bytes());
    hasher.update(suffix.as_bytes());
    let digest = hasher.finalize();
    let mut id = String::with_capacity(7 + 64);
    id.push_str("sha256:");
    for b in digest {
        use std::fmt::Write as _;
        let _ = write!(id, "{b:02x}");
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_keep_their_dots_and_lose_what_subjects_cannot_hold() {
        assert_eq!(subject_for_topic("shop.public.orders"), "shop.public.orders");
        assert_eq!(subject_for_topic("outbox.event.order"), "outbox.event.order");
        assert_eq!(subject_for_topic("shop.public.my table"), "shop.public.my_table");
        assert_eq!(subject_for_topic("shop..x"), "shop._.x");
        assert_eq!(subject_for_topic("shop.*.>"), "shop._._");
        assert_eq!(subject_for_topic("shop.a*b"), "shop.a*b", "a * inside a token is literal");
    }

    #[test]
    fn wildcards_match_as_nats_does() {
        assert!(matches("shop.>", "shop.public.orders"));
        assert!(!matches("shop.>", "shop"));
        assert!(matches("shop.*.orders", "shop.public.orders"));
        assert!(!matches("shop.*", "shop.public.orders"));
        assert!(matches("outbox.event.order", "outbox.event.order"));
        assert!(!matches("outbox.event.order", "outbox.event.orders"));
        assert!(!matches("a.b.c", "a.b"));
    }

    #[test]
    fn stream_names_and_patterns() {
        assert_eq!(stream_name_for("shop.eu"), "shop_eu");
        assert!(valid_stream_name("shop_eu"));
        assert!(!valid_stream_name("shop.eu"));
        assert!(valid_subject_pattern("shop.>"));
        assert!(valid_subject_pattern("outbox.event.*"));
        assert!(!valid_subject_pattern("shop.>.x"));
        assert!(!valid_subject_pattern("shop..x"));
        assert!(!valid_subject_pattern("shop x"));
    }

    #[test]
    fn header_values_that_nats_cannot_carry_are_flagged() {
        assert_eq!(header_text(b"{\"id\":1}"), Some("{\"id\":1}"));
        assert_eq!(header_text(b"a\nb"), None);
        assert_eq!(header_text(&[0xff, 0x00]), None);
        assert_eq!(header_name("tailgate.error.cause"), "tailgate.error.cause");
        assert_eq!(header_name("my header:x"), "my_header_x");
    }

    #[test]
    fn message_ids_are_stable_and_header_safe() {
        assert_eq!(msg_id("shop.public.t/lsn 0/16B3748/3", false), "shop.public.t/lsn 0/16B3748/3");
        assert_eq!(msg_id("shop.public.t/lsn 0/16B3748/3", true), "shop.public.t/lsn 0/16B3748/3/t");
        let long = "x".repeat(300);
        assert_eq!(msg_id(&long, false), msg_id(&long, false));
        assert!(msg_id(&long, false).starts_with("sha256:"));
        assert_ne!(msg_id(&long, false), msg_id(&long, true));
        assert!(msg_id("a\nb", false).starts_with("sha256:"));
    }
}
