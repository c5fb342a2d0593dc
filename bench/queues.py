#!/usr/bin/env python3
"""Destination bookkeeping for bench/run.sh's NATS and RabbitMQ runs (loopback servers only).

  queues.py nats-count <stream>       messages stored in a JetStream stream
  queues.py nats-delete <stream>      deletes the stream (the benchmark's records)
  queues.py amqp-setup <exchange>     declares a durable topic exchange and a durable queue bound to '<exchange>.#'
  queues.py amqp-count <exchange>     messages in that queue
  queues.py amqp-delete <exchange>    deletes the queue and the exchange

NATS speaks its text protocol over a plain socket (a request to the JetStream API); RabbitMQ needs
pika (pip install pika).
"""
import json
import socket
import sys

NATS = ("127.0.0.1", 4222)
AMQP = "amqp://guest:guest@127.0.0.1:5672/%2f"


def jetstream(api, body=b""):
    s = socket.create_connection(NATS, timeout=10)
    f = s.makefile("rb")
    f.readline()  # INFO
    s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}\r\n'
              b"SUB _INBOX.bench 1\r\n"
              + f"PUB $JS.API.{api} _INBOX.bench {len(body)}\r\n".encode() + body + b"\r\n")
    while True:
        line = f.readline()
        if line.startswith(b"PING"):
            s.sendall(b"PONG\r\n")
        elif line.startswith(b"MSG") or line.startswith(b"HMSG"):
            size = int(line.split()[-1])
            payload = f.read(size + 2)[:-2]
            s.close()
            return json.loads(payload) if payload and not line.startswith(b"HMSG") else {}
        elif not line:
            raise SystemExit("NATS closed the connection")


def amqp():
    try:
        import pika
    except ImportError:
        raise SystemExit("pika is needed for the RabbitMQ benchmark: pip install pika")
    conn = pika.BlockingConnection(pika.URLParameters(AMQP))
    return conn, conn.channel()


def main():
    cmd, name = sys.argv[1], sys.argv[2]
    if cmd == "nats-count":
        info = jetstream(f"STREAM.INFO.{name}")
        print(info.get("state", {}).get("messages", 0))
    elif cmd == "nats-delete":
        jetstream(f"STREAM.DELETE.{name}")
    elif cmd == "amqp-setup":
        conn, ch = amqp()
        ch.exchange_declare(name, exchange_type="topic", durable=True)
        ch.queue_declare(f"bench.{name}", durable=True)
        ch.queue_bind(f"bench.{name}", name, routing_key=f"{name}.#")
        conn.close()
    elif cmd == "amqp-count":
        conn, ch = amqp()
        print(ch.queue_declare(f"bench.{name}", passive=True).method.message_count)
        conn.close()
    elif cmd == "amqp-delete":
        conn, ch = amqp()
        ch.queue_delete(f"bench.{name}")
        ch.exchange_delete(name)
        conn.close()
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
