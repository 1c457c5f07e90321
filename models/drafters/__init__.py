"""Drafts that read the target's own states: treespec's EAGLE-style head and EAGLE-3 drafts in the serving engines' layout."""
