"""The trio runtime of a tunnel, shared by gateway and agent: the tunnel and its
streams, heartbeats, the reconnect supervisor, write fast paths, WebSocket masking."""
