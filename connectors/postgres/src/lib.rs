//! PostgreSQL source for tailgate.
pub mod pgoutput;
pub mod types;
