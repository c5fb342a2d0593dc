//! The raw limit for bench/run.sh's NATS row: async-nats alone publishing N messages of a given size to
//! a JetStream file stream as the sink does (a `Nats-Msg-Id` per message, every PubAck awaited, a window
//! of messages awaiting theirs), with nothing from tailgate in between. Creates the stream
//! `<stream>` on `<stream>.>` and deletes it at the end.
//!
//!   cargo run --release -p tailgate-nats --example nats_raw_publish -- <url> <stream> <count> <bytes> <window>
//!
//! Prints the wall seconds and messages per second.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, name, count, bytes, window] = args.as_slice() else {
        return Err("usage: nats_raw_publish <url> <stream> <count> <bytes> <window>".into());
    };
    let (count, bytes, window): (usize, usize, usize) = (count.parse()?, bytes.parse()?, window.parse()?);
    let client = async_nats::connect(url.as_str()).await?;
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![format!("{name}.>")],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    let subject = format!("{name}.public.orders");
    let payload = bytes::Bytes::from(vec![b'x'; bytes]);
    let started = Instant::now();
    let mut waiting = VecDeque::with_capacity(window);
    for i in 0..count {
        if waiting.len() == window {
            let ack: jetstream::context::PublishAckFuture = waiting.pop_front().unwrap();
            ack.await?;
        }
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("raw/{i}").as_str());
        waiting.push_back(js.publish_with_headers(subject.clone(), headers, payload.clone()).await?);
    }
    for ack in waiting {
        ack.await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!("{seconds:.2} s, {:.0} messages/s", count as f64 / seconds);
    js.delete_stream(name).await?;
    Ok(())
}
