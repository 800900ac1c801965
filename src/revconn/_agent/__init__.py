"""The agent side: the agent, its upstreams (HTTP pool, in-process ASGI) and the
demo app. Imports nothing from the gateway side."""
