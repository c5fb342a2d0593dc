//! A minimal consumer for command-line checks (Debian's kcat cannot talk to tansu):
//! prints `key<TAB>value` for each record of a topic, from the beginning.
//!
//! `cargo run -p tailgate-kafka --example consume -- --brokers 127.0.0.1:9092 --topic shop.public.orders [--max N]`

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let brokers = arg("--brokers").unwrap_or_else(|| "127.0.0.1:9092".into());
    let Some(topic) = arg("--topic") else {
        eprintln!("usage: consume --topic TOPIC [--brokers HOST:PORT] [--max N]");
        std::process::exit(2);
    };
    let max: usize = arg("--max").and_then(|m| m.parse().ok()).unwrap_or(usize::MAX);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "tailgate-consume-example")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)).expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(&topic, p.id(), Offset::Beginning).expect("partition");
        }
    }
    consumer.assign(&tpl).expect("assign");
    if args.iter().any(|a| a == "--watermarks") {
        for p in tpl.elements() {
            let (low, high) =
                consumer.fetch_watermarks(&topic, p.partition(), Duration::from_secs(10)).expect("watermarks");
            eprintln!("partition {}: low {low} high {high}", p.partition());
        }
    }
    let mut seen = 0;
    let mut idle_since = Instant::now();
    while seen < max && idle_since.elapsed() < Duration::from_secs(3) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let text = |b: Option<&[u8]>| b.map_or("null".into(), |b| String::from_utf8_lossy(b).into_owned());
            println!("{}\t{}", text(m.key()), text(m.payload()));
            seen += 1;
            idle_since = Instant::now();
        }
    }
}
