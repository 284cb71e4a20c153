"""What is checked and measured about an engine: parity against the bundle's graph, the
reference images at open, latency and memory, and the bench records that choices read."""
