"""Names to models: loading local directories and the demo pair, and what a decoder loads beside its models."""
