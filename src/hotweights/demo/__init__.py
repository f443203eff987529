"""The built-in demo: tiny chat models built on the spot, and the versions the demo swaps."""
