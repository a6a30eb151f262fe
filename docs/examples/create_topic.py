"""Create a Kafka topic for the documentation's examples.

Usage (from the repository root, after ``eval "$(make -s stack-env)"``)::

    python docs/examples/create_topic.py TOPIC [PARTITIONS]

The local stack's broker does not create topics on first use
(``auto.create.topics.enable=false``), so every example makes its own topic first.
The topic gets PARTITIONS partitions (default 4) and one replica, which is all a
single-broker stack can hold; on a real cluster, ask for the replication factor your
operators use (usually 3) with the tool they provide.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print("usage: python docs/examples/create_topic.py TOPIC [PARTITIONS]", file=sys.stderr)
        return 2
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        print('error: set KAFKA_BOOTSTRAP_SERVERS (eval "$(make -s stack-env)")', file=sys.stderr)
        return 2
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = argv[0]
    partitions = int(argv[1]) if len(argv) == 2 else 4
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(timeout=60)
    print(f"created topic {topic!r} with {partitions} partition(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
