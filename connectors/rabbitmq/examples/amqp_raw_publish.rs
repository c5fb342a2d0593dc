//! The raw limit for bench/run.sh's RabbitMQ row: lapin alone publishing N messages of a given size to
//! a topic exchange as the sink does (persistent, mandatory, publisher confirms, a window of messages
//! awaiting their confirm), with nothing from tailgate in between.
//!
//!   cargo run --release -p tailgate-rabbitmq --example amqp_raw_publish -- <url> <exchange> <routing key> <count> <bytes> <window>
//!
//! Prints the wall seconds and messages per second. The exchange must exist (bench/queues.py amqp-setup).

use std::collections::VecDeque;
use std::time::Instant;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, exchange, routing_key, count, bytes, window] = args.as_slice() else {
        return Err("usage: amqp_raw_publish <url> <exchange> <routing key> <count> <bytes> <window>".into());
    };
    let (count, bytes, window): (usize, usize, usize) = (count.parse()?, bytes.parse()?, window.parse()?);
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let payload = vec![b'x'; bytes];
    let properties = BasicProperties::default().with_delivery_mode(2);
    let options = BasicPublishOptions { mandatory: true, immediate: false };
    let started = Instant::now();
    let mut waiting = VecDeque::with_capacity(window);
    for _ in 0..count {
        if waiting.len() == window {
            check(waiting.pop_front().unwrap().await?)?;
        }
        let confirm = channel
            .basic_publish(exchange.as_str().into(), routing_key.as_str().into(), options, &payload, properties.clone())
            .await?;
        waiting.push_back(confirm);
    }
    for confirm in waiting {
        check(confirm.await?)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!("{seconds:.2} s, {:.0} messages/s", count as f64 / seconds);
    connection.close(200, "done".into()).await?;
    Ok(())
}

fn check(confirmation: Confirmation) -> Result<(), Box<dyn std::error::Error>> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        other => Err(format!("not confirmed: {other:?}").into()),
    }
}
