//! Interned strings for the few names every event repeats: the connector's name, the database, the
//! MySQL binlog file.
//!
//! Copying a [`Symbol`] copies a pointer. An `Arc<str>` in their place cost two atomic updates per
//! event on two different threads (the source clones, the sink drops), and that cache line bouncing
//! between cores was a measurable share of a snapshot's CPU.
//!
//! Each distinct string is leaked once, for the life of the process: only use this for names that
//! come from the configuration or the server and change rarely (a binlog file name per rotation:
//! kilobytes over a year), never for per-event data such as a GTID.

use std::collections::HashSet;
use std::fmt;
use std::ops::Deref;
use std::sync::{Mutex, OnceLock};

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Symbol(&'static str);

impl Symbol {
    pub fn new(text: &str) -> Symbol {
        static TABLE: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
        let mut table = TABLE.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = table.get(text) {
            return Symbol(known);
        }
        let leaked: &'static str = Box::leak(text.to_owned().into_boxed_str());
        table.insert(leaked);
        Symbol(leaked)
    }

    pub fn as_str(self) -> &'static str {
        self.0
    }
}

impl Deref for Symbol {
    type Target = str;
    fn deref(&self) -> &str {
        self.0
    }
}

impl From<&str> for Symbol {
    fn from(text: &str) -> Symbol {
        Symbol::new(text)
    }
}

impl From<String> for Symbol {
    fn from(text: String) -> Symbol {
        Symbol::new(&text)
    }
}

impl fmt::Debug for Symbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0, f)
    }
}

impl fmt::Display for Symbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_strings_share_one_allocation() {
        let a = Symbol::new("shop");
        let b = Symbol::from(String::from("shop"));
        assert_eq!(a, b);
        assert!(std::ptr::eq(a.as_str(), b.as_str()), "interned once");
        assert_ne!(Symbol::new("other"), a);
        assert_eq!(&*a, "shop");
    }
}
