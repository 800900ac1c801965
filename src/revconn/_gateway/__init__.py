"""The gateway side: admission, the data-plane listener and its exchange, the
admin app, the registry and auth. The agent side never imports this package."""
