//! The vocabulary of `tailgate check`: each check says ok, WARN or FAILED, and when it is not ok,
//! the fix. Checks never change anything on the servers.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warn,
    Failed,
}

#[derive(Debug, Clone)]
pub struct CheckResult {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
}

impl CheckResult {
    pub fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        CheckResult { name, status: Status::Ok, detail: detail.into() }
    }

    pub fn warn(name: &'static str, detail: impl Into<String>) -> Self {
        CheckResult { name, status: Status::Warn, detail: detail.into() }
    }

    pub fn failed(name: &'static str, detail: impl Into<String>) -> Self {
        CheckResult { name, status: Status::Failed, detail: detail.into() }
    }
}
