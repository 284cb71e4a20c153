"""What the service tells the outside: events (MQTT, JSONL) and Prometheus metrics."""
