"""Local development stack: Apache Kafka, a MongoDB-protocol server, Girder, Prefect."""
