"""Experiment 11: electing one keeper with a single-active-consumer queue holding one token
(RabbitMQ 3.10, AMQP 0.9.1 only).

Queue puller.keeper.token: classic, durable, x-single-active-consumer, x-max-length 1,
x-overflow drop-head. Every worker consumes it (prefetch 1, never acks); whoever gets the
token is the keeper. A worker that finds message_count 0 publishes a token (the held one is
unacked, so not counted): at most one held + one ready. Checks: only one consumer ever holds a
token; when the keeper's connection closes the token goes to another consumer; the number of
tokens stays bounded however many workers bootstrap.
"""

from __future__ import annotations

import time

from common import connect, delete_vhost, fresh_vhost

QUEUE = "puller.keeper.token"
ARGS = {"x-single-active-consumer": True, "x-max-length": 1, "x-overflow": "drop-head"}


class Worker:
    def __init__(self, vhost: str, name: str) -> None:
        self.name = name
        self.connection = connect(vhost)
        self.channel = self.connection.channel()
        self.channel.queue_declare(QUEUE, durable=True, arguments=ARGS)
        self.channel.basic_qos(prefetch_count=1)
        self.tokens = 0
        self.channel.basic_consume(QUEUE, self.on_token, auto_ack=False)
        if self.channel.queue_declare(QUEUE, passive=True).method.message_count == 0:
            self.channel.basic_publish("", QUEUE, b"token")  # bootstrap

    def on_token(self, *_args: object) -> None:
        self.tokens += 1  # held, never acked

    def pump(self) -> None:
        self.connection.process_data_events(time_limit=0.05)


def main() -> None:
    vhost = fresh_vhost()
    try:
        workers = [Worker(vhost, f"w{i}") for i in range(20)]
        for _ in range(10):
            for w in workers:
                w.pump()
        holders = [w.name for w in workers if w.tokens]
        ready = workers[-1].channel.queue_declare(QUEUE, passive=True).method.message_count
        print("20 workers bootstrapped: holders", holders, "; tokens ready in the queue", ready)
        for round_ in range(3):
            keeper = next(w for w in workers if w.tokens)
            keeper.connection.close()
            workers.remove(keeper)
            time.sleep(0.3)
            for _ in range(10):
                for w in workers:
                    w.pump()
            holders = [w.name for w in workers if w.tokens]
            ready = workers[-1].channel.queue_declare(QUEUE, passive=True).method.message_count
            print(f"keeper {keeper.name} gone: holders now {holders}; tokens ready {ready}")
        for w in workers:
            w.connection.close()
    finally:
        delete_vhost(vhost)


if __name__ == "__main__":
    main()
