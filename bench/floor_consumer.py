"""The floor: one bare pika consumer on an exclusive queue bound to a fanout exchange,
replying at once to every message. ``python -m bench.floor_consumer AMQP_URL EXCHANGE``"""

from __future__ import annotations

import sys

import pika


def main(amqp_url: str, exchange: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.exchange_declare(exchange, exchange_type="fanout")
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, exchange)

    def answer(
        ch: pika.adapters.blocking_connection.BlockingChannel,
        _method: object,
        properties: pika.BasicProperties,
        _body: bytes,
    ) -> None:
        ch.basic_publish(
            "",
            properties.reply_to,
            b"present",
            pika.BasicProperties(correlation_id=properties.correlation_id),
        )

    channel.basic_consume(queue, answer, auto_ack=True)
    print("consuming", flush=True)
    channel.start_consuming()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
