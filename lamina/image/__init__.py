"""Images over the layer store: the content store, manifests, names, and the registry
client (contract §7; to come)."""
