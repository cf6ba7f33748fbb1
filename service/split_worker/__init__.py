"""``tandem split-worker``: the middle layers of a split model, served to tandem edges."""
