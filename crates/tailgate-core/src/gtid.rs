//! GTID sets: which transactions of a MySQL or MariaDB server a checkpoint covers.
//!
//! - MySQL: `3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5:7,...` — per server UUID, the intervals of
//!   transaction numbers (GNOs) executed. A replica asks for "everything not in this set".
//! - MariaDB: `0-1-100,1-2-50` — per replication domain, the last GTID (`domain-server-sequence`).
//!   A replica asks for "everything after these".
//!
//! Both text forms are what the servers print and parse themselves (`@@gtid_executed`,
//! `@@gtid_binlog_pos`), and what the offsets file stores.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::parse::ParsePositionError;

/// A server UUID (MySQL's `server_uuid`, the source id of its GTIDs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Uuid(pub [u8; 16]);

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl FromStr for Uuid {
    type Err = ParsePositionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParsePositionError {
            input: s.to_owned(),
            reason: "not a UUID like 3e11fa47-71ca-11e1-9e33-c80aa9429562",
        };
        let hex: Vec<u8> = s.bytes().filter(|b| *b != b'-').collect();
        if hex.len() != 32 || s.len() != 36 {
            return Err(err());
        }
        let mut out = [0u8; 16];
        for (i, pair) in hex.chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).map_err(|_| err())?;
            out[i] = u8::from_str_radix(text, 16).map_err(|_| err())?;
        }
        Ok(Uuid(out))
    }
}

/// MySQL: per server UUID, sorted disjoint inclusive intervals of transaction numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MysqlGtidSet {
    sets: BTreeMap<Uuid, Vec<(u64, u64)>>,
}

impl MysqlGtidSet {
    /// Adds one transaction, merging it into an adjacent interval when there is one.
    pub fn add(&mut self, uuid: Uuid, gno: u64) {
        let intervals = self.sets.entry(uuid).or_default();
        // Transactions arrive in order almost always: extend the last interval first.
        if let Some(last) = intervals.last_mut() {
            if gno >= last.0 && gno <= last.1 {
                return;
            }
            if gno == last.1 + 1 {
                last.1 = gno;
                return;
            }
        }
        let at = intervals.partition_point(|&(_, end)| end < gno);
        if let Some(iv) = intervals.get(at)
            && iv.0 <= gno
        {
            return;
        }
        intervals.insert(at, (gno, gno));
        // Merge with neighbours that now touch.
        if at + 1 < intervals.len() && intervals[at].1 + 1 == intervals[at + 1].0 {
            intervals[at].1 = intervals[at + 1].1;
            intervals.remove(at + 1);
        }
        if at > 0 && intervals[at - 1].1 + 1 == intervals[at].0 {
            intervals[at - 1].1 = intervals[at].1;
            intervals.remove(at);
        }
    }

    pub fn contains(&self, uuid: &Uuid, gno: u64) -> bool {
        self.sets.get(uuid).is_some_and(|ivs| ivs.iter().any(|&(s, e)| s <= gno && gno <= e))
    }

    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// Whether every transaction of `self` is in `other`. Intervals are sorted and disjoint, so each
    /// of ours must lie inside one of theirs.
    pub fn is_subset(&self, other: &MysqlGtidSet) -> bool {
        self.sets.iter().all(|(uuid, ours)| {
            let Some(theirs) = other.sets.get(uuid) else { return ours.is_empty() };
            ours.iter().all(|&(start, end)| {
                let at = theirs.partition_point(|&(_, e)| e < start);
                theirs.get(at).is_some_and(|&(s, e)| s <= start && end <= e)
            })
        })
    }

    /// Each UUID with its inclusive intervals, in UUID order (the order COM_BINLOG_DUMP_GTID wants).
    pub fn iter(&self) -> impl Iterator<Item = (&Uuid, &[(u64, u64)])> {
        self.sets.iter().map(|(u, ivs)| (u, ivs.as_slice()))
    }
}

impl fmt::Display for MysqlGtidSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (uuid, intervals)) in self.sets.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{uuid}")?;
            for &(start, end) in intervals {
                if start == end {
                    write!(f, ":{start}")?;
                } else {
                    write!(f, ":{start}-{end}")?;
                }
            }
        }
        Ok(())
    }
}

impl FromStr for MysqlGtidSet {
    type Err = ParsePositionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParsePositionError { input: s.to_owned(), reason };
        let mut set = MysqlGtidSet::default();
        // The server prints a newline after each comma.
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let mut fields = part.split(':');
            let uuid: Uuid = fields.next().unwrap_or_default().trim().parse()?;
            let mut any = false;
            for interval in fields {
                any = true;
                let (start, end) = match interval.split_once('-') {
                    Some((a, b)) => (a, b),
                    None => (interval, interval),
                };
                let start: u64 = start.parse().map_err(|_| err("an interval bound is not a number"))?;
                let end: u64 = end.parse().map_err(|_| err("an interval bound is not a number"))?;
                if start == 0 || end < start {
                    return Err(err("intervals must be 1-based and ascending, e.g. uuid:1-5"));
                }
                // Intervals may come in any order; add them one by one in bulk.
                let ivs = set.sets.entry(uuid).or_default();
                ivs.push((start, end));
            }
            if !any {
                return Err(err("a UUID without intervals (tagged GTIDs uuid:tag:n are not supported)"));
            }
        }
        for ivs in set.sets.values_mut() {
            ivs.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ivs.len());
            for &(s, e) in ivs.iter() {
                match merged.last_mut() {
                    Some(last) if s <= last.1 + 1 => last.1 = last.1.max(e),
                    _ => merged.push((s, e)),
                }
            }
            *ivs = merged;
        }
        Ok(set)
    }
}

