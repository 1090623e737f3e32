"""The tar engine: read, apply (isolated), export and compare layers; no store, no backend."""
