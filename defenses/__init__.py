"""Client-side defenses (Flower client mods and wrappers of local training)."""
