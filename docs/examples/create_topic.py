"""Create a Kafka topic for the documentation's examples.

Usage (from the repository root, after ``eval "$(make -s stack-env)"``)::

    python docs/examples/create_topic.py TOPIC [PARTITIONS]

The local stack's broker does not create topics on first use
(``auto.create.topics.enable=false``), so every example makes its own topic first.
The topic gets PARTITIONS partitions (default 4) and one replica, which is all a
single-broker stack can hold; on a real cluster, ask for the replication factor your
operators use (usually 3) with the tool they provide. A topic that exists already is
left as it is (one line says so, exit status 0).
"""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python docs/examples/create_topic.py",
        description="Create a Kafka topic with one replica on the broker of "
                    "$KAFKA_BOOTSTRAP_SERVERS (eval \"$(make -s stack-env)\" sets it). A "
                    "topic that exists already is left as it is (exit status 0).")
    parser.add_argument("topic", metavar="TOPIC", help="name of the topic (required)")
    parser.add_argument("partitions", metavar="PARTITIONS", type=int, nargs="?", default=4,
                        help="number of partitions (default: %(default)s)")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        print('error: set KAFKA_BOOTSTRAP_SERVERS (eval "$(make -s stack-env)")', file=sys.stderr)
        return 2
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    future = admin.create_topics([NewTopic(args.topic, args.partitions, 1)])[args.topic]
    try:
        future.result(timeout=60)
    except KafkaException as exc:
        error = exc.args[0]
        if error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
            print(f"topic {args.topic!r} exists already: left as it is")
            return 0
        print(f"error: cannot create topic {args.topic!r}: {error.str()}", file=sys.stderr)
        return 1
    print(f"created topic {args.topic!r} with {args.partitions} partition(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
