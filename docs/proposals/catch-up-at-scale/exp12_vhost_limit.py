"""Experiment 12: does a vhost's max-connections limit (which `puller broker-setup` sets) count
stream-protocol connections on 3.10.8? Limit 1; one AMQP connection held; then stream
connections are opened."""

from __future__ import annotations

import json

from common import STREAM_PORT, connect, ctl, declare_stream, delete_vhost, fresh_vhost
from stream_tail import StreamClient


def main() -> None:
    vhost = fresh_vhost("limit")
    try:
        amqp = connect(vhost)
        declare_stream(amqp.channel(), "exp.history")
        ctl("set_vhost_limits", "-p", vhost, json.dumps({"max-connections": 1}))
        try:
            connect(vhost)
            print("a second AMQP connection: accepted")
        except Exception as error:  # noqa: BLE001
            print("a second AMQP connection: refused", type(error).__name__)
        opened = []
        for _ in range(5):
            try:
                client = StreamClient("127.0.0.1", STREAM_PORT, "guest", "guest", vhost)
                client.tail("exp.history")
                opened.append(client)
            except Exception as error:  # noqa: BLE001
                print("stream connection refused:", error)
                break
        print(f"stream connections opened and used with max-connections 1 (one AMQP held): {len(opened)}")
        for client in opened:
            client.close()
        amqp.close()
    finally:
        delete_vhost(vhost)


if __name__ == "__main__":
    main()
