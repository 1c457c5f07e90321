"""The decoding core: the draft tree, the Drafter interface, tree search, verification, sampling, KV caches, prompt lookup, prompts, step context and stats."""
