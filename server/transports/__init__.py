"""The three subscriber transports; each speaks to the hub and the log, never to Redis."""