/// MariaDB: per replication domain, the last GTID as `(server_id, sequence number)`.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MariadbGtidList {
    domains: BTreeMap<u32, (u32, u64)>,
}

impl MariadbGtidList {
    /// Records `domain-server-seq` as the last transaction of its domain.
    pub fn add(&mut self, domain: u32, server_id: u32, seq: u64) {
        self.domains.insert(domain, (server_id, seq));
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    pub fn get(&self, domain: u32) -> Option<(u32, u64)> {
        self.domains.get(&domain).copied()
    }

    /// `(domain, server_id, seq)` per domain, in domain order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, u32, u64)> + '_ {
        self.domains.iter().map(|(d, (s, q))| (*d, *s, *q))
    }
}

impl fmt::Display for MariadbGtidList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (domain, (server, seq))) in self.domains.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{domain}-{server}-{seq}")?;
        }
        Ok(())
    }
}

impl FromStr for MariadbGtidList {
    type Err = ParsePositionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err =
            || ParsePositionError { input: s.to_owned(), reason: "expected domain-server-sequence, e.g. 0-1-100" };
        let mut list = MariadbGtidList::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let mut fields = part.split('-');
            let (Some(d), Some(srv), Some(seq), None) = (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                return Err(err());
            };
            let domain = d.parse().map_err(|_| err())?;
            if list.domains.contains_key(&domain) {
                return Err(ParsePositionError { input: s.to_owned(), reason: "a domain appears twice" });
            }
            list.add(domain, srv.parse().map_err(|_| err())?, seq.parse().map_err(|_| err())?);
        }
        Ok(list)
    }
}

/// The transactions a checkpoint covers, in the server's own notation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GtidSet {
    Mysql(MysqlGtidSet),
    Mariadb(MariadbGtidList),
}

impl GtidSet {
    pub fn is_empty(&self) -> bool {
        match self {
            GtidSet::Mysql(s) => s.is_empty(),
            GtidSet::Mariadb(l) => l.is_empty(),
        }
    }
}

impl fmt::Display for GtidSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GtidSet::Mysql(s) => s.fmt(f),
            GtidSet::Mariadb(l) => l.fmt(f),
        }
    }
}

impl FromStr for GtidSet {
    type Err = ParsePositionError;

    /// MySQL sets contain `:` (after the UUID); MariaDB lists never do.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') { Ok(GtidSet::Mysql(s.parse()?)) } else { Ok(GtidSet::Mariadb(s.parse()?)) }
    }
}

impl Serialize for GtidSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GtidSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "3e11fa47-71ca-11e1-9e33-c80aa9429562";
    const B: &str = "4e11fa47-71ca-11e1-9e33-c80aa9429562";

    #[test]
    fn mysql_sets_parse_the_servers_own_form_and_print_canonically() {
        let set: MysqlGtidSet = format!("{B}:1-3,\n{A}:7:1-5:6").parse().unwrap();
        assert_eq!(set.to_string(), format!("{A}:1-7,{B}:1-3"));
        assert!(set.contains(&A.parse().unwrap(), 7));
        assert!(!set.contains(&B.parse().unwrap(), 4));
        assert!("".parse::<MysqlGtidSet>().unwrap().is_empty());
        assert!(A.parse::<MysqlGtidSet>().is_err());
        assert!(format!("{A}:5-2").parse::<MysqlGtidSet>().is_err());
    }

    #[test]
    fn adding_transactions_keeps_intervals_merged() {
        let uuid: Uuid = A.parse().unwrap();
        let mut set = MysqlGtidSet::default();
        for gno in [1, 2, 3, 5, 9, 4, 8, 7, 6, 6] {
            set.add(uuid, gno);
        }
        assert_eq!(set.to_string(), format!("{A}:1-9"));
        set.add(uuid, 20);
        assert_eq!(set.to_string(), format!("{A}:1-9:20"));
    }

    #[test]
    fn subsets_are_checked_interval_by_interval() {
        let set = |text: &str| -> MysqlGtidSet { text.parse().unwrap() };
        let server = set(&format!("{A}:1-10:20-30,{B}:5"));
        assert!(set("").is_subset(&server));
        assert!(set(&format!("{A}:1-10")).is_subset(&server));
        assert!(set(&format!("{A}:3-4:21-30,{B}:5")).is_subset(&server));
        assert!(!set(&format!("{A}:10-11")).is_subset(&server), "11 is missing");
        assert!(!set(&format!("{A}:31")).is_subset(&server));
        assert!(!set(&format!("{A}:1-30")).is_subset(&server), "spans the gap");
        assert!(!set(&format!("{B}:4-5")).is_subset(&server));
        assert!(!server.is_subset(&set(&format!("{A}:1-30"))), "a UUID the other lacks");
        assert!(server.is_subset(&server));
    }

    #[test]
    fn mariadb_lists_keep_the_last_gtid_per_domain() {
        let mut list: MariadbGtidList = "1-2-50,0-1-100".parse().unwrap();
        assert_eq!(list.to_string(), "0-1-100,1-2-50");
        list.add(0, 3, 101);
        assert_eq!(list.to_string(), "0-3-101,1-2-50");
        assert!("0-1".parse::<MariadbGtidList>().is_err());
        assert!("0-1-2,0-1-3".parse::<MariadbGtidList>().is_err());
    }

    #[test]
    fn flavor_is_told_by_syntax() {
        assert!(matches!(format!("{A}:1").parse::<GtidSet>().unwrap(), GtidSet::Mysql(_)));
        assert!(matches!("0-1-1".parse::<GtidSet>().unwrap(), GtidSet::Mariadb(_)));
    }
}
