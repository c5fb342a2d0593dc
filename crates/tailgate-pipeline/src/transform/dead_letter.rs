//! Dead letters: records that can never be delivered where they were meant to go, sent to the
//! dead-letter topic with headers naming the cause, the intended topic and the source position.

use std::sync::Arc;

use tailgate_core::SourceInfo;

use crate::sink::RawRecord;

/// A dead letter: the original key and value (when there is one) under the dead-letter topic, with
/// headers naming the cause, the intended topic and the source position.
pub fn dead_letter(
    dlq: &Arc<str>,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    cause: &str,
    intended_topic: &str,
    source: &SourceInfo,
) -> RawRecord {
    let mut headers = vec![
        ("tailgate.error.cause".to_owned(), cause.as_bytes().to_vec()),
        ("tailgate.error.topic".to_owned(), intended_topic.as_bytes().to_vec()),
    ];
    match source {
        SourceInfo::Postgres(pg) => {
            headers.push(("tailgate.source.lsn".to_owned(), tailgate_core::Lsn(pg.lsn).to_string().into_bytes()));
            headers.push(("tailgate.source.txid".to_owned(), pg.txid.to_string().into_bytes()));
        }
        SourceInfo::Mysql(my) => {
            headers.push(("tailgate.source.file".to_owned(), my.file.as_bytes().to_vec()));
            headers.push(("tailgate.source.pos".to_owned(), my.pos.to_string().into_bytes()));
            if let Some(gtid) = &my.gtid {
                headers.push(("tailgate.source.gtid".to_owned(), gtid.as_bytes().to_vec()));
            }
        }
    }
    RawRecord { topic: dlq.clone(), key, value, headers, dead_letter: true }
}
