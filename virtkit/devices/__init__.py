"""Device models: ``legacy/`` for the emulated PC hardware an unmodified guest expects."""
