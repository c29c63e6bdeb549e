"""Model-based tests: hypothesis state machines that interleave every path touching a charge and check
the money invariants after each step."""
