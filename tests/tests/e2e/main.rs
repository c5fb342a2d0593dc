#![recursion_limit = "256"]
//! End-to-end tests: the real `tailgate` binary against the real PostgreSQL and Kafka broker that
//! scripts/services.sh sets up. One test binary; each test owns its database, slot and topics.

mod auth;
mod faults;
mod ha;
mod incremental;
mod kafka_tls;
mod mysql_incremental;
mod mysql_resilience;
mod mysql_snapshot;
mod mysql_streaming;
mod mysql_transforms;
mod mysql_types;
mod nats;
mod operations;
mod rabbitmq;
mod redis_sink;
mod resilience;
mod snapshot;
mod streaming;
mod tls;
mod transforms;
mod types;
mod webhook_sink;
