"""Test helpers shared across test packages (checkpoint writers, ...)."""
