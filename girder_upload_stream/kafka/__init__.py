"""Every confluent-kafka call: the consumer group, producers, encryption."""
