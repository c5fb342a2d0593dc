//! What the binary knows per kind of source: how to build it, check it, find the end of its log,
//! tell whether it runs, and measure its lag. The only place that knows every connector.

pub mod mysql;
pub mod postgres;
